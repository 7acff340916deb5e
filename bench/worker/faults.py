"""Fault injection for the reliability tests (tests/reliability/test_faults.py): `$PREFBENCH_FAULTS`
lists `TRIAL_ID@STEP:ACTION` items (comma-separated) that place a fault at a known step of a trial.
Unset in normal use."""

from __future__ import annotations

import os
import time
from pathlib import Path



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
