"""Preferred-FT, the DPO paper's baseline: supervised fine-tuning on the chosen completions only.

    L_PFT = -(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t)   (mean over all chosen tokens of the batch)

The rejected completions are ignored. A prompt's chosen completion often appears in several pairs
(one per rejected completion it beat); the (prompt, chosen) examples are deduplicated first, so
each preferred completion counts once however many pairs it won, and `batch_size` counts these
unique examples. No reference policy, no knob: one point on the frontier, like `sft`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext
from algorithms.pairs import optim_metrics
from algorithms.policy import ended_flags
from algorithms.sft import sft_loss


def preferred_examples(pairs: pd.DataFrame) -> pd.DataFrame:
    """The distinct (prompt, chosen) rows of `pairs` (with `chosen_ended` where the pairs have it), in
    order of first appearance, re-indexed 0..N-1."""
    columns = ["prompt", "chosen"] + (["chosen_ended"] if "chosen_ended" in pairs.columns else [])
    return pairs[columns].drop_duplicates(subset=["prompt", "chosen"]).reset_index(drop=True)


@dataclass
class PreferredFTParams:
    """No parameters: the optimisation settings (TrainSettings) are the whole configuration."""


class PreferredFT:
    name = "preferred-ft"
    params_cls = PreferredFTParams
    knob = None
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy = ctx.policy
        if len(ctx.data.pairs) == 0:
            raise ValueError("preferred-ft needs preference pairs; the env produced none")
        examples = preferred_examples(ctx.data.pairs)
        prompt_ids = policy.encode_prompts(examples["prompt"].tolist())
        chosen_ids = policy.encode_completions(examples["chosen"].tolist(), ended=ended_flags(examples, "chosen"))

        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = ctx.batch_indices(step, len(examples))
            tokens = sum(len(chosen_ids[i]) for i in idx)  # the batch's target tokens: sft_loss's divisor

            def loss_of(mb: np.ndarray, idx: np.ndarray = idx, tokens: int = tokens) -> tuple[torch.Tensor, dict]:
                sel = idx[mb]
                token_logps, mask = policy.token_logps([prompt_ids[i] for i in sel], [chosen_ids[i] for i in sel])
                return sft_loss(token_logps, mask, tokens=tokens), {"chosen": (token_logps * mask).sum(-1)}

            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            ctx.log(
                step + 1,
                {
                    "losses/preferred_ft": loss,
                    "logps/chosen": float(v["chosen"].mean()),  # nats per sequence
                    **optim_metrics(opt),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(PreferredFT())
