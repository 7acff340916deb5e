"""SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

    L_SLiC = E_(x, y_w, y_l) [ max(0, δ − log π(y_w|x) + log π(y_l|x)) − λ · log π(y_w|x) ]

The calibration term is a hinge on the margin between the chosen and the rejected completion's
sequence log-likelihoods (nats per sequence): pairs already separated by δ contribute nothing. The
second term is the paper's regulariser, a cross-entropy towards a target completion y_ref; pairs
carry no separate SFT target, so y_ref is the chosen completion. Unlike DPO, the loss never looks
at the reference policy: only the margin δ (and λ) keep π near it. Frontier knob: `delta`
(a larger margin → further from the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.interface import TrainContext, check
from algorithms.pairs import EncodedPairs


def slic_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, delta: float, reg_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair SLiC-HF losses and their calibration part; inputs (B,) sequence log-probs in nats.

    Returns (losses, calibration), each (B,): losses = calibration + reg_weight · (−chosen_logps).
    """
    calibration = torch.relu(delta - chosen_logps + rejected_logps)  # (B,)
    return calibration - reg_weight * chosen_logps, calibration


@dataclass
class SLiCParams:
    delta: float = 1.0  # margin of the hinge, nats per sequence; the frontier knob
    reg_weight: float = 0.1  # λ, weight of the cross-entropy on the chosen completion

    def __post_init__(self) -> None:
        check(self.delta > 0, "delta", "must be > 0 (nats)")
        check(self.reg_weight >= 0, "reg_weight", "must be >= 0")


class SLiC:
    name = "slic"
    params_cls = SLiCParams
    knob = "delta"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx: TrainContext) -> dict:
        policy, params = ctx.policy, ctx.params
        enc = EncodedPairs.encode(policy, ctx.data.pairs, self.name)  # prompt / chosen / rejected token ids
        policy.model.train()
        hinge_active = 0.0
        for step in range(ctx.start_step, ctx.train.steps):  # start_step > 0 when resumed from a checkpoint
            if ctx.should_evaluate(step):
                ctx.evaluate(policy, step)
            idx = ctx.batch_indices(step, len(enc))  # this rank's share of the global batch

            def loss_of(mb, idx=idx):  # positions in idx of one micro-batch (train.micro_batch_size)
                b = len(mb)
                logps = policy.sequence_logps(*enc.both(idx[mb]))  # (2b,): chosen first, then rejected
                losses, calibration = slic_loss(logps[:b], logps[b:], params.delta, params.reg_weight)
                return losses.sum() / len(idx), {  # its part of the batch mean; per-pair values for the log
                    "calibration": calibration, "chosen": logps[:b], "margin": logps[:b] - logps[b:]}

            # forward + backward per micro-batch, then one clip, step and schedule (DeepSpeed in bench)
            loss, v, opt = ctx.optimize_batch(len(idx), loss_of)
            hinge_active = float((v["calibration"] > 0).float().mean())
            ctx.log(step + 1, {
                "losses/slic": loss,
                "losses/calibration": float(v["calibration"].mean()),
                "logps/chosen": float(v["chosen"].mean()),
                "logps/margin": float(v["margin"].mean()),
                "slic/hinge_active": hinge_active,  # fraction of pairs not yet separated by delta
                "optim/lr": opt["lr"],
                "optim/grad_norm": opt["grad_norm"],
            })
        ctx.evaluate(policy, ctx.train.steps, final=True)
        return {"slic/final_hinge_active": hinge_active}  # lands in trials.parquet
