"""Step progress on stderr (bench/progress.py and the sweep's Progress callback): one line per update
in a log, throttled, the last always; a tqdm bar in a terminal; nothing under --quiet."""

from __future__ import annotations

import io
import re

import pytest

from bench.progress import StepProgress, set_quiet


@pytest.fixture(autouse=True)
def loud():
    set_quiet(False)
    yield
    set_quiet(False)


def test_log_lines_are_throttled_and_carry_rate_and_time_left():
    out = io.StringIO()
    p = StepProgress(min_interval_s=10.0, stream=out)
    assert not p.bars  # a StringIO is no terminal
    # t=100: the stage starts (models loaded by the first report); 50 steps per report, 5 steps/s
    printed = [p.update("sft", "env tiny seed 0: SFT", step, 450, now=100.0 + (step - 1) / 5)
               for step in (1, 51, 101, 151, 201, 251, 301, 351, 401, 450)]
    lines = [x for x in printed if x]
    assert printed[0] is None  # no rate yet: the first report's time includes loading the models
    # 10 s apart at most once: steps 51 (t=110), 101 (t=120), ... every report here is 10 s after the last
    assert len(lines) == 9 and out.getvalue().count("\n") == 9
    assert re.fullmatch(r"\[prefbench\]   env tiny seed 0: SFT:  11% 51/450 \[00:10<01:19,  5\.00step/s\]", lines[0])
    assert lines[-1].startswith("[prefbench]   env tiny seed 0: SFT: 100% 450/450 [01:29<00:00")
    fast = StepProgress(min_interval_s=60.0, stream=io.StringIO())
    got = [fast.update("t", "dpo", s, 10, now=float(s)) for s in range(1, 11)]
    assert [g is not None for g in got] == [False, True] + [False] * 7 + [True]  # throttled; the last always


def test_quiet_prints_nothing_and_a_terminal_gets_one_bar():
    out = io.StringIO()
    set_quiet(True)
    p = StepProgress(stream=out)
    assert p.update("k", "x", 5, 10, now=1.0) is None and p.update("k", "x", 10, 10, now=2.0) is None
    assert out.getvalue() == ""
    set_quiet(False)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = StepProgress(stream=tty)
    assert bar.bars
    for step in (1, 5, 10):
        assert bar.update("rm", "reward model", step, 10, now=float(step)) is None
    assert "reward model" in tty.getvalue() and "\r" in tty.getvalue()  # redrawn in place
    assert "rm" not in bar.tracks  # closed at its last step


def test_sweep_progress_prints_trial_steps_and_is_silent_under_quiet(capsys):
    from bench.run.ray_runner import Progress

    class FakeTrial:
        config = {"trial": {"trial_id": "dpo-beta=0.5-seed0", "train": {"steps": 150}}}

    progress, trial = Progress(total=1), FakeTrial()
    progress.on_trial_start(0, [], trial)
    for step in (15, 30):
        progress.on_trial_result(0, [], trial, {"progress_step": step, "total_steps": 150})
    progress.on_trial_result(0, [], trial, {"gold_reward": 0.7, "kl": 1.5, "win_rate": 0.6, "step": 75, "final": 0})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[prefbench] start dpo-beta=0.5-seed0"
    assert re.match(r"\[prefbench\]   dpo-beta=0\.5-seed0:  20% 30/150 \[", err[1])
    assert err[2].startswith("[prefbench]   dpo-beta=0.5-seed0 eval  step 75/150: gold 0.700")
    set_quiet(True)
    quiet = Progress(total=1)
    quiet.on_trial_start(0, [], trial)
    quiet.on_trial_result(0, [], trial, {"progress_step": 15, "total_steps": 150})
    quiet.on_trial_result(0, [], trial, {"progress_step": 30, "total_steps": 150})
    quiet.on_trial_result(0, [], trial, {"gold_reward": 0.7, "kl": 1.5, "win_rate": 0.6, "step": 75, "final": 0})
    quiet.on_trial_complete(0, [], trial)
    assert capsys.readouterr().err == ""
