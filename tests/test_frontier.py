"""Frontier statistics against hand-computed numbers: Pareto set, best within a budget, area under the
front, cross-fitting on two halves of the eval prompts, the Gao et al. (2022) fits, confidence
intervals over seeds (unpaired and paired)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.report.frontier import area_under_front, best_within, crossfit_area, crossfit_best_within, crossfit_curve, diff_ci, fit_gao, gao_curve, mean_ci, paired_diff_ci, pareto_front

KL = [0.0, 1.0, 1.0, 2.0, 3.0, 0.5, math.nan]
GOLD = [0.5, 0.7, 0.6, 0.65, 0.9, 0.7, 1.0]


def test_pareto_front_is_the_upper_left_set_by_increasing_kl():
    # (1, 0.7) ties (0.5, 0.7) on gold with more KL: dominated; (1, 0.6) and (2, 0.65) dominated; NaN ignored
    assert pareto_front(KL, GOLD).tolist() == [0, 5, 4]
    assert pareto_front([2.0, 1.0], [0.5, 0.9]).tolist() == [1]  # less KL and more reward dominates
    assert pareto_front([], []).tolist() == []


def test_best_within_a_budget():
    assert best_within(KL, GOLD, 2.0) == (0.7, 5)  # the first of the two 0.7s within 2 nats
    assert best_within(KL, GOLD, 3.0) == (0.9, 4)
    gold, i = best_within([1.0, 2.0], [0.6, 0.8], 0.5)
    assert math.isnan(gold) and i == -1


def test_area_under_front_is_the_staircase_from_zero():
    assert area_under_front(KL, GOLD, 2.0, floor=0.5) == pytest.approx(0.5 * 0.5 + 0.7 * 1.5)
    assert area_under_front(KL, GOLD, 4.0, floor=0.5) == pytest.approx(0.5 * 0.5 + 0.7 * 2.5 + 0.9 * 1.0)
    # a front that starts after KL 0 stands on the floor (the SFT reward) until its first point
    assert area_under_front([1.0, 2.0], [0.6, 0.8], 3.0, floor=0.5) == pytest.approx(0.5 + 0.6 + 0.8)
    assert math.isnan(area_under_front([1.0, 2.0], [0.6, 0.8], 3.0))
    # a point below the floor counts as the floor: staying at the reference is always possible
    assert area_under_front([0.0, 1.0], [0.4, 0.6], 2.0, floor=0.5) == pytest.approx(0.5 + 0.6)
    assert area_under_front([2.0], [0.9], 1.0, floor=0.5) == pytest.approx(0.5)


def test_area_counts_a_negative_kl_as_zero():
    # a k1 estimate of -0.2 nats is noise around 0, not 0.2 nats of extra room: the staircase starts at KL 0
    # (unclipped it would be 0.6 * 1.2 + 0.8 * 1 = 1.52)
    assert area_under_front([-0.2, 1.0], [0.6, 0.8], 2.0, floor=0.5) == pytest.approx(0.6 * 1.0 + 0.8 * 1.0)
    assert area_under_front([-0.2, 1.0], [0.6, 0.8], 2.0) == pytest.approx(1.4)
    assert area_under_front([-0.5], [0.4], 1.0, floor=0.5) == pytest.approx(0.5)


def _in_sample_area(kl, gold, budget, floor):
    """The area as it was computed before cross-fitting (for KL ≥ 0, where it was right)."""
    kl, gold = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    front = pareto_front(kl, gold)
    fk, fg = kl[front], gold[front]
    fk, fg = fk[fk <= budget], fg[fk <= budget]
    start = budget if len(fk) == 0 else fk[0]
    area = floor * start if len(fk) == 0 or fk[0] > 0 else 0.0
    return float(area + np.sum(np.maximum(fg, floor) * np.diff(np.append(fk, budget))))


def test_crossfit_with_identical_halves_is_the_in_sample_result():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        kl = np.round(rng.uniform(0, 4, n), 1) * (rng.random(n) > 0.2)  # ties in KL and points at KL 0
        gold = np.round(rng.uniform(0.3, 0.9, n), 2)
        for budget in (0.5, 1.0, 3.0, 10.0):
            value, (i0, i1) = crossfit_best_within((kl, kl), (gold, gold), budget)
            old, j = best_within(kl, gold, budget)
            assert (value == old or math.isnan(value) and math.isnan(old)) and i0 == i1 == j
            assert crossfit_area((kl, kl), (gold, gold), budget, (0.5, 0.5)) == pytest.approx(
                _in_sample_area(kl, gold, budget, 0.5), abs=1e-12)


def test_crossfit_selects_on_one_half_and_reads_the_other():
    # points (KL, gold on half 0, gold on half 1): the full-sample gold is their mean, 0.5 / 0.7 / 0.8
    kl = ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    gold = ([0.55, 0.8, 0.7], [0.45, 0.6, 0.9])
    # within 3 nats: half 0 picks point 1 (0.8), read on half 1: 0.6; half 1 picks point 2 (0.9), read on half 0: 0.7
    assert crossfit_best_within(kl, gold, 3.0) == (pytest.approx(0.65), (1, 2))
    assert best_within([0.0, 1.0, 2.0], [0.5, 0.7, 0.8], 3.0)[0] == 0.8  # in-sample: the winner's own, noisier value
    assert crossfit_best_within(kl, gold, 0.5) == (pytest.approx(0.5), (0, 0))
    assert math.isnan(crossfit_best_within(([1.0], [0.5]), ([0.7], [0.7]), 0.7)[0])  # half 0 has nothing within 0.7
    # with the SFT reward 0.5 on both halves at KL 0: below 1 nat half 0 picks point 0 (0.55 > 0.5) -> 0.45, half 1
    # picks the reference (0.5 > 0.45) -> 0.5; f = 0.475 on [0, 1), (0.6 + 0.8) / 2 = 0.7 on [1, 2), (0.6 + 0.7) / 2 on [2, 3)
    assert crossfit_curve(kl, gold, [0.0, 0.5, 1.0, 2.5], (0.5, 0.5)) == pytest.approx([0.475, 0.475, 0.7, 0.65])
    assert crossfit_area(kl, gold, 3.0, (0.5, 0.5)) == pytest.approx(0.475 + 0.7 + 0.65)
    assert crossfit_area(kl, gold, 1.5, (0.5, 0.5)) == pytest.approx(0.475 + 0.7 * 0.5)
    # the halves' KLs differ: each half selects by its own
    assert crossfit_curve(([0.0, 1.0], [0.0, 2.0]), ([0.5, 0.9], [0.5, 0.7]), [1.5]) == pytest.approx([(0.7 + 0.5) / 2])


def test_crossfit_removes_the_winners_curse_of_many_candidates():
    # 40 points of the same true gold 0.6, each half's mean off by independent noise: the best of them on the full
    # sample is 0.6 + the largest noise; chosen on one half and read on the other it is 0.6 on average
    rng = np.random.default_rng(0)
    best_in, best_cf, area_in, area_cf = [], [], [], []
    for _ in range(400):
        kl = np.r_[0.0, rng.uniform(0.0, 1.0, 39)]
        h0, h1 = 0.6 + rng.normal(0, 0.05, 40), 0.6 + rng.normal(0, 0.05, 40)
        full = (h0 + h1) / 2
        best_in.append(best_within(kl, full, 1.0)[0])
        best_cf.append(crossfit_best_within((kl, kl), (h0, h1), 1.0)[0])
        area_in.append(area_under_front(kl, full, 1.0))
        area_cf.append(crossfit_area((kl, kl), (h0, h1), 1.0))
    assert np.mean(best_in) - 0.6 > 0.05 and np.mean(area_in) - 0.6 > 0.03  # E max of 40 N(0, 0.035²) ≈ 0.079
    assert np.mean(best_cf) == pytest.approx(0.6, abs=0.006) and np.mean(area_cf) == pytest.approx(0.6, abs=0.006)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.4, 0.05), ("rl", 0.3, 0.08)])
def test_gao_fit_recovers_known_coefficients(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 3.0, 30)
    gain = gao_curve(d, alpha, beta, form) + rng.normal(0, 0.002, size=d.shape)
    fit = fit_gao(np.r_[0.0, d**2], np.r_[0.0, gain], form)  # the KL-0 point carries nothing and is dropped
    assert fit.form == form and fit.n == 30
    assert fit.alpha == pytest.approx(alpha, abs=0.005)
    assert fit.beta == pytest.approx(beta, abs=0.005)
    assert fit.r2 > 0.99


def test_gao_fit_needs_three_distinct_kls():
    assert math.isnan(fit_gao([0.0, 1.0, 4.0], [0.0, 0.1, 0.2], "rl").alpha)
    assert not math.isnan(fit_gao([1.0, 4.0, 9.0], [0.1, 0.2, 0.25], "rl").alpha)
    with pytest.raises(ValueError):
        fit_gao([1.0, 4.0, 9.0], [0.1, 0.2, 0.25], "linear")


def test_mean_ci_is_student_t_over_seeds():
    e = mean_ci([1.0, 2.0, 3.0])
    assert (e.mean, e.n, e.kind) == (2.0, 3, "t")
    assert e.ci == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, df=2) * sd / sqrt(n)
    assert mean_ci([1.0, 2.0, 3.0], level=0.9).ci == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)
    one = mean_ci([0.7], se=0.01)
    assert (one.mean, one.kind) == (0.7, "se") and one.ci == pytest.approx(1.959964 * 0.01, rel=1e-6)
    assert math.isnan(mean_ci([0.7]).ci) and mean_ci([0.7]).kind == "none"
    assert mean_ci([math.nan, 1.0, 3.0]).n == 2
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)


def test_difference_of_two_runs_is_welch():
    d = diff_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert d.mean == pytest.approx(2.0)
    # Welch: se = sqrt(1/3 + 4/3), df = 2.941..., t(0.975, df) * se = 4.1554
    assert d.ci == pytest.approx(4.155400, rel=1e-5)
    assert math.isnan(diff_ci([1.0], [2.0, 3.0]).ci)


def test_paired_difference_over_shared_seeds():
    # the seeds move both algorithms together (0.5, 0.7, 0.9): the per-seed differences 0.02, 0.03, 0.02 vary little
    base, other = [0.5, 0.7, 0.9], [0.52, 0.73, 0.92]
    d = paired_diff_ci(base, other)
    assert d.mean == pytest.approx(0.07 / 3) and (d.n, d.kind) == (3, "t")
    assert d.ci == pytest.approx(4.302653 * 0.0057735027 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * sd / sqrt(3)
    welch = diff_ci(base, other)
    assert welch.mean == pytest.approx(d.mean) and welch.ci > 20 * d.ci  # Welch sees the seeds' spread of 0.2
    assert paired_diff_ci([0.5, math.nan], [0.6, 0.7]).n == 1 and math.isnan(paired_diff_ci([0.5], [0.6]).ci)
    assert paired_diff_ci([], []).n == 0
