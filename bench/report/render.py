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

from bench.report.frontier import Estimate, FORMS

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


def starred(e: Estimate | None, digits: int = 3) -> Cell:
    """fmt(e) with " *" where its CI excludes 0."""
    text, value = fmt(e, digits)
    return (text + " *", value) if e is not None and e.ci == e.ci and abs(e.mean) > e.ci else (text, value)


BOUND_NOTE = ("Best-of-n's KL is the upper bound log n − (n−1)/n on KL(π_bon‖π_ref) (Beirami et al. 2024, "
              "\"Theoretical guarantees on the best-of-n alignment policy\"), not its exact KL; the frontier keeps "
              "best-of-n at the bound, which is conservative for best-of-n")


def selection_rule(summary) -> str:
    """How the best points were selected and scored: cross-fitted, or in-sample for a run without halves."""
    if summary.crossfit:
        return ("Cross-fitted against the winner's curse of picking the best of many noisy points (and algorithms "
                "have different numbers of them): the evaluation prompts are split in two halves (even / odd "
                "index); a point is selected on one half (highest gold reward with that half's KL ≤ B, ties by "
                "least KL) and its gold reward read on the other half, the two directions averaged. The area is "
                "the integral from 0 to B of that same cross-fitted staircase (KL clipped at 0, floored at the "
                "SFT reward, whose value on each half comes from its own halves). Cross-fitted values need not grow "
                "with B: a larger budget can admit a point that is best on one half only.")
    return ("In-sample: this run's evals.parquet has no half-sample columns (written before cross-fitting), so "
            "each best point is selected and scored on the same full evaluation (KL clipped at 0 in the areas) — "
            "optimistic, the more so the more candidate points an algorithm has.")


def _estimate_range(configs: pd.DataFrame) -> str:
    """ "; plug-in estimate of its true KL: a–b nats over its n" where configs has kl_est for bound rows."""
    if not len(configs) or "kl_est" not in configs:
        return ""
    est = [r["kl_est"].mean for _, r in configs.iterrows() if r["kl_kind"] == "bound" and r["kl_est"].mean == r["kl_est"].mean]
    return f"; a plug-in estimate of its true KL gives {min(est):.2f}–{max(est):.2f} nats over its n (configuration table)" if est else ""


# long by nature: the report's tables in the order the report shows them, each a few lines
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
    bound = f" {BOUND_NOTE}{_estimate_range(configs)}." if summary.bound else ""
    out.append(Table(
        "frontier", "Reward vs KL frontier",
        f"Best gold reward among each algorithm's evaluations at T = 1 with KL(π‖π_ref) ≤ B nats (any knob value, "
        f"any step), and the area under its front from 0 to B (gold·nats, staircase, floored at the SFT "
        f"reward). {selection_rule(summary)}{bound} Gao et al. (2022) forms fitted per seed to (d = √KL, gold − SFT "
        f"gold, full sample): {FORMS['bon']} where KL is best-of-n's bound, {FORMS['rl']} otherwise (the plot draws "
        f"the fit to all seeds' points at once). "
        f"± is the {level} CI over seeds (Student t); with one seed, the normal CI of the evaluation's own "
        f"standard error where there is one.",
        ["algorithm", "seeds"] + [f"best gold, KL ≤ {b:g}" for b in budgets] + [f"area to {b:g}" for b in budgets]
        + ["Gao form", "α", "β", "R²"], rows))

    rows = []
    for algo, m in summary.metrics.items():
        if algo not in summary.chosen:
            continue
        knob = summary.knob_label(algo) + ("" if summary.chosen_inside(algo) else " (over budget)")
        kl = sum(c.kl for c in summary.chosen[algo]) / 2
        rows.append([_plain(algo), _plain(knob), (summary.chosen_kl(algo), kl)]
                    + [fmt(m.get(f"win@T={t:g}")) for t in summary.temps] + [fmt(m.get("temp_spread"))]
                    + [fmt(m.get(f"gold@T={t:g}")) for t in (summary.temps[0], summary.temps[-1])])
    t0, t1 = summary.temps[0] if summary.temps else 0, summary.temps[-1] if summary.temps else 1
    out.append(Table(
        "temperature", "Temperature robustness",
        f"Each algorithm at its chosen point: the knob value whose final evaluation (mean over seeds) has the highest "
        f"gold reward at T = 1 with KL ≤ {s.temperature_kl_budget:g} nats (else its least divergent one, marked), "
        + ("selected on one half of the evaluation prompts and read on the other, both directions averaged "
           "(\"a / b\": the two halves chose differently). " if summary.crossfit else
           "selected in-sample (this run has no half-sample columns). ") +
        f"KL at T = 1: the full-sample mean (≤: best-of-n's bound). "
        f"Win rate against the env's reference completions, judged by the gold reward (ties ½), at each sampling "
        f"temperature; spread = max − min of the win rate over temperatures (per seed, then averaged). ± {level} CI.",
        ["algorithm", "chosen point", "KL at T=1"] + [f"win T={t:g}" for t in summary.temps] + ["spread"]
        + [f"gold T={t0:g}", f"gold T={t1:g}"], rows))

    out.append(paired_table(summary))

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

    if "family" in run.trials and run.trials["family"].fillna("").ne("").any():
        out.append(family_table(summary))

    rows = []
    temp_cols = [c for c in configs.columns if c.startswith("gold@T=")] if len(configs) else []
    estimated = bool(len(configs)) and any(r["kl_est"].mean == r["kl_est"].mean for _, r in configs.iterrows())
    for _, r in configs.iterrows():
        knob = f"{r['knob']}={r['knob_value']:g}" if r["knob"] and r["knob_value"] == r["knob_value"] else "–"
        kl_text, kl_value = fmt(r["kl"], 2)
        kl = ("≤ " + kl_text if r["kl_kind"] == "bound" and kl_value == kl_value else kl_text, kl_value)
        rows.append([_plain(r["algorithm"]), _plain(knob, _num(r["knob_value"]) if knob != "–" else knob),
                     _plain(str(r["seeds"]), r["seeds"]), fmt(r["gold"]), kl]
                    + ([fmt(r["kl_est"], 2), fmt(r["dup_rate"], 2)] if estimated else [])
                    + [fmt(r["win"]), (f"{r['gen_len']:.1f}", r["gen_len"])] + [fmt(r[c]) for c in temp_cols])
    out.append(Table(
        "configs", "Every configuration (final evaluation)",
        "Each algorithm × knob value at the end of training: gold reward, KL (nats, k1 estimate; ≤: best-of-n's "
        "upper bound log n − (n−1)/n) and win rate at T = 1, mean completion length (tokens), gold reward at each "
        "temperature."
        + (" KL est.: a plug-in estimate of best-of-n's true KL; duplicates: the share of its N samples per prompt "
           "that duplicate another sample of the same prompt (the more there are, the more the bound overstates "
           "the KL)." if estimated else "")
        + f" ± {level} CI over seeds (one seed: the evaluation's standard error, clustered by prompt, × 1.96).",
        ["algorithm", "knob", "seeds", "gold (T=1)", "KL (nats)"] + (["KL est. (nats)", "duplicates"] if estimated else [])
        + ["win rate (T=1)", "length"] + [c.replace("gold@", "gold ") for c in temp_cols], rows))
    return out


