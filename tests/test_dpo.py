"""DPO: the loss against hand-computed numbers, and a few real optimisation steps."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from algorithms.dpo import DPO, DPOParams, dpo_loss
from algorithms.interface import EnvData, ParamError, TrainContext, TrainSettings, plain_optimizer


def test_dpo_loss_and_gradient_match_hand_numbers():
    # pair 1: log-ratios +0.5 (chosen) and -0.5 (rejected), beta 0.5 → z = 0.5
    # pair 2: equal log-ratios → z = 0 → loss ln 2
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -4.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0])
    rr = torch.tensor([-1.5, -3.0])
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log(2.0)], abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.25, -0.5])
    assert rejected_r.tolist() == pytest.approx([-0.25, -0.5])
    losses.sum().backward()
    # dL/d logπ(y_w) = -β (1 - σ(z)); dL/d logπ(y_l) = +β (1 - σ(z))
    g1 = 0.5 * (1 - 1 / (1 + math.exp(-0.5)))
    assert pc.grad.tolist() == pytest.approx([-g1, -0.25], abs=1e-6)
    assert pr.grad.tolist() == pytest.approx([g1, 0.25], abs=1e-6)


def test_dpo_loss_is_symmetric_in_beta_scaling():
    # doubling beta with half the log-ratio margin gives the same loss
    a = dpo_loss(torch.tensor([0.4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)[0]
    b = dpo_loss(torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=2.0)[0]
    assert float(a) == pytest.approx(float(b))


def test_beta_must_be_positive():
    with pytest.raises(ParamError, match="beta"):
        DPOParams(beta=0.0)


def test_dpo_training_raises_chosen_over_rejected(policy):
    pairs = pd.DataFrame({
        "prompt": ["the movie was", "i loved the", "the plot was", "overall it was"] * 4,
        "chosen": ["very good .", "film . ten out of ten .", "great .", "wonderful ."] * 4,
        "rejected": ["very bad .", "film . one out of ten .", "awful .", "boring ."] * 4,
    })
    reference = policy.frozen_copy()
    train = TrainSettings(steps=30, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=1000)
    evaluations = []
    logs = []
    ctx = TrainContext(
        policy=policy, reference=reference, params=DPOParams(beta=0.5), train=train,
        data=EnvData(train_prompts=[], eval_prompts=[], pairs=pairs, references=pd.DataFrame()),
        optimize=plain_optimizer(policy, train=train),
        evaluate=lambda sampler, step, final=False: evaluations.append((step, final)) or {},
        log=lambda step, m: logs.append(m),
    )
    DPO().train(ctx)
    assert evaluations == [(0, False), (30, True)]
    assert logs[0]["losses/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert logs[-1]["losses/dpo"] < 0.3
    assert logs[-1]["rewards/accuracy"] == 1.0
    # the reference never moved
    for p, q in zip(policy.model.parameters(), reference.model.parameters()):
        assert not q.requires_grad
    assert any(not torch.equal(p, q) for p, q in zip(policy.model.parameters(), reference.model.parameters()))


def test_reference_logps_of_the_pairs_are_computed_once_and_read_back_exactly(policy):
    """Every pair trial of an env shares one computation of log π_ref over all the env's pairs
    (ctx.cache, as bench keeps it: JSON), and what is read back equals what was computed, bit for bit."""
    import json

    from algorithms.pairs import EncodedPairs, reference_logps

    pairs = pd.DataFrame({"prompt": ["the movie was", "i loved the", "the plot was"],
                          "chosen": ["very good .", "film .", "great ."],
                          "rejected": ["very bad .", "music .", "awful ."], "rejected_ended": [True, False, True]})
    reference = policy.frozen_copy()
    store, computed = {}, []

    def cache(key, compute):  # bench's ctx.cache in miniature: a JSON file per key
        if key not in store:
            computed.append(key)
            store[key] = json.dumps(compute())
        return json.loads(store[key])

    train = TrainSettings(steps=1, batch_size=2)
    ctx = TrainContext(policy=policy, reference=reference, params=DPOParams(), train=train,
                       data=EnvData([], [], pairs, pd.DataFrame()), optimize=None, evaluate=None, cache=cache)
    enc = EncodedPairs.encode(policy, pairs, "dpo")
    first = reference_logps(ctx, enc)
    again = reference_logps(ctx, enc)
    assert len(computed) == 1  # the second trial reads the first's
    direct = (reference.sequence_logps_batched(enc.prompt_ids, enc.chosen_ids),
              reference.sequence_logps_batched(enc.prompt_ids, enc.rejected_ids))
    for got, back, want in zip(first, again, direct):
        assert torch.equal(got, want) and torch.equal(back, want)  # every pair, exact after the JSON round trip
    # another encoding of the same texts (the missing EOS of rejected 1) is another entry
    other = EncodedPairs.encode(policy, pairs.drop(columns="rejected_ended"), "dpo")
    reference_logps(ctx, other)
    assert len(computed) == 2
