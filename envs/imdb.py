"""imdb: the DPO paper's controlled sentiment generation (Rafailov et al. 2023, §6.1, App. C.1).

The policy completes prefixes of IMDb movie reviews (2–8 tokens of the policy's tokenizer, the
length drawn per review) and should write positive reviews. The reference is gpt2-large
fine-tuned for one epoch on IMDb train reviews (SFT); the gold reward is P(positive) of the
sentiment classifier siebert/sentiment-roberta-large-english on prompt + completion; pairs are
4 SFT samples per train prefix, all 6 pairs ranked by the gold reward. Train prefixes come from
the train split, eval prefixes from the test split. IMDb's "<br />" line breaks are removed.

Models and data are hub ids or local paths in the same format (`envs.hub`): `dataset` is a hub
dataset (stanfordnlp/imdb: parquet files under plain_text/, splits train/test/unsupervised,
columns text and label) or a local folder laid out like its hub repo; `sft_model` and
`gold_model` are hub models or directories saved with save_pretrained. The same loading code
serves both, so the tests run this env on tiny local stand-ins.

Only the `text` column is read (prefixes are drawn whatever the label; the gold classifier judges
sentiment). Data that cannot be used is one line from `build` naming the dataset and the param to
change: no such split or config, a file that is empty or not parquet, no rows, no text column or
one that holds no strings, too few usable reviews (empty and null ones are skipped). So is a
sequence longer than the sft_model's context (config n_positions / max_position_embeddings): a
prefix with max_new_tokens after it, or an SFT review (cut to sft_max_tokens) with its EOS. No
text is cut to fit the context; past it, the position embeddings would fail mid-run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from algorithms.interface import TrainSettings, check
from algorithms.policy import Policy
from algorithms.registry import first_line
from envs import ENVS
from envs.base import finish_from_samples, join_text, sft_train_settings
from envs.hub import (Unavailable, check_context, context_length, read_split, require_dataset, require_model,
                      require_text_columns)

BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class ImdbParams:
    dataset: str = "stanfordnlp/imdb"  # hub dataset id, or a local folder in the same layout
    dataset_config: str | None = "plain_text"  # the dataset's config name (its card's `configs:`)
    sft_model: str = "gpt2-large"  # the initial policy: hub model id or a save_pretrained directory
    gold_model: str = "siebert/sentiment-roberta-large-english"  # sentiment classifier: gold = P(positive)
    num_sft_reviews: int = 25_000  # train reviews SFT trains on (the whole IMDb train split)
    sft_epochs: float = 1.0  # passes over them (the paper: 1); 0 = sft_model already is the SFT policy
    sft_batch_size: int = 64
    sft_lr: float = 1e-5
    sft_warmup_steps: int = 150
    sft_max_tokens: int = 512  # reviews are truncated to this many policy tokens for SFT
    num_train_prompts: int = 25_000  # train-split prefixes for pairs (the paper: 25,000)
    num_eval_prompts: int = 256  # test-split prefixes, fixed per seed
    min_prefix_tokens: int = 2  # prefix length in policy tokens, uniform in [min, max] (the paper: 2–8)
    max_prefix_tokens: int = 8
    samples_per_prompt: int = 4  # SFT samples per train prefix, all pairs kept (the paper: 4 → 6 pairs)
    min_gold_gap: float = 0.0  # pairs closer than this in gold reward are dropped (the paper keeps all)
    max_new_tokens: int = 64  # completion length cap, for pairs and references
    gold_batch_size: int = 64  # texts per classifier forward pass
    gold_max_length: int = 512  # classifier tokens per text (RoBERTa's limit)

    def __post_init__(self) -> None:
        for name in ("dataset", "sft_model", "gold_model"):
            check(isinstance(getattr(self, name), str) and getattr(self, name) != "", name,
                  "must name a hub id or a local path")
        check(self.dataset_config is None or (isinstance(self.dataset_config, str) and self.dataset_config != ""),
              "dataset_config", "must be a config name or null")
        for name in ("num_sft_reviews", "sft_batch_size", "sft_max_tokens", "num_train_prompts", "num_eval_prompts",
                     "min_prefix_tokens", "max_prefix_tokens", "max_new_tokens", "gold_batch_size", "gold_max_length"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.max_prefix_tokens >= self.min_prefix_tokens, "max_prefix_tokens", "must be >= min_prefix_tokens")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (pairs need two samples)")
        check(self.min_gold_gap >= 0, "min_gold_gap", "must be >= 0")
        check(self.sft_epochs >= 0, "sft_epochs", "must be >= 0 (0: sft_model is the SFT policy)")
        check(self.sft_lr > 0, "sft_lr", "must be > 0")
        check(self.sft_warmup_steps >= 0, "sft_warmup_steps", "must be >= 0")


def clean(text) -> str:
    """A review as plain text: "<br />" line breaks gone, whitespace runs collapsed."""
    return " ".join(BR.sub(" ", text or "").split())


def head(text: str, limit: int) -> str:
    """The text up to its last space before `limit` characters: whole words, which tokenize exactly as
    they do in the whole text (a review's first tokens without tokenizing all of it)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit]


def positive_label(config) -> int:
    """Index of the classifier's positive class, by label name: POSITIVE / POS, else LABEL_1."""
    names: dict[str, int] = {}
    for i, name in (config.id2label or {}).items():
        names.setdefault(str(name).lower(), int(i))
    for name, i in (config.label2id or {}).items():
        names.setdefault(str(name).lower(), int(i))
    for want in ("positive", "pos", "label_1"):
        if want in names:
            return names[want]
    raise ValueError(f"has no POSITIVE label (id2label: {dict(config.id2label or {})})")


def _path(name: str) -> str:
    return os.path.expanduser(name)  # "~/models/x" → a local path; hub ids pass unchanged


class Imdb:
    name = "imdb"
    params_cls = ImdbParams
    version = 2  # part of the cache key: bump when what build/SFT/finish produce changes (2: unstripped completions)

    def __init__(self) -> None:
        self._classifiers: dict[str, tuple] = {}  # gold_model → (tokenizer, model, positive index), loaded once

    # -------------------------------------------------------------------------- gold reward
    def _classifier(self, name: str) -> tuple:
        if name not in self._classifiers:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(_path(name))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(_path(name)).eval()
            model.to("cuda" if torch.cuda.is_available() else "cpu")  # a GPU worker's own device
            self._classifiers[name] = (tokenizer, model, positive_label(model.config))
        return self._classifiers[name]

    def p_positive(self, model_name: str, texts: list[str], *, batch_size: int = 64, max_length: int = 512) -> np.ndarray:
        """P(positive) of the classifier `model_name` for each text, in batches; texts truncated to max_length."""
        import torch

        tokenizer, model, pos = self._classifier(model_name)
        device = next(model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt").to(device)
                logits = model(**enc).logits.float()  # (B, num_labels)
                out.append(torch.softmax(logits, -1)[:, pos].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def gold_for(self, params: ImdbParams, workdir: Path | None = None):
        """The gold reward of these params: P(positive) of `gold_model` on prompt + completion (`join_text`)."""

        def gold(prompts: list[str], completions: list[str]) -> np.ndarray:
            texts = [join_text(p, c).strip() for p, c in zip(prompts, completions)]
            return self.p_positive(params.gold_model, texts, batch_size=params.gold_batch_size,
                                   max_length=params.gold_max_length)

        return gold

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """The paper's gold reward (the default gold_model); bench uses `gold_for`, which honours params."""
        return self.gold_for(ImdbParams())(prompts, completions)

    def preflight(self, params: ImdbParams) -> None:
        require_model(params.sft_model, env=self.name, param="sft_model")
        require_model(params.gold_model, env=self.name, param="gold_model")
        require_dataset(params.dataset, env=self.name, param="dataset")
        from transformers import AutoConfig

        try:  # a classifier without a positive class would fail only after SFT: say so now
            positive_label(AutoConfig.from_pretrained(_path(params.gold_model)))
        except Exception as e:
            first = first_line(e, 200) or type(e).__name__
            raise Unavailable(f"env {self.name}: env.params.gold_model = {params.gold_model}: {first}") from None

    # ------------------------------------------------------------------------------- data
    def _reviews(self, params: ImdbParams, split: str) -> list[str]:
        """The split's reviews, cleaned, empty ones dropped, in dataset order."""
        # missing split or config, an empty / non-parquet file, no rows, no text column: one line each
        ds = read_split(params.dataset, split, params.dataset_config, env=self.name, param="dataset")
        require_text_columns(ds, ["text"], name=params.dataset, split=split, env=self.name, param="dataset")
        reviews = [t for t in map(clean, ds["text"]) if t]
        if not reviews:
            raise ValueError(f"env {self.name}: dataset {params.dataset} (env.params.dataset), split {split!r}, has "
                             f"no usable reviews ({len(ds)} rows, every text empty or null)")
        return reviews

    def _take(self, reviews: list[str], n: int, rng: np.random.Generator, what: str, split: str, params) -> list[str]:
        """n reviews drawn without replacement; fewer usable reviews than asked is the user's one-line error."""
        if len(reviews) < n:
            raise ValueError(f"env {self.name}: dataset {params.dataset} split {split!r} has {len(reviews)} usable "
                             f"(non-empty) reviews, fewer than env.params.{what} = {n}")
        return [reviews[i] for i in rng.permutation(len(reviews))[:n]]

    def _prompts(self, reviews: list[str], n: int, tokenizer, rng: np.random.Generator, what: str, split: str,
                 params: ImdbParams) -> list[str]:
        """n prefixes of distinct random reviews: each review's first k policy tokens, k uniform in
        [min_prefix_tokens, max_prefix_tokens]; reviews no longer than k tokens are passed over."""
        order = rng.permutation(len(reviews))
        ks = rng.integers(params.min_prefix_tokens, params.max_prefix_tokens + 1, size=len(reviews))
        out: list[str] = []
        for start in range(0, len(order), n):  # usually one chunk of n reviews
            if len(out) == n:
                break
            heads = [head(reviews[i], 64 * params.max_prefix_tokens) for i in order[start : start + n]]
            for ids, k in zip(tokenizer(heads, add_special_tokens=False)["input_ids"], ks[start : start + n]):
                prefix = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False).rstrip()
                if len(ids) > k and "\ufffd" not in prefix and len(out) < n:  # not cut inside a UTF-8 character
                    out.append(prefix)
        if len(out) < n:
            raise ValueError(f"env {self.name}: dataset {params.dataset} split {split!r} has {len(out)} reviews longer "
                             f"than their prefix, fewer than env.params.{what} = {n}")
        return out

    # ----------------------------------------------------------------------------- stages
    def build(self, params: ImdbParams, seed: int, workdir: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        train, test = self._reviews(params, "train"), self._reviews(params, "test")  # data first: cheap to fail
        tokenizer = AutoTokenizer.from_pretrained(_path(params.sft_model))
        context = context_length(AutoConfig.from_pretrained(_path(params.sft_model)))
        model_name = f"sft_model {params.sft_model}"
        # separate generators, so that changing one count leaves the other selections as they were
        train_prompts = self._prompts(train, params.num_train_prompts, tokenizer, np.random.default_rng([seed, 1]),
                                      "num_train_prompts", "train", params)
        eval_prompts = self._prompts(test, params.num_eval_prompts, tokenizer, np.random.default_rng([seed, 2]),
                                     "num_eval_prompts", "test", params)
        # a prefix as the policy encodes it (BOS where its tokenizer adds one) + the completion must fit

        def shorter_completions(limit: int, longest: int) -> str:
            if longest < limit:
                return f"set env.params.max_new_tokens <= {limit - longest}"
            return f"lower env.params.max_prefix_tokens (now {params.max_prefix_tokens})"

        prompt_lengths = [len(x) for x in tokenizer(train_prompts + eval_prompts, add_special_tokens=True)["input_ids"]]
        check_context(prompt_lengths, params.max_new_tokens, context=context, env=self.name, what="prefixes",
                      model=model_name, extra_name=f"max_new_tokens={params.max_new_tokens}", fix=shorter_completions)
        corpus = None
        if params.sft_epochs > 0:
            sft = self._take(train, params.num_sft_reviews, np.random.default_rng([seed, 3]), "num_sft_reviews",
                             "train", params)
            ids = tokenizer(sft, add_special_tokens=False, truncation=True, max_length=params.sft_max_tokens)["input_ids"]
            bos = len(tokenizer("", add_special_tokens=True)["input_ids"])  # SFT trains on BOS + text + EOS
            check_context([bos + len(x) for x in ids], 1, context=context, env=self.name, what="SFT reviews",
                          model=model_name, extra_name="EOS",
                          fix=lambda limit, _: f"set env.params.sft_max_tokens <= {limit - 1 - bos}")
            corpus = [tokenizer.decode(x, clean_up_tokenization_spaces=False) for x in ids]  # text as written
        (workdir / "prompts.json").write_text(json.dumps({"train": train_prompts, "eval": eval_prompts}))
        if corpus is not None:
            pd.DataFrame({"text": corpus}).to_parquet(workdir / "corpus.parquet", index=False)
        model = AutoModelForCausalLM.from_pretrained(_path(params.sft_model))
        Policy(model, tokenizer).save_pretrained(workdir / "init")

    def sft_corpus(self, params: ImdbParams, workdir: Path) -> list[str] | None:
        if params.sft_epochs == 0:
            return None
        return pd.read_parquet(workdir / "corpus.parquet")["text"].tolist()

    def sft_settings(self, params: ImdbParams) -> TrainSettings:
        return sft_train_settings(epochs=params.sft_epochs, examples=params.num_sft_reviews, batch_size=params.sft_batch_size,
                                  lr=params.sft_lr, warmup_steps=params.sft_warmup_steps)

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        return Policy.from_pretrained(workdir / stage)

    def finish(self, sft: Policy, params: ImdbParams, seed: int, workdir: Path) -> None:
        finish_from_samples(
            sft, workdir, self.gold_for(params, workdir), samples_per_prompt=params.samples_per_prompt,
            max_new_tokens=params.max_new_tokens, min_gap=params.min_gold_gap, seed=seed,
        )


ENVS.register(Imdb())
