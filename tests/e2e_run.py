"""The end-to-end run shared by tests/test_e2e.py and tests/reliability/: tests/suites/e2e.yaml (every
algorithm, tiny sizes) through `prefbench run` in a subprocess, real Ray + DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

E2E = str(Path(__file__).parent / "suites" / "e2e.yaml")  # every algorithm, tiny sizes
ALL_TRIALS = sorted([
    "sft-seed0", "dpo-beta=0.5-seed0", "dpo-beta=2.0-seed0", "ipo-beta=1.0-seed0", "simpo-beta=2.0-seed0", "ppo-kl_coef=0.1-seed0",
    "ppo-gt-kl_coef=0.05-seed0", "online-dpo-beta=0.5-seed0", "online-dpo-gt-beta=0.5-seed0",
    "rloo-kl_coef=0.05-seed0", "grpo-kl_coef=0.04-seed0", "reinforce-pp-kl_coef=0.05-seed0", "best-of-n-seed0", "preferred-ft-seed0", "unlikelihood-alpha=0.1-seed0",
])
# what the evaluator measures: equal bit for bit between two runs of the same suite and seed on CPU
METRICS = ["gold_reward", "gold_reward_se", "kl", "kl_se", "kl_k3", "kl_k3_se", "win_rate", "win_rate_se",
           "gen_len", "n_prompts", "n_samples"]


def cli_args(out, sets=(), suite=E2E, extra=()) -> list[str]:
    args = [sys.executable, "-m", "bench.cli", "run", suite, "--out", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    return args


def run_cli(out, sets=(), cache=None, suite=E2E, timeout=1200, extra=(), env=None):
    env = {**os.environ, **({"PREFBENCH_CACHE": str(cache)} if cache else {}), **(env or {})}
    return subprocess.run(cli_args(out, sets, suite, extra), capture_output=True, text=True, env=env, timeout=timeout)


def session_pids(sid: int, pattern: str = "") -> list[int]:
    """Processes of session `sid` (a run started with start_new_session: its driver and every Ray process)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines()
            if int(line.split()[1]) == sid and pattern in line]


def dpo_log(run, trial="dpo-beta=0.5-seed0"):
    """(losses, grad norms) per step of a DPO trial's train_log.jsonl."""
    rows = [json.loads(line) for line in (run / "trials" / trial / "train_log.jsonl").read_text().splitlines()]
    return [r["losses/dpo"] for r in rows], [r["optim/grad_norm"] for r in rows]


class LineReader:
    """A child's stderr read line by line in a thread, so a test waits for a line with a deadline
    instead of blocking forever on a run that hangs (the test fails with what the run printed)."""

    def __init__(self, stream):
        import queue
        import threading

        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.text = ""
        self.ended = False

        def pump() -> None:
            for line in stream:
                self.lines.put(line)
            self.lines.put(None)  # end of the stream

        threading.Thread(target=pump, name="stderr-reader", daemon=True).start()

    def _next(self, deadline: float) -> str | None:
        import queue
        import time

        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            self.ended = True
        else:
            self.text += line
        return line

    def until(self, done, timeout: float) -> str:
        """Read until `done(text so far)` holds; AssertionError (with the text) at the end of the
        stream or after `timeout` seconds."""
        import time

        deadline = time.time() + timeout
        while not done(self.text):
            try:
                if self._next(deadline) is None:
                    raise AssertionError("the run ended early:\n" + self.text[-3000:])
            except TimeoutError:
                raise AssertionError(f"nothing awaited came within {timeout:.0f}s:\n" + self.text[-3000:]) from None
        return self.text

    def rest(self, timeout: float) -> str:
        """Everything printed from here to the end of the stream (at most `timeout` seconds)."""
        import time

        start, deadline = len(self.text), time.time() + timeout
        while not self.ended:
            try:
                self._next(deadline)
            except TimeoutError:
                raise AssertionError(f"the stream stayed open {timeout:.0f}s:\n" + self.text[-3000:]) from None
        return self.text[start:]
