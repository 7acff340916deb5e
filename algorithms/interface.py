"""The contract between prefbench and an algorithm (plain PyTorch, no Ray).

An algorithm is an object with these members (a Protocol: no base class, no inherited code):

- `name: str`: the registry name used in suite files (`dpo`).
- `params_cls`: a dataclass of the algorithm's own hyper-parameters, every field with a default;
  its `__post_init__` validates and raises `ParamError(field, message)` for a bad value.
- `knob: str | None`: the field of `params_cls` that moves the algorithm along its reward-vs-KL
  frontier (DPO: `beta`; PPO: `kl_coef`; best-of-N: `n`); None for a single point (SFT).
- `needs: frozenset[str]`: what it consumes from the env, a subset of NEEDS.
- `trains_policy: bool`: True when `train` updates `ctx.policy` (bench then wraps it in a
  DeepSpeed engine and `ctx.optimize` steps it); False for samplers such as best-of-N.
- `train(ctx: TrainContext) -> dict | None`: runs the algorithm. It takes each optimizer step with
  `ctx.optimize_batch(n, loss_of)` (the step's n items in micro-batches of
  `train.micro_batch_size`, gradients accumulated into one step) or `ctx.optimize(loss)` (one
  forward for the whole batch), `ctx.log(step, metrics)` for training curves (scalar metrics, averaged over
  ranks), and `ctx.evaluate(sampler, step)` at every `ctx.should_evaluate(step)` and once with
  `final=True` at the end. Every rank makes the same calls in the same order (they synchronise the
  ranks). It returns an optional dict of summary metrics for the trial row. A trial restarted from
  a checkpoint gets `ctx.start_step` > 0 and its saved `ctx.state`: the loop starts there.

Units: log-probs and KL in nats per sequence; rewards are floats per completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

import numpy as np
import pandas as pd
import torch

from algorithms.policy import Policy

# what an algorithm can ask of bench: the env's preference pairs, its train prompts, the shared
# learned reward model, the env's gold reward (PPO-GT only: never for a "fair" method), and a
# critic (a scalar-head model trained with the policy in the same DeepSpeed engine)
NEEDS = frozenset({"pairs", "prompts", "reward_model", "gold", "critic"})


class ParamError(ValueError):
    """A bad parameter value: `field` names it, the message says what is allowed."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ParamError(field_name, message)


class NonFiniteError(FloatingPointError):
    """NaN or inf in a loss, a reward or a KL: the trial stops, and str() is the reason bench records
    in trials.parquet (one line). Raised by bench's guards (every loss given to `ctx.optimize`, every
    logged `losses/`, `rewards/`, `objective/` and `policy/` metric, every evaluation) and by
    algorithms where a reward or KL first appears (PPO's rollout scores and per-token KL)."""


