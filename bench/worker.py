"""What runs inside one Ray Train worker (or a Tune trial process): no Ray imports here.

bench.ray_runner hands these functions a plain-dict payload and a `report(metrics)` callable
(ray.train.report / ray.tune.report); everything else — DeepSpeed, the env, the algorithm, the
evaluator — is plain PyTorch, so a trial can also be run and debugged in one process.

One DeepSpeed engine per process: every Ray Train worker is a fresh actor process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from algorithms import ALGORITHMS
from algorithms.interface import NonFiniteError, TrainContext, TrainSettings, require_finite, trainable_modules, warmup_lambda
from algorithms.policy import Policy
from algorithms.reward_model import ScalarModel, split_pairs, train_reward_model
from algorithms.sft import lm_finetune
from bench.config import DeepSpeedSettings, SuiteConfig, TrialSpec, build_dataclass, env_params
from bench.evaluate import EvalSet, best_of_n_stats, concat_stats, sample_stats, summarize
from bench.results import write_text_atomic
from envs import ENVS
from envs.base import GoldRewardError, gold_fn, load_env_data

Report = Callable[..., None]  # report(metrics, checkpoint=None): checkpoint is a local directory to persist
REFERENCE_EVAL_FORMAT = 4  # part of the cache key of reference evaluations: bump when the evaluator changes


def _quiet() -> None:
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup(payload: dict) -> tuple[SuiteConfig, int, int, torch.device]:
    _quiet()
    torch.set_num_threads(int(payload.get("threads", 1)))
    suite = build_dataclass(SuiteConfig, payload["suite"], "")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if suite.scaling.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return suite, rank, world, device


def single_process_dist_env() -> None:
    """Make this process a 1-rank "cluster" for DeepSpeed outside Ray Train (perf, tests).

    Without RANK/WORLD_SIZE/MASTER_* DeepSpeed falls back to MPI discovery and fails. Existing
    values are kept.
    """
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)


def deepspeed_config(train: TrainSettings, ds: DeepSpeedSettings, world_size: int) -> dict:
    """The DeepSpeed config of a stage: one micro-batch per rank per step, no accumulation."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # our optimizer is a client torch AdamW (DeepSpeed's CPU Adam would JIT-compile C++)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.max_grad_norm > 0 and not clips_itself(ds):
        config["gradient_clipping"] = train.max_grad_norm
    return config


def clips_itself(ds: DeepSpeedSettings) -> bool:
    """ZeRO-0 in fp32 leaves whole fp32 grads in `p.grad`, so `optimize` clips them itself: one fused
    norm + scale, where DeepSpeed's own clip (a Python loop over tensors) cost ~2 ms per step on the
    tiny model. Sharded (ZeRO >= 1) or bf16 grads live in DeepSpeed's buffers: DeepSpeed clips."""
    return ds.zero_stage == 0 and not ds.bf16


