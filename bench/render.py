"""The report's tables in every format: markdown, CSV, LaTeX (booktabs) and one self-contained HTML page
(plots embedded, sortable tables, every trial's params). Numbers come from `bench.report`; this
module only lays them out.
"""

from __future__ import annotations

import base64
import html as htmllib
import io
import json
import math
from dataclasses import dataclass

import pandas as pd

from bench.frontier import FORMS, Estimate

Cell = tuple[str, float | str]  # (text shown, value sorted by)


@dataclass
class Table:
    key: str
    title: str
    note: str
    header: list[str]
    rows: list[list[Cell]]


def _num(x) -> float:
    return float(x) if x is not None and x == x else float("nan")


def fmt(e: Estimate | None, digits: int = 3) -> Cell:
    if e is None or e.mean != e.mean:
        return ("–", float("nan"))
    text = f"{e.mean:.{digits}f}" + (f" ± {e.ci:.{digits}f}" if e.ci == e.ci else "")
    return (text, e.mean)


def _plain(text: str, value=None) -> Cell:
    return (text, text if value is None else value)


def tables(summary, configs: pd.DataFrame) -> list[Table]:
    run, s = summary.run, summary.run.settings
    level = f"{s.confidence:.0%}"
    budgets = s.kl_budgets
    out = []

    rows = []
    for algo, m in summary.metrics.items():
        fit = summary.fits.get(algo)
        form = fit.form if fit else "–"
        rows.append([_plain(algo), _plain(str(m[f"best_gold@{budgets[0]:g}"].n), m[f"best_gold@{budgets[0]:g}"].n)]
                    + [fmt(m.get(f"best_gold@{b:g}")) for b in budgets]
                    + [fmt(m.get(f"area@{b:g}")) for b in budgets]
                    + [_plain(form), fmt(m.get("gao_alpha")), fmt(m.get("gao_beta")), fmt(m.get("gao_r2"), 2)])
    out.append(Table(
        "frontier", "Reward vs KL frontier",
        f"Best gold reward among each algorithm's evaluations at T = 1 with KL(π‖π_ref) ≤ B nats (any knob value, "
        f"any step), and the area under its Pareto front from 0 to B (gold·nats, staircase, floored at the SFT "
        f"reward). Gao et al. (2022) forms fitted per seed to (d = √KL, gold − SFT gold): {FORMS['bon']} where KL is "
        f"analytic (best-of-n), {FORMS['rl']} otherwise (the plot draws the fit to all seeds' points at once). "
        f"± is the {level} CI over seeds (Student t); with one seed, the normal CI of the evaluation's own "
        f"standard error where there is one.",
        ["algorithm", "seeds"] + [f"best gold, KL ≤ {b:g}" for b in budgets] + [f"area to {b:g}" for b in budgets]
        + ["Gao form", "α", "β", "R²"], rows))

    rows = []
    for algo, m in summary.metrics.items():
        if algo not in summary.chosen:
            continue
        _, kl, inside = summary.chosen[algo]
        knob = summary.knob_label(algo) + ("" if inside else " (over budget)")
        rows.append([_plain(algo), _plain(knob), (f"{kl:.2f}", kl)]
                    + [fmt(m.get(f"win@T={t:g}")) for t in summary.temps] + [fmt(m.get("temp_spread"))]
                    + [fmt(m.get(f"gold@T={t:g}")) for t in (summary.temps[0], summary.temps[-1])])
    t0, t1 = summary.temps[0] if summary.temps else 0, summary.temps[-1] if summary.temps else 1
    out.append(Table(
        "temperature", "Temperature robustness",
        f"Each algorithm at its chosen point: the knob value whose final evaluation (mean over seeds) has the highest "
        f"gold reward at T = 1 with KL ≤ {s.temperature_kl_budget:g} nats (else its least divergent one, marked). "
        f"Win rate against the env's reference completions, judged by the gold reward (ties ½), at each sampling "
        f"temperature; spread = max − min of the win rate over temperatures (per seed, then averaged). ± {level} CI.",
        ["algorithm", "chosen point", "KL at T=1"] + [f"win T={t:g}" for t in summary.temps] + ["spread"]
        + [f"gold T={t0:g}", f"gold T={t1:g}"], rows))

    rows = []
    for algo, m in summary.metrics.items():
        trials = run.trials[run.trials["algorithm"] == algo]
        ok = int((trials["status"] == "ok").sum())
        rows.append([_plain(algo), (f"{ok}/{len(trials)}", ok), fmt(m.get("train_time_s"), 1), fmt(m.get("rm_accuracy"))])
    out.append(Table(
        "cost", "Cost and reward model",
        f"Trials ok; training time of all the algorithm's trials of one seed (seconds, without evaluation; "
        f"best-of-n: sampling and scoring); held-out pair accuracy of the learned reward model where the algorithm "
        f"uses one. ± {level} CI over seeds.",
        ["algorithm", "trials ok", "train time (s per seed)", "RM accuracy"], rows))

    rows = []
    temp_cols = [c for c in configs.columns if c.startswith("gold@T=")] if len(configs) else []
    for _, r in configs.iterrows():
        knob = f"{r['knob']}={r['knob_value']:g}" if r["knob"] and r["knob_value"] == r["knob_value"] else "–"
        rows.append([_plain(r["algorithm"]), _plain(knob, _num(r["knob_value"]) if knob != "–" else knob),
                     _plain(str(r["seeds"]), r["seeds"]), fmt(r["gold"]), fmt(r["kl"], 2), fmt(r["win"]),
                     (f"{r['gen_len']:.1f}", r["gen_len"])] + [fmt(r[c]) for c in temp_cols])
    out.append(Table(
        "configs", "Every configuration (final evaluation)",
        f"Each algorithm × knob value at the end of training: gold reward, KL (nats, k1 estimate) and win rate at "
        f"T = 1, mean completion length (tokens), gold reward at each temperature. ± {level} CI over seeds "
        f"(one seed: the evaluation's standard error, clustered by prompt, × 1.96).",
        ["algorithm", "knob", "seeds", "gold (T=1)", "KL (nats)", "win rate (T=1)", "length"]
        + [c.replace("gold@", "gold ") for c in temp_cols], rows))
    return out


