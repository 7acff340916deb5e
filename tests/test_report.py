"""The report from parquet files alone, on a hand-made run with known numbers (tests/report_data.py):
what the tables say, that a rebuild is byte-identical, the settings it honours, cross-fitting on the
halves of the eval prompts (and the in-sample fallback of older runs), best-of-n's KL bound, paired
differences against the baseline, `prefbench report` and `prefbench compare` as a user calls them."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from bench.config import ConfigError, ReportSettings, build_dataclass
from bench.report.frontier import diff_ci
from bench.report import REPORT_FILES, load_run, summarize, write_report
from tests.report_data import BON_DUPLICATES, make_run

T_2 = 4.302653  # Student t(0.975, df = 2): three seeds


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = make_run(tmp_path_factory.mktemp("report") / "run")
    write_report(out)
    return out


def test_writes_every_report_file(run_dir):
    for name in REPORT_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (run_dir / "temperature.svg").read_bytes()[:2000]


def test_per_algorithm_numbers_and_seed_cis(run_dir):
    table = pd.read_csv(run_dir / "report.csv").set_index("algorithm")
    assert list(table.index) == ["sft", "dpo", "best-of-n"]
    dpo = table.loc["dpo"]
    # best gold with KL <= 1: the beta=1 final point, 0.70 + 0.01*seed -> 0.71 +- t * 0.01 / sqrt(3)
    # (the failed trial's 0.99 at KL 0.1 is left out)
    assert dpo["best_gold@1"] == pytest.approx(0.71)
    assert dpo["best_gold@1_ci95"] == pytest.approx(T_2 * 0.01 / math.sqrt(3), rel=1e-4)
    assert dpo["best_gold@3"] == pytest.approx(0.73) and dpo["best_gold@10"] == pytest.approx(0.81)
    # area to 1 nat, staircase floored at SFT 0.5: seed 0 = .5*.4 + .6*.4 + .7*.2 = .58; seeds 1, 2: .57, .56
    assert dpo["area@1"] == pytest.approx(0.57)
    # temperature point: beta=1 (KL 0.9 <= 3 nats); win = gold + 0.1 (1 - T) -> spread 0.1 on every seed
    assert dpo["chosen_knob"] == "beta=1"
    assert dpo["win@T=0"] == pytest.approx(0.81) and dpo["win@T=1"] == pytest.approx(0.71)
    assert dpo["temp_spread"] == pytest.approx(0.1) and dpo["temp_spread_ci95"] == pytest.approx(0.0, abs=1e-9)
    assert dpo["train_time_s"] == pytest.approx(22.0)  # two ok trials of 10 + seed seconds
    assert dpo["gao_form_pooled"] == "rl"
    bon = table.loc["best-of-n"]
    assert bon["chosen_knob"] == "n=8" and bon["gao_form_pooled"] == "bon"  # KL bound: Gao's best-of-n form
    assert bon["best_gold@1"] == pytest.approx(0.67)  # n=4: KL 0.636 nats
    assert bon["rm_accuracy"] == pytest.approx(0.81)
    assert math.isnan(table.loc["sft", "rm_accuracy"])


def test_markdown_tex_and_html_show_the_same_tables(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "| dpo | 3 | 0.710 ± 0.025 | 0.730 ± 0.025 | 0.810 ± 0.025 |" in md
    assert "![reward vs KL frontier](frontier.png)" in md
    assert "- `dpo-beta=0.1-seed0`: RuntimeError: boom" in md
    tex = (run_dir / "report.tex").read_text()
    assert tex.count("\\toprule") == 6 and tex.count("\\bottomrule") == 6  # 6 tables, online vs offline included
    assert "dpo & 3 & 0.710 $\\pm$ 0.025" in tex and "KL $\\le$ 1" in tex
    html = (run_dir / "report.html").read_text()
    assert html.count('<table class="sortable">') == 7 and html.count("data:image/png;base64,") == 2
    # the selection rule and best-of-n's bound are stated in every format
    for text in (md, tex, html):
        assert "Cross-fitted" in text and "Beirami et al. 2024" in text and "In-sample" not in text
    # every trial's params, PPO-style fairness knobs included, are in the page
    assert html.count("lr_fairness_knob") == 6 and "RuntimeError: boom" in html


def test_best_of_n_kl_is_reported_as_an_upper_bound_with_its_estimate(run_dir):
    configs = pd.read_csv(run_dir / "configs.csv")
    bon = configs[configs["algorithm"] == "best-of-n"].set_index("knob_value")
    assert (bon["kl_kind"] == "bound").all() and (configs.loc[configs["algorithm"] == "dpo", "kl_kind"] == "estimated").all()
    assert bon.loc[8.0, "kl"] == pytest.approx(math.log(8) - 7 / 8, rel=1e-5)  # the bound stays the frontier's KL
    assert bon.loc[8.0, "kl_est"] == pytest.approx(0.8 * (math.log(8) - 7 / 8), rel=1e-5) and (bon["dup_rate"] == BON_DUPLICATES).all()
    assert configs.loc[configs["algorithm"] == "dpo", "kl_est"].isna().all()
    md = (run_dir / "report.md").read_text()
    assert "| best-of-n | n=8 | 3 | 0.730 ± 0.025 | ≤ 1.20 ± 0.00 | 0.96 ± 0.00 | 0.25 ± 0.00 |" in md
    assert "a plug-in estimate of its true KL gives 0.00–0.96 nats over its n" in md
    assert "| best-of-n | n=8 | ≤ 1.20 |" in md  # the temperature table's KL at T = 1


def test_paired_differences_against_the_baseline(run_dir):
    table = pd.read_csv(run_dir / "report.csv").set_index("algorithm")
    assert (table["paired_baseline"] == "dpo").all() and math.isnan(table.loc["dpo", "delta_best_gold@1"])
    # every seed moves best-of-n and DPO alike (+0.01 per seed): 0.66 - 0.70 on each seed, nothing left to vary
    bon = table.loc["best-of-n"]
    assert bon["delta_best_gold@1"] == pytest.approx(-0.04) and bon["delta_best_gold@1_ci95"] == pytest.approx(0.0, abs=1e-9)
    seeds = summarize(load_run(run_dir)).seeds
    welch = diff_ci(*(seeds.loc[seeds["algorithm"] == a, "best_gold@1"] for a in ("dpo", "best-of-n")))
    assert welch.mean == pytest.approx(-0.04) and welch.ci > 0.02  # unpaired, the seeds' spread stays in the interval
    assert bon["delta_best_gold@1_n"] == 3
    # SFT 0.5 against DPO's 0.70 + 0.01 * seed: -0.21 +- t * 0.01 / sqrt(3)
    assert table.loc["sft", "delta_best_gold@1"] == pytest.approx(-0.21)
    assert table.loc["sft", "delta_best_gold@1_ci95"] == pytest.approx(T_2 * 0.01 / math.sqrt(3), rel=1e-4)
    md = (run_dir / "report.md").read_text()
    assert "## Paired differences vs dpo" in md and "| best-of-n | 3 | -0.040 ± 0.000 * |" in md


def test_paired_section_says_when_the_baseline_is_not_in_the_run(tmp_path):
    out = make_run(tmp_path / "run", seeds=(0, 1), config="report: {baseline: ppo}\n")
    write_report(out)
    md = (out / "report.md").read_text()
    assert "No paired comparison: the baseline ppo (report.baseline) is not in this run" in md
    assert not any(c.startswith("delta_") for c in pd.read_csv(out / "report.csv").columns)
    for bad, words in (({"baseline": ""}, "report.baseline: must name an algorithm"), ({"baseline": 3}, "report.baseline: expected")):
        with pytest.raises(ConfigError, match=words):
            build_dataclass(ReportSettings, bad, "report")


def test_best_points_are_cross_fitted_on_the_halves_of_the_eval_prompts(tmp_path):
    # DPO beta=0.25 at step 10 (KL 2, gold 0.72): 0.82 on half 0 of the prompts, 0.62 on half 1
    out = make_run(tmp_path / "run", seeds=(0,), half_gaps={(0.25, 10): 0.1})
    dpo = summarize(load_run(out)).metrics["dpo"]
    # within 3 nats half 0 picks it (0.82) and half 1 reads 0.62; half 1 picks beta=1's 0.70, half 0 reads 0.70.
    # In-sample the full sample's 0.72 would win.
    assert dpo["best_gold@3"].mean == pytest.approx((0.62 + 0.70) / 2)
    assert dpo["best_gold@1"].mean == pytest.approx(0.70)  # the point is beyond 1 nat: nothing changes there
    # area to 3: 0.5 * 0.4 + 0.6 * 0.4 + 0.7 * 1.2, then from 2 nats (0.62 + 0.70) / 2 (in-sample: 0.72)
    assert dpo["area@3"].mean == pytest.approx(0.2 + 0.24 + 0.84 + 0.66)
    # one seed: the CI is the normal one on the two selected points' standard errors, sqrt((0.01² + 0.01²) / 2)
    assert dpo["best_gold@3"].ci == pytest.approx(1.959964 * 0.01, rel=1e-5)


def test_temperature_point_is_chosen_on_one_half_and_read_on_the_other(tmp_path):
    # the final beta=0.25 point (KL 5, gold 0.8) is 1.0 on half 0 and 0.6 on half 1, at every temperature
    out = make_run(tmp_path / "run", seeds=(0,), half_gaps={(0.25, 20): 0.2}, config="report: {temperature_kl_budget: 6}\n")
    summary = summarize(load_run(out))
    # half 0 chooses beta=0.25 (1.0 > 0.7), half 1 chooses beta=1 (0.7 > 0.6)
    assert [c.knob_value for c in summary.chosen["dpo"]] == [0.25, 1.0]
    assert summary.knob_label("dpo") == "beta=0.25 / beta=1" and summary.chosen_kl("dpo") == "5.00 / 0.80"
    dpo = summary.metrics["dpo"]
    # win rate at T=1: half 1 of beta=0.25 (0.6) and half 0 of beta=1 (0.7); at T=0 both 0.1 higher
    assert dpo["win@T=1"].mean == pytest.approx(0.65) and dpo["win@T=0"].mean == pytest.approx(0.75)
    assert dpo["gold@T=1"].mean == pytest.approx(0.65) and dpo["temp_spread"].mean == pytest.approx(0.1)
    md = write_report(out).read_text()
    assert "| dpo | beta=0.25 / beta=1 | 5.00 / 0.80 | 0.750 ± 0.039 |" in md


def test_a_run_without_half_columns_is_reported_in_sample_and_says_so(tmp_path):
    new, old = make_run(tmp_path / "new"), make_run(tmp_path / "old", old=True)
    for out in (new, old):
        write_report(out)
    # equal halves give exactly the in-sample numbers: the two reports agree on every number
    a, b = (pd.read_csv(out / "report.csv").set_index("algorithm") for out in (new, old))
    assert (a["selection"] == "crossfit").all() and (b["selection"] == "in-sample").all()
    numbers = [c for c in a.columns if c not in ("selection", "suite", "env", "chosen_knob", "gao_form_pooled", "paired_baseline")]
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=False, rtol=1e-12, atol=1e-12)
    assert b.loc["best-of-n", "gao_form_pooled"] == "bon"  # "analytic", the old name of the bound
    for name in ("report.md", "report.tex", "report.html"):
        text = (old / name).read_text()
        assert "In-sample" in text and "no half-sample columns" in text and "Cross-fitted" not in text, name
    md = (old / "report.md").read_text()
    assert "KL est." not in md and "| best-of-n | n=8 | 3 | 0.730 ± 0.025 | ≤ 1.20 ± 0.00 | 0.730 ± 0.025 |" in md


def test_online_vs_offline_view_lists_families_and_query_costs(tmp_path):
    """The families table: algorithms ordered by family (the reference, offline pairs, on-policy,
    sampling), the frontier's best gold per budget, the queries each trial trained on (a range when
    trials differ), best-of-n's n scores per prompt at inference; a run from before families has no
    such table."""
    out = make_run(tmp_path / "run")
    trials = pd.read_parquet(out / "trials.parquet")
    trials.loc[trials["algorithm"] == "dpo", "family"] = "on-policy, reward model"  # pretend DPO were online
    trials.loc[trials["trial_id"] == "dpo-beta=1.0-seed0", "rm_queries"] = 19_200
    trials.loc[trials["trial_id"].str.startswith("dpo-beta=1.0-seed") & (trials["seed"] > 0), "rm_queries"] = 9_600
    trials.loc[trials["trial_id"].str.startswith("dpo-beta=0.25"), "rm_queries"] = 9_600
    trials.to_parquet(out / "trials.parquet", index=False)
    md = write_report(out).read_text()
    section = md.split("## Online vs offline")[1].split("## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[:2] for r in rows] == [["| reference", "sft"], ["| on-policy, reward model", "dpo"],
                                                  ["| sampling", "best-of-n"]]
    assert rows[1].endswith("| 9,600–19,200 | 0 | 0 |")
    assert rows[2].endswith("| 0 | 0 | 1–8 |")
    summary = summarize(load_run(out))
    best = summary.metrics["dpo"]["best_gold@1"]
    assert f"| {best.mean:.3f} ± {best.ci:.3f} |" in rows[1]
    old = make_run(tmp_path / "old", old=True)
    assert "Online vs offline" not in write_report(old).read_text()


def test_rebuild_from_parquet_is_identical(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("evals.parquet", "trials.parquet"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    write_report(copy)
    for name in REPORT_FILES:
        assert (copy / name).read_bytes() == (run_dir / name).read_bytes(), name


def test_report_settings_come_from_the_runs_config(tmp_path):
    out = make_run(tmp_path / "run", config="name: synthetic\nreport:\n  kl_budgets: [6, 0.5]\n  temperature_kl_budget: 6\n")
    summary = summarize(load_run(out))
    assert load_run(out).settings.kl_budgets == [0.5, 6.0]
    assert {"best_gold@0.5", "best_gold@6"} <= set(summary.metrics["dpo"])
    assert [c.knob_value for c in summary.chosen["dpo"]] == [0.25, 0.25]  # KL 5.1 is within 6 nats and has more reward
    # nothing within the budget: the least divergent point, flagged (on both halves)
    tight = make_run(tmp_path / "tight", seeds=(0,), config="report: {temperature_kl_budget: 0.1}\n")
    assert summarize(load_run(tight)).chosen["dpo"] == ((1.0, pytest.approx(0.8), False),) * 2


def test_report_command(tmp_path, capsys):
    out = make_run(tmp_path / "run", seeds=(0,))
    proc = cli("report", out, "--kl-budgets", "2,0.5", "--temperature-kl-budget", "6", "--baseline", "best-of-n")
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(out / "report.csv").set_index("algorithm")
    assert {"best_gold@0.5", "best_gold@2"} <= set(csv.columns) and csv.loc["dpo", "chosen_knob"] == "beta=0.25"
    # within 0.5 nats DPO's 0.60 (KL 0.4) against best-of-n's 0.58 (n=2, 0.19 nats); one seed: no CI
    assert csv.loc["dpo", "delta_best_gold@0.5"] == pytest.approx(0.02) and math.isnan(csv.loc["dpo", "delta_best_gold@0.5_ci95"])
    # one seed: the evaluation's own standard error gives the interval (1.96 * 0.01)
    assert csv.loc["dpo", "best_gold@2_ci95"] == pytest.approx(0.0196, rel=1e-3)
    for args, words in (((tmp_path / "missing",), "no evals.parquet"), ((out, "--kl-budgets", "a,b"), "--kl-budgets"),
                        ((out, "--kl-budgets", "-1"), "report.kl_budgets"), ((out, "--temperature-kl-budget", "0"), "temperature_kl_budget"),
                        ((out, "--baseline", ""), "report.baseline")):
        code, err = _main(capsys, "report", *args)  # in process: the user errors need no interpreter of their own
        assert code == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "evals.parquet").write_bytes(b"PAR1 truncated")
    (tmp_path / "broken" / "trials.parquet").write_bytes(b"")
    code, err = _main(capsys, "report", tmp_path / "broken")
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def _main(capsys, *args) -> tuple[int, str]:
    """`prefbench ARGS` in this process (bench.cli.main, as the console script calls it): (exit code, stderr)."""
    from bench.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def test_compare_puts_runs_side_by_side_with_welch_differences(tmp_path):
    base = make_run(tmp_path / "base")
    better = make_run(tmp_path / "better", dpo_shift=0.05)
    dest = tmp_path / "cmp"
    proc = cli("compare", base, better, "--out", dest)
    assert proc.returncode == 0, proc.stderr
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    dpo = lines[("dpo", "best gold reward, KL ≤ 1")]
    # shifted by 0.05, seeds independent (unpaired): Welch se = sqrt(2 * 0.01^2 / 3), df = 4, t = 2.776 -> 0.023
    assert "| 0.710 ± 0.025 | 0.760 ± 0.025 | 0.050 ± 0.023 * |" in dpo
    assert "| 0.000 ± 0.023 |" in lines[("best-of-n", "best gold reward, KL ≤ 1")]  # nothing changed: no star
    # within each run, paired per seed against DPO: best-of-n 0.04 below it in base, 0.09 below the better DPO
    assert "| -0.040 ± 0.000 * | -0.090 ± 0.000 * |" in lines[("best-of-n", "Δ best gold reward, KL ≤ 1")]
    assert "per seed, algorithm − baseline (base: dpo, better: dpo" in proc.stdout
    for name in ("compare.md", "compare.csv", "compare_frontier.png", "compare_frontier.svg"):
        assert (dest / name).is_file(), name
    assert (dest / "compare.md").read_text() == proc.stdout
    proc = cli("compare", base, tmp_path / "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
