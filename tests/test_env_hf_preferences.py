"""The hf-preferences env (bring your own preference data) on local files made here: a dataset folder
in TRL's format (prompt / chosen / rejected, parquet, laid out like a hub repo), a tiny GPT-2 as the
reference, and a gold scorer that is a local sequence classifier or a Python function. No network,
no Ray (except the one slow end-to-end run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from algorithms.interface import ParamError
from envs.hub import Unavailable
from tests.local_hub import save_tiny_classifier, save_tiny_gpt2, write_dataset

FRUITS = ["apple", "pear", "plum", "kiwi", "fig", "lime", "date", "melon"]


def question(i: int, long: bool = False) -> str:
    text = f"Question {i}: what do you think of the {FRUITS[i % len(FRUITS)]}?"
    return (text + " Please explain at length." * 40 if long else text) + "\nAnswer:"


def pair_rows(indices, long=(), tie=(), null=()) -> dict:
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in indices:
        rows["prompt"].append(None if i in null else question(i, i in long))
        rows["chosen"].append(f" I love the {FRUITS[i % len(FRUITS)]}, it is great.")
        rows["rejected"].append(rows["chosen"][-1] if i in tie else f" The {FRUITS[i % len(FRUITS)]} is bad.")
    return rows


def length_gold(prompts, completions):
    """A gold reward for the callable kind: the completion's length in characters / 100."""
    return np.array([len(c) / 100 for c in completions])


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("prefs-hub")
    train = pair_rows(range(24), long={5}, tie={6}, null={7})
    test = pair_rows(range(30, 40), long={33})
    test["prompt"].append(test["prompt"][0])  # a prompt twice: one eval prompt, its first chosen the reference
    test["chosen"].append(" a later chosen answer")
    test["rejected"].append(" a later rejected answer")
    texts = train["chosen"] + train["rejected"] + [q for q in train["prompt"] + test["prompt"] if q]
    return {
        "dataset": write_dataset(base / "prefs", ["prompt", "chosen", "rejected"], {"train": train, "test": test}),
        "model": str(save_tiny_gpt2(base / "gpt2", texts)),
        "rm": str(save_tiny_classifier(base / "rm", texts, id2label={0: "LABEL_0"})),
        "sentiment": str(save_tiny_classifier(base / "sentiment", texts, id2label={0: "NEGATIVE", 1: "POSITIVE"})),
        "base": base,
    }


def params(hub, **changes):
    from envs.hf_preferences import HfPreferencesParams

    values = dict(model=hub["model"], dataset=hub["dataset"], eval_split="test", max_prompt_tokens=60, max_new_tokens=24,
                  gold={"kind": "classifier", "model": hub["rm"], "batch_size": 4})
    return HfPreferencesParams(**{**values, **changes})


def build(hub, tmp_path, **changes):
    from envs import ENVS

    env = ENVS.get("hf-preferences")
    p = params(hub, **changes)
    env.build(p, 0, tmp_path)
    env.finish(env.load_policy(tmp_path, "init"), p, 0, tmp_path)
    return env, p


