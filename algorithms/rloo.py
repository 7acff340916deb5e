"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019).

Per iteration, `k` samples y_1..y_k of every train prompt x from the current policy; each gets a
sequence-level reward, the normalised score minus the KL penalty of the whole sequence,

    R_i = ŝ(x, y_i) − kl_coef · KL_i,     KL_i = Σ_t log π(y_i,t|·) − log π_ref(y_i,t|·)   (k1, nats)

(ŝ = (score − μ_ref)/σ_ref as PPO normalises it: `algorithms.online`), and the baseline of each
sample is the mean reward of the OTHER k − 1 samples of its prompt, so no critic is learned:

    A_i = R_i − 1/(k−1) Σ_{j≠i} R_j
    L   = −1/N Σ_i A_i · log π(y_i|x)                  (one gradient step per rollout batch)

KL_i and A_i carry no gradient (REINFORCE: the score-function gradient of R_i's KL term is the
KL's own gradient, the k1 row of ppo.py's table). Frontier knob: `kl_coef`.

`train.batch_size` counts prompts per step (so each step trains on batch_size × k samples); the k
samples of a prompt stay on one rank, so W workers compute the 1-worker baselines and losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS, online
from algorithms.interface import TrainContext, check, require_finite
from algorithms.pairs import optim_metrics


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of sequence rewards grouped by prompt, (P, k) → (P, k), k ≥ 2:
    A_i = R_i − mean of the other k − 1 rewards of the same prompt."""
    k = rewards.shape[1]
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def rloo_loss(seq_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE loss −mean_i(A_i · log π(y_i|x)); seq_logps (N,) nats per sequence (with grad),
    advantages (N,) (no grad)."""
    return -(advantages.detach() * seq_logps).mean()


@dataclass
class RLOOParams:
    kl_coef: float = 0.05  # weight of the sequence KL penalty in the reward (k1, nats); the frontier knob
    k: int = 4  # samples per prompt (the paper's k; ≥ 2 for a leave-one-out baseline)
    rollout_temperature: float = 1.0  # sampling temperature of the rollouts; π and π_ref are scored at it
    reward_norm: bool = True  # score → (score − μ_ref) / σ_ref (algorithms.online), as PPO
    reward_norm_samples: int = 256  # train prompts (one reference sample each) that μ_ref and σ_ref are measured on
    rollout_chunk: int = 8  # prompts per generation call, seeded by global position (divides the per-worker batch, or is above it: one call)

    def __post_init__(self) -> None:
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(isinstance(self.k, int) and self.k >= 2, "k", "must be an integer >= 2 (a leave-one-out baseline)")
        online.check_rollout_params(self)


class RLOO:
    name = "rloo"
    params_cls = RLOOParams
    knob = "kl_coef"
    needs = frozenset({"prompts", "reward_model"})
    trains_policy = True
    reward = "reward_model"

    def train(self, ctx: TrainContext) -> dict:
        p: RLOOParams = ctx.params
        policy, reference, T = ctx.policy, ctx.reference, p.rollout_temperature
        online.train_prompts(ctx, self.name)
        shift, scale = online.normaliser(ctx, self.reward, enabled=p.reward_norm, samples=p.reward_norm_samples,
                                         temperature=T, name=self.name)
        policy.model.train()
        for it in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(it):
                ctx.evaluate(policy, it)
            roll, score = online.scored_rollout(ctx, it, k=p.k, temperature=T, chunk=p.rollout_chunk,
                                                reward=self.reward, name=self.name)  # score: (N,) raw
            score_n = (score - shift) / scale  # (N,) ŝ
            n = len(score) // p.k  # prompts; a micro-batch of prompts holds all their k samples

            def loss_of(mb: np.ndarray, roll=roll, score_n: torch.Tensor = score_n, n: int = n,
                        it: int = it) -> tuple[torch.Tensor, dict]:
                r = online.rows(mb, p.k)
                p_ids, c_ids = [roll.prompt_ids[i] for i in r], [roll.completion_ids[i] for i in r]
                logps, mask = policy.token_logps(p_ids, c_ids, temperature=T)  # (m, T), with grad
                with torch.no_grad():
                    ref_logps, _ = reference.token_logps(p_ids, c_ids, temperature=T)
                    seq_kl = ((logps.detach() - ref_logps.to(logps.device)) * mask).sum(-1)  # (m,) k1, nats per sequence
                    require_finite(f"{self.name}: the KL of iteration {it + 1}'s rollouts", seq_kl)
                    rewards = score_n[r].to(seq_kl.device) - p.kl_coef * seq_kl  # (m,)
                    advantages = rloo_advantages(rewards.view(-1, p.k)).view(-1)  # (m,)
                part = rloo_loss((logps * mask).sum(-1), advantages) * (len(mb) / n)  # its share of the mean
                return part, {"kl": seq_kl, "reward": rewards, "advantage": advantages, "length": mask.sum(-1)}

            loss, v, opt = ctx.optimize_batch(n, loss_of)
            ctx.log(it + 1, {
                "objective/score": float(score.mean()),
                "objective/score_normalized": float(score_n.mean()),
                "objective/kl": float(v["kl"].mean()),
                "objective/reward": float(v["reward"].mean()),  # what RLOO maximises: ŝ − kl_coef · KL
                "objective/length": float(v["length"].mean()),
                "losses/rloo": loss,
                "policy/advantage_std": float(v["advantage"].std()),
                **optim_metrics(opt),
            })
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {"reward_norm_mean": shift, "reward_norm_std": scale}


ALGORITHMS.register(RLOO())
