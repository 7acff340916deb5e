"""Models and datasets that live on the Hugging Face hub, or in local directories of the same format.

Envs of the paper's tasks name their models and datasets the way transformers and datasets do: a
hub id (`gpt2-large`, `stanfordnlp/imdb`) or a local path. The SAME loading code serves both
(`from_pretrained(name)`, `datasets.load_dataset(name, config, split=...)`), so a local directory
saved with `save_pretrained`, or a folder laid out like the dataset's hub repo (its parquet files,
its README's `configs:` header), is a drop-in replacement where the hub cannot be reached.

`require_model` / `require_dataset` run in the driver before Ray starts (an env's `preflight`):
a resource that is neither a local path, nor in the local hub cache, nor reachable on the hub is
one line naming it, the env parameter that names it, and how to use local files instead.

`read_split`, `require_text_columns` and `check_context` run in an env's `build`: a dataset that is
there but unusable (no such split, a file that is empty or not parquet, no rows, a missing or
non-text column) and texts too long for the policy's context are a ValueError of one line naming
the dataset and the env parameter to change (bench prints it, exit 2), not a pyarrow traceback
or an index error in the position embeddings mid-trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

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
            from algorithms.registry import first_line

            first = first_line(e, 160)
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


# ------------------------------------------------------------------- data that is there but unusable
def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (datasets wraps pyarrow's reason in DatasetGenerationError)."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _first_line(e: BaseException) -> str:
    """`TypeName: first line` of an error (algorithms.registry.first_line), the name alone when it has no text."""
    from algorithms.registry import first_line

    line = first_line(e, 200)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _bad_file(name: str, config: str | None, split: str) -> str | None:
    """What is wrong with a file of the local dataset folder `name`: empty (0 bytes), not parquet, or
    without rows (datasets cannot read a zero-row parquet file). Loading one split prepares them all,
    so every split's files are looked at, `split`'s first."""
    import datasets
    import pyarrow.parquet as pq

    root = Path(name).expanduser()
    try:
        data_files = datasets.load_dataset_builder(str(root), config).config.data_files or {}
    except Exception:
        return None
    for name_of_split in [split] + [s for s in data_files if s != split]:
        for file in map(Path, data_files.get(name_of_split, [])):
            shown = file.relative_to(root) if file.is_relative_to(root) else file
            if not file.is_file():
                continue
            if file.stat().st_size == 0:
                return f"file {shown} is empty (0 bytes)"
            if file.suffix != ".parquet":
                continue
            try:
                rows = pq.read_metadata(file).num_rows
            except Exception as e:
                return f"file {shown} is not a parquet file ({_first_line(e)})"
            if rows == 0:
                return f"file {shown} has 0 rows"
    return None


@contextlib.contextmanager
def _parquet_errors_unlogged():
    """datasets logs a bad parquet file at ERROR before it raises; read_split reports it in its own line."""
    logger = logging.getLogger("datasets.packaged_modules.parquet.parquet")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_split(name: str, split: str, config: str | None = None, *, env: str, param: str):
    """`load_split`, every way it can fail one line (ValueError) naming the dataset and env.params.{param}:
    no such split or config, a file that is empty, not parquet, or without rows; a split of 0 rows."""
    where = f"dataset {name} (env.params.{param}" + (f", config {config})" if config else ")")
    try:
        with _parquet_errors_unlogged():
            ds = load_split(name, split, config)
    except Exception as e:
        why = (_bad_file(name, config, split) if _is_local(name) else None) or _first_line(_root_cause(e))
        raise ValueError(f"env {env}: cannot load split {split!r} of {where}: {why}") from None
    if len(ds) == 0:
        raise ValueError(f"env {env}: split {split!r} of {where} has 0 rows")
    return ds


def require_text_columns(ds, columns: Sequence[str], *, name: str, split: str, env: str, param: str) -> None:
    """Each of `columns` is in the dataset `ds` and holds strings, or a ValueError of one line."""
    missing = [c for c in columns if c not in ds.column_names]
    where = f"env {env}: dataset {name} (env.params.{param}), split {split!r},"
    if missing:
        raise ValueError(f"{where} has columns {ds.column_names}; missing {missing}")
    for c in columns:
        dtype = getattr(ds.features[c], "dtype", type(ds.features[c]).__name__)
        if dtype not in ("string", "large_string"):
            raise ValueError(f"{where} column {c!r} holds {dtype}, not text")


CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length")


def context_length(config) -> tuple[int, str] | None:
    """The most tokens (prompt + completion) a model with this transformers config attends over, and the
    config field that says so (GPT-2/GPT-J: n_positions; Llama, GPT-NeoX: max_position_embeddings)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in CONTEXT_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int) and value > 0:
            return value, field
    return None


