"""`prefbench export-env`: the env in Hugging Face / TRL formats, and TRL training on it unchanged.

The export uses the params of tests/suites/e2e.yaml, so it is the very env (same cache key) that
`prefbench run tests/suites/e2e.yaml` prepares: the tests share the e2e tests' cache (conftest's
`e2e_cache`, or PREFBENCH_CACHE when set), so an env already prepared there is exported in seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

E2E = str(Path(__file__).parent / "suites" / "e2e.yaml")
E2E_PARAMS = ["num_reviews=1500", "sft_epochs=1", "num_train_prompts=100", "num_eval_prompts=32", "n_layer=2",
              "n_embd=64"]
SETS = [a for p in E2E_PARAMS for a in ("--set", f"env.params.{p}")]
FILES = {"pairs.parquet": ["prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "chosen_ended", "rejected_ended"],
         "prompts.parquet": ["prompt"], "eval_prompts.parquet": ["prompt"],
         "references.parquet": ["prompt", "completion", "gold", "ended"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, e2e_cache):
    base = tmp_path_factory.mktemp("export")
    cache = Path(os.environ.get("PREFBENCH_CACHE") or e2e_cache)
    out = base / "tiny"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "export-env", "tiny-sentiment", str(out), *SETS],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PREFBENCH_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == str(out)
    return out, proc.stderr, cache


@pytest.mark.slow
def test_export_loads_with_transformers_and_datasets(exported, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = exported
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    assert tokenizer.eos_token == "<eos>" and tokenizer("the movie was")["input_ids"][0] == tokenizer.bos_token_id
    rows = {}
    for name, columns in FILES.items():
        ds = load_dataset("parquet", data_files=str(out / name), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.column_names == columns, name
        rows[name] = len(ds)
    assert rows["prompts.parquet"] == 100 and rows["eval_prompts.parquet"] == rows["references.parquet"] == 32
    assert rows["pairs.parquet"] > 0
    # the card's YAML header names the files: load_dataset(DIR, config) finds them
    pairs = load_dataset(str(out), "pairs", split="train", cache_dir=str(tmp_path / "hf"))
    assert pairs.column_names == FILES["pairs.parquet"] and len(pairs) == rows["pairs.parquet"]
    assert load_dataset(str(out), "eval_prompts", split="train", cache_dir=str(tmp_path / "hf"))["prompt"] == \
        pd.read_parquet(out / "eval_prompts.parquet")["prompt"].tolist()


@pytest.mark.slow
def test_export_is_the_env_a_run_of_the_same_env_section_uses(exported):
    from bench.config import load_suite
    from bench.run.prepare import env_cache_dir
    from envs.base import load_env_data

    out, stderr, cache = exported
    env_dir = env_cache_dir(load_suite(E2E, [f"cache_dir={cache}"]), 0)  # the e2e run's env
    assert str(env_dir) in stderr and (env_dir / "DONE").exists()
    data = load_env_data(env_dir)
    pairs = pd.read_parquet(out / "pairs.parquet")
    # completions carry TRL's leading space (the empty ones stay empty); stripped, they are prefbench's strings
    for column in ("chosen", "rejected"):
        assert pairs[column].map(lambda c: c == "" or (c[0] == " " and c[1] != " ")).all(), column
    stripped = pairs.assign(chosen=pairs["chosen"].str.removeprefix(" "), rejected=pairs["rejected"].str.removeprefix(" "))
    pd.testing.assert_frame_equal(stripped, data.pairs)
    assert (pairs["chosen_gold"] > pairs["rejected_gold"]).all()
    assert pd.read_parquet(out / "prompts.parquet")["prompt"].tolist() == data.train_prompts
    assert pd.read_parquet(out / "eval_prompts.parquet")["prompt"].tolist() == data.eval_prompts
    assert (out / "sft" / "model.safetensors").read_bytes() == (env_dir / "sft" / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    cut = int((~pairs["chosen_ended"]).sum() + (~pairs["rejected_ended"]).sum())  # no EOS for prefbench, one for TRL
    agree = (f"agree on all {2 * len(pairs)} pair completions" if cut == 0 else
             f"differ on {cut} of {2 * len(pairs)} pair completions (checked at export): {cut} of them were cut")
    for text in ("tiny-sentiment", "num_reviews: 1500", "n_embd: 64", "seeds:\n- 0", str(env_dir),
                 "VADER compound of prompt + completion, mapped from [-1, 1] to [0, 1]", "DPOTrainer(model=model", agree):
        assert text in card, text


# TRL, as a user would run it on the folder: nothing converted, renamed or dropped. A subprocess, so
# that accelerate's state stays out of the test process.
TRL_SCRIPT = r"""
import json, math, sys
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
from algorithms.policy import Policy

D, work = sys.argv[1], sys.argv[2]
exec(sys.argv[3], {})  # the card's own TRL example, shortened to 2 steps
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(f"{D}/sft")
tokenizer = AutoTokenizer.from_pretrained(f"{D}/sft")
pairs = load_dataset("parquet", data_files=f"{D}/pairs.parquet", split="train")
before = {k: v.clone() for k, v in model.state_dict().items()}
common = dict(learning_rate=1e-3, per_device_train_batch_size=16, use_cpu=True, report_to=[], save_strategy="no",
              logging_steps=1, disable_tqdm=True)