class JointModule(torch.nn.Module):
    """Several trainable models as one module, so that ONE DeepSpeed engine (one optimizer, one
    clip, one step) trains them together: e.g. PPO's policy and critic. `forward(part, **kw)`."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(parts)

    def forward(self, part: str, **kwargs):
        return self.parts[part](**kwargs)


class ZeroGathered:
    """`gathered()` for ZeRO-3 trainables: inside it every parameter of the engine's module is whole
    on every rank and DeepSpeed's per-layer fetch hooks are off (DeepSpeed's own
    `unwrap_model_for_generation`), so generation and scoring run without per-layer collectives.
    Entering gathers (a collective: every rank enters together); re-entrant."""

    def __init__(self, engine):
        self.engine = engine
        self.depth = 0
        self._context = None

    def __call__(self) -> "ZeroGathered":
        return self

    def __enter__(self):
        if self.depth == 0:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            self._context = unwrap_model_for_generation(self.engine)
            self._context.__enter__()
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
        return False


def wrap_with_deepspeed(
    trainables: Policy | ScalarModel | list, train: TrainSettings, ds: DeepSpeedSettings, world_size: int
) -> Callable[[torch.Tensor], dict]:
    """Wrap the trainables (a Policy, a ScalarModel, or several) in ONE DeepSpeed engine; return `optimize`.

    Each trainable's `engine` is set, so its training forwards go through DeepSpeed. A torch AdamW
    with linear warm-up, not DeepSpeed's fused Adam, which would JIT-compile C++ on first use.
    """
    import functools

    import deepspeed

    trainables = trainables if isinstance(trainables, list) else [trainables]
    modules = trainable_modules(*trainables)
    module = modules[0] if len(modules) == 1 else JointModule({str(i): m for i, m in enumerate(modules)})
    params = [p for p in module.parameters() if p.requires_grad]
    t0 = time.time()
    # fused: one kernel for all tensors (CPU and CUDA); 1.7 vs 3.5 ms per step for the tiny model's 40 tensors
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(train.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, ds, world_size),
    )
    if world_size == 1 and ds.zero_stage == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank: flatten, copy back (~2 ms/step)
    gathered = ZeroGathered(engine) if ds.zero_stage == 3 else None
    for i, obj in enumerate(trainables):
        obj.engine = engine if len(modules) == 1 else functools.partial(engine, str(i))
        if gathered is not None:
            obj.gathered = gathered

    self_clip = clips_itself(ds)
    max_norm = train.max_grad_norm if train.max_grad_norm > 0 else float("inf")  # inf: the norm only
    calls = 0

    def optimize(loss: torch.Tensor) -> dict:
        nonlocal calls
        calls += 1
        # a NaN/inf loss would step NaN into every weight: stop here, before backward (a local check:
        # with several ranks the raising rank ends its worker and Ray Train stops the group)
        require_finite(f"the loss at optimizer step {calls}", loss.detach())
        lr = engine.get_lr()[0]
        engine.backward(loss)
        norm = None
        if self_clip:  # the norm before clipping, as DeepSpeed reports it for ZeRO >= 1
            grads = [p for p in params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True) if grads else None
            if norm is not None:  # before the step: inf/NaN gradients never reach the weights
                require_finite(f"the gradient norm at optimizer step {calls}", norm)
        elif ds.zero_stage == 0:  # bf16 ZeRO-0: DeepSpeed clips but does not track the norm
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else None
        engine.step()
        if norm is None:
            norm = engine.get_global_grad_norm()
        if norm is not None:
            require_finite(f"the gradient norm at optimizer step {calls}", float(norm))
        return {"lr": float(lr), "grad_norm": float(norm) if norm is not None else float("nan")}

    optimize.engine = engine  # for checkpoints (save_checkpoint / load_checkpoint)
    optimize.init_s = time.time() - t0  # DeepSpeed's share of start-up (timing.json)
    return optimize


def save_hf(obj, path: Path, rank: int) -> None:
    """Save a Policy / ScalarModel in Hugging Face format from rank 0; under ZeRO-3 every rank takes
    part in gathering the shards first, so the files hold the whole, consolidated model."""
    with obj.gathered():
        if rank == 0:
            obj.save_pretrained(path)


def _read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def algorithm_cache(workdir: Path, scope: dict, rank: int, world: int) -> Callable[[str, Callable[[], dict]], dict]:
    """`TrainContext.cache`: JSON files under `workdir/algorithm_cache/`, one per (scope, key), e.g. PPO's
    reward statistics of reference samples, computed by the first trial that asks and read by the rest.

    `scope` names what the env dir does not (the trial's reward model). Rank 0 reads; on a miss every
    rank computes (compute may use collectives) and every rank takes rank 0's value, which rank 0
    writes atomically (two trials racing write the same value). An unreadable file is computed again.
    """
    def cache(key: str, compute: Callable[[], dict]) -> dict:
        name = hashlib.sha256(json.dumps({"key": key, **scope}, sort_keys=True).encode()).hexdigest()[:16]
        path = workdir / "algorithm_cache" / f"{name}.json"
        entry = _read_json(path) if rank == 0 else None
        hit = entry["value"] if isinstance(entry, dict) and entry.get("key") == key and "value" in entry else None
        hit = _all_gather(hit, world)[0]  # rank 0 decides, so every rank takes the same branch
        if hit is not None:
            return hit
        value = _all_gather(compute(), world)[0]
        if rank == 0:
            path.parent.mkdir(exist_ok=True)
            write_text_atomic(path, json.dumps({"key": key, **scope, "value": value}, sort_keys=True))
        return value

    return cache


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _mean_over_ranks(metrics: dict, world: int) -> dict:
    """Average scalar training metrics over ranks, so a W-worker log reads like a 1-worker log."""
    if world == 1 or not metrics:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
        values = values.cuda()
    dist.all_reduce(values)
    return dict(zip(keys, (values / world).tolist()))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------- SFT stage
STAGE_TIMING = "stage_timing.json"


def write_stage_timing(stage_dir: Path, rank: int, t_entry: float, deepspeed_init_s: float) -> None:
    """Rank 0 records how long the stage's own work took in this worker (bench.run derives start-up from it)."""
    if rank == 0:
        (stage_dir / STAGE_TIMING).write_text(json.dumps(
            {"worker_s": round(time.time() - t_entry, 2), "deepspeed_init_s": round(deepspeed_init_s, 2)}))


def run_env_stage(payload: dict, report: Report) -> None:
    """The env's heavy stage: SFT of the initial policy on the env corpus, then pairs/references."""
    t_entry = time.time()
    suite, rank, world, device = _setup(payload)
    env = ENVS.get(suite.env.name)
    params = env_params(suite)
    workdir = Path(payload["env_dir"])
    ds_init_s = 0.0
    seed = int(payload["seed"])
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
    _barrier(world)
    write_stage_timing(workdir, rank, t_entry, ds_init_s)
    report({"stage": "env", "done": 1})


# ------------------------------------------------------------------------ reward-model stage
def run_rm_stage(payload: dict, report: Report) -> None:
    """The shared reward model: Bradley–Terry on the env's pairs, from the SFT backbone; saved with its metrics."""
    t_entry = time.time()
    suite, rank, world, device = _setup(payload)
    env_dir, rm_dir, seed = Path(payload["env_dir"]), Path(payload["rm_dir"]), int(payload["seed"])
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
                                    **_mean_over_ranks(m, world)}),
    )
    save_hf(rm, rm_dir / "model", rank)
    if rank == 0:
        (rm_dir / "metrics.json").write_text(json.dumps({**metrics, "rm/train_time_s": round(time.time() - t0, 1)}))
    _barrier(world)
    write_stage_timing(rm_dir, rank, t_entry, optimize.init_s)
    report({"stage": "reward_model", "done": 1})


