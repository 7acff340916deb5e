"""The report's figures (matplotlib, headless): the reward-vs-KL frontier, temperature robustness, and
several runs' frontiers side by side. Each returns a Figure; `to_bytes` renders it reproducibly (no
date in the SVG, fixed element ids), so a report rebuilt from the same parquet files is identical.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from bench.report.frontier import gao_curve, mean_ci  # noqa: E402

plt.rcParams.update({"svg.hashsalt": "prefbench", "font.size": 10, "axes.titlesize": 11})

KL_LABEL = "KL(π ‖ π_ref) at T = 1  (nats per sequence; best-of-n: its upper bound log n − (n−1)/n)"
BOUND_LABEL = "best-of-n's KL: the upper bound log n − (n−1)/n\n(Beirami et al. 2024); its true KL is lower"
GOLD_LABEL = "gold reward  (env's, mean per completion)"
STYLES = ["-", "--", ":", "-."]


def colors(algorithms: list[str]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10")
    others = [a for a in algorithms if a != "sft"]
    return {"sft": "black", **{a: cmap(i % 10) for i, a in enumerate(others)}}


def aggregate_points(points: pd.DataFrame, level: float) -> pd.DataFrame:
    """T = 1 points averaged over seeds per (algorithm, knob value, step), with CI half-widths."""
    rows = []
    for (algo, value, step), grp in points.groupby(["algorithm", "knob_value", "step"], dropna=False, sort=False):
        kl, gold = mean_ci(grp["kl"], level), mean_ci(grp["gold_reward"], level)
        rows.append({"algorithm": algo, "knob_value": value, "step": step, "kl": kl.mean, "gold": gold.mean,
                     "kl_ci": kl.ci, "gold_ci": gold.ci, "seeds": kl.n})
    return pd.DataFrame(rows, columns=["algorithm", "knob_value", "step", "kl", "gold", "kl_ci", "gold_ci", "seeds"])


def _ci(values) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)


def _draw_front(ax, steps: pd.DataFrame, right: float, color, label: str, style: str = "-", band: bool = True) -> None:
    """An algorithm's front as the tables measure it (`bench.report.front_steps`): the cross-fitted staircase
    f(k) = reward reachable with KL ≤ k, mean over seeds, bold, carried on flat to `right`; its CI over seeds
    a light band. Its area to B is the table's mean area to B."""
    if not len(steps):
        return
    kl = np.r_[steps["kl"].to_numpy(dtype=float), max(right, float(steps["kl"].iloc[-1]))]
    gold = np.r_[steps["gold"].to_numpy(dtype=float), steps["gold"].iloc[-1]]
    ax.step(kl, gold, where="post", color=color, lw=2.2, ls=style, label=label, zorder=3)
    ci = np.r_[steps["gold_ci"].to_numpy(dtype=float), steps["gold_ci"].iloc[-1]]
    if band and np.isfinite(ci).any():
        ax.fill_between(kl, gold - ci, gold + ci, step="post", color=color, alpha=0.12, lw=0, zorder=2)


