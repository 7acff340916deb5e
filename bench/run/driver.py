"""`prefbench run`: validate → start Ray → prepare envs (cached) → sweep → results → report.

A UserError (config, paths, data) leaves nothing behind; a failed shared stage is a StageError;
Ctrl-C / SIGTERM shut Ray down, write no results and say how to `--resume`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from bench import package_versions, say
from bench.config import SuiteConfig, env_params, expand_trials, load_suite, to_yaml
from bench.errors import Interrupted, StageError, UserError
from bench.results import finished_trials
from bench.run.prepare import (cache_root, check_env_data, check_env_reachable, env_cache_dir, prepare_env,
                                prepare_reward_model, rm_cache_dir)
from bench.run.timing import run_timing
from envs import ENVS


def default_out(suite: SuiteConfig) -> Path:
    return Path("runs") / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(suite_path: str | None, overrides: list[str], address: str | None = None) -> str:
    """`prefbench run --dry-run`: the validated suite's trial plan and the resources it asks for; runs nothing.

    Starts neither Ray nor an env, loads no model and touches no hub: a suite meant for a GPU
    cluster validates on a laptop. Cached env and reward-model stages are reported as such.
    """
    from algorithms import ALGORITHMS

    suite = load_suite(suite_path, overrides)
    trials = expand_trials(suite)
    seeds = sorted({t.seed for t in trials})
    sc, ds, ev = suite.scaling, suite.deepspeed, suite.eval
    rm_users = sorted({a.name for a in suite.algorithms if "reward_model" in ALGORITHMS.get(a.name).needs})
    lines = [f"suite {suite.name}: env {suite.env.name}, seeds {seeds}, {len(trials)} trials",
             f"env params: {json.dumps(dataclasses.asdict(env_params(suite)))}", "stages (once per seed, cached):"]
    for seed in seeds:
        state = "cached" if (env_cache_dir(suite, seed) / "DONE").exists() else "to build"
        lines.append(f"  env {suite.env.name} seed {seed}: {state}")
        if rm_users:
            state = "cached" if (rm_cache_dir(suite, seed) / "DONE").exists() else "to train"
            lines.append(f"  reward model seed {seed}: {state} (for {', '.join(rm_users)})")
    lines.append("trials:")
    width = max(len(t.trial_id) for t in trials)
    for t in trials:
        knob = f"{t.knob}={t.knob_value:g}" if t.knob and t.knob_value is not None else "-"
        steps = f"{t.train['steps']} steps x {t.train['batch_size']}" if ALGORITHMS.get(t.algorithm).trains_policy \
            else "no training"
        lines.append(f"  {t.trial_id:{width}s}  {t.algorithm:14s} {knob:16s} seed {t.seed}  {steps}")
    worker = sc.worker_resources()
    concurrent = min(sc.max_concurrent_trials, len(trials))
    peak = {k: v * sc.num_workers * concurrent for k, v in worker.items()}
    peak["CPU"] = peak.get("CPU", 0) + concurrent  # each Tune trial's driver holds 1 CPU
    lines += [
        "resources:",
        f"  Ray: {'cluster at ' + address if address else 'embedded (ray.init on this machine)'}",
        f"  per trial: {sc.num_workers} worker(s) x {json.dumps(worker)} + 1 CPU for its Tune driver; "
        f"{concurrent} trial(s) at once -> {json.dumps(peak)}",
        f"  DeepSpeed: ZeRO-{ds.zero_stage}, {'bf16' if ds.bf16 else 'fp32 weights, bf16 autocast' if ds.autocast else 'fp32'}"
        + (", optimizer offload" if ds.offload_optimizer else "") + (", param offload" if ds.offload_param else ""),
        f"  evaluation: {ev.num_prompts} prompts x {ev.samples_per_prompt} samples x <= {ev.max_new_tokens} tokens "
        f"at T = {', '.join(f'{t:g}' for t in ev.temperatures)}",
        f"  cache: {cache_root(suite)}",
        "dry run: nothing was started or written",
    ]
    return "\n".join(lines)


def warn_broken_plugins() -> None:
    """One line per plugin that failed to load (this suite does not use it, or validation had stopped)."""
    from algorithms import ALGORITHMS

    for reg in (ALGORITHMS, ENVS):
        for name, reason in reg.broken.items():
            say(f"[prefbench] skipped {reg.kind} plugin {name}: {reason}")


def run(
    suite_path: str | None, overrides: list[str], out: str | None, address: str | None, resume: bool = False
) -> tuple[Path, int]:
    """Run a suite; returns (OUT, number of failed trials). A UserError leaves no OUT behind.

    With `resume`, OUT is a run of the same suite that was stopped: trials that finished are kept
    as they are, the others run again, each from its last checkpoint where it saved one.
    """
    suite = load_suite(suite_path, overrides)  # ConfigError before anything starts
    trials = expand_trials(suite)
    check_env_reachable(suite)
    warn_broken_plugins()
    out_dir = Path(out) if out else default_out(suite)
    again = shlex.join(["prefbench", "run", *([suite_path] if suite_path else []), "--out", str(out_dir),
                        *[x for o in overrides for x in ("--set", o)], *(["--address", address] if address else []),
                        "--resume"])
    if resume:
        if out is None:
            raise UserError("--resume needs --out: the directory of the run to continue")
        _check_resumable(out_dir, suite)
        with _stop_on_signals():
            try:
                return out_dir, _run(suite, trials, out_dir, address, resume=True)
            except KeyboardInterrupt:
                raise Interrupted(_interrupted(out_dir, trials, again)) from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        hint = "; add --resume to continue it" if (out_dir / "config.yaml").is_file() else ""
        raise UserError(f"--out {out_dir}: already exists and is not an empty directory{hint}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _stop_on_signals():
        try:
            return out_dir, _run(suite, trials, out_dir, address)
        except (UserError, StageError):
            _remove_run(out_dir, created)
            raise
        except KeyboardInterrupt:
            if not finished_trials(out_dir, trials) and not (out_dir / "config.yaml").is_file():
                _remove_run(out_dir, created)  # stopped before the run was recorded: nothing to resume
                raise Interrupted("interrupted before the run started; nothing was written") from None
            raise Interrupted(_interrupted(out_dir, trials, again)) from None


def _remove_run(out_dir: Path, created: bool) -> None:
    """Leave --out as it was before this run: removed if the run created it, else emptied."""
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        for child in out_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _interrupted(out_dir: Path, trials: list, again: str) -> str:
    done = len(finished_trials(out_dir, trials))
    return (f"interrupted: {done} of {len(trials)} trials finished and kept in {out_dir} (the others from their "
            f"last checkpoints); continue with: {again}")


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt in the main thread, wherever the run is
    (waiting for a Ray Train stage, inside Tune's loop): `_run` shuts Ray down on the way out and
    writes no results. A second signal exits at once (130) without waiting for Ray's shutdown."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, second)
        raise KeyboardInterrupt

    def second(signum, frame):
        print("prefbench: stopped again: exiting now, without waiting for Ray to shut down", file=sys.stderr)
        os._exit(130)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, first)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_resumable(out_dir: Path, suite: SuiteConfig) -> None:
    saved = out_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume: {out_dir} holds no prefbench run (no config.yaml)")
    if saved.read_text() != to_yaml(suite):
        raise UserError(f"--resume: the suite and --set values differ from those of the run in {out_dir} "
                        "(see its config.yaml); resume with the same ones")


def run_storage(suite: SuiteConfig, out_dir: Path) -> str:
    """Ray's storage_path for this run: OUT/ray, or a folder of `storage_path` named after OUT (so runs
    sharing a storage_path never see each other's trial checkpoints)."""
    out_dir = out_dir.resolve()
    if not suite.storage_path:
        return str(out_dir / "ray")
    tag = hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]
    return f"{suite.storage_path.rstrip('/')}/{out_dir.name}-{tag}"


