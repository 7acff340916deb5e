"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath; TRL GRPOTrainer).

Per iteration, a group of G samples o_1..o_G of every train prompt q from the current policy. Each
sample's advantage is its score standardised within its group (no critic, no reward normalisation
needed: the scale cancels), the same for all of its tokens,

    Â_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + ε)

and the loss is the clipped surrogate plus a KL term, averaged over each sample's tokens, then
over samples:

    L = 1/N Σ_i 1/|o_i| Σ_t [ −min(ρ_i,t Â_i, clip(ρ_i,t, 1 − ε_c, 1 + ε_c) Â_i) + kl_coef · k3_i,t ]
    ρ_i,t = π(o_i,t|·) / π_old(o_i,t|·),   k3 = π_ref/π − log(π_ref/π) − 1

Which KL that regularises: k3's VALUE is an unbiased estimate of KL(π‖π_ref) on samples of π, but
as a loss term (differentiated through π, the samples held fixed) its expected gradient is that
of the REVERSE KL, ∇ KL(π_ref‖π) (ppo.py's table): GRPO's penalty pulls π to cover π_ref's mass.
`objective/kl` logs the sequence sum of k3 (an estimate of KL(π‖π_ref) in nats, as the evaluator
reports). Frontier knob: `kl_coef` (the paper's β).

With `epochs` = 1 (TRL's default num_iterations) π_old is π itself, detached: ρ = 1 and the clip never
binds; with more, every epoch reuses the batch's samples against the log-probs they were drawn
with. The std is the sample std (n − 1), as TRL; ε = 1e-4. `train.batch_size` counts prompts per
step (batch_size × G samples). A group stays on one rank, so W workers compute 1 worker's losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS, online
from algorithms.interface import TrainContext, check, require_finite
from algorithms.pairs import optim_metrics
from algorithms.ppo import kl_penalty


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-standardised advantages, (P, G) → (P, G): (r − group mean) / (group sample std + eps)."""
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + eps)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's loss and per-token k3; logps / old_logps / ref_logps / mask (N, T), advantages (N,).
    Returns (loss: mean over samples of the mean over each sample's tokens, k3 (N, T) detached)."""
    k3 = kl_penalty(logps, ref_logps, "k3")  # (N, T), differentiable through logps
    per_token = online.clipped_surrogate(logps, old_logps, advantages[:, None], cliprange) + kl_coef * k3
    per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (N,)
    return per_sample.mean(), k3.detach()


@dataclass
class GRPOParams:
    kl_coef: float = 0.04  # weight of the k3 KL loss term (TRL's former beta default 0.04); the frontier knob
    group_size: int = 4  # G samples per prompt (≥ 2)
    epochs: int = 1  # passes over each rollout batch (TRL's num_iterations; 1: π_old = π)
    cliprange: float = 0.2  # ε_c of the ratio clip
    rollout_temperature: float = 1.0  # sampling temperature of the rollouts; π, π_old and π_ref are scored at it
    rollout_chunk: int = 8  # prompts per generation call, seeded by global position (divides the per-worker batch, or is above it: one call)

    def __post_init__(self) -> None:
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(isinstance(self.group_size, int) and self.group_size >= 2, "group_size", "must be an integer >= 2")
        check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        check(self.cliprange > 0, "cliprange", "must be > 0")
        online.check_rollout_params(self)


class GRPO:
    name = "grpo"
    params_cls = GRPOParams
    knob = "kl_coef"
    needs = frozenset({"prompts", "reward_model"})
    trains_policy = True
    reward = "reward_model"

    def train(self, ctx: TrainContext) -> dict:
        p: GRPOParams = ctx.params
        policy, reference, T = ctx.policy, ctx.reference, p.rollout_temperature
        online.train_prompts(ctx, self.name)
        policy.model.train()
        for it in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(it):
                ctx.evaluate(policy, it)
            roll, score = online.scored_rollout(ctx, it, k=p.group_size, temperature=T, chunk=p.rollout_chunk,
                                                reward=self.reward, name=self.name)  # score: (N,) raw
            p_ids, c_ids, G = roll.prompt_ids, roll.completion_ids, p.group_size
            advantages = grpo_advantages(score.view(-1, G)).view(-1)  # (N,)
            n = len(score) // G  # prompts; a micro-batch of prompts holds their whole groups
            # per micro-batch: π_ref, and π_old from the first epoch's pass (the policy that drew the samples)
            old: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

            def loss_of(mb: np.ndarray, p_ids: list = p_ids, c_ids: list = c_ids, advantages: torch.Tensor = advantages,
                        n: int = n, old: dict = old) -> tuple[torch.Tensor, dict]:
                r = online.rows(mb, G)
                mp, mc = [p_ids[i] for i in r], [c_ids[i] for i in r]
                logps, mask = policy.token_logps(mp, mc, temperature=T)  # (m, T), with grad
                if int(mb[0]) not in old:
                    with torch.no_grad():
                        old[int(mb[0])] = (reference.token_logps(mp, mc, temperature=T)[0], logps.detach())
                ref_logps, old_logps = old[int(mb[0])]
                loss, k3 = grpo_loss(logps, old_logps, ref_logps.to(logps.device), advantages[r].to(logps.device),
                                     mask, kl_coef=p.kl_coef, cliprange=p.cliprange)
                return loss * (len(mb) / n), {"kl": (k3 * mask).sum(-1), "length": mask.sum(-1)}

            for _ in range(p.epochs):
                loss, v, opt = ctx.optimize_batch(n, loss_of)
            seq_kl = v["kl"]  # (N,) nats per sequence, from the last epoch's pass
            require_finite(f"{self.name}: the KL of iteration {it + 1}'s rollouts", seq_kl)
            ctx.log(it + 1, {
                "objective/score": float(score.mean()),
                "objective/kl": float(seq_kl.mean()),
                "objective/length": float(v["length"].mean()),
                "objective/group_score_std": float(score.view(-1, G).std(1).mean()),
                "losses/grpo": loss,
                **optim_metrics(opt),
            })
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(GRPO())
