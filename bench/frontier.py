"""Reward-vs-KL frontiers and their statistics: Pareto fronts, area under them, the Gao et al. (2022)
functional forms, and confidence intervals over seeds.

Pure functions over numpy arrays: no plotting, no files. KL is KL(π‖π_ref) in nats per sequence;
rewards are the env's gold reward per completion (mean over the evaluation).
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
    (no interpolation a sweep did not show). Below the front's first point f = `floor` (the SFT
    reward: every algorithm can stay at the reference); without a floor the area is nan unless the
    front starts at KL 0.
    """
    k, g, _ = _finite(kl, gold)
    if budget <= 0:
        return 0.0
    front = pareto_front(k, g)
    fk, fg = k[front], g[front]
    fk, fg = fk[fk <= budget], fg[fk <= budget]
    if len(fk) == 0 or fk[0] > 0:
        if floor is None:
            return float("nan")
        start = budget if len(fk) == 0 else fk[0]
        area = floor * start
    else:
        area = 0.0
    if floor is not None:  # a front below the floor is lifted to it: staying at the reference is free
        fg = np.maximum(fg, floor)
    edges = np.append(fk, budget)
    return float(area + np.sum(fg * np.diff(edges)))


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
