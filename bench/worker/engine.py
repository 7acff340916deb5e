"""The DeepSpeed side of a worker: one engine per process for the trainables of a stage or trial,
its config, ZeRO-3 gathering, saving, and the few collectives the worker needs. No Ray here.

One DeepSpeed engine per process: every Ray Train worker is a fresh actor process; outside Ray
(perf, tools, tests) `single_process_dist_env` makes the process a 1-rank group first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from algorithms.interface import TrainSettings, require_finite, trainable_modules, warmup_lambda
from algorithms.policy import Policy, set_autocast
from algorithms.reward_model import ScalarModel
from bench.config import DeepSpeedSettings, SuiteConfig, build_dataclass
from bench.results import write_text_atomic

Report = Callable[..., None]  # report(metrics, checkpoint=None): checkpoint is a local directory to persist


def quiet_libraries() -> None:
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def worker_setup(suite_dict: dict, threads: int) -> tuple[SuiteConfig, int, int, torch.device]:
    """A worker's start: quiet libraries, its torch threads, the suite, its rank and world size, its device."""
    quiet_libraries()
    torch.set_num_threads(int(threads))
    suite = build_dataclass(SuiteConfig, suite_dict, "")
    set_autocast(torch.bfloat16 if suite.deepspeed.autocast else None)
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
    """The DeepSpeed config of a stage. Its batch sizes are the step's (DeepSpeed checks them); a step
    taken in micro-batches sets the accumulation boundary itself (`optimize(loss, accumulate=...)`)."""
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
        # the engine's forward under torch.autocast, and ZeRO's reductions of Linear grads in bf16;
        # every other forward autocasts through algorithms.policy.set_autocast (worker_setup)
        "torch_autocast": {"enabled": ds.autocast, "dtype": "bfloat16"},
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


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op (`deepspeed_shm_comm`).

    DeepSpeed's CPU accelerator builds it with ninja + g++ when the first engine of a process starts
    its comm backend: 44-68 s on 2 cores the first time, and again whenever the venv's path changes
    (the build file names the include paths). The op serves only `inference_all_reduce` (DeepSpeed
    inference / AutoTP); training collectives (all-reduce, reduce-scatter, all-gather of ZeRO) are
    torch.distributed's whatever it says. Marking it incompatible in DeepSpeed's own table of
    compatible ops (`deepspeed.ops.__compatible_ops__`, probed once per process and kept in the
    module) makes `build_shm_op` return None, as on a machine that cannot build it.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


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
    skip_shm_comm_op()
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

    def optimize(loss: torch.Tensor, accumulate: bool = False) -> dict:
        nonlocal calls
        # a NaN/inf loss would step NaN into every weight: stop here, before backward (a local check:
        # with several ranks the raising rank ends its worker and Ray Train stops the group)
        require_finite(f"the loss at optimizer step {calls + 1}", loss.detach())
        # micro-batches: DeepSpeed's own accumulation, the boundary set by the caller (the gradients of
        # a step's micro-batches accumulate, are reduced over ranks at its last one and stepped once);
        # the parts' losses already sum to the batch loss, so DeepSpeed does not scale them
        engine.set_gradient_accumulation_boundary(not accumulate)
        engine.backward(loss, scale_wrt_gas=False)
        if accumulate:
            return {}
        calls += 1
        lr = engine.get_lr()[0]
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


def all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(metrics: dict, world: int) -> dict:
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


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rank0_json_cache(folder: Path, key: dict, compute: Callable[[], Any], rank: int, world: int,
                     wrap: str | None = None) -> Any:
    """A value computed once and kept as JSON in `folder`, named by the hash of `key`: the reference's
    evaluations, algorithms' `ctx.cache` entries.

    Rank 0 reads and decides, so every rank takes the same branch: on a hit every rank takes rank 0's
    value; on a miss every rank computes (compute may use collectives) and takes rank 0's value, which
    rank 0 writes atomically (two trials racing write the same value). An unreadable file is computed
    again. With `wrap`, the file holds `{**key, wrap: value}` and is a hit only where its key matches.
    """
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"{name}.json"
    entry = _read_json(path) if rank == 0 else None
    if wrap is not None:
        matches = isinstance(entry, dict) and wrap in entry and all(entry.get(k) == v for k, v in key.items())
        entry = entry[wrap] if matches else None
    hit = all_gather(entry, world)[0]
    if hit is not None:
        return hit
    value = all_gather(compute(), world)[0]
    if rank == 0:
        folder.mkdir(exist_ok=True)
        write_text_atomic(path, json.dumps({**key, wrap: value}, sort_keys=True) if wrap is not None else json.dumps(value))
    return value
