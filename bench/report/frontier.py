"""Reward-vs-KL frontiers and their statistics: Pareto fronts, area under them, their cross-fitted
versions (select on one half of the eval prompts, score on the other), the Gao et al. (2022)
functional forms, and confidence intervals over seeds (unpaired, and paired by seed).

Pure functions over numpy arrays: no plotting, no files. KL is KL(π‖π_ref) in nats per sequence;
rewards are the env's gold reward per completion (mean over the evaluation, or over one half of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _finite(kl, gold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kl, gold = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    keep = np.flatnonzero(np.isfinite(kl) & np.isfinite(gold))
    return kl[keep], gold[keep], keep


def pareto_front(kl, gold) -> np.ndarray:
    """Indices of the upper-left Pareto set of the points (kl, gold), by increasing KL.

    A point is on the front when no other point has KL ≤ its KL and gold ≥ its gold with one of the
    two strict: the most reward any point reaches for that much (or less) divergence. Points with a
    non-finite coordinate are ignored; of exact duplicates the first is kept.
    """
    k, g, idx = _finite(kl, gold)
    order = np.lexsort((np.arange(len(k)), -g, k))  # KL ascending, then gold descending, then input order
    front, best = [], -math.inf
    for i in order:
        if g[i] > best:
            front.append(idx[i])
            best = g[i]
    return np.asarray(front, dtype=int)


def best_within(kl, gold, budget: float) -> tuple[float, int]:
    """(highest gold among points with KL ≤ budget nats, its index); (nan, -1) when none is within it.
    Of points with equal gold, the one with the least KL."""
    k, g, idx = _finite(kl, gold)
    inside = np.flatnonzero(k <= budget)
    if len(inside) == 0:
        return float("nan"), -1
    i = inside[np.lexsort((k[inside], -g[inside]))[0]]
    return float(g[i]), int(idx[i])


def area_under_front(kl, gold, budget: float, floor: float | None = None) -> float:
    """∫₀^budget f(k) dk in gold·nats, f(k) = the highest gold among points with KL ≤ k.

    The front is a staircase: between two of its points the reachable reward is that of the left one
    (no interpolation a sweep did not show). KL is clipped at 0: a k1 estimate below 0 is noise around
    0, not room on the axis. Below the front's first point f = `floor` (the SFT reward: every
    algorithm can stay at the reference); without a floor the area is nan unless the front starts at
    KL 0. The in-sample case of `crossfit_area` (both halves the same).
    """
    kl, gold = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    return crossfit_area((kl, kl), (gold, gold), budget, None if floor is None else (floor, floor))


# ---- cross-fitting: select on one half of the eval prompts, score on the other ------------------------
# Picking the best of many noisy points and reporting that same point's value is optimistic (the
# winner's curse), the more so the more candidates an algorithm has. With the evaluation split in two
# halves of prompts, a point chosen on half 0 and read on half 1 is unbiased for what was chosen; the
# two directions are averaged. A pair (h0, h1) of arrays, one value per point, is a `Halves`.

Halves = tuple  # (values on half 0, values on half 1): two arrays aligned by point, or two floats (a floor)


def selected(kl, gold, at) -> np.ndarray:
    """For each budget in `at` (nats): the index of the point with the highest gold among those with
    KL ≤ budget (ties: least KL, then the first), −1 when none is. KL is clipped at 0."""
    at = np.atleast_1d(np.asarray(at, dtype=float))
    k = np.maximum(np.asarray(kl, dtype=float), 0.0)  # nan stays nan and is ignored
    front = pareto_front(k, gold)  # the last front point with KL ≤ budget is the one selected
    if len(front) == 0:
        return np.full(len(at), -1)
    j = np.searchsorted(k[front], at, side="right") - 1
    return np.where(j >= 0, front[np.maximum(j, 0)], -1)


def _read(index: np.ndarray, values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return np.where(index >= 0, values[np.maximum(index, 0)] if len(values) else np.nan, np.nan)


def _with_floor(kl: Halves, gold: Halves, floor: Halves | None) -> tuple[Halves, Halves]:
    """The points with the reference added at KL 0 (its gold on each half): staying there is free."""
    kl = tuple(np.asarray(k, dtype=float) for k in kl)
    gold = tuple(np.asarray(g, dtype=float) for g in gold)
    if floor is None:
        return kl, gold
    return tuple(np.r_[0.0, k] for k in kl), tuple(np.r_[float(f), g] for f, g in zip(floor, gold))


def crossfit_curve(kl: Halves, gold: Halves, at, floor: Halves | None = None) -> np.ndarray:
    """The cross-fitted staircase f(k) at each budget k in `at` (nats):

        f(k) = ½ [ gold₁ at the point selected on half 0 within k + gold₀ at the point selected on half 1 within k ]

    selection as in `selected` (highest gold on that half with that half's KL ≤ k). With `floor` (the SFT
    reward on each half) the reference is a point at KL 0 every selection may pick. nan where a half
    selects nothing.
    """
    (k0, k1), (g0, g1) = _with_floor(kl, gold, floor)
    return (_read(selected(k0, g0, at), g1) + _read(selected(k1, g1, at), g0)) / 2


def crossfit_best_within(kl: Halves, gold: Halves, budget: float) -> tuple[float, tuple[int, int]]:
    """(f(budget) of `crossfit_curve` without a floor, (index selected on half 0, on half 1)); -1 for a
    half that has no point within the budget, and then the value is nan."""
    (k0, k1), (g0, g1) = _with_floor(kl, gold, None)
    i0, i1 = int(selected(k0, g0, budget)[0]), int(selected(k1, g1, budget)[0])
    return float((_read(np.array([i0]), g1)[0] + _read(np.array([i1]), g0)[0]) / 2), (i0, i1)


def crossfit_area(kl: Halves, gold: Halves, budget: float, floor: Halves | None = None) -> float:
    """∫₀^budget f(k) dk in gold·nats, f the cross-fitted staircase of `crossfit_curve` (KL clipped at
    0, the reference at KL 0 when `floor` is given). nan when f is undefined somewhere below the budget
    (no floor and a half with no point at KL 0)."""
    if budget <= 0:
        return 0.0
    (k0, k1), _ = _with_floor(kl, gold, floor)
    steps = np.maximum(np.r_[k0, k1], 0.0)
    edges = np.unique(np.r_[0.0, steps[np.isfinite(steps) & (steps < budget)], budget])  # f is constant between
    f = crossfit_curve(kl, gold, edges[:-1], floor)
    return float(np.sum(f * np.diff(edges)))


# ---- Gao, Schulman & Hilton (2022), "Scaling laws for reward model overoptimization" --------------
# d = sqrt(KL) (nats), R = gold reward relative to the SFT reference.
#   best-of-n:  R(d) = d (α − β d)
#   RL-like:    R(d) = d (α − β log d)
# Both are linear in (α, β), so the fit is ordinary least squares without intercept.

FORMS = {"bon": "R(d) = d(α − β·d)", "rl": "R(d) = d(α − β·log d)"}


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    if form == "bon":
        return d * (alpha - beta * d)
    if form == "rl":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)
    raise ValueError(f"unknown Gao form {form!r}; expected one of {sorted(FORMS)}")


@dataclass(frozen=True)
class GaoFit:
    form: str  # "bon" or "rl"
    alpha: float
    beta: float
    r2: float  # coefficient of determination of R (relative gold) on the points fitted
    n: int  # points fitted (KL > 0)


def fit_gao(kl, gain, form: str) -> GaoFit:
    """Least-squares fit of α, β in the Gao form `form` to points (KL nats, gold − gold_SFT).

    Points at KL 0 carry no information (R(0) = 0 in both forms) and are dropped; fewer than two
    distinct positive KLs give nan coefficients (two points fit any two-parameter form exactly).
    """
    k, r, _ = _finite(kl, gain)
    keep = k > 0
    d, r = np.sqrt(k[keep]), r[keep]
    if len(np.unique(d)) < 3:
        return GaoFit(form, float("nan"), float("nan"), float("nan"), int(len(d)))
    second = -d * d if form == "bon" else -d * np.log(d) if form == "rl" else None
    if second is None:
        raise ValueError(f"unknown Gao form {form!r}; expected one of {sorted(FORMS)}")
    design = np.stack([d, second], axis=1)  # (n, 2): R = α·d + β·second
    (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
    resid = r - design @ np.array([alpha, beta])
    total = np.sum((r - r.mean()) ** 2)
    r2 = 1.0 - float(np.sum(resid**2) / total) if total > 0 else float("nan")
    return GaoFit(form, float(alpha), float(beta), r2, int(len(d)))


# ---- confidence intervals over seeds ----------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean with the half-width of its confidence interval (nan when it has none)."""

    mean: float
    ci: float
    n: int  # independent values (seeds) behind it
    kind: str  # "t" (Student t over seeds), "se" (normal on one evaluation's standard error), "none"


