"""Models and datasets that live on the Hugging Face hub, or in local directories of the same format.

Envs of the paper's tasks name their models and datasets the way transformers and datasets do: a
hub id (`gpt2-large`, `stanfordnlp/imdb`) or a local path. The SAME loading code serves both
(`from_pretrained(name)`, `datasets.load_dataset(name, config, split=...)`), so a local directory
saved with `save_pretrained`, or a folder laid out like the dataset's hub repo (its parquet files,
its README's `configs:` header), is a drop-in replacement where the hub cannot be reached.

`require_model` / `require_dataset` run in the driver before Ray starts (an env's `preflight`):
a resource that is neither a local path, nor in the local hub cache, nor reachable on the hub is
one line naming it, the env parameter that names it, and how to use local files instead.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_TIMEOUT_S = 10.0


class Unavailable(Exception):
    """An env's model or dataset cannot be had here; the message is the one line the user sees."""


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:
        return False


def _require(name: str, repo_type: str, *, env: str, param: str) -> None:
    what = "model" if repo_type == "model" else "dataset"
    if not isinstance(name, str) or not name:
        raise Unavailable(f"env {env}: env.params.{param} must name a hub {what} or a local directory")
    if _is_local(name):
        if not Path(name).expanduser().exists():
            raise Unavailable(f"env {env}: env.params.{param} = {name}: no such file or directory")
        return
    if _cached(name, repo_type):
        return
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
    else:
        from huggingface_hub import HfApi

        try:
            HfApi().repo_info(name, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
            return
        except Exception as e:  # network down, DNS, 404, gated: all mean "not usable from here"
            first = str(e).splitlines()[0][:160] if str(e) else ""
            reason = f"{type(e).__name__}: {first}"
    local = "a local directory saved with save_pretrained" if what == "model" else \
        "a local folder with the dataset's files in the same format (parquet, as on the hub)"
    raise Unavailable(
        f"env {env}: cannot load {what} {name!r} (env.params.{param}) from the Hugging Face hub "
        f"({reason}); set --set env.params.{param}=PATH to {local}"
    )


def require_model(name: str, *, env: str, param: str) -> None:
    """`name` (hub id or local path) can be loaded with from_pretrained here, or raise Unavailable."""
    _require(name, "model", env=env, param=param)


def require_dataset(name: str, *, env: str, param: str) -> None:
    """`name` (hub id or local folder) can be loaded with datasets.load_dataset here, or raise Unavailable."""
    _require(name, "dataset", env=env, param=param)


def load_split(name: str, split: str, config: str | None = None):
    """`datasets.load_dataset(name, config, split=split)`: a hub id or a local folder, the same call."""
    import datasets

    path = str(Path(name).expanduser()) if _is_local(name) else name
    return datasets.load_dataset(path, config, split=split)