def test_build_and_finish_keep_the_dataset_s_pairs_and_chosen_references(hub, tmp_path, capsys):
    from envs.base import load_env_data

    env, p = build(hub, tmp_path)
    data = load_env_data(tmp_path)
    source = pd.read_parquet(sorted((hub["base"] / "prefs" / "data").glob("train-*"))[0])
    kept = {i for i in range(24)} - {5, 6, 7}  # long prompt, chosen == rejected, null prompt
    assert sorted(data.pairs["prompt"]) == sorted(question(i) for i in kept)
    for row in data.pairs.itertuples():  # the dataset's own texts, untouched
        match = source[source["prompt"] == row.prompt].iloc[0]
        assert (row.chosen, row.rejected) == (match["chosen"], match["rejected"])
    assert sorted(data.train_prompts) == sorted(question(i) for i in kept)
    assert sorted(data.eval_prompts) == sorted(question(i) for i in range(30, 40) if i != 33)
    refs = data.references.set_index("prompt")
    assert refs.loc[question(30), "completion"] == f" I love the {FRUITS[30 % 8]}, it is great."  # its first chosen
    assert refs["gold"].notna().all() and refs["gold"].nunique() > 1  # the classifier's logits
    stats = json.loads((tmp_path / "data_stats.json").read_text())
    assert stats["pairs"] == {"split": "train", "kept": 21, "examined": 22, "dropped_long": 1, "dropped_null": 1,
                              "dropped_ties": 1}
    err = capsys.readouterr().err
    assert "pairs: dropped 1 of 22 examined longer than max_prompt_tokens=60" in err
    assert env.sft_corpus(p, tmp_path) is None
    corpus = env.sft_corpus(params(hub, sft_epochs=1.0), tmp_path)
    assert sorted(corpus) == sorted(question(i) + f" I love the {FRUITS[i % 8]}, it is great." for i in kept)


