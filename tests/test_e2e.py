"""`prefbench run` end to end on a shrunk quick suite: real Ray Train + Tune + DeepSpeed, real files."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from bench.results import EVAL_COLUMNS
from tests.e2e_run import ALL_TRIALS, E2E, run_cli


@pytest.mark.slow
def test_run_writes_results_config_versions_and_report(run_dir):
    out, stderr, _ = run_dir
    for name in ("evals.parquet", "trials.parquet", "config.yaml", "versions.json", "report.md"):
        assert (out / name).is_file(), name
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["trial_id"]) == ALL_TRIALS
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    evals = pd.read_parquet(out / "evals.parquet")
    assert list(evals.columns[: len(EVAL_COLUMNS)]) == EVAL_COLUMNS
    versions = json.loads((out / "versions.json").read_text())
    assert {"torch", "ray", "deepspeed", "transformers"} <= set(versions)
    # progress lines name trials and steps
    assert "[prefbench] start dpo-beta=0.5-seed0" in stderr
    assert "step 6/12" in stderr
    assert "held-out pair accuracy" in stderr  # the shared reward-model stage ran (once)
    # step progress of the stages and the trials (bench/progress.py): lines with rate and time left in a log
    assert re.search(r"\[prefbench\]   env tiny-sentiment seed 0: SFT: 100% (\d+)/\1 \[", stderr)
    assert re.search(r"\[prefbench\]   reward model tiny-sentiment seed 0: 100% (\d+)/\1 \[", stderr)
    assert re.search(r"\[prefbench\]   dpo-beta=0\.5-seed0: +\d+% \d+/12 \[\d\d:\d\d<\d\d:\d\d", stderr)


@pytest.mark.slow
def test_timing_splits_the_run_into_start_up_and_work(run_dir):
    """timing.json: every trial's slot (Tune's view) holds its own work; Ray Train trials and the
    stages pay a start-up; the run's start-up share is a fraction of its wall time."""
    out, _, _ = run_dir
    t = json.loads((out / "timing.json").read_text())
    assert sorted(x["trial_id"] for x in t["trials"]) == ALL_TRIALS
    for x in t["trials"]:
        assert x["slot_s"] >= x["work_s"] > 0 and x["startup_s"] == pytest.approx(x["slot_s"] - x["work_s"], abs=0.02)
    trains = {x["trial_id"]: x for x in t["trials"] if not x["trial_id"].startswith(("sft-", "best-of-n-"))}
    assert all(x["startup_s"] > 1 for x in trains.values())  # a TorchTrainer, its worker process, DeepSpeed
    assert [s["stage"] for s in t["stages"]] in ([], ["env", "reward_model"], ["reward_model"])  # cache reuse
    for s in t["stages"]:
        assert s["wall_s"] > s["worker_s"] > 0 and s["startup_s"] > s["deepspeed_init_s"] >= 0
    assert 0 < t["startup_s"] < t["wall_s"] and t["startup_share"] == pytest.approx(t["startup_s"] / t["wall_s"], abs=1e-3)


