"""`prefbench export-env ENV DIR`: a prepared env in the formats other tools read (Hugging Face, TRL).

DIR receives:

- `sft/`: the SFT policy (prefbench's reference) and its tokenizer in Hugging Face format;
  `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR/"sft")` load them.
- `pairs.parquet`: prompt, chosen, rejected (TRL's standard preference format, read as-is by
  DPOTrainer and RewardTrainer), plus chosen_gold, rejected_gold (the env's gold reward of each).
- `prompts.parquet`: prompt (the train prompts; TRL's prompt-only format for online trainers).
- `eval_prompts.parquet`: prompt (the env's fixed evaluation prompts, in order).
- `references.parquet`: prompt, completion, gold (one SFT sample per eval prompt: the win-rate baseline).
- `README.md`: a card with the env, its resolved params and seed, the gold reward, how text becomes
  tokens, and the TRL code that trains on the folder. Its YAML header lets
  `datasets.load_dataset(DIR, "pairs")` (or "prompts", "eval_prompts", "references") find the files.

The env is prepared by `bench.run.prepare_env` with the suite that `--set` builds, so validation, the
cache key and the SFT stage (a Ray Train job) are those of `prefbench run`: an export of env X with
params P and seed s IS the env a run with the same env section and seed uses, and shares its cache.
A cached env is exported without starting Ray. Completions are stored with a leading space because
TRL joins prompt and completion as strings (`prompt + chosen`): a sub-word model's samples have one
already (" like"), a word-level env's ("like") get one here.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import shlex
import shutil
from pathlib import Path

import pandas as pd
import yaml

from bench import __version__, say
from bench.config import ConfigError, SuiteConfig, apply_override, build_dataclass, env_params, validate
from bench.results import remove_stale_temps
from bench.errors import UserError
from bench.run.prepare import cache_root, prepared_env
from envs import ENVS

# --set keys export-env takes: what defines the env (and its cache key), and how its SFT stage runs
SET_KEYS = ("env.params", "deepspeed", "scaling", "cache_dir", "storage_path")
DATA_FILES = {  # load_dataset config name -> file (also the card's YAML header)
    "pairs": "pairs.parquet",
    "prompts": "prompts.parquet",
    "eval_prompts": "eval_prompts.parquet",
    "references": "references.parquet",
}


def export_suite(env_name: str, overrides: list[str], seed: int, *, command: str = "export-env",
                 allowed: tuple[str, ...] = SET_KEYS) -> SuiteConfig:
    """The suite `prefbench run` would see for this env section and seed, validated the same way;
    `--set` keys outside `allowed` are refused in one line naming `command`."""
    try:
        env = ENVS.get(env_name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    raw: dict = {"name": f"export-{env_name}", "env": {"name": env_name, "params": {}}, "seeds": [seed],
                 "algorithms": [{"name": "sft"}]}
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if not is_allowed(key, allowed):
            fields = {f.name for f in dataclasses.fields(env.params_cls)}
            hint = f" (did you mean env.params.{key}?)" if key in fields else ""
            keys = ", ".join(k if k in ("cache_dir", "storage_path") else f"{k}.*" for k in allowed)
            raise ConfigError(f"--set {key}: {command} takes {keys}; the env is its own argument, its seed --seed{hint}")
        apply_override(raw, assignment)
    suite = build_dataclass(SuiteConfig, raw, "")
    validate(suite)
    return suite


def is_allowed(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in allowed)


def export_env(env_name: str, dest: str | Path, overrides: list[str], seed: int = 0, address: str | None = None) -> Path:
    """Prepare (or reuse) the env and write it to `dest`; a failure leaves nothing there."""
    suite = export_suite(env_name, overrides, seed)  # ConfigError before anything starts
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest}: already exists and is not an empty directory")
    env_dir = prepared_env(suite, seed, address, needs={"pairs"})

    final = dest.resolve()
    created = _missing_ancestor(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    # every file goes into a temp folder beside DIR (same filesystem), renamed to DIR once complete: a
    # killed export leaves no partial DIR, only this hidden folder, removed by the next export to DIR
    tmp = final.with_name(f".{final.name}.export-tmp-{os.getpid()}")
    remove_stale_temps(final.parent, f".{glob.escape(final.name)}.export-tmp-*")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(suite, seed, env_dir, tmp, final)
        try:
            os.replace(tmp, final)  # onto a missing or empty directory: atomic
        except OSError as e:  # DIR was filled (or made a file) while the env was prepared
            raise UserError(f"{dest}: no longer an empty directory ({e.strerror}); nothing exported") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    say(f"[prefbench] exported env {env_name} seed {seed} to {dest}")
    return dest


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (removed again when the export fails)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _joined(texts: pd.Series) -> pd.Series:
    """Completions as TRL concatenates them: `prompt + completion`, so a leading space separates the words."""
    return texts.map(lambda t: f" {t}" if t and not t[0].isspace() else t)


def _write(suite: SuiteConfig, seed: int, env_dir: Path, tmp: Path, dest: Path) -> None:
    from envs.base import load_env_data

    data = load_env_data(env_dir)
    tmp.mkdir(parents=True)
    shutil.copytree(env_dir / "sft", tmp / "sft")  # the reference's own files, byte for byte
    pairs = data.pairs.copy()
    pairs["chosen"], pairs["rejected"] = _joined(pairs["chosen"]), _joined(pairs["rejected"])
    refs = data.references.copy()
    refs["completion"] = _joined(refs["completion"])
    pairs.to_parquet(tmp / "pairs.parquet", index=False)
    pd.DataFrame({"prompt": data.train_prompts}).to_parquet(tmp / "prompts.parquet", index=False)
    pd.DataFrame({"prompt": data.eval_prompts}).to_parquet(tmp / "eval_prompts.parquet", index=False)
    refs.to_parquet(tmp / "references.parquet", index=False)
    same, total, cut = _token_agreement(tmp / "sft", data.pairs)
    if same < total:
        say(f"[prefbench] note: TRL's tokenisation of prompt + completion differs from prefbench's for "
            f"{total - same} of {total} pair completions (see README.md)")
    counts = {"pairs": len(pairs), "prompts": len(data.train_prompts), "eval_prompts": len(data.eval_prompts),
              "references": len(refs)}
    (tmp / "README.md").write_text(_card(suite, seed, env_dir, dest, counts, (same, total, cut)))


def _token_agreement(sft_dir: Path, pairs: pd.DataFrame) -> tuple[int, int, int]:
    """(same, total, cut): how many of the pairs' completions TRL tokenises exactly as prefbench trains
    on them, of how many, and how many were cut at max_new_tokens (no EOS for prefbench).

    prefbench: tokens(prompt, with special tokens) + tokens(completion, without) + EOS where the
    completion ended (`chosen_ended` / `rejected_ended`; algorithms.policy).
    TRL (DPOTrainer, RewardTrainer): tokens(prompt + completion + eos_token), one string: an EOS on
    every completion, so a completion cut at max_new_tokens never agrees.
    """
    from transformers import AutoTokenizer

    from algorithms.policy import Policy, ended_flags

    policy = Policy(None, AutoTokenizer.from_pretrained(str(sft_dir)))  # tokenisation only: no model needed
    tok = policy.tokenizer
    same = total = cut = 0
    for column in ("chosen", "rejected"):
        prompts, completions = pairs["prompt"].tolist(), pairs[column].tolist()
        ended = ended_flags(pairs, column)
        cut += 0 if ended is None else len(ended) - sum(ended)
        ours = [p + c for p, c in zip(policy.encode_prompts(prompts), policy.encode_completions(completions, ended=ended))]
        texts = [p + j + tok.eos_token for p, j in zip(prompts, _joined(pairs[column]))]
        theirs = tok(texts)["input_ids"]
        same += sum(a == list(b) for a, b in zip(ours, theirs))
        total += len(ours)
    return same, total, cut


def _gold_text(env) -> str:
    """The env's own words for its gold reward: the docstring of `gold_for` (when it has one) or `gold`."""
    fn = getattr(env, "gold_for", None) or env.gold
    return inspect.getdoc(fn) or "(the env's `gold` has no docstring)"


