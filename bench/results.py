"""OUT/evals.parquet and OUT/trials.parquet (DESIGN.md "Results schema"), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from bench.config import TrialSpec

EVAL_COLUMNS = [
    "suite", "env", "algorithm", "trial_id", "seed", "knob", "knob_value", "params", "step", "final",
    "temperature", "gold_reward", "gold_reward_se", "kl", "kl_se", "kl_k3", "kl_k3_se", "kl_kind",
    "win_rate", "win_rate_se", "gen_len", "n_prompts", "n_samples", "train_time_s", "wall_time_s",
]
TRIAL_COLUMNS = [
    "suite", "env", "algorithm", "trial_id", "seed", "knob", "knob_value", "params", "status", "reason",
    "n_evals", "train_time_s", "eval_time_s", "wall_time_s", "rm_accuracy", "nodes", "resumed_from", "summary",
]


def _atomic(path: Path, write) -> None:
    """`write(tmp)` into a temp file beside `path`, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def collect(out: Path, suite_name: str, env_name: str, trials: list[TrialSpec], status: dict[str, str | None]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every trial's rows from OUT/trials/<id>/ into the two parquet files."""
    eval_frames, trial_rows = [], []
    for spec in trials:
        tdir = out / "trials" / spec.trial_id
        rows_file = tdir / "evals.jsonl"
        rows = pd.read_json(rows_file, lines=True) if rows_file.exists() and rows_file.stat().st_size else pd.DataFrame()
        summary = json.loads((tdir / "summary.json").read_text()) if (tdir / "summary.json").exists() else {}
        error = status.get(spec.trial_id, "did not run")
        if error is None and not summary:
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
        })
    evals = pd.concat(eval_frames, ignore_index=True) if eval_frames else pd.DataFrame(columns=EVAL_COLUMNS)
    evals = evals[EVAL_COLUMNS + [c for c in evals.columns if c not in EVAL_COLUMNS]]
    evals["knob_value"] = evals["knob_value"].astype("float64")
    trials_df = pd.DataFrame(trial_rows, columns=TRIAL_COLUMNS)
    write_parquet(evals, out / "evals.parquet")
    write_parquet(trials_df, out / "trials.parquet")
    return evals, trials_df
