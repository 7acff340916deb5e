"""Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences"), the sampled IPO loss.

    h(x, y_w, y_l) = log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)
    L_IPO = E_(x, y_w, y_l) [ ( h(x, y_w, y_l) - 1/(2τ) )² ]

Unlike DPO, whose loss keeps falling as the margin h grows, IPO regresses h onto the fixed target
1/(2τ), so it stays regularised towards the reference even on deterministic preferences. The
strength τ is named `beta`, as in TRL; it is the frontier knob (smaller beta → larger target
margin → further from the reference).

With `average_logps` (the default), log π and log π_ref are averaged over the completion's tokens
instead of summed, so h is in nats per token (TRL's IPO and the authors' recommendation); without
it h is in nats per sequence. The reference log-probs are computed once per env (shared by every
pair trial), before the first step; chosen and rejected completions go through the policy in ONE
forward pass (2B sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.pairs import (
    EncodedPairs, implicit_reward_metrics, optim_metrics, reference_logps, training_schedule,
)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair IPO losses and implicit rewards; all inputs (B,) log-probs in nats (summed or
    per-token averaged, the same way for all four).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the implicit reward of a
    completion is β · (log π − log π_ref) (detached: for logging, not for gradients).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


@dataclass
class IPOParams:
    beta: float = 0.1  # IPO's τ (TRL's default); the margin target is 1/(2·beta); the frontier knob
    average_logps: bool = True  # average log-probs per completion token (h in nats/token) instead of summing

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", "must be > 0")
        check(isinstance(self.average_logps, bool), "average_logps", "must be true or false")


class IPO:
    name = "ipo"
    params_cls = IPOParams
    knob = "beta"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy, params = ctx.policy, ctx.params
        beta = params.beta
        enc = EncodedPairs.encode(policy, ctx.data.pairs, self.name)
        schedule = training_schedule(ctx, len(enc))
        ref_chosen, ref_rejected = reference_logps(ctx, enc)
        if params.average_logps:  # per token; the policy's mask counts the same tokens (EOS included)
            chosen_len, rejected_len = enc.completion_lengths()
            ref_chosen, ref_rejected = ref_chosen / chosen_len, ref_rejected / rejected_len

        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = schedule[step]

            def loss_of(mb: np.ndarray, idx: np.ndarray = idx) -> tuple[torch.Tensor, dict]:
                sel, b = idx[mb], len(mb)
                token_logps, mask = policy.token_logps(*enc.both(sel))  # (2b, T): chosen first, rejected second
                seq_logps = (token_logps * mask).sum(-1)  # (2b,) nats per sequence
                logps = seq_logps / mask.sum(-1) if params.average_logps else seq_logps  # (2b,)
                losses, chosen_r, rejected_r = ipo_loss(
                    logps[:b], logps[b:], ref_chosen[sel].to(logps.device), ref_rejected[sel].to(logps.device), beta
                )
                return losses.sum() / len(idx), {"chosen_r": chosen_r, "rejected_r": rejected_r,
                                                 "chosen": seq_logps[:b]}

            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            ctx.log(
                step + 1,
                {
                    "losses/ipo": loss,
                    **implicit_reward_metrics(v["chosen_r"], v["rejected_r"]),
                    "logratios/margin": float((v["chosen_r"] - v["rejected_r"]).mean()) / beta,  # h; target 1/(2β)
                    "logps/chosen": float(v["chosen"].mean()),  # nats per sequence
                    **optim_metrics(opt),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(IPO())
