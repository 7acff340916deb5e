"""The one evaluator: every algorithm is measured here, the same way (docs/design.md "Evaluation").

For a sampler π, the env's fixed eval prompts X and k samples per prompt at temperature T:

- gold reward: mean of gold(x, y); standard error clustered by prompt (the k samples of a prompt
  are not independent): se = sd(per-prompt means) / sqrt(|X|).
- KL(π_T ‖ π_ref), sequence level, nats: π_T is the distribution actually sampled (logits / T),
  π_ref is scored at T = 1, y ~ π_T.
      k1 = Σ_t log π_T(y_t|x,y<t) − log π_ref(y_t|x,y<t)            (unbiased, can be < 0)
      k3 = Σ_t (r_t − 1) − log r_t,  r_t = π_ref(y_t|·) / π_T(y_t|·)  (unbiased per token, ≥ 0)
  Greedy decoding (T = 0) has no KL: NaN with kl_kind "none". A sampler that knows a bound on its KL
  (best-of-N: log n − (n−1)/n, an upper bound; Beirami et al. 2024) reports it with kl_kind "bound",
  and, where it can estimate the true KL, that estimate in `kl_est` (NaN elsewhere).
- win rate against the env's reference completion of the same prompt, judged by the gold reward
  (a tie counts ½); standard error clustered by prompt.
- gen_len: mean completion length in tokens (EOS included).
- best-of-N (a `RerankingSampler`): ONE set of N samples per prompt gives every n in
  `sampler.ns` through the unbiased estimator (algorithms.samplers); gold reward, win rate and
  length are estimated per prompt and their standard errors are over prompts. Its KL is the bound
  at T = 1 (not reported at other temperatures: it is relative to the sampled base), `kl_est` the
  plug-in estimate from the same samples and their reference log-probs (`bon_kl_estimate`), and
  `dup_rate` the share of the N samples of a prompt that repeat another.
- two halves: every metric is also reported on the even-indexed and on the odd-indexed eval
  prompts (`gold_reward_h0` / `_h1`, `kl_h0` / `_h1`, `win_rate_h0` / `_h1`), so that the report
  can select a point on one half and report it on the other (no winner's curse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from algorithms.policy import Policy, Rollout
from algorithms.samplers import RerankingSampler, Sampler, analytic_kl, bon_kl_estimate, duplicate_rate, unbiased_bon_per_prompt


@dataclass
class EvalSet:
    """The fixed evaluation prompts of an env and seed, with the reference completions' gold."""

    prompts: list[str]
    reference_gold: np.ndarray  # (P,) gold reward of the env's reference completion per prompt
    gold: Callable[[list[str], list[str]], np.ndarray]


def win_indicator(gold: np.ndarray, reference_gold: np.ndarray) -> np.ndarray:
    """1 where a completion beats the reference completion by gold reward, ½ on a tie, else 0."""
    return np.where(gold > reference_gold, 1.0, np.where(gold == reference_gold, 0.5, 0.0))


def exact_mean(values: np.ndarray) -> float:
    """The mean through `math.fsum` (the correctly rounded sum): the same bits whatever the memory
    alignment of the array. numpy's SIMD pairwise sum is not: the same values in another process can
    differ in the last bit, and a run would not reproduce itself exactly."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return math.fsum(values.tolist()) / values.size if values.size else float("nan")


def clustered_mean_se(values: np.ndarray, cluster: np.ndarray) -> tuple[float, float]:
    """Mean of `values` and its standard error with samples clustered (e.g. by prompt)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    _, inverse = np.unique(cluster, return_inverse=True)
    sums = np.bincount(inverse, weights=values)  # a sequential loop: deterministic
    counts = np.bincount(inverse)
    means = sums / counts
    mean = exact_mean(values)
    if len(means) < 2:
        return mean, float("nan")
    spread = exact_mean((means - exact_mean(means)) ** 2) * len(means) / (len(means) - 1)  # ddof = 1
    return mean, math.sqrt(spread) / math.sqrt(len(means))


