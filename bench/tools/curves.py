"""`python -m bench.tools.curves OUT ALGORITHM [ALGORITHM ...] --out FILE.png`: learning curves of a run.

For each algorithm named, one row of three panels, one line per knob value (mean over seeds, the
seeds' range shaded): its training loss per step (the `losses/…` metrics of OUT/trials/<id>/
train_log.jsonl; `--loss KEY` picks one when it logs several), and the gold reward and KL at T = 1
of its evaluations during training (evals.parquet), with the SFT reference's gold reward as a dashed
line. What a method that does not beat SFT is doing shows here: a loss that falls while the gold
reward stays flat, a KL that grows with nothing to show for it. Needs the run's trial directories
(the committed results/ hold only the parquet files and the report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.report.plots import colors, to_bytes  # noqa: E402
from bench.results import LOG_FILE, trial_dir  # noqa: E402


def train_logs(out: Path, trials: pd.DataFrame) -> pd.DataFrame:
    """Every ok trial's train_log.jsonl rows with the trial's algorithm, seed and knob value."""
    frames = []
    for t in trials[trials["status"] == "ok"].itertuples():
        path = trial_dir(out, t.trial_id) / LOG_FILE
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            frame = pd.DataFrame(rows)
            frame["algorithm"], frame["seed"], frame["knob_value"] = t.algorithm, t.seed, t.knob_value
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _band(ax, frame: pd.DataFrame, x: str, y: str, color, label: str) -> None:
    """Mean over seeds of `y` per `x`, the seeds' min–max shaded."""
    g = frame.groupby(x)[y]
    mean, lo, hi = g.mean(), g.min(), g.max()
    ax.plot(mean.index, mean.values, color=color, lw=1.6, label=label)
    if frame["seed"].nunique() > 1:
        ax.fill_between(mean.index, lo.values, hi.values, color=color, alpha=0.15, lw=0)


def figure(out: Path, algorithms: list[str], loss: str | None = None):
    evals = pd.read_parquet(out / "evals.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    logs = train_logs(out, trials[trials["algorithm"].isin(algorithms)])
    ok = set(trials.loc[trials["status"] == "ok", "trial_id"])
    t1 = evals[(evals["temperature"] == 1.0) & evals["trial_id"].isin(ok)]
    sft_gold = t1.loc[t1["algorithm"] == "sft", "gold_reward"].mean()
    fig, axes = plt.subplots(len(algorithms), 3, figsize=(13, 3.2 * len(algorithms)), squeeze=False)
    for row, algo in zip(axes, algorithms):
        mine = logs[logs["algorithm"] == algo] if len(logs) else logs
        keys = sorted(c for c in mine.columns if c.startswith("losses/") and mine[c].notna().any()) if len(mine) else []
        key = loss if loss in keys else (keys[0] if keys else None)
        values = sorted(set(t1.loc[t1["algorithm"] == algo, "knob_value"].dropna()) or {np.nan})
        palette = colors(["sft"] + [f"{v:g}" for v in values])
        knob = trials.loc[trials["algorithm"] == algo, "knob"].dropna()
        for v in values:
            label = f"{knob.iloc[0]}={v:g}" if len(knob) and v == v else algo
            color = palette[f"{v:g}"]
            sel = (lambda f: f[f["knob_value"] == v]) if v == v else (lambda f: f)
            if key is not None:
                _band(row[0], sel(mine).dropna(subset=[key]), "step", key, color, label)
            points = sel(t1[t1["algorithm"] == algo])
            _band(row[1], points, "step", "gold_reward", color, label)
            _band(row[2], points, "step", "kl", color, label)
        row[0].set_title(f"{algo}: {key or 'no loss logged'}")
        row[1].set_title(f"{algo}: gold reward at T = 1")
        row[2].set_title(f"{algo}: KL(π ‖ π_ref) at T = 1 (nats)")
        if sft_gold == sft_gold:
            row[1].axhline(sft_gold, color="black", ls="--", lw=1, label="SFT")
        for ax in row:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a run's output directory (with its trials/ directories)")
    p.add_argument("algorithms", nargs="+")
    p.add_argument("--out", dest="dest", type=Path, required=True, help="the PNG to write")
    p.add_argument("--loss", help="the losses/ metric to draw (default: the algorithm's first)")
    args = p.parse_args(argv)
    if not (args.out / "evals.parquet").is_file():
        print(f"curves: error: {args.out} has no evals.parquet (not a finished prefbench run)", file=sys.stderr)
        return 2
    known = set(pd.read_parquet(args.out / "trials.parquet")["algorithm"])
    missing = [a for a in args.algorithms if a not in known]
    if missing:
        print(f"curves: error: not in this run: {', '.join(missing)} (it has {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    args.dest.write_bytes(to_bytes(figure(args.out, args.algorithms, args.loss), "png"))
    print(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
