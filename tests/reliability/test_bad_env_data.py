"""Bad data for the envs that read local files (imdb, tldr) is one line from `build`, never a traceback.

Each case starts from a good local folder in the hub's layout (the helpers of tests/test_env_imdb.py
and tests/test_env_tldr.py) and breaks one thing: a missing or non-text column, a parquet file of
zero rows, a zero-byte or non-parquet file, null cells, texts longer than the policy's context
(a tiny GPT-2 with n_positions = 256), a tokenizer larger than the model's vocabulary. `build`
raises ValueError with one line naming the env, the dataset (or file) and the param to change;
`prefbench run` turns it into `prefbench: error: ...`, exit 2 (the one slow test, which starts Ray).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.local_hub import save_tiny_classifier, save_tiny_gpt2
from tests.test_env_imdb import TEST, TRAIN, _run, _suite, clean, write_hub_dataset
from tests.test_env_tldr import MAX_PROMPT_TOKENS, comparison_rows, post, tldr_splits, write_dataset

CONTEXT = 256  # save_tiny_gpt2's n_positions


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Good local copies of both envs' datasets, a tiny GPT-2 and a tiny sentiment classifier."""
    base = tmp_path_factory.mktemp("bad-data-hub")
    tldr, comparisons = tldr_splits(), comparison_rows()
    texts = ([clean(t) for t, _ in TRAIN + TEST] + [t for s in tldr.values() for t in s["prompt"] + s["label"]]
             + comparisons["chosen"])
    return {
        "imdb": str(write_hub_dataset(base / "imdb", {"train": TRAIN, "test": TEST})),
        "tldr": write_dataset(base / "tldr", ["prompt", "label"], tldr),
        "pairs": write_dataset(base / "comparisons", ["prompt", "chosen", "rejected"], {"train": comparisons}),
        "gpt2": str(save_tiny_gpt2(base / "gpt2", texts)),
        "classifier": str(save_tiny_classifier(base / "sentiment", texts, id2label={0: "NEGATIVE", 1: "POSITIVE"})),
    }


def imdb_params(hub, **changes):
    from envs.imdb import ImdbParams

    values = dict(dataset=hub["imdb"], sft_model=hub["gpt2"], gold_model=hub["classifier"], num_sft_reviews=16,
                  sft_epochs=1.0, sft_max_tokens=24, num_train_prompts=8, num_eval_prompts=6, max_new_tokens=8)
    return ImdbParams(**{**values, **changes})


def tldr_params(hub, **changes):
    from envs.tldr import TldrParams

    values = dict(dataset=hub["tldr"], pairs_dataset=hub["pairs"], sft_model=hub["gpt2"], tokenizer="",
                  num_train_prompts=100, num_eval_prompts=100, max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=24,
                  judge={"kind": "reward_model", "model": hub["classifier"]})
    return TldrParams(**{**values, **changes})


def build_error(env_name: str, params, workdir: Path) -> str:
    """The one line `build` raises (a ValueError, which bench turns into `prefbench: error:`, exit 2)."""
    from envs import ENVS

    workdir.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError) as err:
        ENVS.get(env_name).build(params, 0, workdir)
    assert type(err.value) is ValueError
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"env {env_name}: ")
    return message


