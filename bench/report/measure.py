"""The report of a run, rebuilt from OUT/evals.parquet and OUT/trials.parquet alone (plus the `report:`
settings of OUT/config.yaml when it is there): frontier and temperature plots, and the comparison
tables as report.md, report.csv, configs.csv, report.tex and report.html.

What is measured (docs/design.md "Evaluation"; every number per seed first, then mean ± CI over seeds):
- the frontier: every evaluation at T = 1 of every trial is a point (KL(π‖π_ref) nats, gold reward);
  per KL budget B, the best gold reward with KL ≤ B over all knob values and steps, and the area from
  0 to B under the staircase f(k) = best gold with KL ≤ k (KL clipped at 0, floored at the SFT reward);
- cross-fitted, against the winner's curse: evals.parquet has every metric on two halves of the eval
  prompts (`gold_reward_h0`/`_h1`, `kl_h0`/`_h1`, `win_rate_h0`/`_h1`); a point is selected on one
  half and its gold read on the other, both directions averaged (`bench.report.frontier.crossfit_curve`).
  Runs written before the halves existed fall back to in-sample selection on the full sample (the
  report says so);
- best-of-n's KL (kl_kind "bound", "analytic" in older runs) is the upper bound log n − (n−1)/n
  (Beirami et al. 2024), used as its KL throughout; `kl_est`, a plug-in estimate of the true KL, and
  `dup_rate` are shown beside it in the configuration table;
- the Gao et al. (2022) forms fitted to each algorithm's points (best-of-n's form where its KL is
  that bound, the RL form otherwise);
- temperature robustness at each algorithm's chosen point: its knob value whose final evaluation
  (mean over seeds) has the highest gold reward with KL ≤ `report.temperature_kl_budget`, selected on
  one half and reported on the other (both directions averaged); win rate and gold reward at every
  evaluated temperature, and the spread max − min of the win rate;
- paired differences against `report.baseline` (seeds share env, pairs and reward model): per seed
  algorithm − baseline of the best gold and the area per budget, Student t over the differences.
Only trials with status ok are used; failed ones are listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

from bench.config import ConfigError, ReportSettings, build_dataclass
from bench.report.frontier import Estimate, GaoFit, crossfit_area, crossfit_best_within, crossfit_curve, fit_gao, mean_ci, paired_diff_ci


class ReportError(Exception):
    """A directory that is not a readable prefbench run; str() is the one line to print."""


@dataclass
class Run:
    """What a report is made of: the two parquet files and the report settings."""

    out: Path
    evals: pd.DataFrame
    trials: pd.DataFrame
    settings: ReportSettings
    config_text: str = ""  # OUT/config.yaml as written by the run ("" when absent)

    @property
    def suite(self) -> str:
        frame = self.trials if len(self.trials) else self.evals
        return str(frame["suite"].iloc[0]) if len(frame) else "?"

    @property
    def env(self) -> str:
        frame = self.trials if len(self.trials) else self.evals
        return str(frame["env"].iloc[0]) if len(frame) else "?"

    @cached_property
    def crossfit(self) -> bool:
        """Whether every ok evaluation has its metrics on both halves of the eval prompts (runs from before
        cross-fitting do not: their report selects in-sample on the full sample)."""
        ev = ok_evals(self)
        for metric in HALF_METRICS:
            for col in (f"{metric}_h0", f"{metric}_h1"):
                if col not in ev or (np.isfinite(ev[metric]) & ~np.isfinite(ev[col])).any():
                    return False
        return True

HALF_METRICS = ("gold_reward", "kl", "win_rate")  # each also as METRIC_h0 / METRIC_h1: even / odd eval prompts

BOUND_KINDS = ("bound", "analytic")  # best-of-n's KL: the upper bound log n − (n−1)/n ("analytic" in older runs)

_EVAL_NUMBERS = ("seed", "knob_value", "step", "temperature", "gold_reward", "gold_reward_se", "kl", "kl_se", "kl_k3",
                 "kl_k3_se", "win_rate", "win_rate_se", "gen_len", "train_time_s", "wall_time_s", "kl_est", "dup_rate",
                 *(f"{m}_h{h}" for m in HALF_METRICS for h in (0, 1)))

_TRIAL_NUMBERS = ("seed", "knob_value", "train_time_s", "eval_time_s", "wall_time_s", "rm_accuracy")


def load_run(out: Path, settings: ReportSettings | None = None) -> Run:
    """Read OUT's parquet files; settings: given, else OUT/config.yaml's `report:`, else the defaults."""
    out = Path(out)
    if not (out / "evals.parquet").is_file() or not (out / "trials.parquet").is_file():
        raise ReportError(f"{out}: no evals.parquet/trials.parquet here (is it a prefbench run directory?)")
    try:
        evals, trials = pd.read_parquet(out / "evals.parquet"), pd.read_parquet(out / "trials.parquet")
    except Exception as e:  # a truncated or foreign file: one line, not a pyarrow traceback
        raise ReportError(f"{out}: cannot read its parquet files ({type(e).__name__}: {_one_line(e)})") from None
    missing = {"algorithm", "trial_id", "seed", "knob_value", "step", "final", "temperature", "gold_reward", "kl"} - set(evals.columns)
    if missing or not {"trial_id", "status"} <= set(trials.columns):
        raise ReportError(f"{out}: evals.parquet/trials.parquet lack prefbench's columns ({', '.join(sorted(missing)) or 'status'})")
    for frame, cols in ((evals, _EVAL_NUMBERS), (trials, _TRIAL_NUMBERS)):
        for col in cols:
            if col in frame:
                frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    evals["final"] = evals["final"].astype(bool)
    config_text = _config_text(out)
    return Run(out, evals, trials, settings or saved_settings(out, config_text), config_text)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _config_text(out: Path) -> str:
    """OUT/config.yaml's text, "" when there is none."""
    path = Path(out) / "config.yaml"
    try:
        return path.read_text() if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read it ({type(e).__name__}: {_one_line(e)})") from None


