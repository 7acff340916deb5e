"""`prefbench run`: validate → start Ray → prepare envs (cached) → sweep → results → report."""

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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench import __version__, say
from bench.config import SuiteConfig, env_params, expand_trials, load_suite, to_yaml
from envs import ENVS

# 2: pairs/references carry whether each sample ended on EOS; models train without dropout
ENV_CACHE_FORMAT = 2  # bump when the layout of a prepared env changes
RM_CACHE_FORMAT = 2  # bump when the layout or training of the reward-model stage changes


class UserError(Exception):
    """A mistake the user can fix (paths, existing output); printed as one line, exit 2."""


class StageError(Exception):
    """A shared stage (the env's SFT and pairs, the reward model) failed: one line, exit 1. The sweep
    cannot start without it; a run that had just started is removed, as after a UserError."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run: Ray was shut down, nothing half-written; str() says
    how to continue (exit 130)."""


def cache_root(suite: SuiteConfig) -> Path:
    root = suite.cache_dir or os.environ.get("PREFBENCH_CACHE") or Path.home() / ".cache" / "prefbench"
    return Path(root).expanduser().resolve()


def env_key(suite: SuiteConfig, seed: int) -> str:
    """Content hash of everything a prepared env depends on."""
    params = dataclasses.asdict(env_params(suite))
    blob = json.dumps(
        {"env": suite.env.name, "params": params, "seed": seed, "bf16": suite.deepspeed.bf16,
         "format": ENV_CACHE_FORMAT, "env_version": getattr(ENVS.get(suite.env.name), "version", 0)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def env_cache_dir(suite: SuiteConfig, seed: int) -> Path:
    """Where the prepared env of `seed` is cached."""
    return cache_root(suite) / "envs" / f"{suite.env.name}-seed{seed}-{env_key(suite, seed)}"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (a cache entry's DONE holds it)."""
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != "DONE"}


def cache_problem(workdir: Path) -> str | None:
    """Why the cache entry `workdir` cannot be used (a file of its manifest missing or changed), or None.

    Files added after the build (an env's `reference_evals/`) are not in the manifest and not checked.
    Entries written before manifests existed (no "files" in DONE) are taken as they are."""
    try:
        files = json.loads((workdir / "DONE").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return "its DONE marker is unreadable"
    for rel, digest in files.items():
        path = workdir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if _sha256(path) != digest:
            return f"{rel} does not match its sha256"
    return None


def _build_cached(workdir: Path, build, label: str) -> Path:
    """Run `build(tmp)` once into `workdir` (atomic: temp dir → rename, DONE marker holding the sha256
    of every file); reuse it after, once its files match their hashes. A corrupt entry is rebuilt."""
    if (workdir / "DONE").exists():
        problem = cache_problem(workdir)
        if problem is None:
            say(f"[prefbench] {label}: cached at {workdir}")
            return workdir
        say(f"[prefbench] {label}: cache entry {workdir} is corrupt ({problem}); rebuilding it")
        stale = workdir.with_name(f"{workdir.name}.corrupt-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another run may be replacing it too
            os.replace(workdir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = workdir.with_name(f"{workdir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-built stage left in the cache
        raise
    (tmp / "DONE").write_text(json.dumps(
        {"seconds": round(time.time() - t0, 1), "prefbench": __version__, "files": file_manifest(tmp)}))
    if workdir.exists():  # another run finished it meanwhile: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, workdir)
    say(f"[prefbench] {label}: ready in {time.time() - t0:.0f}s ({workdir})")
    return workdir


def stage_timing(stage: str, seed: int, wall_s: float, stage_dir: Path) -> dict:
    """One shared stage's timing: its Ray Train job's wall time, the worker's own work, and start-up =
    the rest (Ray Train, worker processes, imports) + DeepSpeed's initialisation."""
    from bench.worker import STAGE_TIMING

    inner = json.loads((stage_dir / STAGE_TIMING).read_text())
    startup = wall_s - inner["worker_s"] + inner["deepspeed_init_s"]
    return {"stage": stage, "seed": seed, "wall_s": round(wall_s, 2), **inner, "startup_s": round(startup, 2)}


def prepare_env(
    suite: SuiteConfig, suite_dict: dict, seed: int, storage: str | Path, timing: list | None = None
) -> Path:
    """Build + SFT the env for `seed` once; later runs with the same config reuse the cache.

    `timing`, when given, receives the stage's timing (nothing when the env was cached)."""
    from bench import ray_runner

    env = ENVS.get(suite.env.name)
    label = f"env {suite.env.name} seed {seed}"

    def build(tmp: Path) -> None:
        say(f"[prefbench] {label}: building data, tokenizer and initial model")
        try:
            env.build(env_params(suite), seed, tmp)
        except ValueError as e:  # a data problem the env states in one line (empty dataset, missing split)
            raise UserError(str(e)) from None
        say(f"[prefbench] {label}: SFT + pairs as a Ray Train job (Ray Train + DeepSpeed)")
        wall = ray_runner.run_env_stage(suite, suite_dict, seed, tmp, storage)
        if timing is not None:
            timing.append(stage_timing("env", seed, wall, tmp))

    return _build_cached(env_cache_dir(suite, seed), build, label)


def rm_key(suite: SuiteConfig, seed: int) -> str:
    """Content hash of the reward model: its env (by env_key), its training config, the precision."""
    blob = json.dumps(
        {"env": env_key(suite, seed), "rm": dataclasses.asdict(suite.reward_model), "seed": seed,
         "bf16": suite.deepspeed.bf16, "format": RM_CACHE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rm_cache_dir(suite: SuiteConfig, seed: int) -> Path:
    """Where the reward model of `seed` is cached."""
    return cache_root(suite) / "reward_models" / f"{suite.env.name}-seed{seed}-{rm_key(suite, seed)}"


def prepare_reward_model(
    suite: SuiteConfig, suite_dict: dict, seed: int, env_dir: Path, storage: str | Path, timing: list | None = None
) -> Path:
    """Train the shared reward model for (env, seed, RM config) once, as a Ray Train job; cached."""
    from bench import ray_runner

    label = f"reward model {suite.env.name} seed {seed}"

    def build(tmp: Path) -> None:
        say(f"[prefbench] {label}: Bradley-Terry on the env's pairs as a Ray Train job")
        wall = ray_runner.run_rm_stage(suite, suite_dict, seed, env_dir, tmp, storage)
        if timing is not None:
            timing.append(stage_timing("reward_model", seed, wall, tmp))
        m = json.loads((tmp / "metrics.json").read_text())
        say(f"[prefbench] {label}: held-out pair accuracy {m['rm/heldout_accuracy']:.3f} "
            f"({m['rm/heldout_pairs']} pairs), Pearson with gold {m['rm/heldout_gold_pearson']:.3f}")

    return _build_cached(rm_cache_dir(suite, seed), build, label)


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "prefbench": __version__}
    for name in ("torch", "ray", "deepspeed", "transformers", "tokenizers", "datasets", "pandas", "vaderSentiment"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def default_out(suite: SuiteConfig) -> Path:
    return Path("runs") / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_env_data(suite: SuiteConfig, seed: int, workdir: Path) -> None:
    """An env that came out empty is a user-fixable problem (its params), not a crash mid-sweep."""
    from algorithms import ALGORITHMS
    from envs.base import load_env_data

    data = load_env_data(workdir)
    where = f"env {suite.env.name} (seed {seed})"
    if not data.eval_prompts:
        raise UserError(f"{where} has no eval prompts; check env.params")
    needs = set().union(*(ALGORITHMS.get(a.name).needs for a in suite.algorithms))
    if "pairs" in needs and len(data.pairs) == 0:
        raise UserError(f"{where} produced no preference pairs; check env.params (e.g. min_gold_gap)")
    if "prompts" in needs and not data.train_prompts:
        raise UserError(f"{where} has no train prompts; check env.params")
    prompts = data.eval_prompts[: suite.eval.num_prompts] + (data.train_prompts if "prompts" in needs else [])
    problem = context_problem(workdir / "sft", prompts, suite.eval.max_new_tokens)
    if problem:
        raise UserError(f"{where}: {problem}")


def context_problem(model_dir: Path, prompts: list[str], max_new_tokens: int) -> str | None:
    """Why prompts + `max_new_tokens` sampled tokens would not fit the policy's context (absolute
    position embeddings fail with an index error mid-trial), or None. Reads only the config and the
    tokenizer; a policy without a `config.json` there (a GGUF file: smol-sentiment) is not checked."""
    if not (model_dir / "config.json").is_file() or not prompts:
        return None
    from transformers import AutoConfig, AutoTokenizer

    from envs.hub import context_length

    found = context_length(AutoConfig.from_pretrained(model_dir))
    if found is None:
        return None
    context = found[0]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(model_dir)(prompts, add_special_tokens=True)["input_ids"]]
    longest = max(lengths)
    if longest + max_new_tokens <= context:
        return None
    too_long = sum(n + max_new_tokens > context for n in lengths)
    return (f"{too_long} of {len(prompts)} prompts (eval, and train for algorithms that sample them) do not fit the "
            f"policy's context of {context} tokens with eval.max_new_tokens={max_new_tokens}: the longest is "
            f"{longest} tokens; set eval.max_new_tokens <= {context - longest}")


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
        f"  DeepSpeed: ZeRO-{ds.zero_stage}, {'bf16' if ds.bf16 else 'fp32'}"
        + (", optimizer offload" if ds.offload_optimizer else "") + (", param offload" if ds.offload_param else ""),
        f"  evaluation: {ev.num_prompts} prompts x {ev.samples_per_prompt} samples x <= {ev.max_new_tokens} tokens "
        f"at T = {', '.join(f'{t:g}' for t in ev.temperatures)}",
        f"  cache: {cache_root(suite)}",
        "dry run: nothing was started or written",
    ]
    return "\n".join(lines)


def check_env_reachable(suite: SuiteConfig) -> None:
    """Every model and dataset the env names can be loaded here (hub or local files), before Ray starts."""
    from envs.base import preflight
    from envs.hub import Unavailable

    try:
        preflight(ENVS.get(suite.env.name), env_params(suite))
    except Unavailable as e:
        raise UserError(str(e)) from None


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


def finished_trials(out_dir: Path, trials: list) -> set[str]:
    """Trials whose summary.json exists: written last, atomically, by a trial that completed."""
    return {t.trial_id for t in trials if (out_dir / "trials" / t.trial_id / "summary.json").is_file()}


def _run(suite: SuiteConfig, trials: list, out_dir: Path, address: str | None, resume: bool = False) -> int:
    from algorithms import ALGORITHMS
    from bench import ray_runner, report, results
    from bench.worker import _quiet

    _quiet()
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
    evals, trials_df = results.collect(out_dir, suite.name, suite.env.name, trials, status)
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
    from bench.ray_runner import one_line

    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise StageError(f"{label}: the stage failed: {one_line(e)}") from None


def run_timing(out_dir: Path, timing: dict, wall_s: float, concurrent: int) -> dict:
    """Where this run's wall time went, and how much of it was start-up (timing.json).

    Start-up = Ray's own start + each shared stage's start-up (see `stage_timing`) + each trial's
    start-up divided by the number of trials running at once. A trial's start-up is its slot (Tune
    starting it → its end: trial process, TorchTrainer, worker processes, imports, teardown) less
    the trial's own work (`wall_time_s` of summary.json) plus DeepSpeed's initialisation. Resumed
    trials are left out (their wall time carries over from the stopped run).
    """
    trials = []
    for trial_id, slot in sorted(timing["slots"].items()):
        path = out_dir / "trials" / trial_id / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        if summary.get("resumed_from") is not None:
            continue
        work = summary["wall_time_s"] - summary.get("deepspeed_init_s", 0.0)
        trials.append({"trial_id": trial_id, "slot_s": round(slot, 2), "work_s": round(work, 2),
                       "startup_s": round(slot - work, 2)})
    stage_startup = sum(s["startup_s"] for s in timing["stages"])
    trial_startup = sum(t["startup_s"] for t in trials) / max(concurrent, 1)
    startup = timing["ray_start_s"] + stage_startup + trial_startup
    return {
        "wall_s": round(wall_s, 1), "startup_s": round(startup, 1), "startup_share": round(startup / wall_s, 4),
        "ray_start_s": round(timing["ray_start_s"], 2), "stages": timing["stages"],
        "sweep_wall_s": round(timing["sweep_wall_s"], 1), "concurrent_trials": concurrent,
        "trial_startup_s": round(trial_startup, 1), "trials": trials,
    }
