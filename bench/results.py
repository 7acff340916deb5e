"""OUT/evals.parquet and OUT/trials.parquet (docs/design.md "Results schema"), written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from bench.config import TrialSpec

EVAL_COLUMNS = [
    "suite", "env", "algorithm", "trial_id", "seed", "knob", "knob_value", "params", "step", "final",
    "temperature", "gold_reward", "gold_reward_se", "kl", "kl_se", "kl_k3", "kl_k3_se", "kl_kind",
    "win_rate", "win_rate_se", "gen_len", "n_prompts", "n_samples", "train_time_s", "wall_time_s",
    # the plug-in KL estimate where `kl` is a bound (best-of-n) and the share of repeated samples
    "kl_est", "dup_rate",
    # the same metrics on the even- (h0) and odd-indexed (h1) eval prompts: select on one, report on the other
    "gold_reward_h0", "gold_reward_h1", "kl_h0", "kl_h1", "win_rate_h0", "win_rate_h1",
]
TRIAL_COLUMNS = [
    "suite", "env", "algorithm", "trial_id", "seed", "knob", "knob_value", "params", "status", "reason",
    "n_evals", "train_time_s", "eval_time_s", "wall_time_s", "rm_accuracy", "nodes", "resumed_from", "summary",
    "family", "rm_queries", "gold_queries",
]


# a trial's directory, OUT/trials/<trial_id>/ (bench.worker.trial writes it, collect reads it)
ROWS_FILE = "evals.jsonl"  # one evaluation row per line, appended as the trial goes
LOG_FILE = "train_log.jsonl"  # the training metrics the algorithm logged, one step per line
SUMMARY_FILE = "summary.json"  # written last and atomically: the trial completed
FAILURE_FILE = "failure.json"  # a numerical fault stopped the trial: its reason
POLICY_DIR = "policy"  # the trained policy, Hugging Face format


def trial_dir(out: Path, trial_id: str) -> Path:
    """OUT/trials/<trial_id>: the files of one trial."""
    return Path(out) / "trials" / trial_id


def finished_trials(out: Path, trials: list[TrialSpec]) -> set[str]:
    """Trials whose summary.json exists: written last, atomically, by a trial that completed."""
    return {t.trial_id for t in trials if (trial_dir(out, t.trial_id) / SUMMARY_FILE).is_file()}


def _atomic(path: Path, write) -> None:
    """`write(tmp)` into a temp file beside `path`, then rename: readers see the old file or the whole
    new one, never a partial file. The temp file `.NAME.tmp-PID` is hidden and named like no result, so
    nothing reads it; a write that raises removes it, and one killed outright (SIGKILL) leaves it for
    `remove_stale_temps`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no half-written temp file left behind
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's
        return True
    return True


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Remove the temp files (or folders) matching `pattern` directly in `folder` whose writer, the PID
    after the last "tmp-", is no longer alive: what a SIGKILLed write left. A live writer's temp may be
    a write in progress and is kept (harmless: readers open only final names). The PID is checked on
    this machine, which is right for the folders this is used on: a run's top level (written by its
    driver, `prefbench report` and `compare`) and export-env's parent folder. Returns what it removed."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rsplit("tmp-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def _read_rows(path: Path) -> pd.DataFrame:
    """A trial's evals.jsonl; a last line cut short (its worker killed mid-append) is left out."""
    import io

    lines = path.read_text().splitlines() if path.exists() else []
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines = lines[:-1]
    # precise_float: pandas' default float parser is off in the last bit for most values
    return pd.read_json(io.StringIO("\n".join(lines)), lines=True, precise_float=True) if lines else pd.DataFrame()


def collect(out: Path, suite_name: str, env_name: str, trials: list[TrialSpec], status: dict[str, str | None],
            families: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every trial's rows from OUT/trials/<id>/ into the two parquet files. `families` maps an
    algorithm to its family (`algorithms.interface.family`), so the report needs no registry."""
    families = families or {}
    eval_frames, trial_rows = [], []
    for spec in trials:
        tdir = trial_dir(out, spec.trial_id)
        rows = _read_rows(tdir / ROWS_FILE)
        summary = json.loads((tdir / SUMMARY_FILE).read_text()) if (tdir / SUMMARY_FILE).exists() else {}
        error = status.get(spec.trial_id, "did not run")
        stopped = tdir / FAILURE_FILE  # a numerical fault stopped it
        if error is None and stopped.exists():
            error = json.loads(stopped.read_text())["reason"]
        elif error is None and not summary:
            error = "finished without a summary"
        if len(rows):
            eval_frames.append(rows)
        trial_rows.append({
            "suite": suite_name, "env": env_name, "algorithm": spec.algorithm, "trial_id": spec.trial_id,
            "seed": spec.seed, "knob": spec.knob, "knob_value": spec.knob_value,
            "params": json.dumps(spec.params, sort_keys=True),
            "status": "ok" if error is None else "failed", "reason": error or "",
            "n_evals": len(rows), "train_time_s": summary.get("train_time_s"),
            "eval_time_s": summary.get("eval_time_s"), "wall_time_s": summary.get("wall_time_s"),
            "rm_accuracy": summary.get("rm/heldout_accuracy"),  # held-out pair accuracy of the RM it used
            "nodes": summary.get("nodes", ""),  # Ray node ids its workers ran on, comma-separated
            "resumed_from": summary.get("resumed_from"),  # the checkpoint step it was resumed from, if any
            # what the algorithm's train(ctx) returned (e.g. PPO's final adaptive kl_coef), as JSON
            "summary": json.dumps(summary.get("algorithm_summary", {}), sort_keys=True),
            "family": families.get(spec.algorithm, ""),
            # samples it had scored by the learned reward model / the gold reward while training
            # (bench.worker.trial.QueryCount: not the evaluator's, not a cached value's)
            "rm_queries": summary.get("rm_queries"), "gold_queries": summary.get("gold_queries"),
        })
    evals = pd.concat(eval_frames, ignore_index=True) if eval_frames else pd.DataFrame(columns=EVAL_COLUMNS)
    # a column a trial's rows lack (written by an older prefbench, resumed) is NaN: the report then
    # falls back to what those rows have (in-sample selection without the halves)
    evals = evals.reindex(columns=EVAL_COLUMNS + [c for c in evals.columns if c not in EVAL_COLUMNS])
    evals["knob_value"] = evals["knob_value"].astype("float64")
    trials_df = pd.DataFrame(trial_rows, columns=TRIAL_COLUMNS)
    write_parquet(evals, out / "evals.parquet")
    write_parquet(trials_df, out / "trials.parquet")
    return evals, trials_df
