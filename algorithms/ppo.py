"""PPO with a KL penalty to the reference (Ziegler et al. 2019; Ouyang et al. 2022), and PPO-GT.

Per iteration: sample one completion per train prompt from π at `rollout_temperature`, score it
(`ppo`: the learned reward model; `ppo-gt`: the env's gold reward, the DPO paper's PPO-GT),
normalise the score with the reference policy's score statistics (`reward_norm`), and shape
per-token rewards

    r_t = −kl_coef · KL_t  (+ ŝ at the last token),   KL_t = log π(y_t|·) − log π_ref(y_t|·)   (k1)
    ŝ = (score − μ_ref) / σ_ref,   μ_ref, σ_ref: mean and std of the score over reference samples

then GAE advantages (γ, λ) from a critic V(x, y_<t), and several epochs of the clipped objectives

    L_π = E_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = π(y_t|·) / π_old(y_t|·)
    L_V = ½ E_t max((V_t − G_t)², (V_old,t + clip(V_t − V_old,t, ±ε_V) − G_t)²)
    L   = L_π + vf_coef · L_V

μ_ref and σ_ref are measured once, on one sample of the frozen SFT reference per train prompt
(up to `reward_norm_samples` prompts, seeded) at `rollout_temperature` with the same scorer, and
cached by bench (`ctx.cache`): the reward the policy sees is in units of the reference's spread,
whatever the scorer's scale (a Bradley–Terry logit, a gold reward in [0, 1]), so `kl_coef`,
`cliprange_value` and the critic's scale mean the same for `ppo` and `ppo-gt` (`reward_norm:
false`: ŝ = score). `objective/score` logs the raw score, `objective/score_normalized` ŝ.

The critic is a separate scalar-head model (`algorithms.reward_model.ScalarModel`) that bench
optimises together with the policy in ONE DeepSpeed engine (needs "critic"). `ppo` starts it from
the shared reward model, backbone and head (`critic_init: reward_model`, as TRL and OpenRLHF do);
its outputs are then in score units and PPO normalises them like the score, V̂ = (V − μ_ref)/σ_ref,
so the first values already predict the normalised reward. `ppo-gt` has no reward model: its
critic is the SFT backbone with a zero head (predicting 0 = the reference's mean normalised
score), as is `ppo`'s with `critic_init: sft`. Every choice implementations disagree on is a param
below, so it lands in the results' params column: where the KL goes (`kl_placement`), its
estimator (`kl_estimator`), token- vs sequence-mean losses (`loss_aggregation`), whitening, γ/λ,
clip ranges, epochs and minibatches, the rollout temperature, reward normalisation (`reward_norm`)
and the critic's start (`critic_init`). Frontier knob: `kl_coef` (with `target_kl` set, the
adaptive controller moves kl_coef and a suite can name `knob: target_kl`).

Which KL each estimator regularises. With samples y ~ π (no gradient through the sampling) and
r = π_ref/π, the expected gradient E_π[∇ k] of an estimator used as a LOSS term
(`kl_placement: loss`) and the policy-gradient (score-function) gradient E_π[k ∇ log π] of one
used as a REWARD penalty (`per_token`, `sequence`) are:

    estimator                       as a reward penalty               as a loss term
    k1 = log π − log π_ref          ∇ KL(π‖π_ref)                     0: E_π[∇ log π] = 0 (rejected)
    k2 = ½ (log π − log π_ref)²     biased (neither KL)               ∇ KL(π‖π_ref)
    k3 = r − 1 − log r              ∇ KL(π‖π_ref) − ∇ KL(π_ref‖π)     ∇ KL(π_ref‖π)

so k1 belongs in the reward (InstructGPT, TRL), k2 or k3 in the loss (k3 is GRPO's: the reverse
KL's gradient, although its value is an unbiased estimate of KL(π‖π_ref)). As a reward, k3's
gradient is second order in π − π_ref (the two KLs' gradients agree to first order): it barely
regularises near the reference.
`objective/kl` is the sequence sum of the estimator in use (k1, k3: unbiased for KL(π‖π_ref); k2:
biased, equal to it only to second order near π_ref).

`train.steps` counts PPO iterations (rollout batches of `train.batch_size` prompts); each makes
`ppo_epochs × num_minibatches` optimizer steps.

On W data-parallel workers each rank rolls out its 1/W of the batch, but the algorithm is the
1-worker one: rollouts are seeded per chunk of prompts by global position (`rollout_chunk`),
advantages are whitened over the global batch, and token-mean losses divide by the global token
count, so W workers reproduce 1 worker's losses up to float noise (with num_minibatches = 1; with
more, each rank draws its minibatches from its own slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from algorithms import ALGORITHMS, online
from algorithms.interface import TrainContext, check, require_finite


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from log-probs of tokens sampled from π, (B, T) nats.

    k1 = log π − log π_ref (unbiased, can be negative); k2 = ½ (log π − log π_ref)² (≥ 0, biased);
    k3 = (r − 1) − log r, r = π_ref/π (≥ 0, unbiased). Which KL each one's gradient regularises
    depends on where it goes (the module docstring's table).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio  # k3


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over left-aligned completions; all (B, T), mask 1 on real tokens.

    δ_t = r_t + γ V_{t+1} − V_t (V past the last token is 0); A_t = δ_t + γλ A_{t+1}. Returns
    (advantages, returns = advantages + values), zero on padding.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean", tokens: float | None = None
) -> torch.Tensor:
    """Mean over real tokens of the whole batch ("token_mean") or of per-sequence means ("sequence_mean").

    `tokens` replaces this batch's token count as the token_mean divisor: with W data-parallel ranks,
    the global batch's tokens / W, so that the ranks' averaged gradients are those of the global
    token mean (each rank's own count would weight ranks equally instead of tokens).
    """
    if aggregation == "token_mean":
        return (x * mask).sum() / (tokens if tokens is not None else mask.sum().clamp(min=1))
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def whiten(
    x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, mean_over_ranks: Callable[[dict], dict] = lambda d: d
) -> torch.Tensor:
    """(x − mean) / std over the real tokens of the GLOBAL batch (all ranks, via `mean_over_ranks`)."""
    n = mean_over_ranks({"n": float(mask.sum())})["n"]
    mean = mean_over_ranks({"s": float((x * mask).sum())})["s"] / n
    var = mean_over_ranks({"s": float((((x - mean) * mask) ** 2).sum())})["s"] / n
    return (x - mean) * torch.rsqrt(torch.tensor(var + eps, dtype=x.dtype, device=x.device)) * mask


def ppo_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    aggregation: str = "token_mean",
    tokens: float | None = None,
) -> dict[str, torch.Tensor]:
    """Clipped policy and value losses; every input (B, T). Returns policy, value, clipfrac, approx_kl.
    `tokens`: the token_mean divisor (see `masked_mean`)."""
    pg = online.clipped_surrogate(logps, old_logps, advantages, cliprange)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps)
        clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
        approx_kl = masked_mean(0.5 * (logps - old_logps) ** 2, mask)
    return {
        "policy": masked_mean(pg, mask, aggregation, tokens),
        "value": masked_mean(vf, mask, aggregation, tokens),
        "clipfrac": clipfrac,
        "approx_kl": approx_kl,
    }


class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef ← kl_coef · (1 + clip(KL/target − 1, ±0.2) · n / horizon)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n / self.horizon


@dataclass
class PPOParams:
    kl_coef: float = 0.05  # β of the KL penalty (initial value when target_kl is set); the frontier knob
    target_kl: float | None = None  # nats per sequence; set → adaptive controller (Ziegler et al.)
    kl_horizon: int = 10_000  # adaptive controller horizon, in samples
    kl_estimator: str = "k1"  # "k1" (log π − log π_ref, InstructGPT/TRL), "k2" (½ log-ratio²), "k3" (GRPO): docstring
    kl_placement: str = "per_token"  # "per_token" reward penalty; "sequence": summed, at the last token; "loss": a term of L_π
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    whiten_advantages: bool = True  # normalise advantages over the batch's tokens
    cliprange: float = 0.2  # ε of the policy ratio
    cliprange_value: float = 0.2  # ε_V of the value clip
    vf_coef: float = 0.1  # weight of the value loss in the shared optimizer step
    ppo_epochs: int = 4  # passes over each rollout batch
    num_minibatches: int = 1  # optimizer steps per pass
    loss_aggregation: str = "token_mean"  # "token_mean" over the batch's tokens or "sequence_mean"
    rollout_temperature: float = 1.0  # sampling temperature of rollouts; π and π_ref are scored at it
    reward_norm: bool = True  # score → (score − μ_ref) / σ_ref, the reference samples' mean and std
    reward_norm_samples: int = 256  # train prompts (one reference sample each) that μ_ref and σ_ref are measured on
    critic_init: str = "reward_model"  # "reward_model": start the critic as the RM (ppo-gt: none, SFT); "sft": SFT, zero head
    # prompts per generation call, each call seeded by its position in the global batch: the same
    # rollouts on any number of workers (must divide train.batch_size / num_workers)
    rollout_chunk: int = 8

    def __post_init__(self) -> None:
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0 (or null for a fixed kl_coef)")
        check(self.kl_horizon >= 1, "kl_horizon", "must be >= 1")
        check(self.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", "must be 'k1', 'k2' or 'k3'")
        check(self.kl_placement in ("per_token", "sequence", "loss"), "kl_placement",
              "must be 'per_token', 'sequence' or 'loss'")
        check(not (self.kl_placement == "loss" and self.kl_estimator == "k1"), "kl_estimator",
              "'k1' as a loss term (kl_placement: loss) has zero expected gradient (E_π[∇ log π] = 0) and "
              "regularises nothing; use 'k2' (gradient of KL(π‖π_ref)) or 'k3' (gradient of KL(π_ref‖π))")
        check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        check(self.cliprange > 0, "cliprange", "must be > 0")
        check(self.cliprange_value > 0, "cliprange_value", "must be > 0")
        check(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        check(isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1, "ppo_epochs", "must be an integer >= 1")
        check(isinstance(self.num_minibatches, int) and self.num_minibatches >= 1, "num_minibatches",
              "must be an integer >= 1")
        check(self.loss_aggregation in ("token_mean", "sequence_mean"), "loss_aggregation",
              "must be 'token_mean' or 'sequence_mean'")
        online.check_rollout_params(self)
        check(self.critic_init in ("reward_model", "sft"), "critic_init", "must be 'reward_model' or 'sft'")


class PPO:
    """One implementation, two registered algorithms: `ppo` (learned RM) and `ppo-gt` (gold reward)."""

    params_cls = PPOParams
    knob = "kl_coef"
    trains_policy = True

    def __init__(self, name: str, reward: str):
        self.name = name
        self.reward = reward  # "reward_model" or "gold"
        self.needs = frozenset({"prompts", "critic", reward})

    def train(self, ctx: TrainContext) -> dict:
        p: PPOParams = ctx.params
        policy, reference, critic = ctx.policy, ctx.reference, ctx.critic
        online.train_prompts(ctx, self.name)
        kl_coef = ctx.state.get("kl_coef", p.kl_coef)  # a resumed trial carries on with its adapted value
        kl_ctl = AdaptiveKLController(kl_coef, p.target_kl, p.kl_horizon) if p.target_kl else None
        T = p.rollout_temperature
        shift, scale = online.normaliser(ctx, self.reward, enabled=p.reward_norm, samples=p.reward_norm_samples,
                                         temperature=T, name=self.name)  # every rank: ctx.cache synchronises the ranks
        # a critic started from the reward model predicts raw scores: normalise it like the score
        from_rm = self.reward == "reward_model" and p.critic_init == "reward_model"
        critic_shift, critic_scale = (shift, scale) if from_rm else (0.0, 1.0)

        def values_of(p_ids: list, c_ids: list) -> torch.Tensor:
            values, _ = critic.token_values(p_ids, c_ids)  # (B, T), the critic's own units
            return (values - critic_shift) / critic_scale

        def logps_of(model) -> Callable[[list, list], tuple[torch.Tensor, torch.Tensor]]:
            return lambda pi, ci: model.token_logps(pi, ci, temperature=T)

        for it in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(it):
                ctx.evaluate(policy, it)
            # ---- rollout: one completion per prompt of this rank's slice, in chunks seeded by their
            # position in the global batch (so W workers sample exactly what 1 worker samples)
            roll, score = online.scored_rollout(ctx, it, k=1, temperature=T, chunk=p.rollout_chunk,
                                                reward=self.reward, name=self.name)  # score: (B,) raw
            p_ids, c_ids = roll.prompt_ids, roll.completion_ids
            score_n = (score - shift) / scale  # (B,) ŝ, what the policy is rewarded with
            with torch.no_grad():  # in micro-batches of train.micro_batch_size prompts
                old_logps, mask = online.no_grad_passes(ctx, logps_of(policy), p_ids, c_ids, k=1)  # (B, T)
                ref_logps, _ = online.no_grad_passes(ctx, logps_of(reference), p_ids, c_ids, k=1)
                ref_logps = ref_logps.to(old_logps.device)
                old_values, _ = online.no_grad_passes(ctx, lambda pi, ci: (values_of(pi, ci),) * 2, p_ids, c_ids, k=1)
                old_values = old_values.to(old_logps.device)
                kl_tokens = kl_penalty(old_logps, ref_logps, p.kl_estimator) * mask  # (B, T)
                seq_kl = kl_tokens.sum(-1)  # (B,) nats per sequence
                require_finite(f"{self.name}: the KL of iteration {it + 1}'s rollouts", seq_kl)
                last = mask.sum(-1).long() - 1  # index of each completion's last token
                rows = torch.arange(len(last), device=mask.device)
                rewards = torch.zeros_like(old_logps)
                rewards[rows, last] += score_n.to(rewards.device)
                if p.kl_placement == "per_token":
                    rewards -= kl_coef * kl_tokens
                elif p.kl_placement == "sequence":
                    rewards[rows, last] -= kl_coef * seq_kl
                advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
                if p.whiten_advantages:
                    advantages = whiten(advantages, mask, mean_over_ranks=ctx.mean_over_ranks)

            # ---- PPO epochs over the batch
            stats: dict[str, list[float]] = {}
            n = len(p_ids)
            for epoch in range(p.ppo_epochs):
                order = np.random.default_rng([ctx.seed, it, epoch, ctx.rank]).permutation(n)
                for mb in np.array_split(order, p.num_minibatches):
                    if len(mb) == 0:
                        continue
                    # the minibatch's real tokens (global / W): the token-mean divisor of every micro-batch
                    tokens = ctx.mean_over_ranks({"n": float(sum(len(c_ids[i]) for i in mb))})["n"]

                    def loss_of(pos: np.ndarray, mb: np.ndarray = mb, tokens: float = tokens,
                                kl_coef: float = kl_coef) -> tuple[torch.Tensor, dict]:
                        rows = mb[pos]  # this micro-batch of the minibatch
                        mb_p, mb_c = [p_ids[i] for i in rows], [c_ids[i] for i in rows]
                        logps, mb_mask = policy.token_logps(mb_p, mb_c, temperature=T)
                        values = values_of(mb_p, mb_c)
                        sel = torch.as_tensor(rows, device=logps.device)
                        width = logps.shape[1]
                        # a sequence mean is over the minibatch's sequences: this micro-batch's share
                        share = len(rows) / len(mb) if p.loss_aggregation == "sequence_mean" else 1.0
                        losses = ppo_losses(
                            logps, old_logps[sel, :width], advantages[sel, :width], values.to(logps.device),
                            old_values[sel, :width], returns[sel, :width], mb_mask,
                            cliprange=p.cliprange, cliprange_value=p.cliprange_value, aggregation=p.loss_aggregation,
                            tokens=tokens,
                        )
                        part = (losses["policy"] + p.vf_coef * losses["value"]) * share
                        if p.kl_placement == "loss":
                            kl_now = kl_penalty(logps, ref_logps[sel, :width], p.kl_estimator)
                            part = part + kl_coef * masked_mean(kl_now, mb_mask, p.loss_aggregation, tokens) * share
                        n_tok = mb_mask.sum().view(1)  # clipfrac and approx_kl: token means over the minibatch
                        return part, {"policy": (losses["policy"] * share).view(1),
                                      "value": (losses["value"] * share).view(1),
                                      "clipfrac": losses["clipfrac"] * n_tok, "approx_kl": losses["approx_kl"] * n_tok,
                                      "tokens": n_tok}

                    _, v, opt = ctx.optimize_batch(len(mb), loss_of)
                    stats.setdefault("policy", []).append(float(v["policy"].sum()))
                    stats.setdefault("value", []).append(float(v["value"].sum()))
                    for key in ("clipfrac", "approx_kl"):
                        stats.setdefault(key, []).append(float(v[key].sum() / v["tokens"].sum().clamp(min=1)))
                    stats.setdefault("grad_norm", []).append(opt.get("grad_norm", float("nan")))
                    stats.setdefault("lr", []).append(opt.get("lr", float("nan")))

            mean_kl = float(seq_kl.mean())
            ctx.log(it + 1, {
                "objective/score": float(score.mean()),
                "objective/score_normalized": float(score_n.mean()),
                "objective/kl": mean_kl,
                "objective/kl_coef": kl_coef,
                "objective/reward": float(score_n.mean()) - kl_coef * mean_kl,  # what PPO maximises
                "objective/length": float(mask.sum(-1).mean()),
                "losses/policy": float(np.mean(stats["policy"])),
                "losses/value": float(np.mean(stats["value"])),
                "policy/clipfrac": float(np.mean(stats["clipfrac"])),
                "policy/approx_kl": float(np.mean(stats["approx_kl"])),
                "optim/lr": stats["lr"][-1],
                "optim/grad_norm": float(np.mean(stats["grad_norm"])),
            })
            if kl_ctl is not None:  # every rank moves kl_coef by the same, all-rank KL
                kl_ctl.update(ctx.mean_over_ranks({"kl": mean_kl})["kl"], n * ctx.world_size)
                kl_coef = ctx.state["kl_coef"] = kl_ctl.value
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {"final_kl_coef": kl_coef, "reward_norm_mean": shift, "reward_norm_std": scale}


ALGORITHMS.register(PPO("ppo", reward="reward_model"))
ALGORITHMS.register(PPO("ppo-gt", reward="gold"))
