"""bench.tools.gpu_bundle: the bundle that carries Ray, DeepSpeed and the rest of what the GPU check's
suite part needs beyond the GPU machine's image. Here: a bundle for this Python (`--from-installed`),
unpacked by its installer into a fresh virtual environment that holds only what the image holds
(no index, nothing fetched), and a trial of the e2e suite run from it through Ray and DeepSpeed."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from bench.tools import gpu_bundle

ROOT = Path(__file__).resolve().parent.parent
# the Python packages of the GPU machine's image (the device notes' list, 2026-11-17), as far as
# prefbench's run path could touch them; each is linked in with what it requires, when installed here
IMAGE = ["accelerate", "aiohttp", "attrs", "certifi", "charset-normalizer", "click", "cloudpickle", "contourpy", "cycler",
         "filelock", "fonttools", "fsspec", "grpcio", "huggingface-hub", "idna", "jinja2", "kiwisolver", "markupsafe",
         "matplotlib", "msgpack", "networkx", "ninja", "numpy", "packaging", "pandas", "pillow", "protobuf", "psutil",
         "py-cpuinfo", "pyarrow", "pyparsing", "python-dateutil", "pyyaml", "regex", "requests", "rich",
         "safetensors", "scipy", "six", "sympy", "tensorboard", "tokenizers", "torch", "tqdm", "transformers",
         "typing-extensions", "urllib3", "einops", "nvidia-ml-py", "setuptools"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_closure() -> set[str]:
    """IMAGE and, recursively, what each requires (no extras), less what the bundle brings."""
    bundled = {_norm(n) for n in gpu_bundle.BINARY + gpu_bundle.PURE}
    seen, todo = set(), [_norm(n) for n in IMAGE]
    while todo:
        name = todo.pop()
        if name in seen or name in bundled:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(_norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def _link_image(into: Path) -> None:
    """A folder of links to the image's packages as installed here (their top-level modules and metadata)."""
    into.mkdir()
    for name in _image_closure():
        dist = md.distribution(name)
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            if (root / top).exists() and not (into / top).exists():
                (into / top).symlink_to(root / top)


@pytest.mark.slow
def test_bundle_installs_into_an_image_like_venv_and_runs_an_e2e_trial(tmp_path):
    bundle = tmp_path / "bundle.tar.xz"
    info = gpu_bundle.build(bundle, from_installed=True, repo=ROOT, preset=0)
    print(f"bundle at preset 0: {info['bundle_bytes'] / 2**20:.1f} MiB, {info['unpacked_bytes'] / 2**20:.1f} MiB unpacked")
    assert info["tree_bytes"] > 0 and info["total_bytes"] == info["bundle_bytes"] + info["tree_bytes"]
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert "ray/__init__.py" in names and "deepspeed/__init__.py" in names and "pydantic/__init__.py" in names
    assert not [n for n in names if n.startswith(("ray/rllib", "ray/jars", "ray/serve/", "ray/llm/", "ray/dashboard/client"))
                or "__pycache__" in n]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _link_image(tmp_path / "image")
    (site / "image.pth").write_text(str(tmp_path / "image") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PYTHONPATH=str(ROOT))
    probe = subprocess.run([python, "-c", "import ray"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0  # the image alone has no Ray

    target = tmp_path / "site"
    line = subprocess.run([python, "-m", "bench.tools.gpu_bundle", "install", str(bundle), str(target)],
                          capture_output=True, text=True, env=env, check=True, cwd=ROOT).stdout.strip()
    assert line == f"export PYTHONPATH={target}:$PWD${{PYTHONPATH:+:$PYTHONPATH}}"
    env["PYTHONPATH"] = f"{target}:{ROOT}"
    where = subprocess.run([python, "-c", "import ray, deepspeed; print(ray.__file__, deepspeed.__file__)"],
                           capture_output=True, text=True, env=env)
    assert where.returncode == 0, where.stderr[-4000:]
    assert where.stdout.count(str(target)) == 2

    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({
        "name": "bundle", "env": {"name": "tiny-sentiment", "params": {
            "num_reviews": 600, "sft_epochs": 0.5, "num_train_prompts": 40, "num_eval_prompts": 16, "n_layer": 1,
            "n_embd": 32}},
        "baseline": False, "train": {"steps": 2, "batch_size": 8, "warmup_steps": 0, "eval_every": 2},
        "eval": {"num_prompts": 16, "samples_per_prompt": 2, "max_new_tokens": 8, "temperatures": [1.0]},
        "algorithms": [{"name": "dpo", "sweep": {"beta": [0.5]}}],
        "scaling": {"num_workers": 1, "max_concurrent_trials": 1},
    }))
    out = tmp_path / "out"
    proc = subprocess.run([python, "-m", "bench.cli", "run", str(suite), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**env, "PREFBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["status"].tolist() == ["ok"]
    versions = json.loads((out / "versions.json").read_text())
    assert versions["ray"] == md.version("ray") and versions["deepspeed"] == md.version("deepspeed")
