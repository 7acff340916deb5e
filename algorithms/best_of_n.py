"""Best-of-N: draw N completions per prompt from the reference, keep the one the learned reward
model scores highest. Nothing is trained; the frontier knob is n.

Every n ≤ N is evaluated from ONE set of N samples per prompt (the unbiased estimator), its KL
reported as the bound log n − (n−1)/n with a plug-in estimate beside it: algorithms/samplers.py
holds the estimators and their derivation; `BestOfNSampler` is a `RerankingSampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from algorithms import ALGORITHMS
from algorithms.interface import TrainContext, check
from algorithms.policy import Policy, Rollout
from algorithms.samplers import analytic_kl


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
        proxy = self.reward_model.score(roll.prompts, roll.completions, ended=roll.ended)
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
            ended=roll.ended[pick],
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
