"""A DeepSpeed engine (ZeRO-0, torch AdamW, warm-up, clipping) steps exactly like plain PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_deepspeed_zero0_matches_plain_torch(tiny_env_dir):
    script = Path(__file__).with_name("ds_parity.py")
    proc = subprocess.run([sys.executable, str(script), str(tiny_env_dir / "init"), "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["engine"] == "DeepSpeedEngine"
    plain, ds = out["plain"], out["deepspeed"]
    assert len(plain) == len(ds) == 6
    for key in ("losses/dpo", "optim/grad_norm", "optim/lr", "rewards/margin"):
        assert [m[key] for m in ds] == pytest.approx([m[key] for m in plain], rel=1e-4, abs=1e-5), key
    assert [m["optim/lr"] for m in plain][:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warm-up
    assert plain[-1]["losses/dpo"] < plain[0]["losses/dpo"]
