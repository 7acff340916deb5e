"""On-policy algorithms (RLOO, GRPO, REINFORCE++, online DPO): advantages and losses against hand
numbers and the reference implementations' formulas; short runs on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms import ALGORITHMS
from algorithms.grpo import GRPOParams, grpo_advantages, grpo_loss
from algorithms.interface import EnvData, ParamError, TrainContext, TrainSettings, params_from_dict, plain_optimizer
from algorithms.online_dpo import OnlineDPOParams, rank_pairs
from algorithms.reinforce_pp import ReinforcePPParams, reinforce_pp_advantages, returns_to_go
from algorithms.rloo import RLOOParams, rloo_advantages, rloo_loss

ON_POLICY = [("rloo", RLOOParams), ("grpo", GRPOParams), ("reinforce-pp", ReinforcePPParams),
             ("online-dpo", OnlineDPOParams), ("online-dpo-gt", OnlineDPOParams)]


# ------------------------------------------------------------------------------------- RLOO
def test_rloo_advantages_leave_one_out_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    adv = rloo_advantages(rewards)
    # baselines: means of the other three rewards of the same prompt
    assert adv[0].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    assert adv[1].tolist() == pytest.approx([-4 / 3, -4 / 3, -4 / 3, 4.0])
    # the paper's form: k/(k−1) · (R_i − mean of all k)
    torch.testing.assert_close(adv, 4 / 3 * (rewards - rewards.mean(1, keepdim=True)))


def test_rloo_loss_is_reinforce_with_the_advantage_as_weight():
    logps = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss = rloo_loss(logps, adv)
    assert float(loss.detach()) == pytest.approx(-(1 * -3 + -2 * -5 + 0.5 * -2) / 3)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 3, 2 / 3, -0.5 / 3])


# ------------------------------------------------------------------------------------- GRPO
def test_grpo_advantages_are_trls_group_standardisation():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = grpo_advantages(scores)
    assert adv[0].tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)])
    assert adv[1].tolist() == [0.0, 0.0, 0.0]  # a group that all scored alike teaches nothing
    g = torch.Generator().manual_seed(0)
    r = torch.rand(6, 4, generator=g)
    trl = (r - r.mean(1).view(-1, 1)) / (r.std(1).view(-1, 1) + 1e-4)  # TRL: std(dim=1), n − 1
    torch.testing.assert_close(grpo_advantages(r), trl)


def test_grpo_loss_clip_k3_and_per_sample_token_mean_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ref = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    logps = torch.tensor([[-0.7, -2.0, 0.0], [-1.0, -1.0, -1.5]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, k3 = grpo_loss(logps, old, ref, adv, mask, kl_coef=0.1, cliprange=0.2)
    k3_hand = lambda lr: math.exp(-lr) + lr - 1  # lr = log π − log π_ref (TRL: exp(ref − lp) − (ref − lp) − 1)
    # sample 0: token 0 ratio e^0.3 = 1.35 > 1.2 with A = +1: the clipped term −1.2; token 1: −1
    s0 = ((-1.2 + 0.1 * k3_hand(0.3)) + (-1.0 + 0.0)) / 2
    # sample 1: A = −1: tokens 0, 1 ratio 1 → +1; token 2 ratio e^−0.5 = 0.61 < 0.8: max(0.61, 0.8) = 0.8
    s1 = (1.0 + 1.0 + (0.8 + 0.1 * k3_hand(-0.5))) / 3
    assert float(loss.detach()) == pytest.approx((s0 + s1) / 2, rel=1e-6)
    assert float(k3[0, 0]) == pytest.approx(k3_hand(0.3))
    loss.backward()
    # a clipped token has no policy gradient, only the KL term's: kl_coef · (1 − e^{−lr}) / |o| / N
    assert float(logps.grad[0, 0]) == pytest.approx(0.1 * (1 - math.exp(-0.3)) / 2 / 2, rel=1e-5)
    assert float(logps.grad[0, 2]) == 0.0  # padding


def test_grpo_at_the_reference_with_one_epoch_is_minus_the_advantage_weighted_score_gradient():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    mask = torch.ones(2, 2)
    adv = torch.tensor([2.0, -1.0])
    loss, k3 = grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, kl_coef=0.5, cliprange=0.2)
    assert float(loss.detach()) == pytest.approx(-(2.0 - 1.0) / 2) and torch.all(k3 == 0)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))  # −A / |o| / N; k3's gradient is 0 here


# ------------------------------------------------------------------------------ REINFORCE++
def test_returns_to_go_and_global_whitening_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])  # the padded 9.0 must not leak in
    rewards = torch.tensor([[-0.01, -0.02, -0.03 + 1.0], [-0.05, 0.05 + 2.0, 0.0]])
    assert returns_to_go(rewards, mask)[0].tolist() == pytest.approx([0.94, 0.95, 0.97])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.1)
    g = torch.tensor([0.94, 0.95, 0.97, 2.0, 2.05])  # real tokens' returns
    want = (g - g.mean()) / g.std(unbiased=False)
    torch.testing.assert_close(adv[mask.bool()], want, rtol=1e-5, atol=1e-5)
    assert float(adv[1, 2]) == 0.0


def test_reinforce_pp_whitens_over_every_rank_s_tokens():
    """Two ranks (threads whose `mean_over_ranks` averages with each other, as bench's all-reduce
    does): each rank's advantages are its rows of the 1-rank advantages of the whole batch."""
    import threading

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.linspace(-0.2, 0.3, 12).view(4, 3)
    score = torch.tensor([0.5, -1.0, 2.0, 0.0])
    whole = reinforce_pp_advantages(score, kl, mask, 0.1)
    barrier, slots, parts = threading.Barrier(2), [None, None], [None, None]

    def run(rank: int) -> None:
        def mean_over_ranks(d: dict) -> dict:
            slots[rank] = d
            barrier.wait()
            out = {k: (slots[0][k] + slots[1][k]) / 2 for k in d}
            barrier.wait()
            return out

        rows = slice(2 * rank, 2 * rank + 2)
        parts[rank] = reinforce_pp_advantages(score[rows], kl[rows], mask[rows], 0.1, mean_over_ranks)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ online DPO
