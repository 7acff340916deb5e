"""The guards behind the fault tests, one process, no Ray: NaN/inf checks, the gold-reward boundary,
cache hashes, failed-trial bookkeeping, error reasons, Ctrl-C handling."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms.interface import NonFiniteError, require_finite


def test_require_finite_names_what_and_how_many():
    require_finite("x", 1.0)
    require_finite("x", torch.tensor([0.0, -3.5]))
    with pytest.raises(NonFiniteError, match=r"^the loss at optimizer step 4 is nan$"):
        require_finite("the loss at optimizer step 4", torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match=r"^reward is -inf/nan \(2 of 3 values\)$"):
        require_finite("reward", np.array([1.0, -np.inf, np.nan]))
    with pytest.raises(NonFiniteError, match="is inf"):
        require_finite("kl", torch.tensor([math.inf], dtype=torch.bfloat16))


class _Env:
    name = "broken-env"

    def __init__(self, out):
        self.out = out

    def gold(self, prompts, completions):
        return self.out(completions)


@pytest.mark.parametrize("out, message", [
    (lambda c: [0.5] * len(c), None),
    (lambda c: [0.5, float("nan")] + [0.5] * (len(c) - 2),
     r"^env broken-env: gold reward returned nan for 1 of 4 completions \(first: 'b'\)$"),
    (lambda c: [0.5] * (len(c) - 1), r"^env broken-env: gold reward returned 3 values of shape \(3,\) for 4 completions$"),
    (lambda c: np.ones((len(c), 2)), r"returned 8 values of shape \(4, 2\) for 4 completions$"),
    (lambda c: ["good"] * len(c), r"^env broken-env: gold reward returned list, not one float per completion$"),
    (lambda c: [math.inf] * len(c), r"returned inf for 4 of 4 completions"),
])
def test_gold_reward_is_checked_at_the_boundary_with_the_env_name(out, message):
    from envs.base import GoldRewardError, gold_fn

    gold = gold_fn(_Env(out), None, None)
    args = (["p"] * 4, ["a", "b", "c", "d"])
    if message is None:
        assert gold(*args).tolist() == [0.5] * 4
    else:
        with pytest.raises(GoldRewardError, match=message):
            gold(*args)


def test_env_recipes_check_the_gold_they_are_given(policy, prompts):
    """The pairs/references recipes (env.finish) check `env.gold`, naming the env."""
    from envs.base import GoldRewardError, references_from_samples

    env = _Env(lambda c: [float("nan")] * len(c))
    with pytest.raises(GoldRewardError, match=r"^env broken-env: gold reward returned nan for 4 of 4"):
        references_from_samples(policy, prompts, env.gold, max_new_tokens=4, seed=0)
    with pytest.raises(GoldRewardError, match=r"^gold reward returned nan"):  # a closure: bench adds the name
        references_from_samples(policy, prompts, lambda p, c: [float("nan")] * len(c), max_new_tokens=4, seed=0)


def test_evaluation_rows_with_nan_stop_the_trial_except_kl_where_it_is_not_estimated():
    from bench.worker.trial import check_eval_rows

    row = {"temperature": 1.0, "gold_reward": 0.6, "win_rate": 0.5, "gen_len": 9.0, "kl": 1.2, "kl_k3": 1.1,
           "kl_kind": "estimated"}
    check_eval_rows([row, {**row, "temperature": 0.0, "kl": math.nan, "kl_k3": math.nan, "kl_kind": "none"}], 6)
    check_eval_rows([{**row, "kl": math.nan, "kl_k3": math.nan, "kl_kind": "analytic"}], 6)
    with pytest.raises(NonFiniteError, match=r"^kl of the evaluation at step 6 \(T=1\) is nan$"):
        check_eval_rows([{**row, "kl": math.nan}], 6)
    with pytest.raises(NonFiniteError, match=r"^gold_reward of the evaluation at step 0 \(T=0.5\) is inf$"):
        check_eval_rows([{**row, "temperature": 0.5, "gold_reward": math.inf}], 0)


def test_logged_losses_rewards_and_kl_are_guarded_the_rest_may_be_nan():
    from bench.worker.trial import check_logged

    check_logged(3, {"losses/dpo": 0.6, "optim/grad_norm": math.nan, "optim/lr": 1e-4})
    for key in ("losses/dpo", "rewards/margin", "objective/kl", "policy/approx_kl"):
        with pytest.raises(NonFiniteError, match=f"^{key} at step 3 is nan$"):
            check_logged(3, {key: math.nan})


def _build(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(b"\x00" * 64)
        (tmp / "data.json").write_text("{}")
    return build


def test_a_corrupt_or_incomplete_cache_entry_is_detected_by_hash_and_rebuilt(tmp_path, capsys):
    from bench.run.prepare import _build_cached, cache_problem

    entry, calls = tmp_path / "envs" / "e-seed0-abc", []
    assert _build_cached(entry, _build(calls), "env e") == entry and len(calls) == 1
    assert set(json.loads((entry / "DONE").read_text())["files"]) == {"model/weights.bin", "data.json"}
    _build_cached(entry, _build(calls), "env e")
    assert len(calls) == 1 and "env e: cached at" in capsys.readouterr().err
    (entry / "reference_evals").mkdir()  # files added after the build are not part of the entry's hash
    (entry / "reference_evals" / "k.json").write_text("{}")
    assert cache_problem(entry) is None

    (entry / "model" / "weights.bin").write_bytes(b"\x00" * 63 + b"\x01")  # one byte changed
    assert cache_problem(entry) == "model/weights.bin does not match its sha256"
    _build_cached(entry, _build(calls), "env e")
    assert len(calls) == 2 and cache_problem(entry) is None
    assert "env e: cache entry" in capsys.readouterr().err
    assert not (entry / "reference_evals").exists()  # the whole entry was rebuilt
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temp or corrupt copies left

    (entry / "data.json").unlink()
    assert cache_problem(entry) == "data.json is missing"
    _build_cached(entry, _build(calls), "env e")
    assert len(calls) == 3 and cache_problem(entry) is None
    (entry / "DONE").write_text("{not json")
    assert cache_problem(entry) == "its DONE marker is unreadable"
    # an entry from before the hashes (DONE without "files") is used as it is
    (entry / "DONE").write_text(json.dumps({"seconds": 1.0}))
    assert cache_problem(entry) is None


def test_reasons_of_failed_trials_and_stages_are_one_line_root_causes():
    import ray.exceptions
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from bench.run.ray_runner import one_line

    died = WorkerGroupError("Training failed due to worker errors", {
        0: WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...", ray.exceptions.ActorDiedError()),
    })
    assert one_line(died).startswith("a Ray worker process died (killed by a signal or the out-of-memory killer")
    try:
        try:
            raise ValueError("env toy: gold reward returned nan for 3 of 8 completions\n(more)")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as e:
        outer = e
    assert one_line(WorkerGroupError("failed", {1: outer, 0: KeyError("first rank")})) == "KeyError: 'first rank'"
    assert one_line(WorkerGroupError("failed", {0: outer})) == \
        "ValueError: env toy: gold reward returned nan for 3 of 8 completions (more)"


def test_a_trial_stopped_by_a_fault_is_failed_with_its_reason_and_a_cut_row_is_dropped(tmp_path):
    from bench.config import TrialSpec
    from bench.results import collect

    specs = [TrialSpec(trial_id=t, algorithm="dpo", seed=0, knob="beta", knob_value=b, params={"beta": b}, train={})
             for t, b in (("ok", 0.5), ("stopped", 1.0))]
    from bench.results import EVAL_COLUMNS

    row = {**dict.fromkeys(EVAL_COLUMNS, 0.5), "suite": "s", "env": "e", "algorithm": "dpo", "seed": 0, "knob": "beta",
           "params": "{}", "step": 0, "final": False, "kl_kind": "estimated"}
    for spec in specs:
        tdir = tmp_path / "trials" / spec.trial_id
        tdir.mkdir(parents=True)
        lines = [json.dumps({**row, "trial_id": spec.trial_id, "knob_value": spec.knob_value})]
        (tdir / "evals.jsonl").write_text("\n".join(lines) + '\n{"suite": "s", "env": "e", "algo')  # killed mid-append
    (tmp_path / "trials" / "ok" / "summary.json").write_text(json.dumps({"wall_time_s": 1.0}))
    (tmp_path / "trials" / "stopped" / "failure.json").write_text(json.dumps({"reason": "NonFiniteError: x is nan"}))
    evals, trials = collect(tmp_path, "s", "e", specs, {"ok": None, "stopped": None})
    assert trials.set_index("trial_id")[["status", "reason"]].to_dict("index") == {
        "ok": {"status": "ok", "reason": ""}, "stopped": {"status": "failed", "reason": "NonFiniteError: x is nan"}}
    assert len(evals) == 2 and pd.read_parquet(tmp_path / "evals.parquet")["trial_id"].tolist() == ["ok", "stopped"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_become_keyboard_interrupt_and_handlers_are_restored(sig):
    from bench.run.driver import _stop_on_signals

    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        with _stop_on_signals():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes of the main thread
                pass
    assert signal.getsignal(sig) == before


def test_an_interrupted_run_is_one_line_exit_130_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the run was recorded keeps OUT (config.yaml, finished trials, checkpoints) for
    --resume; before that, OUT is removed as if the run had never started."""
    import bench.run.driver
    from bench.cli import main

    def interrupted_after_start(suite, trials, out_dir, address, resume=False):
        (out_dir / "config.yaml").write_text("name: quick\n")
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(bench.run.driver, "check_env_reachable", lambda suite: None)
    monkeypatch.setattr(bench.run.driver, "_run", interrupted_after_start)
    assert main(["run", "--out", str(out), "--set", "train.steps=5"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    from bench.config import expand_trials, load_suite

    n = len(expand_trials(load_suite(None)))  # the quick suite's trials
    assert err == [f"prefbench: interrupted: 0 of {n} trials finished and kept in {out} (the others from their last "
                   f"checkpoints); continue with: prefbench run --out {out} --set train.steps=5 --resume"]
    assert (out / "config.yaml").is_file()

    def interrupted_before_start(suite, trials, out_dir, address, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.run.driver, "_run", interrupted_before_start)
    assert main(["run", "--out", str(tmp_path / "early")]) == 130
    assert capsys.readouterr().err.strip() == "prefbench: interrupted before the run started; nothing was written"
    assert not (tmp_path / "early").exists()


def test_prompts_plus_sampled_tokens_must_fit_the_policy_context(tiny_env_dir):
    """eval.max_new_tokens beyond the policy's positions would crash every trial mid-run (GPT-2's
    position embeddings): one line before the sweep instead."""
    from bench.run.prepare import context_problem

    prompts = ["the movie was", "i loved the acting and the plot of the"]
    assert context_problem(tiny_env_dir / "init", prompts, 24) is None
    assert context_problem(tiny_env_dir / "no-such-model", prompts, 10_000) is None  # e.g. a GGUF policy
    problem = context_problem(tiny_env_dir / "init", prompts, 120)
    assert problem == ("1 of 2 prompts (eval, and train for algorithms that sample them) do not fit the policy's "
                       "context of 128 tokens with eval.max_new_tokens=120: the longest is 10 tokens; "
                       "set eval.max_new_tokens <= 118")
