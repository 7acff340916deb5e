"""User mistakes in suites: one line on stderr naming the key, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bench.config import ConfigError, expand_trials, load_suite
from tests.cli import cli_in_process

GOOD = textwrap.dedent("""\
    name: t
    env: {name: tiny-sentiment}
    train: {steps: 5, batch_size: 8}
    algorithms:
      - name: dpo
        sweep: {beta: [0.5, 1.0]}
    """)


def _process(*args):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "suite, key",
    [
        (GOOD.replace("train:", "trian:"), "trian: unknown key"),
        (GOOD.replace("steps: 5", "step: 5"), "train.step: unknown key"),
        (GOOD.replace("beta: [0.5, 1.0]", "beta: [0.5, 0.0]"), "algorithms[0].sweep.beta: must be > 0"),
        (GOOD.replace("beta: [0.5, 1.0]", "bta: [0.5]"), "algorithms[0].sweep.bta: unknown parameter"),
        (GOOD.replace("name: dpo", "name: dpoo"), "algorithms[0].name: unknown algorithm 'dpoo'"),
        (GOOD.replace("tiny-sentiment", "tiny-sentimnt"), "env.name: unknown env 'tiny-sentimnt'"),
        (GOOD.replace("steps: 5", "steps: five"), "train.steps: expected int"),
        (GOOD + "eval: {temperatures: [1.0, -0.5]}\n", "eval.temperatures: must be >= 0"),
        (GOOD + "scaling: {num_workers: 3}\n", "train.batch_size: must be divisible by scaling.num_workers"),
        (GOOD.replace("batch_size: 8", "batch_size: 9") + "scaling: {num_workers: 3}\n",
         "env.params: the SFT batch (64) must be divisible by scaling.num_workers"),
        (GOOD + "deepspeed: {zero_stage: 4}\n", "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
        (GOOD + "deepspeed: {zero_stage: 2, offload_param: true}\n", "deepspeed.offload_param: needs zero_stage 3"),
        (GOOD + "deepspeed: {offload_optimizer: true}\n", "deepspeed.offload_optimizer: needs zero_stage >= 1"),
        (GOOD + "deepspeed: {bf16: true, autocast: true}\n", "deepspeed.autocast: and bf16 exclude each other"),
        (GOOD + "scaling: {resources_per_worker: {CPU: -1}}\n", "scaling.resources_per_worker: expected resource name"),
        (GOOD + "scaling: {max_failures: -1}\n", "scaling.max_failures: must be >= 0"),
        (GOOD.replace("batch_size: 8", "batch_size: 12").replace("sweep: {beta: [0.5, 1.0]}",
                                                                "params: {rollout_chunk: 8}").replace("dpo", "rloo"),
         "algorithms[0].params.rollout_chunk: 8 must divide the per-worker batch 12"),
        (GOOD + "report: {kl_budgets: []}\n", "report.kl_budgets: must list at least one KL budget"),
        (GOOD + "report: {kl_budgets: [1, -3]}\n", "report.kl_budgets: must be finite numbers > 0"),
        (GOOD + "report: {temperature_kl_budget: .inf}\n", "report.temperature_kl_budget: must be a finite number > 0"),
        (GOOD + "report: {confidence: 95}\n", "report.confidence: must be between 0 and 1"),
        (GOOD + "report: {kl_budget: [1]}\n", "report.kl_budget: unknown key"),
        (GOOD + "env: {params: {num_reviews: 0}}\n", "duplicate key 'env' (line 7)"),
        (GOOD.replace("{name: tiny-sentiment}", "{name: tiny-sentiment, params: {num_reviews: 0}}"),
         "env.params.num_reviews: must be an integer >= 1"),
    ],
)
def test_bad_suites_fail_with_one_line_and_exit_2(tmp_path, capsys, suite, key):
    path = tmp_path / "bad.yaml"
    path.write_text(suite)
    out = tmp_path / "out"
    proc = cli_in_process(capsys, "run", str(path), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prefbench: error: ")
    assert key in lines[0]
    assert not out.exists()  # nothing half-written


def test_a_bad_suite_is_one_line_and_exit_2_from_the_console_process(tmp_path):
    """As above, from a real `prefbench run` process: no traceback, exit status 2, nothing written."""
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("name: dpo", "name: dpoo"))
    proc = _process("run", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "algorithms[0].name: unknown algorithm 'dpoo'" in proc.stderr and not (tmp_path / "out").exists()


def test_missing_suite_file_and_bad_override(tmp_path, capsys):
    proc = cli_in_process(capsys, "run", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    proc = cli_in_process(capsys, "run", "--set", "train.lr=-1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "train.lr: must be > 0" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_directory_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = cli_in_process(capsys, "run", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_report_of_a_non_run_directory(tmp_path, capsys):
    proc = cli_in_process(capsys, "report", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def _dpo_index() -> int:
    return [a.name for a in load_suite(None).algorithms].index("dpo")


def test_quick_suite_and_overrides_expand_to_the_sweep_grid():
    suite = load_suite(None, ["seeds=[0, 1]", f"algorithms.{_dpo_index()}.sweep.beta=[0.5, 1.0]"])
    trials = expand_trials(suite)
    ids = [t.trial_id for t in trials if t.algorithm in ("sft", "dpo")]
    assert ids == ["sft-seed0", "sft-seed1", "dpo-beta=0.5-seed0", "dpo-beta=0.5-seed1",
                   "dpo-beta=1.0-seed0", "dpo-beta=1.0-seed1"]
    dpo = next(t for t in trials if t.algorithm == "dpo")
    assert dpo.knob == "beta" and dpo.knob_value == 0.5 and dpo.params == {"beta": 0.5}
    assert dpo.train["steps"] == suite.train.steps


def test_quick_suite_covers_every_algorithm_with_a_frontier():
    suite = load_suite(None)
    assert suite.env.name == "tiny-sentiment"
    assert suite.eval.temperatures == [0.0, 0.25, 0.5, 0.75, 1.0]
    trials = expand_trials(suite)
    points = {}
    for t in trials:
        points.setdefault(t.algorithm, set()).add(t.knob_value)
    from algorithms import ALGORITHMS

    in_tree = {n for n in ALGORITHMS.names() if ALGORITHMS.origin(n).startswith("in-tree")}
    assert set(points) == in_tree  # every in-tree algorithm, the on-policy ones and SimPO included
    assert len(points["dpo"]) >= 4 and len(points["ppo"]) >= 4
    # every trainable method takes ~150 optimizer steps of 32 prompts or pairs (PPO: 40 rollouts x 4 epochs)
    for t in trials:
        algo = ALGORITHMS.get(t.algorithm)
        if algo.trains_policy:
            p = algo.params_cls(**t.params)
            per_step = getattr(p, "ppo_epochs", 1) * getattr(p, "num_minibatches", 1) * getattr(p, "epochs", 1)
            assert 150 <= t.train["steps"] * per_step <= 160 and t.train["batch_size"] == 32, t.trial_id
    bon = next(t for t in trials if t.algorithm == "best-of-n")
    assert bon.params["n"] == 64  # every n = 1 … 64 is reported from these 64 samples


def test_a_rollout_chunk_above_the_per_worker_batch_is_one_generation_call():
    suite = load_suite(None, ["train.batch_size=4", "scaling.num_workers=2"])  # per-worker 2, rollout_chunk 8
    assert {t.algorithm for t in expand_trials(suite)} >= {"online-dpo", "rloo", "grpo", "ppo"}


def test_knob_override_and_reward_model_section():
    suite = load_suite(None, ["algorithms=[{name: ppo, knob: target_kl, sweep: {target_kl: [3.0, 6.0]}}]"])
    ppo = [t for t in expand_trials(suite) if t.algorithm == "ppo"]
    assert [(t.knob, t.knob_value) for t in ppo] == [("target_kl", 3.0), ("target_kl", 6.0)]
    with pytest.raises(ConfigError, match=r"algorithms\[0\]\.knob: ppo has no parameter 'tkl'"):
        load_suite(None, ["algorithms=[{name: ppo, knob: tkl}]"])
    with pytest.raises(ConfigError, match="reward_model.epoch: unknown key"):
        load_suite(None, ["reward_model.epoch=2"])
    with pytest.raises(ConfigError, match="reward_model.batch_size: must be divisible"):
        load_suite(None, ["reward_model.batch_size=63", "scaling.num_workers=2"])
    assert load_suite(None, ["reward_model.lr=1e-3"]).reward_model.lr == 1e-3


def test_per_algorithm_train_override_and_list_index_errors():
    suite = load_suite(None, [f"algorithms.{_dpo_index()}.train={{steps: 7}}"])
    assert {t.train["steps"] for t in expand_trials(suite) if t.algorithm == "dpo"} == {7}
    with pytest.raises(ConfigError, match="no list item"):
        load_suite(None, ["algorithms.30.name=dpo"])


def test_random_search_draws_reproducible_points_within_their_distributions():
    algorithms = ("algorithms=[{name: dpo, search: random, num_samples: 6, sweep: {beta: {loguniform: [0.05, 5.0]}}},"
                  " {name: ppo, search: random, num_samples: 4, sweep: {kl_coef: {uniform: [0.01, 0.5]},"
                  " ppo_epochs: {randint: [1, 4]}}}]")
    trials = expand_trials(load_suite(None, [algorithms, "seeds=[0, 1]"]))
    again = expand_trials(load_suite(None, [algorithms, "seeds=[0, 1]"]))
    assert [t.trial_id for t in trials] == [t.trial_id for t in again]  # same suite, same points
    betas = sorted({t.knob_value for t in trials if t.algorithm == "dpo"})
    assert len(betas) == 6 and all(0.05 <= b <= 5.0 for b in betas)
    assert len({round(b, 3) for b in betas}) == 6  # spread over the range, not one value
    ppo = [t for t in trials if t.algorithm == "ppo"]
    assert len(ppo) == 4 * 2 and {t.seed for t in ppo} == {0, 1}
    assert all(0.01 <= t.params["kl_coef"] <= 0.5 and t.params["ppo_epochs"] in (1, 2, 3, 4) for t in ppo)
    # a list under random search is a uniform choice; repeated draws collapse to distinct points
    choice = expand_trials(load_suite(None, ["algorithms=[{name: dpo, search: random, num_samples: 20,"
                                             " sweep: {beta: [0.5, 1.0]}}]"]))
    assert sorted(t.knob_value for t in choice if t.algorithm == "dpo") == [0.5, 1.0]


@pytest.mark.parametrize(
    "algorithms, message",
    [
        ("[{name: dpo, search: random, sweep: {beta: {loguniform: [0, 5]}}}]",
         "algorithms[0].sweep.beta.loguniform: expected [lo, hi] with lo <= hi and lo > 0"),
        ("[{name: dpo, sweep: {beta: {uniform: [0.1, 5]}}}]", "distributions need search: random"),
        ("[{name: dpo, search: bayes}]", "algorithms[0].search: must be 'grid' or 'random'"),
        ("[{name: dpo, num_samples: 3, sweep: {beta: [1.0]}}]", "num_samples: applies to search: random"),
        ("[{name: dpo, search: random, sweep: {beta: {normal: [1, 2]}}}]", "one of {uniform|loguniform|randint"),
        ("[{name: dpo, search: random, sweep: {beta: {uniform: [-1, 0]}}}]", "algorithms[0].sweep.beta: must be > 0"),
    ],
)
def test_bad_random_search_is_one_config_error(algorithms, message):
    with pytest.raises(ConfigError) as err:
        load_suite(None, [f"algorithms={algorithms}"])
    assert message in str(err.value)


def test_precision_is_part_of_the_cache_keys_and_fp32_keys_are_unchanged():
    """An env or reward model trained under bf16 autocast is not reused by an fp32 run (nor the
    reverse); adding the option left the keys of fp32 runs as they were (the same JSON as before)."""
    import dataclasses
    import hashlib
    import json

    from bench.config import load_suite
    from bench.run.prepare import ENV_CACHE_FORMAT, env_key, env_params, rm_key
    from envs import ENVS

    fp32 = load_suite(None, [])
    mixed = load_suite(None, ["deepspeed.autocast=true"])
    assert env_key(mixed, 0) != env_key(fp32, 0) and rm_key(mixed, 0) != rm_key(fp32, 0)
    before = json.dumps({"env": fp32.env.name, "params": dataclasses.asdict(env_params(fp32)), "seed": 0, "bf16": False,
                         "format": ENV_CACHE_FORMAT, "env_version": ENVS.get(fp32.env.name).version}, sort_keys=True)
    assert env_key(fp32, 0) == hashlib.sha256(before.encode()).hexdigest()[:16]
