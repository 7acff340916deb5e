"""hf-preferences: bring your own preference data, reference model and gold scorer.

- **Data**: any preference dataset in TRL's standard format with an explicit prompt: text columns
  `prompt`, `chosen`, `rejected`, where `prompt + chosen` is the whole preferred text (as TRL's
  DPOTrainer joins them). A hub id or a local folder of parquet files, loaded by
  `datasets.load_dataset` (envs/hub.py). The train split gives the pairs (and, for the on-policy
  algorithms, the train prompts: its distinct prompts); the eval split gives the eval prompts and,
  by default, the reference completions win rates are measured against: each eval prompt's
  `chosen` (`reference: chosen`), or one sample of the SFT policy (`reference: sft`).
- **Reference policy**: any causal LM (`model`, hub id or local directory; `tokenizer` "" = its
  own), used as the SFT policy as it is (`sft_epochs` 0), or fine-tuned first on prompt + chosen of
  the train pairs (the DPO paper's recipe when no SFT data exists).
- **Gold reward** (`gold`, a mapping), what the report's frontier is measured in:
  - `{kind: classifier, model: ID_OR_DIR}`: a sequence-classification model on (prompt,
    completion) as a text pair (`text_pair: false`: on prompt + completion as one text). One output
    (a reward model, num_labels = 1): its logit; several: the probability of class `label` (a
    name or an index; "" = the last class, e.g. POSITIVE of a NEGATIVE/POSITIVE classifier).
  - `{kind: callable, function: "package.module:name"}`: a Python function
    `(prompts, completions) -> one float per completion`, importable in every Ray worker (an
    installed package, or a module on PYTHONPATH).

Lengths: pairs whose prompt is longer than `max_prompt_tokens`, or whose chosen or rejected
completion (+ EOS) is longer than `max_new_tokens` (in the policy's tokens), are dropped and
counted, and so are eval prompts longer than `max_prompt_tokens`; what is kept must fit the model's
context. Pairs with a null cell or chosen == rejected are dropped and counted. Every problem with
the data (no such split, config or column, non-text columns, nothing left) is one line naming the
env param to change.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from algorithms.interface import ParamError, TrainSettings, check
from algorithms.policy import Policy
from envs import ENVS
from envs.base import references_from_samples, sft_train_settings, write_env_data

COLUMNS = ["prompt", "chosen", "rejected"]


@dataclass
class ClassifierGold:
    kind: str = "classifier"
    model: str = "trl-lib/pythia-1b-deduped-tldr-rm"  # a sequence-classification model: hub id or local directory
    label: str = ""  # the class whose probability is the gold (name or index); "" = the last; unused with one output
    text_pair: bool = True  # score (prompt, completion) as a text pair; false: prompt + completion as one text
    batch_size: int = 32
    max_length: int = 512  # tokens per input; longer inputs are truncated

    def __post_init__(self) -> None:
        check(isinstance(self.model, str) and bool(self.model), "gold.model",
              "must name a sequence-classification model (hub id or local directory)")
        check(self.batch_size >= 1, "gold.batch_size", "must be >= 1")
        check(self.max_length >= 8, "gold.max_length", "must be >= 8")


@dataclass
class CallableGold:
    kind: str = "callable"
    function: str = ""  # "package.module:name", a function (prompts, completions) -> one float per completion

    def __post_init__(self) -> None:
        module, _, name = self.function.partition(":")
        check(bool(module) and bool(name), "gold.function", f"must be 'package.module:name', got {self.function!r}")


GOLD_KINDS = {"classifier": ClassifierGold, "callable": CallableGold}


def gold_spec(raw) -> ClassifierGold | CallableGold:
    """The gold dataclass of the env param `gold` (a mapping with a kind); ParamError names `gold.KEY`."""
    if isinstance(raw, (ClassifierGold, CallableGold)):
        return raw
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ParamError("gold", f"expected a mapping with a kind ({', '.join(GOLD_KINDS)}), got {raw!r}")
    kind = raw["kind"]
    if kind not in GOLD_KINDS:
        raise ParamError("gold.kind", f"unknown gold kind {kind!r} (known: {', '.join(GOLD_KINDS)})")
    cls = GOLD_KINDS[kind]
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ParamError(f"gold.{key}", f"unknown key for the {kind} gold (known: {', '.join(sorted(hints))})")
        if key == "label" and type(value) is int:
            value = str(value)  # a class index written as a number
        if type(value) is not hints[key]:  # a bool is not an int here
            raise ParamError(f"gold.{key}", f"expected {hints[key].__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


@dataclass
class HfPreferencesParams:
    # the defaults are TRL's TL;DR online-DPO setting (Pythia-1B SFT, its preference data, its reward
    # model as the gold scorer); every one a hub id or a local path
    model: str = "trl-lib/pythia-1b-deduped-tldr-sft"  # the reference policy: a causal LM
    tokenizer: str = ""  # the policy's tokenizer; "" = the model's own
    dataset: str = "trl-lib/tldr-preference"  # preference data in TRL's format (prompt, chosen, rejected)
    dataset_config: str = ""  # the dataset's config name; "" = its default
    train_split: str = "train"  # the pairs (and the on-policy algorithms' train prompts)
    eval_split: str = "validation"  # the eval prompts (and their chosen completions as references)
    num_pairs: int = 100_000  # cap on train pairs (a seeded random subset)
    num_train_prompts: int = 20_000  # cap on train prompts (distinct prompts of the kept pairs)
    num_eval_prompts: int = 256  # cap on eval prompts (the suite's eval.num_prompts takes the first ones)
    max_prompt_tokens: int = 512  # longer prompts are dropped (counted in data_stats.json)
    max_new_tokens: int = 53  # pairs whose chosen or rejected completion (+ EOS) is longer are dropped (TRL's TL;DR: 53)
    reference: str = "chosen"  # win rates against: "chosen" (the eval split's) or "sft" (one SFT sample per prompt)
    sft_epochs: float = 0.0  # 0: model already is the SFT policy; > 0: passes of SFT on prompt + chosen
    sft_batch_size: int = 64
    sft_lr: float = 1e-5
    sft_warmup_steps: int = 50
    gold: dict = field(default_factory=lambda: {"kind": "classifier"})  # {kind: classifier, model: ...} or {kind: callable, function: ...}

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "train_split", "eval_split"):
            check(isinstance(getattr(self, name), str) and bool(getattr(self, name)), name,
                  "must be a non-empty string" + (" (a hub id or a local path)" if name in ("model", "dataset") else ""))
        for name in ("tokenizer", "dataset_config"):
            check(isinstance(getattr(self, name), str), name, "must be a string (\"\" = the default)")
        for name in ("num_pairs", "num_train_prompts", "num_eval_prompts", "max_prompt_tokens", "max_new_tokens",
                     "sft_batch_size"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.reference in ("chosen", "sft"), "reference", "must be 'chosen' or 'sft'")
        check(self.sft_epochs >= 0, "sft_epochs", "must be >= 0 (0: model is used as the SFT policy)")
        check(self.sft_lr > 0, "sft_lr", "must be > 0")
        check(self.sft_warmup_steps >= 0, "sft_warmup_steps", "must be >= 0")
        # filled in with the defaults, so that equal scorers give equal env cache keys
        self.gold = asdict(gold_spec(self.gold))


def _say(message: str) -> None:
    print(f"[prefbench] env hf-preferences: {message}", file=sys.stderr, flush=True)


def import_function(path: str) -> Callable:
    """The object `package.module:name` names; ValueError of one line when it cannot be had."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # ModuleNotFoundError, AttributeError, or the module's own import error
        raise ValueError(f"env hf-preferences: env.params.gold.function = {path}: cannot import it "
                         f"({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"env hf-preferences: env.params.gold.function = {path} is a {type(fn).__name__}, not a function")
    return fn


@functools.cache
def _classifier(name: str) -> tuple:
    """(tokenizer, model) of a sequence classifier, loaded once per process, on the worker's device."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(Path(name).expanduser()) if name.startswith(("~", ".", "/")) else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return tokenizer, model


def label_index(config, label: str) -> int:
    """The class of `label` (a name, or an index as text) in a classifier's config; "" = the last class."""
    n = config.num_labels
    if label == "":
        return n - 1
    if label.lstrip("-").isdigit() and -n <= int(label) < n:
        return int(label) % n
    names = {str(v).lower(): int(k) for k, v in (config.id2label or {}).items()}
    if label.lower() in names:
        return names[label.lower()]
    raise ValueError(f"env hf-preferences: env.params.gold.label = {label!r} is not a class of the gold classifier "
                     f"(id2label: {dict(config.id2label or {})})")


def classifier_gold(spec: ClassifierGold) -> Callable[[list[str], list[str]], np.ndarray]:
    def gold(prompts: list[str], completions: list[str]) -> np.ndarray:
        import torch

        tokenizer, model = _classifier(spec.model)
        single = model.config.num_labels == 1
        pos = None if single else label_index(model.config, spec.label)
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), spec.batch_size):
                p, c = prompts[i : i + spec.batch_size], completions[i : i + spec.batch_size]
                args = (p, c) if spec.text_pair else ([x + y for x, y in zip(p, c)],)
                enc = tokenizer(*args, padding=True, truncation=True, max_length=spec.max_length,
                                return_tensors="pt").to(model.device)
                logits = model(**enc).logits.double()  # (B, num_labels)
                out.append((logits[:, 0] if single else torch.softmax(logits, -1)[:, pos]).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return gold


class HfPreferences:
    name = "hf-preferences"
    params_cls = HfPreferencesParams
    version = 1  # part of the cache key: bump when what build/SFT/finish produce changes

    def gold_for(self, params: HfPreferencesParams, workdir: Path | None = None) -> Callable[[list[str], list[str]], np.ndarray]:
        spec = gold_spec(params.gold)
        if isinstance(spec, CallableGold):
            return import_function(spec.function)
        return classifier_gold(spec)

    def preflight(self, params: HfPreferencesParams) -> None:
        from envs.hub import Unavailable, require_dataset, require_model

        require_model(params.model, env=self.name, param="model")
        if params.tokenizer:
            require_model(params.tokenizer, env=self.name, param="tokenizer")
        require_dataset(params.dataset, env=self.name, param="dataset")
        spec = gold_spec(params.gold)
        if isinstance(spec, ClassifierGold):
            require_model(spec.model, env=self.name, param="gold.model")
        else:
            try:
                import_function(spec.function)
            except ValueError as e:
                raise Unavailable(str(e)) from None

    # ------------------------------------------------------------------------------ stages
    def build(self, params: HfPreferencesParams, seed: int, workdir: Path) -> None:
        """Seeded train pairs and eval prompts that fit the length limits; the model's names."""
        from transformers import AutoConfig, AutoTokenizer

        from envs.hub import check_context, context_length, take_fitting, text_table

        tokenizer = AutoTokenizer.from_pretrained(params.tokenizer or params.model)
        config = AutoConfig.from_pretrained(params.model)
        config_name = params.dataset_config or None

        def n_tokens(texts: list[str], special: bool) -> np.ndarray:
            return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]], dtype=int)

        prompt_tokens: dict[str, int] = {}

        def short_prompts(prompts: list[str]) -> np.ndarray:
            lengths = n_tokens(prompts, True) if prompts else np.zeros(0, int)
            prompt_tokens.update(zip(prompts, lengths.tolist()))
            return lengths <= params.max_prompt_tokens

        def pair_fits(rows: list) -> np.ndarray:
            if not rows:
                return np.zeros(0, bool)
            limit = params.max_new_tokens - 1  # + EOS
            return (short_prompts([r[0] for r in rows]) & (n_tokens([r[1] for r in rows], False) <= limit)
                    & (n_tokens([r[2] for r in rows], False) <= limit))

        rng = np.random.default_rng([seed, 11])
        stats = {}
        table, nulls = text_table(params.dataset, params.train_split, COLUMNS, env=self.name, param="dataset",
                                  config=config_name)
        rows = [r for r in zip(table["prompt"], table["chosen"], table["rejected"]) if r[1] != r[2]]
        ties = len(table) - len(rows)
        pairs, examined = take_fitting(rows, params.num_pairs, rng, pair_fits)
        stats["pairs"] = {"split": params.train_split, "kept": len(pairs), "examined": examined,
                          "dropped_long": examined - len(pairs), "dropped_null": nulls, "dropped_ties": ties}

        eval_table, eval_nulls = text_table(params.dataset, params.eval_split, ["prompt", "chosen"], env=self.name,
                                            param="dataset", config=config_name)
        first_chosen = dict(zip(eval_table["prompt"][::-1], eval_table["chosen"][::-1]))  # each prompt's first row
        candidates = [(p, first_chosen[p]) for p in dict.fromkeys(eval_table["prompt"])]

        def eval_fits(rows: list) -> np.ndarray:
            return short_prompts([r[0] for r in rows]) if rows else np.zeros(0, bool)

        evals, eval_examined = take_fitting(candidates, params.num_eval_prompts, rng, eval_fits)
        stats["eval"] = {"split": params.eval_split, "kept": len(evals), "examined": eval_examined,
                         "dropped_long": eval_examined - len(evals), "dropped_null": eval_nulls}
        limits = {"pairs": f"max_prompt_tokens={params.max_prompt_tokens} / max_new_tokens={params.max_new_tokens}",
                  "eval": f"max_prompt_tokens={params.max_prompt_tokens}"}
        for part, s in stats.items():
            if s["dropped_long"]:
                _say(f"{part}: dropped {s['dropped_long']} of {s['examined']} examined longer than {limits[part]}")
            if s["dropped_null"] or s.get("dropped_ties"):
                _say(f"{part}: dropped {s['dropped_null']} rows of split {s['split']} with a null cell"
                     + (f" and {s['dropped_ties']} with chosen == rejected" if part == "pairs" else ""))
            if not s["kept"]:
                what = "pair" if part == "pairs" else "eval prompt"
                raise ValueError(f"env {self.name}: no {what} of dataset {params.dataset} (env.params.dataset), split "
                                 f"{s['split']!r}, fits {limits[part]} ({s['examined']} examined"
                                 + (", ties dropped" if part == "pairs" else "") + "); raise env.params.max_prompt_tokens"
                                 + (" or max_new_tokens" if part == "pairs" else ""))

        train_prompts = list(dict.fromkeys(p for p, _, _ in pairs))[: params.num_train_prompts]
        # what is kept must fit the policy's positions: a longer sequence is an index error mid-trial
        kept = list(dict.fromkeys(train_prompts + [p for p, _ in evals]))

        def shorter(limit: int, longest: int) -> str:
            if limit > params.max_new_tokens:
                return f"set env.params.max_prompt_tokens <= {limit - params.max_new_tokens} (longer prompts are dropped)"
            return f"lower env.params.max_new_tokens (now {params.max_new_tokens})"

        check_context([prompt_tokens[p] for p in kept], params.max_new_tokens, context=context_length(config),
                      env=self.name, what="selected prompts", model=f"model {params.model}",
                      extra_name=f"max_new_tokens={params.max_new_tokens}", fix=shorter)
        pd.DataFrame(pairs, columns=COLUMNS).to_parquet(workdir / "train_pairs.parquet", index=False)
        pd.DataFrame(evals, columns=["prompt", "chosen"]).to_parquet(workdir / "eval_prompts.parquet", index=False)
        (workdir / "prompts.json").write_text(json.dumps({"train": train_prompts, "eval": [p for p, _ in evals]}))
        (workdir / "data_stats.json").write_text(json.dumps(stats, indent=1))
        (workdir / "model.json").write_text(json.dumps({"model": params.model, "tokenizer": params.tokenizer}))

    def sft_corpus(self, params: HfPreferencesParams, workdir: Path) -> list[str] | None:
        if params.sft_epochs == 0:
            return None
        pairs = pd.read_parquet(workdir / "train_pairs.parquet")
        return [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])]  # TRL's join: prompt + chosen

    def sft_settings(self, params: HfPreferencesParams) -> TrainSettings:
        return sft_train_settings(epochs=params.sft_epochs, examples=params.num_pairs, batch_size=params.sft_batch_size,
                                  lr=params.sft_lr, warmup_steps=params.sft_warmup_steps)

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        from envs.hub import load_policy

        return load_policy(workdir, stage)

    def finish(self, sft: Policy, params: HfPreferencesParams, seed: int, workdir: Path) -> None:
        """The dataset's pairs as they are; references: each eval prompt's chosen, or one SFT sample, scored by gold."""
        from envs.base import checked_gold

        prompts = json.loads((workdir / "prompts.json").read_text())
        pairs = pd.read_parquet(workdir / "train_pairs.parquet")
        evals = pd.read_parquet(workdir / "eval_prompts.parquet")
        gold = checked_gold(self.gold_for(params, workdir), self.name)
        if params.reference == "sft":
            references = references_from_samples(sft, prompts["eval"], gold, max_new_tokens=params.max_new_tokens,
                                                 seed=seed * 1000 + 3)
        else:
            references = pd.DataFrame({"prompt": evals["prompt"], "completion": evals["chosen"],
                                       "gold": gold(evals["prompt"].tolist(), evals["chosen"].tolist())})
        write_env_data(workdir, train_prompts=prompts["train"], eval_prompts=prompts["eval"], pairs=pairs,
                       references=references)


ENVS.register(HfPreferences())
