"""PPO: GAE and the clipped objectives against hand numbers; a short run on the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms import ALGORITHMS
from algorithms.interface import EnvData, ParamError, TrainContext, TrainSettings, plain_optimizer
from algorithms.ppo import PPOParams, AdaptiveKLController, gae, kl_penalty, ppo_losses
from algorithms.reward_model import ScalarModel


def test_gae_matches_a_hand_computed_case():
    # one sequence of 3 tokens then padding; gamma 0.9, lambda 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the padded value (9.0) must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.4  # last token: no next state
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.1, 0.6]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.9 - 0.3, 0.8 - 0.1, 1.0 - 0.6])


def test_clipped_policy_objective_at_known_ratios():
    old = torch.zeros(1, 4)
    # ratios 0.5, 1.1, 1.5, 1.5 with advantages +1, +1, +1, -1; clip 0.2
    logps = torch.log(torch.tensor([[0.5, 1.1, 1.5, 1.5]]))
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    zeros = torch.zeros(1, 4)
    out = ppo_losses(logps, old, adv, zeros, zeros, zeros, torch.ones(1, 4), cliprange=0.2, cliprange_value=0.2)
    # per token: max(-A r, -A clip(r)) = -0.5 (r=0.5, pessimistic unclipped), -1.1, -1.2 (clipped), +1.5
    assert float(out["policy"]) == pytest.approx((-0.5 - 1.1 - 1.2 + 1.5) / 4)
    assert float(out["clipfrac"]) == pytest.approx(3 / 4)


def test_clipped_value_loss():
    z = torch.zeros(1, 2)
    values = torch.tensor([[1.0, 0.1]])
    old_values = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.5, 0.5]])
    out = ppo_losses(z, z, z, values, old_values, returns, torch.ones(1, 2), cliprange=0.2, cliprange_value=0.2)
    # token 0: max((1-.5)^2, (0.2-.5)^2) = 0.25; token 1: max((.1-.5)^2, (.1-.5)^2) = 0.16
    assert float(out["value"]) == pytest.approx(0.5 * (0.25 + 0.16) / 2)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(np.exp(-0.5) - 1 + 0.5)
    assert float(kl_penalty(ref, logp, "k3")) >= 0


def test_adaptive_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, n=100)  # KL too high → coefficient up by the clipped 20% · n/horizon
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(3.0, n=100)
    assert ctl.value < 0.1 * (1 + 0.2 * 0.1)


def test_params_validation_and_registration():
    with pytest.raises(ParamError, match="kl_placement"):
        PPOParams(kl_placement="everywhere")
    with pytest.raises(ParamError, match="target_kl"):
        PPOParams(target_kl=0.0)
    assert ALGORITHMS.get("ppo").needs == {"prompts", "critic", "reward_model"}
    assert ALGORITHMS.get("ppo-gt").needs == {"prompts", "critic", "gold"}
    assert type(ALGORITHMS.get("ppo")) is type(ALGORITHMS.get("ppo-gt"))  # one implementation


class WordRM:
    """A stand-in learned reward: +1 per 'good' in the completion."""

    def score(self, prompts, completions, batch_size=512):
        return np.array([c.split().count("good") for c in completions], dtype=float)


@pytest.mark.parametrize("placement", ["per_token", "loss"])
def test_short_ppo_run_raises_the_reward_and_moves_the_policy(policy, tiny_env_dir, placement):
    torch.manual_seed(0)
    reference = policy.frozen_copy()
    critic = ScalarModel.from_pretrained(tiny_env_dir / "init", zero_head=True)
    before = [p.detach().clone() for p in policy.model.parameters()]
    prompts = ["the movie was", "the plot was", "overall it was", "the acting was"] * 4
    train = TrainSettings(steps=12, batch_size=16, lr=1e-2, warmup_steps=0, eval_every=1000)
    logs = []
    evaluations = []
    ctx = TrainContext(
        policy=policy, reference=reference, params=PPOParams(kl_coef=0.01, kl_placement=placement), train=train,
        data=EnvData(train_prompts=prompts, eval_prompts=[], pairs=pd.DataFrame(), references=pd.DataFrame()),
        optimize=plain_optimizer(policy, critic, train=train),
        evaluate=lambda sampler, step, final=False: evaluations.append((step, final)) or {},
        log=lambda step, m: logs.append(m), reward_model=WordRM(), critic=critic, max_new_tokens=4,
    )
    ALGORITHMS.get("ppo").train(ctx)
    assert evaluations == [(0, False), (12, True)]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))
    first = np.mean([m["objective/score"] for m in logs[:3]])
    last = np.mean([m["objective/score"] for m in logs[-3:]])
    assert last > first + 0.3, (first, last)
    assert logs[-1]["objective/kl"] > 0  # it moved away from the reference to get there