@torch.no_grad()
def kl_per_sample(
    policy: Policy, reference: Policy, rollout: Rollout, *, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample sequence KL estimates (k1, k3) in nats for samples drawn from `policy` at rollout.temperature.

    log π_T of the sampled tokens is the sampling step's own (`rollout.token_logps`) where the rollout
    carries it, so only the reference is run; else the policy is scored by teacher forcing. The
    reference at T = 1 has KL 0 by definition (the `sft` trial and every trial's step 0).
    """
    temperature = rollout.temperature
    if policy is reference and temperature == 1.0:  # KL(π ‖ π) = 0: exactly, not up to float noise
        return np.zeros(len(rollout)), np.zeros(len(rollout))
    k1, k3 = [], []
    was_training = policy.model.training
    policy.model.eval()
    try:
        for i in range(0, len(rollout), batch_size):
            p_ids = rollout.prompt_ids[i : i + batch_size]
            c_ids = rollout.completion_ids[i : i + batch_size]
            ref, mask = reference.token_logps(p_ids, c_ids, temperature=1.0)  # (B, T)
            if rollout.token_logps is not None:
                pi = rollout.token_logps[i : i + batch_size, : mask.shape[1]].to(ref.device)
            else:
                pi, _ = policy.token_logps(p_ids, c_ids, temperature=temperature)
            pi, ref, mask = pi.double(), ref.double().to(pi.device), mask.to(pi.device)
            log_r = (ref - pi) * mask  # log π_ref/π_T per token, 0 on padding
            k1.append(((pi - ref) * mask).sum(-1).cpu())
            k3.append(((torch.exp(log_r) - 1 - log_r) * mask).sum(-1).cpu())
    finally:
        policy.model.train(was_training)
    return torch.cat(k1).numpy(), torch.cat(k3).numpy()


def sequence_kl(
    policy: Policy,
    reference: Policy,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
) -> dict:
    """KL(π_T ‖ π_ref) in nats per sequence from `num_samples` samples per prompt.

    Returns kl (k1 mean), kl_se (clustered by prompt), kl_k3, kl_k3_se, n_samples.
    """
    if temperature <= 0:
        raise ValueError("sequence KL needs temperature > 0 (greedy decoding has no sampling distribution)")
    roll = policy.generate(
        list(prompts), n=num_samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size,
    )
    k1, k3 = kl_per_sample(policy, reference, roll, batch_size=batch_size)
    kl, kl_se = clustered_mean_se(k1, roll.prompt_index)
    kl3, kl3_se = clustered_mean_se(k3, roll.prompt_index)
    return {"kl": kl, "kl_se": kl_se, "kl_k3": kl3, "kl_k3_se": kl3_se, "n_samples": len(roll)}


def sample_stats(
    sampler: Sampler,
    reference: Policy,
    evalset: EvalSet,
    *,
    temperature: float,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 512,
    score_batch_size: int = 128,
    prompt_subset: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample statistics on `prompt_subset` of the eval prompts (all by default).

    Ranks of a data-parallel trial each take a slice of prompts; `summarize` of the concatenated
    stats equals the single-process result. Keys: prompt (global prompt index), gold, win, length,
    k1, k3 (NaN where KL is not estimable), analytic_kl (NaN unless the sampler has one).
    """
    subset = np.arange(len(evalset.prompts)) if prompt_subset is None else np.asarray(prompt_subset)
    prompts = [evalset.prompts[i] for i in subset]
    kwargs = {"batch_size": batch_size} if isinstance(sampler, Policy) else {}
    k = samples_per_prompt if temperature > 0 else 1  # greedy decoding: the k samples would be identical
    roll = sampler.generate(prompts, n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, **kwargs)
    prompt = subset[roll.prompt_index]
    gold = np.asarray(evalset.gold(roll.prompts, roll.completions), dtype=np.float64)
    ref_gold = evalset.reference_gold[prompt]
    n = len(roll)
    stats = {
        "prompt": prompt,
        "gold": gold,
        "win": win_indicator(gold, ref_gold),
        "length": roll.lengths.astype(np.float64),
        "k1": np.full(n, np.nan),
        "k3": np.full(n, np.nan),
        "analytic_kl": np.full(n, np.nan),
        "kl_est": np.full(n, np.nan),
        "dup_rate": np.full(n, np.nan),
    }
    analytic = getattr(sampler, "analytic_kl", None)
    if callable(analytic):
        stats["analytic_kl"][:] = float(analytic())
    elif temperature > 0 and isinstance(sampler, Policy) and n:
        stats["k1"], stats["k3"] = kl_per_sample(sampler, reference, roll, batch_size=score_batch_size)
    return stats


def best_of_n_stats(
    sampler: RerankingSampler,
    evalset: EvalSet,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    prompt_subset: np.ndarray | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Per-prompt statistics of best-of-n for every n in `sampler.ns`, from one set of N samples.

    Returns n → stats with the keys of `sample_stats`, one entry per prompt (the estimate for that
    prompt), plus "n_drawn" (samples drawn for the prompt). Greedy decoding (T = 0) draws one sample:
    every n is that sample.
    """
    subset = np.arange(len(evalset.prompts)) if prompt_subset is None else np.asarray(prompt_subset)
    prompts = [evalset.prompts[i] for i in subset]
    if temperature > 0:
        roll, proxy = sampler.sample_groups(prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    else:
        roll = sampler.reference.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
        proxy = np.zeros((len(prompts), 1))
    P, N = proxy.shape
    gold = np.asarray(evalset.gold(roll.prompts, roll.completions), dtype=np.float64).reshape(P, N)
    ref_gold = evalset.reference_gold[subset][:, None]
    win = win_indicator(gold, ref_gold)
    length = roll.lengths.astype(np.float64).reshape(P, N)
    dups = duplicate_rate(roll.completion_ids, P, N)
    ref_logps = None
    if temperature == 1.0:  # the base the samples were drawn from: the reference at T = 1
        # the samples are the reference's own at T = 1: their log π_ref came with them from sampling
        # (a rollout without token log-probs is scored by teacher forcing)
        ref_logps = (roll.token_logps.double().sum(-1).numpy() if roll.token_logps is not None else
                     sampler.reference.sequence_logps_batched(roll.prompt_ids, roll.completion_ids).double().numpy())
        ref_logps = ref_logps.reshape(P, N)
    out = {}
    for n in sampler.ns:
        k = min(n, N)
        kl = analytic_kl(n) if temperature == 1.0 else float("nan")
        kl_est = bon_kl_estimate(proxy, ref_logps, k) if ref_logps is not None else np.full(P, np.nan)
        out[n] = {
            "prompt": subset,
            "gold": unbiased_bon_per_prompt(proxy, gold, k),
            "win": unbiased_bon_per_prompt(proxy, win, k),
            "length": unbiased_bon_per_prompt(proxy, length, k),
            "k1": np.full(P, np.nan),
            "k3": np.full(P, np.nan),
            "analytic_kl": np.full(P, kl),
            "kl_est": kl_est,
            "dup_rate": dups,
            "n_drawn": np.full(P, N),
        }
    return out


def summarize(stats: dict[str, np.ndarray], *, temperature: float) -> dict:
    """One evaluation row (the metric columns of evals.parquet) from per-sample stats."""
    prompt = stats["prompt"]
    gold, gold_se = clustered_mean_se(stats["gold"], prompt)
    win, win_se = clustered_mean_se(stats["win"], prompt)
    row = {
        "temperature": float(temperature),
        "gold_reward": gold,
        "gold_reward_se": gold_se,
        "kl": float("nan"),
        "kl_se": float("nan"),
        "kl_k3": float("nan"),
        "kl_k3_se": float("nan"),
        "kl_kind": "none",
        "win_rate": win,
        "win_rate_se": win_se,
        "gen_len": exact_mean(stats["length"]) if len(prompt) else float("nan"),
        "n_prompts": int(len(np.unique(prompt))),
        "n_samples": int(stats["n_drawn"].sum()) if "n_drawn" in stats else int(len(prompt)),
    }
    bound = len(prompt) and not np.isnan(stats["analytic_kl"]).all()
    if bound:
        kl = stats["analytic_kl"]
        row.update(kl=exact_mean(kl[~np.isnan(kl)]), kl_se=0.0, kl_kind="bound")
    elif len(prompt) and not np.isnan(stats["k1"]).any():
        row["kl"], row["kl_se"] = clustered_mean_se(stats["k1"], prompt)
        row["kl_k3"], row["kl_k3_se"] = clustered_mean_se(stats["k3"], prompt)
        row["kl_kind"] = "estimated"
    est, dup = stats.get("kl_est"), stats.get("dup_rate")
    row["kl_est"] = exact_mean(est) if est is not None and len(est) and np.isfinite(est).all() else float("nan")
    row["dup_rate"] = exact_mean(dup) if dup is not None and len(dup) and np.isfinite(dup).all() else float("nan")
    for h in (0, 1):  # the even- and odd-indexed eval prompts: select on one, report on the other
        half = prompt % 2 == h
        row[f"gold_reward_h{h}"] = exact_mean(stats["gold"][half])
        row[f"win_rate_h{h}"] = exact_mean(stats["win"][half])
        if row["kl_kind"] == "bound":
            row[f"kl_h{h}"] = row["kl"]
        elif row["kl_kind"] == "estimated":
            row[f"kl_h{h}"] = exact_mean(stats["k1"][half])
        else:
            row[f"kl_h{h}"] = float("nan")
    return row


def concat_stats(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(sampler: Sampler, reference: Policy, evalset: EvalSet, *, temperature: float, **kwargs) -> dict:
    """`summarize(sample_stats(...))` in one process: one evaluation row for `sampler` at `temperature`."""
    return summarize(sample_stats(sampler, reference, evalset, temperature=temperature, **kwargs), temperature=temperature)
