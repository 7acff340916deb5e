"""Best-of-n: the unbiased estimator against brute force over all subsets, and the sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from algorithms import ALGORITHMS
from algorithms.best_of_n import BestOfNParams, BestOfNSampler
from algorithms.samplers import RerankingSampler, analytic_kl, bon_kl_estimate, bon_weights, duplicate_rate, unbiased_bon
from algorithms.interface import ParamError
from bench.evaluate import EvalSet, best_of_n_stats, summarize


def brute_force_bon(proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Average over prompts and over every n-subset of the gold reward of the subset's proxy-best."""
    per_prompt = []
    for p in range(proxy.shape[0]):
        vals = [gold[p, max(s, key=lambda i: proxy[p, i])] for s in itertools.combinations(range(proxy.shape[1]), n)]
        per_prompt.append(np.mean(vals))
    return float(np.mean(per_prompt))


def test_unbiased_estimator_equals_brute_force_over_all_subsets():
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(5, 7))  # distinct values: no ties
    gold = rng.uniform(size=(5, 7))
    est = unbiased_bon(proxy, gold, [1, 2, 3, 5, 7])
    for n, value in est.items():
        assert value == pytest.approx(brute_force_bon(proxy, gold, n), abs=1e-12)
    assert est[1] == pytest.approx(gold.mean())  # best-of-1 is a plain sample
    assert est[7] == pytest.approx(np.mean(gold[np.arange(5), proxy.argmax(1)]))  # best-of-N is the argmax


def test_weights_are_a_distribution_and_hand_case():
    assert bon_weights(4, 2).tolist() == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])  # C(i-1,1)/C(4,2)
    for N, n in [(8, 1), (8, 3), (64, 16), (64, 64)]:
        assert bon_weights(N, n).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bon_weights(4, 5)


def test_analytic_kl():
    assert analytic_kl(1) == 0.0
    assert analytic_kl(4) == pytest.approx(math.log(4) - 0.75)


def exact_bon_kl(q: np.ndarray, n: int) -> float:
    """KL(best-of-n ‖ q) by enumeration for a categorical q whose outcomes are sorted by reward."""
    below = np.concatenate([[0.0], np.cumsum(q)[:-1]])
    bon = (below + q) ** n - below**n
    keep = bon > 0
    return float((bon[keep] * np.log(bon[keep] / q[keep])).sum())


@pytest.mark.parametrize("outcomes", [100_000, 200, 5])
def test_kl_estimate_against_exact_enumeration_and_the_bound(outcomes):
    """log n − (n−1)/n is an upper bound, tight without atoms; the plug-in estimate follows the exact KL."""
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.full(outcomes, 2.0))
    P, N = 2000, 16
    draws = rng.choice(outcomes, size=(P, N), p=q)
    proxy, ref_logps = draws.astype(float), np.log(q[draws])  # reward = outcome index: distinct per outcome
    for n in (2, 4):
        exact, bound = exact_bon_kl(q, n), analytic_kl(n)
        est = bon_kl_estimate(proxy, ref_logps, n)
        assert exact <= bound + 1e-12
        se = est.std() / math.sqrt(P)
        tol = 4 * se + (0.002 if outcomes > 1000 else 0.01 if outcomes > 100 else 0.06)
        assert abs(est.mean() - exact) < tol, (outcomes, n, est.mean(), exact)
    if outcomes == 5:  # atoms: the bound overstates the KL by a margin the estimate sees
        assert analytic_kl(4) - exact_bon_kl(q, 4) > 0.02
        assert bon_kl_estimate(proxy, ref_logps, 4).mean() < analytic_kl(4) - 0.02


def test_duplicate_rate_counts_repeated_samples_per_prompt():
    ids = [[1, 2], [1, 2], [3], [4]] + [[5], [6], [7], [8]]
    assert duplicate_rate(ids, 2, 4).tolist() == [0.5, 0.0]