# ---- markdown ------------------------------------------------------------------------------------------


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(c[0] for c in row) + " |" for row in t.rows]
    return lines


def _headline(summary) -> str:
    run = summary.run
    ok = int((run.trials["status"] == "ok").sum())
    seeds = sorted(int(x) for x in run.trials["seed"].unique()) if len(run.trials) else []
    return (f"{ok}/{len(run.trials)} trials ok, seeds {', '.join(map(str, seeds)) or '–'}; {len(run.evals)} evaluation "
            f"rows. KL is KL(π‖π_ref) in nats per sequence (k1 estimate; best-of-n: analytic); gold reward is the "
            f"env's, mean per completion.")


def markdown(summary, tables_: list[Table]) -> str:
    run = summary.run
    lines = [f"# prefbench report: suite `{run.suite}`, env `{run.env}`", "", _headline(summary), "",
             "![reward vs KL frontier](frontier.png)", "", "![temperature robustness](temperature.png)", ""]
    for t in tables_:
        lines += [f"## {t.title}", "", t.note, ""]
        lines += _md_table(t) if t.rows else ["(none)"]
        lines.append("")
    failed = run.trials[run.trials["status"] != "ok"]
    if len(failed):
        lines += ["## Failed trials (left out of every table and plot)", ""]
        lines += [f"- `{r.trial_id}`: {r.reason}" for r in failed.itertuples()]
        lines.append("")
    times = run.trials.dropna(subset=["wall_time_s"])
    if len(times):
        lines += [f"Trial wall time: median {times['wall_time_s'].median():.0f} s, training (without evaluation) "
                  f"median {times['train_time_s'].median():.0f} s. Files: report.csv (per algorithm), configs.csv "
                  "(per configuration), report.tex, report.html, frontier/temperature .png and .svg.", ""]
    return "\n".join(lines)


