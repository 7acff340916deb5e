"""Fault injection through real `prefbench run`s (Ray Train + Tune + DeepSpeed), each asserting what
survived: a killed worker, SIGINT, a killed driver, a NaN loss, a trial whose worker keeps dying, a
corrupt cache entry. `PREFBENCH_FAULTS` (bench/worker/faults.py) places the faults at known steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from tests.e2e_run import METRICS, LineReader, cli_args, dpo_log, run_cli, session_pids

DPO_SWEEP = "algorithms=[{name: dpo, sweep: {beta: [0.5, 2.0]}}]"
KEY = ["trial_id", "step", "temperature", "knob_value"]


def _rows(out, trials):
    evals = pd.read_parquet(out / "evals.parquet")
    return evals[evals["trial_id"].isin(trials)].sort_values(KEY).reset_index(drop=True)


def _start(out, sets, cache, faults, extra=()):
    env = {**os.environ, "PREFBENCH_CACHE": str(cache), "PREFBENCH_FAULTS": faults}
    return subprocess.Popen(cli_args(out, sets, extra=extra), stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _kill_session(proc) -> None:
    """SIGKILL the run's driver and every Ray process it started (its session)."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _no_process_left(proc) -> bool:
    deadline = time.time() + 30
    while session_pids(proc.pid) and time.time() < deadline:
        time.sleep(1)
    return session_pids(proc.pid) == []


