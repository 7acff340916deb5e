"""`prefbench perf`: how fast the work inside a trial runs, against the machine's own peak and
(with `--vs trl`) against TRL on the same work.

On a prepared env (cached like `prefbench run`'s; tiny-sentiment by default) and the suite's shapes
it measures, without Ray, each part in its own process (one DeepSpeed engine per process, as in a
trial; the parts do not share warm caches):

- `peak`: the machine's dense matmul rate, fp32 and bf16 (2048², median of the repeats);
- `dpo`: our DPO training (algorithms/dpo.py through a DeepSpeed ZeRO-0 engine, as in a trial);
  `generate`: `Policy.generate` at batch sizes 1…64; `evaluate`: one evaluation point at T = 1
  with the suite's eval settings;
- `rm`: our Bradley–Terry reward-model training through DeepSpeed;
- `ppo`: our PPO with a critic: rollout (generation) and update (everything else) separately;
- `trl` (with `--vs trl`): TRL's DPOTrainer and RewardTrainer on `prefbench export-env`'s output of
  the same env — same SFT model, pairs, batch size, steps, learning rate, precision (fp32; with
  `--set deepspeed.autocast=true` ours autocasts to bf16 and TRL gets `bf16=True`, its own autocast).

Rates are tokens per second: non-pad tokens of prompt + completion (+ EOS) of every sequence a
step trains on (a DPO or RM step: chosen and rejected of `batch_size` pairs), over the median
interval between consecutive optimizer steps after `WARMUP_STEPS` (so both sides pay for batch
collation, forward, backward and the optimizer step, and neither pays for set-up). `setup_s` is the
time from building the trainer (ours: the DeepSpeed engine; TRL: the Trainer, which tokenises the
dataset) to the end of the first step, less one median step: tokenisation, engine set-up and the
one-time reference log-prob pass over every pair (both sides; in a suite ours is computed once per env and
shared by its pair trials). Model FLOPs are 6·N·tokens for training and
2·N·tokens for a forward pass (generation: generated tokens), N = all parameters; the fraction of
peak is against the fp32 matmul rate measured in the same command. The machine is shared and
noisy: compare ratios from one command, not absolute numbers across commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.tools.common import run_child, versions

WARMUP_STEPS = 3  # optimizer steps excluded from the median (first-touch allocations, autotuning)
GENERATE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class PerfConfig:
    env_dir: str  # a prepared env (bench.run.prepare_env's cache entry)
    export_dir: str | None  # prefbench export-env's output of the same env (for --vs trl)
    steps: int  # optimizer steps timed per training part (after WARMUP_STEPS more)
    batch_size: int  # pairs (DPO, RM) or prompts (PPO) per step
    lr: float
    beta: float  # DPO's beta
    max_new_tokens: int  # completion cap (generation, PPO rollouts, evaluation)
    eval_num_prompts: int
    eval_samples_per_prompt: int
    ppo_steps: int  # PPO iterations timed
    repeats: int  # repeats of the non-training timings (peak, generate, evaluate)
    seed: int = 0
    deepspeed: dict = dataclasses.field(default_factory=dict)  # the suite's `deepspeed` section (precision, ZeRO)


# ------------------------------------------------------------------------------------ driver
def run_perf(env_name: str, overrides: list[str], *, seed: int = 0, steps: int = 20, ppo_steps: int = 3,
             repeats: int = 3, rounds: int = 1, vs_trl: bool = False, address: str | None = None) -> dict:
    """Prepare (or reuse) the env, run every part in its own process `rounds` times (interleaved, so
    a slow spell of a shared machine hits ours and TRL alike), return the medians over rounds."""
    from bench.export import SET_KEYS, export_env, export_suite, is_allowed
    from bench.run.prepare import prepared_env
    from bench.errors import UserError

    if min(steps, ppo_steps, repeats, rounds) < 1:
        raise UserError("--steps, --ppo-steps, --repeats and --rounds must be >= 1")
    if vs_trl:
        from importlib.util import find_spec

        if find_spec("trl") is None:
            raise UserError("--vs trl needs TRL installed (pip install trl)")
    # validated like a run's env section, plus the shapes (train.batch_size, train.lr, eval.*)
    suite = export_suite(env_name, overrides, seed, command="perf", allowed=SET_KEYS + ("train", "eval"))
    env_dir = prepared_env(suite, seed, address, needs={"pairs", "prompts"})  # DPO and PPO
    config = PerfConfig(
        env_dir=str(env_dir), export_dir=None, steps=steps, batch_size=suite.train.batch_size, lr=suite.train.lr,
        beta=0.1, max_new_tokens=suite.eval.max_new_tokens, eval_num_prompts=suite.eval.num_prompts,
        eval_samples_per_prompt=suite.eval.samples_per_prompt, ppo_steps=ppo_steps, repeats=repeats, seed=seed,
        deepspeed=dataclasses.asdict(suite.deepspeed),
    )
    results: dict = {"env": env_name, "env_dir": str(env_dir), "config": dataclasses.asdict(config)}
    with tempfile.TemporaryDirectory(prefix="prefbench-perf-") as tmp:
        if vs_trl:
            env_sets = [o for o in overrides if is_allowed(o.split("=", 1)[0].strip(), SET_KEYS)]
            config.export_dir = str(export_env(env_name, Path(tmp) / "export", env_sets, seed=seed, address=address))
        parts = ["peak", "dpo", "rm", "ppo"] + (["trl"] if vs_trl else [])
        runs: dict[str, list[dict]] = {part: [] for part in parts}
        for _ in range(rounds):
            for part in parts:
                runs[part].append(_run_part(part, config, Path(tmp)))
        for part in parts:
            results[part] = median_merge(runs[part])
    results["rounds"] = rounds
    results.update(_ratios(results))
    results["versions"] = versions("cpu", ("trl", "accelerate") if vs_trl else ())
    return results


def _run_part(part: str, config: PerfConfig, tmp: Path) -> dict:
    """One part in a fresh Python process; its numbers come back as JSON (with the process's peak RSS)."""
    from bench import say

    cfg, out = tmp / f"{part}.config.json", tmp / f"{part}.json"
    cfg.write_text(json.dumps(dataclasses.asdict(config)))
    say(f"[prefbench] perf: {part}")
    t0 = time.perf_counter()
    proc = run_child([sys.executable, "-m", "bench.tools.perf", part, str(cfg), str(out)],
                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc["returncode"] != 0:
        tail = " | ".join(line.strip() for line in proc["stdout_lines"][-3:])
        raise RuntimeError(f"perf part {part} failed: {tail}")
    numbers = json.loads(out.read_text())
    numbers["process_s"] = round(time.perf_counter() - t0, 2)
    return numbers


def median_merge(runs: list[dict]) -> dict:
    """The element-wise median of several runs' nested numbers (other values: the first run's)."""
    out = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(first, dict):
            out[key] = median_merge(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = statistics.median(values)
        else:
            out[key] = first
    return out


def _ratios(r: dict) -> dict:
    out = {}
    peak = r["peak"]["fp32_flops"]
    for part, key in (("dpo", "train"), ("rm", "train")):
        out[f"{part}_fraction_of_fp32_peak"] = r[part][key]["flops"] / peak
    out["ppo_update_fraction_of_fp32_peak"] = r["ppo"]["update"]["flops"] / peak
    if "trl" in r:
        out["dpo_vs_trl"] = r["dpo"]["train"]["tokens_per_s"] / r["trl"]["dpo"]["tokens_per_s"]
        out["rm_vs_trl"] = r["rm"]["train"]["tokens_per_s"] / r["trl"]["rm"]["tokens_per_s"]
    return out


# ---------------------------------------------------------------------------- measurements
def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class StepClock:
    """Timestamps after each optimizer step: wraps `optimize` (ours) or is fed by a callback (TRL)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def wrap(self, optimize: Callable) -> Callable:
        def timed(loss, accumulate=False):
            out = optimize(loss, accumulate=accumulate)
            if not accumulate:  # a step ends at its last micro-batch
                self.tick()
            return out

        return timed

    def median_step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][WARMUP_STEPS - 1:]
        return statistics.median(gaps)

    def setup_s(self) -> float:
        """From the start to the first step's end, less one median step: encoding, reference log-probs."""
        return self.stamps[0] - self.start - self.median_step_s()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pair_tokens(tokenizer, pairs) -> float:
    """Mean non-pad tokens of one pair's two training sequences, encoded as prefbench trains on them
    (algorithms.policy: prompt with special tokens, completion + EOS), chosen and rejected."""
    from algorithms.pairs import EncodedPairs
    from algorithms.policy import Policy

    enc = EncodedPairs.encode(Policy(None, tokenizer), pairs, "perf")  # tokenisation only: no model needed
    chosen, rejected = enc.completion_lengths()
    prompts = sum(len(ids) for ids in enc.prompt_ids)
    return (2 * prompts + float(chosen.sum() + rejected.sum())) / len(enc)


def train_numbers(clock: StepClock, tokens_per_step: float, n: int, steps: int) -> dict:
    step_s = clock.median_step_s()
    return {"step_s": step_s, "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step_s,
            "flops": 6 * n * tokens_per_step / step_s, "setup_s": clock.setup_s(), "steps": steps, "params": n}


def part_peak(cfg: PerfConfig) -> dict:
    import torch

    out = {"threads": torch.get_num_threads()}
    size = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        out[f"{name}_flops"] = 2 * size**3 / _median_time(lambda: torch.mm(a, b), max(cfg.repeats, 3))
    return out


def _settings(cfg: PerfConfig, steps: int):
    from algorithms.interface import TrainSettings

    return TrainSettings(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=0, eval_every=10**9)


def _deepspeed(trainables, settings, cfg: PerfConfig):
    from bench.config import DeepSpeedSettings
    from bench.worker.engine import single_process_dist_env, wrap_with_deepspeed

    single_process_dist_env()
    return wrap_with_deepspeed(trainables, settings, DeepSpeedSettings(**cfg.deepspeed), 1)


def part_dpo(cfg: PerfConfig) -> dict:
    """Our DPO (DeepSpeed ZeRO-0), then generation at several batch sizes and one evaluation."""
    import numpy as np
    import pandas as pd
    import torch

    from algorithms.dpo import DPO, DPOParams
    from algorithms.interface import EnvData, TrainContext
    from algorithms.policy import Policy
    from bench.evaluate import EvalSet, evaluate
    from envs.base import load_env_data

    data = load_env_data(Path(cfg.env_dir))
    sft = Path(cfg.env_dir) / "sft"
    policy, reference = Policy.from_pretrained(sft), Policy.from_pretrained(sft, frozen=True)
    settings = _settings(cfg, cfg.steps + WARMUP_STEPS)
    clock = StepClock()
    optimize = clock.wrap(_deepspeed(policy, settings, cfg))
    ctx = TrainContext(policy=policy, reference=reference, params=DPOParams(beta=cfg.beta), train=settings,
                       data=EnvData([], [], data.pairs, pd.DataFrame()), optimize=optimize,
                       evaluate=lambda *a, **k: {}, seed=cfg.seed)
    DPO().train(ctx)
    out = {"train": train_numbers(clock, cfg.batch_size * pair_tokens(policy.tokenizer, data.pairs),
                                  n_params(policy.model), cfg.steps)}

    policy.model.eval()
    n = n_params(reference.model)
    prompts = data.eval_prompts or data.train_prompts
    gen = {}
    for bs in GENERATE_BATCHES:
        batch = (prompts * (bs // len(prompts) + 1))[:bs]
        tokens = []

        def sample():
            roll = reference.generate(batch, n=1, temperature=1.0, max_new_tokens=cfg.max_new_tokens, seed=len(tokens))
            tokens.append(int(roll.lengths.sum()))

        t = _median_time(sample, cfg.repeats)
        per_s = statistics.median(tokens) / t
        gen[str(bs)] = {"s": t, "tokens": statistics.median(tokens), "tokens_per_s": per_s, "flops": 2 * n * per_s}
    out["generate"] = gen

    k = min(cfg.eval_num_prompts, len(data.eval_prompts))
    evalset = EvalSet(prompts=data.eval_prompts[:k], reference_gold=np.full(k, 0.5), gold=lambda p, c: np.zeros(len(c)))
    with torch.no_grad():
        out["evaluate"] = {"s": _median_time(lambda: evaluate(
            reference, reference, evalset, temperature=1.0, samples_per_prompt=cfg.eval_samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens), cfg.repeats), "prompts": k, "samples_per_prompt": cfg.eval_samples_per_prompt,
            "note": "gold reward not included (it is the env's: VADER ~0.1 ms per text, a classifier or a judge elsewhere)"}
    return out


def part_rm(cfg: PerfConfig) -> dict:
    """Our Bradley–Terry reward-model training (DeepSpeed ZeRO-0)."""
    from algorithms.reward_model import RewardModelParams, ScalarModel, train_reward_model
    from envs.base import load_env_data

    pairs = load_env_data(Path(cfg.env_dir)).pairs
    rm = ScalarModel.from_pretrained(Path(cfg.env_dir) / "sft")
    steps = cfg.steps + WARMUP_STEPS
    params = RewardModelParams(epochs=steps * cfg.batch_size / len(pairs), batch_size=cfg.batch_size, lr=cfg.lr,
                               warmup_steps=0)
    clock = StepClock()
    optimize = clock.wrap(_deepspeed(rm, params.train_settings(len(pairs)), cfg))
    train_reward_model(rm, pairs, pairs.iloc[:0], params, optimize, seed=cfg.seed)
    return {"train": train_numbers(clock, cfg.batch_size * pair_tokens(rm.tokenizer, pairs), n_params(rm.head), cfg.steps)}


def part_ppo(cfg: PerfConfig) -> dict:
    """Our PPO with a critic (one DeepSpeed engine for both) against a scalar reward model.

    rollout = the policy's generation; update = the rest of the iteration (reward-model scoring, the
    no-grad policy / reference / critic passes, GAE, ppo_epochs of policy + critic steps)."""
    import pandas as pd

    from algorithms.interface import EnvData, TrainContext
    from algorithms.policy import Policy
    from algorithms.ppo import PPO, PPOParams
    from algorithms.reward_model import ScalarModel
    from envs.base import load_env_data

    data = load_env_data(Path(cfg.env_dir))
    sft = Path(cfg.env_dir) / "sft"
    policy, reference = Policy.from_pretrained(sft), Policy.from_pretrained(sft, frozen=True)
    critic = ScalarModel.from_pretrained(sft, zero_head=True)
    reward_model = ScalarModel.from_pretrained(sft).freeze()  # any scalar model costs the same to query
    steps = cfg.ppo_steps + 1  # the first iteration is the warm-up
    settings = _settings(cfg, steps)
    optimize = _deepspeed([policy, critic], settings, cfg)
    params = PPOParams()
    iters = [{"rollout_s": 0.0, "generated": 0, "tokens": 0}]  # per iteration; the log call closes one
    generate = policy.generate

    def timed_generate(*args, **kwargs):  # PPO's rollout samples through ctx.policy.generate
        t0 = time.perf_counter()
        roll = generate(*args, **kwargs)
        it = iters[-1]
        it["rollout_s"] += time.perf_counter() - t0
        it["generated"] += int(roll.lengths.sum())
        it["tokens"] += int(roll.lengths.sum()) + sum(len(p) for p in roll.prompt_ids)
        return roll

    def log(step, metrics):
        iters[-1]["end"] = time.perf_counter()
        iters.append({"rollout_s": 0.0, "generated": 0, "tokens": 0})

    policy.generate = timed_generate
    ctx = TrainContext(policy=policy, reference=reference, params=params, train=settings,
                       data=EnvData(data.train_prompts, [], pd.DataFrame(), pd.DataFrame()), optimize=optimize,
                       evaluate=lambda *a, **k: {}, log=log, reward_model=reward_model, critic=critic,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    start = time.perf_counter()
    PPO("ppo", reward="reward_model").train(ctx)
    done = iters[:-1]
    for it, begin in zip(done, [start] + [i["end"] for i in done[:-1]]):
        it["s"] = it["end"] - begin
    done = done[1:]  # the first iteration is the warm-up
    total = statistics.median(i["s"] for i in done)
    roll = statistics.median(i["rollout_s"] for i in done)
    gen_tokens = statistics.median(i["generated"] for i in done)
    tokens = statistics.median(i["tokens"] for i in done)
    update = total - roll
    n_policy, n_critic = n_params(policy.model), n_params(critic.head)
    # per iteration: no-grad forwards of policy, reference and critic over the batch, then
    # ppo_epochs passes of policy + critic forward/backward (6·N per token)
    update_flops = tokens * (2 * (2 * n_policy + n_critic) + params.ppo_epochs * 6 * (n_policy + n_critic))
    return {
        "iteration_s": total, "iterations": len(done), "batch_size": cfg.batch_size, "ppo_epochs": params.ppo_epochs,
        "rollout": {"s": roll, "tokens": gen_tokens, "tokens_per_s": gen_tokens / roll,
                    "flops": 2 * n_policy * gen_tokens / roll},
        "update": {"s": update, "tokens": tokens, "tokens_per_s": params.ppo_epochs * tokens / update,
                   "flops": update_flops / update},
    }


def part_trl(cfg: PerfConfig) -> dict:
    """TRL's DPOTrainer and RewardTrainer on the export, as their docs configure them, on CPU (fp32, or
    with `bf16=True`, TRL's autocast, when ours autocasts)."""
    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    export = Path(cfg.export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export / "sft")
    pairs = pd.read_parquet(export / "pairs.parquet")[["prompt", "chosen", "rejected"]]
    dataset = Dataset.from_pandas(pairs, preserve_index=False)
    steps = cfg.steps + WARMUP_STEPS
    # the export's strings are prefbench's (a word-level env's added leading space changes no ids); TRL
    # appends an EOS to every completion, also to one cut at max_new_tokens, where prefbench adds none:
    # counted without the ended flags, as TRL trains them (at most one token more per completion)
    tokens_per_step = cfg.batch_size * pair_tokens(tokenizer, pairs)
    common = dict(output_dir=str(export / "trl-out"), per_device_train_batch_size=cfg.batch_size, max_steps=steps,
                  learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                  dataloader_num_workers=0, seed=cfg.seed,
                  # TRL's bf16 on CPU is torch.autocast to bf16 over fp32 weights: ours with deepspeed.autocast
                  bf16=bool(cfg.deepspeed.get("autocast") or cfg.deepspeed.get("bf16")),
                  optim="adamw_torch_fused")  # the fused torch AdamW, as ours (TrainingArguments' fastest AdamW)

    class Clock(TrainerCallback):
        def __init__(self, clock: StepClock):
            self.clock = clock

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.tick()

    out = {"settings": {"dpo": "DPOConfig(precompute_ref_log_probs=True, optim=adamw_torch_fused, beta, lr, batch, "
                               "fp32 or bf16 autocast as ours, use_cpu); padding_free needs flash-attention (GPU)",
                        "rm": "RewardConfig(optim=adamw_torch_fused, batch, lr, precision as ours, use_cpu)"}}
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(export / "sft")
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=DPOConfig(beta=cfg.beta, precompute_ref_log_probs=True, **common),
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock(clock)])
    trainer.train()
    out["dpo"] = train_numbers(clock, tokens_per_step, n_params(model), cfg.steps)

    torch.manual_seed(cfg.seed)
    rm = AutoModelForSequenceClassification.from_pretrained(export / "sft", num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    clock = StepClock()
    trainer = RewardTrainer(model=rm, args=RewardConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[Clock(clock)])
    trainer.train()
    out["rm"] = train_numbers(clock, tokens_per_step, n_params(rm), cfg.steps)
    return out


PARTS = {"peak": part_peak, "dpo": part_dpo, "rm": part_rm, "ppo": part_ppo, "trl": part_trl}


# --------------------------------------------------------------------------- a whole suite
def tree_memory(root) -> tuple[float, float, int]:
    """(PSS, RSS) in bytes of a process and all its descendants, and how many there are.

    PSS (proportional set size) splits each shared page among the processes that map it, so the
    sum over processes is what they occupy together; the RSS sum counts shared pages (libtorch,
    Ray's shared object store) once per process and overstates it.
    """
    import psutil

    pss = rss = 0
    procs = [root] + root.children(recursive=True)
    for proc in procs:
        try:
            mem = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss += getattr(mem, "pss", mem.rss)
        rss += mem.rss
    return float(pss), float(rss), len(procs)


def run_suite_perf(suite_path: str | None, overrides: list[str], *, cold: bool = False, address: str | None = None,
                   interval_s: float = 1.0) -> dict:
    """Run a whole suite (`prefbench run`) in a child process and measure it from outside: wall
    time, the peak memory of all its processes together (sampled every `interval_s`), and where the
    time went (the run's own timing.json: start-up of Ray, the stages and the trials).

    `cold`: a private, empty env/reward-model cache, so the env's SFT and the reward model are
    built as on a fresh machine; otherwise the user's cache (what a second run pays).
    """
    import psutil

    from bench.config import load_suite

    load_suite(suite_path, overrides)  # a bad suite is one line, before anything starts
    with tempfile.TemporaryDirectory(prefix="prefbench-perf-suite-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if cold:
            env["PREFBENCH_CACHE"] = str(Path(tmp) / "cache")
        cmd = [sys.executable, "-m", "bench.cli", "run", *([suite_path] if suite_path else []), "--out", str(out)]
        cmd += [a for o in overrides for a in ("--set", o)] + (["--address", address] if address else [])
        root, peak = None, (0.0, 0.0, 0)

        def sample(pid: int) -> None:  # the run's process tree, every interval_s
            nonlocal root, peak
            try:
                root = root or psutil.Process(pid)
                peak = max(peak, tree_memory(root))
            except psutil.NoSuchProcess:  # it has just ended
                pass

        t0 = time.perf_counter()
        proc = run_child(cmd, env=env, echo="[prefbench]", poll=sample, poll_s=interval_s)
        wall = time.perf_counter() - t0
        lines, code = proc["stdout_lines"], proc["returncode"]
        if code == 2:  # the run's own one-line user error (e.g. an env that cannot be reached)
            from bench.errors import UserError

            last = next((line.strip() for line in reversed(lines) if line.startswith("prefbench: error:")), "")
            raise UserError(last.removeprefix("prefbench: error:").strip() or "prefbench run exited with 2")
        if code not in (0, 1):  # 1: some trials failed, the run and its timing.json are complete
            tail = " | ".join(line.strip() for line in lines[-3:])
            raise RuntimeError(f"prefbench run failed (exit {code}): {tail}")
        timing = json.loads((out / "timing.json").read_text())
    return {
        "suite": suite_path or "quick", "overrides": overrides, "cold": cold, "wall_s": round(wall, 1),
        "some_trials_failed": code == 1,
        "peak_pss_gib": round(peak[0] / 2**30, 3), "peak_rss_sum_gib": round(peak[1] / 2**30, 3),
        "processes_at_peak": peak[2], "memory_interval_s": interval_s, "timing": timing,
        "versions": versions("cpu"),
    }


def format_suite_perf(r: dict) -> str:
    t = r["timing"]
    cache = "empty private cache (env SFT and reward model built)" if r["cold"] else "the user's cache"
    lines = [
        f"prefbench perf --suite {r['suite']}: {r['wall_s']:.0f} s wall ({r['wall_s'] / 60:.1f} min), {cache}",
        f"  start-up         {t['startup_s']:.0f} s = {t['startup_share']:.1%} of the run's {t['wall_s']:.0f} s "
        f"(Ray {t['ray_start_s']:.1f} s + stages {sum(s['startup_s'] for s in t['stages']):.1f} s + trials "
        f"{t['trial_startup_s']:.1f} s, i.e. their start-ups / {t['concurrent_trials']} at once)",
    ]
    for s in t["stages"]:
        lines.append(f"  stage {s['stage']:12s} seed {s['seed']}: {s['wall_s']:.0f} s, of which start-up "
                     f"{s['startup_s']:.1f} s (DeepSpeed init {s['deepspeed_init_s']:.1f} s)")
    if t["trials"]:
        slots = [x["slot_s"] for x in t["trials"]]
        ups = [x["startup_s"] for x in t["trials"]]
        lines.append(f"  sweep            {t['sweep_wall_s']:.0f} s, {len(slots)} trials, {t['concurrent_trials']} at once; "
                     f"per trial median {statistics.median(slots):.0f} s of which start-up {statistics.median(ups):.1f} s")
    if r.get("some_trials_failed"):
        lines.append("  (some trials failed: their time is in the wall time, not in the per-trial split)")
    lines.append(f"  peak memory      {r['peak_pss_gib']:.2f} GiB PSS, all {r['processes_at_peak']} processes together "
                 f"(sum of RSS {r['peak_rss_sum_gib']:.2f} GiB; sampled every {r['memory_interval_s']:g} s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ output
def _precision(ds: dict) -> str:
    return "bf16" if ds.get("bf16") else "bf16 autocast" if ds.get("autocast") else "fp32"


def format_perf(r: dict) -> str:
    c, peak = r["config"], r["peak"]
    g = 1e9
    lines = [
        f"prefbench perf: env {r['env']} ({r['env_dir']})",
        f"  {c['steps']} timed steps (+{WARMUP_STEPS} warm-up) x {c['batch_size']} per step, lr {c['lr']}, {_precision(c.get('deepspeed', {}))}, "
        f"{peak['threads']} threads; medians over steps and {r['rounds']} round(s); tokens = prompt + completion (+EOS) "
        "of every trained sequence",
        f"  machine peak     fp32 matmul {peak['fp32_flops'] / g:7.1f} GFLOP/s   bf16 {peak['bf16_flops'] / g:7.1f} GFLOP/s",
    ]

    def train_line(label: str, t: dict, vs: dict | None = None) -> str:
        line = (f"  {label:16s} {t['tokens_per_s']:9.0f} tokens/s  {1000 * t['step_s']:7.1f} ms/step  "
                f"{t['flops'] / g:6.2f} GFLOP/s = {t['flops'] / peak['fp32_flops']:6.1%} of fp32 peak  "
                f"(setup {t['setup_s']:.1f} s)")
        return line + (f"   x{t['tokens_per_s'] / vs['tokens_per_s']:.2f} of TRL" if vs else "")

    trl = r.get("trl")
    lines.append(train_line("DPO train", r["dpo"]["train"], trl and trl["dpo"]))
    if trl:
        lines.append(train_line("  TRL DPOTrainer", trl["dpo"]))
    lines.append(train_line("RM train", r["rm"]["train"], trl and trl["rm"]))
    if trl:
        lines.append(train_line("  TRL RewardTr.", trl["rm"]))
    p = r["ppo"]
    lines.append(f"  PPO iteration    {p['iteration_s']:.2f} s ({p['batch_size']} prompts, {p['ppo_epochs']} epochs): "
                 f"rollout {p['rollout']['s']:.2f} s = {p['rollout']['tokens_per_s']:.0f} tokens/s; "
                 f"update {p['update']['s']:.2f} s = {p['update']['tokens_per_s']:.0f} tokens/s, "
                 f"{p['update']['flops'] / peak['fp32_flops']:.1%} of fp32 peak")
    gen = r["dpo"]["generate"]
    lines.append("  generate T=1     " + "  ".join(f"b{bs}: {v['tokens_per_s']:.0f}" for bs, v in gen.items()) + " tokens/s")
    lines.append("  peak RSS         " + "  ".join(
        f"{part}: {r[part]['peak_rss_gib']:.2f} GiB" for part in ("dpo", "rm", "ppo", "trl") if part in r)
        + "  (each part's process)")
    e = r["dpo"]["evaluate"]
    lines.append(f"  evaluate         {e['s']:.2f} s per point ({e['prompts']} prompts x {e['samples_per_prompt']} "
                 f"samples, T=1, without the gold reward)")
    return "\n".join(lines)


def main() -> None:
    part, cfg_path, out_path = sys.argv[1:4]
    from bench.worker.engine import quiet_libraries

    quiet_libraries()
    import resource

    cfg = PerfConfig(**json.loads(Path(cfg_path).read_text()))
    import torch

    from algorithms.policy import set_autocast

    set_autocast(torch.bfloat16 if cfg.deepspeed.get("autocast") else None)  # as worker_setup does in a trial
    numbers = PARTS[part](cfg)
    numbers["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    Path(out_path).write_text(json.dumps(numbers))


if __name__ == "__main__":
    main()