# ----------------------------------------------------------------------------------- trials
FAILURE_FILE = "failure.json"  # a trial stopped by a numerical fault: its reason (bench.results reads it)
# logged training metrics that are a loss, a reward or a KL: NaN/inf in one stops the trial
GUARDED_METRICS = ("losses/", "rewards/", "objective/", "policy/")


def run_trial(payload: dict, report: Report) -> None:
    """One trial (see `_run_trial`). A NaN/inf loss, reward or KL, or a gold reward that broke its
    contract, stops it: retrying would only repeat it, so on one rank the reason goes to
    `failure.json` (trials.parquet: status failed) and the trial ends without raising. With several
    ranks the error is raised: another rank may be waiting in a collective, and Ray Train stops the
    whole group (FailureConfig may retry it from its checkpoint first; trials.parquet gets the reason)."""
    trial_dir = Path(payload["trial_dir"])
    try:
        _run_trial(payload, report)
    except (NonFiniteError, GoldRewardError) as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise
        reason = f"{type(e).__name__}: {e}"
        write_text_atomic(trial_dir / FAILURE_FILE, json.dumps({"reason": reason}))
        report({"trial_id": payload["trial"]["trial_id"], "stopped": reason})


def _check_logged(step: int, metrics: dict) -> None:
    """A logged loss, reward or KL (GUARDED_METRICS) that is NaN/inf stops the trial; lr, grad norm
    and the like may be NaN (e.g. no norm tracked)."""
    for key, value in metrics.items():
        if key.startswith(GUARDED_METRICS):
            require_finite(f"{key} at step {step}", value)


