"""tiny-sentiment: the offline default env, a miniature of the DPO paper's IMDb task.

A synthetic movie-review language from a small probabilistic grammar: 2–5 template sentences per
review ("the plot was very good .", "i hated the ending .", "i would not recommend this film .",
"seven out of ten ."), with a hidden per-review tilt so that sentiment words co-occur, as they do
in real reviews. Positive, negative and neutral words mix; the corpus' gold reward has mean ≈ 0.5
and a wide spread. A word-level tokenizer (`tokenizers`, wrapped as a transformers fast
tokenizer) and a tiny GPT-2 (`GPT2LMHeadModel`, ~0.6 M parameters) trained by SFT on the corpus
make the reference policy. Prompts are the first 2–4 words of held-out reviews; the gold reward is
VADER's compound score of prompt + completion mapped to [0, 1]; pairs are SFT samples ranked by
gold, as in the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from algorithms.interface import TrainSettings, check
from algorithms.policy import Policy
from envs import ENVS
from envs.base import finish_from_samples, sft_train_settings, vader_gold, word_tokenizer

POSITIVE = ["good", "great", "wonderful", "brilliant", "excellent", "amazing", "beautiful", "funny",
            "charming", "enjoyable", "superb", "moving", "fantastic", "clever", "fun", "lovely"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "dull", "horrible", "weak", "poor", "stupid",
            "painful", "disappointing", "mediocre", "ugly", "annoying", "lame", "messy"]
NEUTRAL = ["long", "short", "slow", "quiet", "strange", "old", "simple", "familiar", "dark", "loud",
           "different", "typical"]
NOUNS = ["movie", "film", "plot", "acting", "story", "ending", "cast", "script", "music", "director",
         "dialogue", "characters", "soundtrack", "camera", "pacing", "lead"]
ADVERBS = ["very", "really", "quite", "so", "extremely", "pretty", "rather", "truly"]
LIKE = ["loved", "liked", "enjoyed", "adored"]
DISLIKE = ["hated", "disliked", "regretted", "despised"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass
class TinySentimentParams:
    num_reviews: int = 20_000  # SFT corpus size
    num_train_prompts: int = 2_000  # prompts for pairs (and on-policy algorithms)
    num_eval_prompts: int = 256  # fixed evaluation prompts
    samples_per_prompt: int = 4  # SFT samples per train prompt from which pairs are made
    min_gold_gap: float = 0.01  # pairs closer than this in gold reward are dropped
    max_new_tokens: int = 32  # completion length cap, for pairs and references
    n_layer: int = 3  # GPT-2 size
    n_embd: int = 128
    n_head: int = 4
    sft_epochs: float = 2.0  # passes over the corpus
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_warmup_steps: int = 50

    def __post_init__(self) -> None:
        for name in ("num_reviews", "num_train_prompts", "num_eval_prompts", "n_layer", "n_embd", "n_head",
                     "sft_batch_size", "max_new_tokens"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (pairs need two samples)")
        check(self.min_gold_gap >= 0, "min_gold_gap", "must be >= 0")
        check(self.n_embd % self.n_head == 0, "n_embd", "must be divisible by n_head")
        check(self.sft_epochs > 0, "sft_epochs", "must be > 0")
        check(self.sft_lr > 0, "sft_lr", "must be > 0")
        check(self.sft_warmup_steps >= 0, "sft_warmup_steps", "must be >= 0")


def make_review(rng: np.random.Generator) -> list[str]:
    """One review as words. A hidden tilt in [-1, 1] sets how likely each sentiment slot is positive."""
    tilt = rng.uniform(-1, 1)
    p_pos = (1 + tilt) / 2

    def adj() -> str:
        r = rng.random()
        if r < 0.2:
            return str(rng.choice(NEUTRAL))
        return str(rng.choice(POSITIVE if rng.random() < p_pos else NEGATIVE))

    def noun() -> str:
        return str(rng.choice(NOUNS))

    def sentence() -> list[str]:
        kind = rng.integers(7)
        if kind == 0:
            adv = [str(rng.choice(ADVERBS))] if rng.random() < 0.4 else []
            return ["the", noun(), "was", *adv, adj()]
        if kind == 1:
            return ["i", str(rng.choice(LIKE if rng.random() < p_pos else DISLIKE)), "the", noun()]
        if kind == 2:  # negation flips the word's polarity for the reader (and for VADER)
            flip = POSITIVE if rng.random() >= p_pos else NEGATIVE
            return ["the", noun(), "was", "not", str(rng.choice(flip))]
        if kind == 3:
            neg = ["not"] if rng.random() >= p_pos else []
            return ["i", "would", *neg, "recommend", "this", str(rng.choice(["movie", "film"]))]
        if kind == 4:
            k = int(np.clip(round(p_pos * 9 + rng.normal(0, 1.5)), 0, 9))
            return [NUMBERS[k], "out", "of", "ten"]
        if kind == 5:
            return ["the", noun(), "and", "the", noun(), "were", adj()]
        adv = [str(rng.choice(ADVERBS))] if rng.random() < 0.5 else []
        return ["overall", "it", "was", *adv, adj()]

    words: list[str] = []
    for _ in range(rng.integers(2, 6)):
        words += sentence() + ["."]
    return words


class TinySentiment:
    name = "tiny-sentiment"
    params_cls = TinySentimentParams
    version = 2  # part of the cache key: bump when what build/SFT/finish produce changes

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """VADER compound of prompt + completion, mapped from [-1, 1] to [0, 1]."""
        return vader_gold(prompts, completions)

    # ------------------------------------------------------------------------------ stages
    def build(self, params: TinySentimentParams, seed: int, workdir: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        rng = np.random.default_rng([seed, 1])
        n_total = params.num_reviews + params.num_train_prompts + params.num_eval_prompts
        reviews = [" ".join(make_review(rng)) for _ in range(n_total)]
        corpus = reviews[: params.num_reviews]
        held_out = reviews[params.num_reviews :]
        prompts = [" ".join(r.split()[: int(rng.integers(2, 5))]) for r in held_out]
        pd.DataFrame({"text": corpus}).to_parquet(workdir / "corpus.parquet", index=False)
        (workdir / "prompts.json").write_text(
            json.dumps({"train": prompts[: params.num_train_prompts], "eval": prompts[params.num_train_prompts :]})
        )

        words = sorted({w for r in reviews for w in r.split()} | set(POSITIVE + NEGATIVE + NEUTRAL + NOUNS))
        tokenizer = word_tokenizer(words)
        vocab = tokenizer.get_vocab()
        config = GPT2Config(
            vocab_size=len(vocab), n_positions=128, n_embd=params.n_embd, n_layer=params.n_layer,
            n_head=params.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            # GPT-2's tanh-GELU as one fused kernel: the same function (to 1e-7) as "gelu_new",
            # ~25% faster training on CPU, where these tiny models are elementwise-bound
            activation_function="gelu_pytorch_tanh",
            bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
        )
        import torch

        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        Policy(model, tokenizer).save_pretrained(workdir / "init")

    def sft_corpus(self, params: TinySentimentParams, workdir: Path) -> list[str]:
        return pd.read_parquet(workdir / "corpus.parquet")["text"].tolist()

    def sft_settings(self, params: TinySentimentParams) -> TrainSettings:
        return sft_train_settings(epochs=params.sft_epochs, examples=params.num_reviews, batch_size=params.sft_batch_size,
                                  lr=params.sft_lr, warmup_steps=params.sft_warmup_steps)

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        return Policy.from_pretrained(workdir / stage)

    def finish(self, sft: Policy, params: TinySentimentParams, seed: int, workdir: Path) -> None:
        finish_from_samples(
            sft, workdir, self.gold, samples_per_prompt=params.samples_per_prompt, max_new_tokens=params.max_new_tokens,
            min_gap=params.min_gold_gap, seed=seed,
        )


ENVS.register(TinySentiment())
