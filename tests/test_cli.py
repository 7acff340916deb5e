"""`prefbench list`, `run --dry-run` and user errors of the CLI: as subprocesses where the process matters
(what a dry run imports, the console entry), in this process (`bench.cli.main`) for the rest."""

from __future__ import annotations

import subprocess
import sys

from tests.cli import cli_in_process



def test_list_shows_algorithms_with_knobs_and_envs():
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0] == ["kind", "name", "knob", "needs", "origin"]
    assert ["algorithm", "dpo", "beta", "pairs", "in-tree", "(algorithms.dpo)"] in rows
    assert ["algorithm", "ppo-gt", "kl_coef", "critic,gold,prompts", "in-tree", "(algorithms.ppo)"] in rows
    assert ["algorithm", "sft", "-", "-", "in-tree", "(algorithms.sft)"] in rows
    assert ["env", "tiny-sentiment", "-", "-", "in-tree", "(envs.tiny_sentiment)"] in rows


def _main(capsys, *args) -> subprocess.CompletedProcess:
    return cli_in_process(capsys, *args)


def test_resume_needs_a_prefbench_run_with_the_same_suite(tmp_path, capsys):
    # no Ray starts for any of these: the checks come first
    missing = _main(capsys, "run", "--out", str(tmp_path / "nothing"), "--resume")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].endswith("holds no prefbench run (no config.yaml)")
    no_out = _main(capsys, "run", "--resume")
    assert no_out.returncode == 2 and "--resume needs --out" in no_out.stderr

    from bench.config import load_suite, to_yaml

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_suite(None, ["train.steps=10"])))
    other = _main(capsys, "run", "--out", str(out), "--resume", "--set", "train.steps=20")
    assert other.returncode == 2 and "differ from those of the run" in other.stderr
    fresh = _main(capsys, "run", "--out", str(out), "--set", "train.steps=10")  # not empty, a prefbench run: suggest --resume
    assert fresh.returncode == 2 and "add --resume to continue it" in fresh.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # nothing touched


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    out = tmp_path / "never"
    code = (
        "import sys; from bench.cli import main; "
        f"rc = main(['run', '--dry-run', '--out', {str(out)!r}, '--set', 'seeds=[0,1]', '--set', "
        "'cache_dir=' + sys.argv[1]]); "
        "assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules, 'dry run imported Ray/DeepSpeed'; "
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("suite quick: env tiny-sentiment, seeds [0, 1], ")
    n_trials = int(lines[0].rsplit(", ", 1)[1].split()[0])
    trial_lines = lines[lines.index("trials:") + 1 : lines.index("resources:")]
    assert len(trial_lines) == n_trials == 2 * 26  # (1 SFT + 25 quick-suite trials) x 2 seeds
    assert any("dpo-beta=0.5-seed1" in line and "150 steps x 32" in line for line in trial_lines)
    assert "  env tiny-sentiment seed 1: to build" in lines
    assert "  reward model seed 0: to train (for best-of-n, grpo, online-dpo, ppo, reinforce-pp, rloo)" in lines
    assert any(line.startswith("  per trial: 1 worker(s) x {\"CPU\": 1.0}") for line in lines)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_dry_run_still_validates_the_suite(capsys):
    bad = _main(capsys, "run", "--dry-run", "--set", "train.steps=-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "prefbench: error: train.steps: must be an integer >= 1"


def test_paper_suites_validate_with_dry_run(capsys):
    for suite in ("smol.yaml", "smol-quick.yaml", "paper-imdb.yaml", "paper-tldr.yaml"):
        proc = _main(capsys, "run", f"bench/suites/{suite}", "--dry-run")
        assert proc.returncode == 0, (suite, proc.stderr[-2000:])
        assert proc.stdout.splitlines()[-1] == "dry run: nothing was started or written"
