"""The report's files: `write_report` (re)builds every file of a run from its parquet files, each
replaced atomically; `compare` puts several runs side by side (compare.md/.csv/_frontier)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.config import ReportSettings, build_dataclass
from bench.report import plots, render
from bench.report.frontier import diff_ci
from bench.report.measure import ReportError, Summary, config_table, load_run, summarize
from bench.results import remove_stale_temps, write_bytes_atomic, write_text_atomic

REPORT_FILES = ("report.md", "report.csv", "configs.csv", "report.tex", "report.html",
                "frontier.png", "frontier.svg", "temperature.png", "temperature.svg")


def write_report(out: Path, settings: ReportSettings | None = None) -> Path:
    """(Re)build every report file in OUT from its parquet files; returns OUT/report.md.
    Each file is replaced atomically (`bench.results._atomic`): a killed rebuild leaves every file
    whole, old or new. Temp files a killed writer left in OUT are removed first."""
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


def _labels(outs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in outs]
    return names if len(set(names)) == len(names) else [str(p) for p in outs]


def compare(outs: list[Path], dest: Path | None = None, baseline: str | None = None) -> str:
    """Several runs side by side: per algorithm and metric, each run's mean ± CI, and the difference
    last − first (Welch's t over seeds); then, per run, the paired differences against its baseline
    algorithm (`baseline`, else each run's `report.baseline`). Returns the markdown; with `dest` also
    writes compare.md, compare.csv and compare_frontier.png/.svg there."""
    if dest is not None:
        _check_compare_dest(dest)
    runs = [load_run(p) for p in outs]
    if baseline is not None:  # a bad name is a ConfigError: one line, exit 2
        for r in runs:
            r.settings = build_dataclass(ReportSettings, {**dataclasses.asdict(r.settings), "baseline": baseline}, "report")
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
    paired = _paired_rows(labels, summaries, budgets)
    text = render.compare_markdown(labels, rows, runs, paired)
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        write_text_atomic(dest / "compare.md", text)
        write_text_atomic(dest / "compare.csv", render.compare_csv(labels, rows + paired))
        fig = plots.compare_figure(runs, summaries, labels)
        for ext in ("png", "svg"):
            write_bytes_atomic(dest / f"compare_frontier.{ext}", plots.to_bytes(fig, ext))
        plots.close(fig)
    return text


def _paired_rows(labels: list[str], summaries: list[Summary], budgets: list[float]) -> list[dict]:
    """Per algorithm and metric (best gold within, area to each budget): each run's paired Δ against
    that run's baseline (None where the run lacks the algorithm, the baseline or the budget)."""
    algos = list(dict.fromkeys(a for s in summaries for a in s.paired))
    rows = []
    for algo in algos:
        for metric, label in (("best_gold", "Δ best gold reward, KL ≤ {b}"), ("area", "Δ area under front to {b} nats")):
            for b in budgets:
                key = f"{metric}@{b:g}"
                row = {"algorithm": algo, "metric": label.format(b=f"{b:g}"), "key": f"delta_{key}"}
                row.update({name: s.paired.get(algo, {}).get(key) for name, s in zip(labels, summaries)})
                if any(row[name] is not None and row[name].mean == row[name].mean for name in labels):
                    rows.append(row)
    return rows


def _check_compare_dest(dest: Path) -> None:
    """`compare --out` writes into a new or empty directory, or over an earlier compare's (it has
    compare.md); never into someone else's directory, e.g. a run's."""
    if dest.exists() and not dest.is_dir():
        raise ReportError(f"--out {dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "compare.md").is_file():
        raise ReportError(f"--out {dest}: not empty and not an earlier compare's output (no compare.md); "
                          "choose a new or empty directory")