def _check_eval_rows(rows: list[dict], step: int) -> None:
    """An evaluation with a NaN/inf metric stops the trial before its rows are written (no NaN rows in
    tables). KL is NaN by definition where it is not estimated (greedy decoding; analytic for best-of-n)."""
    for r in rows:
        where = f"the evaluation at step {step} (T={r['temperature']:g})"
        keys = ["gold_reward", "win_rate", "gen_len"] + (["kl", "kl_k3"] if r.get("kl_kind") == "estimated" else [])
        for key in keys:
            require_finite(f"{key} of {where}", r[key])


def _run_trial(payload: dict, report: Report) -> None:
    """One trial: load the env, wrap the policy in DeepSpeed, run the algorithm, evaluate."""
    suite, rank, world, device = _setup(payload)
    spec = TrialSpec(**payload["trial"])
    algo = ALGORITHMS.get(spec.algorithm)
    env = ENVS.get(suite.env.name)
    workdir = Path(payload["env_dir"])
    trial_dir = Path(payload["trial_dir"])
    trial_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (trial_dir / FAILURE_FILE).unlink(missing_ok=True)  # from an earlier attempt (a --resume reruns it)
    t_start = time.time()
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)

    data = load_env_data(workdir)
    ev = suite.eval
    n_eval = min(ev.num_prompts, len(data.eval_prompts))
    if data.references["prompt"].tolist()[:n_eval] != data.eval_prompts[:n_eval]:
        raise ValueError(f"env {env.name}: references.parquet is not aligned with the eval prompts")
    gold = gold_fn(env, env_params(suite), workdir)
    evalset = EvalSet(
        prompts=data.eval_prompts[:n_eval],
        reference_gold=data.references["gold"].to_numpy()[:n_eval],
        gold=gold,
    )
    reference = env.load_policy(workdir, "sft").freeze()
    reference.model.to(device)
    train = TrainSettings(**spec.train)
    params = algo.params_cls(**spec.params)

    reward_model, rm_metrics = None, {}
    if "reward_model" in algo.needs:
        rm_dir = Path(payload["rm_dir"])
        reward_model = ScalarModel.from_pretrained(rm_dir / "model").freeze().to(device)
        rm_metrics = json.loads((rm_dir / "metrics.json").read_text())
    policy, critic, optimize = reference, None, None
    if algo.trains_policy:
        policy = env.load_policy(workdir, "sft")
        policy.model.to(device)
        trainables = [policy]
        if "critic" in algo.needs:  # stepped with the policy, in the same engine
            # from the shared reward model, backbone and head, where the trial has one (TRL, OpenRLHF);
            # otherwise (ppo-gt, or params `critic_init: sft`) the SFT backbone with a zero value head
            if reward_model is not None and getattr(params, "critic_init", "reward_model") == "reward_model":
                critic = ScalarModel.from_pretrained(Path(payload["rm_dir"]) / "model").to(device)
            else:
                critic = ScalarModel.from_pretrained(workdir / "sft", zero_head=True).to(device)
            trainables.append(critic)
        optimize = wrap_with_deepspeed(trainables, train, suite.deepspeed, world)

    rows_path = trial_dir / "evals.jsonl"
    log_path = trial_dir / "train_log.jsonl"
    resume = load_checkpoint(payload.get("resume_from"), optimize, trial_dir, rank, world) if optimize else None
    eval_time = resume["eval_time_s"] if resume else 0.0
    if resume:  # wall and eval time carry on from the run that saved the checkpoint
        t_start -= resume["wall_time_s"]
    if rank == 0 and resume is None:  # a trial restarted from scratch starts its rows afresh
        rows_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    meta = {
        "suite": suite.name, "env": suite.env.name, "algorithm": spec.algorithm, "trial_id": spec.trial_id,
        "seed": spec.seed, "knob": spec.knob, "knob_value": spec.knob_value,
        "params": json.dumps(spec.params, sort_keys=True),
    }
    # this rank's slice of the eval prompts; rank 0 gathers and writes
    my_prompts = np.arange(rank, n_eval, world)

    def measure(sampler, temperature: float, seed: int) -> dict:
        stats = sample_stats(
            sampler, reference, evalset, temperature=temperature, samples_per_prompt=ev.samples_per_prompt,
            max_new_tokens=ev.max_new_tokens, seed=seed, batch_size=ev.batch_size,
            score_batch_size=ev.score_batch_size, prompt_subset=my_prompts,
        )
        return summarize(concat_stats(_all_gather(stats, world)), temperature=temperature)

    def reference_row(temperature: float, seed: int) -> dict:
        """The reference's evaluation, computed once per env and eval setting and then read back.

        Every trial's step-0 evaluation is of the SFT policy itself (nothing stepped yet), with the
        same seeded samples as the `sft` baseline: identical numbers, so they are computed once.
        """
        key = hashlib.sha256(json.dumps(
            {"eval": dataclasses.asdict(ev), "n": n_eval, "seed": seed, "t": temperature, "world": world,
             "format": REFERENCE_EVAL_FORMAT},
            sort_keys=True).encode()).hexdigest()[:16]
        path = workdir / "reference_evals" / f"{key}.json"
        cached = _read_json(path) if rank == 0 else None  # an unreadable (corrupt) file is computed again
        if _all_gather(cached is not None, world)[0]:  # rank 0 decides, so every rank takes the same branch
            return cached if rank == 0 else json.loads(path.read_text())
        row = measure(reference, temperature, seed)
        if rank == 0:
            path.parent.mkdir(exist_ok=True)
            write_text_atomic(path, json.dumps(row))
        return row

    def evaluate(sampler, step: int, *, final: bool = False) -> dict:
        nonlocal eval_time
        if resume and not final and step == resume["step"]:
            return resume["last_eval"]  # evaluated (and its rows kept) before the checkpoint we resumed from
        t0 = time.time()
        temps = ev.temperatures if final else [1.0]
        rows = []
        with (sampler.gathered() if sampler is policy else contextlib.nullcontext()):
            for temperature in temps:
                seed = 1_000_003 * spec.seed + int(round(temperature * 1000))
                if hasattr(sampler, "sample_groups"):  # best-of-n: every n from one set of samples
                    per_n = best_of_n_stats(sampler, evalset, temperature=temperature, max_new_tokens=ev.max_new_tokens,
                                            seed=seed, prompt_subset=my_prompts)
                    for n, stats in per_n.items():
                        parts = _all_gather(stats, world)
                        rows.append({"knob_value": float(n), **summarize(concat_stats(parts), temperature=temperature)})
                    continue
                untouched = sampler is reference or (sampler is policy and not stepped)
                rows.append(reference_row(temperature, seed) if untouched else measure(sampler, temperature, seed))
        _check_eval_rows(rows, step)
        eval_time += time.time() - t0
        wall = time.time() - t_start
        at_t1 = ([r for r in rows if r["temperature"] == 1.0] or rows)[-1]  # best-of-n: its largest n
        if rank == 0:
            with rows_path.open("a") as f:
                for r in rows:
                    f.write(json.dumps({**meta, "step": step, **r, "final": final,
                                        "train_time_s": wall - eval_time, "wall_time_s": wall}) + "\n")
        metrics = {
            "trial_id": spec.trial_id, "step": step, "final": int(final),
            "gold_reward": at_t1["gold_reward"], "kl": at_t1["kl"], "win_rate": at_t1["win_rate"],
        }
        if optimize is not None and not final and step > 0:  # a restart point: DeepSpeed state + our files
            state = {"step": step, "algorithm_state": ctx.state, "last_eval": at_t1, "eval_time_s": eval_time,
                     "wall_time_s": time.time() - t_start}
            with checkpoint_dir(trial_dir, rank, step) as ckpt:
                save_checkpoint(ckpt, optimize, state, rows_path, log_path, rank)
                report(metrics, checkpoint=ckpt)
            inject_fault(trial_dir, spec.trial_id, step, rank)
        else:
            report(metrics)
        return at_t1

    def log(step: int, metrics: dict) -> None:
        metrics = _mean_over_ranks(metrics, world)
        _check_logged(step, metrics)
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    # until the first optimizer step the policy is the reference, weight for weight
    stepped = bool(resume and resume["step"] > 0)
    n_steps = resume["step"] if resume else 0  # optimizer steps (= trial steps for the pair methods)

    def step_policy(loss: torch.Tensor) -> dict:
        nonlocal stepped, n_steps
        stepped = True
        n_steps += 1
        if rank == 0 and step_fault(spec.trial_id, n_steps) == "nan":
            loss = loss * float("nan")
        return optimize(loss)

    ctx = TrainContext(
        policy=policy, reference=reference, params=params, train=train, data=data,
        optimize=step_policy if optimize else _no_optimizer, evaluate=evaluate, log=log,
        gold=gold if "gold" in algo.needs else None, reward_model=reward_model, critic=critic,
        seed=spec.seed, rank=rank, world_size=world, max_new_tokens=ev.max_new_tokens,
        mean_over_ranks=lambda m: _mean_over_ranks(m, world),
        start_step=resume["step"] if resume else 0, state=dict(resume["algorithm_state"]) if resume else {},
        cache=algorithm_cache(
            workdir, {"reward_model": Path(payload["rm_dir"]).name if reward_model is not None else None}, rank, world),
    )
    if resume:
        report({"trial_id": spec.trial_id, "resumed_from": resume["step"]})
    summary = algo.train(ctx) or {}
    if algo.trains_policy and payload.get("save_policy", True):
        save_hf(policy, trial_dir / "policy", rank)
    nodes = sorted(set(_all_gather(payload.get("node_id", ""), world)) - {""})
    peak_gpu = max(_all_gather(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0, world))
    if rank == 0:
        wall = time.time() - t_start
        write_text_atomic(trial_dir / "summary.json", json.dumps({
            **meta, "algorithm_summary": summary, **rm_metrics, "train_time_s": wall - eval_time, "wall_time_s": wall,
            "eval_time_s": eval_time, "deepspeed_init_s": round(optimize.init_s, 2) if optimize else 0.0,
            "nodes": ",".join(nodes), "resumed_from": resume["step"] if resume else None,
            **({"peak_gpu_memory_gib": round(peak_gpu, 3)} if device.type == "cuda" else {}),
        }))
    _barrier(world)


