"""tiny-sentiment: the offline default env, a miniature of the DPO paper's IMDb task.

A synthetic movie-review language from a small probabilistic grammar: 2–5 template sentences per
review ("the plot was very good .", "i hated the ending .", "i would not recommend this film .",
"seven out of ten ."), with a hidden per-review tilt so that sentiment words co-occur, as they do
in real reviews. Positive, negative and neutral words mix; the corpus' gold reward has mean ≈ 0.5
and a wide spread. A word-level tokenizer (`tokenizers`, wrapped as a transformers fast
tokenizer) and a tiny GPT-2 (`GPT2LMHeadModel`, ~0.6 M parameters) trained by SFT on the corpus
make the reference policy. Prompts are the first 2–4 words of fresh reviews from the grammar
(`make_prompts`): eval prompts are drawn first, and train prompts never repeat an eval prompt
string. The gold reward is VADER's compound score of prompt + completion mapped to [0, 1]; pairs are
SFT samples ranked by gold, as in the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from algorithms.interface import ParamError, TrainSettings, check
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
MAX_DRAWS_PER_TRAIN_PROMPT = 50  # openings drawn per train prompt before giving up (default params: ~3.5)


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


def make_review(rng: np.random.Generator, num_sentences: int | None = None) -> list[str]:
    """One review as words: 2–5 sentences (or `num_sentences`), each of >= 4 words. A hidden tilt in
    [-1, 1] sets how likely each sentiment slot is positive."""
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
    for _ in range(rng.integers(2, 6) if num_sentences is None else num_sentences):
        words += sentence() + ["."]
    return words


def review_opening(rng: np.random.Generator) -> str:
    """A prompt: the first 2–4 words of a review. They lie in its first sentence (>= 4 words), so one
    sentence is drawn: the same distribution as a whole review's opening, ~3x cheaper."""
    words = make_review(rng, num_sentences=1)
    return " ".join(words[: int(rng.integers(2, 5))])


def make_prompts(params: TinySentimentParams, seed: int) -> dict[str, list[str]]:
    """prompts.json's {"train": [...], "eval": [...]}: no eval prompt string is also a train prompt.

    Openings are few and skewed (89 two- and three-word strings hold 2/3 of the mass), so prompts
    drawn independently for both lists share strings (v2: 91–93 % of eval prompts were train ones).
    Eval prompts are drawn first, an i.i.d. sample of openings as before: the report's gold is
    measured on the opening mix the SFT policy learned, short ones that leave the sentiment to the
    completion included. Train prompts are drawn from the other openings and so lean to rarer,
    4-word ones (~55 % vs 1/3): pairs and rollouts need openings, not the eval mix. Eval prompts may
    repeat (122–135 distinct in 256 at seeds 0, 1): a repeat gets fresh samples at T > 0 and weighs
    an opening by its frequency, while 256 distinct ones would have to be >= 65 % 4-word openings.
    On their own random stream, the prompts of a seed do not depend on num_reviews.
    """
    rng = np.random.default_rng([seed, 2])
    eval_prompts = [review_opening(rng) for _ in range(params.num_eval_prompts)]
    held_out = set(eval_prompts)
    train_prompts: list[str] = []
    # the eval openings can hold nearly all the mass when num_eval_prompts is large: stop, do not spin
    for _ in range(MAX_DRAWS_PER_TRAIN_PROMPT * params.num_train_prompts):
        prompt = review_opening(rng)
        if prompt not in held_out:
            train_prompts.append(prompt)
            if len(train_prompts) == params.num_train_prompts:
                return {"train": train_prompts, "eval": eval_prompts}
    raise ParamError("num_eval_prompts", f"{params.num_eval_prompts} eval prompts leave too few other openings for "
                     f"{params.num_train_prompts} train prompts (found {len(train_prompts)}); lower either")


class TinySentiment:
    name = "tiny-sentiment"
    params_cls = TinySentimentParams
    version = 3  # part of the cache key: bump when what build/SFT/finish produce changes (3: disjoint prompts)

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """VADER compound of prompt + completion, mapped from [-1, 1] to [0, 1]."""
        return vader_gold(prompts, completions)

    # ------------------------------------------------------------------------------ stages
    def build(self, params: TinySentimentParams, seed: int, workdir: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        rng = np.random.default_rng([seed, 1])
        corpus = [" ".join(make_review(rng)) for _ in range(params.num_reviews)]
        prompts = make_prompts(params, seed)
        pd.DataFrame({"text": corpus}).to_parquet(workdir / "corpus.parquet", index=False)
        (workdir / "prompts.json").write_text(json.dumps(prompts))

        grammar = POSITIVE + NEGATIVE + NEUTRAL + NOUNS + ADVERBS + LIKE + DISLIKE + NUMBERS
        words = sorted({w for text in corpus + prompts["eval"] + prompts["train"] for w in text.split()} | set(grammar))
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
