"""train.micro_batch_size: every in-tree trainable algorithm takes the same optimizer steps with and
without gradient accumulation. A step's micro-batches' losses are parts that sum to the batch's loss,
so the logged losses and metrics, and the trained weights, match the one-forward run to 1e-5; here
with plain PyTorch (`plain_optimizer`), through DeepSpeed in tests/test_deepspeed.py, and on two
Ray Train workers with ZeRO-2/3 in tests/test_e2e.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from algorithms import ALGORITHMS
from algorithms.grpo import GRPOParams
from algorithms.interface import EnvData, ParamError, TrainContext, TrainSettings, plain_optimizer
from algorithms.ipo import IPOParams
from algorithms.online_dpo import OnlineDPOParams
from algorithms.policy import Policy
from algorithms.ppo import PPOParams
from algorithms.reinforce_pp import ReinforcePPParams
from algorithms.reward_model import ScalarModel
from algorithms.rloo import RLOOParams

PAIRS = pd.DataFrame({
    "prompt": ["the movie was", "i loved the", "the plot was", "overall it was", "the acting was", "it was"],
    "chosen": ["very good .", "film so much .", "great .", "wonderful and good .", "fine .", "good"],
    "rejected": ["very bad .", "music .", "awful and slow .", "boring .", "bad , bad .", "a waste of time ."],
})
PROMPTS = ["the movie was", "the plot was", "overall it was", "the acting was", "i loved the", "it was"]


class WordRM:
    """A stand-in learned reward: +1 per 'good' in the completion, a little per character."""

    def score(self, prompts, completions, ended=None, batch_size=512):
        return np.array([c.split().count("good") + 0.01 * len(c) for c in completions], dtype=float)


# (algorithm, params): every in-tree algorithm that trains the policy; several epochs and minibatches
# where the algorithm has them (π_old kept per micro-batch), both PPO loss aggregations
CASES = [
    ("dpo", None), ("ipo", IPOParams(beta=0.5)), ("ipo", IPOParams(beta=0.5, average_logps=False)),
    ("simpo", None), ("unlikelihood", None), ("preferred-ft", None),
    ("online-dpo", OnlineDPOParams(beta=0.5)), ("online-dpo-gt", OnlineDPOParams(beta=0.5)),
    ("rloo", RLOOParams(kl_coef=0.1, k=3)), ("grpo", GRPOParams(kl_coef=0.1, group_size=3, epochs=2)),
    ("reinforce-pp", ReinforcePPParams(kl_coef=0.1, k=2, epochs=2)),
    ("ppo", PPOParams(kl_coef=0.1, ppo_epochs=2, num_minibatches=2)),
    ("ppo", PPOParams(kl_coef=0.1, ppo_epochs=1, loss_aggregation="sequence_mean", kl_placement="loss",
                    kl_estimator="k3")),
    ("ppo-gt", PPOParams(kl_coef=0.1, ppo_epochs=1)),
]


def _run(init_dir, name: str, params, micro_batch_size: int) -> tuple[list[dict], list[torch.Tensor], dict]:
    """The run's training log, the gradient of each optimizer step (all trainables, flattened, as
    the optimizer saw it: accumulated and clipped) and the trained policy's weights."""
    torch.manual_seed(0)
    policy = Policy.from_pretrained(init_dir)
    algo = ALGORITHMS.get(name)
    train = TrainSettings(steps=3, batch_size=6, lr=1e-3, warmup_steps=0, eval_every=1000,
                          micro_batch_size=micro_batch_size)
    critic = ScalarModel.from_pretrained(init_dir, zero_head=True) if "critic" in algo.needs else None
    logs: list[dict] = []
    ctx = TrainContext(
        policy=policy, reference=policy.frozen_copy(), params=params or algo.params_cls(), train=train,
        data=EnvData(train_prompts=PROMPTS, eval_prompts=[], pairs=PAIRS, references=pd.DataFrame()),
        optimize=plain_optimizer(*([policy] + ([critic] if critic else [])), train=train),
        evaluate=lambda sampler, step, final=False: {}, log=lambda step, m: logs.append(m),
        reward_model=WordRM(), gold=lambda p, c: np.array([x.split().count("good") / 4 for x in c]),
        critic=critic, max_new_tokens=5,
        cache=lambda key, compute: {"mean": 0.2, "std": 0.5} if key.startswith("ppo-reward-stats") else compute(),
    )
    grads: list[torch.Tensor] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: grads.append(torch.cat(
        [p.grad.flatten() for group in opt.param_groups for p in group["params"] if p.grad is not None])))
    try:
        algo.train(ctx)
    finally:
        hook.remove()
    return logs, grads, {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_micro_batches_take_the_steps_of_one_forward(tiny_env_dir, name, params):
    whole_logs, whole_grads, whole = _run(tiny_env_dir / "init", name, params, micro_batch_size=0)
    # 6 items per step: micro-batches of 4 + 2 (uneven) and of 1
    for size in (4, 1):
        logs, grads, weights = _run(tiny_env_dir / "init", name, params, micro_batch_size=size)
        assert len(logs) == len(whole_logs) == 3 and len(grads) == len(whole_grads)  # the same optimizer steps
        for step, (a, b) in enumerate(zip(whole_logs, logs)):
            assert a.keys() == b.keys()
            for key in a:  # the losses to 1e-5; metrics such as the gradient norm of a later step to 1e-4
                tol = 1e-5 if key.startswith("losses/") or step == 0 else 1e-4
                assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (size, step, key)
        # the first step's accumulated gradient is the batch's (float32 summation order: ~1e-7 of the
        # largest); later steps start from weights that AdamW's noise (below) has moved a little
        for step, (a, b) in enumerate(zip(whole_grads, grads)):
            assert float((a - b).abs().max()) < (1e-5 if step == 0 else 1e-3) * float(a.abs().max()), (size, step)
        # AdamW divides by sqrt(v): a near-zero gradient's float noise moves its weight by up to ~lr / 10
        assert max(float((weights[k] - whole[k]).abs().max()) for k in whole) < 2e-4, size
    moved = max(float((whole[k] - Policy.from_pretrained(tiny_env_dir / "init").model.state_dict()[k]).abs().max())
                for k in whole)
    assert moved > 1e-3  # the steps did train: the comparison is not between two untouched models


def test_micro_batches_are_consecutive_positions_and_the_setting_is_checked():
    ctx = TrainContext(policy=None, reference=None, params=None, train=TrainSettings(micro_batch_size=4),
                       data=None, optimize=None, evaluate=None)
    assert [b.tolist() for b in ctx.micro_batches(10)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in ctx.micro_batches(3)] == [[0, 1, 2]]
    ctx.train = TrainSettings(micro_batch_size=0)
    assert [b.tolist() for b in ctx.micro_batches(5)] == [[0, 1, 2, 3, 4]]
    with pytest.raises(ParamError, match="micro_batch_size"):
        TrainSettings(micro_batch_size=-1)


def test_optimize_batch_accumulates_then_steps_once():
    calls: list[tuple[float, bool]] = []
    ctx = TrainContext(policy=None, reference=None, params=None, train=TrainSettings(micro_batch_size=2), data=None,
                       optimize=lambda loss, accumulate=False: calls.append((float(loss), accumulate)) or {"lr": 1.0},
                       evaluate=None)
    loss, values, opt = ctx.optimize_batch(5, lambda pos: (torch.tensor(float(pos.sum())), {"x": torch.tensor(pos)}))
    assert calls == [(1.0, True), (5.0, True), (4.0, False)] and loss == 10.0 and opt == {"lr": 1.0}
    assert values["x"].tolist() == [0, 1, 2, 3, 4]