# ------------------------------------------------------------------------------ checkpoints
CHECKPOINT_TAG = "prefbench"


@contextlib.contextmanager
def checkpoint_dir(trial_dir: Path, rank: int, step: int):
    """A fresh local directory per rank for one checkpoint, removed once it has been reported
    (Ray copies each rank's directory into the run's storage and merges them: every rank saves,
    then reports — the documented DeepSpeed pattern)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"ckpt-{trial_dir.name[:40]}-step{step}-rank{rank}-"))
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(ckpt: str, optimize, state: dict, rows_path: Path, log_path: Path, rank: int) -> None:
    """Every rank: DeepSpeed's own checkpoint (module, optimizer, scheduler; ZeRO shards per rank) with
    the trial's resume state; rank 0 also copies the rows and training log written so far."""
    import shutil

    np_state = np.random.get_state()
    state = {**state, "torch_rng": torch.get_rng_state().tolist(), "numpy_rng": [np_state[1].tolist(), int(np_state[2])]}
    optimize.engine.save_checkpoint(ckpt, tag=CHECKPOINT_TAG, client_state={"prefbench": state})
    if rank == 0:
        files = Path(ckpt) / "prefbench_files"
        files.mkdir()
        for path in (rows_path, log_path):
            if path.exists():
                shutil.copy2(path, files / path.name)
        (Path(ckpt) / "prefbench_state.json").write_text(json.dumps({"step": state["step"]}))