def test_params_and_registration():
    assert BestOfNParams(n=64).points() == [1, 2, 4, 8, 16, 32, 64]
    assert BestOfNParams(n=12).points() == [1, 2, 4, 8, 12]
    assert BestOfNParams(n=8, ns=[4, 1, 4]).points() == [1, 4]
    with pytest.raises(ParamError, match="ns"):
        BestOfNParams(n=8, ns=[16])
    algo = ALGORITHMS.get("best-of-n")
    assert algo.knob == "n" and algo.needs == {"reward_model"} and not algo.trains_policy


class LengthRM:
    """A stand-in proxy reward: longer completions score higher."""

    def score(self, prompts, completions, ended=None, batch_size=512):
        return np.array([len(c.split()) for c in completions], dtype=float)


def test_sampler_and_evaluator_rerank_one_set_of_samples(policy, prompts):
    sampler = BestOfNSampler(policy, LengthRM(), n=8, ns=[1, 2, 8])
    roll = sampler.generate(prompts, n=2, temperature=1.0, max_new_tokens=12, seed=0)
    assert len(roll) == 2 * len(prompts) and roll.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # each returned completion is the proxy-best of its own group of 8
    groups, proxy = sampler.sample_groups([p for p in prompts for _ in range(2)], temperature=1.0,
                                          max_new_tokens=12, seed=0)
    assert roll.extras["proxy_reward"].tolist() == proxy.max(1).tolist()

    evalset = EvalSet(prompts=prompts, reference_gold=np.full(len(prompts), 0.5),
                      gold=lambda p, c: np.array([len(x.split()) / 12 for x in c]))
    per_n = best_of_n_stats(sampler, evalset, temperature=1.0, max_new_tokens=12, seed=3)
    rows = {n: summarize(s, temperature=1.0) for n, s in per_n.items()}
    # gold here is a function of the proxy: more n, more gold
    assert rows[1]["gold_reward"] <= rows[2]["gold_reward"] <= rows[8]["gold_reward"]
    assert rows[8]["kl_kind"] == "bound" and rows[8]["kl"] == pytest.approx(analytic_kl(8))
    # the plug-in estimate never exceeds the bound by more than noise; duplicates pull it below
    for n in (2, 8):
        assert np.isfinite(rows[n]["kl_est"]) and rows[n]["kl_est"] <= analytic_kl(n) + 0.05
        assert 0 <= rows[n]["dup_rate"] <= 1
    assert rows[8]["kl_h0"] == rows[8]["kl_h1"] == rows[8]["kl"]  # a bound is the same on both halves
    assert rows[8]["n_samples"] == 8 * len(prompts) and rows[8]["n_prompts"] == len(prompts)
    # the plug-in estimate's log π_ref come from sampling (no teacher-forced pass over the N samples)
    # and are the teacher-forced ones
    scored = []
    forced = policy.sequence_logps_batched
    policy.sequence_logps_batched = lambda *a, **k: scored.append(1) or forced(*a, **k)
    again = best_of_n_stats(sampler, evalset, temperature=1.0, max_new_tokens=12, seed=3)
    del policy.sequence_logps_batched
    assert not scored
    groups, proxy = sampler.sample_groups(prompts, temperature=1.0, max_new_tokens=12, seed=3)
    teacher = forced(groups.prompt_ids, groups.completion_ids).double().numpy().reshape(proxy.shape)
    np.testing.assert_allclose(again[8]["kl_est"], bon_kl_estimate(proxy, teacher, 8), atol=1e-4)
    greedy = best_of_n_stats(sampler, evalset, temperature=0.0, max_new_tokens=12, seed=3)
    g = {n: summarize(s, temperature=0.0) for n, s in greedy.items()}
    assert g[1]["gold_reward"] == g[8]["gold_reward"] and g[8]["kl_kind"] == "none"


def test_the_evaluator_tells_samplers_by_their_contract(policy):
    """bench.evaluate and the trial recognise best-of-n by the RerankingSampler Protocol, not by its
    module: best-of-n is one, a Policy is a plain Sampler."""
    from algorithms.samplers import Sampler

    bon = BestOfNSampler(policy, None, n=4, ns=[1, 4])
    assert isinstance(bon, RerankingSampler) and isinstance(bon, Sampler)
    assert isinstance(policy, Sampler) and not isinstance(policy, RerankingSampler)