@pytest.mark.slow
def test_evaluation_rows_follow_the_schedule_and_the_kl_definition(run_dir):
    out, _, _ = run_dir
    evals = pd.read_parquet(out / "evals.parquet")
    dpo = evals[evals["trial_id"] == "dpo-beta=0.5-seed0"]
    # T=1 at steps 0 and 6, then the final step at every temperature
    assert sorted(dpo.loc[~dpo["final"], "step"]) == [0, 6]
    final = dpo[dpo["final"]]
    assert set(final["step"]) == {12}
    assert sorted(final["temperature"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    greedy = final[final["temperature"] == 0.0].iloc[0]
    assert math.isnan(greedy["kl"]) and greedy["kl_kind"] == "none"
    t1 = final[final["temperature"] == 1.0].iloc[0]
    assert t1["kl_kind"] == "estimated" and t1["kl"] > 0 and t1["kl_k3"] > 0
    assert t1["n_samples"] == 32 * 4 and t1["n_prompts"] == 32
    assert 0 <= t1["gold_reward"] <= 1 and 0 <= t1["win_rate"] <= 1
    sft = evals[evals["algorithm"] == "sft"]
    assert (sft.loc[sft["temperature"] > 0, "kl"] >= 0).all()
    assert (sft.loc[sft["temperature"] == 1.0, "kl"] == 0).all()  # the reference against itself
    # the step-0 evaluation of a DPO trial is the SFT policy: same numbers as the baseline at T=1
    step0 = dpo[(dpo["step"] == 0)].iloc[0]
    assert step0["gold_reward"] == pytest.approx(sft[sft["temperature"] == 1.0].iloc[0]["gold_reward"])
    # the smaller beta moved further from the reference
    kl = {b: evals[(evals["knob_value"] == b) & evals["final"] & (evals["temperature"] == 1.0)]["kl"].iloc[0]
          for b in (0.5, 2.0)}
    assert kl[0.5] > kl[2.0]


@pytest.mark.slow
def test_report_table_and_report_command(run_dir, tmp_path):
    from bench.report import REPORT_FILES

    out, _, _ = run_dir
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "=" in line.split("|")[2]]
    # one row per (algorithm, knob value) in the configuration table: best-of-n has n = 1, 2, 4, 8
    assert {r.split("|")[1].strip() for r in rows} >= {"dpo", "ipo", "simpo", "ppo", "ppo-gt", "best-of-n", "unlikelihood"}
    assert "| sft | – |" in text and "| preferred-ft | – |" in text
    for title in ("## Reward vs KL frontier", "## Temperature robustness", "## Cost and reward model"):
        assert title in text
    # `prefbench report` on a copy holding only the parquet files and config.yaml rebuilds every file
    # exactly as the run wrote them
    for name in ("evals.parquet", "trials.parquet", "config.yaml"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in REPORT_FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.slow
def test_trained_policy_loads_with_plain_transformers(run_dir):
    out, _, _ = run_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = out / "trials" / "dpo-beta=0.5-seed0" / "policy"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("the movie was", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


@pytest.mark.slow
def test_second_run_reuses_the_prepared_env(run_dir):
    out, stderr, cache = run_dir
    from bench.config import load_suite
    from bench.run.prepare import prepare_env

    assert "SFT + pairs as a Ray Train job" in stderr
    suite = load_suite(E2E, [f"cache_dir={cache}"])
    envs = list((cache / "envs").iterdir())
    assert len(envs) == 1 and (envs[0] / "DONE").exists()
    mtime = (envs[0] / "sft" / "model.safetensors").stat().st_mtime
    # no Ray started here: a cached env returns before any job is submitted
    assert prepare_env(suite, {}, 0, out / "unused") == envs[0]
    assert (envs[0] / "sft" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.slow
def test_env_without_pairs_is_one_line_exit_2_and_leaves_no_output(tmp_path):
    # min_gold_gap 1.0 can never be met: the env comes out of SFT with zero pairs, and DPO needs pairs
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench.cli", "run", "--out", str(out),
            "--set", "env.params.min_gold_gap=1.0", "--set", "env.params.num_reviews=64",
            "--set", "env.params.sft_epochs=1", "--set", "env.params.num_train_prompts=8",
            "--set", "env.params.num_eval_prompts=4", "--set", "env.params.n_layer=1", "--set", "env.params.n_embd=32"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prefbench: error:")]
    assert errors == ["prefbench: error: env tiny-sentiment (seed 0) produced no preference pairs; "
                      "check env.params (e.g. min_gold_gap)"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# the trials each two-worker run repeats, with the train_log keys that must match the 1-worker run's:
# ZeRO-2 shards gradients and optimizer state, ZeRO-3 also the parameters (rollouts then sample from
# the gathered policy, PPO's policy and critic share one engine)
TWO_WORKER_TRIALS = {
    2: {"dpo-beta=0.5-seed0": ("{name: dpo, sweep: {beta: [0.5]}}", ["losses/dpo", "optim/grad_norm"]),
        "simpo-beta=2.0-seed0": ("{name: simpo, sweep: {beta: [2.0]}}", ["losses/simpo", "optim/grad_norm"]),
        "online-dpo-beta=0.5-seed0": ("{name: online-dpo, train: {steps: 6, eval_every: 3}, sweep: {beta: [0.5]}}",
                                      ["losses/dpo", "objective/score", "objective/kl"]),
        "rloo-kl_coef=0.05-seed0": ("{name: rloo, train: {steps: 6, eval_every: 3}, sweep: {kl_coef: [0.05]}}",
                                    ["losses/rloo", "objective/score", "objective/kl"])},
    3: {"dpo-beta=0.5-seed0": ("{name: dpo, sweep: {beta: [0.5]}}", ["losses/dpo", "optim/grad_norm"]),
        "ppo-kl_coef=0.1-seed0": ("{name: ppo, train: {steps: 6, eval_every: 3}, sweep: {kl_coef: [0.1]}}",
                                  ["objective/score", "objective/kl", "losses/policy", "losses/value"]),
        "grpo-kl_coef=0.04-seed0": ("{name: grpo, train: {steps: 6, eval_every: 3}, sweep: {kl_coef: [0.04]}}",
                                    ["losses/grpo", "objective/score", "objective/kl"]),
        "reinforce-pp-kl_coef=0.05-seed0": (
            "{name: reinforce-pp, train: {steps: 6, eval_every: 3}, sweep: {kl_coef: [0.05]}}",
            ["losses/policy", "objective/score", "objective/kl"])},
}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_workers_with_zero_train_like_one_worker(run_dir, tmp_path, zero_stage):
    # same env (cached), same global batches: rank-sharded data + ZeRO-2/3 gives the 1-worker ZeRO-0
    # losses. The on-policy methods sample their rollouts in chunks seeded by global position (from
    # the gathered policy under ZeRO-3), score them with the cached reward model, and take their
    # means over the global batch: the 1-worker algorithm, loss for loss. Each rank also takes every
    # step in micro-batches of 3 of its 8 items (3 + 3 + 2, DeepSpeed accumulating across them)
    _, _, cache = run_dir
    out = tmp_path / "out2"
    trials = TWO_WORKER_TRIALS[zero_stage]
    algorithms = "algorithms=[" + ", ".join(entry for entry, _ in trials.values()) + "]"
    proc = run_cli(out, [algorithms, "baseline=false", "scaling.num_workers=2",
                         "scaling.max_concurrent_trials=1", f"deepspeed.zero_stage={zero_stage}",
                         "train.micro_batch_size=3"], cache=cache, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cached at" in proc.stderr
    assert "Bradley-Terry" not in proc.stderr  # the reward model came from the cache
    table = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert sorted(table.index) == sorted(trials)
    assert (table["status"] == "ok").all(), table["reason"].to_dict()
    one_table = pd.read_parquet(run_dir[0] / "trials.parquet").set_index("trial_id")
    for col in ("family", "rm_queries", "gold_queries"):  # every rank's queries, summed
        assert table[col].to_dict() == one_table.loc[table.index, col].to_dict(), col

    def train_log(run, trial):
        return [json.loads(line) for line in (run / "trials" / trial / "train_log.jsonl").read_text().splitlines()]

    for trial, (_, keys) in trials.items():
        one, two = train_log(run_dir[0], trial), train_log(out, trial)
        assert len(one) == len(two) == (12 if trial.startswith(("dpo", "simpo")) else 6), trial
        for key in keys:
            rel = 1e-3 if key == "optim/grad_norm" or trial.startswith("ppo") else 1e-4
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=rel, abs=1e-4), (trial, key)
    evals = pd.read_parquet(out / "evals.parquet")
    final = evals[evals["final"] & (evals["temperature"] == 1.0)]
    assert (final["n_samples"] == 32 * 4).all()  # both ranks' halves of the eval prompts were gathered
    # the saved policy is whole (ZeRO-3 shards consolidated) and equals in shape the 1-worker one
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "trials" / "dpo-beta=0.5-seed0" / "policy").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(run_dir[0] / "trials" / "dpo-beta=0.5-seed0" / "policy").state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ref.items()}
    assert max(float((saved[k] - ref[k]).abs().max()) for k in ref) < 1e-3


@pytest.mark.slow
def test_best_of_n_reports_every_n_from_one_set_with_analytic_kl(run_dir):
    out, _, _ = run_dir
    evals = pd.read_parquet(out / "evals.parquet")
    bon = evals[evals["algorithm"] == "best-of-n"]
    assert set(bon["trial_id"]) == {"best-of-n-seed0"} and bon["final"].all()
    t1 = bon[bon["temperature"] == 1.0].set_index("knob_value")
    assert sorted(t1.index) == [1.0, 2.0, 4.0, 8.0]
    assert (t1["kl_kind"] == "bound").all()
    for n, row in t1.iterrows():
        assert row["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
        assert row["n_samples"] == 32 * 8  # every n from the same 8 samples per prompt
    # best-of-1 is the reference's own distribution: same gold as the SFT point up to sampling noise
    sft = evals[(evals["algorithm"] == "sft") & (evals["temperature"] == 1.0)].iloc[0]
    assert abs(t1.loc[1.0, "gold_reward"] - sft["gold_reward"]) < 4 * max(sft["gold_reward_se"], 0.01)
    other_t = bon[bon["temperature"] != 1.0]
    assert len(other_t) == 4 * 4 and (other_t["kl_kind"] == "none").all()


@pytest.mark.slow
def test_trials_record_their_family_and_the_reward_queries_they_trained_on(run_dir):
    """trials.parquet: each algorithm's family, and the samples it had scored by the reward model or
    the gold reward while training: iterations × prompts per iteration × samples per prompt, exactly.
    Neither the evaluator's scoring (best-of-n reranks inside it) nor the reference's score
    statistics (computed by whichever on-policy trial ran first, then cached) count, so the counts
    do not depend on trial order."""
    out, _, _ = run_dir
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    rollouts = 6 * 16  # steps × train.batch_size of the on-policy entries
    expected = {  # trial: (family, rm queries, gold queries)
        "sft-seed0": ("reference", 0, 0),
        "dpo-beta=0.5-seed0": ("offline pairs", 0, 0),
        "simpo-beta=2.0-seed0": ("offline pairs", 0, 0),
        "unlikelihood-alpha=0.1-seed0": ("offline pairs", 0, 0),
        "best-of-n-seed0": ("sampling", 0, 0),
        "ppo-kl_coef=0.1-seed0": ("on-policy, reward model", rollouts, 0),
        "ppo-gt-kl_coef=0.05-seed0": ("on-policy, gold", 0, rollouts),
        "online-dpo-beta=0.5-seed0": ("on-policy, reward model", 2 * rollouts, 0),
        "online-dpo-gt-beta=0.5-seed0": ("on-policy, gold", 0, 2 * rollouts),
        "rloo-kl_coef=0.05-seed0": ("on-policy, reward model", 4 * rollouts, 0),
        "grpo-kl_coef=0.04-seed0": ("on-policy, reward model", 4 * rollouts, 0),
        "reinforce-pp-kl_coef=0.05-seed0": ("on-policy, reward model", rollouts, 0),
    }
    got = {t: (trials.loc[t, "family"], int(trials.loc[t, "rm_queries"]), int(trials.loc[t, "gold_queries"]))
           for t in expected}
    assert got == expected
    report = (out / "report.md").read_text()
    assert "## Online vs offline" in report
    assert "| on-policy, reward model | rloo |" in report and "| 384 | 0 | 0 |" in report
    assert "| sampling | best-of-n |" in report and "| 0 | 0 | 1–8 |" in report


@pytest.mark.slow
def test_tensorboard_and_mlflow_log_each_trial_s_training_curve_evaluations_and_params(run_dir, monkeypatch):
    """tracking: Tune's TBXLoggerCallback and Ray's MLflowLoggerCallback, read back by TensorBoard's
    own event reader and by MLflow's client: a trial's training metrics at its progress reports, its
    evaluations (gold reward, KL, win rate) and its params."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run_dir
    trial = "dpo-beta=0.5-seed0"
    events = list((out / "ray" / "sweep" / trial).glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"ray/tune/losses/dpo", "ray/tune/gold_reward", "ray/tune/kl", "ray/tune/win_rate"} <= tags, tags
    assert len(acc.Scalars("ray/tune/losses/dpo")) == 5  # steps 2, 4, ..., 10 of 12 (every max(2, 12 // 10))
    gold = [e.value for e in acc.Scalars("ray/tune/gold_reward")]
    evals = pd.read_parquet(out / "evals.parquet")
    t1 = evals[(evals["trial_id"] == trial) & (evals["temperature"] == 1.0)].sort_values("step")
    assert gold == pytest.approx(t1["gold_reward"].tolist(), rel=1e-6)  # steps 0, 6 and the final one

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in to read a file store, as the run does
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.data.params.get("trial/trial_id"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(pd.read_parquet(out / "trials.parquet")["trial_id"])
    run = runs[trial]
    assert run.data.params["trial/algorithm"] == "dpo" and run.data.params["trial/params/beta"] == "0.5"
    history = client.get_metric_history(run.info.run_id, "gold_reward")
    assert [m.value for m in history] == pytest.approx(t1["gold_reward"].tolist(), rel=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "losses/dpo")) == 5


@pytest.mark.slow
def test_reward_model_is_trained_once_cached_and_reported(run_dir):
    out, stderr, cache = run_dir
    from bench.config import load_suite
    from bench.run.prepare import prepare_reward_model

    rms = list((cache / "reward_models").iterdir())
    assert len(rms) == 1 and (rms[0] / "DONE").exists() and (rms[0] / "model" / "config.json").exists()
    metrics = json.loads((rms[0] / "metrics.json").read_text())
    assert metrics["rm/heldout_pairs"] > 0 and 0 <= metrics["rm/heldout_accuracy"] <= 1
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    for uses_rm in ("ppo-kl_coef=0.1-seed0", "best-of-n-seed0"):
        assert trials.loc[uses_rm, "rm_accuracy"] == pytest.approx(metrics["rm/heldout_accuracy"])
    assert math.isnan(trials.loc["dpo-beta=0.5-seed0", "rm_accuracy"])
    assert stderr.count("Bradley-Terry on the env's pairs") == 1
    suite = load_suite(E2E, [f"cache_dir={cache}"])
    envs = list((cache / "envs").iterdir())
    assert prepare_reward_model(suite, {}, 0, envs[0], out / "unused") == rms[0]  # cached: no Ray needed


@pytest.mark.slow
def test_ppo_trials_train_policy_and_critic_and_log_the_objective(run_dir):
    out, _, _ = run_dir
    for trial in ("ppo-kl_coef=0.1-seed0", "ppo-gt-kl_coef=0.05-seed0"):
        rows = [json.loads(line) for line in (out / "trials" / trial / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert all(math.isfinite(r["losses/value"]) and math.isfinite(r["objective/score"]) for r in rows)
        assert rows[-1]["objective/kl"] != 0  # the policy moved
    evals = pd.read_parquet(out / "evals.parquet")
    ppo = evals[(evals["algorithm"] == "ppo") & ~evals["final"]]
    assert sorted(ppo["step"]) == [0, 3]
    params = json.loads(evals[evals["algorithm"] == "ppo"]["params"].iloc[0])
    # the knobs implementations disagree on are all in the results
    assert {"kl_estimator", "kl_placement", "gamma", "lam", "whiten_advantages", "cliprange_value",
            "ppo_epochs", "rollout_temperature", "loss_aggregation"} <= set(params)
