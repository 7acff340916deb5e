"""Best-of-N: draw N completions per prompt from the reference, keep the one the learned reward
model scores highest. Nothing is trained; the frontier knob is n.

Every n ≤ N is evaluated from ONE set of N samples per prompt with the unbiased estimator of the
expected value of best-of-n (DESIGN.md "Evaluation"): with the samples sorted by proxy reward
ascending, y_(1) ≤ … ≤ y_(N),

    R̂_n = Σ_{i=n}^{N} C(i−1, n−1) / C(N, n) · v(y_(i))

— the average of v over the best element of every n-subset of the N samples (the best of a subset
is y_(i) for exactly C(i−1, n−1) of the C(N, n) subsets). v is the gold reward, the win indicator
against the reference completion, or the length. Its KL to the reference is known in closed
form, KL(π_bon ‖ π_ref) = log n − (n − 1)/n nats (Stiennon et al. 2020; kl_kind "analytic").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.policy import Policy, Rollout


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
    """KL(best-of-n ‖ base) in nats: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfNParams:
    n: int = 64  # N: samples drawn per prompt; the frontier knob (its largest value)
    ns: list[int] = field(default_factory=list)  # the n ≤ N reported from those samples; empty → 1, 2, 4, …, N

    def __post_init__(self) -> None:
        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(all(isinstance(k, int) and 1 <= k <= self.n for k in self.ns), "ns", f"must be integers in 1..n ({self.n})")

    def points(self) -> list[int]:
        if self.ns:
            return sorted(set(self.ns))
        out = [1 << k for k in range(self.n.bit_length()) if 1 << k <= self.n]
        return out if out[-1] == self.n else out + [self.n]


class BestOfNSampler:
    """A `Sampler`: each completion it returns is the proxy-best of `n` reference samples.

    `sample_groups` exposes all N samples with their proxy rewards, which the evaluator uses to
    report every n in `ns` at once with the unbiased estimator.
    """

    def __init__(self, reference: Policy, reward_model, n: int, ns: Sequence[int], *, batch_size: int = 512):
        self.reference = reference
        self.reward_model = reward_model
        self.n = n
        self.ns = list(ns)
        self.batch_size = batch_size

    def analytic_kl(self) -> float:
        return analytic_kl(self.n)

    def sample_groups(
        self, prompts: Sequence[str], *, temperature: float, max_new_tokens: int, seed: int
    ) -> tuple[Rollout, np.ndarray]:
        """N = self.n samples per prompt (prompt-major) and their proxy rewards, shape (P, N)."""
        roll = self.reference.generate(
            list(prompts), n=self.n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
            batch_size=self.batch_size,
        )
        proxy = self.reward_model.score(roll.prompts, roll.completions)
        return roll, proxy.reshape(len(prompts), self.n)

    def generate(
        self, prompts: Sequence[str], *, n: int = 1, temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
        batch_size: int | None = None,
    ) -> Rollout:
        """`n` best-of-self.n completions per prompt (each the best of its own group of self.n)."""
        groups = [p for p in prompts for _ in range(n)]
        roll, proxy = self.sample_groups(groups, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        pick = np.arange(len(groups)) * self.n + proxy.argmax(axis=1)  # flat index of each group's best
        return Rollout(
            prompts=[roll.prompts[i] for i in pick],
            prompt_index=np.repeat(np.arange(len(prompts)), n),
            completions=[roll.completions[i] for i in pick],
            prompt_ids=[roll.prompt_ids[i] for i in pick],
            completion_ids=[roll.completion_ids[i] for i in pick],
            temperature=roll.temperature,
            extras={"proxy_reward": proxy.max(axis=1)},
        )


class BestOfN:
    name = "best-of-n"
    params_cls = BestOfNParams
    knob = "n"
    needs = frozenset({"reward_model"})
    trains_policy = False

    def train(self, ctx: TrainContext) -> dict:
        sampler = BestOfNSampler(ctx.reference, ctx.reward_model, ctx.params.n, ctx.params.points())
        ctx.evaluate(sampler, 0, final=True)
        return {}


ALGORITHMS.register(BestOfN())
