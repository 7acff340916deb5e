"""What the on-policy algorithms share (PPO, RLOO, GRPO, REINFORCE++, online DPO): samples drawn
from the current policy inside `train`, the score of a sample, and the reference's score statistics.

- `rollout`: `k` samples per prompt of this rank's slice of the global batch, prompt-major, drawn
  from the policy at `temperature` in chunks of `chunk` prompts, each chunk seeded by its position
  in the GLOBAL batch, under `policy.gathered()` (ZeRO-3: the shards gathered once for all chunks).
  W workers therefore draw exactly the samples of 1 worker, and two algorithms draw the same
  samples at the same step and position from the same policy (common random numbers).
- `score`: the raw score of each sample: the env's gold reward (`reward="gold"`, the -GT variants)
  or the shared learned reward model, which sees a sample exactly as it was sampled (EOS appended
  only where the sample ended).
- `reference_score_stats`: the score's mean and std over one seeded reference sample per train prompt
  (a seeded subset), cached per env and reward model through `ctx.cache`, so that
  ŝ = (score − μ_ref) / σ_ref is in units of the reference's spread whatever the scorer's scale
  (a Bradley–Terry logit, a gold reward in [0, 1]) and a KL coefficient means the same against
  either scorer.
- `scored_rollout`: the two together for iteration `it` (this rank's prompts of the global batch);
  `normaliser`: (μ_ref, σ_ref), or (0, 1) when an algorithm's `reward_norm` is off.
- `clipped_surrogate`: the per-token clipped policy-gradient term of PPO-style objectives.
- `rows` / `no_grad_passes`: a micro-batch's rows (a prompt's k samples together) and a
  no-grad pass over a rollout in micro-batches (`train.micro_batch_size`), padded to one width.

Tokenisation of fresh samples is the policy's own (`Rollout.prompt_ids` / `completion_ids` are the
sampled ids, with EOS exactly where the sample stopped), so scoring them by teacher forcing
(`policy.token_logps(roll.prompt_ids, roll.completion_ids)`) needs no re-encoding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from algorithms.interface import TrainContext, check, require_finite
from algorithms.policy import Rollout


def rollout(ctx: TrainContext, prompts: list[str], *, k: int, temperature: float, chunk: int, it: int,
            name: str) -> Rollout:
    """`k` samples of each of this rank's `prompts` (prompt-major: prompt 0's k first), drawn
    `chunk` prompts per generation call, each call seeded by its position in the global batch of
    iteration `it` (see the module docstring). A `chunk` above the per-worker batch is the batch."""
    chunk = min(chunk, len(prompts))
    if len(prompts) % chunk:
        raise ValueError(f"{name}: rollout_chunk {chunk} must divide the per-worker batch "
                         f"{len(prompts)} (train.batch_size / scaling.num_workers)")
    first = ctx.rank * len(prompts)  # global position of this rank's first prompt
    with ctx.policy.gathered():  # ZeRO-3: gather the shards once for all chunks
        parts = [
            ctx.policy.generate(prompts[i : i + chunk], n=k, temperature=temperature, max_new_tokens=ctx.max_new_tokens,
                                seed=(ctx.seed * 1_000_003 + it) * 4096 + first + i)
            for i in range(0, len(prompts), chunk)
        ]
    return Rollout(
        prompts=[x for r in parts for x in r.prompts], prompt_index=np.repeat(np.arange(len(prompts)), k),
        completions=[x for r in parts for x in r.completions],
        prompt_ids=[x for r in parts for x in r.prompt_ids],
        completion_ids=[x for r in parts for x in r.completion_ids], temperature=temperature,
        ended=np.concatenate([r.ended for r in parts]),
    )


def train_prompts(ctx: TrainContext, name: str) -> list[str]:
    """The env's train prompts, or a clear error when it has none."""
    if not ctx.data.train_prompts:
        raise ValueError(f"{name} needs train prompts; the env produced none")
    return ctx.data.train_prompts


def scored_rollout(ctx: TrainContext, it: int, *, k: int, temperature: float, chunk: int, reward: str,
                   name: str) -> tuple[Rollout, torch.Tensor]:
    """Iteration `it`'s samples and their raw scores: this rank's train prompts of the global batch
    (`ctx.batch_indices`), `k` samples each (`rollout`), scored by `score` and checked finite."""
    prompts = ctx.data.train_prompts
    idx = ctx.batch_indices(it, len(prompts))
    roll = rollout(ctx, [prompts[i] for i in idx], k=k, temperature=temperature, chunk=chunk, it=it, name=name)
    s = score(ctx, roll, reward)
    require_finite(f"{name}: the {reward.replace('_', ' ')} score of iteration {it + 1}'s samples", s)
    return roll, s