@pytest.mark.slow
def test_killed_worker_sigint_and_killed_driver_then_resume_gives_the_same_numbers_bit_for_bit(run_dir, tmp_path):
    """Three stops of one 3-trial run (SFT, DPO beta 0.5 and 2.0; two trials at a time, as in the e2e run):
    1. beta 0.5's Train worker is SIGKILLed after its step-6 checkpoint: Ray Train restarts it from
       there (FailureConfig) and the trial finishes; beta 2.0 stops at its step-6 checkpoint, and
       Ctrl-C (SIGINT to the whole process group) stops the run: one line, exit 130, Ray gone, no
       results written;
    2. `--resume` continues beta 2.0 from its checkpoint, and the driver and every Ray process are
       SIGKILLed right then;
    3. `--resume` again finishes it. Finished trials are never rerun, and every metric, loss and grad
       norm equals the uninterrupted e2e run's own trials exactly: the same suite and seed on CPU
       give identical numbers, through a worker restart and two resumes."""
    _, _, cache = run_dir
    out = tmp_path / "out"
    proc = _start(out, [DPO_SWEEP], cache, "dpo-beta=0.5-seed0@6:kill,dpo-beta=2.0-seed0@6:hang")
    try:
        reader = LineReader(proc.stderr)
        text = reader.until(lambda t: "done  dpo-beta=0.5-seed0" in t and "dpo-beta=2.0-seed0 eval  step 6/12" in t,
                            timeout=1200)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run did not stop within 180 s of SIGINT:\n" + reader.text[-3000:]) from None
        rest = reader.rest(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_session(proc)
    assert "dpo-beta=0.5-seed0 resumed from its checkpoint at step 6" in text, text[-3000:]  # the worker restart
    errors = [line for line in rest.splitlines() if line.startswith("prefbench:")]
    assert rc == 130, rest[-3000:]
    assert len(errors) == 1 and errors[0].startswith("prefbench: interrupted: 2 of 3 trials finished") \
        and errors[0].endswith("--resume"), rest[-3000:]
    assert "Traceback" not in rest
    for name in ("evals.parquet", "trials.parquet", "report.md"):
        assert not (out / name).exists(), name
    assert (out / "config.yaml").is_file()
    assert _no_process_left(proc)  # Ray shut down with the driver
    finished = {t: (out / "trials" / t / "summary.json").stat().st_mtime_ns for t in ("sft-seed0", "dpo-beta=0.5-seed0")}

    proc = _start(out, [DPO_SWEEP], cache, "", extra=["--resume"])
    try:
        text = LineReader(proc.stderr).until(lambda t: "dpo-beta=2.0-seed0 resumed from its checkpoint at step 6" in t,
                                             timeout=900)
    finally:
        _kill_session(proc)  # the driver killed mid-trial
    assert "2 of 3 trials finished, 1 to run" in text
    assert not (out / "trials" / "dpo-beta=2.0-seed0" / "summary.json").exists()

    again = run_cli(out, [DPO_SWEEP], cache=cache, timeout=900, extra=["--resume"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "dpo-beta=2.0-seed0 resumed from its checkpoint at step 6" in again.stderr
    assert "start sft-seed0" not in again.stderr and "start dpo-beta=0.5-seed0" not in again.stderr
    for trial, mtime in finished.items():  # finished trials were neither rerun nor rewritten
        assert (out / "trials" / trial / "summary.json").stat().st_mtime_ns == mtime
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert (trials["status"] == "ok").all(), trials["reason"]
    assert trials.loc["dpo-beta=0.5-seed0", "resumed_from"] == 6 and trials.loc["dpo-beta=2.0-seed0", "resumed_from"] == 6
    ids = ["sft-seed0", "dpo-beta=0.5-seed0", "dpo-beta=2.0-seed0"]
    mine, theirs = _rows(out, ids), _rows(run_dir[0], ids)
    assert len(mine) == len(theirs) == 5 + 7 + 7 and mine[KEY].equals(theirs[KEY])
    pd.testing.assert_frame_equal(mine[METRICS], theirs[METRICS], check_exact=True)
    for trial in ids[1:]:
        assert dpo_log(out, trial) == dpo_log(run_dir[0], trial)


@pytest.mark.slow
def test_nan_loss_and_a_worker_that_keeps_dying_fail_only_their_trials(run_dir, tmp_path):
    """In one run: a NaN loss stops its trial at once with the reason (no retry, no NaN row); a trial
    whose worker dies in every attempt is given up after scaling.max_failures restarts; both are
    `failed` in trials.parquet, listed in the report and absent from its tables; the other trials
    complete. The cached reward model was corrupted beforehand: its hash gives it away and it is
    rebuilt, identical, so best-of-n reproduces the e2e run's numbers."""
    from bench.run.prepare import cache_problem

    out = tmp_path / "out"
    cache = tmp_path / "cache"
    shutil.copytree(run_dir[2], cache)
    (rm_dir,) = (cache / "reward_models").iterdir()
    weights = next(rm_dir.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte deep in the weights: the file still loads
    weights.write_bytes(bytes(data))
    assert "does not match its sha256" in cache_problem(rm_dir)

    sets = ["algorithms=[{name: dpo, sweep: {beta: [0.5, 2.0]}}, {name: best-of-n, params: {n: 8}}]"]
    faults = "dpo-beta=0.5-seed0@4:nan,dpo-beta=2.0-seed0@8:die"
    proc = run_cli(out, sets, cache=cache, timeout=900, env={"PREFBENCH_FAULTS": faults})
    assert proc.returncode == 1, proc.stderr[-4000:]  # some trials failed; results and report written
    assert "is corrupt (model/model.safetensors does not match its sha256); rebuilding it" in proc.stderr
    assert cache_problem(rm_dir) is None
    rebuilt, before = (json.loads(d.joinpath("metrics.json").read_text())
                       for d in (rm_dir, next((run_dir[2] / "reward_models").iterdir())))
    rebuilt.pop("rm/train_time_s"), before.pop("rm/train_time_s")
    assert rebuilt == before  # the same reward model, bit for bit: held-out accuracy, Pearson with gold, loss

    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert trials.loc["dpo-beta=0.5-seed0", "status"] == "failed"
    assert trials.loc["dpo-beta=0.5-seed0", "reason"] == "NonFiniteError: the loss at optimizer step 4 is nan"
    assert proc.stderr.count("dpo-beta=0.5-seed0 stopped: NonFiniteError") == 1  # not retried
    dying = trials.loc["dpo-beta=2.0-seed0"]
    assert dying["status"] == "failed" and dying["reason"].startswith("a Ray worker process died")
    assert dying["reason"].endswith("(after 1 restart from its checkpoint: scaling.max_failures)")
    assert (trials.loc[["sft-seed0", "best-of-n-seed0"], "status"] == "ok").all()

    evals = pd.read_parquet(out / "evals.parquet")
    assert np.isfinite(evals["gold_reward"]).all() and np.isfinite(evals["win_rate"]).all()
    nan_rows = evals[evals["trial_id"] == "dpo-beta=0.5-seed0"]
    assert nan_rows["step"].tolist() == [0]  # the step-0 evaluation, before the fault
    both = ["sft-seed0", "best-of-n-seed0"]
    pd.testing.assert_frame_equal(_rows(out, both)[METRICS], _rows(run_dir[0], both)[METRICS], check_exact=True)

    report = (out / "report.md").read_text()
    failed_section = report[report.index("## Failed trials"):]
    assert "`dpo-beta=0.5-seed0`: NonFiniteError" in failed_section and "`dpo-beta=2.0-seed0`: a Ray worker" in failed_section
    tables = report[: report.index("## Failed trials")]
    assert "| dpo |" not in tables and "| best-of-n |" in tables
    assert "dpo" not in set(pd.read_csv(out / "report.csv")["algorithm"])
