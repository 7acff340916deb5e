"""The one evaluator: KL estimates, clustered standard errors, win rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.evaluate import EvalSet, clustered_mean_se, evaluate, sequence_kl


def _perturbed(policy, scale: float, seed: int = 0):
    p = policy.frozen_copy()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = p.model.lm_head.weight
        w.add_(scale * torch.randn(w.shape, generator=g))
    return p


def test_kl_of_reference_with_itself_is_zero(policy, prompts):
    ref = policy.frozen_copy()
    out = sequence_kl(ref, ref, prompts, num_samples=16, max_new_tokens=10, temperature=1.0, seed=0)
    assert out["kl"] == 0.0 and out["kl_k3"] == 0.0
    assert out["n_samples"] == 64


def test_kl_grows_with_perturbation_and_k1_agrees_with_k3(policy, prompts):
    ref = policy.frozen_copy()
    small = sequence_kl(_perturbed(policy, 0.05), ref, prompts * 8, num_samples=16, max_new_tokens=10)
    large = sequence_kl(_perturbed(policy, 0.3), ref, prompts * 8, num_samples=16, max_new_tokens=10)
    assert 0 < small["kl"] < large["kl"]
    assert 0 < small["kl_k3"] < large["kl_k3"]
    # two unbiased estimators of the same quantity
    assert abs(large["kl"] - large["kl_k3"]) < 4 * math.hypot(large["kl_se"], large["kl_k3_se"])


def test_sampling_at_a_lower_temperature_moves_away_from_the_reference(policy, prompts):
    ref = _perturbed(policy, 0.2)  # a peaked distribution, so temperature matters
    cold = sequence_kl(ref, ref, prompts * 4, num_samples=32, max_new_tokens=10, temperature=0.5)
    assert cold["kl"] > 3 * cold["kl_se"] > 0  # π_0.5 is not π_ref, even with the same weights
    with pytest.raises(ValueError):
        sequence_kl(ref, ref, prompts, num_samples=2, max_new_tokens=4, temperature=0.0)


def test_clustered_standard_error_by_hand():
    values = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 7.0])
    cluster = np.array([0, 0, 1, 1, 2, 2])  # cluster means 2, 2, 6
    mean, se = clustered_mean_se(values, cluster)
    assert mean == pytest.approx(20 / 6)
    assert se == pytest.approx(np.std([2.0, 2.0, 6.0], ddof=1) / math.sqrt(3))


def test_evaluate_row_win_rate_ties_and_greedy_has_no_kl(policy, prompts):
    ref = policy.frozen_copy()
    # gold = 1 for every completion; references with gold 1 (tie), 0 (loss for them), 2 (win for them)
    evalset = EvalSet(prompts=prompts[:3], reference_gold=np.array([1.0, 0.0, 2.0]),
                      gold=lambda p, c: np.ones(len(c)))
    row = evaluate(ref, ref, evalset, temperature=1.0, samples_per_prompt=4, max_new_tokens=6, seed=0)
    assert row["win_rate"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert row["gold_reward"] == 1.0 and row["kl"] == 0.0 and row["kl_kind"] == "estimated"
    assert row["n_samples"] == 12 and row["n_prompts"] == 3
    greedy = evaluate(ref, ref, evalset, temperature=0.0, samples_per_prompt=2, max_new_tokens=6)
    assert math.isnan(greedy["kl"]) and greedy["kl_kind"] == "none"
    assert 1 <= greedy["gen_len"] <= 6
