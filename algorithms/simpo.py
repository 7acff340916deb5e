"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    r(x, y) = β / |y| · log π(y|x)                        (length-normalised, no reference)
    L_SimPO = -E_(x, y_w, y_l) [ log σ( r(x, y_w) - r(x, y_l) - γ ) ]

The implicit reward is the policy's average log-prob per completion token, scaled by β; γ is a
target reward margin (in the reward's units, β · nats per token). The loss needs no reference
model: no reference log-probs are computed, and nothing in the loss pulls the policy back towards
π_ref. It is TRL's CPOTrainer with `loss_type="simpo"`, `cpo_alpha=0` (−logσ(β·Δ − γ), Δ the
difference of the average log-probs).

Why `beta` is the frontier knob: the loss stops pushing once β·Δ − γ is a few units above 0
(σ saturates), i.e. once the chosen completion is ahead of the rejected one by about (γ + a few)/β
nats per token. A larger β reaches that with a smaller change of the policy: less KL to the
reference; a smaller β keeps pulling the two apart for longer: more reward, more KL. The KL that
the report measures is still KL(π‖π_ref) against the same frozen reference as every algorithm's
(equal terms); SimPO just never looks at it while training.

Chosen and rejected completions go through the policy in ONE forward pass (2B sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.pairs import EncodedPairs, implicit_reward_metrics, optim_metrics, training_schedule


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and rewards; inputs (B,) log-probs averaged over each completion's
    tokens (nats per token, EOS included where the completion ended).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the reward of a completion is
    β · its average log-prob (detached: for logging, not for gradients).
    """
    chosen_rewards = beta * policy_chosen_avg_logps  # (B,)
    rejected_rewards = beta * policy_rejected_avg_logps  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass
class SimPOParams:
    beta: float = 2.0  # scale of the length-normalised reward (the paper's 2.0-2.5); the frontier knob
    gamma: float = 0.5  # target reward margin, β · nats per token (TRL's simpo_gamma default)

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", "must be > 0")
        check(self.gamma >= 0, "gamma", "must be >= 0")


class SimPO:
    name = "simpo"
    params_cls = SimPOParams
    knob = "beta"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy, params = ctx.policy, ctx.params
        enc = EncodedPairs.encode(policy, ctx.data.pairs, self.name)
        schedule = training_schedule(ctx, len(enc))

        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = schedule[step]

            def loss_of(mb: np.ndarray, idx: np.ndarray = idx) -> tuple[torch.Tensor, dict]:
                b = len(mb)
                token_logps, mask = policy.token_logps(*enc.both(idx[mb]))  # (2b, T): chosen first, rejected second
                seq_logps = (token_logps * mask).sum(-1)  # (2b,) nats per sequence
                avg_logps = seq_logps / mask.sum(-1)  # (2b,) nats per token
                losses, chosen_r, rejected_r = simpo_loss(avg_logps[:b], avg_logps[b:], params.beta, params.gamma)
                return losses.sum() / len(idx), {"chosen_r": chosen_r, "rejected_r": rejected_r,
                                                 "chosen": seq_logps[:b], "rejected": seq_logps[b:]}

            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            ctx.log(
                step + 1,
                {
                    "losses/simpo": loss,
                    **implicit_reward_metrics(v["chosen_r"], v["rejected_r"]),
                    "logps/chosen": float(v["chosen"].mean()),  # nats per sequence
                    "logps/rejected": float(v["rejected"].mean()),
                    **optim_metrics(opt),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(SimPO())