def saved_settings(out: Path, config_text: str | None = None) -> ReportSettings:
    """The `report:` settings of OUT/config.yaml (the defaults where it has none)."""
    if config_text is None:
        config_text = _config_text(out)
    try:
        doc = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError as e:
        raise ReportError(f"{out}/config.yaml: not valid YAML ({_one_line(e)})") from None
    if doc is not None and not isinstance(doc, dict):
        raise ReportError(f"{out}/config.yaml: not a prefbench suite (a YAML mapping)")
    saved = doc.get("report") if doc else None
    try:
        return build_dataclass(ReportSettings, saved or {}, "report")
    except ConfigError as e:
        raise ReportError(f"{out}/config.yaml: {e}") from None


def _order(run: Run) -> list[str]:
    """Algorithms in the suite's order, the SFT baseline first."""
    names = list(dict.fromkeys(run.trials["algorithm"].tolist() + run.evals["algorithm"].tolist()))
    return sorted(names, key=lambda a: a != "sft")


def ok_evals(run: Run) -> pd.DataFrame:
    ok = set(run.trials.loc[run.trials["status"] == "ok", "trial_id"])
    return run.evals[run.evals["trial_id"].isin(ok)]


def frontier_points(run: Run) -> pd.DataFrame:
    """Every evaluation at T = 1 with a finite KL and gold reward (one row per trial and step)."""
    ev = ok_evals(run)
    pts = ev[(ev["temperature"] == 1.0) & np.isfinite(ev["kl"]) & np.isfinite(ev["gold_reward"])]
    return pts.sort_values(["algorithm", "seed", "knob_value", "step"], kind="stable")


def _sft_gold(points: pd.DataFrame) -> dict[int, float]:
    sft = points[points["algorithm"] == "sft"]
    return {int(s): float(g["gold_reward"].mean()) for s, g in sft.groupby("seed")}


def halves(frame: pd.DataFrame, metric: str, crossfit: bool) -> tuple[np.ndarray, np.ndarray]:
    """`metric` ("gold_reward", "kl", "win_rate") of each row on half 0 and on half 1 of the eval prompts;
    without cross-fitting the full-sample column twice (selection and value in-sample)."""
    if crossfit:
        return frame[f"{metric}_h0"].to_numpy(dtype=float), frame[f"{metric}_h1"].to_numpy(dtype=float)
    full = frame[metric].to_numpy(dtype=float)
    return full, full


