"""A hand-made run directory (evals.parquet + trials.parquet in prefbench's schema) for report tests:
known numbers, no Ray, no training. Three algorithms over `seeds`: the SFT baseline, DPO at two
betas with three evaluations each, best-of-n with its KL bound; one extra failed DPO trial.

Every row has its metrics on the two halves of the eval prompts (METRIC_h0/_h1), equal to the full
sample unless `half_gaps` moves a DPO point's gold and win rate apart on them; `old=True` writes a run
from before cross-fitting instead (no half columns, best-of-n's KL kind "analytic", no kl_est/dup_rate,
no family or query columns in trials.parquet)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bench.results import EVAL_COLUMNS, TRIAL_COLUMNS

TEMPS = (0.0, 0.5, 1.0)
# (beta, step) -> (KL, gold at T=1) for seed 0; seed s adds 0.01*s to gold and 0.1*s to KL
DPO = {(1.0, 0): (0.0, 0.50), (1.0, 10): (0.4, 0.60), (1.0, 20): (0.8, 0.70),
       (0.25, 0): (0.0, 0.50), (0.25, 10): (2.0, 0.72), (0.25, 20): (5.0, 0.80)}
BON = {1: 0.50, 2: 0.58, 4: 0.66, 8: 0.72}
BON_DUPLICATES = 0.25  # dup_rate of every best-of-n row; its kl_est is 0.8 × the bound at T = 1
NEW_COLUMNS = ["kl_est", "dup_rate", "gold_reward_h0", "gold_reward_h1", "kl_h0", "kl_h1", "win_rate_h0", "win_rate_h1"]


def _row(trial_id, algorithm, seed, knob, value, step, final, temperature, gold, kl, kl_kind="estimated", win=None,
         gap=0.0, kl_est=math.nan, dup_rate=math.nan):
    """One evaluation; on half 0 of the prompts gold and win rate are `gap` above the full sample, on half 1 below."""
    win = gold if win is None else win
    return {"suite": "synthetic", "env": "tiny-sentiment", "algorithm": algorithm, "trial_id": trial_id, "seed": seed,
            "knob": knob, "knob_value": value, "params": json.dumps({knob: value} if knob else {}), "step": step,
            "final": final, "temperature": temperature, "gold_reward": gold, "gold_reward_se": 0.01, "kl": kl,
            "kl_se": 0.05, "kl_k3": kl, "kl_k3_se": 0.05, "kl_kind": kl_kind,
            "win_rate": win, "win_rate_se": 0.02, "gen_len": 12.0, "n_prompts": 16,
            "n_samples": 64, "train_time_s": 1.0, "wall_time_s": 2.0, "kl_est": kl_est, "dup_rate": dup_rate,
            "gold_reward_h0": gold + gap, "gold_reward_h1": gold - gap, "kl_h0": kl, "kl_h1": kl,
            "win_rate_h0": win + gap, "win_rate_h1": win - gap}


FAMILY = {"sft": "reference", "dpo": "offline pairs", "best-of-n": "sampling"}


def _trial(trial_id, algorithm, seed, knob, value, status="ok", reason="", rm=None, params=None):
    return {"family": FAMILY[algorithm], "rm_queries": 0, "gold_queries": 0, "suite": "synthetic", "env": "tiny-sentiment", "algorithm": algorithm, "trial_id": trial_id, "seed": seed,
            "knob": knob, "knob_value": value, "params": json.dumps(params or ({knob: value} if knob else {})),
            "status": status, "reason": reason, "n_evals": 3, "train_time_s": 10.0 + seed, "eval_time_s": 1.0,
            "wall_time_s": 12.0, "rm_accuracy": rm, "nodes": "n0", "resumed_from": None}


def temperature_gold(gold_t1: float, t: float) -> float:
    """A made-up temperature curve: greedy decoding 0.1 above T = 1, linear in between."""
    return gold_t1 + 0.1 * (1.0 - t)


def make_run(out: Path, seeds=(0, 1, 2), config: str | None = None, dpo_shift: float = 0.0,
             half_gaps: dict | None = None, old: bool = False) -> Path:
    """Write the run into `out`; `dpo_shift` is added to every DPO gold reward after step 0 (a better DPO);
    `half_gaps` {(beta, step): gap} puts that DPO point's gold and win rate gap above the full sample on half 0
    of the eval prompts and gap below on half 1; `old`: a run from before cross-fitting (see the module)."""
    half_gaps = half_gaps or {}
    out.mkdir(parents=True, exist_ok=True)
    evals, trials = [], []
    for s in seeds:
        tid = f"sft-seed{s}"
        trials.append(_trial(tid, "sft", s, None, math.nan))
        for t in TEMPS:
            evals.append(_row(tid, "sft", s, None, math.nan, 0, True, t, temperature_gold(0.5, t),
                              0.0 if t == 1.0 else (math.nan if t == 0 else 0.5)))
        for beta in (1.0, 0.25):
            tid = f"dpo-beta={beta}-seed{s}"
            trials.append(_trial(tid, "dpo", s, "beta", beta, params={"beta": beta, "lr_fairness_knob": 1e-4}))
            for step in (0, 10, 20):
                kl, gold = DPO[(beta, step)]
                kl, gold = kl + (0.1 * s if step else 0.0), gold + 0.01 * s + (dpo_shift if step else 0.0)
                gap = half_gaps.get((beta, step), 0.0)
                if step < 20:
                    evals.append(_row(tid, "dpo", s, "beta", beta, step, False, 1.0, gold, kl, gap=gap))
                    continue
                for t in TEMPS:
                    evals.append(_row(tid, "dpo", s, "beta", beta, step, True, t, temperature_gold(gold, t),
                                      kl if t == 1.0 else (math.nan if t == 0 else kl * 2), gap=gap))
        tid = f"best-of-n-seed{s}"
        trials.append(_trial(tid, "best-of-n", s, "n", math.nan, rm=0.8 + 0.01 * s))
        for n, gold in BON.items():
            for t in TEMPS:
                kl = math.log(n) - (n - 1) / n if t == 1.0 else math.nan  # the bound (Beirami et al. 2024)
                evals.append(_row(tid, "best-of-n", s, "n", float(n), 0, True, t, temperature_gold(gold + 0.01 * s, t),
                                  kl, kl_kind=("analytic" if old else "bound") if t == 1.0 else "none",
                                  kl_est=0.8 * kl, dup_rate=BON_DUPLICATES))
    trials.append(_trial("dpo-beta=0.1-seed0", "dpo", 0, "beta", 0.1, status="failed", reason="RuntimeError: boom"))
    evals.append(_row("dpo-beta=0.1-seed0", "dpo", 0, "beta", 0.1, 10, False, 1.0, 0.99, 0.1))  # must be ignored
    columns = ([c for c in EVAL_COLUMNS if c not in NEW_COLUMNS] if old
               else EVAL_COLUMNS + [c for c in NEW_COLUMNS if c not in EVAL_COLUMNS])
    ev = pd.DataFrame(evals, columns=columns)
    ev.to_parquet(out / "evals.parquet", index=False)
    trial_columns = [c for c in TRIAL_COLUMNS if c not in ("family", "rm_queries", "gold_queries")] if old else TRIAL_COLUMNS
    pd.DataFrame(trials, columns=trial_columns).to_parquet(out / "trials.parquet", index=False)
    if config is not None:
        (out / "config.yaml").write_text(config)
    return out
