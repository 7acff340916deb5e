"""The one module of prefbench that talks to Ray (Train V2 + Tune).

- `start_ray`: an embedded Ray instance by default, or join a cluster with `--address`.
- `run_env_stage`, `run_rm_stage`: the shared stages (the env's SFT, the learned reward model),
  each a Ray Train job (TorchTrainer, DeepSpeed in the workers).
- `run_sweep`: ONE Ray Tune `Tuner` over the trials (algorithm × sweep point × seed). Each Tune trial
  is a driver function that builds a `TorchTrainer` (the Train V2 pattern: `Tuner(TorchTrainer)` is
  not supported) whose workers run `bench.worker.trial.run_trial`; algorithms that train no policy
  (the SFT baseline, samplers) run inside the trial process itself.
- Checkpoints: each trial's TorchTrainer has a stable name (`trial-<id>`) in the run's storage, a
  `FailureConfig` and `CheckpointConfig(num_to_keep=1)`; a restarted worker group, or the same
  trial in a `--resume` run, finds its latest checkpoint with `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import train as ray_train
from ray import tune
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

try:  # private to Ray Train V2: see Trainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # another Ray: Trainer is a plain TorchTrainer
    DatasetsCallback = None

from algorithms import ALGORITHMS
from bench import say
from bench.progress import StepProgress, quiet
from bench.results import trial_dir
from bench.worker.faults import FAULTS_ENV
from bench.worker import stages
from bench.worker.stages import StagePayload
from bench.worker.trial import TrialPayload, run_trial
from bench.config import ScalingSettings, SuiteConfig, TrialSpec

QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}

# Ray Train V2's controller polls its workers every 2 s by default: a finished trial, a report
# barrier and the worker group's start each wait for the next poll. 0.5 s took ~4 s off every
# TorchTrainer.fit() here (bench/PERF.md). Set in the driver and in every Ray worker (the Tune
# trial processes drive the trials' TorchTrainers). A user's own setting of either wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Embedded Ray only: one node that nobody preempts, so no preemption-watcher actor (a Python
# process of its own, ~120 MB) per TorchTrainer. Joining a cluster (--address) keeps Ray's default.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class Trainer(TorchTrainer):
    """A `TorchTrainer` without Ray Data's per-run `DatasetManager` actor.

    Ray Train V2 starts a DatasetManager actor in every `fit()`, datasets or not: one more Python
    process per running trial or stage (~1.4 CPU-s to start on 2 cores and ~100 MB, bench/PERF.md).
    prefbench hands Ray no datasets (each worker reads the env's parquet files itself), so the
    callback that makes the actor is left out. With datasets, or on a Ray whose (private) callback
    is not where this looks, it is TorchTrainer as it is."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if DatasetsCallback is None or self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def logical_cpus(suite: SuiteConfig) -> int:
    """Enough logical CPUs that `max_concurrent_trials` trials (1 CPU for the Tune driver + workers) fit."""
    s = suite.scaling
    per_trial = 1 + s.num_workers * s.worker_resources()["CPU"]
    return max(os.cpu_count() or 1, math.ceil(s.max_concurrent_trials * per_trial))


def _worker_env() -> dict:
    """Environment of every Ray worker: quiet libraries, and the fault-injection list when a test set one."""
    faults = os.environ.get(FAULTS_ENV)
    train_env = {k: os.environ[k] for k in (*TRAIN_ENV, *LOCAL_TRAIN_ENV) if k in os.environ}  # see start_ray
    return {**QUIET_ENV, **train_env, **({FAULTS_ENV: faults} if faults else {})}


def start_ray(suite: SuiteConfig, address: str | None) -> None:
    for k, v in {**QUIET_ENV, **TRAIN_ENV, **({} if address else LOCAL_TRAIN_ENV)}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # legacy reporter: verbose=0 is silent
    # Ctrl-C is prefbench's (bench.run: KeyboardInterrupt → Ray shut down → "continue with --resume").
    # Tune's own handler would end the sweep "gracefully" and return, and the run would go on to
    # write results of trials that were cut off.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    kwargs = dict(
        log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False,
        runtime_env={"env_vars": _worker_env()},
    )
    if address:
        ray.init(address=address, **kwargs)
    else:  # "local": always a fresh embedded instance, even where a `ray start` cluster is running
        ray.init(address="local", num_cpus=logical_cpus(suite), **kwargs)
    logging.getLogger("ray").setLevel(logging.ERROR)
    # a failed trial's traceback: Progress prints its one-line reason instead (trials.parquet keeps it)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _threads(suite: SuiteConfig, concurrent: int) -> int:
    """torch threads of each trial process: the machine's cores shared by the trials running at once.

    Part of what makes a run reproducible bit for bit on CPU (float sums split over threads add up
    in another order), so a sweep takes it from the whole suite, not from the trials left to run:
    a `--resume`d trial computes exactly what it would have computed in the run that was stopped."""
    return max(1, (os.cpu_count() or 1) // (concurrent * suite.scaling.num_workers))


def _scaling(scaling: ScalingSettings) -> ScalingConfig:
    return ScalingConfig(
        num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=scaling.worker_resources()
    )


def _report(metrics: dict, checkpoint: str | None = None) -> None:
    """`report` for bench.worker: metrics, and a local checkpoint directory that Ray persists."""
    ray_train.report(metrics, checkpoint=ray_train.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def _tune_report(metrics: dict, checkpoint: str | None = None) -> None:
    assert checkpoint is None, "trials run in the Tune process train no policy and save no checkpoint"
    tune.report(metrics)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


# ------------------------------------------------------------------------- shared stages
def _env_loop(payload: dict) -> None:
    stages.run_env_stage(StagePayload(**payload), report=_report)


def _rm_loop(payload: dict) -> None:
    stages.run_rm_stage(StagePayload(**payload), report=_report)


class StageSteps(ray_train.UserCallback):
    """A stage's step reports (`{"step", "total_steps"}`, every rank's the same), appended as JSON
    lines to `path`. It runs in the stage's controller actor, which Ray Train V2 places on the
    driver's node, so the driver reads the file while it waits (`_fit_off_main_thread`)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if "step" in m and "total_steps" in m:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(m["step"]), "total": int(m["total_steps"]), "t": time.time()}) + "\n")


def _fit_off_main_thread(trainer: Trainer, steps_file: Path | None = None, on_steps=lambda step, total, t: None):
    """`trainer.fit()` in a helper thread, the main thread waiting for it (and handing each new line
    of `steps_file`, a `StageSteps` file, to `on_steps`).

    Ray Train V2's fit() installs its own SIGINT handler when it runs in the main thread (Ctrl-C
    aborts the job, and the handler stays installed after fit() returns: a later Ctrl-C calls into
    the finished controller and exits 0). In a helper thread it installs none, so Ctrl-C stays
    prefbench's: KeyboardInterrupt in the main thread, Ray shut down, nothing half-written."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="prefbench-stage", daemon=True)
    thread.start()
    seen = 0
    while thread.is_alive():
        thread.join(timeout=1.0)  # interruptible: a signal handler's KeyboardInterrupt is raised here
        if steps_file is not None and steps_file.exists():
            lines = steps_file.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line still being written: read it next time
                    break
                on_steps(r["step"], r["total"], r["t"])
                seen += 1
    if "error" in box:
        raise box["error"]
    return box["result"]


def _run_stage(loop, payload: StagePayload, suite: SuiteConfig, name: str, storage: str | Path, label: str) -> float:
    """One shared stage as a Ray Train job (TorchTrainer; DeepSpeed inside the workers), its steps shown
    as they are reported (`bench.progress`, labelled `label`); returns its wall time in s."""
    t0 = time.time()
    progress = StepProgress()
    with tempfile.TemporaryDirectory(prefix="prefbench-steps-") as tmp:
        steps_file = Path(tmp) / "steps.jsonl"
        trainer = Trainer(
            loop,
            train_loop_config=dataclasses.asdict(dataclasses.replace(payload, threads=_threads(suite, 1))),
            scaling_config=_scaling(suite.scaling),
            run_config=ray_train.RunConfig(
                name=f"{name}-{int(time.time())}", storage_path=str(storage),
                worker_runtime_env={"env_vars": _worker_env()}, callbacks=[StageSteps(str(steps_file))],
            ),
        )
        try:
            _fit_off_main_thread(trainer, steps_file, lambda step, total, t: progress.update(name, label, step, total, t))
        finally:
            progress.finish(name)
    return time.time() - t0


def run_env_stage(suite: SuiteConfig, suite_dict: dict, seed: int, env_dir: Path, storage: str | Path) -> float:
    """SFT the env's initial policy in `env_dir` (built already) and write its data; returns the job's wall time."""
    payload = StagePayload(suite=suite_dict, env_dir=str(env_dir), seed=seed)
    return _run_stage(_env_loop, payload, suite, f"env-{env_dir.name}", storage,
                      label=f"env {suite.env.name} seed {seed}: SFT")


def run_rm_stage(suite: SuiteConfig, suite_dict: dict, seed: int, env_dir: Path, rm_dir: Path, storage: str | Path) -> float:
    """Train the shared reward model of (env, seed) into `rm_dir`; returns the job's wall time."""
    payload = StagePayload(suite=suite_dict, env_dir=str(env_dir), seed=seed, rm_dir=str(rm_dir))
    return _run_stage(_rm_loop, payload, suite, f"rm-{rm_dir.name}", storage,
                      label=f"reward model {suite.env.name} seed {seed}")


# ---------------------------------------------------------------------------------- sweep
def _trial_loop(payload: dict) -> None:
    """A Train worker of a trial: resume from the run's latest checkpoint when there is one (a
    worker restarted by FailureConfig, or `prefbench run --resume`)."""
    payload = TrialPayload(**{**payload, "node_id": _node_id()})
    checkpoint = ray_train.get_checkpoint()
    if checkpoint is None:
        run_trial(payload, report=_report)
        return
    with checkpoint.as_directory() as path:
        run_trial(dataclasses.replace(payload, resume_from=path), report=_report)


def _trial_driver(config: dict, static: dict) -> None:
    """A Tune trial: run one TrialSpec, in Train workers if it trains a policy, else right here."""
    spec = config["trial"]
    payload = TrialPayload(
        suite=static["suite"], trial=spec, env_dir=static["env_dirs"][str(spec["seed"])],
        trial_dir=str(trial_dir(static["out"], spec["trial_id"])), rm_dir=static["rm_dirs"].get(str(spec["seed"])),
        threads=static["threads"],
    )
    if not ALGORITHMS.get(spec["algorithm"]).trains_policy:
        run_trial(dataclasses.replace(payload, node_id=_node_id()), report=_tune_report)
        return
    scaling = ScalingSettings(**static["scaling"])
    trainer = Trainer(
        _trial_loop,
        train_loop_config=dataclasses.asdict(payload),  # a plain dict, as Ray Train expects
        scaling_config=_scaling(scaling),
        run_config=ray_train.RunConfig(
            # a stable name: a rerun (--resume) finds this trial's checkpoints in the same storage
            name=f"trial-{spec['trial_id']}",
            storage_path=static["storage"],
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": _worker_env()},
            failure_config=ray_train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray_train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()


class Progress(tune.Callback):
    """One short line per trial event on stderr, instead of Ray's tables."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.started: dict[str, float] = {}
        self.took: dict[str, float] = {}  # trial id → seconds from Tune starting it to its end (timing.json)
        self.stopped: set[str] = set()  # trials a numerical fault stopped (they end without an error)
        self.steps = StepProgress(min_interval_s=20.0, bars=False)  # trials run side by side: lines, no bars

    @staticmethod
    def _name(trial) -> str:
        return trial.config["trial"]["trial_id"]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[self._name(trial)] = time.time()
        if not quiet():
            say(f"[prefbench] start {self._name(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "stopped" in result:  # a numerical fault (bench.worker.trial.run_trial): no retry, the reason recorded
            self.stopped.add(self._name(trial))
            say(f"[prefbench]   {self._name(trial)} stopped: {result['stopped']}")
            return
        if "resumed_from" in result:
            say(f"[prefbench]   {self._name(trial)} resumed from its checkpoint at step {int(result['resumed_from'])}")
            return
        if "progress_step" in result:  # a tenth of its steps (bench.worker.trial.Trial.log)
            self.steps.update(self._name(trial), self._name(trial), int(result["progress_step"]),
                              int(result["total_steps"]))
            return
        if "gold_reward" not in result or quiet():
            return
        kl = result.get("kl", float("nan"))
        kl_txt = f"{kl:.2f}" if kl == kl else "n/a"
        tag = "final" if result.get("final") else "eval "
        steps = trial.config["trial"]["train"]["steps"]
        say(
            f"[prefbench]   {self._name(trial)} {tag} step {result['step']}/{steps}: "
            f"gold {result['gold_reward']:.3f}  KL {kl_txt} nats  win {result['win_rate']:.3f}  (T=1)"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        name = self._name(trial)
        if name in self.stopped:
            say(f"[prefbench] FAILED {name} ({self.done}/{self.total}); see trials.parquet")
            return
        took = time.time() - self.started.get(name, time.time())
        self.took[name] = took
        self.steps.finish(name)
        if not quiet():
            say(f"[prefbench] done  {name} in {took:.0f}s ({self.done}/{self.total})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        try:
            reason = one_line(trial.get_pickled_error())
        except Exception:  # the reason is in trials.parquet either way
            reason = "see trials.parquet"
        self.steps.finish(self._name(trial))
        say(f"[prefbench] FAILED {self._name(trial)} ({self.done}/{self.total}): {reason}")


def tracking_callbacks(suite: SuiteConfig, out: Path) -> list:
    """The sweep's experiment tracking (the suite's `tracking:`), as Ray Tune's own logger callbacks;
    Tune's CSV and JSON loggers are kept as Tune's own record. Each trial logs what it reports: its
    training metrics at every tenth of its steps (`progress_step`), its evaluations (`gold_reward`,
    `kl`, `win_rate`) and, as params, its config (algorithm, knob, params, seed, train settings)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    t = suite.tracking
    callbacks = [CSVLoggerCallback(), JsonLoggerCallback()] + ([TBXLoggerCallback()] if t.tensorboard else [])
    if t.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        if not t.mlflow_tracking_uri:  # MLflow 3 refuses its file store unless told it is wanted
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=t.mlflow_tracking_uri or (out.resolve() / "mlruns").as_uri(),
            experiment_name=t.mlflow_experiment or suite.name, tags={"prefbench.suite": suite.name}))
    if t.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=t.wandb_project, group=suite.name, mode=t.wandb_mode,
                                             dir=str(out.resolve())))
    return callbacks