def _sft_halves(points: pd.DataFrame, crossfit: bool) -> dict[int, tuple[float, float]]:
    """Per seed, the SFT reference's gold reward on each half: the floor of every staircase of that seed."""
    sft = points[points["algorithm"] == "sft"]
    return {int(s): tuple(float(h.mean()) for h in halves(g, "gold_reward", crossfit)) for s, g in sft.groupby("seed")}


def _pooled_se(se_a: float, se_b: float) -> float:
    """Standard error of ½(a + b), a and b two half-sample means on disjoint prompts, from their points'
    full-sample standard errors (a half has twice the full sample's variance): √((se_a² + se_b²)/2)."""
    return float(se_a) if se_a == se_b else float(math.sqrt((se_a**2 + se_b**2) / 2))


def _form(pts: pd.DataFrame) -> str:
    return "bon" if "kl_kind" in pts and pts["kl_kind"].isin(BOUND_KINDS).all() else "rl"


def bound_algorithms(points: pd.DataFrame) -> list[str]:
    """Algorithms whose KL at T = 1 is best-of-n's upper bound log n − (n−1)/n, not an estimate."""
    if "kl_kind" not in points:
        return []
    return list(dict.fromkeys(points.loc[points["kl_kind"].isin(BOUND_KINDS), "algorithm"]))


def configurations(run: Run) -> pd.DataFrame:
    """Final evaluations per (algorithm, knob value, seed, temperature)."""
    ev = ok_evals(run)
    return ev[ev["final"].astype(bool)]


class Choice(NamedTuple):
    """An algorithm's point in the temperature plot, as selected on one half of the eval prompts."""

    knob_value: float
    kl: float  # nats: mean over seeds of its full-sample KL at T = 1
    inside: bool  # within report.temperature_kl_budget on the half it was selected on


def _choose(t1: pd.DataFrame, kl_col: str, gold_col: str, budget: float) -> Choice | None:
    """The knob value whose final evaluation at T = 1 has the highest `gold_col` (mean over seeds) with
    `kl_col` ≤ budget; none within it: the least divergent one, flagged."""
    means = t1.groupby("knob_value", dropna=False)[list(dict.fromkeys([kl_col, gold_col, "kl"]))].mean().reset_index()
    means = means[np.isfinite(means[gold_col])]
    if not len(means):
        return None
    inside = means[means[kl_col].fillna(0.0) <= budget]
    if len(inside):
        row = inside.sort_values([gold_col, kl_col], ascending=[False, True]).iloc[0]
    else:
        row = means.sort_values(kl_col).iloc[0]
    return Choice(float(row["knob_value"]), float(row["kl"]), bool(len(inside)))


def chosen_knobs(run: Run, final: pd.DataFrame) -> dict[str, tuple[Choice, Choice]]:
    """Per algorithm: its temperature-plot point selected on half 0 and on half 1 of the eval prompts (the
    in-sample one twice for a run without halves), from the final evaluations `final` (`configurations(run)`)."""
    t1 = final[final["temperature"] == 1.0]
    cols = [("kl_h0", "gold_reward_h0"), ("kl_h1", "gold_reward_h1")] if run.crossfit else [("kl", "gold_reward")] * 2
    chosen = {}
    for algo, grp in t1.groupby("algorithm", sort=False):
        picks = tuple(_choose(grp, kl, gold, run.settings.temperature_kl_budget) for kl, gold in cols)
        if None not in picks:
            chosen[algo] = picks
    return chosen


def _at_knob(frame: pd.DataFrame, knob_value: float) -> pd.DataFrame:
    return frame[frame["knob_value"].isna()] if math.isnan(knob_value) else frame[frame["knob_value"] == knob_value]