def frontier_figure(run, summary):
    level = run.settings.confidence
    agg = aggregate_points(summary.points, level)
    fig, ax = plt.subplots(figsize=(10, 5.8))
    palette = colors(summary.algorithms)
    sft = agg[agg["algorithm"] == "sft"]
    sft_gold = float(sft["gold"].mean()) if len(sft) else None
    top = float(np.nanmax(agg["kl"])) if len(agg) else 1.0
    for b in run.settings.kl_budgets:
        if b <= top * 1.05:
            ax.axvline(b, color="0.8", ls=":", lw=1, zorder=0)
            ax.annotate(f"{b:g} nat{'s' * (b != 1)}", (b, 1.0), xycoords=("data", "axes fraction"), xytext=(-2, -10),
                        textcoords="offset points", fontsize=8, color="0.45", ha="right")
    for algo in palette:
        a = agg[agg["algorithm"] == algo]
        if not len(a):
            continue
        color = palette[algo]
        if algo == "sft":
            ax.errorbar(0.0, sft_gold, yerr=_ci(a["gold_ci"].iloc[:1]), color="black", marker="*", ms=13,
                        capsize=3, ls="none", label="SFT (the reference)", zorder=4)
            continue
        for _, traj in a.groupby("knob_value", dropna=False, sort=False):
            if len(traj) > 1:
                ax.plot(traj["kl"], traj["gold"], color=color, alpha=0.25, lw=1, marker="o", ms=2.5, zorder=1)
            else:
                ax.plot(traj["kl"], traj["gold"], color=color, alpha=0.35, marker="o", ms=3, ls="none", zorder=1)
        fit = summary.fits.get(algo)
        label = algo + ("  (KL: upper bound)" if algo in summary.bound else "")
        if fit is not None and np.isfinite(fit.alpha) and sft_gold is not None:
            d = np.linspace(0.0, np.sqrt(max(float(a["kl"].max()), 1e-6)), 200)
            ax.plot(d**2, sft_gold + gao_curve(d, fit.alpha, fit.beta, fit.form), color=color, ls="--", lw=1.1,
                    alpha=0.85, zorder=2)
            label += f"  (Gao {fit.form}: α={fit.alpha:.3f}, β={fit.beta:.3f})"
        _draw_front(ax, summary.fronts.get(algo, pd.DataFrame()), top, color, label)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.4", alpha=0.35, lw=1, marker="o", ms=2.5),
                Line2D([], [], color="0.4", ls="--", lw=1.1)]
    labels += ["training trajectories (every evaluation, full sample)", "Gao et al. (2022) fit"]
    if summary.bound:
        handles.append(Line2D([], [], ls="none"))
        labels.append(BOUND_LABEL)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(GOLD_LABEL)
    ax.set_xlim(left=-0.03 * max(top, 1.0))
    seeds = int(run.trials["seed"].nunique()) if len(run.trials) else 0
    front = ("cross-fitted front (selected on one half of the prompts, scored on the other)" if summary.crossfit
             else "in-sample front (no half-sample columns in this run)")
    ax.set_title(f"Reward vs KL frontier — suite {run.suite}, env {run.env}, {seeds} seed{'s' * (seeds != 1)}\n"
                 f"bold: {front}, band: {level:.0%} CI")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def temperature_figure(run, summary):
    fig, (ax_win, ax_gold) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    palette = colors(summary.algorithms)
    temps = np.asarray(summary.temps, dtype=float)
    shown = [a for a in summary.metrics if a in summary.chosen]
    for i, algo in enumerate(shown):
        est = summary.metrics[algo]
        dodge = (i - (len(shown) - 1) / 2) * 0.01  # side by side, so that the CI bars stay apart
        knob = summary.knob_label(algo)
        where = "" if summary.chosen_inside(algo) else f", over {run.settings.temperature_kl_budget:g} nats"
        kl = summary.chosen_kl(algo, digits=1)
        label = f"{algo} ({knob + '; ' if knob != '–' else ''}KL {kl}{where})" if algo != "sft" else "SFT (the reference)"
        for ax, key in ((ax_win, "win"), (ax_gold, "gold")):
            ys = [est.get(f"{key}@T={t:g}") for t in temps]
            ax.errorbar(temps + dodge, [y.mean if y else np.nan for y in ys], yerr=_ci([y.ci if y else np.nan for y in ys]),
                        color=palette[algo], marker="o", ms=4, lw=1.8, capsize=2.5, label=label,
                        ls="--" if algo == "sft" else "-")
    # A 95% t interval over 3 seeds can reach past what a rate can be: the axes show the possible range
    # (win rate [0, 1]; gold around the means) and cut such bars; report.csv has their ends.
    ax_win.set_ylim(-0.02, 1.02)
    means = [e.mean for est in summary.metrics.values() for k, e in est.items() if k.startswith("gold@T=")]
    means = [m for m in means if m == m]
    if means:
        pad = 0.15 * max(max(means) - min(means), 0.05)
        ax_gold.set_ylim(min(means) - pad, max(means) + pad)
    ax_win.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax_win.set_ylabel("win rate vs the env's reference completions\n(judged by the gold reward; ties count ½)")
    ax_gold.set_ylabel(GOLD_LABEL)
    for ax in (ax_win, ax_gold):
        ax.set_xlabel("sampling temperature T")
        ax.grid(alpha=0.25)
    ax_gold.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8.5, frameon=False)
    fig.suptitle(f"Temperature robustness — each algorithm's best final point with KL ≤ "
                 f"{run.settings.temperature_kl_budget:g} nats (suite {run.suite}, env {run.env}); bars: "
                 f"{run.settings.confidence:.0%} CI", fontsize=11)
    fig.tight_layout()
    return fig


def compare_figure(runs, summaries, labels: list[str]):
    fig, ax = plt.subplots(figsize=(10, 5.8))
    palette = colors(list(dict.fromkeys(a for s in summaries for a in s.algorithms)))
    right = max([float(np.nanmax(s.points["kl"])) for s in summaries if len(s.points)] or [1.0])
    for i, (run, summary, label) in enumerate(zip(runs, summaries, labels)):
        agg = aggregate_points(summary.points, run.settings.confidence)
        for algo, color in palette.items():
            a = agg[agg["algorithm"] == algo]
            if not len(a):
                continue
            if algo == "sft":
                ax.plot(0.0, a["gold"].mean(), marker="*", ms=12, color="black", alpha=1 - 0.3 * i, ls="none",
                        label=f"SFT — {label}")
            else:
                _draw_front(ax, summary.fronts.get(algo, pd.DataFrame()), right, color, f"{algo} — {label}",
                            style=STYLES[i % len(STYLES)], band=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(GOLD_LABEL)
    ax.set_title("Fronts side by side (line style: run; each as its report measures it, mean over seeds)")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def to_bytes(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight", metadata=metadata)
    return buf.getvalue()


def close(fig) -> None:
    plt.close(fig)
