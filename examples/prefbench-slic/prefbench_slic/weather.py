"""toy-weather: a toy env written against prefbench's Env contract only (docs/plugins.md).

Weather reports from a small grammar ("on monday it will be sunny and warm . expect rain in the
evening ."), each with a hidden mood that tilts its words towards good or bad weather. A word-level
tokenizer (prefbench's `word_tokenizer`) and a tiny GPT-2, trained by prefbench's SFT stage on the reports, make the reference
policy. Prompts are the first 3–5 words of held-out reports. Gold reward: the share of good-weather
words among the weather words of the completion, in [0, 1] (0.5 when it names no weather).
Pairs: SFT samples ranked by the gold reward (prefbench's `finish_from_samples`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from algorithms.interface import TrainSettings, check
from algorithms.policy import Policy
from envs.base import finish_from_samples, sft_train_settings, word_tokenizer

GOOD = ["sunny", "warm", "clear", "bright", "calm", "mild", "dry", "pleasant"]
BAD = ["rainy", "cold", "stormy", "windy", "grey", "foggy", "wet", "freezing"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
TIMES = ["morning", "afternoon", "evening", "night"]


@dataclass
class ToyWeatherParams:
    num_reports: int = 3_000  # SFT corpus size
    num_train_prompts: int = 300  # prompts for pairs
    num_eval_prompts: int = 64  # fixed evaluation prompts
    samples_per_prompt: int = 4  # SFT samples per train prompt from which pairs are made
    max_new_tokens: int = 16  # completion length cap, for pairs and references
    n_layer: int = 2  # GPT-2 size
    n_embd: int = 64
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("num_reports", "num_train_prompts", "num_eval_prompts", "max_new_tokens", "n_layer", "n_embd"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (pairs need two samples)")
        check(self.n_embd % 4 == 0, "n_embd", "must be divisible by 4 (attention heads)")
        check(self.sft_epochs > 0, "sft_epochs", "must be > 0")
        check(self.sft_lr > 0, "sft_lr", "must be > 0")


def make_report(rng: np.random.Generator) -> str:
    mood = rng.uniform(0.1, 0.9)  # probability that a weather word is a good one

    def weather() -> str:
        return str(rng.choice(GOOD if rng.random() < mood else BAD))

    clauses = []
    for _ in range(rng.integers(2, 4)):
        kind = rng.integers(3)
        if kind == 0:
            clauses.append(f"on {rng.choice(DAYS)} it will be {weather()} and {weather()} .")
        elif kind == 1:
            clauses.append(f"expect {weather()} skies in the {rng.choice(TIMES)} .")
        else:
            clauses.append(f"the {rng.choice(TIMES)} looks {weather()} .")
    return " ".join(clauses)


def weather_gold(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Share of good-weather words among the completion's weather words; 0.5 when there are none."""
    out = np.empty(len(completions))
    for i, text in enumerate(completions):
        words = text.split()
        good, bad = sum(w in GOOD for w in words), sum(w in BAD for w in words)
        out[i] = good / (good + bad) if good + bad else 0.5
    return out


class ToyWeather:
    name = "toy-weather"
    params_cls = ToyWeatherParams
    version = 1  # part of prefbench's cache key: bump when what build/SFT/finish produce changes

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return weather_gold(prompts, completions)

    def build(self, params: ToyWeatherParams, seed: int, workdir: Path) -> None:
        """Corpus, prompts, tokenizer and the untrained model, all under `workdir`."""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        rng = np.random.default_rng(seed)
        reports = [make_report(rng) for _ in range(params.num_reports + params.num_train_prompts + params.num_eval_prompts)]
        prompts = [" ".join(r.split()[: int(rng.integers(3, 6))]) for r in reports[params.num_reports :]]
        (workdir / "corpus.json").write_text(json.dumps(reports[: params.num_reports]))
        (workdir / "prompts.json").write_text(json.dumps(
            {"train": prompts[: params.num_train_prompts], "eval": prompts[params.num_train_prompts :]}
        ))
        tokenizer = word_tokenizer(sorted({w for r in reports for w in r.split()} | set(GOOD + BAD)))
        vocab = tokenizer.get_vocab()
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(vocab), n_positions=64, n_embd=params.n_embd, n_layer=params.n_layer, n_head=4,
            bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
        ))
        Policy(model, tokenizer).save_pretrained(workdir / "init")

    def sft_corpus(self, params: ToyWeatherParams, workdir: Path) -> list[str]:
        return json.loads((workdir / "corpus.json").read_text())

    def sft_settings(self, params: ToyWeatherParams) -> TrainSettings:
        return sft_train_settings(epochs=params.sft_epochs, examples=params.num_reports, batch_size=32,
                                  lr=params.sft_lr, warmup_steps=10)

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        return Policy.from_pretrained(workdir / stage)  # stage "init" (built above) or "sft" (saved by prefbench)

    def finish(self, sft: Policy, params: ToyWeatherParams, seed: int, workdir: Path) -> None:
        finish_from_samples(sft, workdir, self.gold, samples_per_prompt=params.samples_per_prompt,
                            max_new_tokens=params.max_new_tokens, min_gap=0.01, seed=seed)
