"""The report from parquet files alone, on a hand-made run with known numbers (tests/report_data.py):
what the tables say, that a rebuild is byte-identical, the settings it honours, `prefbench report`
and `prefbench compare` as a user calls them."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from bench.report import REPORT_FILES, load_run, summarize, write_report
from tests.report_data import make_run

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
    assert bon["chosen_knob"] == "n=8" and bon["gao_form_pooled"] == "bon"  # analytic KL: Gao's best-of-n form
    assert bon["best_gold@1"] == pytest.approx(0.67)  # n=4: KL 0.636 nats
    assert bon["rm_accuracy"] == pytest.approx(0.81)
    assert math.isnan(table.loc["sft", "rm_accuracy"])


def test_markdown_tex_and_html_show_the_same_tables(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "| dpo | 3 | 0.710 ± 0.025 | 0.730 ± 0.025 | 0.810 ± 0.025 |" in md
    assert "![reward vs KL frontier](frontier.png)" in md
    assert "- `dpo-beta=0.1-seed0`: RuntimeError: boom" in md
    tex = (run_dir / "report.tex").read_text()
    assert tex.count("\\toprule") == 4 and tex.count("\\bottomrule") == 4
    assert "dpo & 3 & 0.710 $\\pm$ 0.025" in tex and "KL $\\le$ 1" in tex
    html = (run_dir / "report.html").read_text()
    assert html.count('<table class="sortable">') == 5 and html.count("data:image/png;base64,") == 2
    # every trial's params, PPO-style fairness knobs included, are in the page
    assert html.count("lr_fairness_knob") == 6 and "RuntimeError: boom" in html


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
    assert summary.chosen["dpo"][0] == 0.25  # KL 5.1 is within 6 nats and has more reward
    # nothing within the budget: the least divergent point, flagged
    tight = make_run(tmp_path / "tight", seeds=(0,), config="report: {temperature_kl_budget: 0.1}\n")
    assert summarize(load_run(tight)).chosen["dpo"] == (1.0, pytest.approx(0.8), False)


def test_report_command(tmp_path):
    out = make_run(tmp_path / "run", seeds=(0,))
    proc = cli("report", out, "--kl-budgets", "2,0.5", "--temperature-kl-budget", "6")
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(out / "report.csv").set_index("algorithm")
    assert {"best_gold@0.5", "best_gold@2"} <= set(csv.columns) and csv.loc["dpo", "chosen_knob"] == "beta=0.25"
    # one seed: the evaluation's own standard error gives the interval (1.96 * 0.01)
    assert csv.loc["dpo", "best_gold@2_ci95"] == pytest.approx(0.0196, rel=1e-3)
    for args, words in (((tmp_path / "missing",), "no evals.parquet"), ((out, "--kl-budgets", "a,b"), "--kl-budgets"),
                        ((out, "--kl-budgets", "-1"), "report.kl_budgets"), ((out, "--temperature-kl-budget", "0"), "temperature_kl_budget")):
        proc = cli("report", *args)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "evals.parquet").write_bytes(b"PAR1 truncated")
    (tmp_path / "broken" / "trials.parquet").write_bytes(b"")
    proc = cli("report", tmp_path / "broken")
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


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
    for name in ("compare.md", "compare.csv", "compare_frontier.png", "compare_frontier.svg"):
        assert (dest / name).is_file(), name
    assert (dest / "compare.md").read_text() == proc.stdout
    proc = cli("compare", base, tmp_path / "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
