"""The learned reward model: Bradley–Terry loss by hand, the prompt-level split, and real training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms.interface import ParamError, plain_optimizer
from algorithms.reward_model import (
    RewardModelParams, ScalarModel, bradley_terry_loss, pair_metrics, split_pairs, train_reward_model,
)
from envs.tiny_sentiment import NEGATIVE, NOUNS, POSITIVE


def test_bradley_terry_loss_matches_hand_numbers():
    chosen = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected)
    # -log σ(1) = log(1 + e^-1); -log σ(0) = log 2; -log σ(-3) = log(1 + e^3)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(3))])
    losses.sum().backward()
    # d/dr_w = -(1 - σ(r_w - r_l))
    assert chosen.grad.tolist() == pytest.approx([-(1 - 1 / (1 + math.exp(-1))), -0.5, -(1 - 1 / (1 + math.exp(3)))])


def test_params_validation():
    with pytest.raises(ParamError, match="heldout_fraction"):
        RewardModelParams(heldout_fraction=1.0)
    assert RewardModelParams(epochs=2, batch_size=10).train_settings(25).steps == 5


def sentiment_pairs(n_prompts: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        noun = NOUNS[i % len(NOUNS)]
        prompt = f"the {noun} and the {NOUNS[(i // len(NOUNS)) % len(NOUNS)]}"  # unique for i < 256
        for _ in range(3):
            rows.append((prompt, f"were {rng.choice(POSITIVE)} .", f"were {rng.choice(NEGATIVE)} ."))
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])


def test_split_is_by_prompt_and_deterministic():
    pairs = sentiment_pairs(40)
    train, held = split_pairs(pairs, 0.25, seed=0)
    assert set(train["prompt"]).isdisjoint(held["prompt"])
    assert held["prompt"].nunique() == 10 and len(train) + len(held) == len(pairs)
    again, _ = split_pairs(pairs, 0.25, seed=0)
    assert again.equals(train)


def test_reward_model_learns_to_beat_chance_on_heldout_prompts(tiny_env_dir):
    torch.manual_seed(0)
    rm = ScalarModel.from_pretrained(tiny_env_dir / "init")
    train_pairs, heldout = split_pairs(sentiment_pairs(120), 0.25, seed=0)
    params = RewardModelParams(epochs=3, batch_size=32, lr=3e-3, warmup_steps=0)
    before = pair_metrics(rm, heldout)["accuracy"]
    metrics = train_reward_model(rm, train_pairs, heldout, params,
                                 plain_optimizer(rm, train=params.train_settings(len(train_pairs))))
    assert metrics["rm/heldout_pairs"] == len(heldout) > 0
    assert metrics["rm/heldout_accuracy"] > 0.8 > before + 0.1, (before, metrics)
    # scores are per completion and deterministic
    s = rm.score(["the movie was"] * 2, ["great .", "awful ."])
    assert s.shape == (2,) and s[0] > s[1]
    assert np.array_equal(s, rm.score(["the movie was"] * 2, ["great .", "awful ."]))


def test_saved_reward_model_loads_as_a_hf_sequence_classifier(tiny_env_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = ScalarModel.from_pretrained(tiny_env_dir / "init")
    rm.save_pretrained(tmp_path / "rm")
    again = ScalarModel.from_pretrained(tmp_path / "rm")
    x = (["i loved the"], ["film ."])
    assert rm.score(*x) == pytest.approx(again.score(*x))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1


def test_zero_head_critic_starts_at_zero(tiny_env_dir):
    critic = ScalarModel.from_pretrained(tiny_env_dir / "init", zero_head=True)
    p_ids, c_ids = critic.encode(["the movie was", "i"], ["good .", "loved the film ."])
    values, mask = critic.token_values(p_ids, c_ids)
    assert values.shape == mask.shape == (2, 5)
    assert mask.sum(-1).tolist() == [3, 5]  # "good ." + EOS, "loved the film ." + EOS
    assert torch.all(values == 0)
