"""`python -m bench.tools.determinism` (the check run on a GPU) on CPU: the same DPO steps twice in fresh
processes give the same losses, gradient norms, weights, samples and log-probs, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # two training processes (~1 min on 2 cores): the fast tier stays under 5 min
def test_the_same_training_twice_is_identical_on_cpu(tmp_path):
    report = tmp_path / "determinism.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.tools.determinism", "--device", "cpu", "--modes", "default", "--n-layer", "2",
         "--n-embd", "64", "--steps", "4", "--pairs", "8", "--json", str(report)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert ("default       identical: losses same, grad_norms same, weights_sha same, samples_sha same, logps_sha same"
            in proc.stdout.splitlines()), proc.stdout
    runs = json.loads(report.read_text())["runs"]["default"]
    assert len(runs) == 2 and len(runs[0]["losses"]) == 4
    assert len({float.fromhex(x) for x in runs[0]["losses"]}) > 1  # training moved: the runs are not trivially equal