def test_online_dpo_ranks_each_prompt_s_two_samples_first_wins_a_tie():
    chosen, rejected = rank_pairs(torch.tensor([[1.0, 2.0], [3.0, 3.0], [5.0, 4.0]]))
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5]


# ------------------------------------------------------------------------- params, registry
@pytest.mark.parametrize("name, params_cls", ON_POLICY)
def test_registered_with_knob_needs_and_defaults(name, params_cls):
    algo = ALGORITHMS.get(name)
    assert algo.params_cls is params_cls and algo.trains_policy is True
    assert algo.knob in params_cls.__dataclass_fields__
    scorer = "gold" if name.endswith("-gt") else "reward_model"
    assert algo.needs == frozenset({"prompts", scorer})  # no critic: none of them learns a value function
    params_cls()  # the defaults are valid


@pytest.mark.parametrize("params_cls, bad, field", [
    (RLOOParams, {"k": 1}, "k"), (RLOOParams, {"kl_coef": -0.1}, "kl_coef"),
    (GRPOParams, {"group_size": 1}, "group_size"), (GRPOParams, {"epochs": 0}, "epochs"),
    (ReinforcePPParams, {"cliprange": 0.0}, "cliprange"), (OnlineDPOParams, {"beta": 0.0}, "beta"),
    (OnlineDPOParams, {"rollout_temperature": 0.0}, "rollout_temperature"),
])
def test_params_reject_bad_values(params_cls, bad, field):
    with pytest.raises(ParamError, match=field):
        params_from_dict(params_cls, bad)