def check_context(lengths: Sequence[int], extra: int, *, context: tuple[int, str] | None, env: str, what: str,
                  model: str, extra_name: str, fix: Callable[[int, int], str]) -> None:
    """Every sequence of `lengths` tokens + `extra` more (the completion, an EOS) fits the model's context,
    or a ValueError of one line: how many do not, the longest, the context, and `fix(context, longest)`,
    the param to change. A model run past its positions fails mid-trial with an index error (GPT-2's
    position embeddings), so texts are never cut to fit: the user chooses what to drop or shorten."""
    if context is None:
        return
    limit, field = context
    over = [n for n in lengths if n + extra > limit]
    if over:
        longest = max(over)
        raise ValueError(
            f"env {env}: {len(over)} of {len(lengths)} {what} do not fit the context of {model} ({limit} tokens, "
            f"config {field}): the longest is {longest} tokens + {extra_name} = {longest + extra}; "
            f"{fix(limit, longest)}"
        )


def text_table(name: str, split: str, needed: Sequence[str], *, env: str, param: str, config: str | None = None):
    """The `needed` text columns of a split as a DataFrame, without the rows that have a null in one of
    them, and how many rows those were. A missing split or column, an unreadable file, no rows, every
    row null: one line (ValueError) naming the dataset and env.params.{param}."""
    data = read_split(name, split, config, env=env, param=param)
    require_text_columns(data, needed, name=name, split=split, env=env, param=param)
    table = data.select_columns(list(needed)).to_pandas()
    null = table.isna().any(axis=1).to_numpy()
    if null.all():
        raise ValueError(f"env {env}: dataset {name} (env.params.{param}), split {split!r}: every one of its "
                         f"{len(table)} rows has a null {' or '.join(needed)}")
    return table[~null].reset_index(drop=True), int(null.sum())


def take_fitting(candidates: list, n: int, rng, fits: Callable[[list], "Sequence[bool]"]) -> tuple[list, int]:
    """Up to n candidates that fit, in a seeded random order (`rng`: a numpy Generator); only as many
    are tokenized (`fits` on a chunk) as needed. Returns (kept, examined): examined − len(kept)
    candidates were dropped for length."""
    order = rng.permutation(len(candidates))
    kept, examined = [], 0
    chunk = max(256, 2 * n)
    for start in range(0, len(order), chunk):
        batch = [candidates[i] for i in order[start : start + chunk]]
        ok = fits(batch)
        for item, good in zip(batch, ok):
            examined += 1
            if good:
                kept.append(item)
                if len(kept) == n:
                    return kept, examined
    return kept, examined


def load_policy(workdir: Path, stage: str):
    """An env's policy at `stage`: "init" is the model named in the env's `model.json` (a hub id
    or a local dir, read where it lives, not copied per env), any other stage the saved policy."""
    import json

    from algorithms.policy import Policy

    if stage != "init":
        return Policy.from_pretrained(Path(workdir) / stage)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = json.loads((Path(workdir) / "model.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(names["tokenizer"] or names["model"])
    return Policy(AutoModelForCausalLM.from_pretrained(names["model"]), tokenizer)