def _crossed(rows: list[pd.DataFrame], metric: str, crossfit: bool) -> tuple[float, float]:
    """(½[metric on half 1 of rows[0] + metric on half 0 of rows[1]], its standard error), rows[h] the
    evaluation selected on half h (in-sample: the full-sample metric); nan when either is missing."""
    if any(len(r) == 0 for r in rows):
        return float("nan"), float("nan")
    (_, a), (b, _) = (halves(r.iloc[:1], metric, crossfit) for r in rows)
    se_a, se_b = (float(r[f"{metric}_se"].iloc[0]) for r in rows)
    return float((a[0] + b[0]) / 2), _pooled_se(se_a, se_b)


def per_seed(run: Run, points: pd.DataFrame, final: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """One row per (algorithm, seed): every number the tables summarise, before averaging over seeds.
    `points`, `final`, `chosen`: frontier_points(run), configurations(run), chosen_knobs(run, final).
    Best gold and area are cross-fitted (`bench.report.frontier.crossfit_curve`), in-sample for a run without halves."""
    s, cf = run.settings, run.crossfit
    sft_gold, floors = _sft_gold(points), _sft_halves(points, cf)
    temps = sorted(final["temperature"].unique())
    trials = run.trials
    rows = []
    for algo in _order(run):
        apts = points[points["algorithm"] == algo]
        seeds = sorted(set(trials.loc[(trials["algorithm"] == algo) & (trials["status"] == "ok"), "seed"]))
        for seed in seeds:
            pts = apts[apts["seed"] == seed]
            kl, gold = halves(pts, "kl", cf), halves(pts, "gold_reward", cf)
            se = pts["gold_reward_se"].to_numpy(dtype=float)
            row: dict = {"algorithm": algo, "seed": int(seed)}
            for b in s.kl_budgets:
                row[f"best_gold@{b:g}"], (i0, i1) = crossfit_best_within(kl, gold, b)
                row[f"best_gold@{b:g}_se"] = _pooled_se(se[i0], se[i1]) if min(i0, i1) >= 0 else float("nan")
                row[f"area@{b:g}"] = crossfit_area(kl, gold, b, floors.get(int(seed))) if len(pts) else float("nan")
            floor = sft_gold.get(int(seed))
            fit = (fit_gao(pts["kl"].to_numpy(), pts["gold_reward"].to_numpy() - floor, _form(pts))
                   if floor is not None and len(pts) else GaoFit("rl", *[float("nan")] * 3, 0))
            row.update({"gao_form": fit.form, "gao_alpha": fit.alpha, "gao_beta": fit.beta, "gao_r2": fit.r2})
            if algo in chosen:
                at = final[(final["algorithm"] == algo) & (final["seed"] == seed)]
                picks = [_at_knob(at, c.knob_value) for c in chosen[algo]]  # selected on half 0, on half 1
                wins = []
                for t in temps:
                    rows_t = [p[p["temperature"] == t] for p in picks]
                    row[f"win@T={t:g}"], row[f"win@T={t:g}_se"] = _crossed(rows_t, "win_rate", cf)
                    row[f"gold@T={t:g}"], row[f"gold@T={t:g}_se"] = _crossed(rows_t, "gold_reward", cf)
                    wins.append(row[f"win@T={t:g}"])
                row["temp_spread"] = float(np.nanmax(wins) - np.nanmin(wins)) if np.isfinite(wins).sum() >= 2 else float("nan")
            mine = trials[(trials["algorithm"] == algo) & (trials["seed"] == seed) & (trials["status"] == "ok")]
            row["train_time_s"] = float(mine["train_time_s"].sum(min_count=1)) if "train_time_s" in mine else float("nan")
            rm = mine["rm_accuracy"].dropna() if "rm_accuracy" in mine else pd.Series(dtype=float)
            row["rm_accuracy"] = float(rm.iloc[0]) if len(rm) else float("nan")
            row["trials"] = int(len(mine))
            rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(run: Run, seeds: pd.DataFrame) -> dict[str, dict[str, Estimate]]:
    """Per algorithm other than `report.baseline`: best gold within and area to each KL budget minus the
    baseline's on the same seed (same env, pairs and reward model), mean and Student-t CI over the seeds
    both have (`bench.report.frontier.paired_diff_ci`). {} when the baseline is not in the run."""
    name, level = run.settings.baseline, run.settings.confidence
    if not len(seeds) or name not in set(seeds["algorithm"]):
        return {}
    keys = [f"{m}@{b:g}" for m in ("best_gold", "area") for b in run.settings.kl_budgets]
    base = seeds[seeds["algorithm"] == name].set_index("seed")
    out = {}
    for algo, grp in seeds.groupby("algorithm", sort=False):
        if algo != name:
            mine = grp.set_index("seed")
            both = mine.index.intersection(base.index)
            out[algo] = {k: paired_diff_ci(base.loc[both, k], mine.loc[both, k], level) for k in keys}
    return out


def front_steps(run: Run, points: pd.DataFrame, algo: str) -> pd.DataFrame:
    """What the frontier plot draws as `algo`'s front: the cross-fitted staircase f(k) of each seed
    (`crossfit_curve`, floored at that seed's SFT reward), mean and CI over seeds, at every KL where it may
    step (columns kl, gold, gold_ci, seeds; f is constant from one row to the next). Its integral to B is
    the mean over seeds of the table's area to B."""
    cf = run.crossfit
    floors = _sft_halves(points, cf)
    seeds = [(halves(g, "kl", cf), halves(g, "gold_reward", cf), floors.get(int(s)))
             for s, g in points[points["algorithm"] == algo].groupby("seed")]
    if not seeds:
        return pd.DataFrame(columns=["kl", "gold", "gold_ci", "seeds"])
    steps = np.concatenate([[0.0]] + [np.maximum(np.r_[k0, k1], 0.0) for (k0, k1), _, _ in seeds])
    at = np.unique(steps[np.isfinite(steps)])
    curves = np.array([crossfit_curve(kl, gold, at, floor) for kl, gold, floor in seeds])  # (seeds, len(at))
    est = [mean_ci(curves[:, j], run.settings.confidence) for j in range(len(at))]
    frame = pd.DataFrame({"kl": at, "gold": [e.mean for e in est], "gold_ci": [e.ci for e in est],
                          "seeds": [e.n for e in est]})
    same = (frame[["gold", "gold_ci", "seeds"]].diff().abs().fillna(1.0) == 0).all(axis=1)
    return frame[~same].reset_index(drop=True)  # only where it steps


@dataclass
class Summary:
    """Per algorithm, each metric as an Estimate over seeds; what every table and the CSV show."""

    run: Run
    points: pd.DataFrame  # frontier_points(run): what the frontier plot draws
    seeds: pd.DataFrame  # per_seed(...)
    metrics: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # algorithm → metric → Estimate
    chosen: dict[str, tuple[Choice, Choice]] = field(default_factory=dict)  # selected on half 0, on half 1
    temps: list[float] = field(default_factory=list)
    fits: dict[str, GaoFit] = field(default_factory=dict)  # pooled over seeds: the curves drawn
    crossfit: bool = True  # False: a run without half-sample columns, selected in-sample
    paired: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # algorithm → metric → Δ vs the baseline
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)  # front_steps per algorithm but SFT
    bound: list[str] = field(default_factory=list)  # algorithms whose KL is best-of-n's upper bound

    @property
    def algorithms(self) -> list[str]:
        return list(self.metrics)

    def knob_label(self, algo: str) -> str:
        """The chosen knob value, "beta=1"; "beta=1 / beta=0.25" when the two halves chose differently."""
        knob = self.run.trials.loc[self.run.trials["algorithm"] == algo, "knob"].dropna()
        picks = self.chosen.get(algo)
        if not len(knob) or not picks or picks[0].knob_value != picks[0].knob_value:
            return "–"
        return " / ".join(dict.fromkeys(f"{knob.iloc[0]}={c.knob_value:g}" for c in picks))

    def chosen_kl(self, algo: str, digits: int = 2) -> str:
        """Mean KL at T = 1 of the chosen point(s), "≤ " before a bound."""
        text = " / ".join(dict.fromkeys(f"{c.kl:.{digits}f}" for c in self.chosen[algo]))
        return ("≤ " if algo in self.bound else "") + text

    def chosen_inside(self, algo: str) -> bool:
        return all(c.inside for c in self.chosen[algo])