def require_finite(what: str, values: Any) -> None:
    """Raise NonFiniteError naming `what` when `values` (a number, array or tensor) holds NaN or inf."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        kinds = sorted({"nan" if np.isnan(v) else ("inf" if v > 0 else "-inf") for v in arr[bad].ravel()})
        where = "" if arr.ndim == 0 else f" ({int(bad.sum())} of {arr.size} values)"
        raise NonFiniteError(f"{what} is {'/'.join(kinds)}{where}")


@dataclass
class TrainSettings:
    """Optimisation settings shared by every trainable algorithm of a suite (equal terms)."""

    steps: int = 150  # optimizer steps per trial
    batch_size: int = 32  # global examples (pairs or prompts) per optimizer step, all workers together
    lr: float = 1e-4  # peak learning rate of AdamW
    warmup_steps: int = 20  # linear warm-up from 0 to lr, then constant (the DPO paper's schedule)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 disables
    eval_every: int = 50  # evaluate at T = 1 every this many steps (and always at the end)
    # items (pairs, or prompts with their samples) per forward on each rank; 0: the whole per-rank
    # batch in one. The micro-batches' gradients accumulate into the same optimizer step.
    micro_batch_size: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.steps, int) and self.steps >= 1, "steps", "must be an integer >= 1")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(isinstance(self.eval_every, int) and self.eval_every >= 1, "eval_every", "must be an integer >= 1")
        check(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0, "micro_batch_size",
              "must be an integer >= 0 (0: the whole per-rank batch in one forward)")


@dataclass
class EnvData:
    """What an env hands to algorithms; all text, so any tokenizer can consume it."""

    train_prompts: list[str]
    eval_prompts: list[str]
    pairs: pd.DataFrame  # columns prompt, chosen, rejected (+ chosen_gold, rejected_gold where known)
    references: pd.DataFrame  # eval prompt, completion, gold: the baseline that win rates compare to


@dataclass
class TrainContext:
    """Everything `Algorithm.train` receives. Built by bench; built by hand in tests.

    `cache(key, compute) -> dict`: a value computed once and reused by later trials, e.g. PPO's
    reward statistics of reference samples. bench keeps it as JSON in the env's work dir, scoped to
    the env (name, params, seed: its SFT reference and data) and to the trial's reward model (when it
    has one); `key` must name everything else the value depends on (sample count, temperature,
    max_new_tokens, seed, ...). On a miss every rank calls `compute()` (it may use collectives) and
    every rank gets rank 0's value; like `log`, every rank calls `cache` with the same keys in the
    same order. `compute` returns a JSON-serialisable dict. Default (tests): no cache, `compute()`.
    """

    policy: Policy  # trainable; forward passes go through its DeepSpeed engine when bench set one
    reference: Policy  # frozen SFT policy
    params: Any  # the algorithm's params_cls instance
    train: TrainSettings
    data: EnvData
    # optimize(loss, accumulate=False): backward + clip + step + lr schedule, returns {"lr", "grad_norm"};
    # with accumulate=True backward only (the gradient adds to the step's), returns {}
    optimize: Callable[..., dict]
    evaluate: Callable[..., dict]  # evaluate(sampler, step, *, final=False) -> metrics at T = 1
    log: Callable[[int, dict], None] = lambda step, metrics: None
    gold: Callable[[list[str], list[str]], np.ndarray] | None = None  # only for needs={"gold"}
    # a frozen algorithms.reward_model.ScalarModel, only for needs={"reward_model"}; bench hands a view of it
    # that counts the samples given to `score` (trials.parquet rm_queries; gold is counted likewise)
    reward_model: Any = None
    critic: Any = None  # a trainable ScalarModel optimised by ctx.optimize with the policy, only for needs={"critic"}
    max_new_tokens: int = 32  # completion cap of the suite's evaluation; on-policy rollouts use it too
    mean_over_ranks: Callable[[dict], dict] = lambda metrics: metrics  # average scalars over ranks (identity at 1)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    # resuming: optimizer steps already taken (policy, optimizer and schedule restored by bench);
    # a training loop runs `for step in range(ctx.start_step, ctx.train.steps)`
    start_step: int = 0
    # the algorithm's own state across steps (JSON-serialisable scalars, e.g. an adaptive KL
    # coefficient): bench saves it with every checkpoint and hands it back on resume
    state: dict = field(default_factory=dict)
    cache: Callable[[str, Callable[[], dict]], dict] = lambda key, compute: compute()  # see the docstring

    def should_evaluate(self, step: int) -> bool:
        return step % self.train.eval_every == 0 and step < self.train.steps

    def micro_batches(self, n: int) -> list[np.ndarray]:
        """Positions 0..n-1 of this rank's batch, in consecutive micro-batches of
        `train.micro_batch_size` (one micro-batch when it is 0 or >= n)."""
        size = self.train.micro_batch_size or n
        return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]

    def optimize_batch(self, n: int, loss_of: Callable[[np.ndarray], tuple[torch.Tensor, dict]]
                       ) -> tuple[float, dict[str, torch.Tensor], dict]:
        """One optimizer step over this rank's `n` items, a forward and backward per micro-batch.

        `loss_of(positions)` runs the forward of those items and returns (part, values): `part` is
        their share of the batch's loss (the parts of all micro-batches sum to the loss of the whole
        batch: a mean over items is `losses.sum() / n`, a token mean divides by the batch's token
        count), `values` per-item (or per-row) tensors for the training log. Returns (the batch's
        loss, each value concatenated over the micro-batches in position order, what the step's
        `optimize` returned). With micro_batch_size 0 it is one forward and `optimize(loss)`."""
        batches = self.micro_batches(n)
        loss, values, opt = 0.0, {}, {}
        for j, positions in enumerate(batches):
            part, vals = loss_of(positions)
            opt = self.optimize(part, accumulate=j < len(batches) - 1)
            loss += float(part.detach())
            for key, value in vals.items():
                values.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else value)
        return loss, {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else v for k, v in values.items()}, opt

    def batch_indices(self, step: int, n_items: int) -> np.ndarray:
        """This rank's slice of the global batch at `step` over a dataset of `n_items`.

        The global order is one seeded permutation per epoch, the same on every rank, so a run
        on W workers sees exactly the batches of a run on 1 worker (each rank a contiguous 1/W).
        """
        return rank_batch(
            step, batch_size=self.train.batch_size, rank=self.rank, world_size=self.world_size,
            n_items=n_items, seed=self.seed,
        )


def rank_batch(step: int, *, batch_size: int, rank: int, world_size: int, n_items: int, seed: int) -> np.ndarray:
    """Indices of rank `rank`'s contiguous 1/world_size of global batch `step` (see batch_indices)."""
    per_rank = batch_size // world_size
    start = step * batch_size + rank * per_rank
    idx = np.empty(per_rank, dtype=np.int64)
    for j, pos in enumerate(range(start, start + per_rank)):
        epoch, offset = divmod(pos, n_items)
        idx[j] = _epoch_permutation(seed, epoch, n_items)[offset]
    return idx


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMS:
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