# ---- CSV ------------------------------------------------------------------------------------------------


def summary_csv(summary) -> str:
    """One row per algorithm: every metric's mean, CI half-width and number of seeds behind it."""
    rows = []
    for algo, metrics in summary.metrics.items():
        row = {"suite": summary.run.suite, "env": summary.run.env, "algorithm": algo,
               "chosen_knob": summary.knob_label(algo)}
        for key, e in metrics.items():
            row[key] = e.mean
            row[f"{key}_ci95" if summary.run.settings.confidence == 0.95 else f"{key}_ci"] = e.ci
            row[f"{key}_n"] = e.n
        fit = summary.fits.get(algo)
        row["gao_form_pooled"], row["gao_r2_pooled"] = (fit.form, fit.r2) if fit else ("", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False, float_format="%.6g")


def configs_csv(configs: pd.DataFrame) -> str:
    flat = []
    for _, r in configs.iterrows():
        row = {}
        for key, value in r.items():
            if isinstance(value, Estimate):
                row[key], row[f"{key}_ci"], row[f"{key}_n"] = value.mean, value.ci, value.n
            else:
                row[key] = value
        flat.append(row)
    return pd.DataFrame(flat).to_csv(index=False, float_format="%.6g")


# ---- LaTeX (booktabs) -------------------------------------------------------------------------------

_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "≤": r"$\le$",
        "π": r"$\pi$", "‖": r"$\|$", "α": r"$\alpha$", "β": r"$\beta$", "·": r"$\cdot$", "−": "-", "–": "--",
        "²": r"$^2$", "√": r"$\surd$", "½": r"$\frac{1}{2}$", "×": r"$\times$", "→": r"$\to$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(summary, tables_: list[Table]) -> str:
    run = summary.run
    parts = [f"% prefbench report: suite {run.suite}, env {run.env}. Needs \\usepackage{{booktabs}}.",
             f"% {tex_escape(_headline(summary))}", ""]
    for t in tables_:
        parts += ["\\begin{table}[t]", "\\centering", "\\small",
                  f"\\caption{{{tex_escape(t.title)} (suite {tex_escape(run.suite)}, env {tex_escape(run.env)}). "
                  f"{tex_escape(t.note)}}}", f"\\label{{tab:prefbench-{t.key}}}",
                  "\\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", "\\toprule",
                  " & ".join(tex_escape(h) for h in t.header) + " \\\\", "\\midrule"]
        parts += [" & ".join(tex_escape(c[0]) for c in row) + " \\\\" for row in t.rows]
        parts += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(parts)


