"""DeepSpeed engine (ZeRO-0, torch AdamW, warm-up, clipping) steps exactly like plain PyTorch.

Forked: DeepSpeed allows one initialisation per process.
"""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
import torch

from algorithms.dpo import DPO, DPOParams
from algorithms.interface import EnvData, TrainContext, TrainSettings, plain_optimizer
from algorithms.policy import Policy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dpo_losses(policy: Policy, optimize, train: TrainSettings) -> list[float]:
    pairs = pd.DataFrame({
        "prompt": ["the movie was", "i loved the", "the plot was", "overall it was"] * 2,
        "chosen": ["very good .", "film .", "great .", "wonderful ."] * 2,
        "rejected": ["very bad .", "music .", "awful .", "boring ."] * 2,
    })
    logs: list[dict] = []
    ctx = TrainContext(
        policy=policy, reference=policy.frozen_copy(), params=DPOParams(beta=0.5), train=train,
        data=EnvData([], [], pairs, pd.DataFrame()), optimize=optimize,
        evaluate=lambda *a, **k: {}, log=lambda step, m: logs.append(m),
    )
    DPO().train(ctx)
    return [m["losses/dpo"] for m in logs], [m["optim/grad_norm"] for m in logs]


@pytest.mark.forked
def test_deepspeed_zero0_matches_plain_torch(tiny_env_dir):
    from bench.config import DeepSpeedSettings
    from bench.worker import wrap_with_deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    train = TrainSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=3, max_grad_norm=0.5, eval_every=100)
    torch.manual_seed(0)
    plain = Policy.from_pretrained(tiny_env_dir / "init")
    plain_losses, plain_norms = _dpo_losses(plain, plain_optimizer(plain, train), train)
    ds = Policy.from_pretrained(tiny_env_dir / "init")
    ds_losses, ds_norms = _dpo_losses(ds, wrap_with_deepspeed(ds, train, DeepSpeedSettings(zero_stage=0), 1), train)
    assert ds.engine is not None
    assert ds_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    assert ds_norms == pytest.approx(plain_norms, rel=1e-4, abs=1e-5)
    assert plain_losses[-1] < plain_losses[0]
