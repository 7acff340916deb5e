"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL
OnlineDPOTrainer), and online DPO with the gold reward (`online-dpo-gt`, as PPO-GT is to PPO).

Per step: two samples y_1, y_2 of every train prompt x from the CURRENT policy; the scorer (the
shared learned reward model, or the env's gold reward) ranks them, y_w the higher-scored; then one
DPO step on the fresh pairs against the frozen reference:

    L = −E log σ( β log π(y_w|x)/π_ref(y_w|x) − β log π(y_l|x)/π_ref(y_l|x) )      (algorithms.dpo)

The pairs are on-policy at every step (offline DPO's pairs are the SFT policy's, ranked once by
gold). The reference log-probs of fresh samples are computed each step (one no-grad reference pass);
both samples of every prompt go through the policy in ONE forward pass (2B sequences). A tie is
ranked as TRL ranks it (the first sample wins; its loss then pushes both sides alike). Frontier
knob: `beta`. Every scored sample is a reward-model (or gold) query: 2 per prompt per step.

This is the worked example of an on-policy algorithm in docs/plugins.md: sampling inside `train`
(`algorithms.online.rollout`: seeded by global position, ZeRO-3 gathering), scoring fresh samples,
and scoring them again by teacher forcing from their own token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from algorithms import ALGORITHMS, online
from algorithms.dpo import dpo_loss
from algorithms.interface import TrainContext, check
from algorithms.pairs import implicit_reward_metrics, optim_metrics


def rank_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (chosen, rejected) of each prompt's two samples, scores (P, 2) prompt-major
    (sample j of prompt i at 2i + j); the first sample wins a tie (argmax)."""
    first_wins = scores[:, 0] >= scores[:, 1]  # (P,)
    base = 2 * torch.arange(len(scores))
    chosen = base + (~first_wins).long()
    return chosen, base + first_wins.long()


@dataclass
class OnlineDPOParams:
    beta: float = 0.5  # DPO's β on the fresh pairs; the frontier knob
    rollout_temperature: float = 1.0  # sampling temperature of the two samples per prompt
    rollout_chunk: int = 8  # prompts per generation call, seeded by global position (divides the per-worker batch, or is above it: one call)

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", "must be > 0")
        online.check_rollout_params(self)


class OnlineDPO:
    """One implementation, two registered algorithms: `online-dpo` (learned RM) and `online-dpo-gt` (gold)."""

    params_cls = OnlineDPOParams
    knob = "beta"
    trains_policy = True

    def __init__(self, name: str, reward: str):
        self.name = name
        self.reward = reward  # "reward_model" or "gold"
        self.needs = frozenset({"prompts", reward})

    def train(self, ctx: TrainContext) -> dict:
        p: OnlineDPOParams = ctx.params
        policy, reference = ctx.policy, ctx.reference
        online.train_prompts(ctx, self.name)
        policy.model.train()
        for step in range(ctx.start_step, ctx.train.steps):
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            roll, score = online.scored_rollout(ctx, step, k=2, temperature=p.rollout_temperature,
                                                chunk=p.rollout_chunk, reward=self.reward, name=self.name)  # (2B,) raw
            chosen, rejected = rank_pairs(score.view(-1, 2))  # (B,), (B,)

            def loss_of(mb: np.ndarray, chosen: torch.Tensor = chosen, rejected: torch.Tensor = rejected,
                        roll=roll) -> tuple[torch.Tensor, dict]:
                order = torch.cat([chosen[mb], rejected[mb]]).tolist()  # chosen first, then rejected: one forward
                p_ids = [roll.prompt_ids[i] for i in order]
                c_ids = [roll.completion_ids[i] for i in order]
                b = len(mb)
                with torch.no_grad():
                    ref = reference.sequence_logps(p_ids, c_ids)  # (2b,) nats per sequence
                token_logps, mask = policy.token_logps(p_ids, c_ids)  # (2b, T), with grad
                logps = (token_logps * mask).sum(-1)
                ref = ref.to(logps.device)
                losses, chosen_r, rejected_r = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], p.beta)
                return losses.sum() / len(chosen), {"chosen_r": chosen_r, "rejected_r": rejected_r,
                                                    "kl": logps - ref, "length": mask.sum(-1)}

            loss, v, opt = ctx.optimize_batch(len(chosen), loss_of)
            ctx.log(step + 1, {
                "losses/dpo": loss,
                **implicit_reward_metrics(v["chosen_r"], v["rejected_r"]),
                "objective/score": float(score.mean()),
                "objective/score_gap": float((score[chosen] - score[rejected]).mean()),  # chosen − rejected, raw
                "objective/kl": float(v["kl"].mean()),  # log π − log π_ref of the samples, nats
                "objective/length": float(v["length"].mean()),
                **optim_metrics(opt),
            })
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {}


ALGORITHMS.register(OnlineDPO("online-dpo", reward="reward_model"))
ALGORITHMS.register(OnlineDPO("online-dpo-gt", reward="gold"))