# ---- HTML -----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.8em} p.note{color:#555;font-size:.9em;max-width:70em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} th,td{padding:.3em .6em;border-bottom:1px solid #ddd}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0} th:hover{background:#e4e4e4}
td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td:first-child{text-align:left;font-weight:600}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
img.plot{max-width:100%;border:1px solid #eee;margin:.5em 0}
details pre{background:#f8f8f8;padding:.5em;font-size:.85em;text-align:left;white-space:pre-wrap;margin:.2em 0}
td details{text-align:left}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0], rows = Array.from(body.rows);
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (isNaN(nx) - isNaN(ny)) || String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def _sort_value(v) -> str:
    if isinstance(v, (int, float)):
        return "" if isinstance(v, float) and math.isnan(v) else repr(float(v))
    return str(v)


def _html_table(header: list[str], rows: list[list[tuple[str, object]]], raw: set[int] = frozenset()) -> str:
    """rows of (content, sort value); columns in `raw` hold HTML already."""
    e = htmllib.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td data-v="{e(_sort_value(v))}">{text if i in raw else e(text)}</td>'
                         for i, (text, v) in enumerate(row)) + "</tr>\n" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def html(summary, tables_: list[Table], images: dict[str, bytes]) -> str:
    from bench.report import params_of

    run, e = summary.run, htmllib.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>prefbench report: {e(run.suite)} / {e(run.env)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>prefbench report: suite <code>{e(run.suite)}</code>, env <code>{e(run.env)}</code></h1>",
             f'<p class="note">{e(_headline(summary))} Click a column header to sort.</p>']
    for name, alt in (("frontier", "reward vs KL frontier"), ("temperature", "temperature robustness")):
        if name in images:
            data = base64.b64encode(images[name]).decode()
            parts.append(f'<img class="plot" id="plot-{name}" alt="{alt}" src="data:image/png;base64,{data}">')
    for t in tables_:
        parts += [f'<h2 id="{t.key}">{e(t.title)}</h2>', f'<p class="note">{e(t.note)}</p>',
                  _html_table(t.header, t.rows) if t.rows else "<p>(none)</p>"]
    rows = []
    trials = run.trials.set_index("trial_id")
    for trial_id, algo, status, params in params_of(run):
        t = trials.loc[trial_id]
        knob = f"{t['knob']}={t['knob_value']:g}" if isinstance(t["knob"], str) and t["knob_value"] == t["knob_value"] else "–"
        details = f"<details><summary>{len(params)} params</summary><pre>{e(json.dumps(params, indent=1, sort_keys=True))}</pre></details>"
        reason = t["reason"] if status != "ok" else ""
        rows.append([(trial_id, trial_id), (algo, algo), (str(t["seed"]), int(t["seed"])), (knob, _num(t["knob_value"])),
                     (status + (f": {reason}" if reason else ""), status),
                     (f"{_num(t['train_time_s']):.1f}", _num(t["train_time_s"])), (details, len(params))])
    parts += ['<h2 id="trials">Trials and their parameters</h2>',
              '<p class="note">Every trial of the run, failed ones included, with the full parameters it ran with '
              "(the algorithm's params dataclass after the suite's values and the sweep point).</p>",
              _html_table(["trial", "algorithm", "seed", "knob", "status", "train time (s)", "params"], rows, raw={6})]
    if run.config_text:
        parts += ['<h2 id="config">Suite configuration</h2>',
                  f"<details><summary>config.yaml as the run resolved it</summary><pre>{e(run.config_text)}</pre></details>"]
    parts += [f"<script>{_JS}</script>", "</body></html>", ""]
    return "\n".join(parts)


# ---- prefbench compare ------------------------------------------------------------------------------------


def compare_markdown(labels: list[str], rows: list[dict], runs) -> str:
    level = f"{runs[0].settings.confidence:.0%}"
    lines = ["# prefbench compare", ""]
    lines += [f"- **{name}**: {run.out} (suite `{run.suite}`, env `{run.env}`, "
              f"{int(run.trials['seed'].nunique())} seed(s), {int((run.trials['status'] == 'ok').sum())}/{len(run.trials)} trials ok)"
              for name, run in zip(labels, runs)]
    lines += ["", f"Each run: mean ± {level} CI over seeds (chosen point in brackets for the temperature metrics)."
              + (f" Δ = {labels[-1]} − {labels[0]}, Welch's t {level} CI over seeds; * where it excludes 0." if len(labels) > 1 else ""), ""]
    header = ["algorithm", "metric"] + labels + (["Δ"] if len(labels) > 1 else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["algorithm"], row["metric"]]
        for name in labels:
            text = fmt(row[name])[0]
            if row["key"].startswith(("win@", "temp_")) and row[f"{name}:knob"] != "–":
                text += f" [{row[f'{name}:knob']}]"
            cells.append(text)
        if len(labels) > 1:
            d = row.get("diff")
            text = fmt(d)[0] if d is not None else "–"
            if d is not None and d.ci == d.ci and abs(d.mean) > d.ci:
                text += " *"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_csv(labels: list[str], rows: list[dict]) -> str:
    flat = []
    for row in rows:
        out = {"algorithm": row["algorithm"], "metric": row["key"]}
        for name in labels + (["diff"] if "diff" in row else []):
            e = row.get(name)
            out[name], out[f"{name}_ci"] = (e.mean, e.ci) if e is not None else (float("nan"), float("nan"))
        flat.append(out)
    buf = io.StringIO()
    pd.DataFrame(flat).to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()