def _run(suite: SuiteConfig, trials: list, out_dir: Path, address: str | None, resume: bool = False) -> int:
    from algorithms import ALGORITHMS
    from algorithms.interface import family
    from bench.run import ray_runner
    from bench import report, results
    from bench.worker.engine import quiet_libraries

    quiet_libraries()
    suite_dict = json.loads(json.dumps(dataclasses.asdict(suite)))
    t0 = time.time()
    done = finished_trials(out_dir, trials) if resume else set()
    todo = [t for t in trials if t.trial_id not in done]
    if resume:
        say(f"[prefbench] resuming {out_dir}: {len(done)} of {len(trials)} trials finished, {len(todo)} to run")
    else:
        say(f"[prefbench] suite {suite.name}: {len(trials)} trials on env {suite.env.name} → {out_dir}")
        results.write_text_atomic(out_dir / "config.yaml", to_yaml(suite))  # written first: it marks a prefbench run
    status: dict[str, str | None] = {t: None for t in done}
    timing: dict = {"ray_start_s": 0.0, "stages": [], "sweep_wall_s": 0.0, "slots": {}}
    if todo:
        t_ray = time.time()
        ray_runner.start_ray(suite, address)
        timing["ray_start_s"] = time.time() - t_ray
        try:
            storage = run_storage(suite, out_dir)
            env_dirs, rm_dirs = {}, {}
            needs_rm = any("reward_model" in ALGORITHMS.get(t.algorithm).needs for t in todo)
            for seed in sorted({t.seed for t in todo}):
                with _stage_errors(f"env {suite.env.name} seed {seed}"):
                    env_dirs[seed] = prepare_env(suite, suite_dict, seed, storage, timing["stages"])
                check_env_data(suite, seed, env_dirs[seed])
                if needs_rm:
                    with _stage_errors(f"reward model {suite.env.name} seed {seed}"):
                        rm_dirs[seed] = prepare_reward_model(
                            suite, suite_dict, seed, env_dirs[seed], storage, timing["stages"])
            name = f"sweep-resume-{time.strftime('%Y%m%d-%H%M%S')}" if resume else "sweep"
            t_sweep = time.time()
            swept, timing["slots"] = ray_runner.run_sweep(
                suite, suite_dict, todo, env_dirs, rm_dirs, out_dir, storage, name=name, suite_trials=len(trials))
            timing["sweep_wall_s"] = time.time() - t_sweep
            status.update(swept)
        finally:
            ray_runner.stop_ray()
    results.write_text_atomic(out_dir / "versions.json", json.dumps(package_versions(), indent=2))
    families = {t.algorithm: family(ALGORITHMS.get(t.algorithm)) for t in trials}
    evals, trials_df = results.collect(out_dir, suite.name, suite.env.name, trials, status, families)
    path = report.write_report(out_dir)
    if todo:
        timing_doc = run_timing(out_dir, timing, time.time() - t0, min(suite.scaling.max_concurrent_trials, len(todo)))
        results.write_text_atomic(out_dir / "timing.json", json.dumps(timing_doc, indent=1))
    failed = int((trials_df["status"] != "ok").sum())
    say(f"[prefbench] {len(trials) - failed}/{len(trials)} trials ok in {time.time() - t0:.0f}s; report: {path}")
    return failed


@contextlib.contextmanager
def _stage_errors(label: str):
    """A shared stage's Ray Train job that failed → StageError with the worker's own error in one line."""
    from bench.run.ray_runner import one_line

    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise StageError(f"{label}: the stage failed: {one_line(e)}") from None