dpo = DPOTrainer(model=model, args=DPOConfig(output_dir=f"{work}/dpo", beta=0.1, max_steps=3, **common),
                 train_dataset=pairs, processing_class=tokenizer)
dpo.train()
# the token ids TRL trained on vs those prefbench trains on (algorithms.policy conventions)
ours = Policy(None, tokenizer)
ds = dpo.train_dataset
ended = pairs["chosen_ended"]
pb = [p + c for p, c in zip(ours.encode_prompts(pairs["prompt"]),
                            ours.encode_completions([c.strip() for c in pairs["chosen"]], ended=ended))]
trl = [list(p) + list(c) for p, c in zip(ds["prompt_ids"], ds["chosen_ids"])]
# the same ids, except that TRL appends an EOS to a completion cut at max_new_tokens and prefbench does not
same = all(a == t if e else a + [tokenizer.eos_token_id] == t for a, t, e in zip(pb, trl, ended))
rm = AutoModelForSequenceClassification.from_pretrained(f"{D}/sft", num_labels=1)
rt = RewardTrainer(model=rm, args=RewardConfig(output_dir=f"{work}/rm", max_steps=2, **common), train_dataset=pairs,
                   processing_class=tokenizer)
rt.train()
dpo_logs = [r for r in dpo.state.log_history if "loss" in r]
print(json.dumps({
    "dpo_loss": [r["loss"] for r in dpo_logs], "dpo_accuracy": [r.get("rewards/accuracies") for r in dpo_logs],
    "changed": sum(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "tensors": len(before),
    "same_tokens": same, "rows": [len(pairs), len(ds)], "columns": pairs.column_names,
    "rm_loss": [r["loss"] for r in rt.state.log_history if "loss" in r],
}))
"""


@pytest.mark.slow
def test_trl_dpo_and_reward_trainers_train_on_the_export_unchanged(exported, tmp_path):
    out, _, _ = exported
    card = (out / "README.md").read_text()
    snippet = re.search(r"## Train with TRL\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "max_steps=100" in snippet and "DPOTrainer(model=model" in snippet
    snippet = snippet.replace("max_steps=100", "max_steps=2").replace('"dpo-out"', repr(str(tmp_path / "card")))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(out), str(tmp_path), snippet], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["columns"] == FILES["pairs.parquet"]  # the gold columns ride along; TRL ignores them
    assert r["rows"][0] == r["rows"][1]  # TRL dropped no pair
    assert r["same_tokens"]  # TRL's prompt + chosen string tokenises to prefbench's ids (+ EOS where cut)
    assert len(r["dpo_loss"]) == 3 and all(math.isfinite(x) for x in r["dpo_loss"])
    assert r["dpo_loss"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert all(a is not None for a in r["dpo_accuracy"])
    assert r["changed"] == r["tensors"]  # every weight tensor of the policy moved
    assert len(r["rm_loss"]) == 2 and all(math.isfinite(x) for x in r["rm_loss"])


@pytest.mark.slow
def test_cached_env_exports_without_starting_ray(exported, tmp_path, monkeypatch, capsys):
    from bench.run import ray_runner
    from bench.export import export_env

    out, _, cache = exported

    def no_ray(*a, **k):
        raise AssertionError("a cached env must not start Ray")

    monkeypatch.setattr(ray_runner, "start_ray", no_ray)
    monkeypatch.setenv("PREFBENCH_CACHE", str(cache))
    again = tmp_path / "again"
    again.mkdir()  # an existing empty DIR is fine, as for run --out
    export_env("tiny-sentiment", again, [f"env.params.{p}" for p in E2E_PARAMS])
    assert "cached at" in capsys.readouterr().err
    for name in FILES:
        pd.testing.assert_frame_equal(pd.read_parquet(again / name), pd.read_parquet(out / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folder left beside it


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    from bench import export

    _, _, cache = exported

    def broken_card(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_card", broken_card)  # fails after the data and model files are written
    monkeypatch.setenv("PREFBENCH_CACHE", str(cache))
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_env("tiny-sentiment", tmp_path / "new" / "env", [f"env.params.{p}" for p in E2E_PARAMS])
    assert list(tmp_path.iterdir()) == []  # neither DIR, nor its temp folder, nor the parent made for it


def _main(args, capsys):
    from bench.cli import main

    code = main(["export-env", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args, message", [
    (["no-such-env"], "unknown env 'no-such-env' (known: "),
    (["tiny-sentiment", "--set", "env.params.n_embd=65"], "env.params.n_embd: must be divisible by n_head"),
    (["tiny-sentiment", "--set", "env.params.bogus=1"], "env.params.bogus"),
    (["tiny-sentiment", "--set", "train.steps=5"], "--set train.steps: export-env takes env.params.*"),
    (["tiny-sentiment", "--set", "num_reviews=10"], "(did you mean env.params.num_reviews?)"),
    (["tiny-sentiment", "--set", "env.name=imdb"], "--set env.name: export-env takes"),
])
def test_config_mistakes_are_one_line_exit_2_and_create_nothing(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFBENCH_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "out" / "env"
    code, err = _main([args[0], str(dest), *args[1:]], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prefbench: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no DIR, no parent, no cache


def test_non_empty_dir_is_one_line_exit_2_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFBENCH_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    code, err = _main(["tiny-sentiment", str(dest)], capsys)
    assert code == 2
    assert err == [f"prefbench: error: {dest}: already exists and is not an empty directory"]
    assert [p.name for p in dest.iterdir()] == ["notes.txt"] and (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
