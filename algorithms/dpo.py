"""Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss.

    L_DPO = -E_(x, y_w, y_l) [ log σ( β log π(y_w|x)/π_ref(y_w|x) - β log π(y_l|x)/π_ref(y_l|x) ) ]

The reference log-probs are computed once per env (shared by every pair trial), before the first
step; chosen and rejected completions of a (micro-)batch go through the policy in ONE forward pass (2B sequences). Frontier knob: `beta`
(smaller beta → further from the reference: more reward, more KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.pairs import (
    EncodedPairs, implicit_reward_metrics, optim_metrics, reference_logps, training_schedule,
)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards; all inputs (B,) sequence log-probs in nats.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the implicit reward of a
    completion is β · (log π − log π_ref) (detached: for logging, not for gradients).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


@dataclass
class DPOParams:
    beta: float = 0.5  # inverse temperature of the implicit reward; the frontier knob


    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", "must be > 0")


class DPO:
    name = "dpo"
    params_cls = DPOParams
    knob = "beta"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy, beta = ctx.policy, ctx.params.beta
        enc = EncodedPairs.encode(policy, ctx.data.pairs, self.name)
        schedule = training_schedule(ctx, len(enc))
        ref_chosen, ref_rejected = reference_logps(ctx, enc)

        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = schedule[step]

            def loss_of(mb: np.ndarray, idx: np.ndarray = idx) -> tuple[torch.Tensor, dict]:
                sel, b = idx[mb], len(mb)
                logps = policy.sequence_logps(*enc.both(sel))  # (2b,): chosen first, rejected second
                losses, chosen_r, rejected_r = dpo_loss(
                    logps[:b], logps[b:], ref_chosen[sel].to(logps.device), ref_rejected[sel].to(logps.device), beta
                )
                return losses.sum() / len(idx), {"chosen_r": chosen_r, "rejected_r": rejected_r, "chosen": logps[:b]}

            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            ctx.log(
                step + 1,
                {
                    "losses/dpo": loss,
                    **implicit_reward_metrics(v["chosen_r"], v["rejected_r"]),
                    "logps/chosen": float(v["chosen"].mean()),
                    **optim_metrics(opt),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(DPO())
