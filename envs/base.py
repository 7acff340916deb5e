"""The env contract and the helpers every env shares.

An env is an object with these members (a Protocol, no base class):

- `name: str`, `params_cls` (a dataclass with defaults; `__post_init__` raises ParamError).
- `build(params, seed, workdir)`: the cheap, deterministic part (data, tokenizer, the initial
  model) written under `workdir`. Runs in the driver process. A problem with the data (empty
  dataset, missing split or column, too few examples) raises ValueError with one line naming
  the dataset and the env param; `prefbench run` prints it and exits 2.
- `sft_corpus(params, workdir) -> list[str] | None`: texts the SFT stage trains on (whole texts,
  BOS + text + EOS), or None when the initial policy already is the SFT policy.
- `sft_settings(params) -> TrainSettings`: optimisation of the SFT stage.
- `load_policy(workdir, stage)`: the Policy of stage "init" (before SFT) or "sft" (the reference).
- `finish(sft, params, seed, workdir)`: with the SFT policy in hand, write prompts.parquet,
  pairs.parquet and references.parquet (see `write_env_data`).
- `gold(prompts, completions) -> np.ndarray`: the gold reward, a float per completion, higher is
  better; never used for training except by algorithms that declare needs={"gold"}.

Optional members:
- `gold_for(params, workdir) -> Callable[[prompts, completions], np.ndarray]`: the gold reward
  bound to the env's params and prepared workdir, for envs whose gold needs them (a classifier
  named in params, each prompt's human reference). bench calls `gold_fn`, which falls back to `gold`.
- `preflight(params) -> None`: checks, in the driver before Ray starts, that every model and
  dataset the env names can be loaded here (`envs.hub.require_model` / `require_dataset`); raises
  `envs.hub.Unavailable` with one line otherwise (exit 2).
- `version: int`: part of the cache key; bump it when what build/SFT/finish produce changes.

bench runs build → SFT (a Ray Train job with DeepSpeed) → finish once per (env params, seed),
cached by content hash, and hands algorithms an `EnvData` read by `load_env_data`.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import pandas as pd

from algorithms.interface import EnvData, TrainSettings
from algorithms.policy import Policy


class Env(Protocol):
    """The members every env has: what `contract_problems` checks at registration (docs/plugins.md).

    Besides these, an env has its gold reward as ONE of
    - `gold(prompts, completions) -> (N,) float array`: a fixed function (VADER, a classifier), or
    - `gold_for(params, workdir) -> that function`: one bound to a prepared env (tldr: the judge and
      each prompt's human reference summary);
    `envs.base.gold_fn(env, params, workdir)` picks it and checks what it returns. Optional:
    `preflight(params)` (raise envs.hub.Unavailable when a model or dataset is out of reach) and an
    int `version` (part of the cache key).
    """

    name: str
    params_cls: type

    def build(self, params, seed: int, workdir: Path) -> None: ...
    def sft_corpus(self, params, workdir: Path) -> list[str] | None: ...
    def sft_settings(self, params) -> TrainSettings: ...
    def load_policy(self, workdir: Path, stage: str) -> Policy: ...
    def finish(self, sft: Policy, params, seed: int, workdir: Path) -> None: ...


class GoldRewardError(ValueError):
    """An env's gold reward broke its contract (not one finite float per completion); str() names the env."""


def checked_gold(gold: Callable[[list[str], list[str]], Any], env_name: str | None) -> Callable[[list[str], list[str]], np.ndarray]:
    """`gold` checked at the boundary: one finite float per completion, or GoldRewardError naming the env."""
    who = f"env {env_name}: gold reward" if env_name else "gold reward"

    def checked(prompts: list[str], completions: list[str]) -> np.ndarray:
        raw = gold(prompts, completions)
        try:
            scores = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise GoldRewardError(f"{who} returned {type(raw).__name__}, "
                                  "not one float per completion") from None
        if scores.shape != (len(completions),):
            raise GoldRewardError(f"{who} returned {scores.size} values of shape "
                                  f"{tuple(scores.shape)} for {len(completions)} completions")
        bad = ~np.isfinite(scores)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise GoldRewardError(f"{who} returned {scores[i]} for {int(bad.sum())} of "
                                  f"{len(completions)} completions (first: {completions[i][:60]!r})")
        return scores

    checked.__wrapped__ = gold
    return checked


def gold_fn(env: Env, params, workdir: Path) -> Callable[[list[str], list[str]], np.ndarray]:
    """The env's gold reward for a prepared workdir (`env.gold_for(params, workdir)` or `env.gold`),
    checked: a NaN, an inf or a wrong number of scores raises GoldRewardError with the env's name."""
    bind = getattr(env, "gold_for", None)
    return checked_gold(bind(params, workdir) if bind is not None else env.gold, env.name)


def _checked(gold: Callable) -> Callable[[list[str], list[str]], np.ndarray]:
    """`checked_gold` for the recipes below, which get `env.gold` (a bound method: its env's name) or a
    `gold_for` closure (no name: bench's env stage adds it to the error)."""
    if hasattr(gold, "__wrapped__"):
        return gold
    return checked_gold(gold, getattr(getattr(gold, "__self__", None), "name", None))


def preflight(env: Env, params) -> None:
    """Raise envs.hub.Unavailable (one line) when a model or dataset the env names is out of reach."""
    check = getattr(env, "preflight", None)
    if check is not None:
        check(params)


def sft_train_settings(*, epochs: float, examples: int, batch_size: int, lr: float, warmup_steps: int) -> TrainSettings:
    """The SFT stage's optimisation: `epochs` passes over `examples` texts, one evaluation at the end."""
    steps = max(1, int(epochs * examples / batch_size))
    return TrainSettings(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, max_grad_norm=1.0, eval_every=steps
    )


def pairs_from_samples(
    sft: Policy,
    prompts: list[str],
    gold: Callable[[list[str], list[str]], np.ndarray],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    min_gap: float,
    seed: int,
    batch_size: int = 512,
) -> pd.DataFrame:
    """The paper's recipe: k SFT samples per prompt at T = 1, every pair ranked by the gold reward.

    All k(k-1)/2 pairs per prompt whose gold gap is at least `min_gap` are kept, the higher-reward
    completion as `chosen`. Columns: prompt, chosen, rejected, chosen_gold, rejected_gold,
    chosen_ended, rejected_ended (whether the sample stopped on EOS; one cut at max_new_tokens is
    encoded without one by every algorithm and the reward model).
    """
    roll = sft.generate(
        prompts, n=samples_per_prompt, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )
    scores = _checked(gold)(roll.prompts, roll.completions)
    rows = []
    for p in range(len(prompts)):
        lo = p * samples_per_prompt
        for i, j in itertools.combinations(range(lo, lo + samples_per_prompt), 2):
            if abs(scores[i] - scores[j]) < min_gap or roll.completions[i] == roll.completions[j]:
                continue
            w, l = (i, j) if scores[i] > scores[j] else (j, i)
            rows.append((prompts[p], roll.completions[w], roll.completions[l], scores[w], scores[l],
                         bool(roll.ended[w]), bool(roll.ended[l])))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


PAIR_COLUMNS = ["prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "chosen_ended", "rejected_ended"]


def references_from_samples(
    sft: Policy,
    prompts: list[str],
    gold: Callable[[list[str], list[str]], np.ndarray],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 512,
) -> pd.DataFrame:
    """One SFT sample per eval prompt at T = 1: the baseline win rates are measured against.
    Columns: prompt, completion, gold, ended (the sample stopped on EOS)."""
    roll = sft.generate(prompts, n=1, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return pd.DataFrame(
        {"prompt": roll.prompts, "completion": roll.completions, "gold": _checked(gold)(roll.prompts, roll.completions),
         "ended": roll.ended}
    )


def finish_from_samples(
    sft: Policy,
    workdir: Path,
    gold: Callable[[list[str], list[str]], np.ndarray],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    min_gap: float,
    seed: int,
    batch_size: int = 512,
) -> None:
    """`finish` for an env whose `build` wrote prompts.json ({"train": [...], "eval": [...]}): pairs
    from the SFT policy's samples of the train prompts, one reference completion per eval prompt."""
    prompts = json.loads((workdir / "prompts.json").read_text())
    pairs = pairs_from_samples(
        sft, prompts["train"], gold, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
        min_gap=min_gap, seed=seed * 1000 + 2, batch_size=batch_size,
    )
    refs = references_from_samples(
        sft, prompts["eval"], gold, max_new_tokens=max_new_tokens, seed=seed * 1000 + 3, batch_size=batch_size
    )
    write_env_data(workdir, train_prompts=prompts["train"], eval_prompts=prompts["eval"], pairs=pairs, references=refs)


WORD_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer (whitespace split) over WORD_SPECIALS + `words`, ids in that order,
    that puts <bos> before every text; <pad>, <eos> and <unk> set. For envs with a synthetic language."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(WORD_SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def join_text(prompt: str, completion: str) -> str:
    """The text of prompt + completion: a completion that starts with whitespace (a sub-word model's
    " like") follows the prompt directly, one that does not (a word-level model's "like") after a space."""
    return prompt + completion if completion[:1].isspace() else f"{prompt} {completion}"


def vader_gold(prompts: list[str], completions: list[str]) -> np.ndarray:
    """VADER's compound score of prompt + completion, mapped from [-1, 1] to [0, 1] (the sentiment envs' gold)."""
    score = _vader().polarity_scores
    return np.array([(score(join_text(p, c))["compound"] + 1) / 2 for p, c in zip(prompts, completions)])


def write_env_data(
    workdir: Path, *, train_prompts: list[str], eval_prompts: list[str], pairs: pd.DataFrame, references: pd.DataFrame
) -> None:
    prompts = pd.DataFrame(
        {"prompt": train_prompts + eval_prompts, "split": ["train"] * len(train_prompts) + ["eval"] * len(eval_prompts)}
    )
    prompts.to_parquet(workdir / "prompts.parquet", index=False)
    pairs.to_parquet(workdir / "pairs.parquet", index=False)
    references.to_parquet(workdir / "references.parquet", index=False)


def load_env_data(workdir: Path) -> EnvData:
    prompts = pd.read_parquet(workdir / "prompts.parquet")
    return EnvData(
        train_prompts=prompts.loc[prompts["split"] == "train", "prompt"].tolist(),
        eval_prompts=prompts.loc[prompts["split"] == "eval", "prompt"].tolist(),
        pairs=pd.read_parquet(workdir / "pairs.parquet"),
        references=pd.read_parquet(workdir / "references.parquet"),
    )


REQUIRED_METHODS = ("build", "sft_corpus", "sft_settings", "load_policy", "finish")
OPTIONAL_METHODS = ("gold_for", "preflight")


def contract_problems(env) -> list[str]:
    """What is wrong with `env` as an Env (empty when it keeps the contract); the registry refuses
    a plugin with problems and reports them in one line."""
    from algorithms.registry import dataclass_problems, name_problems

    problems = name_problems(getattr(env, "name", None)) + dataclass_problems(getattr(env, "params_cls", None))
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(env, m, None))]
    if not callable(getattr(env, "gold", None)) and not callable(getattr(env, "gold_for", None)):
        missing.append("gold (or gold_for)")
    if missing:
        problems.append(f"missing method(s): {', '.join(missing)}")
    wrong = [m for m in OPTIONAL_METHODS if hasattr(env, m) and not callable(getattr(env, m))]
    if wrong:
        problems.append(f"not callable: {', '.join(wrong)}")
    if not isinstance(getattr(env, "version", 0), int):
        problems.append("version must be an int")
    return problems
