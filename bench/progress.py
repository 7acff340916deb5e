"""Step progress of the long parts of a run, as the user sees it on stderr: a shared stage's
optimizer steps (the env's SFT, the reward model) and a trial's training steps, with the rate and
the time left, formatted by tqdm.

In a terminal a stage is one tqdm bar, redrawn in place (nothing else prints while a stage runs);
in a log (not a TTY) every update is one line, at most one per `min_interval_s` per stage or trial
(and always the last), so a log of a cold run shows where the minutes go without a flood.
`prefbench run --quiet` turns all of it off (`set_quiet`). No Ray here: bench.run.ray_runner feeds
it the steps the workers report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """`--quiet`: no progress lines or bars in this process."""
    global _QUIET
    _QUIET = quiet


def quiet() -> bool:
    return _QUIET


@dataclass
class _Track:
    label: str
    total: int
    t_start: float  # when the driver first heard of it
    first: tuple[int, float] | None = None  # (step, time) of the first report: the rate is measured from it
    printed_at: float = float("-inf")
    bar: tqdm | None = None


@dataclass
class StepProgress:
    """Steps per key (a stage or a trial): `update(key, label, step, total)` as reports arrive."""

    min_interval_s: float = 10.0
    stream: object = None  # default sys.stderr
    bars: bool | None = None  # tqdm bars in place of lines; default: when the stream is a terminal
    tracks: dict[str, _Track] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        if self.bars is None:
            self.bars = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, key: str, label: str, step: int, total: int, now: float | None = None) -> str | None:
        """Record that `key` is at `step` of `total`; returns the line written (None when throttled or quiet)."""
        if _QUIET or total <= 0:
            return None
        now = time.time() if now is None else now
        track = self.tracks.setdefault(key, _Track(label, total, now))
        track.total = total
        if track.first is None:
            track.first = (step, now)
        done_steps, took = step - track.first[0], now - track.first[1]
        rate = done_steps / took if done_steps > 0 and took > 0 else None
        if self.bars:
            if track.bar is None:
                track.bar = tqdm(total=total, desc=label, unit="step", file=self.stream, leave=False,
                                 dynamic_ncols=True)
            track.bar.n = step
            track.bar.refresh()
            if step >= total:
                self.finish(key)
            return None
        if step < total and (rate is None or now - track.printed_at < self.min_interval_s):
            return None  # throttled, or no rate yet (the first report's time includes loading the models)
        track.printed_at = now
        line = "[prefbench]   " + tqdm.format_meter(step, total, now - track.t_start, prefix=label, unit="step",
                                                    rate=rate, ncols=0)
        print(line, file=self.stream, flush=True)
        if step >= total:
            self.tracks.pop(key, None)
        return line

    def finish(self, key: str) -> None:
        """`key` is over (done or failed): close its bar."""
        track = self.tracks.pop(key, None)
        if track is not None and track.bar is not None:
            track.bar.close()