class Algorithm(Protocol):
    name: str
    params_cls: type
    knob: str | None
    needs: frozenset[str]
    trains_policy: bool

    def train(self, ctx: TrainContext) -> dict | None: ...


# what kind of method an algorithm is, read off what it declares (the report's online-vs-offline view)
FAMILIES = ("reference", "offline pairs", "on-policy, reward model", "on-policy, gold", "sampling", "other")


def family(algo: Any) -> str:
    """The algorithm's family, from `needs` and `trains_policy` alone (so a plugin gets one too):
    trains on sampled prompts scored by the gold reward or by the learned reward model (PPO-GT and
    PPO, online DPO, RLOO, ...), trains on the env's preference pairs (DPO, IPO, SimPO, ...),
    samples from the reference and reranks by a scorer without training (best-of-n), or neither and
    needs nothing (the SFT reference itself)."""
    needs, trains = algo.needs, algo.trains_policy
    if trains and "prompts" in needs and "gold" in needs:
        return "on-policy, gold"
    if trains and "prompts" in needs and "reward_model" in needs:
        return "on-policy, reward model"
    if trains and "pairs" in needs:
        return "offline pairs"
    if not trains and needs & {"reward_model", "gold"}:
        return "sampling"
    if not trains and not needs:
        return "reference"
    return "other"


def params_from_dict(params_cls: type, values: dict) -> Any:
    """Build a params dataclass from a dict, rejecting unknown keys by name."""
    known = {f.name for f in fields(params_cls)}
    for key in values:
        if key not in known:
            raise ParamError(key, f"unknown parameter (known: {', '.join(sorted(known))})")
    return params_cls(**values)


def trainable_modules(*trainables: Any) -> list[torch.nn.Module]:
    """The torch modules behind Policy / ScalarModel objects (or modules themselves)."""
    return [t if isinstance(t, torch.nn.Module) else t.head if hasattr(t, "head") else t.model for t in trainables]


def plain_optimizer(*trainables: Any, train: TrainSettings) -> Callable[[torch.Tensor], dict]:
    """`ctx.optimize` without DeepSpeed: one AdamW + warm-up + clipping over every trainable (a
    Policy, a critic ScalarModel, ...), for use outside bench and in tests."""
    params = [p for m in trainable_modules(*trainables) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(train.warmup_steps))

    def optimize(loss: torch.Tensor, accumulate: bool = False) -> dict:
        loss.backward()  # adds to the gradients of the step's earlier micro-batches
        if accumulate:
            return {}
        norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm or float("inf"))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": float(norm)}

    opt.zero_grad(set_to_none=True)
    return optimize


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up multiplier for LambdaLR: step s → min(1, (s + 1) / warmup_steps)."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def contract_problems(algo: Any) -> list[str]:
    """What is wrong with `algo` as an Algorithm (empty when it keeps the contract); the registry
    refuses a plugin with problems and reports them in one line."""
    from algorithms.registry import dataclass_problems, name_problems

    problems = name_problems(getattr(algo, "name", None))
    params_cls = getattr(algo, "params_cls", None)
    cls_problems = dataclass_problems(params_cls)
    problems += cls_problems
    knob = getattr(algo, "knob", "<missing>")
    if knob == "<missing>":
        problems.append("no `knob` (the frontier parameter's name, or None)")
    elif knob is not None and not (isinstance(knob, str) and (cls_problems or knob in {f.name for f in fields(params_cls)})):
        problems.append(f"knob {knob!r} is not a field of params_cls")
    needs = getattr(algo, "needs", None)
    if not isinstance(needs, (set, frozenset)) or not needs <= NEEDS:
        problems.append(f"needs must be a subset of {{{', '.join(sorted(NEEDS))}}}, got {needs!r}")
    if not isinstance(getattr(algo, "trains_policy", None), bool):
        problems.append("trains_policy must be True or False")
    if not callable(getattr(algo, "train", None)):
        problems.append("no train(ctx) method")
    return problems