def load_checkpoint(path: str | None, optimize, trial_dir: Path, rank: int, world: int) -> dict | None:
    """Restore a trial's DeepSpeed state and files from a reported checkpoint; None when there is none."""
    if not path:
        return None
    _, client = optimize.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
    state = client["prefbench"]
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    keys, pos = state["numpy_rng"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, 0, 0.0))
    if rank == 0:
        import shutil

        for name in ("evals.jsonl", "train_log.jsonl"):
            saved = Path(path) / "prefbench_files" / name
            target = trial_dir / name
            if saved.exists():
                shutil.copy2(saved, target)
            else:
                target.unlink(missing_ok=True)
    _barrier(world)
    return state


FAULTS_ENV = "PREFBENCH_FAULTS"


def _faults(trial_id: str, step: int) -> list[str]:
    """The actions $PREFBENCH_FAULTS names for (trial, step)."""
    items = (item.strip().rpartition(":") for item in os.environ.get(FAULTS_ENV, "").split(",") if item.strip())
    return [action for target, _, action in items if target == f"{trial_id}@{step}"]


def step_fault(trial_id: str, step: int) -> str | None:
    """Fault injection at an optimizer step (rank 0), for the reliability tests.

    `TRIAL_ID@STEP:nan`: the loss of optimizer step STEP becomes NaN (the loss guard must stop the
    trial); `TRIAL_ID@STEP:die`: the worker SIGKILLs itself at that step in EVERY attempt, so the
    trial keeps failing (FailureConfig gives up after `scaling.max_failures` restarts). Returns
    "nan" for the caller to apply. Unset in normal use."""
    import signal

    actions = _faults(trial_id, step)
    if "die" in actions:
        os.kill(os.getpid(), signal.SIGKILL)
    return "nan" if "nan" in actions else None


