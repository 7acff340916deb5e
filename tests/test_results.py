"""Results collection and the markdown report, from trial files alone (no Ray)."""

from __future__ import annotations

import json

import pandas as pd

from bench.config import TrialSpec
from bench.report import write_report
from bench.results import EVAL_COLUMNS, collect


def _row(trial_id, algorithm, knob_value, temperature, gold, kl, seed=0, final=True, step=10):
    return {
        "suite": "s", "env": "e", "algorithm": algorithm, "trial_id": trial_id, "seed": seed,
        "knob": "beta" if knob_value is not None else None, "knob_value": knob_value, "params": "{}",
        "step": step, "temperature": temperature, "gold_reward": gold, "gold_reward_se": 0.01, "kl": kl,
        "kl_se": 0.1, "kl_k3": kl, "kl_k3_se": 0.1, "kl_kind": "estimated", "win_rate": gold,
        "win_rate_se": 0.02, "gen_len": 12.0, "n_prompts": 8, "n_samples": 32, "final": final,
        "train_time_s": 1.0, "wall_time_s": 2.0,
    }


def _spec(trial_id, algorithm, beta, seed=0):
    return TrialSpec(trial_id=trial_id, algorithm=algorithm, params={"beta": beta} if beta else {},
                     train={}, seed=seed, knob="beta" if beta else None, knob_value=beta)


def test_collect_marks_failures_and_report_aggregates_seeds(tmp_path):
    specs = [_spec("dpo-a-seed0", "dpo", 0.5), _spec("dpo-a-seed1", "dpo", 0.5, seed=1), _spec("dpo-b-seed0", "dpo", 2.0)]
    for spec, gold in ((specs[0], 0.6), (specs[1], 0.8)):
        d = tmp_path / "trials" / spec.trial_id
        d.mkdir(parents=True)
        rows = [_row(spec.trial_id, "dpo", 0.5, t, gold, 1.0, seed=spec.seed) for t in (0.0, 1.0)]
        rows.append(_row(spec.trial_id, "dpo", 0.5, 1.0, 0.5, 0.2, seed=spec.seed, final=False, step=5))
        (d / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text(json.dumps({"train_time_s": 1.0, "eval_time_s": 0.5, "wall_time_s": 2.0}))
    status = {"dpo-a-seed0": None, "dpo-a-seed1": None, "dpo-b-seed0": "RuntimeError: boom"}
    evals, trials = collect(tmp_path, "s", "e", specs, status)
    assert list(evals.columns[: len(EVAL_COLUMNS)]) == EVAL_COLUMNS
    assert len(evals) == 6
    assert trials.set_index("trial_id")["status"].to_dict() == {
        "dpo-a-seed0": "ok", "dpo-a-seed1": "ok", "dpo-b-seed0": "failed"}
    assert pd.read_parquet(tmp_path / "trials.parquet").equals(trials)
    text = write_report(tmp_path).read_text()
    # two seeds of beta=0.5: mean 0.7, 95% CI t(0.975, 1) * 0.1414 / sqrt(2) = 12.706 * 0.1
    assert "| dpo | beta=0.5 | 2 | 0.700 ± 1.271 |" in text
    assert "2/3 trials ok" in text
    assert "- `dpo-b-seed0`: RuntimeError: boom" in text


def test_the_committed_results_rebuild_their_report_byte_for_byte(tmp_path):
    """results/quick and results/smol-quick are what the code produces: their report files, rebuilt by
    `write_report` from the committed parquet files, equal the committed ones byte for byte (the text
    files; the plots' bytes depend on the matplotlib build)."""
    import shutil
    from pathlib import Path

    for name in ("quick", "smol-quick"):
        committed = Path(__file__).resolve().parent.parent / "results" / name
        if not (committed / "evals.parquet").is_file():
            continue
        copy = tmp_path / name
        shutil.copytree(committed, copy)
        write_report(copy)
        for f in ("report.md", "report.csv", "configs.csv", "report.tex", "report.html"):
            assert (copy / f).read_bytes() == (committed / f).read_bytes(), f"results/{name}/{f}"
