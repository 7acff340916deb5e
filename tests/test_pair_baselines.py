"""IPO, SimPO, Unlikelihood and Preferred-FT: losses against hand numbers, params, registration, and a few
real optimisation steps each on the tiny model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from algorithms import ALGORITHMS
from algorithms.interface import EnvData, ParamError, TrainContext, TrainSettings, params_from_dict, plain_optimizer
from algorithms.ipo import IPO, IPOParams, ipo_loss
from algorithms.preferred_ft import PreferredFT, PreferredFTParams, preferred_examples
from algorithms.simpo import SimPO, SimPOParams, simpo_loss
from algorithms.unlikelihood import Unlikelihood, UnlikelihoodParams, log1mexp, unlikelihood_loss

LN2 = math.log(2.0)

PAIRS = pd.DataFrame({
    "prompt": ["the movie was", "i loved the", "the plot was", "overall it was"] * 4,
    "chosen": ["very good .", "film . ten out of ten .", "great .", "wonderful ."] * 4,
    "rejected": ["very bad .", "film . one out of ten .", "awful .", "boring ."] * 4,
})


def make_ctx(policy, params, pairs=PAIRS, steps=20, lr=3e-3):
    """A TrainContext built by hand, recording evaluate calls and logged metrics."""
    train = TrainSettings(steps=steps, batch_size=8, lr=lr, warmup_steps=0, eval_every=1000)
    evaluations, logs = [], []
    ctx = TrainContext(
        policy=policy, reference=policy.frozen_copy(), params=params, train=train,
        data=EnvData(train_prompts=[], eval_prompts=[], pairs=pairs, references=pd.DataFrame()),
        optimize=plain_optimizer(policy, train=train),
        evaluate=lambda sampler, step, final=False: evaluations.append((step, final)) or {},
        log=lambda step, m: logs.append(m),
    )
    return ctx, evaluations, logs


def mean_logp(policy, column: str) -> float:
    """Mean sequence log-prob (nats) of PAIRS[column] given the prompts, without grads."""
    return float(policy.sequence_logps_batched(
        policy.encode_prompts(PAIRS["prompt"].tolist()), policy.encode_completions(PAIRS[column].tolist())
    ).mean())


# ------------------------------------------------------------------------------------ IPO
def test_ipo_loss_is_zero_at_the_target_margin():
    # log-ratios +1 (chosen) and 0 (rejected): h = 1 = 1/(2·0.5)
    losses, chosen_r, rejected_r = ipo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5
    )
    assert losses.tolist() == pytest.approx([0.0], abs=1e-7)
    assert chosen_r.tolist() == pytest.approx([0.5])
    assert rejected_r.tolist() == pytest.approx([0.0])


def test_ipo_loss_and_gradient_match_hand_numbers():
    # log-ratios +0.5 (chosen: -1.0 vs -1.5) and -1.0 (rejected: -2.0 vs -1.0): h = 1.5;
    # beta 0.25 → target 1/(2β) = 2 → loss (1.5 - 2)² = 0.25; dL/dh = 2(h - 2) = -1
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, chosen_r, rejected_r = ipo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.0]), beta=0.25)
    assert losses.tolist() == pytest.approx([0.25])
    assert chosen_r.tolist() == pytest.approx([0.125])  # 0.25 · 0.5
    assert rejected_r.tolist() == pytest.approx([-0.25])  # 0.25 · -1
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-1.0])  # raise the chosen: h is below its target
    assert pr.grad.tolist() == pytest.approx([1.0])
    # past the target the gradient flips: IPO pulls an overshooting margin back, DPO never does
    pc2 = torch.tensor([1.0], requires_grad=True)  # chosen log-ratio 2.5, h = 3.5 > 2
    ipo_loss(pc2, pr.detach(), torch.tensor([-1.5]), torch.tensor([-1.0]), beta=0.25)[0].sum().backward()
    assert pc2.grad.tolist() == pytest.approx([3.0])  # 2 (3.5 - 2)


def test_ipo_params_reject_bad_values():
    for bad in (0.0, -0.1):
        with pytest.raises(ParamError, match="beta"):
            IPOParams(beta=bad)
    with pytest.raises(ParamError, match="average_logps"):
        IPOParams(average_logps="yes")


@pytest.mark.parametrize("average_logps", [True, False])
def test_ipo_first_step_sees_zero_margin(policy, average_logps):
    # policy == reference at step 0, so h = 0 and the loss is (1/(2β))² exactly; with average_logps
    # this holds only if the reference is divided by the same lengths the policy's mask counts
    ctx, _, logs = make_ctx(policy, IPOParams(beta=0.25, average_logps=average_logps), steps=1)
    IPO().train(ctx)
    assert logs[0]["logratios/margin"] == pytest.approx(0.0, abs=1e-5)
    assert logs[0]["losses/ipo"] == pytest.approx(4.0, abs=1e-4)


def test_ipo_training_moves_the_margin_to_its_target(policy):
    ctx, evaluations, logs = make_ctx(policy, IPOParams(beta=0.5), steps=30)  # target h = 1 nat/token
    IPO().train(ctx)
    assert evaluations == [(0, False), (30, True)]
    assert logs[0]["losses/ipo"] == pytest.approx(1.0, abs=1e-4)  # h = 0 at step 0
    assert logs[-1]["losses/ipo"] < 0.1
    assert logs[-1]["logratios/margin"] == pytest.approx(1.0, abs=0.3)
    assert logs[-1]["optim/lr"] == pytest.approx(3e-3)


# ------------------------------------------------------------------------------ Unlikelihood
def test_log1mexp_is_accurate_and_finite():
    for x in (-1e-5, -0.1, -LN2, -1.0, -10.0, -50.0):
        assert float(log1mexp(torch.tensor(x, dtype=torch.float64))) == pytest.approx(
            math.log(-math.expm1(x)), rel=1e-6
        )
    x = torch.tensor([0.0, -1e-9], requires_grad=True)  # p = 1: capped at log(1e-6), not -inf
    y = log1mexp(x)
    assert y.tolist() == pytest.approx([math.log(1e-6)] * 2, rel=1e-3)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unlikelihood_loss_and_gradient_match_hand_numbers():
    # row 0: chosen probs 0.5, 0.25 → nll (ln 2 + ln 4)/2 = 1.5 ln 2; rejected prob 0.5 + padding
    #        → ul -ln(1 - 0.5) = ln 2; alpha 2 → loss 1.5 ln 2 + 2 ln 2 = 3.5 ln 2
    # row 1: chosen prob 0.5 + padding → nll ln 2; rejected probs 0.75, 0.5 →
    #        ul -(ln 0.25 + ln 0.5)/2 = 1.5 ln 2; alpha 2 → loss ln 2 + 3 ln 2 = 4 ln 2
    lc = torch.log(torch.tensor([[0.5, 0.25], [0.5, 1.0]])).requires_grad_()
    mc = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # padding carries log p = 0 (p = 1), as Policy.token_logps returns it: must be masked, not -inf
    lr = torch.log(torch.tensor([[0.5, 1.0], [0.75, 0.5]])).requires_grad_()
    mr = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    losses, nll, ul = unlikelihood_loss(lc, mc, lr, mr, alpha=2.0)
    assert losses.tolist() == pytest.approx([3.5 * LN2, 4 * LN2], rel=1e-5)
    assert nll.tolist() == pytest.approx([1.5 * LN2, LN2], rel=1e-5)
    assert ul.tolist() == pytest.approx([LN2, 1.5 * LN2], rel=1e-5)
    losses.sum().backward()
    # d nll / d log p = -1/|y_w|;  d ul / d log p = p/(1 - p) / |y_l|, times alpha 2
    torch.testing.assert_close(lc.grad, torch.tensor([[-0.5, -0.5], [-1.0, 0.0]]))
    torch.testing.assert_close(lr.grad, torch.tensor([[2.0, 0.0], [3.0, 1.0]]))


def test_unlikelihood_params_reject_bad_values():
    with pytest.raises(ParamError, match="alpha"):
        UnlikelihoodParams(alpha=-0.5)
    UnlikelihoodParams(alpha=0.0)  # 0 is allowed: likelihood on chosen only


def test_unlikelihood_training_lowers_the_rejected(policy):
    # -log(1 - p) ≈ p: the unlikelihood term only bites on tokens the policy finds likely, so first
    # make a policy that prefers the rejected (Preferred-FT on the flipped pairs, as an SFT model
    # trained on both would), then check that unlikelihood pushes them back down
    flipped = PAIRS.rename(columns={"chosen": "rejected", "rejected": "chosen"})
    PreferredFT().train(make_ctx(policy, PreferredFTParams(), pairs=flipped, steps=10, lr=1e-2)[0])
    rejected_before, chosen_before = mean_logp(policy, "rejected"), mean_logp(policy, "chosen")
    assert rejected_before > chosen_before
    ctx, evaluations, logs = make_ctx(policy, UnlikelihoodParams(alpha=1.0), steps=10)
    Unlikelihood().train(ctx)
    assert evaluations == [(0, False), (10, True)]
    assert mean_logp(policy, "rejected") < rejected_before - 3.0  # about -7 to -14 nats on this seed
    assert mean_logp(policy, "chosen") > chosen_before
    assert logs[-1]["losses/ul_rejected"] < logs[0]["losses/ul_rejected"]


# ------------------------------------------------------------------------------ Preferred-FT
def test_preferred_examples_counts_each_chosen_once():
    pairs = pd.DataFrame({
        "prompt": ["a", "a", "a", "b", "b"],
        "chosen": ["x", "x", "y", "x", "x"],
        "rejected": ["r1", "r2", "r3", "r1", "r2"],
    })
    ex = preferred_examples(pairs)
    assert list(zip(ex["prompt"], ex["chosen"])) == [("a", "x"), ("a", "y"), ("b", "x")]
    assert list(ex.index) == [0, 1, 2]


def test_preferred_ft_params_take_no_values():
    with pytest.raises(ParamError, match="beta"):
        params_from_dict(PreferredFTParams, {"beta": 0.1})


def test_preferred_ft_training_raises_the_chosen(policy):
    chosen_before = mean_logp(policy, "chosen")
    ctx, evaluations, logs = make_ctx(policy, PreferredFTParams(), steps=20)
    PreferredFT().train(ctx)
    assert evaluations == [(0, False), (20, True)]
    assert mean_logp(policy, "chosen") > chosen_before + 1.0
    assert logs[-1]["losses/preferred_ft"] < logs[0]["losses/preferred_ft"]


# ---------------------------------------------------------------------------------- SimPO
def test_simpo_loss_and_gradient_match_hand_numbers():
    # average log-probs -1.0 (chosen) and -1.5 (rejected), beta 2, gamma 0.5: z = 2·0.5 − 0.5 = 0.5
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.5], requires_grad=True)
    losses, chosen_r, rejected_r = simpo_loss(pc, pr, beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5))])
    assert chosen_r.tolist() == pytest.approx([-2.0]) and rejected_r.tolist() == pytest.approx([-3.0])
    losses.sum().backward()
    # dL/dz = −σ(−z); dz/dpc = β, dz/dpr = −β
    assert pc.grad.item() == pytest.approx(-2.0 / (1.0 + math.exp(0.5)))
    assert pr.grad.item() == pytest.approx(2.0 / (1.0 + math.exp(0.5)))


def test_simpo_loss_is_trls_cpo_simpo_formula():
    """TRL's CPOTrainer, loss_type="simpo" (label_smoothing 0): logits = (chosen − rejected) − γ/β,
    losses = −logsigmoid(β · logits), on length-averaged log-probs."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -3 * torch.rand(16, generator=g), -3 * torch.rand(16, generator=g)
    for beta, gamma in ((2.0, 0.5), (0.5, 1.0), (2.5, 1.375)):
        trl = -F.logsigmoid(beta * ((chosen - rejected) - gamma / beta))
        torch.testing.assert_close(simpo_loss(chosen, rejected, beta, gamma)[0], trl)