# the families of algorithms.interface.FAMILIES, in the order the view lists them (the report imports no registry)
FAMILY_ORDER = ("reference", "offline pairs", "on-policy, reward model", "on-policy, gold", "sampling", "other")


def _queries(trials: pd.DataFrame, col: str) -> Cell:
    """Mean queries per trial of one algorithm (a range when its trials differ), "–" when none recorded."""
    q = pd.to_numeric(trials[col], errors="coerce").dropna() if col in trials else pd.Series(dtype=float)
    if not len(q):
        return ("–", float("nan"))
    lo, hi = int(q.min()), int(q.max())
    return (f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}", float(q.mean()))


def family_table(summary) -> Table:
    """The online-vs-offline view: each algorithm's family, its frontier numbers and what it cost in
    reward-model and gold queries."""
    run, s = summary.run, summary.run.settings
    budgets, level = s.kl_budgets, f"{s.confidence:.0%}"
    ok = run.trials[run.trials["status"] == "ok"]
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    fam = {a: (g["family"].dropna().iloc[0] if g["family"].notna().any() else "") for a, g in ok.groupby("algorithm")}
    order = sorted(summary.metrics, key=lambda a: (rank.get(fam.get(a, ""), len(rank)), list(summary.metrics).index(a)))
    rows = []
    for algo in order:
        m, trials = summary.metrics[algo], ok[ok["algorithm"] == algo]
        if fam.get(algo) == "sampling" and trials["knob"].notna().any():  # best-of-n: n scores per prompt, per point
            ns = run.evals.loc[run.evals["algorithm"] == algo, "knob_value"].dropna()
            inference = (f"{ns.min():g}–{ns.max():g}" if len(ns) else "–", float(ns.max()) if len(ns) else float("nan"))
        else:
            inference = ("0", 0.0)
        rows.append([_plain(fam.get(algo) or "–"), _plain(algo)] + [fmt(m.get(f"best_gold@{b:g}")) for b in budgets]
                    + [fmt(m.get(f"area@{budgets[-1]:g}")), _queries(trials, "rm_queries"), _queries(trials, "gold_queries"),
                       inference])
    return Table(
        "families", "Online vs offline",
        "Every algorithm by family, read off what it declares (algorithms.interface.family): offline pairs "
        "trains on the env's preference pairs (labelled by the gold reward once, when the env was built; the "
        "reward model learns from the same pairs); on-policy trains on its own samples of the train prompts, "
        "scored by the learned reward model, or by the gold reward (an oracle, not a fair competitor); sampling "
        "trains nothing and reranks reference samples. Best gold and area as in the frontier table. Queries: "
        "samples scored by the learned reward model (RM) or the gold reward while training, per trial (not "
        "the evaluator's, which is the same for all; not the reference's score statistics, computed once per "
        "env and shared); at inference, the RM scores per prompt each point needs (best-of-n: n). "
        f"± {level} CI over seeds.",
        ["family", "algorithm"] + [f"best gold, KL ≤ {b:g}" for b in budgets] + [f"area to {budgets[-1]:g}"]
        + ["RM queries (train)", "gold queries (train)", "RM queries per prompt (inference)"], rows)