def summarize(run: Run) -> Summary:
    points, final = frontier_points(run), configurations(run)
    chosen = chosen_knobs(run, final)
    seeds = per_seed(run, points, final, chosen)
    level = run.settings.confidence
    summary = Summary(run, points, seeds, chosen=chosen, temps=[float(t) for t in sorted(final["temperature"].unique())],
                      crossfit=run.crossfit, bound=bound_algorithms(points))
    if not len(seeds):
        return summary
    sft_gold = _sft_gold(points)
    value_cols = [c for c in seeds.columns if c not in ("algorithm", "seed", "gao_form", "trials") and not c.endswith("_se")]
    for algo, grp in seeds.groupby("algorithm", sort=False):
        est = {}
        for col in value_cols:
            se = grp[f"{col}_se"].iloc[0] if f"{col}_se" in grp and len(grp) == 1 else None
            est[col] = mean_ci(grp[col], level, se=se)
        summary.metrics[algo] = est
        pts = points[points["algorithm"] == algo]
        if algo != "sft" and sft_gold and len(pts):
            gain = pts["gold_reward"].to_numpy() - pts["seed"].map(sft_gold).to_numpy(dtype=float)
            summary.fits[algo] = fit_gao(pts["kl"].to_numpy(), gain, _form(pts))
        if algo != "sft":
            summary.fronts[algo] = front_steps(run, points, algo)
    summary.paired = paired_differences(run, seeds)
    return summary