def score(ctx: TrainContext, roll: Rollout, reward: str) -> torch.Tensor:
    """The raw score of each sample, (N,) float32: the gold reward or the learned reward model's."""
    if reward == "gold":
        scores = ctx.gold(roll.prompts, roll.completions)
    else:
        # EOS appended only where the sample ended: a cut-off sample is scored as it was sampled
        scores = ctx.reward_model.score(roll.prompts, roll.completions, ended=roll.ended)
    return torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32)


def normaliser(ctx: TrainContext, reward: str, *, enabled: bool, samples: int, temperature: float,
               name: str) -> tuple[float, float]:
    """(μ_ref, σ_ref) of `reference_score_stats` when `enabled` (a `reward_norm` param), else (0, 1):
    ŝ = (score − μ_ref) / σ_ref."""
    if not enabled:
        return 0.0, 1.0
    return reference_score_stats(ctx, reward, samples=samples, temperature=temperature, name=name)


def reference_score_stats(ctx: TrainContext, reward: str, *, samples: int, temperature: float, name: str) -> tuple[float, float]:
    """(μ_ref, σ_ref): the score's mean and population std over one reference sample per train prompt
    (a subset of `samples` prompts, seeded by the trial's seed) at `temperature`, computed once per
    env, reward model and setting (`ctx.cache`; every algorithm that asks for the same setting reads
    the same numbers). Raises a clear error when the reference's scores do not vary."""
    prompts = ctx.data.train_prompts
    n = min(samples, len(prompts))
    scorer = "gold" if reward == "gold" else "reward_model"

    def compute() -> dict:
        chosen = np.sort(np.random.default_rng([ctx.seed, 0x5C0E]).permutation(len(prompts))[:n])
        roll = ctx.reference.generate([prompts[i] for i in chosen], n=1, temperature=temperature,
                                      max_new_tokens=ctx.max_new_tokens, seed=ctx.seed * 1_000_003 + 0x5C0E)
        s = score(ctx, roll, reward).double()
        require_finite(f"{name}: the {reward.replace('_', ' ')} score of the reference samples", s)
        return {"mean": float(s.mean()), "std": float(s.std(unbiased=False)), "samples": n}

    # the key predates the other on-policy algorithms (PPO's): kept, so cached statistics stay valid
    key = (f"ppo-reward-stats/{scorer}/samples={n}/temperature={temperature:g}"
           f"/max_new_tokens={ctx.max_new_tokens}/seed={ctx.seed}")
    stats = ctx.cache(key, compute)
    if not stats["std"] > 1e-6:
        raise ValueError(f"{name}: the reference samples' {scorer.replace('_', ' ')} scores all equal "
                         f"{stats['mean']:.4g} (std {stats['std']:.2g}): nothing to normalise by; "
                         "set reward_norm: false")
    return stats["mean"], stats["std"]


def check_rollout_params(params) -> None:
    """The checks of the rollout fields an on-policy params dataclass has (its `__post_init__` calls
    this): `rollout_temperature` > 0, `rollout_chunk` an integer >= 1, and `reward_norm_samples`
    an integer >= 2 where the algorithm normalises its score."""
    check(params.rollout_temperature > 0, "rollout_temperature", "must be > 0")
    check(isinstance(params.rollout_chunk, int) and params.rollout_chunk >= 1, "rollout_chunk", "must be an integer >= 1")
    if hasattr(params, "reward_norm_samples"):
        check(isinstance(params.reward_norm_samples, int) and params.reward_norm_samples >= 2, "reward_norm_samples",
              "must be an integer >= 2")


def rows(positions: np.ndarray, k: int) -> np.ndarray:
    """The rollout rows of the prompts at `positions` (prompt-major: prompt j's k samples are rows
    j·k … j·k + k − 1), so that a micro-batch of prompts carries all their samples."""
    return (positions[:, None] * k + np.arange(k)).reshape(-1)


@torch.no_grad()
def no_grad_passes(ctx: TrainContext, forward: Callable[[list, list], tuple[torch.Tensor, torch.Tensor]],
                   p_ids: list, c_ids: list, *, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward(prompt_ids, completion_ids) -> (x, mask)` (e.g. `policy.token_logps`,
    `critic.token_values`) of a rollout (N = prompts · k rows) without grad, one pass per
    micro-batch of prompts (`ctx.micro_batches`), padded with zeros to the longest completion:
    (x, mask), both (N, T) as one pass would give them."""
    parts = []
    for positions in ctx.micro_batches(len(p_ids) // k):
        r = rows(positions, k)
        parts.append(forward([p_ids[i] for i in r], [c_ids[i] for i in r]))
    width = max(lp.shape[1] for lp, _ in parts)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return torch.cat([pad(lp) for lp, _ in parts]), torch.cat([pad(m) for _, m in parts])


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      cliprange: float) -> torch.Tensor:
    """Per-token max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old; inputs (B, T), advantages (B, T)
    or (B, 1). With one update per rollout batch π_old = π (detached) and the gradient is −A ∇log π."""
    ratio = torch.exp(logps - old_logps)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
