"""A trial's restart points: DeepSpeed's own checkpoint (module, optimizer, scheduler, ZeRO shards
per rank) with the trial's resume state, the RNG states and the rows written so far."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from bench.results import LOG_FILE, ROWS_FILE
from bench.worker.engine import barrier

CHECKPOINT_TAG = "prefbench"


@contextlib.contextmanager
def checkpoint_dir(trial_dir: Path, rank: int, step: int):
    """A fresh local directory per rank for one checkpoint, removed once it has been reported
    (Ray copies each rank's directory into the run's storage and merges them: every rank saves,
    then reports — the documented DeepSpeed pattern)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"ckpt-{trial_dir.name[:40]}-step{step}-rank{rank}-"))
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(ckpt: str, optimize, state: dict, rows_path: Path, log_path: Path, rank: int) -> None:
    """Every rank: DeepSpeed's own checkpoint (module, optimizer, scheduler; ZeRO shards per rank) with
    the trial's resume state; rank 0 also copies the rows and training log written so far."""
    import shutil

    np_state = np.random.get_state()
    state = {**state, "torch_rng": torch.get_rng_state().tolist(), "numpy_rng": [np_state[1].tolist(), int(np_state[2])]}
    optimize.engine.save_checkpoint(ckpt, tag=CHECKPOINT_TAG, client_state={"prefbench": state})
    if rank == 0:
        files = Path(ckpt) / "prefbench_files"
        files.mkdir()
        for path in (rows_path, log_path):
            if path.exists():
                shutil.copy2(path, files / path.name)
        (Path(ckpt) / "prefbench_state.json").write_text(json.dumps({"step": state["step"]}))


def load_checkpoint(path: str | None, optimize, trial_dir: Path, rank: int, world: int) -> dict | None:
    """Restore a trial's DeepSpeed state and files from a reported checkpoint; None when there is none."""
    if not path:
        return None
    _, client = optimize.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
    state = client["prefbench"]
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    keys, pos = state["numpy_rng"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, 0, 0.0))
    if rank == 0:
        import shutil

        for name in (ROWS_FILE, LOG_FILE):
            saved = Path(path) / "prefbench_files" / name
            target = trial_dir / name
            if saved.exists():
                shutil.copy2(saved, target)
            else:
                target.unlink(missing_ok=True)
    barrier(world)
    return state
