"""`prefbench ARGS` in the test's own process (`bench.cli.main`, as the console script calls it): a
user error is checked without a Python start-up and imports (~4 s a subprocess on 2 cores). The
tests that need a real process (what it imports, the console entry, exit codes of the interpreter)
run one."""

from __future__ import annotations

import subprocess


def cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """Exit code, stdout and stderr of `prefbench ARGS`, run by `bench.cli.main` in this process.
    An exception escaping `main` (a traceback in a real process) fails the calling test."""
    from bench.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)
