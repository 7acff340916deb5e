"""`python -m bench.tools.gpu_check`: its CPU dry run passes end to end, and without CUDA it stops with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def gpu_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.tools.gpu_check", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = gpu_check("--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "prefbench gpu_check: no CUDA device (torch.cuda.is_available() is False); use --device cpu for a dry run"
    ]
    assert proc.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--zero-stages", "4"], "ZeRO stage must be 0, 1, 2 or 3"),
    (["--device", "cpu", "--n-embd", "30", "--n-head", "4"], "--n-embd (30) must be divisible by --n-head (4)"),
    (["--device", "cpu", "--skip-suite", "--skip-throughput"], "leave nothing to check"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    proc = gpu_check(*args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefbench gpu_check: ") and message in lines[0], proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_checks_zero3_through_both_parts(tmp_path, e2e_cache):
    """The check's whole path on CPU for one stage, ZeRO-3 (the one that shards: its loop is the same
    for every stage). That ZeRO-3 trains like ZeRO-0 is tests/test_deepspeed.py's (in one process) and
    tests/test_e2e.py's (2 Ray workers, ZeRO-2 and 3) to show; one stage here halves the test."""
    out = tmp_path / "gpu_check.json"
    tiny_throughput = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--prompts", "8", "--samples", "2",
                       "--max-new-tokens", "8", "--pairs", "4", "--repeats", "2"]
    # the shipped suite without DPO (its steps are timed in part B): PPO trains and samples rollouts in a
    # Ray Train worker, the SFT baseline runs in the Tune trial process. Its env and reward model are
    # the e2e suite's: from the session's shared cache when tests/test_e2e.py ran first (as in CI)
    tiny_suite = [f"--suite-set={s}" for s in (
        "eval.num_prompts=16", "eval.samples_per_prompt=2",
        "algorithms=[{name: ppo, train: {steps: 2, eval_every: 2}, sweep: {kl_coef: [0.1]}}]")]
    proc = gpu_check("--device", "cpu", "--zero-stages", "3", *tiny_throughput, *tiny_suite, "--cache-dir", str(e2e_cache),
                     "--work-dir", str(tmp_path / "work"), "--json", str(out), "--time-budget", "1700",
                     "--suite-timeout", "900", "--throughput-timeout", "300", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == []
    assert [s["zero_stage"] for s in report["stages"]] == [3]
    for stage in report["stages"]:
        tp, suite = stage["throughput"], stage["suite"]
        assert tp["ok"] and tp["gen_tokens_per_s"] > 0 and tp["train_tokens_per_s"] > 0 and tp["peak_memory_gib"] > 0
        assert tp["engine"] == "DeepSpeedEngine" and tp["dtype"] == "float32"
        assert tp["zero3_partitioned"]  # ZeRO-3 really sharded the parameters
        assert suite["ok"] and suite["returncode"] == 0
        trials = suite["trials"]
        assert {t["algorithm"] for t in trials.values()} == {"sft", "ppo"}
        assert all(t["status"] == "ok" for t in trials.values()), trials
        assert all(0 <= t["gold_reward_t1"] <= 1 for t in trials.values())
    # the table names each stage and the verdict
    assert "RESULT: PASS" in proc.stdout
    assert "ppo-kl_coef=0.1-seed0" in proc.stdout
