"""`python -m bench.tools.gpu_bundle`: what `bench.tools.gpu_check`'s suite part (Ray Train + Tune +
DeepSpeed on a GPU) needs beyond the lent GPU machine's image, packed to travel with the working tree.

The GPU machine (bench/PERF.md, `.library`'s device notes) has CPython 3.12 with torch, transformers,
numpy, pandas, pyarrow, scipy, matplotlib, protobuf, msgpack, pyyaml, requests, click, filelock,
psutil, tqdm and the like, but no Ray, DeepSpeed or pydantic; nothing can be fetched there, and a
call carries at most 64 MiB (working tree included). Ray's wheel alone is 79 MB. So:

    python -m bench.tools.gpu_bundle build                   # -> .gpu-bundle/prefbench-gpu-cp312.tar.xz
    python -m bench.tools.gpu_bundle install .gpu-bundle/prefbench-gpu-cp312.tar.xz /tmp/site
        (prints: export PYTHONPATH=/tmp/site:$PWD)

`build` downloads the binary wheels for the target Python (`--python-version`, default 3.12;
manylinux x86_64: Ray, pydantic-core, rpds-py) with pip, copies the pure-Python packages (pydantic,
DeepSpeed, jsonschema, hjson, vaderSentiment, tensorboardX, ...) from this environment, leaves out
what part A never imports (Ray's rllib/, jars/, serve/, llm/, dashboard/client/, every __pycache__),
writes one tar.xz and checks that it and the working tree together fit the 64 MiB a call carries.
`--from-installed` takes the binary packages from this environment too (a bundle for this Python:
how the tests check bundle + installer here). `install` is one tar extraction (standard library
only), so it runs on the GPU machine before anything else is importable.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CARRY_LIMIT = 64 * 2**20  # bytes one device call carries: the working tree and the carried paths together
DEFAULT_DIR = ".gpu-bundle"  # ignored by git (.gitignore): name it in the device call's `carry`
# compiled for one Python: downloaded as wheels for the target Python (or copied, --from-installed)
BINARY = ("ray", "pydantic-core", "rpds-py")
# pure Python: copied from this environment, whatever its Python version
PURE = ("pydantic", "annotated-types", "typing-inspection", "jsonschema", "jsonschema-specifications", "referencing",
        "deepspeed", "hjson", "vaderSentiment", "tensorboardX")
# what part A never imports: Ray's RLlib, Java jars, Serve, LLM library and the dashboard's web client
DROP = ("ray/rllib", "ray/jars", "ray/serve", "ray/llm", "ray/dashboard/client")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _skip(rel: str) -> bool:
    parts = rel.split("/")
    return "__pycache__" in parts or rel.endswith(".pyc") or any(rel == d or rel.startswith(d + "/") for d in DROP)


def _copy_installed(name: str, dest: Path) -> str:
    """The installed distribution `name`: its files inside site-packages (scripts outside are left out)."""
    dist = md.distribution(name)
    root = Path(dist.locate_file(""))
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("..") or _skip(rel):
            continue
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return f"{dist.metadata['Name']}=={dist.version}"


def _download(names: list[str], python_version: str, into: Path) -> None:
    """`pip download` of the wheels of `names` (at this environment's versions) for `python_version`."""
    specs = [f"{n}=={md.version(n)}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)],
           "-d", str(into), *specs]
    subprocess.run(cmd, check=True)


def _unpack_wheels(wheels: Path, dest: Path) -> None:
    import zipfile

    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                top = info.filename.split("/", 1)[0]
                if info.is_dir() or _skip(info.filename) or top.endswith(".data"):  # .data: scripts, headers
                    continue
                target = dest / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(target, mode or 0o644)  # ray's raylet and gcs_server stay executable


def working_tree_bytes(repo: Path) -> int:
    """What a device call sends of `repo`: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def build(out: Path, *, python_version: str = "3.12", from_installed: bool = False, repo: Path | None = None,
          preset: int = 6) -> dict:
    """Write the bundle to `out` (tar.xz at xz `preset`); returns what is in it and the sizes (bytes)."""
    with tempfile.TemporaryDirectory(prefix="prefbench-bundle-") as tmp:
        site, wheels = Path(tmp) / "site", Path(tmp) / "wheels"
        site.mkdir()
        wheels.mkdir()
        if from_installed:
            packages = [_copy_installed(n, site) for n in BINARY]
        else:
            _download(list(BINARY), python_version, wheels)
            _unpack_wheels(wheels, site)
            packages = [f"{n}=={md.version(n)} (cp{python_version.replace('.', '')} wheel)" for n in BINARY]
        packages += [_copy_installed(n, site) for n in PURE]
        unpacked = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=preset) as tar:
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)
    size = out.stat().st_size
    tree = working_tree_bytes(repo) if repo is not None else 0
    return {"bundle": str(out), "packages": packages, "unpacked_bytes": unpacked, "bundle_bytes": size,
            "tree_bytes": tree, "total_bytes": size + tree, "limit_bytes": CARRY_LIMIT,
            "fits": size + tree <= CARRY_LIMIT}


def install(bundle: Path, target: Path) -> str:
    """Unpack the bundle into `target`; returns the line that puts it (and the working tree) on PYTHONPATH."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(target, filter="tar")  # modes kept: Ray's binaries stay executable
    return f"export PYTHONPATH={target}:$PWD${{PYTHONPATH:+:$PYTHONPATH}}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools.gpu_bundle", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and pack the bundle")
    b.add_argument("--out", type=Path, help=f"bundle file (default {DEFAULT_DIR}/prefbench-gpu-cpXY.tar.xz)")
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    b.add_argument("--from-installed", action="store_true",
                   help="take the compiled packages from this environment too (a bundle for this Python)")
    i = sub.add_parser("install", help="unpack a bundle into a folder and print the PYTHONPATH line")
    i.add_argument("bundle", type=Path)
    i.add_argument("target", type=Path)
    args = p.parse_args(argv)
    if args.command == "install":
        if not args.bundle.is_file():
            print(f"gpu_bundle: error: no such bundle: {args.bundle}", file=sys.stderr)
            return 2
        print(install(args.bundle, args.target))
        return 0
    version = f"{sys.version_info.major}.{sys.version_info.minor}" if args.from_installed else args.python_version
    out = args.out or Path(DEFAULT_DIR) / f"prefbench-gpu-cp{version.replace('.', '')}.tar.xz"
    repo = Path(__file__).resolve().parents[2]
    info = build(out, python_version=version, from_installed=args.from_installed, repo=repo)
    print(f"bundle {info['bundle']}: {_mib(info['bundle_bytes'])} ({_mib(info['unpacked_bytes'])} unpacked)")
    print("  " + ", ".join(info["packages"]))
    print(f"working tree {_mib(info['tree_bytes'])}; together {_mib(info['total_bytes'])} of the "
          f"{_mib(CARRY_LIMIT)} a device call carries: {'fits' if info['fits'] else 'DOES NOT FIT'}")
    return 0 if info["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