def paired_table(summary) -> Table:
    """Per algorithm, Δ vs the baseline (per seed, then over seeds) of best gold and area per KL budget."""
    s = summary.run.settings
    budgets, base = s.kl_budgets, s.baseline
    rows = []
    for algo, m in summary.paired.items():
        n = m[f"best_gold@{budgets[0]:g}"].n
        rows.append([_plain(algo), _plain(str(n), n)] + [starred(m.get(f"best_gold@{b:g}")) for b in budgets]
                    + [starred(m.get(f"area@{b:g}")) for b in budgets])
    if summary.paired or base in summary.metrics:
        note = (f"Per seed, algorithm − {base} (the baseline, report.baseline) of the best gold reward with KL ≤ B "
                f"and of the area to B, as in the frontier table; the seeds share env, preference pairs and reward "
                f"model, so the difference is taken per seed and ± is the {s.confidence:.0%} Student-t CI over the "
                f"seed differences (n − 1 df; one seed: no CI); * where it excludes 0. Narrower than the two "
                f"unpaired CIs of the frontier table where the algorithms move together across seeds.")
    else:
        note = (f"No paired comparison: the baseline {base} (report.baseline) is not in this run; set "
                f"report.baseline (or --baseline) to one of {', '.join(summary.metrics) or '–'}.")
    return Table("paired", f"Paired differences vs {base}", note,
                 ["algorithm", "seeds"] + [f"Δ best gold, KL ≤ {b:g}" for b in budgets]
                 + [f"Δ area to {b:g}" for b in budgets], rows)


# ---- markdown ------------------------------------------------------------------------------------------


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(c[0] for c in row) + " |" for row in t.rows]
    return lines


def _headline(summary) -> str:
    run = summary.run
    ok = int((run.trials["status"] == "ok").sum())
    seeds = sorted(int(x) for x in run.trials["seed"].unique()) if len(run.trials) else []
    selection = ("best points cross-fitted on two halves of the eval prompts (selected on one, scored on the other)"
                 if summary.crossfit else "best points selected in-sample (no half-sample columns in this run)")
    return (f"{ok}/{len(run.trials)} trials ok, seeds {', '.join(map(str, seeds)) or '–'}; {len(run.evals)} evaluation "
            f"rows. KL is KL(π‖π_ref) in nats per sequence (k1 estimate; best-of-n: the upper bound log n − (n−1)/n); "
            f"gold reward is the env's, mean per completion; {selection}.")


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
        row["selection"] = "crossfit" if summary.crossfit else "in-sample"
        row["paired_baseline"] = summary.run.settings.baseline
        for key, e in summary.paired.get(algo, {}).items():  # Δ vs the baseline, per seed then over seeds
            row[f"delta_{key}"] = e.mean
            row[f"delta_{key}_ci95" if summary.run.settings.confidence == 0.95 else f"delta_{key}_ci"] = e.ci
            row[f"delta_{key}_n"] = e.n
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
        "²": r"$^2$", "√": r"$\surd$", "½": r"$\frac{1}{2}$", "×": r"$\times$", "→": r"$\to$",
        "Δ": r"$\Delta$", "—": "---"}


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
    from bench.report.measure import params_of

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


def compare_markdown(labels: list[str], rows: list[dict], runs, paired: list[dict] = ()) -> str:
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
            cells.append(starred(d)[0] if d is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences vs each run's baseline", ""]
    bases = ", ".join(f"{name}: {run.settings.baseline}" for name, run in zip(labels, runs))
    missing = [name for name, run in zip(labels, runs) if not (run.evals["algorithm"] == run.settings.baseline).any()]
    lines += [f"Within each run, per seed, algorithm − baseline ({bases}; the seeds share env, pairs and reward "
              f"model), mean ± {level} Student-t CI over the seed differences; * where it excludes 0."
              + (f" The baseline is not in {', '.join(missing)}: no paired comparison there." if missing else ""), ""]
    if paired:
        lines += ["| " + " | ".join(["algorithm", "metric"] + labels) + " |", "|" + "---|" * (len(labels) + 2)]
        lines += ["| " + " | ".join([row["algorithm"], row["metric"]]
                                    + [starred(row[name])[0] for name in labels]) + " |" for row in paired]
    else:
        lines.append("(none)")
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