# -------------------------------------------------------------------------- short real runs
class WordRM:
    """A stand-in learned reward: +1 per 'good' in the completion."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions, ended=None, batch_size=512):
        self.calls += len(completions)
        return np.array([c.split().count("good") for c in completions], dtype=float)


def _context(policy, name, params, steps, lr=1e-2):
    prompts = ["the movie was", "the plot was", "overall it was", "the acting was"] * 4
    train = TrainSettings(steps=steps, batch_size=8, lr=lr, warmup_steps=0, eval_every=1000)
    logs, evaluations = [], []
    rm = WordRM()
    ctx = TrainContext(
        policy=policy, reference=policy.frozen_copy(), params=params, train=train,
        data=EnvData(train_prompts=prompts, eval_prompts=[], pairs=pd.DataFrame(), references=pd.DataFrame()),
        optimize=plain_optimizer(policy, train=train),
        evaluate=lambda sampler, step, final=False: evaluations.append((step, final)) or {},
        log=lambda step, m: logs.append(m), reward_model=rm,
        gold=lambda p, c: np.array([x.split().count("good") / 4 for x in c]), max_new_tokens=4,
        cache=lambda key, compute: {"mean": 0.25, "std": 0.5},  # the reference's score statistics
    )
    return ctx, logs, evaluations, rm


@pytest.mark.parametrize("name, params", [
    ("rloo", RLOOParams(kl_coef=0.01, k=4)), ("grpo", GRPOParams(kl_coef=0.01, group_size=4)),
    ("reinforce-pp", ReinforcePPParams(kl_coef=0.01, k=2)), ("online-dpo", OnlineDPOParams(beta=0.1)),
    ("online-dpo-gt", OnlineDPOParams(beta=0.1)),
])
def test_a_short_run_starts_at_the_reference_and_raises_the_score(policy, name, params):
    torch.manual_seed(0)
    # online DPO learns from the ranking alone (most pairs of an untrained model tie at 0 'good'): more steps
    steps = 24 if name.startswith("online-dpo") else 12
    ctx, logs, evaluations, rm = _context(policy, name, params, steps=steps)
    ALGORITHMS.get(name).train(ctx)
    assert evaluations == [(0, False), (steps, True)]
    first, last = logs[0], logs[-1]
    # the first step's samples come from the untouched policy: the reference, so no KL yet
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    if name.startswith("online-dpo"):
        assert first["losses/dpo"] == pytest.approx(math.log(2.0), abs=1e-5)  # DPO at the reference
        # 2 samples per prompt, each scored once (the gold variant asks the reward model nothing)
        assert rm.calls == (0 if name.endswith("-gt") else 2 * 8 * steps)
    early = np.mean([m["objective/score"] for m in logs[:3]])
    late = np.mean([m["objective/score"] for m in logs[-3:]])
    assert late > early + 0.2, (early, late)
    assert last["objective/kl"] > 0  # it moved away from the reference to get there


def test_rollouts_are_k_samples_per_prompt_seeded_by_global_position(policy):
    """Rank 1 of 2 draws exactly the samples that one worker draws for the second half of the batch."""
    from algorithms.online import rollout

    prompts = ["the movie was", "the plot was", "overall it was", "the acting was"] * 4
    ctx, *_ = _context(policy, "rloo", RLOOParams(), steps=1)
    whole = rollout(ctx, prompts, k=3, temperature=1.0, chunk=4, it=2, name="rloo")
    assert whole.prompt_index.tolist() == np.repeat(np.arange(16), 3).tolist()
    assert whole.prompts[:3] == [prompts[0]] * 3
    ctx.rank, ctx.world_size = 1, 2
    half = rollout(ctx, prompts[8:], k=3, temperature=1.0, chunk=4, it=2, name="rloo")
    assert half.completion_ids == whole.completion_ids[24:]
    with pytest.raises(ValueError, match="rollout_chunk 5 must divide"):
        rollout(ctx, prompts[8:], k=3, temperature=1.0, chunk=5, it=2, name="rloo")


def test_every_in_tree_algorithm_has_the_family_its_needs_say():
    """The report's online-vs-offline view groups by `family`, read off needs and trains_policy."""
    from algorithms.interface import FAMILIES, family

    got = {name: family(ALGORITHMS.get(name)) for name in ALGORITHMS.names()}
    assert set(got.values()) <= set(FAMILIES)
    in_tree = {n: f for n, f in got.items() if ALGORITHMS.origin(n).startswith("in-tree")}  # no plugins
    assert in_tree == {
        "sft": "reference", "best-of-n": "sampling",
        **{n: "offline pairs" for n in ("dpo", "ipo", "simpo", "preferred-ft", "unlikelihood")},
        **{n: "on-policy, reward model" for n in ("ppo", "online-dpo", "rloo", "grpo", "reinforce-pp")},
        **{n: "on-policy, gold" for n in ("ppo-gt", "online-dpo-gt")},
    }


def test_query_count_counts_training_samples_only_and_resumes():
    """bench's count of reward-model and gold queries: every sample scored through the context, but
    none inside a paused section (the evaluator, a cached computation); a checkpoint's counts resume."""
    from bench.worker.trial import CountedScorer, QueryCount

    class Scorer:
        tokenizer = "tok"

        def score(self, prompts, completions, ended=None):
            return np.zeros(len(completions))

    count = QueryCount()
    rm = CountedScorer(Scorer(), count)
    gold = count.counted_gold(lambda prompts, completions: np.ones(len(completions)))
    assert rm.score(["a", "b"], ["x", "y"], ended=np.ones(2, bool)).shape == (2,) and rm.tokenizer == "tok"
    gold(["a"] * 3, ["x"] * 3)
    with count.paused():
        rm.score(["a"] * 5, ["x"] * 5)
        with count.paused():
            gold(["a"], ["x"])
        gold(["a"], ["x"])
    rm.score(["a"], ["x"])
    assert count.counts == {"reward_model": 3, "gold": 3}
    assert QueryCount(dict(count.counts)).counts == {"reward_model": 3, "gold": 3}
