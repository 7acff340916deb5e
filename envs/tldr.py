"""tldr: the DPO paper's TL;DR summarization task (Rafailov et al. 2023, §6.1 and Fig. 2 right).

Reddit posts with their authors' own TL;DR summaries (`CarperAI/openai_summarize_tldr`: columns
`prompt`, the post formatted as "SUBREDDIT: r/…\\nTITLE: …\\nPOST: …\\nTL;DR:", and `label`, the
human summary) give the prompts and the human reference summaries; the human preference pairs of
Stiennon et al. 2020 (`CarperAI/openai_summarize_comparisons`: `prompt` without the "TL;DR:" line,
`chosen` / `rejected` starting with "TL;DR: ") give the pairs. The reference policy is the
paper's GPT-J SFT model (`CarperAI/openai_summarize_tldr_sft`; its repo has no tokenizer, so
GPT-J's is named apart), used as is (`sft_epochs` 0) or fine-tuned here on prompt + " " + label.

Gold reward = a judge's probability that a completion is a better summary of the post than the
human reference summary (envs/judges.py: a reward model, or an OpenAI-compatible endpoint asked
the paper's GPT-4 prompt). The human reference is judged against itself: gold exactly ½, so the
evaluator's win rate (gold vs reference gold, ties ½) IS the paper's win rate against the human
reference. Completions are " " + summary text: the leading space is the word boundary after
"TL;DR:", so pair texts tokenize like the SFT model's own continuations.

Every model and dataset is a hub id or a local folder (envs/hub.py); tests use local files.

Lengths: posts longer than `max_prompt_tokens` (in the policy's tokens) are dropped and counted,
as the paper's pipeline does (the CarperAI splits are already filtered to fit GPT-J's 550-token
training length); pairs whose summary exceeds `max_new_tokens` are dropped too. What is kept must
fit the sft_model's context (config n_positions / max_position_embeddings): each kept post with
max_new_tokens after it, and with sft_epochs > 0 each SFT text (post + summary + EOS). If not,
`build` stops with one line giving the value of max_prompt_tokens that fits; no text is cut to
fit. Other unusable data is one line too (no such split, a file that is empty or not parquet, no
rows, a missing or non-text column, nothing left after the length filter, a tokenizer larger
than the model's vocabulary); rows with a null cell are dropped and counted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from algorithms.interface import TrainSettings, check
from algorithms.policy import Policy
from envs import ENVS
from envs.base import sft_train_settings, write_env_data
from envs.judges import OpenAIJudgeSpec, RewardModelJudgeSpec, judge_spec, make_judge

TLDR = "TL;DR:"


@dataclass
class TldrParams:
    dataset: str = "CarperAI/openai_summarize_tldr"  # posts + human summaries: hub id or local folder
    train_split: str = "train"  # train prompts (on-policy algorithms, PPO-GT, and SFT when sft_epochs > 0)
    eval_split: str = "test"  # eval prompts: the paper reports win rates on the test split
    pairs_dataset: str = "CarperAI/openai_summarize_comparisons"  # human preference pairs
    pairs_split: str = "train"  # the comparisons also have test, valid1, valid2
    sft_model: str = "CarperAI/openai_summarize_tldr_sft"  # the reference policy (or SFT's start)
    tokenizer: str = "EleutherAI/gpt-j-6b"  # the policy's tokenizer; "" = sft_model's own
    sft_epochs: float = 0.0  # 0: sft_model already is the SFT policy; > 0: passes of SFT on the train prompts
    sft_batch_size: int = 64
    sft_lr: float = 1e-5
    sft_warmup_steps: int = 50
    num_train_prompts: int = 20_000  # cap on train prompts (and the SFT corpus)
    num_eval_prompts: int = 256  # fixed eval prompts (the suite's eval.num_prompts takes the first ones)
    num_pairs: int = 100_000  # cap on preference pairs (the comparisons' train split has ~92 k)
    # posts longer than this in the policy tokenizer are dropped (counted in data_stats.json):
    # 486 + 64 = 550, the sequence length the CarperAI SFT model was trained at
    max_prompt_tokens: int = 486
    max_new_tokens: int = 64  # pairs whose chosen or rejected summary (+ EOS) is longer are dropped
    judge: dict = field(default_factory=dict)  # {kind: reward_model | openai, ...}: see envs/judges.py

    def __post_init__(self) -> None:
        for name in ("dataset", "train_split", "eval_split", "pairs_dataset", "pairs_split", "sft_model"):
            check(isinstance(getattr(self, name), str) and bool(getattr(self, name)), name, "must be a non-empty string")
        check(isinstance(self.tokenizer, str), "tokenizer", "must be a string (\"\" = the sft_model's tokenizer)")
        for name in ("num_train_prompts", "num_eval_prompts", "num_pairs", "max_prompt_tokens", "max_new_tokens",
                     "sft_batch_size"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        check(self.sft_epochs >= 0, "sft_epochs", "must be >= 0 (0: sft_model is used as the SFT policy)")
        check(self.sft_lr > 0, "sft_lr", "must be > 0")
        check(self.sft_warmup_steps >= 0, "sft_warmup_steps", "must be >= 0")
        # filled in with the judge's defaults, so that equal judges give equal env cache keys
        self.judge = asdict(judge_spec(self.judge))


def as_prompt(text: str) -> str:
    """A post as a prompt that ends in "TL;DR:" (the comparisons' prompts lack that line)."""
    text = text.rstrip()
    return text if text.endswith(TLDR) else f"{text}\n{TLDR}"


def post_of(prompt: str) -> str:
    """The post the judge reads: the prompt without its trailing "TL;DR:"."""
    prompt = prompt.rstrip()
    return prompt[: -len(TLDR)].rstrip() if prompt.endswith(TLDR) else prompt


def summary_of(text: str) -> str:
    """A summary's bare text (the comparisons' summaries start with "TL;DR: ")."""
    text = text.strip()
    return text[len(TLDR):].strip() if text.startswith(TLDR) else text


def _say(message: str) -> None:
    print(f"[prefbench] env tldr: {message}", file=sys.stderr, flush=True)


def _columns(name: str, split: str, needed: list[str], param: str) -> tuple[pd.DataFrame, int]:
    from envs.hub import text_table

    return text_table(name, split, needed, env="tldr", param=param)


class Tldr:
    name = "tldr"
    params_cls = TldrParams
    version = 1  # part of the cache key: bump when what build/SFT/finish produce changes

    def gold_for(self, params: TldrParams, workdir: Path) -> Callable[[list[str], list[str]], np.ndarray]:
        """P(completion beats the human reference summary of its prompt), by the params' judge."""
        table = pd.read_parquet(Path(workdir) / "summaries.parquet")
        references = dict(zip(table["prompt"], table["summary"]))
        judge = make_judge(params.judge)

        def gold(prompts: list[str], completions: list[str]) -> np.ndarray:
            missing = [p for p in prompts if p not in references]
            if missing:
                raise ValueError(f"env tldr: no human reference summary for {len(missing)} prompt(s), e.g. "
                                 f"{missing[0][:80]!r}; tldr judges only its own train and eval prompts")
            if not prompts:
                return np.zeros(0)
            return judge.prefer([post_of(p) for p in prompts], list(completions), [references[p] for p in prompts])

        return gold

    def preflight(self, params: TldrParams) -> None:
        from envs.hub import Unavailable, require_dataset, require_model

        require_model(params.sft_model, env=self.name, param="sft_model")
        if params.tokenizer:
            require_model(params.tokenizer, env=self.name, param="tokenizer")
        require_dataset(params.dataset, env=self.name, param="dataset")
        require_dataset(params.pairs_dataset, env=self.name, param="pairs_dataset")
        spec = judge_spec(params.judge)
        if isinstance(spec, RewardModelJudgeSpec):
            require_model(spec.model, env=self.name, param="judge.model")
        elif isinstance(spec, OpenAIJudgeSpec):
            why = make_judge(spec).check_reachable()
            if why is not None:
                raise Unavailable(f"env tldr: the judge endpoint env.params.judge.base_url = {spec.base_url} is not "
                                  f"usable ({why}); start the server (e.g. vLLM) or set "
                                  f"--set env.params.judge.base_url=URL")

    # ------------------------------------------------------------------------------ stages
    def build(self, params: TldrParams, seed: int, workdir: Path) -> None:
        """Select train / eval posts and pairs (seeded), dropping posts longer than max_prompt_tokens."""
        from transformers import AutoConfig, AutoTokenizer

        from envs.hub import check_context, context_length, take_fitting

        tokenizer = AutoTokenizer.from_pretrained(params.tokenizer or params.sft_model)
        config = AutoConfig.from_pretrained(params.sft_model)
        vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
        if params.tokenizer and isinstance(vocab, int) and len(tokenizer) > vocab:  # ids past the embeddings
            raise ValueError(f"env tldr: tokenizer {params.tokenizer} (env.params.tokenizer) has {len(tokenizer)} "
                             f"tokens, more than the {vocab} of sft_model {params.sft_model}; set env.params.tokenizer "
                             f"to the model's own tokenizer (\"\" = sft_model's)")
        prompt_tokens: dict[str, int] = {}  # post → its length as the policy encodes it (BOS where one is added)

        def n_tokens(texts: list[str], special: bool) -> np.ndarray:
            return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]])

        def short_prompts(rows: list) -> np.ndarray:  # rows are (prompt, ...) tuples
            if not rows:
                return np.zeros(0, bool)
            lengths = n_tokens([r[0] for r in rows], True)
            prompt_tokens.update(zip((r[0] for r in rows), lengths.tolist()))
            return lengths <= params.max_prompt_tokens

        rng = np.random.default_rng([seed, 7])
        stats: dict = {}
        picked = {}
        for split_name, split, n in (("train", params.train_split, params.num_train_prompts),
                                     ("eval", params.eval_split, params.num_eval_prompts)):
            table, nulls = _columns(params.dataset, split, ["prompt", "label"], "dataset")
            rows = list(dict(zip(map(as_prompt, table["prompt"]), map(summary_of, table["label"]))).items())
            kept, examined = take_fitting(rows, n, rng, short_prompts)
            picked[split_name] = kept
            stats[split_name] = {"split": split, "kept": len(kept), "examined": examined,
                                 "dropped_long": examined - len(kept), "dropped_null": nulls}

        table, nulls = _columns(params.pairs_dataset, params.pairs_split, ["prompt", "chosen", "rejected"],
                                "pairs_dataset")
        pairs = [(as_prompt(p), summary_of(c), summary_of(r))
                 for p, c, r in zip(table["prompt"], table["chosen"], table["rejected"])]
        pairs = [row for row in pairs if row[1] != row[2]]  # a tie carries no preference

        def pair_fits(rows: list) -> np.ndarray:
            if not rows:
                return np.zeros(0, bool)
            limit = params.max_new_tokens - 1  # + EOS
            return (short_prompts(rows) & (n_tokens([" " + r[1] for r in rows], False) <= limit)
                    & (n_tokens([" " + r[2] for r in rows], False) <= limit))

        kept_pairs, examined = take_fitting(pairs, params.num_pairs, rng, pair_fits)
        stats["pairs"] = {"split": params.pairs_split, "kept": len(kept_pairs), "examined": examined,
                          "dropped_long": examined - len(kept_pairs), "dropped_null": nulls}
        for part, s in stats.items():
            is_pairs = part == "pairs"
            what, name, param = ("pair", params.pairs_dataset, "pairs_dataset") if is_pairs else \
                ("post", params.dataset, "dataset")
            limits = f"max_prompt_tokens={params.max_prompt_tokens}" + \
                (f" / max_new_tokens={params.max_new_tokens}" if is_pairs else "")
            if s["dropped_long"]:
                _say(f"{part}: dropped {s['dropped_long']} of {s['examined']} examined {what}s longer than {limits}")
            if s["dropped_null"]:
                _say(f"{part}: dropped {s['dropped_null']} rows of split {s['split']} with a null cell")
            if not s["kept"]:
                raise ValueError(f"env tldr: no {what} of dataset {name} (env.params.{param}), split {s['split']!r}, "
                                 f"fits {limits} ({s['examined']} examined" + (", ties dropped" if is_pairs else "")
                                 + "); raise env.params.max_prompt_tokens" + (" or max_new_tokens" if is_pairs else ""))

        # what is kept must fit the policy's positions: a longer sequence is an index error mid-trial
        context = context_length(config)
        model_name = f"sft_model {params.sft_model}"
        kept_prompts = list({p: None for p, *_ in picked["train"] + picked["eval"] + kept_pairs})

        def shorter_posts(limit: int, longest: int) -> str:
            if limit > params.max_new_tokens:
                return f"set env.params.max_prompt_tokens <= {limit - params.max_new_tokens} (longer posts are dropped)"
            return f"lower env.params.max_new_tokens (now {params.max_new_tokens})"

        check_context([prompt_tokens[p] for p in kept_prompts], params.max_new_tokens, context=context, env=self.name,
                      what="selected posts", model=model_name, extra_name=f"max_new_tokens={params.max_new_tokens}",
                      fix=shorter_posts)
        if params.sft_epochs > 0:  # SFT trains on BOS + post + " " + summary + EOS; summaries are not length-filtered
            bos = len(tokenizer("", add_special_tokens=True)["input_ids"])
            summary_tokens = n_tokens([" " + s for _, s in picked["train"]], False)

            def shorter_sft_texts(limit: int, longest: int) -> str:
                room = limit - 1 - int(summary_tokens.max())  # posts this long fit with any summary + EOS
                if room > bos:
                    return f"set env.params.max_prompt_tokens <= {room} (longer posts are dropped)"
                return (f"the longest summary alone is {summary_tokens.max()} tokens: drop such rows from "
                        f"env.params.dataset")

            texts = [f"{p} {s}" for p, s in picked["train"]]
            check_context((n_tokens(texts, False) + bos).tolist(), 1, context=context, env=self.name,
                          what="SFT texts (train post + summary)", model=model_name, extra_name="EOS",
                          fix=shorter_sft_texts)

        # the eval rows last: a post in both splits is judged against its eval reference
        summaries = picked["train"] + picked["eval"]
        pd.DataFrame({
            "prompt": [p for p, _ in summaries], "summary": [s for _, s in summaries],
            "split": ["train"] * len(picked["train"]) + ["eval"] * len(picked["eval"]),
        }).to_parquet(workdir / "summaries.parquet", index=False)
        pd.DataFrame(kept_pairs, columns=["prompt", "chosen", "rejected"]).to_parquet(
            workdir / "human_pairs.parquet", index=False)
        (workdir / "data_stats.json").write_text(json.dumps(stats, indent=1))
        (workdir / "model.json").write_text(json.dumps({"model": params.sft_model, "tokenizer": params.tokenizer}))

    def sft_corpus(self, params: TldrParams, workdir: Path) -> list[str] | None:
        if params.sft_epochs == 0:
            return None
        table = pd.read_parquet(workdir / "summaries.parquet")
        train = table[table["split"] == "train"]
        return [f"{p} {s}" for p, s in zip(train["prompt"], train["summary"])]

    def sft_settings(self, params: TldrParams) -> TrainSettings:
        return sft_train_settings(epochs=params.sft_epochs, examples=params.num_train_prompts, batch_size=params.sft_batch_size,
                                  lr=params.sft_lr, warmup_steps=params.sft_warmup_steps)

    def load_policy(self, workdir: Path, stage: str) -> Policy:
        from envs.hub import load_policy

        return load_policy(workdir, stage)

    def finish(self, sft: Policy, params: TldrParams, seed: int, workdir: Path) -> None:
        """Human data only: the SFT policy samples nothing here (pairs and references are human)."""
        table = pd.read_parquet(workdir / "summaries.parquet")
        train, evals = table[table["split"] == "train"], table[table["split"] == "eval"]
        pairs = pd.read_parquet(workdir / "human_pairs.parquet")
        for col in ("chosen", "rejected"):
            pairs[col] = " " + pairs[col]
        references = pd.DataFrame({
            "prompt": evals["prompt"].tolist(),
            "completion": [" " + s for s in evals["summary"]],
            "gold": np.full(len(evals), 0.5),  # the human reference against itself: a tie
        })
        write_env_data(workdir, train_prompts=train["prompt"].tolist(), eval_prompts=evals["prompt"].tolist(),
                       pairs=pairs, references=references)


ENVS.register(Tldr())