def _kl_kind(frame: pd.DataFrame) -> str:
    """"bound" (best-of-n's upper bound, "analytic" in older runs), "estimated", ... of the rows' KL."""
    kinds = set(frame["kl_kind"].dropna()) if "kl_kind" in frame else set()
    return "bound" if kinds and kinds <= set(BOUND_KINDS) else "/".join(sorted(kinds))


def config_table(run: Run) -> pd.DataFrame:
    """Per (algorithm, knob value): its final evaluation at each temperature, mean and CI over seeds; for
    best-of-n also the plug-in estimate of its true KL (`kl_est`) and the share of duplicate samples."""
    final = configurations(run)
    level = run.settings.confidence
    temps = sorted(final["temperature"].unique())
    rows = []
    order = {a: i for i, a in enumerate(_order(run))}
    for (algo, knob, value), grp in final.groupby(["algorithm", "knob", "knob_value"], dropna=False, sort=False):
        t1 = grp[grp["temperature"] == 1.0]
        row = {"algorithm": algo, "knob": knob if isinstance(knob, str) else None, "knob_value": value,
               "seeds": int(grp["seed"].nunique())}

        def est(frame: pd.DataFrame, col: str) -> Estimate:
            if col not in frame:
                return mean_ci([], level)
            se = float(frame[f"{col}_se"].iloc[0]) if len(frame) == 1 and f"{col}_se" in frame else None
            return mean_ci(frame[col], level, se=se)

        row["gold"], row["kl"], row["win"] = est(t1, "gold_reward"), est(t1, "kl"), est(t1, "win_rate")
        row["kl_kind"], row["kl_est"], row["dup_rate"] = _kl_kind(t1), est(t1, "kl_est"), est(t1, "dup_rate")
        row["gen_len"] = float(t1["gen_len"].mean()) if len(t1) else float("nan")
        for t in temps:
            row[f"gold@T={t:g}"] = est(grp[grp["temperature"] == t], "gold_reward")
        row["_order"] = (order.get(algo, 99), -(value if value == value else 0.0))
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("_order").drop(columns="_order").reset_index(drop=True) if len(table) else table


def params_of(run: Run) -> list[tuple[str, str, str, dict]]:
    """(trial_id, algorithm, status, params) of every trial, for the HTML's trial list."""
    out = []
    for r in run.trials.itertuples():
        try:
            params = json.loads(r.params) if isinstance(r.params, str) and r.params else {}
        except json.JSONDecodeError:
            params = {"unparsed": r.params}
        out.append((r.trial_id, r.algorithm, r.status, params))
    return out
