"""The report of a run, rebuilt from OUT/evals.parquet and OUT/trials.parquet alone (plus the `report:`
settings of OUT/config.yaml when it is there): frontier and temperature plots, and the comparison
tables as report.md, report.csv, configs.csv, report.tex and report.html.

What is measured (DESIGN.md "Evaluation"; every number per seed first, then mean ± CI over seeds):
- the frontier: every evaluation at T = 1 of every trial is a point (KL(π‖π_ref) nats, gold reward);
  an algorithm's Pareto front is the upper-left set of its points over all knob values and steps
  (`bench.frontier.pareto_front`); per KL budget B, the best gold reward with KL ≤ B and the area
  under the front from 0 to B (staircase, floored at the SFT reward);
- the Gao et al. (2022) forms fitted to each algorithm's points (best-of-n's form where its KL is
  analytic, the RL form otherwise);
- temperature robustness at each algorithm's chosen point: its knob value whose final evaluation
  (mean over seeds) has the highest gold reward with KL ≤ `report.temperature_kl_budget`; win rate
  and gold reward at every evaluated temperature, and the spread max − min of the win rate.
Only trials with status ok are used; failed ones are listed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.config import ConfigError, ReportSettings, build_dataclass
from bench.frontier import Estimate, GaoFit, area_under_front, best_within, diff_ci, fit_gao, mean_ci


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


_EVAL_NUMBERS = ("seed", "knob_value", "step", "temperature", "gold_reward", "gold_reward_se", "kl", "kl_se", "kl_k3",
                 "kl_k3_se", "win_rate", "win_rate_se", "gen_len", "train_time_s", "wall_time_s")
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


# ---- per-seed numbers -------------------------------------------------------------------------------


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


def _form(pts: pd.DataFrame) -> str:
    return "bon" if "kl_kind" in pts and (pts["kl_kind"] == "analytic").all() else "rl"


def configurations(run: Run) -> pd.DataFrame:
    """Final evaluations per (algorithm, knob value, seed, temperature)."""
    ev = ok_evals(run)
    return ev[ev["final"].astype(bool)]


def chosen_knobs(run: Run, final: pd.DataFrame) -> dict[str, tuple[float, float, bool]]:
    """Per algorithm: (knob value, mean KL at T=1, within budget) of its temperature-plot point, from
    the final evaluations `final` (`configurations(run)`)."""
    t1 = final[final["temperature"] == 1.0]
    budget = run.settings.temperature_kl_budget
    chosen = {}
    for algo, grp in t1.groupby("algorithm", sort=False):
        means = grp.groupby("knob_value", dropna=False)[["kl", "gold_reward"]].mean().reset_index()
        means = means[np.isfinite(means["gold_reward"])]
        if not len(means):
            continue
        inside = means[means["kl"].fillna(0.0) <= budget]
        if len(inside):
            row = inside.sort_values(["gold_reward", "kl"], ascending=[False, True]).iloc[0]
            chosen[algo] = (float(row["knob_value"]), float(row["kl"]), True)
        else:  # nothing within the budget: its least divergent point, flagged
            row = means.sort_values("kl").iloc[0]
            chosen[algo] = (float(row["knob_value"]), float(row["kl"]), False)
    return chosen


def per_seed(run: Run, points: pd.DataFrame, final: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """One row per (algorithm, seed): every number the tables summarise, before averaging over seeds.
    `points`, `final`, `chosen`: frontier_points(run), configurations(run), chosen_knobs(run, final)."""
    s = run.settings
    sft_gold = _sft_gold(points)
    temps = sorted(final["temperature"].unique())
    trials = run.trials
    rows = []
    for algo in _order(run):
        apts = points[points["algorithm"] == algo]
        seeds = sorted(set(trials.loc[(trials["algorithm"] == algo) & (trials["status"] == "ok"), "seed"]))
        for seed in seeds:
            pts = apts[apts["seed"] == seed]
            kl, gold = pts["kl"].to_numpy(), pts["gold_reward"].to_numpy()
            floor = sft_gold.get(int(seed))
            row: dict = {"algorithm": algo, "seed": int(seed)}
            for b in s.kl_budgets:
                row[f"best_gold@{b:g}"], i = best_within(kl, gold, b)
                row[f"best_gold@{b:g}_se"] = float(pts["gold_reward_se"].iloc[i]) if i >= 0 else float("nan")
                row[f"area@{b:g}"] = area_under_front(kl, gold, b, floor) if len(pts) else float("nan")
            fit = fit_gao(kl, gold - floor, _form(pts)) if floor is not None and len(pts) else GaoFit("rl", *[float("nan")] * 3, 0)
            row.update({"gao_form": fit.form, "gao_alpha": fit.alpha, "gao_beta": fit.beta, "gao_r2": fit.r2})
            if algo in chosen:
                knob_value = chosen[algo][0]
                at = final[(final["algorithm"] == algo) & (final["seed"] == seed)]
                at = at[at["knob_value"].isna()] if math.isnan(knob_value) else at[at["knob_value"] == knob_value]
                wins = []
                for t in temps:
                    r = at[at["temperature"] == t]
                    row[f"win@T={t:g}"] = float(r["win_rate"].iloc[0]) if len(r) else float("nan")
                    row[f"win@T={t:g}_se"] = float(r["win_rate_se"].iloc[0]) if len(r) else float("nan")
                    row[f"gold@T={t:g}"] = float(r["gold_reward"].iloc[0]) if len(r) else float("nan")
                    row[f"gold@T={t:g}_se"] = float(r["gold_reward_se"].iloc[0]) if len(r) else float("nan")
                    wins.append(row[f"win@T={t:g}"])
                row["temp_spread"] = float(np.nanmax(wins) - np.nanmin(wins)) if np.isfinite(wins).sum() >= 2 else float("nan")
            mine = trials[(trials["algorithm"] == algo) & (trials["seed"] == seed) & (trials["status"] == "ok")]
            row["train_time_s"] = float(mine["train_time_s"].sum(min_count=1)) if "train_time_s" in mine else float("nan")
            rm = mine["rm_accuracy"].dropna() if "rm_accuracy" in mine else pd.Series(dtype=float)
            row["rm_accuracy"] = float(rm.iloc[0]) if len(rm) else float("nan")
            row["trials"] = int(len(mine))
            rows.append(row)
    return pd.DataFrame(rows)


# ---- summaries over seeds -----------------------------------------------------------------------------


@dataclass
class Summary:
    """Per algorithm, each metric as an Estimate over seeds; what every table and the CSV show."""

    run: Run
    points: pd.DataFrame  # frontier_points(run): what the frontier plot draws
    seeds: pd.DataFrame  # per_seed(...)
    metrics: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # algorithm → metric → Estimate
    chosen: dict[str, tuple[float, float, bool]] = field(default_factory=dict)
    temps: list[float] = field(default_factory=list)
    fits: dict[str, GaoFit] = field(default_factory=dict)  # pooled over seeds: the curves drawn

    @property
    def algorithms(self) -> list[str]:
        return list(self.metrics)

    def knob_label(self, algo: str) -> str:
        knob = self.run.trials.loc[self.run.trials["algorithm"] == algo, "knob"].dropna()
        value = self.chosen.get(algo, (float("nan"),))[0]
        return f"{knob.iloc[0]}={value:g}" if len(knob) and value == value else "–"


def summarize(run: Run) -> Summary:
    points, final = frontier_points(run), configurations(run)
    chosen = chosen_knobs(run, final)
    seeds = per_seed(run, points, final, chosen)
    level = run.settings.confidence
    summary = Summary(run, points, seeds, chosen=chosen, temps=[float(t) for t in sorted(final["temperature"].unique())])
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
    return summary


def config_table(run: Run) -> pd.DataFrame:
    """Per (algorithm, knob value): its final evaluation at each temperature, mean and CI over seeds."""
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
            se = float(frame[f"{col}_se"].iloc[0]) if len(frame) == 1 and f"{col}_se" in frame else None
            return mean_ci(frame[col], level, se=se)

        row["gold"], row["kl"], row["win"] = est(t1, "gold_reward"), est(t1, "kl"), est(t1, "win_rate")
        row["gen_len"] = float(t1["gen_len"].mean()) if len(t1) else float("nan")
        for t in temps:
            row[f"gold@T={t:g}"] = est(grp[grp["temperature"] == t], "gold_reward")
        row["_order"] = (order.get(algo, 99), -(value if value == value else 0.0))
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("_order").drop(columns="_order").reset_index(drop=True) if len(table) else table


# ---- files ------------------------------------------------------------------------------------------

REPORT_FILES = ("report.md", "report.csv", "configs.csv", "report.tex", "report.html",
                "frontier.png", "frontier.svg", "temperature.png", "temperature.svg")


def write_report(out: Path, settings: ReportSettings | None = None) -> Path:
    """(Re)build every report file in OUT from its parquet files; returns OUT/report.md.
    Each file is replaced atomically (`bench.results._atomic`): a killed rebuild leaves every file
    whole, old or new. Temp files a killed writer left in OUT are removed first."""
    from bench import plots, render
    from bench.results import remove_stale_temps, write_bytes_atomic, write_text_atomic

    run = load_run(Path(out), settings)
    remove_stale_temps(run.out)  # only once OUT is known to be a run: never in a directory that is not
    summary = summarize(run)
    configs = config_table(run)
    figures = {"frontier": plots.frontier_figure(run, summary), "temperature": plots.temperature_figure(run, summary)}
    images = {}
    for name, fig in figures.items():
        images[name] = plots.to_bytes(fig, "png")
        write_bytes_atomic(run.out / f"{name}.png", images[name])
        write_bytes_atomic(run.out / f"{name}.svg", plots.to_bytes(fig, "svg"))
        plots.close(fig)
    tables = render.tables(summary, configs)
    write_text_atomic(run.out / "report.csv", render.summary_csv(summary))
    write_text_atomic(run.out / "configs.csv", render.configs_csv(configs))
    write_text_atomic(run.out / "report.tex", render.latex(summary, tables))
    write_text_atomic(run.out / "report.html", render.html(summary, tables, images))
    path = run.out / "report.md"
    write_text_atomic(path, render.markdown(summary, tables))
    return path


# ---- prefbench compare ------------------------------------------------------------------------------


def _labels(outs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in outs]
    return names if len(set(names)) == len(names) else [str(p) for p in outs]


def compare(outs: list[Path], dest: Path | None = None) -> str:
    """Several runs side by side: per algorithm and metric, each run's mean ± CI, and the difference
    last − first (Welch's t over seeds). Returns the markdown; with `dest` also writes compare.md,
    compare.csv and compare_frontier.png/.svg there."""
    from bench import plots, render
    from bench.results import remove_stale_temps, write_bytes_atomic, write_text_atomic

    if dest is not None:
        _check_compare_dest(dest)
    runs = [load_run(p) for p in outs]
    labels = _labels(outs)
    summaries = [summarize(r) for r in runs]
    budgets = sorted(set().union(*(r.settings.kl_budgets for r in runs)))
    metrics = [(f"best_gold@{b:g}", f"best gold reward, KL ≤ {b:g}") for b in budgets]
    metrics += [(f"area@{budgets[-1]:g}", f"area under front to {budgets[-1]:g} nats"),
                ("win@T=1", "win rate at T=1 (chosen point)"), ("temp_spread", "temperature spread of win rate"),
                ("train_time_s", "train time (s, all knob values)")]
    algos = list(dict.fromkeys(a for s in summaries for a in s.algorithms))
    rows = []
    for algo in algos:
        for key, label in metrics:
            row = {"algorithm": algo, "metric": label, "key": key}
            for name, s in zip(labels, summaries):
                row[name] = s.metrics.get(algo, {}).get(key)
                row[f"{name}:knob"] = s.knob_label(algo) if algo in s.metrics else "–"
            if len(runs) >= 2:
                first, last = (s.seeds[s.seeds["algorithm"] == algo] for s in (summaries[0], summaries[-1]))
                have = key in first and key in last
                row["diff"] = diff_ci(first[key], last[key], runs[0].settings.confidence) if have else None
            if any(row[name] is not None and row[name].mean == row[name].mean for name in labels):
                rows.append(row)
    text = render.compare_markdown(labels, rows, runs)
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        write_text_atomic(dest / "compare.md", text)
        write_text_atomic(dest / "compare.csv", render.compare_csv(labels, rows))
        fig = plots.compare_figure(runs, summaries, labels)
        for ext in ("png", "svg"):
            write_bytes_atomic(dest / f"compare_frontier.{ext}", plots.to_bytes(fig, ext))
        plots.close(fig)
    return text


def _check_compare_dest(dest: Path) -> None:
    """`compare --out` writes into a new or empty directory, or over an earlier compare's (it has
    compare.md); never into someone else's directory, e.g. a run's."""
    if dest.exists() and not dest.is_dir():
        raise ReportError(f"--out {dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "compare.md").is_file():
        raise ReportError(f"--out {dest}: not empty and not an earlier compare's output (no compare.md); "
                          "choose a new or empty directory")


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
