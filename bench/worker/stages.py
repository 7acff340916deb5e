"""The shared stages, each one Ray Train job (bench.run.ray_runner starts them): the env's SFT
of its initial policy with its pairs and references, and the learned reward model. No Ray here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from algorithms.reward_model import ScalarModel, split_pairs, train_reward_model
from algorithms.sft import lm_finetune
from bench.config import env_params
from bench.worker.engine import Report, barrier, mean_over_ranks, save_hf, worker_setup, wrap_with_deepspeed
from envs import ENVS
from envs.base import GoldRewardError, load_env_data



@dataclass(frozen=True)
class StagePayload:
    """What a shared stage's workers are sent (as a plain dict: Ray Train's train_loop_config)."""

    suite: dict  # the validated SuiteConfig, as dataclasses.asdict gives it
    env_dir: str  # the env being prepared (the env stage) or the prepared env (the reward model)
    seed: int
    rm_dir: str | None = None  # the reward model stage's output directory
    threads: int = 1  # torch threads of this process

STAGE_TIMING = "stage_timing.json"


def write_stage_timing(stage_dir: Path, rank: int, t_entry: float, deepspeed_init_s: float) -> None:
    """Rank 0 records how long the stage's own work took in this worker (bench.run derives start-up from it)."""
    if rank == 0:
        (stage_dir / STAGE_TIMING).write_text(json.dumps(
            {"worker_s": round(time.time() - t_entry, 2), "deepspeed_init_s": round(deepspeed_init_s, 2)}))


def run_env_stage(payload: StagePayload | dict, report: Report) -> None:
    """The env's heavy stage: SFT of the initial policy on the env corpus, then pairs/references."""
    t_entry = time.time()
    payload = payload if isinstance(payload, StagePayload) else StagePayload(**payload)
    suite, rank, world, device = worker_setup(payload.suite, payload.threads)
    env = ENVS.get(suite.env.name)
    params = env_params(suite)
    workdir, seed = Path(payload.env_dir), payload.seed
    ds_init_s = 0.0
    torch.manual_seed(seed)
    policy = env.load_policy(workdir, "init")
    policy.model.to(device)
    corpus = env.sft_corpus(params, workdir)
    t0 = time.time()
    if corpus is not None:
        train = env.sft_settings(params)
        optimize = wrap_with_deepspeed(policy, train, suite.deepspeed, world)
        ds_init_s = optimize.init_s
        lm_finetune(
            policy, corpus, train, optimize, seed=seed, rank=rank, world_size=world,
            log=lambda step, m: report({"stage": "sft", "step": step, "total_steps": train.steps, **m}),
        )
    policy.model.eval()
    with policy.gathered():  # ZeRO-3: the whole SFT model on every rank; rank 0 saves and samples pairs
        if rank == 0:
            policy.save_pretrained(workdir / "sft")
            try:
                env.finish(policy, params, seed, workdir)
            except GoldRewardError as e:  # the recipes name the env only when given `env.gold` itself
                raise (e if str(e).startswith("env ") else GoldRewardError(f"env {env.name}: {e}")) from None
            (workdir / "sft_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    barrier(world)
    write_stage_timing(workdir, rank, t_entry, ds_init_s)
    report({"stage": "env", "done": 1})


def run_rm_stage(payload: StagePayload | dict, report: Report) -> None:
    """The shared reward model: Bradley–Terry on the env's pairs, from the SFT backbone; saved with its metrics."""
    t_entry = time.time()
    payload = payload if isinstance(payload, StagePayload) else StagePayload(**payload)
    suite, rank, world, device = worker_setup(payload.suite, payload.threads)
    env_dir, rm_dir, seed = Path(payload.env_dir), Path(payload.rm_dir), payload.seed
    torch.manual_seed(seed)
    params = suite.reward_model
    train_pairs, heldout = split_pairs(load_env_data(env_dir).pairs, params.heldout_fraction, seed)
    rm = ScalarModel.from_pretrained(env_dir / "sft").to(device)
    settings = params.train_settings(len(train_pairs))
    optimize = wrap_with_deepspeed(rm, settings, suite.deepspeed, world)
    t0 = time.time()
    metrics = train_reward_model(
        rm, train_pairs, heldout, params, optimize, seed=seed, rank=rank, world_size=world,
        log=lambda step, m: report({"stage": "reward_model", "step": step, "total_steps": settings.steps,
                                    **mean_over_ranks(m, world)}),
    )
    save_hf(rm, rm_dir / "model", rank)
    if rank == 0:
        (rm_dir / "metrics.json").write_text(json.dumps({**metrics, "rm/train_time_s": round(time.time() - t0, 1)}))
    barrier(world)
    write_stage_timing(rm_dir, rank, t_entry, optimize.init_s)
    report({"stage": "reward_model", "done": 1})
