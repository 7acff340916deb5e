"""The shared stages of a run, prepared once and cached by content: each seed's env (data, tokenizer,
initial model; SFT, pairs and references as a Ray Train job) and its learned reward model, plus the
checks of a prepared env that must hold before the sweep starts (no Ray job fails mid-sweep on them)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import __version__, say
from bench.config import SuiteConfig, env_params
from bench.errors import UserError
from bench.run.timing import stage_timing
from envs import ENVS

# 2: pairs/references carry whether each sample ended on EOS; models train without dropout
ENV_CACHE_FORMAT = 3  # bump when the layout of a prepared env, or how it is sampled, changes (3: own decoding loop)

RM_CACHE_FORMAT = 2  # bump when the layout or training of the reward-model stage changes


def cache_root(suite: SuiteConfig) -> Path:
    root = suite.cache_dir or os.environ.get("PREFBENCH_CACHE") or Path.home() / ".cache" / "prefbench"
    return Path(root).expanduser().resolve()


def _precision(suite: SuiteConfig) -> dict:
    """The cache keys' precision: bf16 always; autocast only when on, so that the keys of fp32 runs
    stay what they were before the option existed."""
    return {"bf16": suite.deepspeed.bf16, **({"autocast": True} if suite.deepspeed.autocast else {})}


def env_key(suite: SuiteConfig, seed: int) -> str:
    """Content hash of everything a prepared env depends on."""
    params = dataclasses.asdict(env_params(suite))
    blob = json.dumps(
        {"env": suite.env.name, "params": params, "seed": seed, **_precision(suite),
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


def prepare_env(
    suite: SuiteConfig, suite_dict: dict, seed: int, storage: str | Path, timing: list | None = None
) -> Path:
    """Build + SFT the env for `seed` once; later runs with the same config reuse the cache.

    `timing`, when given, receives the stage's timing (nothing when the env was cached)."""
    from bench.run import ray_runner

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
         **_precision(suite), "format": RM_CACHE_FORMAT},
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
    from bench.run import ray_runner

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


def check_env_reachable(suite: SuiteConfig) -> None:
    """Every model and dataset the env names can be loaded here (hub or local files), before Ray starts."""
    from envs.base import preflight
    from envs.hub import Unavailable

    try:
        preflight(ENVS.get(suite.env.name), env_params(suite))
    except Unavailable as e:
        raise UserError(str(e)) from None


def check_env_data(suite: SuiteConfig, seed: int, workdir: Path, needs: set[str] | None = None) -> None:
    """An env that came out empty, or whose prompts do not fit the policy's context, is a user-fixable
    problem (its params), not a crash mid-sweep. `needs`: what the env must provide (default: what
    the suite's algorithms need; export-env: the pairs)."""
    from algorithms import ALGORITHMS
    from envs.base import load_env_data

    data = load_env_data(workdir)
    where = f"env {suite.env.name} (seed {seed})"
    if not data.eval_prompts:
        raise UserError(f"{where} has no eval prompts; check env.params")
    if needs is None:
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


def prepared_env(suite: SuiteConfig, seed: int, address: str | None = None, needs: set[str] | None = None) -> Path:
    """The cached env of `suite` and `seed` outside a run (export-env, perf): prepared first if it is not
    cached yet, exactly as `prefbench run` prepares it (Ray embedded or --address, the env stage as a
    Ray Train job), then checked as a run checks it (`check_env_data`)."""
    check_env_reachable(suite)
    env_dir = env_cache_dir(suite, seed)
    if (env_dir / "DONE").exists():  # no Ray needed
        say(f"[prefbench] env {suite.env.name} seed {seed}: cached at {env_dir}")
    else:
        _prepare_alone(suite, seed, address)  # says where it cached the env
    check_env_data(suite, seed, env_dir, needs)
    return env_dir


def _prepare_alone(suite: SuiteConfig, seed: int, address: str | None) -> None:
    """Start Ray, prepare the env of `seed`, stop Ray. stdout stays clean (export-env prints only DIR
    there): what libraries print (DeepSpeed's logger binds to stdout on import) goes to stderr."""
    from bench.run import ray_runner
    from bench.worker.engine import quiet_libraries

    suite_dict = json.loads(json.dumps(dataclasses.asdict(suite)))
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="prefbench-env-") as scratch:
        quiet_libraries()
        # Ray Train's checkpoints of the SFT job: nothing kept
        storage = (f"{suite.storage_path.rstrip('/')}/env-{suite.env.name}-seed{seed}-{env_key(suite, seed)}"
                   if suite.storage_path else scratch)
        ray_runner.start_ray(suite, address)
        try:
            prepare_env(suite, suite_dict, seed, storage)
        finally:
            ray_runner.stop_ray()