def _command(suite: SuiteConfig, seed: int, env, params: dict) -> str:
    """The export-env command line of this env: one --set per param that differs from its default."""
    defaults = dataclasses.asdict(env.params_cls())
    sets = [f"env.params.{k}={json.dumps(v)}" for k, v in params.items() if v != defaults.get(k)]
    if suite.deepspeed.bf16:
        sets.append("deepspeed.bf16=true")
    if suite.deepspeed.autocast:
        sets.append("deepspeed.autocast=true")
    return " ".join(["prefbench export-env", shlex.quote(suite.env.name), "DIR", *(f"--set {shlex.quote(a)}" for a in sets),
                     f"--seed {seed}"])


# long by nature: the dataset card is one markdown template, filled in top to bottom
def _card(suite: SuiteConfig, seed: int, env_dir: Path, dest: Path, counts: dict, agreement: tuple[int, int]) -> str:
    env = ENVS.get(suite.env.name)
    params = dataclasses.asdict(env_params(suite))
    module_doc = inspect.getdoc(inspect.getmodule(type(env))) or inspect.getdoc(type(env)) or ""
    header = {"configs": [{"config_name": name, "data_files": [{"split": "train", "path": path}],
                           **({"default": True} if name == "pairs" else {})} for name, path in DATA_FILES.items()],
              "tags": ["prefbench", suite.env.name, "dpo", "preference"]}
    run_section = {"env": {"name": suite.env.name, "params": params}, "seeds": [seed]}
    precision = {k: True for k in ("bf16", "autocast") if getattr(suite.deepspeed, k)}
    if precision:
        run_section["deepspeed"] = precision
    same, total, cut = agreement
    tokens_line = (
        f"For this env the two agree on all {total} pair completions (checked at export)." if same == total else
        f"For this env they differ on {total - same} of {total} pair completions (checked at export): {cut} of them "
        "were cut at `max_new_tokens` (TRL appends an EOS to those, prefbench does not), and a sub-word tokenizer can "
        "merge the space with the completion's first word differently from tokenising the completion on its own, so "
        "TRL trains on slightly different token ids than prefbench for the rest."
    )
    d = str(dest)
    return f"""---
{yaml.safe_dump(header, sort_keys=False).rstrip()}
---

# {suite.env.name}, seed {seed}: exported by prefbench {__version__}

{module_doc}

## Files

| file | rows | columns |
|---|---|---|
| `sft/` | - | the SFT policy (prefbench's reference) and its tokenizer, Hugging Face `save_pretrained` format |
| `pairs.parquet` | {counts['pairs']} | prompt, chosen, rejected, chosen_gold, rejected_gold |
| `prompts.parquet` | {counts['prompts']} | prompt (train prompts, for online methods) |
| `eval_prompts.parquet` | {counts['eval_prompts']} | prompt (prefbench's fixed evaluation prompts, in order) |
| `references.parquet` | {counts['references']} | prompt, completion, gold (one SFT sample per eval prompt: the win-rate baseline) |

How the env makes its pairs is in the description above; `chosen_gold` and `rejected_gold` are the gold
rewards of the two completions. `load_dataset("{d}", "pairs")` (or `prompts`, `eval_prompts`,
`references`) reads them through this card's YAML header; `load_dataset("parquet", data_files=...)` works too.

## Gold reward

{_gold_text(env)}

Scores are floats, higher is better. With prefbench installed, the same function:

```python
from envs import ENVS
from envs.base import gold_fn
env = ENVS.get("{suite.env.name}")
gold = gold_fn(env, env.params_cls(**PARAMS), "{env_dir}")  # PARAMS: the params below
scores = gold(prompts, completions)  # a leading space or none: both read as prompt + completion
```

## Environment

Env `{suite.env.name}` version {getattr(env, "version", 0)}, seed {seed}, prefbench {__version__}. This is the env that
`prefbench run` prepares for a suite with this env section and seed (same validation, same cache key, same SFT):

```yaml
{yaml.safe_dump(run_section, sort_keys=False).rstrip()}
```

Cached at `{env_dir}` (cache root `{cache_root(suite)}`). The same export again:

```
{_command(suite, seed, env, params)}
```

## Text and tokens

prefbench trains on `tokens(prompt)` (with the tokenizer's special tokens, e.g. a BOS) followed by
`tokens(completion)` (without special tokens) and EOS only where the sample stopped on its own: the columns
`chosen_ended` / `rejected_ended` (and `ended` in references.parquet) say which did; a completion cut at
`max_new_tokens` is trained on without an EOS, as it was sampled. TRL (DPOTrainer, RewardTrainer) tokenises
`prompt + completion` as one string, with the tokenizer's special tokens, after appending `eos_token` to chosen and
rejected, so it trains the cut completions with an EOS the policy never produced (drop those pairs, or keep them
and know it). So
completions here carry a leading space (TRL's standard format, e.g. prompt "The sky is", chosen " blue."): a
sub-word model's samples start with one anyway; a word-level env's completions get one added here (its tokenizer
splits on whitespace, so the ids are the same). {tokens_line}

## Train with TRL

```python
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

DIR = "{d}"
model = AutoModelForCausalLM.from_pretrained(f"{{DIR}}/sft")
tokenizer = AutoTokenizer.from_pretrained(f"{{DIR}}/sft")
pairs = load_dataset("parquet", data_files=f"{{DIR}}/pairs.parquet", split="train")
args = DPOConfig(output_dir="dpo-out", beta=0.1, learning_rate=1e-4, per_device_train_batch_size=32, max_steps=100,
                 use_cpu=True, report_to=[])  # drop use_cpu on a GPU
DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer).train()
```

A reward model: `AutoModelForSequenceClassification.from_pretrained(f"{{DIR}}/sft", num_labels=1)` with
`trl.RewardTrainer` on the same `pairs`.
"""
