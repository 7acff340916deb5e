"""`prefbench list` and `prefbench perf` (as subprocesses: perf initialises DeepSpeed once per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_list_shows_algorithms_with_knobs_and_envs():
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    dpo = next(line for line in lines if line.strip().startswith("dpo "))
    assert "knob=beta" in dpo and "needs=pairs" in dpo and "in-tree" in dpo
    assert any(line.strip().startswith("sft ") for line in lines)
    assert any(line.strip().startswith("tiny-sentiment") for line in lines[lines.index("envs:"):])


@pytest.mark.slow
def test_perf_reports_medians_and_ratios(tmp_path):
    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "perf", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DPO step  DeepSpeed-0" in proc.stdout
    numbers = json.loads(out.read_text())
    for key in ("generate_policy_s", "generate_bare_s", "score_s", "dpo_step_plain_s", "dpo_step_deepspeed_s",
                "evaluate_s", "ratio_dpo_deepspeed_vs_plain", "ratio_generate_policy_vs_bare"):
        assert numbers[key] > 0, key
    assert numbers["generate_tokens"] > 1024  # 1024 samples, at least one token each
