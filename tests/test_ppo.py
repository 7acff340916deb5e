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
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.5 * 0.5**2)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(np.exp(-0.5) - 1 + 0.5)
    assert float(kl_penalty(ref, logp, "k3")) >= 0


def _categorical_gradients(estimator: str, placement: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact expected gradients over a 6-outcome categorical π_θ = softmax(θ) against a fixed π_ref,
    by enumeration (no sampling noise): (the estimator's, ∇ KL(π‖π_ref), ∇ KL(π_ref‖π)). Samples
    y ~ π are not differentiated through: a loss term gives E_π[∇ k]; a reward penalty, through the
    policy gradient, E_π[k ∇ log π]."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)

    def grad(f) -> np.ndarray:
        return torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)[0].numpy()

    k = lambda logp: kl_penalty(logp, ref, estimator)
    if placement == "loss":
        estimate = grad(lambda logp: (logp.exp().detach() * k(logp)).sum())
    else:
        estimate = grad(lambda logp: (logp.exp() * k(logp).detach()).sum())
    forward = grad(lambda logp: (logp.exp() * (logp - ref)).sum())
    reverse = grad(lambda logp: (ref.exp() * (ref - logp)).sum())
    assert np.abs(forward - reverse).max() > 0.05  # the two KLs' gradients differ here: the test can tell them apart
    return estimate, forward, reverse


def test_each_estimator_as_a_loss_has_the_expected_gradient_of_its_kl():
    k1, forward, reverse = _categorical_gradients("k1", "loss")
    assert np.abs(k1).max() < 1e-12  # E_π[∇ log π] = 0: k1 as a loss regularises nothing
    assert np.abs(forward).max() > 0.05
    k2, forward, _ = _categorical_gradients("k2", "loss")
    np.testing.assert_allclose(k2, forward, atol=1e-12)  # ∇ KL(π‖π_ref)
    k3, _, reverse = _categorical_gradients("k3", "loss")
    np.testing.assert_allclose(k3, reverse, atol=1e-12)  # ∇ KL(π_ref‖π)


def test_each_estimator_as_a_reward_penalty_has_the_policy_gradient_the_docstring_says():
    k1, forward, reverse = _categorical_gradients("k1", "per_token")
    np.testing.assert_allclose(k1, forward, atol=1e-12)  # ∇ KL(π‖π_ref), via the score function
    k3, _, _ = _categorical_gradients("k3", "per_token")
    np.testing.assert_allclose(k3, forward - reverse, atol=1e-12)  # neither KL: their difference


def test_k1_as_a_loss_term_is_rejected():
    with pytest.raises(ParamError, match="kl_estimator: 'k1' as a loss term .* zero expected gradient"):
        PPOParams(kl_placement="loss", kl_estimator="k1")
    PPOParams(kl_placement="loss", kl_estimator="k2")
    PPOParams(kl_placement="loss", kl_estimator="k3")
    PPOParams(kl_placement="per_token", kl_estimator="k1")
    with pytest.raises(ParamError, match="kl_estimator"):
        PPOParams(kl_estimator="k4")
    with pytest.raises(ParamError, match="critic_init"):
        PPOParams(critic_init="random")


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

    def score(self, prompts, completions, ended=None, batch_size=512):
        return np.array([c.split().count("good") for c in completions], dtype=float)


@pytest.mark.parametrize("placement,estimator", [("per_token", "k1"), ("loss", "k2")])
def test_short_ppo_run_raises_the_reward_and_moves_the_policy(policy, tiny_env_dir, placement, estimator):
    torch.manual_seed(0)
    reference = policy.frozen_copy()
    critic = ScalarModel.from_pretrained(tiny_env_dir / "init", zero_head=True)
    before = [p.detach().clone() for p in policy.model.parameters()]
    prompts = ["the movie was", "the plot was", "overall it was", "the acting was"] * 4
    train = TrainSettings(steps=12, batch_size=16, lr=1e-2, warmup_steps=0, eval_every=1000)
    logs = []
    evaluations = []
    ctx = TrainContext(
        policy=policy, reference=reference, train=train,
        params=PPOParams(kl_coef=0.01, kl_placement=placement, kl_estimator=estimator),
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


class SpyReference:
    """A frozen reference that records its generate calls."""

    def __init__(self, reference):
        self.reference, self.calls = reference, []

    def generate(self, prompts, **kw):
        self.calls.append((list(prompts), kw))
        return self.reference.generate(prompts, **kw)

    def __getattr__(self, name):
        return getattr(self.reference, name)


def _ppo_context(policy, tiny_env_dir, params, steps=2, **kw):
    prompts = [f"the {w} was" for w in ("movie", "plot", "acting", "ending", "cast", "film", "story", "music")] * 3
    train = TrainSettings(steps=steps, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=1000)
    critic = ScalarModel.from_pretrained(tiny_env_dir / "init", zero_head=True)
    logs = []
    ctx = TrainContext(
        policy=policy, reference=SpyReference(policy.frozen_copy()), params=params, train=train,
        data=EnvData(train_prompts=prompts, eval_prompts=[], pairs=pd.DataFrame(), references=pd.DataFrame()),
        optimize=plain_optimizer(policy, critic, train=train), evaluate=lambda sampler, step, final=False: {},
        log=lambda step, m: logs.append(m), reward_model=WordRM(), critic=critic, max_new_tokens=6, **kw,
    )
    return ctx, logs


def test_the_score_is_normalised_by_the_cached_reference_statistics(policy, tiny_env_dir):
    calls = []

    def cache(key, compute):
        calls.append(key)
        return {"mean": 0.25, "std": 0.5}

    ctx, logs = _ppo_context(policy, tiny_env_dir, PPOParams(kl_coef=0.1, rollout_temperature=0.7), cache=cache)
    summary = ALGORITHMS.get("ppo").train(ctx)
    assert calls == ["ppo-reward-stats/reward_model/samples=24/temperature=0.7/max_new_tokens=6/seed=0"]  # once per trial
    assert ctx.reference.calls == []  # a cache hit samples nothing
    for m in logs:
        assert m["objective/score_normalized"] == pytest.approx((m["objective/score"] - 0.25) / 0.5, abs=1e-6)
        assert m["objective/reward"] == pytest.approx(m["objective/score_normalized"] - 0.1 * m["objective/kl"], abs=1e-6)
    assert (summary["reward_norm_mean"], summary["reward_norm_std"]) == (0.25, 0.5)

    calls.clear()
    ctx, logs = _ppo_context(policy, tiny_env_dir, PPOParams(reward_norm=False), cache=cache)
    ALGORITHMS.get("ppo").train(ctx)
    assert calls == [] and all(m["objective/score_normalized"] == m["objective/score"] for m in logs)


def test_the_reference_statistics_are_the_scores_of_seeded_reference_samples(policy, tiny_env_dir):
    from algorithms.online import reference_score_stats

    computed = []
    ctx, _ = _ppo_context(policy, tiny_env_dir, PPOParams(rollout_temperature=0.7, reward_norm_samples=16), steps=1,
                          cache=lambda key, compute: computed.append(compute()) or computed[-1])
    stats = reference_score_stats(ctx, "reward_model", samples=16, temperature=0.7, name="ppo")
    [(prompts, kw)] = ctx.reference.calls  # one sample of the REFERENCE per prompt, at the rollout temperature
    assert len(prompts) == 16 and set(prompts) <= set(ctx.data.train_prompts)
    assert (kw["n"], kw["temperature"], kw["max_new_tokens"]) == (1, 0.7, 6)
    roll = ctx.reference.reference.generate(prompts, **kw)
    scores = WordRM().score(prompts, roll.completions)
    assert computed == [pytest.approx({"mean": scores.mean(), "std": scores.std(), "samples": 16})]
    assert stats == pytest.approx((scores.mean(), scores.std()))
    # seeded: every rank and every trial computes the same
    assert reference_score_stats(ctx, "reward_model", samples=16, temperature=0.7, name="ppo") == stats


def test_zero_spread_reference_scores_are_a_clear_error(policy, tiny_env_dir):
    ctx, _ = _ppo_context(policy, tiny_env_dir, PPOParams(), cache=lambda key, compute: {"mean": 1.0, "std": 0.0})
    with pytest.raises(ValueError, match="all equal 1 .*set reward_norm: false"):
        ALGORITHMS.get("ppo").train(ctx)


def test_bench_cache_computes_once_per_key_and_scope_and_recomputes_a_corrupt_file(tmp_path):
    from bench.worker.trial import algorithm_cache

    computed = []

    def compute(value):
        return lambda: computed.append(value) or {"mean": value}

    first = algorithm_cache(tmp_path, {"reward_model": "rm-a"}, rank=0, world=1)
    assert first("k", compute(1.0)) == {"mean": 1.0}
    again = algorithm_cache(tmp_path, {"reward_model": "rm-a"}, rank=0, world=1)  # a later trial
    assert again("k", compute(2.0)) == {"mean": 1.0} and computed == [1.0]
    other_rm = algorithm_cache(tmp_path, {"reward_model": "rm-b"}, rank=0, world=1)
    assert other_rm("k", compute(3.0)) == {"mean": 3.0}
    assert again("k2", compute(4.0)) == {"mean": 4.0}
    files = (tmp_path / "algorithm_cache").glob("*.json")
    [path] = [p for p in files if '"rm-a"' in p.read_text() and '"key": "k"' in p.read_text()]
    path.write_text("{not json")
    assert again("k", compute(5.0)) == {"mean": 5.0} and computed == [1.0, 3.0, 4.0, 5.0]