def test_selection_is_seeded_and_capped(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("hf-preferences")
    picks = []
    for k, seed in enumerate((0, 0, 1)):
        d = tmp_path / str(k)
        d.mkdir()
        env.build(params(hub, num_pairs=5, num_eval_prompts=3), seed, d)
        picks.append((pd.read_parquet(d / "train_pairs.parquet")["prompt"].tolist(),
                      json.loads((d / "prompts.json").read_text())["eval"]))
    assert picks[0] == picks[1] != picks[2]
    assert len(picks[0][0]) == 5 and len(picks[0][1]) == 3


def test_gold_classifier_probability_of_a_label_and_a_python_function(hub, tmp_path):
    from envs import ENVS
    from envs.hf_preferences import _classifier

    env = ENVS.get("hf-preferences")
    prompts, completions = [question(1), question(2)], [" good", " a much longer completion"]
    pos = env.gold_for(params(hub, gold={"kind": "classifier", "model": hub["sentiment"], "label": "positive"}))
    neg = env.gold_for(params(hub, gold={"kind": "classifier", "model": hub["sentiment"], "label": 0}))
    last = env.gold_for(params(hub, gold={"kind": "classifier", "model": hub["sentiment"]}))
    p, n = pos(prompts, completions), neg(prompts, completions)
    assert np.allclose(p + n, 1.0) and np.allclose(last(prompts, completions), p) and ((0 < p) & (p < 1)).all()
    # the text-pair input is the classifier's own: equal to calling the model by hand
    import torch

    tok, model = _classifier(hub["sentiment"])
    with torch.inference_mode():
        logits = model(**tok(prompts, completions, padding=True, return_tensors="pt")).logits
    assert np.allclose(p, torch.softmax(logits.double(), -1)[:, 1].numpy())
    fn = env.gold_for(params(hub, gold={"kind": "callable", "function": "tests.test_env_hf_preferences:length_gold"}))
    assert fn(prompts, completions).tolist() == [0.05, 0.25]
    env2, _ = build(hub, tmp_path, gold={"kind": "callable", "function": "tests.test_env_hf_preferences:length_gold"},
                    reference="sft")
    refs = pd.read_parquet(tmp_path / "references.parquet")  # one SFT sample per eval prompt, scored by the function
    assert refs["gold"].tolist() == [len(c) / 100 for c in refs["completion"]] and "ended" in refs


@pytest.mark.parametrize("change, message", [
    ({"gold": {}}, "gold: expected a mapping with a kind"),
    ({"gold": {"kind": "judge"}}, "gold.kind: unknown gold kind 'judge'"),
    ({"gold": {"kind": "classifier", "model": ""}}, "gold.model: must name a sequence-classification model"),
    ({"gold": {"kind": "classifier", "model": "m", "batch": 2}}, "gold.batch: unknown key for the classifier gold"),
    ({"gold": {"kind": "classifier", "model": "m", "text_pair": 1}}, "gold.text_pair: expected bool, got 1"),
    ({"gold": {"kind": "callable", "function": "no_colon"}}, "gold.function: must be 'package.module:name'"),
    ({"reference": "human"}, "reference: must be 'chosen' or 'sft'"),
    ({"model": ""}, "model: must be a non-empty string"),
])
def test_params_are_validated_and_named(hub, change, message):
    with pytest.raises(ParamError) as e:
        params(hub, **change)
    assert str(e.value).startswith(message)


def test_unusable_data_is_one_line_naming_the_param(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("hf-preferences")
    implicit = write_dataset(tmp_path / "implicit", ["chosen", "rejected"],
                             {"train": {"chosen": ["a b"], "rejected": ["a c"]}, "test": {"chosen": ["a"], "rejected": ["b"]}})
    cases = [
        (params(hub, dataset=implicit), "has columns ['chosen', 'rejected']; missing ['prompt']"),
        (params(hub, eval_split="validation"), "cannot load split 'validation' of dataset"),
        (params(hub, max_prompt_tokens=2), "no pair of dataset"),
    ]
    for k, (p, message) in enumerate(cases):
        d = tmp_path / f"w{k}"
        d.mkdir()
        with pytest.raises(ValueError) as e:
            env.build(p, 0, d)
        assert message in str(e.value) and "\n" not in str(e.value) and "env.params" in str(e.value)


def test_preflight_names_what_is_missing_in_one_line(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("hf-preferences")
    env.preflight(params(hub))  # all local: fine
    for p, message in [
        (params(hub, model=str(tmp_path / "nope")), "env.params.model"),
        (params(hub, gold={"kind": "classifier", "model": str(tmp_path / "nope")}), "env.params.gold.model"),
        (params(hub, gold={"kind": "callable", "function": "no_such_module_xyz:f"}),
         "env.params.gold.function = no_such_module_xyz:f: cannot import it (ModuleNotFoundError"),
    ]:
        with pytest.raises(Unavailable) as e:
            env.preflight(p)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_dataset_is_exit_2_one_line_and_no_output(hub, tmp_path):
    empty = write_dataset(tmp_path / "empty", ["prompt", "chosen", "rejected"],
                          {"train": {"prompt": [], "chosen": [], "rejected": []},
                           "test": {"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}})
    suite = _suite(hub, dataset=empty)
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(suite))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prefbench: error:")]
    assert len(errors) == 1 and "dataset" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def _suite(hub, **env_changes) -> dict:
    return {
        "name": "prefs-e2e",
        "env": {"name": "hf-preferences", "params": {
            "model": hub["model"], "dataset": hub["dataset"], "eval_split": "test", "max_prompt_tokens": 60,
            "max_new_tokens": 16,
            "gold": {"kind": "classifier", "model": hub["sentiment"], "label": "POSITIVE"}, **env_changes}},
        "seeds": [0],
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 2},
        "eval": {"num_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "temperatures": [0.0, 1.0]},
        "reward_model": {"epochs": 1.0, "batch_size": 4},
        "algorithms": [{"name": "dpo", "sweep": {"beta": [0.5]}}, {"name": "online-dpo", "sweep": {"beta": [0.5]}}],
        "scaling": {"num_workers": 1, "max_concurrent_trials": 2},
    }


@pytest.mark.slow
def test_prefbench_run_on_your_own_preference_data(hub, tmp_path):
    """`prefbench run` end to end on the local files: the SFT baseline, DPO on the dataset's pairs and
    online DPO with the reward model trained on them, judged by the local classifier; real Ray + DeepSpeed."""
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(_suite(hub)))  # JSON is YAML
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PREFBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    assert set(trials["algorithm"]) == {"sft", "dpo", "online-dpo"}
    evals = pd.read_parquet(out / "evals.parquet")
    final = evals[evals["final"]]
    assert sorted(set(final["temperature"])) == [0.0, 1.0]
    assert final["gold_reward"].between(0, 1).all() and final["win_rate"].between(0, 1).all()
    assert "## Online vs offline" in (out / "report.md").read_text()
