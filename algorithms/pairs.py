"""What the pair-based algorithms (DPO, IPO, Unlikelihood, Preferred-FT) share: encoded pairs,
one batch of chosen + rejected for a single forward pass, and reference log-probs computed once per env.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from algorithms.interface import TrainContext
from algorithms.policy import Policy, ended_flags


@dataclass
class EncodedPairs:
    """Token ids of every pair: prompts with special tokens, completions + EOS where they ended
    (Policy's convention; the pairs' `chosen_ended` / `rejected_ended` columns, all ended without them)."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]

    @classmethod
    def encode(cls, policy: Policy, pairs: pd.DataFrame, algorithm: str) -> "EncodedPairs":
        if len(pairs) == 0:
            raise ValueError(f"{algorithm} needs preference pairs; the env produced none")
        return cls(
            prompt_ids=policy.encode_prompts(pairs["prompt"].tolist()),
            chosen_ids=policy.encode_completions(pairs["chosen"].tolist(), ended=ended_flags(pairs, "chosen")),
            rejected_ids=policy.encode_completions(pairs["rejected"].tolist(), ended=ended_flags(pairs, "rejected")),
        )

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def both(self, idx: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, completions) of 2B sequences for ONE forward: the B chosen first, then the B rejected."""
        prompts = [self.prompt_ids[i] for i in idx]
        return prompts * 2, [self.chosen_ids[i] for i in idx] + [self.rejected_ids[i] for i in idx]

    def completion_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens per chosen / rejected completion (EOS included where it ended), each (N,)."""
        return (torch.tensor([len(c) for c in self.chosen_ids], dtype=torch.float32),
                torch.tensor([len(c) for c in self.rejected_ids], dtype=torch.float32))


def training_schedule(ctx: TrainContext, n_items: int) -> list[np.ndarray]:
    """This rank's batch indices for every step of the trial (see TrainContext.batch_indices)."""
    return [ctx.batch_indices(step, n_items) for step in range(ctx.train.steps)]


def reference_logps(ctx: TrainContext, enc: EncodedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log π_ref of every chosen and rejected completion (nats, CPU tensors (N,) indexed by
    pair), computed once per env and shared by every pair trial through `ctx.cache`: the reference
    and the pairs are the env's, and the key names the encoded tokens (sha256), so another encoding
    gets its own entry. The values are float32 log-probs kept exactly (JSON holds each as a float64)."""
    digest = hashlib.sha256(json.dumps([enc.prompt_ids, enc.chosen_ids, enc.rejected_ids]).encode()).hexdigest()[:16]

    def compute() -> dict:
        ref = ctx.reference
        return {"chosen": ref.sequence_logps_batched(enc.prompt_ids, enc.chosen_ids).tolist(),
                "rejected": ref.sequence_logps_batched(enc.prompt_ids, enc.rejected_ids).tolist()}

    value = ctx.cache(f"pair-reference-logps/v1/pairs={len(enc)}/tokens={digest}", compute)
    return (torch.tensor(value["chosen"], dtype=torch.float32),
            torch.tensor(value["rejected"], dtype=torch.float32))


def implicit_reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """`rewards/*` training metrics of the implicit rewards β·(log π − log π_ref), each (B,)."""
    margin = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margin": float(margin.mean()),
        "rewards/accuracy": float((margin > 0).float().mean()),
    }


def optim_metrics(opt: dict) -> dict:
    """`optim/*` training metrics from what `ctx.optimize` returned."""
    return {"optim/lr": opt.get("lr", float("nan")), "optim/grad_norm": opt.get("grad_norm", float("nan"))}
