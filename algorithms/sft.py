"""Supervised fine-tuning: the env's SFT stage, and the `sft` baseline (the reference itself).

    L_SFT = -(1/|y|) Σ_t log π(y_t | y_<t)   (mean over all non-padding target tokens of the batch)

`lm_finetune` trains a policy on whole texts (each encoded as BOS + text + EOS); envs use it to
make their SFT policy. The registered algorithm `sft` trains nothing: it evaluates the reference
policy so that every report has the starting point (KL 0) measured by the same evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, TrainSettings, rank_batch
from algorithms.policy import Policy


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per target token; both (B, T), mask 1 on real tokens. `tokens`
    replaces the count of these tokens as the divisor (a micro-batch's part of its batch's mean)."""
    return -(token_logps * mask).sum() / (tokens if tokens is not None else mask.sum().clamp(min=1))


def lm_finetune(
    policy: Policy,
    texts: list[str],
    train: TrainSettings,
    optimize: Callable[[torch.Tensor], dict],
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[int, dict], None] = lambda step, metrics: None,
) -> float:
    """Fine-tune on `texts` for `train.steps` steps of `train.batch_size` texts; returns the last loss."""
    enc = policy.encode_completions(texts, add_eos=True)  # words + EOS
    bos = policy.encode_prompts([""])[0]  # BOS where the tokenizer has one, else []
    if not bos:
        # no BOS: condition on the first token and score the rest
        prompts, targets = [e[:1] for e in enc], [e[1:] for e in enc]
    else:
        prompts, targets = [bos] * len(enc), enc
    policy.model.train()
    loss_value = float("nan")
    for step in range(train.steps):
        idx = rank_batch(step, batch_size=train.batch_size, rank=rank, world_size=world_size,
                         n_items=len(enc), seed=seed)
        logps, mask = policy.token_logps([prompts[i] for i in idx], [targets[i] for i in idx])
        loss = sft_loss(logps, mask)
        opt = optimize(loss)
        loss_value = float(loss.detach())
        if step % 50 == 0 or step == train.steps - 1:
            log(step + 1, {"losses/sft": loss_value, "optim/lr": opt.get("lr", float("nan"))})
    return loss_value


@dataclass
class SFTParams:
    """The reference policy as it is: no parameters."""


class SFTBaseline:
    name = "sft"
    params_cls = SFTParams
    knob = None
    needs = frozenset()
    trains_policy = False

    def train(self, ctx: TrainContext) -> dict:
        ctx.evaluate(ctx.reference, 0, final=True)
        return {}


ALGORITHMS.register(SFTBaseline())
