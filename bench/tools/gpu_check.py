"""`python -m bench.tools.gpu_check`: does prefbench really run on CUDA? A few minutes on one GPU.

With `scaling.use_gpu: true` the same code runs on CUDA (nccl, bf16, HF generation); nothing in
algorithms/ knows which. This script checks that on a CUDA machine, for each ZeRO stage asked
(default 2 and 3), in two parts:

- **throughput** (no Ray; one subprocess per stage, since DeepSpeed initialises once per process):
  the tiny env's GPT-2 at a size given by --n-layer/--n-embd (GPT-2-small-like by default on CUDA)
  wrapped in a 1-rank DeepSpeed engine exactly as a trial wraps it (`bench.worker`); it times
  `Policy.generate` (generation tokens/s: sampled completion tokens, EOS included) and DPO steps
  through the engine (training tokens/s: prompt + completion tokens of chosen and rejected, one
  forward/backward/step), median of --repeats after one warm-up, then samples once more after the
  updates (ZeRO-3: gathered shards after a step). Peak memory: torch.cuda.max_memory_allocated on
  CUDA, the process' max RSS on CPU.
- **suite** (the real path): `python -m bench.cli run SUITE --set scaling.use_gpu=true --set
  scaling.num_workers=1 --set deepspeed.zero_stage=S --set deepspeed.bf16=true` on a small suite
  written here (SFT baseline, DPO, PPO: PPO samples rollouts while training, the ZeRO-3 generation
  path), with a private cache: Ray Train + Tune + DeepSpeed, env SFT and the reward model as Ray
  Train jobs (run under the first stage, then cached), evaluation, results. Passes when the run
  exits 0, every trial is "ok" with a summary.json, the final T = 1 gold reward and KL are finite,
  and (on CUDA) every policy-training trial's summary reports GPU memory, i.e. it really ran on the GPU.

Output: a table on stdout, progress on stderr, every number with --json PATH; logs and run
directories stay in --work-dir. Exit 0 when every check passed, 1 when one failed, 2 for bad
arguments or (with --device cuda) no CUDA device. `--device cpu` is a dry run of the same checks.
Everything fits --time-budget (default 540 s, under a 10-minute command limit): each step is
stopped at its timeout (a hang shows as "stopped after ..."), and the table is always printed.

    python -m bench.tools.gpu_check --json gpu_check.json                 # both parts, ZeRO-2 and ZeRO-3, bf16
    python -m bench.tools.gpu_check --skip-suite --n-layer 24 --n-embd 1024  # throughput only, a bigger model
    python -m bench.tools.gpu_check --device cpu --zero-stages 0 3         # dry run without a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.tools.common import run_child, versions

PROG = "prefbench gpu_check"
RESERVE_S = 10  # of --time-budget, kept for collecting results and printing the table
MIN_STEP_S = 30  # a step is not started with less time than this left
RESULT_TAG = "GPU_CHECK_RESULT "  # the throughput child's one result line on stdout
MAX_POSITIONS = 128  # tiny-sentiment's GPT-2 n_positions: prompt (<= 5 tokens) + completion must fit

# The suite of part A: tiny-sentiment at tests/suites/e2e.yaml's sizes, three trials. Scaling and
# DeepSpeed come from --set on the command line, as a user would pass them.
SUITE_YAML = """\
# written by bench.tools.gpu_check: SFT baseline, DPO, PPO (rollouts while training) on tiny sizes
name: gpu-check
env:
  name: tiny-sentiment
  params: {num_reviews: 1500, sft_epochs: 1, num_train_prompts: 100, num_eval_prompts: 32, n_layer: 2, n_embd: 64}
