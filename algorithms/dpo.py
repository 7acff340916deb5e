"""Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss.

    L_DPO = -E_(x, y_w, y_l) [ log σ( β log π(y_w|x)/π_ref(y_w|x) - β log π(y_l|x)/π_ref(y_l|x) ) ]

The reference log-probs are computed once per trial, before the first step; chosen and rejected
completions go through the policy in ONE forward pass (2B sequences). Frontier knob: `beta`
(smaller beta → further from the reference: more reward, more KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check


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
        policy, pairs, beta = ctx.policy, ctx.data.pairs, ctx.params.beta
        if len(pairs) == 0:
            raise ValueError("DPO needs preference pairs; the env produced none")
        prompt_ids = policy.encode_prompts(pairs["prompt"].tolist())
        chosen_ids = policy.encode_completions(pairs["chosen"].tolist())
        rejected_ids = policy.encode_completions(pairs["rejected"].tolist())

        # reference log-probs once, for exactly the pairs this rank will see
        schedule = [ctx.batch_indices(step, len(pairs)) for step in range(ctx.train.steps)]
        used = np.unique(np.concatenate(schedule))
        ref_chosen = torch.zeros(len(pairs))
        ref_rejected = torch.zeros(len(pairs))
        ref_chosen[used] = ctx.reference.sequence_logps_batched(
            [prompt_ids[i] for i in used], [chosen_ids[i] for i in used]
        )
        ref_rejected[used] = ctx.reference.sequence_logps_batched(
            [prompt_ids[i] for i in used], [rejected_ids[i] for i in used]
        )

        policy.model.train()
        for step in range(ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = schedule[step]
            b = len(idx)
            logps = policy.sequence_logps(
                [prompt_ids[i] for i in idx] * 2,
                [chosen_ids[i] for i in idx] + [rejected_ids[i] for i in idx],
            )  # (2B,): chosen first, rejected second
            losses, chosen_r, rejected_r = dpo_loss(
                logps[:b], logps[b:], ref_chosen[idx].to(logps.device), ref_rejected[idx].to(logps.device), beta
            )
            loss = losses.mean()
            opt = ctx.optimize(loss)
            ctx.log(
                step + 1,
                {
                    "losses/dpo": float(loss.detach()),
                    "rewards/chosen": float(chosen_r.mean()),
                    "rewards/rejected": float(rejected_r.mean()),
                    "rewards/margin": float((chosen_r - rejected_r).mean()),
                    "rewards/accuracy": float((chosen_r > rejected_r).float().mean()),
                    "logps/chosen": float(logps[:b].detach().mean()),
                    "optim/lr": opt.get("lr", float("nan")),
                    "optim/grad_norm": opt.get("grad_norm", float("nan")),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(DPO())
