"""timing.json: where a run's wall time went, and how much of it was start-up (bench/PERF.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.results import SUMMARY_FILE, trial_dir



def stage_timing(stage: str, seed: int, wall_s: float, stage_dir: Path) -> dict:
    """One shared stage's timing: its Ray Train job's wall time, the worker's own work, and start-up =
    the rest (Ray Train, worker processes, imports) + DeepSpeed's initialisation."""
    from bench.worker.stages import STAGE_TIMING

    inner = json.loads((stage_dir / STAGE_TIMING).read_text())
    startup = wall_s - inner["worker_s"] + inner["deepspeed_init_s"]
    return {"stage": stage, "seed": seed, "wall_s": round(wall_s, 2), **inner, "startup_s": round(startup, 2)}


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
        path = trial_dir(out_dir, trial_id) / SUMMARY_FILE
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