def mean_ci(values, level: float = 0.95, se: float | None = None) -> Estimate:
    """Mean of per-seed `values` with a two-sided Student-t interval at `level`.

    With one value there is no spread over seeds to use: if that value's own standard error `se` is
    given (e.g. an evaluation's, clustered by prompt) the interval is the normal one on it, else none.
    Non-finite values are dropped.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0, "none")
    mean = float(v.mean())
    if n >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, df=n - 1) * v.std(ddof=1) / math.sqrt(n))
        return Estimate(mean, half, n, "t")
    if se is not None and math.isfinite(se):
        return Estimate(mean, float(stats.norm.ppf(0.5 + level / 2) * se), 1, "se")
    return Estimate(mean, float("nan"), 1, "none")


def diff_ci(a, b, level: float = 0.95) -> Estimate:
    """mean(b) − mean(a) over two independent sets of seeds, Welch's t interval (nan CI if either has < 2)."""
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return Estimate(float("nan"), float("nan"), 0, "none")
    diff = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return Estimate(diff, float("nan"), min(len(a), len(b)), "none")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Estimate(diff, 0.0, min(len(a), len(b)), "t")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df=df) * math.sqrt(va + vb))
    return Estimate(diff, half, min(len(a), len(b)), "t")


def paired_diff_ci(base, other, level: float = 0.95) -> Estimate:
    """mean(other − base) over paired values (the same seed: same env, pairs and reward model), with the
    Student-t interval over the per-seed differences (n − 1 df). Pairs with a non-finite side are dropped;
    one pair gives the difference with no CI. What a seed does to both (its env, pairs, reward model)
    cancels in the difference, so the interval is narrower than Welch's (`diff_ci`) when the two move
    together across seeds."""
    base, other = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    d = (other - base)[np.isfinite(base) & np.isfinite(other)]
    return mean_ci(d, level)  # one pair: its difference without a CI (no se is given); none: nan
