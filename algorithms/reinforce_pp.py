"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models"; OpenRLHF `advantage_estimator: reinforce`): PPO's token-level machinery without a critic.

Per iteration, `k` samples of every train prompt from the current policy (1 by default). Per-token
rewards carry the KL penalty, the normalised score sits on the last token,

    r_t = −kl_coef · KL_t  (+ ŝ at the last token),   KL_t = log π(y_t|·) − log π_ref(y_t|·)   (k1)

(ŝ = (score − μ_ref)/σ_ref as PPO normalises it: `algorithms.online`), the advantage of a token
is its undiscounted return-to-go, normalised over every token of the GLOBAL batch (all ranks), and
the policy takes PPO's clipped surrogate, token mean:

    G_t = Σ_{s ≥ t} r_s,   A_t = (G_t − mean_batch G) / std_batch G
    L   = 1/|tokens| Σ_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = π/π_old

The global normalisation is what replaces the critic (and, in the paper, what keeps it stabler than
GRPO's per-prompt one). As with PPO, the k1 penalty in the reward regularises KL(π‖π_ref). With
`epochs` = 1, π_old = π (detached). Frontier knob: `kl_coef`. The token mean divides by the global
batch's token count, so W workers reproduce 1 worker's losses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS, online
from algorithms.interface import TrainContext, check, require_finite
from algorithms.pairs import optim_metrics
from algorithms.ppo import masked_mean, whiten


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{s ≥ t} r_s over left-aligned completions; (B, T), zero on padding."""
    rewards = rewards * mask
    return torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask


def reinforce_pp_advantages(score: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                            mean_over_ranks=lambda d: d) -> torch.Tensor:
    """Token advantages, (B, T): returns-to-go of r_t = −kl_coef · KL_t (+ score (B,) at the last
    token), whitened over the real tokens of the global batch (`mean_over_ranks`)."""
    rewards = -kl_coef * kl_tokens * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(last), device=mask.device), last] += score.to(rewards.device)
    return whiten(returns_to_go(rewards, mask), mask, mean_over_ranks=mean_over_ranks)


@dataclass
class ReinforcePPParams:
    kl_coef: float = 0.05  # weight of the per-token k1 KL penalty in the reward; the frontier knob
    k: int = 1  # samples per prompt
    epochs: int = 1  # passes over each rollout batch (1: π_old = π)
    cliprange: float = 0.2  # ε of the ratio clip
    rollout_temperature: float = 1.0  # sampling temperature of the rollouts; π and π_ref are scored at it
    reward_norm: bool = True  # score → (score − μ_ref) / σ_ref (algorithms.online), as PPO
    reward_norm_samples: int = 256  # train prompts (one reference sample each) that μ_ref and σ_ref are measured on
    rollout_chunk: int = 8  # prompts per generation call, seeded by global position (divides the per-worker batch, or is above it: one call)

    def __post_init__(self) -> None:
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(isinstance(self.k, int) and self.k >= 1, "k", "must be an integer >= 1")
        check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        check(self.cliprange > 0, "cliprange", "must be > 0")
        online.check_rollout_params(self)


class ReinforcePP:
    name = "reinforce-pp"
    params_cls = ReinforcePPParams
    knob = "kl_coef"
    needs = frozenset({"prompts", "reward_model"})
    trains_policy = True
    reward = "reward_model"

    def train(self, ctx: TrainContext) -> dict:
        p: ReinforcePPParams = ctx.params
        policy, reference, T = ctx.policy, ctx.reference, p.rollout_temperature
        online.train_prompts(ctx, self.name)
        shift, scale = online.normaliser(ctx, self.reward, enabled=p.reward_norm, samples=p.reward_norm_samples,
                                         temperature=T, name=self.name)
        scored = lambda model: functools.partial(model.token_logps, temperature=T)  # noqa: E731
        policy.model.train()
        for it in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(it):
                ctx.evaluate(policy, it)
            roll, score = online.scored_rollout(ctx, it, k=p.k, temperature=T, chunk=p.rollout_chunk,
                                                reward=self.reward, name=self.name)  # score: (N,) raw
            p_ids, c_ids = roll.prompt_ids, roll.completion_ids
            score_n = (score - shift) / scale
            n = len(score) // p.k  # prompts
            whole = len(ctx.micro_batches(n)) == 1  # one forward: its pass is π_old and the first epoch's
            if whole:
                logps, mask = policy.token_logps(p_ids, c_ids, temperature=T)  # (N, T), with grad
                old_logps = logps.detach()  # π_old: the policy that drew the samples
            else:  # advantages are whitened over the whole batch: π_old of every sample first, no grad
                old_logps, mask = online.no_grad_passes(ctx, scored(policy), p_ids, c_ids, k=p.k)
            with torch.no_grad():
                ref_logps, _ = online.no_grad_passes(ctx, scored(reference), p_ids, c_ids, k=p.k)
                kl_tokens = (old_logps - ref_logps.to(old_logps.device)) * mask  # (N, T) k1
                seq_kl = kl_tokens.sum(-1)
                require_finite(f"{self.name}: the KL of iteration {it + 1}'s rollouts", seq_kl)
                advantages = reinforce_pp_advantages(score_n, kl_tokens, mask, p.kl_coef, ctx.mean_over_ranks)
            tokens = ctx.mean_over_ranks({"n": float(mask.sum())})["n"]  # global tokens / W: the token-mean divisor
            for epoch in range(p.epochs):
                def loss_of(mb: np.ndarray, first: bool = whole and epoch == 0, p_ids: list = p_ids, c_ids: list = c_ids,
                            old_logps: torch.Tensor = old_logps, advantages: torch.Tensor = advantages,
                            mask: torch.Tensor = mask, tokens: float = tokens) -> tuple[torch.Tensor, dict]:
                    r = online.rows(mb, p.k)
                    lp = logps if first else policy.token_logps([p_ids[i] for i in r], [c_ids[i] for i in r],
                                                                temperature=T)[0]
                    w = lp.shape[1]
                    surrogate = online.clipped_surrogate(lp, old_logps[r, :w], advantages[r, :w], p.cliprange)
                    return masked_mean(surrogate, mask[r, :w], "token_mean", tokens), {}

                loss, _, opt = ctx.optimize_batch(n, loss_of)
            ctx.log(it + 1, {
                "objective/score": float(score.mean()),
                "objective/score_normalized": float(score_n.mean()),
                "objective/kl": float(seq_kl.mean()),
                "objective/reward": float(score_n.mean()) - p.kl_coef * float(seq_kl.mean()),
                "objective/length": float(mask.sum(-1).mean()),
                "losses/policy": loss,
                **optim_metrics(opt),
            })
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {"reward_norm_mean": shift, "reward_norm_std": scale}


ALGORITHMS.register(ReinforcePP())
