"""The learned ("proxy") reward model, trained with the Bradley–Terry loss on the env's pairs.

    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l))        L_BT = −E log σ(r(x, y_w) − r(x, y_l))

The model is the env's SFT backbone with a scalar head: a Hugging Face
`AutoModelForSequenceClassification` with `num_labels=1`, initialised from the SFT checkpoint
(the layout TRL's RewardTrainer writes, so either tool reads the other's reward models). The score
of a completion is the head's output at the last token of prompt + completion (+ EOS where the
completion ended: a sample cut at max_new_tokens is scored without one, as it was sampled).

The same `ScalarModel` also serves as PPO's critic, read at every completion position
(`token_values`). bench trains the reward model ONCE per (env, seed, reward-model config) as a
shared stage before the sweep (`train_reward_model`, under DeepSpeed) and hands it, frozen, to
every trial that needs it. Pairs are split by prompt: `heldout_fraction` of the prompts (and all
their pairs) are never trained on and give the held-out pair accuracy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from algorithms.interface import TrainSettings, check, rank_batch
from algorithms.policy import autocast, completion_span, disable_dropout, encode_completions, ended_flags, right_padded


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley–Terry negative log-likelihood −log σ(r_w − r_l); inputs (B,) scalar rewards."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


@dataclass
class RewardModelParams:
    """How the shared reward-model stage trains (suite section `reward_model`)."""

    epochs: float = 2.0  # passes over the training pairs
    batch_size: int = 64  # pairs per optimizer step, all workers together
    lr: float = 3e-4  # peak AdamW learning rate
    warmup_steps: int = 20  # linear warm-up, then constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    heldout_fraction: float = 0.1  # share of PROMPTS whose pairs are held out for accuracy

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", "must be > 0")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)")

    def train_settings(self, n_pairs: int) -> TrainSettings:
        steps = max(1, math.ceil(self.epochs * n_pairs / self.batch_size))
        return TrainSettings(
            steps=steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, eval_every=steps,
        )


class ScalarHead(torch.nn.Module):
    """A sequence-classification LM read at every position: (B, L) scalars (the module DeepSpeed wraps)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(  # (B, L, H); no KV cache: nothing is generated
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()  # (B, L)


class ScalarModel:
    """A scalar-head LM + tokenizer: the reward model, or PPO's critic.

    Prompts are encoded with special tokens and completions get an EOS appended, exactly as
    `Policy` encodes preference pairs. When bench wraps the head in a DeepSpeed engine it sets
    `engine`; training forwards (with grad) then go through it. `gathered` as in `Policy`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        self.head = ScalarHead(disable_dropout(model))
        self.tokenizer = tokenizer
        self.engine = None
        self.gathered = contextlib.nullcontext  # () -> context with every parameter whole (ZeRO-3: set by bench)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, zero_head: bool = False) -> "ScalarModel":
        """Load a saved scalar model, or start one from a causal-LM checkpoint (new head).

        `zero_head` zeroes the head of a fresh model (a critic that starts by predicting 0).
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "some weights newly initialized": the head, by design
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=1, pad_token_id=tokenizer.pad_token_id
            )
        finally:
            logging.set_verbosity(verbosity)
        if zero_head:
            with torch.no_grad():
                for p in model.score.parameters():
                    p.zero_()
        return cls(model, tokenizer)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.head.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    def freeze(self) -> "ScalarModel":
        self.head.eval()
        for p in self.head.parameters():
            p.requires_grad_(False)
        return self

    def to(self, device: torch.device) -> "ScalarModel":
        self.head.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    # ------------------------------------------------------------------------------ scoring
    def _forward(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        input_ids, attention_mask = right_padded(prompt_ids, completion_ids, self.tokenizer.pad_token_id, self.device)
        forward = self.engine if self.engine is not None and torch.is_grad_enabled() else self.head
        with autocast(input_ids.device):
            return forward(input_ids=input_ids, attention_mask=attention_mask)  # (B, L)

    def sequence_scores(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The score at the last token of each prompt + completion, (B,); grads flow."""
        scores = self._forward(prompt_ids, completion_ids)
        last = torch.tensor([len(p) + len(c) - 1 for p, c in zip(prompt_ids, completion_ids)], device=scores.device)
        return scores[torch.arange(len(last), device=scores.device), last]

    def token_values(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """V(x, y_<t) for every completion token t, aligned with `Policy.token_logps`: (values, mask), (B, Tc)."""
        return completion_span(self._forward(prompt_ids, completion_ids), prompt_ids, completion_ids)

    def encode(
        self, prompts: Sequence[str], completions: Sequence[str], ended: Sequence[bool] | None = None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Prompts with special tokens; completions + EOS where `ended` (all when None), as `Policy` encodes them."""
        p_ids = [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        return p_ids, encode_completions(self.tokenizer, completions, ended=ended)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], *, ended: Sequence[bool] | None = None,
        batch_size: int = 128,
    ) -> np.ndarray:
        """Reward of each (prompt, completion) text, shape (N,): the proxy reward PPO and best-of-N use.
        `ended`: per completion, whether it stopped on EOS (a rollout's `ended`); None: all did."""
        if len(prompts) == 0:
            return np.zeros(0)
        p_ids, c_ids = self.encode(prompts, completions, ended)
        was_training = self.head.training
        self.head.eval()
        try:
            out = [self.sequence_scores(p_ids[i : i + batch_size], c_ids[i : i + batch_size]).cpu()
                   for i in range(0, len(p_ids), batch_size)]
        finally:
            self.head.train(was_training)
        return torch.cat(out).double().numpy()


# ------------------------------------------------------------------------------ training
def split_pairs(pairs: pd.DataFrame, heldout_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, heldout) pairs, split by PROMPT so held-out pairs have prompts the model never saw."""
    prompts = np.array(sorted(pairs["prompt"].unique()))
    order = np.random.default_rng([seed, 7]).permutation(len(prompts))
    n_held = max(1, int(round(heldout_fraction * len(prompts)))) if len(prompts) > 1 else 0
    held = set(prompts[order[:n_held]])
    is_held = pairs["prompt"].isin(held).to_numpy()
    return pairs[~is_held].reset_index(drop=True), pairs[is_held].reset_index(drop=True)


@torch.no_grad()
def pair_metrics(rm: ScalarModel, pairs: pd.DataFrame, *, batch_size: int = 128) -> dict:
    """Accuracy (r_w > r_l), mean BT loss and, where the pairs carry gold, Pearson(r, gold)."""
    if len(pairs) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "gold_pearson": float("nan"), "pairs": 0}
    prompts = pairs["prompt"].tolist()
    chosen = rm.score(prompts, pairs["chosen"].tolist(), ended=ended_flags(pairs, "chosen"), batch_size=batch_size)
    rejected = rm.score(prompts, pairs["rejected"].tolist(), ended=ended_flags(pairs, "rejected"), batch_size=batch_size)
    loss = bradley_terry_loss(torch.from_numpy(chosen), torch.from_numpy(rejected)).mean()
    out = {"accuracy": float((chosen > rejected).mean()), "loss": float(loss), "pairs": int(len(pairs))}
    out["gold_pearson"] = float("nan")
    if {"chosen_gold", "rejected_gold"} <= set(pairs.columns):
        r = np.concatenate([chosen, rejected])
        g = np.concatenate([pairs["chosen_gold"].to_numpy(), pairs["rejected_gold"].to_numpy()])
        if r.std() > 0 and g.std() > 0:
            out["gold_pearson"] = float(np.corrcoef(r, g)[0, 1])
    return out


def train_reward_model(
    rm: ScalarModel,
    train_pairs: pd.DataFrame,
    heldout: pd.DataFrame,
    params: RewardModelParams,
    optimize: Callable[[torch.Tensor], dict],
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[int, dict], None] = lambda step, metrics: None,
) -> dict:
    """Bradley–Terry training (`params.train_settings` steps) on `train_pairs` (see `split_pairs`);
    returns held-out and train metrics (`rm/...`)."""
    if len(train_pairs) == 0:
        raise ValueError("the reward model needs preference pairs; the env produced none")
    settings = params.train_settings(len(train_pairs))
    prompts = train_pairs["prompt"].tolist()
    p_ids, w_ids = rm.encode(prompts, train_pairs["chosen"].tolist(), ended_flags(train_pairs, "chosen"))
    _, l_ids = rm.encode(prompts, train_pairs["rejected"].tolist(), ended_flags(train_pairs, "rejected"))
    rm.head.train()
    recent: list[tuple[float, float]] = []
    for step in range(settings.steps):
        idx = rank_batch(step, batch_size=settings.batch_size, rank=rank, world_size=world_size,
                         n_items=len(train_pairs), seed=seed)
        b = len(idx)
        scores = rm.sequence_scores([p_ids[i] for i in idx] * 2, [w_ids[i] for i in idx] + [l_ids[i] for i in idx])
        losses = bradley_terry_loss(scores[:b], scores[b:])  # chosen first, rejected second: one forward
        loss = losses.mean()
        opt = optimize(loss)
        acc = float((scores[:b] > scores[b:]).float().mean())
        recent = (recent + [(float(loss.detach()), acc)])[-50:]
        if step % 50 == 0 or step == settings.steps - 1:
            log(step + 1, {"losses/bt": float(loss.detach()), "rm/train_accuracy": acc,
                           "optim/lr": opt.get("lr", float("nan")), "optim/grad_norm": opt.get("grad_norm", float("nan"))})
    rm.head.eval()
    held = pair_metrics(rm, heldout)
    return {
        "rm/heldout_accuracy": held["accuracy"],
        "rm/heldout_loss": held["loss"],
        "rm/heldout_gold_pearson": held["gold_pearson"],
        "rm/heldout_pairs": held["pairs"],
        "rm/train_pairs": int(len(train_pairs)),
        "rm/train_accuracy": float(np.mean([a for _, a in recent])),
        "rm/train_loss": float(np.mean([l for l, _ in recent])),
        "rm/steps": settings.steps,
    }