def inject_fault(trial_dir: Path, trial_id: str, step: int, rank: int) -> None:
    """Fault injection for the reliability tests, right after a checkpoint was reported.

    $PREFBENCH_FAULTS lists `TRIAL_ID@STEP:ACTION` items (comma-separated); here ACTION `kill`: this
    worker process dies (SIGKILL) 5 s later (Ray Train V2 collects reports about every 2 s; a
    checkpoint the controller never collected is lost with its worker), `hang`: it stops (at most an hour, and
    only while its parent lives) (for killing or interrupting the whole run from outside at a known point). Each fires once per
    trial directory (a marker file), so the restarted trial runs on. See `step_fault` for `nan` and
    `die`. Unset in normal use.
    """
    import signal

    if rank != 0:
        return
    for action in _faults(trial_id, step):
        if action not in ("kill", "hang"):
            continue
        marker = trial_dir / f".fault-{step}-{action}"
        if marker.exists():
            continue
        marker.write_text("fired\n")
        if action == "kill":
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":  # until killed, or until its parent (the raylet) is gone: never an orphan
            parent, until = os.getppid(), time.time() + 3600
            while os.getppid() == parent and time.time() < until:
                time.sleep(0.5)


def _no_optimizer(loss: torch.Tensor) -> dict:
    raise RuntimeError("this algorithm declared trains_policy=False but called ctx.optimize")
