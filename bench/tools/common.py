"""What the tools share: running a child process (their measurements run in fresh processes), and the
header of versions and the device they ran on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from bench import package_versions

TOOL_PACKAGES = ("torch", "deepspeed", "ray", "transformers")


def versions(device: str, extra: tuple[str, ...] = ()) -> dict:
    """Package versions (bench.package_versions) and the device: its name, and on CUDA its capability,
    memory and CUDA version; the CPU's core count."""
    import torch

    out = {**package_versions(TOOL_PACKAGES + extra), "cpus": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        import platform

        out["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return out


def run_child(cmd: list[str], *, log: Path | None = None, timeout: float | None = None, env: dict | None = None,
              echo: str | None = None, poll: Callable[[int], None] | None = None, poll_s: float = 0.5) -> dict:
    """Run `cmd` in its own process group, stdout and stderr together (into `log` too, when given);
    lines starting with `echo` are also shown on our stderr (progress); `poll(pid)` is called every
    `poll_s` seconds while it runs (perf's memory sampling). On timeout, Ctrl-C or SIGTERM the whole
    group is stopped (TERM, then KILL). Returns {returncode, timed_out, wall_s, stdout_lines}."""
    t0 = time.time()
    lines: list[str] = []
    with (log.open("w") if log is not None else open(os.devnull, "w")) as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, bufsize=1)

        def pump() -> None:
            try:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()
                    lines.append(line.rstrip("\n"))
                    if echo and line.startswith(echo):
                        print("    " + line.rstrip(), file=sys.stderr, flush=True)
            except ValueError:  # the log was closed: we stopped waiting for a grandchild holding the pipe
                pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        deadline = None if timeout is None else t0 + timeout
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s if poll else (None if deadline is None else max(0.0, deadline - time.time())))
                    break
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.time() >= deadline:
                        timed_out = True
                        stop_group(proc)
                        break
                    if poll:
                        poll(proc.pid)
        except BaseException:  # Ctrl-C or SIGTERM: the child has its own session, so stop it ourselves
            stop_group(proc)
            raise
        reader.join(timeout=10)  # a leftover grandchild may hold the pipe: don't wait for it
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1),
            "stdout_lines": lines}


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a child's whole process group: SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