seeds: [0]
train: {steps: 8, batch_size: 16, lr: 1.0e-4, warmup_steps: 2, eval_every: 4}
eval: {num_prompts: 32, samples_per_prompt: 4, max_new_tokens: 24, temperatures: [0.0, 1.0]}
reward_model: {epochs: 1, batch_size: 32, lr: 1.0e-3}
algorithms:
  - {name: dpo, sweep: {beta: [0.5]}}
  - {name: ppo, train: {steps: 4, eval_every: 2}, sweep: {kl_coef: [0.1]}}
scaling: {num_workers: 1, max_concurrent_trials: 2}
"""
POLICY_TRIALS = ("dpo", "ppo")  # algorithms of SUITE_YAML that train a policy in a Ray Train worker


class UsageError(Exception):
    """A bad argument or a missing device: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" where the default depends on --device
        return action.help if action.default is None else super()._get_help_string(action)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _stage(text: str) -> int:
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"ZeRO stage must be 0, 1, 2 or 3, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench.tools.gpu_check", description=__doc__.split("\n\n")[0],
                formatter_class=_Help)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run without a GPU")
    p.add_argument("--zero-stages", type=_stage, nargs="+", default=[2, 3], metavar="S", help="ZeRO stages to check")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and compute (default: on for cuda, off for cpu)")
    p.add_argument("--skip-suite", action="store_true", help="skip part A (the suite through Ray)")
    p.add_argument("--skip-throughput", action="store_true", help="skip part B (tokens/s and memory, no Ray)")
    p.add_argument("--json", dest="json_out", metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--work-dir", help="logs and run directories (default: a new temporary directory, kept)")
    p.add_argument("--cache-dir", help="PREFBENCH_CACHE of the suite runs (default: WORK_DIR/cache, private)")
    p.add_argument("--time-budget", type=_positive, default=540,
                   help="seconds for everything: a step gets at most what is left, and the table is printed "
                        "before the budget ends (fits a 10-minute command limit)")
    g = p.add_argument_group("suite (part A)")
    g.add_argument("--suite-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for the suite runs, e.g. env.params.n_layer=4")
    g.add_argument("--suite-timeout", type=_positive, default=360, help="seconds per suite run, at most")
    g = p.add_argument_group("throughput (part B); size defaults differ for cuda / cpu")
    g.add_argument("--n-layer", type=_positive, help="GPT-2 layers (cuda 12, cpu 2)")
    g.add_argument("--n-embd", type=_positive, help="GPT-2 width (cuda 768, cpu 64)")
    g.add_argument("--n-head", type=_positive, help="attention heads (cuda 12, cpu 2)")
    g.add_argument("--prompts", type=_positive, help="prompts per generation call (cuda 256, cpu 16)")
    g.add_argument("--samples", type=_positive, default=4, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=_positive, help="tokens per completion, at most (cuda 64, cpu 16)")
    g.add_argument("--pairs", type=_positive, help="DPO pairs per step (cuda 64, cpu 8)")
    g.add_argument("--repeats", type=_positive, default=3, help="timed repeats after one warm-up (median)")
    g.add_argument("--throughput-timeout", type=_positive, default=150, help="seconds per stage, at most")
    p.add_argument("--_throughput-child", dest="child", type=_stage, help=argparse.SUPPRESS)
    return p


SIZE_DEFAULTS = {  # device -> throughput sizes
    "cuda": {"n_layer": 12, "n_embd": 768, "n_head": 12, "prompts": 256, "max_new_tokens": 64, "pairs": 64},
    "cpu": {"n_layer": 2, "n_embd": 64, "n_head": 2, "prompts": 16, "max_new_tokens": 16, "pairs": 8},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    for key, value in SIZE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.max_new_tokens > MAX_POSITIONS - 8:
        raise UsageError(f"--max-new-tokens must be <= {MAX_POSITIONS - 8} (the tiny env's GPT-2 has "
                         f"{MAX_POSITIONS} positions)")
    if args.skip_suite and args.skip_throughput:
        raise UsageError("--skip-suite and --skip-throughput together leave nothing to check")
    if len(set(args.zero_stages)) != len(args.zero_stages):
        raise UsageError("--zero-stages: a stage is listed twice")
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json_out}: its directory does not exist")
    for assignment in args.suite_set:
        if "=" not in assignment:
            raise UsageError(f"--suite-set {assignment}: expected dotted.key=value")
    return args


def check_device(args: argparse.Namespace) -> None:
    import torch

    if args.device != "cuda":
        return
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device (torch.cuda.is_available() is False); use --device cpu for a dry run")
    if args.bf16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{torch.cuda.get_device_name(0)} does not support bf16; add --no-bf16")


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _tail(log: Path, n: int = 25) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("      | " + line for line in lines[-n:])


# ------------------------------------------------------------------------ part B: throughput
# long by nature: the child's whole script (set-up, generation, DPO steps, memory), read top to bottom
def throughput_child(args: argparse.Namespace) -> None:
    """In its own process: one ZeRO stage's generation and DPO-step throughput; prints one JSON line."""
    import resource

    import torch

    from algorithms.dpo import dpo_loss
    from algorithms.interface import TrainSettings
    from algorithms.policy import Policy
    from bench.config import DeepSpeedSettings
    from bench.worker.engine import quiet_libraries, single_process_dist_env, wrap_with_deepspeed
    from envs import ENVS

    quiet_libraries()
    stage = args.child
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    single_process_dist_env()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, repeats: int) -> tuple[list[float], object]:
        fn()  # warm-up: kernels, allocator, caches
        times, out = [], None
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times, out

    env = ENVS.get("tiny-sentiment")
    params = env.params_cls(num_reviews=200, num_train_prompts=args.pairs, num_eval_prompts=args.prompts,
                            n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    with tempfile.TemporaryDirectory(prefix="prefbench-gpu-check-model-") as tmp:  # scratch: the model is big
        workdir = Path(tmp)
        env.build(params, 0, workdir)
        prompts = json.loads((workdir / "prompts.json").read_text())
        torch.manual_seed(0)
        policy = Policy.from_pretrained(workdir / "init")
    policy.model.to(device)
    n_params = sum(p.numel() for p in policy.model.parameters())

    # DPO data: two samples per prompt from the initial model; reference log-probs once (as DPO does)
    reference = policy.frozen_copy()
    roll = policy.generate(prompts["train"], n=2, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    prompt_ids = roll.prompt_ids[0::2]
    chosen, rejected = roll.completion_ids[0::2], roll.completion_ids[1::2]
    ref_chosen = reference.sequence_logps_batched(prompt_ids, chosen).to(device)
    ref_rejected = reference.sequence_logps_batched(prompt_ids, rejected).to(device)
    del reference
    b = len(prompt_ids)
    step_tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids * 2, chosen + rejected))

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train = TrainSettings(steps=args.repeats + 1, batch_size=b, lr=1e-5, warmup_steps=0, eval_every=10**6)
    t0 = time.perf_counter()
    optimize = wrap_with_deepspeed(policy, train, DeepSpeedSettings(zero_stage=stage, bf16=args.bf16), world_size=1)
    init_s = time.perf_counter() - t0
    param = next(policy.model.parameters())
    result = {
        "zero_stage": stage, "device": args.device, "engine": type(policy.engine).__name__,
        "dtype": str(param.dtype).replace("torch.", ""), "params_m": round(n_params / 1e6, 2),
        "zero3_partitioned": hasattr(param, "ds_id"), "deepspeed_init_s": round(init_s, 1),
        "sizes": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "prompts": args.prompts,
                  "samples": args.samples, "max_new_tokens": args.max_new_tokens, "pairs": b},
    }

    def generate():
        return policy.generate(prompts["eval"], n=args.samples, temperature=1.0,
                               max_new_tokens=args.max_new_tokens, seed=0)

    gen_times, gen_roll = timed(generate, args.repeats)
    gen_tokens = int(gen_roll.lengths.sum())
    result.update(gen_tokens=gen_tokens, gen_s=round(statistics.median(gen_times), 4),
                  gen_tokens_per_s=round(gen_tokens / statistics.median(gen_times), 1))

    policy.model.train()
    losses: list[float] = []
    norms: list[float] = []

    def dpo_step():
        logps = policy.sequence_logps(prompt_ids * 2, chosen + rejected)  # (2B,): chosen, then rejected
        loss = dpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, beta=0.5)[0].mean()
        opt = optimize(loss)
        losses.append(float(loss.detach()))
        norms.append(opt["grad_norm"])

    step_times, _ = timed(dpo_step, args.repeats)
    result.update(train_tokens_per_step=step_tokens, train_step_s=round(statistics.median(step_times), 4),
                  train_tokens_per_s=round(step_tokens / statistics.median(step_times), 1),
                  dpo_losses=[round(x, 5) for x in losses], grad_norms=[round(x, 5) for x in norms])

    after = generate()  # sampling again after optimizer steps (ZeRO-3: re-gathering the updated shards)
    result["gen_after_steps_tokens"] = int(after.lengths.sum())
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["peak_memory_kind"] = "GPU max_memory_allocated"
    else:
        result["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        result["peak_memory_kind"] = "process max RSS"
    problems = []
    if not all(math.isfinite(x) for x in losses + norms):
        problems.append(f"non-finite DPO loss or grad norm: losses {losses}, grad norms {norms}")
    if stage == 3 and not result["zero3_partitioned"]:
        problems.append("ZeRO-3 engine but the parameters are not partitioned (no ds_id)")
    if args.bf16 and result["dtype"] != "bfloat16":
        problems.append(f"bf16 asked but the engine's module is {result['dtype']}")
    if cuda and param.device.type != "cuda":
        problems.append(f"parameters on {param.device}, not cuda")
    if gen_tokens <= 0 or result["gen_after_steps_tokens"] <= 0:
        problems.append("generation produced no tokens")
    result["problems"] = problems
    result["ok"] = not problems
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_throughput(args: argparse.Namespace, stage: int, work: Path, timeout: int) -> dict:
    log = work / f"throughput-zero{stage}.log"
    cmd = [sys.executable, "-m", "bench.tools.gpu_check", "--_throughput-child", str(stage), "--device", args.device,
           "--bf16" if args.bf16 else "--no-bf16",
           "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", str(args.n_head),
           "--prompts", str(args.prompts), "--samples", str(args.samples), "--max-new-tokens",
           str(args.max_new_tokens), "--pairs", str(args.pairs), "--repeats", str(args.repeats)]
    say(f"throughput ZeRO-{stage}: {args.n_layer} layers x {args.n_embd}, {args.prompts} prompts x {args.samples} "
        f"samples x <= {args.max_new_tokens} tokens, DPO {args.pairs} pairs/step (log: {log})")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = run_child(cmd, log=log, timeout=timeout, env=env)
    found = [line[len(RESULT_TAG):] for line in proc["stdout_lines"] if line.startswith(RESULT_TAG)]
    if found:
        result = json.loads(found[-1])
    else:
        result = {"zero_stage": stage, "ok": False, "problems": []}
    result.update(wall_s=proc["wall_s"], log=str(log))
    if proc["timed_out"]:
        result["ok"] = False
        result["problems"].append(f"stopped after {timeout}s (a hang? see the log)")
    elif proc["returncode"] != 0:
        result["ok"] = False
        result["problems"].append(f"exit code {proc['returncode']}: {_last_error(proc['stdout_lines'])}")
    if result["ok"]:
        say(f"throughput ZeRO-{stage}: ok in {proc['wall_s']:.0f}s: generation {result['gen_tokens_per_s']:,.0f} "
            f"tokens/s, DPO training {result['train_tokens_per_s']:,.0f} tokens/s, peak {result['peak_memory_gib']} GiB")
    else:
        say(f"throughput ZeRO-{stage}: FAILED: {'; '.join(result['problems'])}\n{_tail(log)}")
    return result


def _last_error(lines: list[str]) -> str:
    """The most telling line of a failed child's output: the exception line of its last traceback."""
    for line in reversed(lines):
        s = line.strip()
        if s and not s.startswith(("File ", "^", "~")) and ("Error" in s or "Exception" in s or "error:" in s):
            return s[-400:]
    return (lines[-1].strip()[-400:] if lines else "no output")


# ----------------------------------------------------------------------------- part A: suite
def run_suite(args: argparse.Namespace, stage: int, work: Path, cache: Path, timeout: int) -> dict:
    """One suite run through the CLI (Ray Train + Tune + DeepSpeed), then its results read back."""
    import pandas as pd

    from bench.results import SUMMARY_FILE, trial_dir

    suite_file = work / "gpu_check_suite.yaml"
    suite_file.write_text(SUITE_YAML)
    out = work / f"suite-zero{stage}"
    k = 1
    while out.exists():  # a reused --work-dir: never clash with an earlier run
        k += 1
        out = work / f"suite-zero{stage}-{k}"
    log = work / f"{out.name}.log"
    sets = [f"scaling.use_gpu={'true' if args.device == 'cuda' else 'false'}", "scaling.num_workers=1",
            f"deepspeed.zero_stage={stage}", f"deepspeed.bf16={'true' if args.bf16 else 'false'}", *args.suite_set]
    cmd = [sys.executable, "-m", "bench.cli", "run", str(suite_file), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    say(f"suite ZeRO-{stage}: prefbench run (sft, dpo, ppo) with {' '.join(sets)} (log: {log})")
    env = {**os.environ, "PREFBENCH_CACHE": str(cache)}
    proc = run_child(cmd, log=log, timeout=timeout, env=env, echo="[prefbench]")
    result = {"zero_stage": stage, "out": str(out), "log": str(log), "returncode": proc["returncode"],
              "wall_s": proc["wall_s"], "trials": {}, "problems": [], "warnings": []}
    problems = result["problems"]
    if proc["timed_out"]:
        problems.append(f"stopped after {timeout}s (a hang? see the log; --suite-timeout, --time-budget)")
    elif proc["returncode"] != 0:
        problems.append(f"prefbench run exited {proc['returncode']}: {_last_error(proc['stdout_lines'])}")
    trials_path, evals_path = out / "trials.parquet", out / "evals.parquet"
    if trials_path.is_file() and evals_path.is_file():
        trials = pd.read_parquet(trials_path)
        evals = pd.read_parquet(evals_path)
        final = evals[evals["final"].astype(bool) & (evals["temperature"] == 1.0)]
        for row in trials.itertuples():
            info: dict = {"algorithm": row.algorithm, "status": row.status, "reason": row.reason or ""}
            t1 = final[final["trial_id"] == row.trial_id]
            if len(t1):
                info["gold_reward_t1"] = float(t1["gold_reward"].iloc[-1])
                info["kl_t1"] = float(t1["kl"].iloc[-1])
            summary_path = trial_dir(out, row.trial_id) / SUMMARY_FILE
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                info["wall_time_s"] = summary.get("wall_time_s")
                info["peak_gpu_memory_gib"] = summary.get("peak_gpu_memory_gib")
            result["trials"][row.trial_id] = info
            if row.status != "ok":
                problems.append(f"trial {row.trial_id} {row.status}: {info['reason']}")
                continue
            if not summary_path.is_file():
                problems.append(f"trial {row.trial_id}: no summary.json")
            if not (math.isfinite(info.get("gold_reward_t1", math.nan)) and math.isfinite(info.get("kl_t1", math.nan))):
                problems.append(f"trial {row.trial_id}: no finite final gold reward / KL at T=1")
            if args.device == "cuda" and row.algorithm in POLICY_TRIALS and not info.get("peak_gpu_memory_gib"):
                # bench.worker.run_trial writes peak_gpu_memory_gib whenever its device is CUDA
                problems.append(f"trial {row.trial_id}: its summary reports no GPU memory: the worker ran on CPU")
        if trials.empty:
            problems.append("trials.parquet has no trials")
    elif not proc["timed_out"]:
        problems.append(f"no trials.parquet/evals.parquet in {out}")
    result["ok"] = not problems
    if result["ok"]:
        say(f"suite ZeRO-{stage}: ok in {proc['wall_s']:.0f}s ({len(result['trials'])} trials ok)")
    else:
        say(f"suite ZeRO-{stage}: FAILED after {proc['wall_s']:.0f}s: {'; '.join(problems)}\n{_tail(log)}")
    return result


# ------------------------------------------------------------------------------------ report
def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def _state(part: dict | None) -> str:
    if part is None:
        return "skipped"
    if part.get("not_run"):
        return "not run"
    return "ok" if part["ok"] else "FAILED"


def format_table(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"prefbench gpu_check on {v['device_name']}"
        + (f" (CUDA {v['cuda']}, compute capability {v['capability']}, {v['device_memory_gib']} GiB)"
           if report["device"] == "cuda" else ""),
        f"torch {v['torch']}  deepspeed {v['deepspeed']}  ray {v['ray']}  transformers {v['transformers']}  "
        f"python {v['python']}",
        "",
    ]
    header = (f"{'ZeRO':>4}  {'device':6}  {'dtype':8}  {'params (M)':>10}  {'gen tokens/s':>12}  "
              f"{'train tokens/s':>14}  {'peak mem GiB':>12}  {'throughput':10}  suite run")
    lines += [header, "-" * len(header)]
    for s in report["stages"]:
        tp, suite = s.get("throughput"), s.get("suite")
        tp_state = _state(tp)
        suite_state = _state(suite) + (f" ({suite['wall_s']:.0f} s)" if suite and not suite.get("not_run") else "")
        tp = tp or {}
        dtype = DTYPES.get(tp.get("dtype"), tp.get("dtype")) or ("bf16" if report["bf16"] else "fp32")
        lines.append(
            f"{s['zero_stage']:>4}  {report['device']:6}  {dtype:8}  {_num(tp.get('params_m'), '.1f'):>10}  "
            f"{_num(tp.get('gen_tokens_per_s'), ',.0f'):>12}  {_num(tp.get('train_tokens_per_s'), ',.0f'):>14}  "
            f"{_num(tp.get('peak_memory_gib'), '.3f'):>12}  {tp_state:10}  {suite_state}"
        )
    tps = [s["throughput"] for s in report["stages"] if s.get("throughput") and "sizes" in s["throughput"]]
    if tps:
        z = tps[0]["sizes"]
        lines += [
            "",
            f"throughput: GPT-2 {z['n_layer']} layers x {z['n_embd']} (tiny-sentiment vocab), 1 rank, no Ray; "
            f"median of {report['repeats']} after a warm-up",
            f"  gen tokens/s   = sampled tokens (EOS included) of {z['prompts']} prompts x {z['samples']} samples "
            f"x <= {z['max_new_tokens']} new tokens, per second of Policy.generate",
            f"  train tokens/s = prompt + completion tokens of {z['pairs']} DPO pairs (chosen and rejected) per "
            "second of forward + backward + optimizer step through the DeepSpeed engine",
            f"  peak mem       = {tps[0].get('peak_memory_kind', '?')} of the process, GiB",
        ]
    suites = [s for s in report["stages"] if s.get("suite")]
    if suites:
        lines += ["", "suite runs (prefbench run through Ray Train + Tune + DeepSpeed, 1 worker): final evaluation at T=1"]
        lines.append(f"  {'ZeRO':>4}  {'trial':24}  {'status':7}  {'gold':>6}  {'KL nats':>8}  {'GPU GiB':>8}  {'wall s':>6}")
        for s in suites:
            for trial_id, t in s["suite"]["trials"].items():
                lines.append(
                    f"  {s['zero_stage']:>4}  {trial_id:24}  {t['status']:7}  {_num(t.get('gold_reward_t1'), '.3f'):>6}  "
                    f"{_num(t.get('kl_t1'), '.3f'):>8}  {_num(t.get('peak_gpu_memory_gib'), '.3f'):>8}  "
                    f"{_num(t.get('wall_time_s'), '.0f'):>6}"
                )
        lines.append("  (the env's SFT and reward model are trained under the first stage's run, then cached;"
                     " sft = the reference, run in the Tune trial process)")
    failures = report["failures"]
    lines += ["", f"work dir (logs, runs): {report['work_dir']}"]
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines.append("RESULT: PASS" if not failures else "RESULT: FAIL\n" + "\n".join(f"  - {f}" for f in failures))
    return "\n".join(lines)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _write_json(path: str | None, report: dict) -> None:
    if path:
        from bench.results import write_text_atomic

        write_text_atomic(Path(path), json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.child is not None:
            throughput_child(args)
            return 0
        check_device(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)  # -> SystemExit: run_logged stops the running child
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="prefbench-gpu-check-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    report = {
        "device": args.device, "bf16": args.bf16, "zero_stages": args.zero_stages, "repeats": args.repeats,
        "versions": versions(args.device), "work_dir": str(work), "cache_dir": str(cache),
        "stages": [{"zero_stage": s, "throughput": None, "suite": None} for s in args.zero_stages],
        "failures": [], "warnings": [], "ok": False,
    }
    v = report["versions"]
    say(f"device {v['device_name']}; torch {v['torch']}, deepspeed {v['deepspeed']}, ray {v['ray']}; "
        f"ZeRO stages {args.zero_stages}, {'bf16' if args.bf16 else 'fp32'}; work dir {work}")
    t0 = time.time()
    deadline = t0 + args.time_budget - RESERVE_S

    def timeout_for(limit: int) -> int | None:
        left = int(deadline - time.time())
        return min(limit, left) if left >= MIN_STEP_S else None

    # throughput first: quick, and its numbers survive a suite run that hangs
    steps = ([("throughput", e) for e in report["stages"]] if not args.skip_throughput else []) + \
            ([("suite", e) for e in report["stages"]] if not args.skip_suite else [])
    for part, entry in steps:
        stage = entry["zero_stage"]
        timeout = timeout_for(args.throughput_timeout if part == "throughput" else args.suite_timeout)
        if timeout is None:
            entry[part] = {"zero_stage": stage, "ok": False, "not_run": True, "wall_s": 0.0, "trials": {},
                           "problems": [f"not run: the --time-budget of {args.time_budget}s is spent"]}
            say(f"{part} ZeRO-{stage}: not run, the --time-budget of {args.time_budget}s is spent")
        elif part == "throughput":
            entry[part] = run_throughput(args, stage, work, timeout)
        else:
            entry[part] = run_suite(args, stage, work, cache, timeout)
        _write_json(args.json_out, report)
    for entry in report["stages"]:
        for part in ("throughput", "suite"):
            if entry[part] is not None:
                tag = f"{part} ZeRO-{entry['zero_stage']}"
                report["failures"] += [f"{tag}: {p}" for p in entry[part]["problems"]]
                report["warnings"] += [f"{tag}: {w}" for w in entry[part].get("warnings", [])]
    report["ok"] = not report["failures"]
    report["wall_s"] = round(time.time() - t0, 1)
    _write_json(args.json_out, report)
    print(format_table(report), flush=True)
    say(f"done in {report['wall_s']:.0f}s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
