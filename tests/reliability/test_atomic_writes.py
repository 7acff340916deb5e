"""No partial results: every parquet and report file is replaced atomically (temp file + rename), so a
killed or failing writer leaves the old file or the whole new one, never a truncated file that
`prefbench report` would read; what a killed writer leaves (`.NAME.tmp-PID`) is cleared later; a
truncated parquet is one line, exit 2; compare/export-env never write into someone else's directory."""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import results
from bench.cli import main
from bench.report import REPORT_FILES, write_report
from tests.report_data import make_run

REPO = Path(__file__).resolve().parents[2]
ROWS = 300_000  # ~5 MB of parquet: one write takes tens of ms, so random kills land inside writes


def _frame(tag: str, rows: int):
    """Frame `tag` ("A" or "B"): every row tagged, random (incompressible) values fixed by the tag."""
    import numpy as np
    import pandas as pd

    return pd.DataFrame({"tag": [tag] * rows, "row": np.arange(rows),
                         "value": np.random.default_rng(ord(tag)).random(rows)})


# The writers are forked from one Python that imported bench.results once (torch comes with it: seconds
# to start), so each of the many restarts costs a fork. Each stdin line: fork a writer that replaces
# TARGET with frame A, B, A, ... forever; print its pid; reap it once the test has killed it.
WRITER = inspect.getsource(_frame) + """
import os, sys
from pathlib import Path
from bench.results import write_parquet

target, rows = Path(sys.argv[1]), int(sys.argv[2])
frames = [_frame("A", rows), _frame("B", rows)]
print("ready", flush=True)
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:
        while True:
            for frame in frames:
                write_parquet(frame, target)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_a_killed_parquet_write_leaves_the_old_or_the_new_file_never_a_partial_one(tmp_path):
    target = tmp_path / "evals.parquet"
    expected = {tag: _frame(tag, ROWS) for tag in "AB"}
    zygote = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ROWS)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rng = random.Random(0)
    kills = mid_write = missing = 0
    seen, pid = set(), None
    try:
        assert zygote.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        while kills < 20 or (kills < 40 and time.monotonic() - t0 < 15):  # 20 to 40 kills, as time allows
            zygote.stdin.write("\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"  # dead and reaped: nothing writes now
            kills += 1
            mid_write += (tmp_path / f".{target.name}.tmp-{pid}").exists()
            pid = None
            if not target.exists():  # killed before its first write finished, with no earlier file
                missing += 1
                continue
            got = pd.read_parquet(target)  # a truncated file would raise here
            tag = got["tag"].iloc[0]
            assert tag in expected, tag
            pd.testing.assert_frame_equal(got, expected[tag])  # all of A or all of B: no mix, no missing rows
            seen.add(tag)
    finally:
        if pid is not None:  # the test failed while a writer ran: it would outlive the zygote
            os.kill(pid, signal.SIGKILL)
        zygote.stdin.close()  # its loop ends
        try:
            zygote.wait(timeout=30)
        except subprocess.TimeoutExpired:
            zygote.kill()
    print(f"kills {kills} in {time.monotonic() - t0:.1f} s, mid-write {mid_write}, no file yet {missing}, "
          f"frames seen {sorted(seen)}")
    assert mid_write >= 3  # the test exercised kills inside a write, so it could have failed
    assert seen  # and it read whole files after kills
    # each killed writer's temp is stale (its PID is dead): removed, and the result file kept
    stale = sorted(tmp_path.glob(".*.tmp-*"))
    assert len(stale) == mid_write
    assert sorted(results.remove_stale_temps(tmp_path)) == stale
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_every_report_file_is_written_through_the_atomic_helper(tmp_path, monkeypatch):
    out = make_run(tmp_path / "run", seeds=(0, 1))
    through_atomic = []
    real = results._atomic

    def recording(path, write):
        through_atomic.append(Path(path))
        real(path, write)

    monkeypatch.setattr(results, "_atomic", recording)
    for attempt in ("first build", "rebuild over existing files"):
        through_atomic.clear()
        before = _snapshot(out)
        write_report(out)
        after = _snapshot(out)
        # every file created or changed (a replaced file has a new inode) went through _atomic
        written = {name for name, stat in after.items() if before.get(name) != stat}
        assert {p.name for p in through_atomic} == written == set(REPORT_FILES), attempt
        assert all(p.parent == out for p in through_atomic)
        assert not list(out.glob(".*")), attempt  # no temp file left


def test_write_report_removes_temps_of_dead_writers_only(tmp_path):
    out = make_run(tmp_path / "run", seeds=(0,))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".report.html.tmp-{int(dead.stdout)}"
    live = out / f".evals.parquet.tmp-{os.getppid()}"  # a writer still running (here: pytest's parent)
    for path in (stale, live):
        path.write_bytes(b"half a file")
    write_report(out)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_write_that_raises_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    target = tmp_path / "trials.parquet"
    old = _frame("A", 1000)
    results.write_parquet(old, target)

    def half_then_raise(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1" + b"\0" * 4096)  # part of a file, then the failure
        raise error

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_raise)
    with pytest.raises(type(error)):
        results.write_parquet(_frame("B", 1000), target)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pd.read_parquet(target), old)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def _report_cli(args, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name, damage", [
    ("evals.parquet", "truncate"), ("trials.parquet", "truncate"), ("evals.parquet", "text"),
    ("trials.parquet", "empty"),
])
def test_report_on_a_damaged_parquet_is_one_line_exit_2(tmp_path, capsys, name, damage):
    out = make_run(tmp_path / "run", seeds=(0,))
    data = (out / name).read_bytes()
    (out / name).write_bytes({"truncate": data[: len(data) // 2], "text": b"not parquet\n", "empty": b""}[damage])
    code, err = _report_cli(["report", out], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"prefbench: error: {out}: cannot read its parquet files"), err
    assert not (out / "report.md").exists()


def test_report_on_a_run_with_a_broken_config_yaml_is_one_line_exit_2(tmp_path, capsys):
    out = make_run(tmp_path / "run", seeds=(0,), config="report: [unclosed\n")
    code, err = _report_cli(["report", out], capsys)
    assert code == 2 and len(err) == 1 and "config.yaml: not valid YAML" in err[0], err


def test_compare_out_refuses_a_foreign_directory_and_reuses_its_own(tmp_path, capsys):
    runs = [make_run(tmp_path / name, seeds=(0,)) for name in ("base", "new")]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for dest, words in ((foreign, "not empty and not an earlier compare's output"), (runs[0], "no compare.md"),
                        (a_file, "exists and is not a directory")):
        before = _snapshot(dest) if dest.is_dir() else a_file.read_text()
        code, err = _report_cli(["compare", *runs, "--out", dest], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("prefbench: error: --out ") and words in err[0], err
        assert (_snapshot(dest) if dest.is_dir() else a_file.read_text()) == before  # left as it was
    cmp = tmp_path / "cmp"
    for attempt in ("new directory", "over an earlier compare"):
        code, err = _report_cli(["compare", *runs, "--out", cmp], capsys)
        assert code == 0, (attempt, err)
    assert sorted(p.name for p in cmp.iterdir()) == ["compare.csv", "compare.md", "compare_frontier.png",
                                                     "compare_frontier.svg"]


@pytest.mark.parametrize("kind", ["non-empty directory", "file"])
def test_export_env_refuses_an_occupied_dir_before_preparing_anything(tmp_path, monkeypatch, capsys, kind):
    from bench import export

    def no_prepare(*a, **k):
        raise AssertionError("the env must not be prepared for a refused DIR")

    monkeypatch.setattr(export, "prepared_env", no_prepare)
    monkeypatch.setenv("PREFBENCH_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "dest"
    if kind == "file":
        dest.write_text("mine")
    else:
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    code, err = _report_cli(["export-env", "tiny-sentiment", dest], capsys)
    assert code == 2 and err == [f"prefbench: error: {dest}: already exists and is not an empty directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no cache, no temp folder