def run_sweep(
    suite: SuiteConfig, suite_dict: dict, trials: list[TrialSpec], env_dirs: dict[int, Path],
    rm_dirs: dict[int, Path], out: Path, storage: str, name: str = "sweep", suite_trials: int | None = None,
) -> tuple[dict[str, str | None], dict[str, float]]:
    """Run every trial in one Tuner; returns trial_id → error text (None when it succeeded), and
    trial_id → seconds from Tune starting the trial to its end (completed trials). `suite_trials`:
    the suite's number of trials when `trials` is the part left to run (--resume): threads per trial
    follow the whole suite (see `_threads`)."""

    concurrent = min(suite.scaling.max_concurrent_trials, len(trials))
    threads = _threads(suite, min(suite.scaling.max_concurrent_trials, suite_trials or len(trials)))
    static = {
        "suite": suite_dict,
        "env_dirs": {str(k): str(v) for k, v in env_dirs.items()},
        "rm_dirs": {str(k): str(v) for k, v in rm_dirs.items()},
        "out": str(out.resolve()),
        "storage": str(storage),
        "threads": threads,
        "scaling": dataclasses.asdict(suite.scaling),
    }
    progress = Progress(len(trials))
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the loggers are tracking_callbacks'
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial_driver, static=static), {"CPU": 1}),
        param_space={"trial": tune.grid_search([dataclasses.asdict(t) for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
            # the next trial runs in the finished trial's process: no new process, no second import of
            # torch/transformers/DeepSpeed (each trial's Train workers are still fresh processes)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=0, callbacks=[progress, *tracking_callbacks(suite, out)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    grid = tuner.fit()
    status: dict[str, str | None] = {}
    restarts = suite.scaling.max_failures
    for result in grid:
        spec = result.config["trial"]
        if result.error is None:
            status[spec["trial_id"]] = None
            continue
        reason = one_line(result.error)
        if ALGORITHMS.get(spec["algorithm"]).trains_policy and restarts:  # Ray Train restarted it first
            reason += f" (after {restarts} restart{'s' * (restarts > 1)} from its checkpoint: scaling.max_failures)"
        status[spec["trial_id"]] = reason
    return status, progress.took


def one_line(error: BaseException) -> str:
    """The root cause of a failed stage or trial in one line (at most 500 characters): through Ray
    Train's WorkerGroupError (the lowest failed rank's error), ControllerError, Ray's task wrappers and
    `raise ... from` chains. A worker process that died without an error of its own (SIGKILL, the
    OOM killer) says so."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            error = failures[min(failures)]
            continue
        inner = (getattr(error, "controller_failure", None) or getattr(error, "health_check_failure", None)
                 or error.__cause__ or getattr(error, "cause", None))
        if not isinstance(inner, BaseException):
            break
        error = inner
    if isinstance(error, ray.exceptions.RayActorError) and not isinstance(error, ray.exceptions.RayTaskError):
        return ("a Ray worker process died (killed by a signal or the out-of-memory killer; its own log is under "
                "/tmp/ray/session_latest/logs)")
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return " ".join(line.strip() for line in text if line.strip())[-500:]