def copy_of(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def only_file(folder: Path, pattern: str) -> Path:
    (path,) = sorted(folder.glob(pattern))
    return path


def write_plain_dataset(root: Path, splits: dict[str, pd.DataFrame]) -> str:
    """A parquet folder whose README has `configs:` but no `dataset_info`: column types come from the
    files themselves (so a column of ints stays ints instead of being cast to the card's string)."""
    (root / "data").mkdir(parents=True)
    for split, frame in splits.items():
        frame.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet", index=False)
    files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n")
    return str(root)


# ---------------------------------------------------------------------------------------- imdb
def test_imdb_missing_or_non_text_column(hub, tmp_path):
    reviews = {s: pd.DataFrame({"review": [t for t, _ in rows]}) for s, rows in (("train", TRAIN), ("test", TEST))}
    no_text = write_plain_dataset(tmp_path / "no-text", reviews)
    assert build_error("imdb", imdb_params(hub, dataset=no_text, dataset_config=None), tmp_path / "w1") == (
        f"env imdb: dataset {no_text} (env.params.dataset), split 'train', has columns ['review']; missing ['text']")

    numbers = {s: pd.DataFrame({"text": list(range(len(rows))), "label": [y for _, y in rows]})
               for s, rows in (("train", TRAIN), ("test", TEST))}
    ints = write_plain_dataset(tmp_path / "ints", numbers)
    assert build_error("imdb", imdb_params(hub, dataset=ints, dataset_config=None), tmp_path / "w2") == (
        f"env imdb: dataset {ints} (env.params.dataset), split 'train', column 'text' holds int64, not text")


def test_imdb_zero_row_zero_byte_and_non_parquet_files(hub, tmp_path):
    zero_rows = write_hub_dataset(tmp_path / "zero-rows", {"train": [], "test": TEST})
    assert build_error("imdb", imdb_params(hub, dataset=str(zero_rows)), tmp_path / "w1") == (
        f"env imdb: cannot load split 'train' of dataset {zero_rows} (env.params.dataset, config plain_text): "
        "file plain_text/train-00000-of-00001.parquet has 0 rows")

    zero_bytes = copy_of(hub["imdb"], tmp_path / "zero-bytes")
    only_file(zero_bytes / "plain_text", "train-*.parquet").write_bytes(b"")
    assert build_error("imdb", imdb_params(hub, dataset=str(zero_bytes)), tmp_path / "w2") == (
        f"env imdb: cannot load split 'train' of dataset {zero_bytes} (env.params.dataset, config plain_text): "
        "file plain_text/train-00000-of-00001.parquet is empty (0 bytes)")

    not_parquet = copy_of(hub["imdb"], tmp_path / "not-parquet")
    only_file(not_parquet / "plain_text", "test-*.parquet").write_text("text,label\ngreat film,1\n")
    # loading train prepares every split, so the broken test file is what stops it
    assert build_error("imdb", imdb_params(hub, dataset=str(not_parquet)), tmp_path / "w3").startswith(
        f"env imdb: cannot load split 'train' of dataset {not_parquet} (env.params.dataset, config plain_text): "
        "file plain_text/test-00000-of-00001.parquet is not a parquet file (ArrowInvalid: ")


def test_imdb_null_reviews_are_skipped_like_empty_ones(hub, tmp_path):
    from envs import ENVS

    with_nulls = write_hub_dataset(tmp_path / "nulls", {"train": TRAIN[:20] + [(None, 0)] * 6, "test": TEST})
    ENVS.get("imdb").build(imdb_params(hub, dataset=str(with_nulls)), 0, tmp_path)  # 20 usable reviews: enough
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    assert len(prompts["train"]) == 8 and all(prompts["train"])

    all_null = write_hub_dataset(tmp_path / "all-null", {"train": [(None, 0)] * 5, "test": TEST})
    assert build_error("imdb", imdb_params(hub, dataset=str(all_null)), tmp_path / "w") == (
        f"env imdb: dataset {all_null} (env.params.dataset), split 'train', has no usable reviews "
        "(5 rows, every text empty or null)")


def test_imdb_prefixes_and_sft_reviews_longer_than_the_context(hub, tmp_path):
    # prefixes are 2-8 tokens; with 250 new tokens the longest no longer fits in 256 positions
    message = build_error("imdb", imdb_params(hub, max_new_tokens=250), tmp_path / "w1")
    assert message.startswith("env imdb: ") and " prefixes do not fit the context of sft_model " in message
    assert f"({CONTEXT} tokens, config n_positions): the longest is " in message
    longest = int(message.split("the longest is ")[1].split()[0])
    assert 2 <= longest <= 8 and message.endswith(
        f"tokens + max_new_tokens=250 = {longest + 250}; set env.params.max_new_tokens <= {CONTEXT - longest}")

    # reviews far longer than the context, cut to sft_max_tokens = 300 for SFT: 300 + EOS > 256
    long_reviews = [(" ".join([clean(t)] * 20), y) for t, y in TRAIN[:24]]
    long = write_hub_dataset(tmp_path / "long", {"train": long_reviews, "test": TEST})
    assert build_error("imdb", imdb_params(hub, dataset=str(long), sft_max_tokens=300), tmp_path / "w2") == (
        f"env imdb: 16 of 16 SFT reviews do not fit the context of sft_model {hub['gpt2']} ({CONTEXT} tokens, "
        f"config n_positions): the longest is 300 tokens + EOS = 301; set env.params.sft_max_tokens <= {CONTEXT - 1}")
    # the same reviews cut to what fits build fine: nothing is truncated behind the user's back
    from envs import ENVS

    (tmp_path / "w3").mkdir()
    ENVS.get("imdb").build(imdb_params(hub, dataset=str(long), sft_max_tokens=CONTEXT - 1), 0, tmp_path / "w3")


# ---------------------------------------------------------------------------------------- tldr
def test_tldr_missing_or_non_text_columns(hub, tmp_path):
    splits = {s: pd.DataFrame(t) for s, t in tldr_splits().items()}
    no_prompt = write_plain_dataset(tmp_path / "no-prompt",
                                    {s: f.rename(columns={"prompt": "post"}) for s, f in splits.items()})
    assert build_error("tldr", tldr_params(hub, dataset=no_prompt), tmp_path / "w1") == (
        f"env tldr: dataset {no_prompt} (env.params.dataset), split 'train', has columns ['post', 'label']; "
        "missing ['prompt']")

    int_labels = write_plain_dataset(tmp_path / "int-labels",
                                     {s: f.assign(label=range(len(f))) for s, f in splits.items()})
    assert build_error("tldr", tldr_params(hub, dataset=int_labels), tmp_path / "w2") == (
        f"env tldr: dataset {int_labels} (env.params.dataset), split 'train', column 'label' holds int64, not text")

    pairs = pd.DataFrame(comparison_rows()).drop(columns=["rejected"])
    no_rejected = write_plain_dataset(tmp_path / "no-rejected", {"train": pairs})
    assert build_error("tldr", tldr_params(hub, pairs_dataset=no_rejected), tmp_path / "w3") == (
        f"env tldr: dataset {no_rejected} (env.params.pairs_dataset), split 'train', has columns "
        "['prompt', 'chosen']; missing ['rejected']")


def test_tldr_zero_row_zero_byte_and_non_parquet_files(hub, tmp_path):
    splits = tldr_splits()
    splits["test"] = {"prompt": [], "label": []}
    zero_rows = write_dataset(tmp_path / "zero-rows", ["prompt", "label"], splits)
    test_file = only_file(Path(zero_rows) / "data", "test-*.parquet").name
    assert build_error("tldr", tldr_params(hub, dataset=zero_rows), tmp_path / "w1") == (
        f"env tldr: cannot load split 'train' of dataset {zero_rows} (env.params.dataset): "
        f"file data/{test_file} has 0 rows")

    zero_bytes = copy_of(hub["pairs"], tmp_path / "zero-bytes")
    pairs_file = only_file(zero_bytes / "data", "train-*.parquet")
    pairs_file.write_bytes(b"")
    assert build_error("tldr", tldr_params(hub, pairs_dataset=str(zero_bytes)), tmp_path / "w2") == (
        f"env tldr: cannot load split 'train' of dataset {zero_bytes} (env.params.pairs_dataset): "
        f"file data/{pairs_file.name} is empty (0 bytes)")

    not_parquet = copy_of(hub["tldr"], tmp_path / "not-parquet")
    train_file = only_file(not_parquet / "data", "train-*.parquet")
    train_file.write_bytes(b"PAR1" + bytes(range(256)) * 4)  # a truncated / garbled download
    assert build_error("tldr", tldr_params(hub, dataset=str(not_parquet)), tmp_path / "w3").startswith(
        f"env tldr: cannot load split 'train' of dataset {not_parquet} (env.params.dataset): "
        f"file data/{train_file.name} is not a parquet file (ArrowInvalid: ")


def test_tldr_rows_with_null_cells_are_dropped_and_counted(hub, tmp_path, capsys):
    from envs import ENVS

    splits = tldr_splits()
    splits["train"]["prompt"][0] = None
    splits["train"]["label"][1] = None
    with_nulls = write_dataset(tmp_path / "nulls", ["prompt", "label"], splits)
    ENVS.get("tldr").build(tldr_params(hub, dataset=with_nulls), 0, tmp_path)
    stats = json.loads((tmp_path / "data_stats.json").read_text())
    assert stats["train"]["dropped_null"] == 2 and stats["eval"]["dropped_null"] == 0
    train = pd.read_parquet(tmp_path / "summaries.parquet").query("split == 'train'")
    assert post(1) + "\nTL;DR:" not in set(train["prompt"]) and len(train) == 16 - 2 - 2  # 2 nulls, 2 long
    assert "[prefbench] env tldr: train: dropped 2 rows of split train with a null cell" in capsys.readouterr().err

    splits = tldr_splits()
    splits["test"]["label"] = [None] * len(splits["test"]["label"])
    all_null = write_dataset(tmp_path / "all-null", ["prompt", "label"], splits)
    assert build_error("tldr", tldr_params(hub, dataset=all_null), tmp_path / "w") == (
        f"env tldr: dataset {all_null} (env.params.dataset), split 'test': every one of its 10 rows has a null "
        "prompt or label")


def test_tldr_posts_longer_than_the_context(hub, tmp_path):
    # the length filter (max_prompt_tokens) set past the model's context: the 4 long posts are kept,
    # and would index past GPT-2's 256 position embeddings mid-trial
    message = build_error("tldr", tldr_params(hub, max_prompt_tokens=2000), tmp_path / "w1")
    head, tail = message.split(": the longest is ")
    assert head == (f"env tldr: 4 of 27 selected posts do not fit the context of sft_model {hub['gpt2']} "
                    f"({CONTEXT} tokens, config n_positions)")
    longest = int(tail.split()[0])
    assert longest > CONTEXT
    assert tail == (f"{longest} tokens + max_new_tokens=24 = {longest + 24}; "
                    f"set env.params.max_prompt_tokens <= {CONTEXT - 24} (longer posts are dropped)")

    # a post filter that drops every post is named as such, not an empty env later
    assert build_error("tldr", tldr_params(hub, max_prompt_tokens=5), tmp_path / "w2") == (
        f"env tldr: no post of dataset {hub['tldr']} (env.params.dataset), split 'train', fits max_prompt_tokens=5 "
        "(16 examined); raise env.params.max_prompt_tokens")


def test_tldr_sft_texts_longer_than_the_context(hub, tmp_path):
    """Summaries are not length-filtered; with sft_epochs > 0, post + summary + EOS must fit."""
    from transformers import AutoTokenizer

    from envs import ENVS

    tokenizer = AutoTokenizer.from_pretrained(hub["gpt2"])

    def longest_summary(splits) -> int:
        return max(len(tokenizer(" " + s)["input_ids"]) for s in splits["train"]["label"])

    def summaries_times(k: int, name: str):
        splits = tldr_splits()
        splits["train"]["label"] = [" ".join([summary] * k) for summary in splits["train"]["label"]]
        return write_dataset(tmp_path / name, ["prompt", "label"], splits), longest_summary(splits)

    long, summary = summaries_times(20, "long-summaries")  # ~ 230 tokens: fits with a short post only
    (tmp_path / "w1").mkdir()
    ENVS.get("tldr").build(tldr_params(hub, dataset=long), 0, tmp_path / "w1")  # no SFT: summaries unused
    message = build_error("tldr", tldr_params(hub, dataset=long, sft_epochs=1.0), tmp_path / "w2")
    assert re.fullmatch(
        rf"env tldr: \d+ of 14 SFT texts \(train post \+ summary\) do not fit the context of sft_model "
        rf"{re.escape(hub['gpt2'])} \({CONTEXT} tokens, config n_positions\): the longest is \d+ tokens \+ EOS = "
        rf"\d+; set env\.params\.max_prompt_tokens <= {CONTEXT - 1 - summary} \(longer posts are dropped\)",
        message), message

    longer, summary = summaries_times(30, "longer-summaries")  # ~ 350 tokens: no post can go with them
    assert summary > CONTEXT
    assert build_error("tldr", tldr_params(hub, dataset=longer, sft_epochs=1.0), tmp_path / "w3").endswith(
        f"; the longest summary alone is {summary} tokens: drop such rows from env.params.dataset")


def test_tldr_tokenizer_larger_than_the_model_vocabulary(hub, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub["gpt2"])
    vocab = len(tokenizer)
    tokenizer.add_tokens(["<extra_0>", "<extra_1>", "<extra_2>"])
    tokenizer.save_pretrained(tmp_path / "bigger-tokenizer")
    assert build_error("tldr", tldr_params(hub, tokenizer=str(tmp_path / "bigger-tokenizer")), tmp_path / "w") == (
        f"env tldr: tokenizer {tmp_path / 'bigger-tokenizer'} (env.params.tokenizer) has {vocab + 3} tokens, more than "
        f"the {vocab} of sft_model {hub['gpt2']}; set env.params.tokenizer to the model's own tokenizer "
        '("" = sft_model\'s)')


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_prefbench_run_on_a_zero_byte_dataset_file_is_one_line_and_exit_2(hub, tmp_path):
    """Through `prefbench run`: env.build runs after Ray has started (~10 s); its ValueError is one
    `prefbench: error:` line, exit 2, no traceback, and no OUT left behind."""
    broken = copy_of(hub["imdb"], tmp_path / "imdb")
    only_file(broken / "plain_text", "train-*.parquet").write_bytes(b"")
    params = {k: v for k, v in vars(imdb_params(hub, dataset=str(broken))).items()}
    out = tmp_path / "out"
    proc = _run(_suite(tmp_path / "suite.yaml", params), out, tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prefbench: error:")]
    assert errors == [
        f"prefbench: error: env imdb: cannot load split 'train' of dataset {broken} (env.params.dataset, config "
        "plain_text): file plain_text/train-00000-of-00001.parquet is empty (0 bytes)"
    ], proc.stderr[-3000:]
    assert not out.exists()
