"""OUT/report.md, rebuilt from OUT/evals.parquet and OUT/trials.parquet alone.

One row per (algorithm, knob value): the FINAL evaluation of its trials. With one seed the ± is the
evaluation's standard error (clustered by prompt); with several seeds it is the standard error of
the mean over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def _agg(df: pd.DataFrame, col: str) -> tuple[float, float]:
    vals = df[col].to_numpy(dtype=float)
    if len(vals) == 0 or np.isnan(vals).all():
        return float("nan"), float("nan")
    if len(vals) == 1:
        return float(vals[0]), float(df[f"{col}_se"].iloc[0])
    return float(np.nanmean(vals)), float(np.nanstd(vals, ddof=1) / math.sqrt(np.sum(~np.isnan(vals))))


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if mean != mean:
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if se == se else f"{mean:.{digits}f}"


def _knob(knob: str | None, value: float | None) -> str:
    if knob is None or value is None or value != value:
        return "–"
    return f"{knob}={value:g}"


def summary_table(evals: pd.DataFrame) -> pd.DataFrame:
    """Final evaluations aggregated per (algorithm, knob value) over seeds."""
    final = evals[evals["final"].astype(bool)]
    temps = sorted(final["temperature"].unique())
    out = []
    keys = ["algorithm", "knob", "knob_value"]
    for (algo, knob, value), grp in final.groupby(keys, dropna=False, sort=False):
        t1 = grp[grp["temperature"] == 1.0]
        row = {"algorithm": algo, "knob": knob if isinstance(knob, str) else None,
               "knob_value": value, "seeds": grp["seed"].nunique()}
        row["gold"], row["gold_se"] = _agg(t1, "gold_reward")
        row["kl"], row["kl_se"] = _agg(t1, "kl")
        row["win"], row["win_se"] = _agg(t1, "win_rate")
        row["gen_len"] = float(t1["gen_len"].mean()) if len(t1) else float("nan")
        for t in temps:
            row[f"gold@T={t:g}"] = _agg(grp[grp["temperature"] == t], "gold_reward")
        out.append(row)
    table = pd.DataFrame(out)
    if len(table):
        table["_order"] = table["algorithm"].map(lambda a: (a != "sft", a))
        table = table.sort_values(["_order", "knob_value"], ascending=[True, False]).drop(columns="_order")
    return table


def best_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per algorithm, the row of `summary_table` with the highest gold reward at T = 1."""
    if not len(table):
        return table
    ranked = table.dropna(subset=["gold"]).sort_values("gold", ascending=False)
    return ranked.drop_duplicates("algorithm").set_index("algorithm").loc[
        [a for a in table["algorithm"].unique() if a in set(ranked["algorithm"])]].reset_index()


def render_markdown(evals: pd.DataFrame, trials: pd.DataFrame) -> str:
    lines = []
    suite = evals["suite"].iloc[0] if len(evals) else (trials["suite"].iloc[0] if len(trials) else "?")
    env = evals["env"].iloc[0] if len(evals) else (trials["env"].iloc[0] if len(trials) else "?")
    ok = int((trials["status"] == "ok").sum())
    lines += [f"# prefbench report: suite `{suite}`, env `{env}`", ""]
    lines += [f"{ok}/{len(trials)} trials ok; {len(evals)} evaluation rows. Final evaluation of each trial; "
              "gold reward and win rate at T = 1 with KL(π‖π_ref) in nats per sequence (k1 estimate); "
              "± is one standard error (clustered by prompt; across seeds when there are several).", ""]
    table = summary_table(evals)
    if len(table):
        temps = [c for c in table.columns if c.startswith("gold@T=")]
        header = ["algorithm", "knob", "seeds", "gold reward (T=1)", "KL (nats)", "win rate (T=1)", "length"] + [
            c.replace("gold@", "gold ") for c in temps]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for _, r in table.iterrows():
            cells = [r["algorithm"], _knob(r["knob"], r["knob_value"]), str(r["seeds"]),
                     _fmt(r["gold"], r["gold_se"]), _fmt(r["kl"], r["kl_se"], 2), _fmt(r["win"], r["win_se"]),
                     f"{r['gen_len']:.1f}"] + [_fmt(*r[c]) for c in temps]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No trial produced a final evaluation.", ""]
    best = best_points(table)
    if len(best):
        lines += ["## Best point per algorithm", "",
                  "Highest final gold reward at T = 1 over each algorithm's knob values, and how far it moved "
                  "from the reference to get there.", ""]
        lines += ["| algorithm | knob | gold reward (T=1) | vs SFT | KL (nats) |", "|---|---|---|---|---|"]
        sft_gold = table.loc[table["algorithm"] == "sft", "gold"]
        for _, r in best.iterrows():
            delta = f"{r['gold'] - sft_gold.iloc[0]:+.3f}" if len(sft_gold) else "–"
            lines.append(f"| {r['algorithm']} | {_knob(r['knob'], r['knob_value'])} | {_fmt(r['gold'], r['gold_se'])} "
                         f"| {delta} | {_fmt(r['kl'], r['kl_se'], 2)} |")
        lines.append("")
    rm = trials.dropna(subset=["rm_accuracy"]) if "rm_accuracy" in trials else trials.iloc[:0]
    if len(rm):
        per_seed = rm.groupby("seed")["rm_accuracy"].first()
        lines += ["Learned reward model, held-out pair accuracy: "
                  + ", ".join(f"{acc:.3f} (seed {seed})" for seed, acc in per_seed.items()) + ".", ""]
    failed = trials[trials["status"] != "ok"]
    if len(failed):
        lines += ["## Failed trials", ""]
        lines += [f"- `{r.trial_id}`: {r.reason}" for r in failed.itertuples()]
        lines.append("")
    times = trials.dropna(subset=["wall_time_s"])
    if len(times):
        lines += [f"Trial wall time: median {times['wall_time_s'].median():.0f} s, "
                  f"training (without evaluation) median {times['train_time_s'].median():.0f} s.", ""]
    return "\n".join(lines)


def write_report(out: Path) -> Path:
    evals = pd.read_parquet(out / "evals.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    path = out / "report.md"
    path.write_text(render_markdown(evals, trials))
    return path
