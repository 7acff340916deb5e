"""The imdb env (the DPO paper's IMDb task) on tiny local files in the hub's formats, no network.

A parquet dataset folder laid out like the hub repo stanfordnlp/imdb (plain_text/{split}-00000-of-00001.parquet,
a README whose YAML header has the card's `dataset_info` and `configs:`), a tiny GPT-2 and a tiny RoBERTa
sentiment classifier saved with save_pretrained: the env loads them through the same code as hub ids.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from envs.hub import Unavailable
from tests.local_hub import save_tiny_classifier, save_tiny_gpt2

FILMS = ["movie", "film", "thriller", "comedy", "sequel", "western"]
GOOD = ["great", "wonderful", "moving", "funny", "brilliant"]
BAD = ["boring", "awful", "dull", "silly", "weak"]


def make_reviews(opening: str, n: int, seed: int) -> list[tuple[str, int]]:
    """n short reviews that all start with `opening` (so a prefix tells its split); some hold "<br />"."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = GOOD if label else BAD
        film = FILMS[i % len(FILMS)]
        text = (f"{opening} this {film} and it was {rng.choice(words)}.<br /><br />The acting was "
                f"{rng.choice(words)} and the plot was {rng.choice(words)}, {i} out of ten.")
        if i % 3 == 0:
            text = text.replace("<br /><br />", " ")  # some reviews have no line breaks
        out.append((text, label))
    return out


def clean(text: str) -> str:
    return " ".join(text.replace("<br />", " ").split())


