"""The sampler contracts the evaluator measures, and the estimators of reranking samplers.

- `Sampler`: anything that produces completions for prompts at a temperature (a `Policy`,
  best-of-N, a plugin's own sampler). bench.evaluate measures any Sampler the same way.
- `RerankingSampler`: a Sampler that draws N samples per prompt from a base policy and keeps the
  one a proxy reward scores highest (best-of-N and its plugins). It exposes all N samples with
  their proxy rewards (`sample_groups`), so that the evaluator reports every n in `ns` from ONE set
  of samples, and its KL bound (`analytic_kl`). The evaluator depends on these contracts, never on
  a plugin module.

Every n ≤ N is evaluated from ONE set of N samples per prompt with the unbiased estimator of the
expected value of best-of-n (docs/design.md "Evaluation"): with the samples sorted by proxy reward
ascending, y_(1) ≤ … ≤ y_(N),

    R̂_n = Σ_{i=n}^{N} C(i−1, n−1) / C(N, n) · v(y_(i))

— the average of v over the best element of every n-subset of the N samples (the best of a subset
is y_(i) for exactly C(i−1, n−1) of the C(N, n) subsets). v is the gold reward, the win indicator
against the reference completion, or the length.

Its KL to the reference is NOT known in closed form: log n − (n − 1)/n nats (Stiennon et al.
2020) is an upper bound, reached only when no outcome has noticeable probability (Beirami et al.
2024, "Theoretical guarantees on the best-of-n alignment policy"); bench reports it as the KL with
kl_kind "bound". Beside it, `bon_kl_estimate` gives a plug-in estimate of the true KL from the same
N samples and their reference log-probs: for an outcome y with reference probability p(y) and
F⁻(y) = P(r(Y) < r(y)), best-of-n draws y with probability (F⁻ + p)^n − F⁻^n, so

    KL_n = E_{y ~ bon_n} [ log g_n(y) ],   g_n(y) = ((F⁻(y) + p(y))^n − F⁻(y)^n) / p(y),

estimated with F⁻ from the proxy ranks of the N samples and the expectation by R̂_n's weights.
When every p(y) is tiny, g_n ≈ n F^(n−1) and the estimate returns to the bound; duplicates among
the N samples (outcomes with real mass) pull it below. Checked against exact enumeration on
categorical bases (tests/test_best_of_n.py): unbiased without atoms (100,000 outcomes: 1.8352 vs
1.8351 at n = N = 16), within 0.01 nats with 200 outcomes; with a few heavy atoms it is biased low
at large n (3 outcomes, n = 4 of N = 64: 0.511 vs 0.530; n = N = 64: 0.65 vs 1.65), so it is
reported beside the bound, not instead of it.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from scipy.special import digamma

from algorithms.policy import Rollout


@runtime_checkable
class Sampler(Protocol):
    """Anything that produces completions for prompts at a temperature (a Policy, best-of-N, ...)."""

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        seed: int = 0,
    ) -> Rollout: ...


@runtime_checkable
class RerankingSampler(Sampler, Protocol):
    """A Sampler whose completions are each the proxy-best of `n` samples of a base policy."""

    reference: Any  # the base policy (a Policy) the N samples are drawn from; greedy decoding uses it alone
    n: int  # N: samples drawn per prompt
    ns: list[int]  # the n <= N the evaluator reports from those N samples

    def sample_groups(
        self, prompts: Sequence[str], *, temperature: float, max_new_tokens: int, seed: int
    ) -> tuple[Rollout, np.ndarray]:
        """N samples per prompt (prompt-major), with `ended`, and their proxy rewards, shape (P, N)."""
        ...

    def analytic_kl(self) -> float:
        """The bound log N − (N − 1)/N on its KL to the base, in nats per sequence."""
        ...


def bon_weights(N: int, n: int) -> np.ndarray:
    """(N,) weights of the sorted samples y_(1..N) in R̂_n: C(i−1, n−1) / C(N, n), zero for i < n."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={N}")
    total = math.comb(N, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)])

def unbiased_bon_per_prompt(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt unbiased best-of-n estimate of `values`; proxy and values (P, N) → (P,)."""
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(proxy, axis=1, kind="stable")  # ascending proxy reward
    sorted_values = np.take_along_axis(values, order, axis=1)  # (P, N)
    return sorted_values @ bon_weights(proxy.shape[1], n)

def unbiased_bon(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> dict[int, float]:
    """Mean gold reward of best-of-n for every n in `ns`, from one set of N samples per prompt.

    proxy, gold: arrays [prompts, N] (the reward model's and the gold reward of each sample).
    """
    return {int(n): float(unbiased_bon_per_prompt(proxy, gold, n).mean()) for n in ns}

def analytic_kl(n: int) -> float:
    """The upper bound on KL(best-of-n ‖ base) in nats: log n − (n − 1)/n (exact only for a base with
    no atoms; Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n

def bon_kl_estimate(proxy: np.ndarray, ref_logps: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt plug-in estimate of KL(best-of-n ‖ base) in nats (see the module doc); (P, N) → (P,).

    proxy: the proxy reward of each of the N base samples of a prompt; ref_logps: their sequence
    log-probs under the base (the distribution they were drawn from). F⁻(y) is the share of the N
    samples with a strictly lower proxy reward (as exp E log of that order statistic); p(y) =
    exp(ref_logps), capped so that F⁻ + p ≤ 1.
    """
    proxy, ref_logps = np.asarray(proxy, dtype=np.float64), np.asarray(ref_logps, dtype=np.float64)
    P, N = proxy.shape
    order = np.argsort(proxy, axis=1, kind="stable")
    r = np.take_along_axis(proxy, order, axis=1)  # (P, N) ascending
    logp = np.take_along_axis(ref_logps, order, axis=1)
    lower = np.stack([np.searchsorted(row, row, side="left") for row in r])  # samples strictly below each
    # F⁻ of a sample with c samples below it: exp E[log U_(c+1)] = exp(ψ(c + 1) − ψ(N + 1)) for the
    # (c+1)-th of N uniforms, which makes the estimate unbiased for a base without atoms; 0 when c = 0
    below = np.where(lower > 0, np.exp(digamma(np.maximum(lower, 1) + 1.0) - digamma(N + 1.0)), 0.0)
    w = bon_weights(N, n)
    used = w > 0
    f_lo, lp = below[:, used], logp[:, used]
    p = np.minimum(np.exp(lp), 1.0 - f_lo)
    lp = np.log(np.maximum(p, np.finfo(float).tiny))
    # log((F⁻ + p)^n − F⁻^n) − log p, stably: F⁻^n · expm1(n · log1p(p / F⁻)) where F⁻ > 0, p^n where F⁻ = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = f_lo > 0
        inner = np.where(pos, n * np.log1p(p / np.where(pos, f_lo, 1.0)), 0.0)
        log_top = np.where(pos, n * np.log(np.where(pos, f_lo, 1.0)) + np.log(np.expm1(inner)), n * lp)
    log_g = log_top - lp  # (P, used)
    return log_g @ w[used]

def duplicate_rate(completion_ids: list[list[int]], P: int, N: int) -> np.ndarray:
    """Per prompt, the share of its N samples (prompt-major) that equal another of its samples, (P,)."""
    out = np.empty(P)
    for i in range(P):
        group = [tuple(c) for c in completion_ids[i * N : (i + 1) * N]]
        counts: dict[tuple, int] = {}
        for c in group:
            counts[c] = counts.get(c, 0) + 1
        out[i] = sum(k for k in counts.values() if k > 1) / N
    return out