def test_simpo_params_reject_bad_values():
    assert SimPOParams().beta == 2.0 and SimPOParams().gamma == 0.5
    for bad in ({"beta": 0.0}, {"beta": -1.0}, {"gamma": -0.1}):
        with pytest.raises(ParamError, match=next(iter(bad))):
            params_from_dict(SimPOParams, bad)


def test_simpo_trains_without_the_reference_and_raises_the_chosen(policy):
    """SimPO's first loss is −logσ(β·Δ − γ) of the policy's own average log-probs; the reference is
    never scored (no reference log-probs), and training puts the chosen ahead of the rejected."""
    params = SimPOParams(beta=2.0, gamma=0.5)
    ctx, evaluations, logs = make_ctx(policy, params, steps=25)
    scored = []
    ctx.reference.sequence_logps_batched = lambda *a, **k: scored.append(1)
    ctx.reference.token_logps = lambda *a, **k: scored.append(1)
    first_batch = PAIRS.iloc[ctx.batch_indices(0, len(PAIRS))]
    enc_p = policy.encode_prompts(first_batch["prompt"].tolist())
    with torch.no_grad():
        c_logps, c_mask = policy.token_logps(enc_p, policy.encode_completions(first_batch["chosen"].tolist()))
        r_logps, r_mask = policy.token_logps(enc_p, policy.encode_completions(first_batch["rejected"].tolist()))
    delta = (c_logps * c_mask).sum(-1) / c_mask.sum(-1) - (r_logps * r_mask).sum(-1) / r_mask.sum(-1)  # (B,) nats/token
    SimPO().train(ctx)
    assert not scored
    assert evaluations[-1] == (25, True)
    first = logs[0]
    assert first["rewards/margin"] == pytest.approx(2.0 * float(delta.mean()), abs=1e-4)
    assert first["losses/simpo"] == pytest.approx(float(-F.logsigmoid(2.0 * delta - 0.5).mean()), abs=1e-4)
    assert logs[-1]["rewards/margin"] > first["rewards/margin"] + 1.0
    assert logs[-1]["losses/simpo"] < first["losses/simpo"]


# --------------------------------------------------------------------------------- all of them
@pytest.mark.parametrize(
    "name, knob, algorithm",
    [("ipo", "beta", IPO), ("simpo", "beta", SimPO), ("unlikelihood", "alpha", Unlikelihood),
     ("preferred-ft", None, PreferredFT)],
)
def test_registered_with_knob_and_needs(name, knob, algorithm):
    algo = ALGORITHMS.get(name)
    assert isinstance(algo, algorithm)
    assert algo.knob == knob
    assert algo.needs == frozenset({"pairs"})
    assert algo.trains_policy is True
    if knob is not None:
        assert knob in algo.params_cls.__dataclass_fields__


@pytest.mark.parametrize("algorithm, params", [(IPO, IPOParams()), (SimPO, SimPOParams()), (Unlikelihood, UnlikelihoodParams()),
                                               (PreferredFT, PreferredFTParams())])
def test_no_pairs_is_a_clear_error(policy, algorithm, params):
    empty = pd.DataFrame({"prompt": [], "chosen": [], "rejected": []})
    ctx, evaluations, _ = make_ctx(policy, params, pairs=empty)
    with pytest.raises(ValueError, match="needs preference pairs"):
        algorithm().train(ctx)
    assert evaluations == []
