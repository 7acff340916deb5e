"""Unlikelihood training (Welleck et al. 2019), the DPO paper's "Unlikelihood" baseline.

    L_UL = E_(x, y_w, y_l) [ -(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t)
                             - α (1/|y_l|) Σ_t log(1 - π(y_l,t | x, y_l,<t)) ]

Likelihood on the chosen completion, unlikelihood on the rejected one: every rejected token's
probability is pushed towards 0 (teacher-forced on the rejected prefix). Both terms are per-token
means within a completion, then averaged over pairs. There is no reference policy and no KL term;
`alpha`, the weight of the unlikelihood term, is the frontier knob (alpha = 0: likelihood on the
chosen completions only). Chosen and rejected go through the policy in ONE forward pass (2B
sequences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.pairs import EncodedPairs, optim_metrics

_MAX_PROB = 1.0 - 1e-6  # log(1 - p) is capped at log(1e-6) ≈ -13.8 nats; tokens above get no gradient


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, elementwise, accurate and with finite gradients.

    Uses log(-expm1(x)) near 0 and log1p(-exp(x)) below -ln 2 (Mächler 2012); probabilities are
    clamped to at most 1 - 1e-6 so that p → 1 gives a finite value instead of -inf.
    """
    x = logp.clamp(max=math.log(_MAX_PROB))
    near_zero = x > -math.log(2.0)
    # each branch sees only inputs where it is finite, so the unselected one never makes NaN grads
    a = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    b = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(near_zero, a, b)


def unlikelihood_loss(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair unlikelihood losses; token log-probs (B, T) in nats, masks (B, T) 1 on real tokens.

    Returns (losses, nll_chosen, ul_rejected), each (B,): nll_chosen = -(1/|y_w|) Σ log π(y_w,t),
    ul_rejected = -(1/|y_l|) Σ log(1 - π(y_l,t)) (both >= 0), losses = nll_chosen + α · ul_rejected.
    """
    nll_chosen = -(chosen_token_logps * chosen_mask).sum(-1) / chosen_mask.sum(-1).clamp(min=1)  # (B,)
    real = rejected_mask > 0
    # padding is replaced by log p = -1 before log1mexp (log(1 - 1) would be -inf), then masked out
    safe = torch.where(real, rejected_token_logps, torch.full_like(rejected_token_logps, -1.0))  # (B, T)
    ul_rejected = -(log1mexp(safe) * rejected_mask).sum(-1) / rejected_mask.sum(-1).clamp(min=1)  # (B,)
    return nll_chosen + alpha * ul_rejected, nll_chosen, ul_rejected


@dataclass
class UnlikelihoodParams:
    alpha: float = 1.0  # weight of the unlikelihood term on rejected tokens; the frontier knob

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "alpha", "must be >= 0")


class Unlikelihood:
    name = "unlikelihood"
    params_cls = UnlikelihoodParams
    knob = "alpha"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy, alpha = ctx.policy, ctx.params.alpha
        enc = EncodedPairs.encode(policy, ctx.data.pairs, self.name)

        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = ctx.batch_indices(step, len(enc))

            def loss_of(mb: np.ndarray, idx: np.ndarray = idx) -> tuple[torch.Tensor, dict]:
                b = len(mb)
                token_logps, mask = policy.token_logps(*enc.both(idx[mb]))  # (2b, T): chosen first, rejected second
                losses, nll_chosen, ul_rejected = unlikelihood_loss(
                    token_logps[:b], mask[:b], token_logps[b:], mask[b:], alpha
                )
                seq_logps = (token_logps * mask).sum(-1)  # (2b,) nats per sequence
                return losses.sum() / len(idx), {"nll": nll_chosen, "ul": ul_rejected, "chosen": seq_logps[:b],
                                                 "rejected": seq_logps[b:]}

            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            ctx.log(
                step + 1,
                {
                    "losses/unlikelihood": loss,
                    "losses/nll_chosen": float(v["nll"].mean()),
                    "losses/ul_rejected": float(v["ul"].mean()),
                    "logps/chosen": float(v["chosen"].mean()),
                    "logps/rejected": float(v["rejected"].mean()),
                    **optim_metrics(opt),
                },
            )
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(Unlikelihood())
