"""A DeepSpeed engine (ZeRO 0-3, offload, torch AdamW, warm-up, clipping) steps exactly like plain PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, flags", [
    (0, []), (1, []), (2, ["offload_optimizer"]), (3, []), (3, ["offload_optimizer", "offload_param"]),
    (0, ["autocast"]),  # bf16 autocast over fp32 weights: DeepSpeed's torch_autocast = torch.autocast in plain PyTorch
    # train.micro_batch_size 1 on the DeepSpeed side (4 micro-batches a step, DeepSpeed's accumulation
    # with the boundary set by `optimize`) against whole batches in plain PyTorch
    (0, ["micro"]), (2, ["micro"]), (3, ["micro"]),
])
def test_deepspeed_zero_stages_match_plain_torch(tiny_env_dir, zero_stage, flags, tmp_path):
    # one rank: whatever ZeRO shards or offloads, the optimisation is plain AdamW + warm-up + clipping
    script = Path(__file__).with_name("ds_parity.py")
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed would JIT-build C++ ops
    proc = subprocess.run([sys.executable, str(script), str(tiny_env_dir / "init"), str(zero_stage), *flags],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["engine"] == "DeepSpeedEngine"
    assert out["train_dtypes"] == ["torch.bfloat16" if "autocast" in flags else "torch.float32"]
    assert out["param_dtypes"] == ["torch.float32"]
    # no JIT build on the way (engine.skip_shm_comm_op: the CPU shm all-reduce op took 44-68 s to build)
    assert not out["shm_comm_op"]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(p.name for p in extensions.iterdir())
    # the trained weights generate like the plain-PyTorch ones (ZeRO-3: through the gathered shards)
    assert out["sample"] == out["plain_sample"]
    plain, ds = out["plain"], out["deepspeed"]
    assert len(plain) == len(ds) == 6
    for key in ("losses/dpo", "optim/grad_norm", "optim/lr", "rewards/margin"):
        assert [m[key] for m in ds] == pytest.approx([m[key] for m in plain], rel=1e-4, abs=1e-5), key
    assert [m["optim/lr"] for m in plain][:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warm-up
    assert plain[-1]["losses/dpo"] < plain[0]["losses/dpo"]


def test_zero0_fp32_clips_itself_and_deepspeed_clips_the_rest():
    """ZeRO-0 fp32 grads are whole in p.grad: `optimize` clips them (one fused norm), so DeepSpeed must
    not clip them a second time; sharded (ZeRO >= 1) or bf16 grads are clipped by DeepSpeed."""
    from algorithms.interface import TrainSettings
    from bench.config import DeepSpeedSettings
    from bench.worker.engine import clips_itself, deepspeed_config

    train = TrainSettings(steps=1, batch_size=4, lr=1e-3, max_grad_norm=0.5)
    for stage, bf16, ours in ((0, False, True), (0, True, False), (1, False, False), (2, False, False), (3, True, False)):
        ds = DeepSpeedSettings(zero_stage=stage, bf16=bf16)
        assert clips_itself(ds) is ours
        assert ("gradient_clipping" in deepspeed_config(train, ds, 1)) is (not ours)
    no_clip = TrainSettings(steps=1, batch_size=4, lr=1e-3, max_grad_norm=0.0)
    assert "gradient_clipping" not in deepspeed_config(no_clip, DeepSpeedSettings(zero_stage=2), 1)