def write_hub_dataset(root: Path, splits: dict[str, list[tuple[str, int]]]) -> Path:
    """A folder in the layout of the hub repo stanfordnlp/imdb: parquet files with the ClassLabel schema,
    and the card's YAML header (dataset_info + configs), which `datasets.load_dataset(folder, "plain_text")` reads."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    (root / "plain_text").mkdir(parents=True)
    split_info = []
    for split, rows in splits.items():
        ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
        split_info.append(f"  - name: {split}\n    num_bytes: {ds.data.nbytes}\n    num_examples: {len(ds)}\n")
    files = "".join(f"  - split: {s}\n    path: plain_text/{s}-*\n" for s in splits)
    (root / "README.md").write_text(
        "---\n"
        "pretty_name: IMDB\n"
        "dataset_info:\n"
        "  config_name: plain_text\n"
        "  features:\n"
        "  - name: text\n    dtype: string\n"
        "  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': neg\n          '1': pos\n"
        "  splits:\n" + "".join(split_info) +
        "configs:\n"
        "- config_name: plain_text\n"
        "  data_files:\n" + files +
        "  default: true\n"
        "---\n\n# IMDb, in miniature\n"
    )
    return root


TRAIN = make_reviews("I watched", 24, 0) + [("", 0), ("<br /><br />", 1)]  # two empty reviews: skipped
TEST = make_reviews("Honestly,", 16, 1)
UNSUP = [(t, -1) for t, _ in make_reviews("We saw", 4, 2)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("imdb-hub")
    texts = [clean(t) for t, _ in TRAIN + TEST + UNSUP]
    return {
        "dataset": str(write_hub_dataset(base / "imdb", {"train": TRAIN, "test": TEST, "unsupervised": UNSUP})),
        "sft_model": str(save_tiny_gpt2(base / "gpt2", texts)),
        "gold_model": str(save_tiny_classifier(base / "sentiment", texts, id2label={0: "NEGATIVE", 1: "POSITIVE"})),
    }


def small(hub, **changes):
    from envs.imdb import ImdbParams

    values = dict(num_sft_reviews=16, sft_epochs=1.0, sft_batch_size=4, sft_max_tokens=24, num_train_prompts=8,
                  num_eval_prompts=6, max_new_tokens=8, gold_batch_size=5, gold_max_length=64)
    return ImdbParams(**{**hub, **values, **changes})


@pytest.fixture(scope="module")
def built(hub, tmp_path_factory):
    """build → the init policy → finish (the SFT stage skipped: its policy is the init one here)."""
    from envs import ENVS

    env = ENVS.get("imdb")
    params = small(hub)
    workdir = tmp_path_factory.mktemp("imdb-env")
    env.build(params, 0, workdir)
    env.finish(env.load_policy(workdir, "init"), params, 0, workdir)
    return env, params, workdir


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_prefixes_come_from_their_split_with_2_to_8_policy_tokens_and_no_br_tags(built):
    from envs.base import load_env_data

    env, params, workdir = built
    data = load_env_data(workdir)
    tok = env.load_policy(workdir, "init").tokenizer
    train_reviews = [clean(t) for t, _ in TRAIN if clean(t)]
    test_reviews = [clean(t) for t, _ in TEST]
    assert len(data.train_prompts) == 8 and len(data.eval_prompts) == 6
    for prompt in data.train_prompts:
        assert any(r.startswith(prompt) for r in train_reviews), prompt
    for prompt in data.eval_prompts:  # eval prefixes from the test split only
        assert any(r.startswith(prompt) for r in test_reviews), prompt
        assert not any(r.startswith(prompt) for r in train_reviews), prompt
    lengths = [n_tokens(tok, p) for p in data.train_prompts + data.eval_prompts]
    assert all(params.min_prefix_tokens <= n <= params.max_prefix_tokens for n in lengths), lengths
    assert len(set(lengths)) > 1  # drawn per review, not one fixed length
    # the SFT corpus: cleaned train reviews (no "<br />", no empty ones), truncated to sft_max_tokens
    corpus = env.sft_corpus(params, workdir)
    assert len(corpus) == params.num_sft_reviews
    assert all("<br" not in t for t in corpus + data.train_prompts + data.eval_prompts)
    assert all(t and any(r.startswith(t) for r in train_reviews) for t in corpus)
    assert max(n_tokens(tok, t) for t in corpus) <= params.sft_max_tokens
    assert any(n_tokens(tok, t) == params.sft_max_tokens for t in corpus)  # long reviews were cut
    settings = env.sft_settings(params)
    assert (settings.steps, settings.batch_size, settings.lr) == (4, 4, params.sft_lr)  # 1 epoch of 16 reviews


def test_pairs_are_all_pairs_of_4_samples_ranked_by_gold(built):
    from envs.base import load_env_data

    env, params, workdir = built
    data = load_env_data(workdir)
    pairs = data.pairs
    # 4 samples per prefix → C(4, 2) = 6 pairs each, none dropped at min_gold_gap 0
    assert pairs.groupby("prompt").size().to_dict() == {p: 6 for p in data.train_prompts}
    assert (pairs["chosen_gold"] >= pairs["rejected_gold"]).all()
    assert (pairs["chosen"] != pairs["rejected"]).all()
    gold = env.gold_for(params, workdir)
    assert gold(pairs["prompt"].tolist(), pairs["chosen"].tolist()) == pytest.approx(pairs["chosen_gold"].to_numpy(), abs=1e-6)
    refs = data.references
    assert refs["prompt"].tolist() == data.eval_prompts
    assert ((refs["gold"] > 0) & (refs["gold"] < 1)).all()


def _by_hand(model_dir: str, texts: list[str], index: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.array([torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1)[index].item() for t in texts])


def _relabelled(src: str, dst: Path, id2label: dict[int, str]) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["id2label"] = {str(k): v for k, v in id2label.items()}
    config["label2id"] = {v: k for k, v in id2label.items()}
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_gold_is_the_classifiers_p_positive_found_by_label_name(hub, tmp_path, monkeypatch):
    import transformers

    from envs.imdb import Imdb

    prompts = ["I watched this movie", "Honestly, the", "I watched"]
    completions = ["and it was great.", "acting was awful and dull", ""]
    texts = ["I watched this movie and it was great.", "Honestly, the acting was awful and dull", "I watched"]
    expected = _by_hand(hub["gold_model"], texts, 1)  # index 1 = "POSITIVE"
    env = Imdb()  # its own classifier cache
    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    params = small(hub, gold_batch_size=2)  # batches of 2 (padding) must not change a text's score
    p_pos = env.gold_for(params, None)(prompts, completions)
    assert p_pos == pytest.approx(expected, abs=1e-5)
    assert len(np.unique(np.round(p_pos, 6))) == 3  # an untrained classifier still tells texts apart
    env.gold_for(params, None)(prompts, completions)
    assert len(loads) == 1  # the classifier is loaded once per model name, not per call

    # the positive class is found by name: the same weights with the labels swapped give 1 - P
    flipped = _relabelled(hub["gold_model"], tmp_path / "flipped", {0: "POSITIVE", 1: "NEGATIVE"})
    assert env.gold_for(small(hub, gold_model=flipped), None)(prompts, completions) == pytest.approx(1 - p_pos, abs=1e-5)
    generic = _relabelled(hub["gold_model"], tmp_path / "generic", {0: "LABEL_0", 1: "LABEL_1"})
    assert env.gold_for(small(hub, gold_model=generic), None)(prompts, completions) == pytest.approx(p_pos, abs=1e-5)
    # without a positive class, preflight says so before anything runs
    odd = _relabelled(hub["gold_model"], tmp_path / "odd", {0: "joy", 1: "anger"})
    with pytest.raises(Unavailable) as err:
        env.preflight(small(hub, gold_model=odd))
    assert "env.params.gold_model" in str(err.value) and "POSITIVE" in str(err.value)
    assert "\n" not in str(err.value)


def test_sft_epochs_0_means_the_sft_model_is_the_reference(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("imdb")
    params = small(hub, sft_epochs=0.0)
    env.build(params, 0, tmp_path)
    assert env.sft_corpus(params, tmp_path) is None
    assert not (tmp_path / "corpus.parquet").exists()
    assert (tmp_path / "init" / "config.json").is_file()


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty local hub cache and a hub endpoint nothing listens on (connection refused at once)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_preflight_passes_for_local_files_and_names_the_param_of_what_is_missing(hub, tmp_path, no_hub, monkeypatch):
    from envs import ENVS

    env = ENVS.get("imdb")
    env.preflight(small(hub))  # all three are local: no network

    def message(**changes) -> str:
        with pytest.raises(Unavailable) as err:
            env.preflight(small(hub, **changes))
        text = str(err.value)
        assert "\n" not in text
        return text

    missing = message(dataset=str(tmp_path / "no-such-imdb"))
    assert "env.params.dataset" in missing and "no-such-imdb" in missing
    unreachable = message(sft_model="gpt2-large")  # hub unreachable: refused by the closed port
    assert "'gpt2-large'" in unreachable and "env.params.sft_model" in unreachable
    assert "--set env.params.sft_model=PATH" in unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = message(gold_model="siebert/sentiment-roberta-large-english")
    assert "env.params.gold_model" in offline and "HF_HUB_OFFLINE" in offline


def test_unusable_data_is_one_clear_error(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("imdb")
    empty = write_hub_dataset(tmp_path / "empty", {"train": [("", 0), ("<br />", 1)], "test": [(" ", 0)]})
    with pytest.raises(ValueError) as err:
        env.build(small(hub, dataset=str(empty)), 0, tmp_path / "w1")
    assert str(err.value) == (f"env imdb: dataset {empty} (env.params.dataset), split 'train', has no usable reviews "
                              "(2 rows, every text empty or null)")
    with pytest.raises(ValueError) as err:
        env.build(small(hub, num_train_prompts=30), 0, tmp_path / "w2")
    assert "fewer than env.params.num_train_prompts = 30" in str(err.value)
    with pytest.raises(ValueError) as err:
        env.build(small(hub, dataset_config="no_such_config"), 0, tmp_path / "w3")
    assert str(err.value).startswith(f"env imdb: cannot load split 'train' of dataset {hub['dataset']}")
    assert "\n" not in str(err.value)


def test_params_are_validated():
    from algorithms.interface import ParamError
    from envs.imdb import ImdbParams

    assert (ImdbParams().min_prefix_tokens, ImdbParams().max_prefix_tokens, ImdbParams().samples_per_prompt) == (2, 8, 4)
    for bad, field in [({"max_prefix_tokens": 1}, "max_prefix_tokens"), ({"samples_per_prompt": 1}, "samples_per_prompt"),
                       ({"sft_epochs": -1.0}, "sft_epochs"), ({"dataset": ""}, "dataset"),
                       ({"num_eval_prompts": 0}, "num_eval_prompts")]:
        with pytest.raises(ParamError) as err:
            ImdbParams(**bad)
        assert err.value.field == field


# ------------------------------------------------------------------------------- the CLI
def _suite(path: Path, params: dict, extra: str = "") -> Path:
    path.write_text(
        "name: imdb-test\n"
        f"env: {{name: imdb, params: {json.dumps(params)}}}\n"
        "seeds: [0]\n"
        "train: {steps: 2, batch_size: 8, lr: 1.0e-3, warmup_steps: 0, eval_every: 2}\n"
        "eval: {num_prompts: 6, samples_per_prompt: 2, max_new_tokens: 8, temperatures: [1.0], score_batch_size: 16}\n"
        "reward_model: {epochs: 1, batch_size: 8, lr: 1.0e-3}\n"
        "algorithms:\n"
        "  - {name: dpo, sweep: {beta: [0.1]}}\n"
        "  - {name: best-of-n, params: {n: 4}}\n"
        "baseline: false\n"
        "scaling: {num_workers: 1, max_concurrent_trials: 2}\n" + extra
    )
    return path


def _run(suite: Path, out: Path, tmp_path: Path, timeout: int):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PREFBENCH_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", str(suite), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_run_with_a_hub_model_out_of_reach_is_one_line_and_exit_2(hub, tmp_path):
    params = {k: v for k, v in vars(small(hub)).items() if k != "sft_model"}  # sft_model: the default, gpt2-large
    out = tmp_path / "out"
    proc = _run(_suite(tmp_path / "suite.yaml", params), out, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prefbench: error: env imdb: cannot load model 'gpt2-large' (env.params.sft_model)")
    assert not out.exists()


@pytest.mark.slow
def test_run_dpo_and_best_of_n_end_to_end_on_local_files(hub, tmp_path):
    out = tmp_path / "out"
    params = {**vars(small(hub)), "num_train_prompts": 16, "num_eval_prompts": 6}
    proc = _run(_suite(tmp_path / "suite.yaml", params), out, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    evals = pd.read_parquet(out / "evals.parquet")
    assert set(evals["algorithm"]) == {"dpo", "best-of-n"}
    assert set(evals["env"]) == {"imdb"}
    assert all(math.isfinite(g) and 0 < g < 1 for g in evals["gold_reward"])
    final = evals[evals["final"] & (evals["algorithm"] == "dpo")].iloc[0]
    assert final["step"] == 2 and final["n_prompts"] == 6 and final["kl_kind"] == "estimated"
