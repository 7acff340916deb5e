"""Run as a script by test_deepspeed.py: DPO steps through DeepSpeed vs plain PyTorch, as JSON.

A separate process because DeepSpeed allows one initialisation per process.
Usage: python ds_parity.py INIT_POLICY_DIR ZERO_STAGE [offload_optimizer] [offload_param] [autocast] [micro]
(autocast: both sides under algorithms.policy.set_autocast(bf16), DeepSpeed with `torch_autocast`;
micro: the DeepSpeed side takes each step in micro-batches of one pair, gradients accumulated)
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pandas as pd
import torch

from algorithms.dpo import DPO, DPOParams
from algorithms.interface import EnvData, TrainContext, TrainSettings, plain_optimizer
from algorithms.policy import Policy, set_autocast
from bench.config import DeepSpeedSettings
from bench.worker.engine import single_process_dist_env, wrap_with_deepspeed


def dpo_logs(policy: Policy, reference: Policy, optimize, train: TrainSettings) -> list[dict]:
    pairs = pd.DataFrame({
        "prompt": ["the movie was", "i loved the", "the plot was", "overall it was"] * 2,
        "chosen": ["very good .", "film .", "great .", "wonderful ."] * 2,
        "rejected": ["very bad .", "music .", "awful .", "boring ."] * 2,
    })
    logs: list[dict] = []
    ctx = TrainContext(
        policy=policy, reference=reference, params=DPOParams(beta=0.5), train=train,
        data=EnvData([], [], pairs, pd.DataFrame()), optimize=optimize,
        evaluate=lambda *a, **k: {}, log=lambda step, m: logs.append(m),
    )
    DPO().train(ctx)
    return logs


def main(init_dir: str, zero_stage: int, flags: list[str]) -> None:
    single_process_dist_env()
    torch.set_num_threads(1)
    train = TrainSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=3, max_grad_norm=0.5, eval_every=100)
    set_autocast(torch.bfloat16 if "autocast" in flags else None)  # as worker_setup does
    plain = Policy.from_pretrained(init_dir)
    plain_logs = dpo_logs(plain, plain.frozen_copy(), plain_optimizer(plain, train=train), train)
    if "micro" in flags:
        train = dataclasses.replace(train, micro_batch_size=1)
    ds = Policy.from_pretrained(init_dir)
    settings = DeepSpeedSettings(zero_stage=zero_stage, **{name: True for name in flags if name != "micro"})
    reference = ds.frozen_copy()  # before wrapping: a copy of a ZeRO-3 module would carry its hooks, not its shards
    optimize = wrap_with_deepspeed(ds, train, settings, 1)
    dtypes: set[str] = set()  # what the vocabulary projection computed in, in DeepSpeed's training forwards
    head = ds.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: dtypes.add(str(out.dtype)) if torch.is_grad_enabled() else None)
    ds_logs = dpo_logs(ds, reference, optimize, train)
    hook.remove()
    with ds.gathered():  # ZeRO-3: the whole model again (a no-op below 3)
        sample = ds.generate(["the movie was"], n=2, max_new_tokens=5, seed=0).completion_ids
    import deepspeed.comm.comm as ds_comm

    print(json.dumps({"engine": type(ds.engine).__name__, "shm_comm_op": ds_comm.cdb.shm_comm_op is not None,
                      "train_dtypes": sorted(dtypes), "param_dtypes": sorted({str(p.dtype) for p in ds.model.parameters()}), "plain": plain_logs, "deepspeed": ds_logs,
                      "sample": sample, "plain_sample": plain.generate(["the movie was"], n=2, max_new_tokens=5, seed=0).completion_ids}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
