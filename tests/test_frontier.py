"""Frontier statistics against hand-computed numbers: Pareto set, best within a budget, area under the
front, the Gao et al. (2022) fits, confidence intervals over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.frontier import area_under_front, best_within, diff_ci, fit_gao, gao_curve, mean_ci, pareto_front

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
