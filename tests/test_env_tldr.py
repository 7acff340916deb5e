"""The tldr env (the DPO paper's TL;DR summarization task) on tiny local files in the hub's formats.

Two dataset folders laid out like the hub repos CarperAI/openai_summarize_tldr (data/{train,valid,
test}-00000-of-00001-<hash>.parquet: prompt ending in "TL;DR:", label) and
CarperAI/openai_summarize_comparisons (data/{train,test,valid1,valid2}-…: prompt without the
"TL;DR:" line, chosen / rejected starting with "TL;DR: "), each with its card's YAML header; a tiny
GPT-2 policy and a tiny scalar reward model saved with save_pretrained; and a local HTTP server
speaking the OpenAI chat API, which checks it is asked the DPO paper's prompt and prefers the
summary holding a marker word. No network, no Ray (except the one slow end-to-end run).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from envs.hub import Unavailable
from tests.local_hub import save_tiny_classifier, save_tiny_gpt2, write_dataset

THINGS = ["landlord", "cat", "boss", "car", "sister", "roommate", "bank", "garden"]
SUBS = ["relationships", "personalfinance", "tifu", "AskReddit", "pets"]
MARKER = "kiwi"  # the judge server prefers the summary that holds this word


def post(i: int, long: bool = False) -> str:
    """A post as the comparisons dataset has it (no TL;DR line); a long one has a 60-sentence body."""
    thing = THINGS[i % len(THINGS)]
    body = f"My {thing} did something odd on day {i} and I do not know what to do."
    if long:
        body = " ".join([body] * 60)
    return f"SUBREDDIT: r/{SUBS[i % len(SUBS)]}\nTITLE: Help with my {thing} ({i})\nPOST: {body}"


def label(i: int) -> str:
    return f"my {THINGS[i % len(THINGS)]} acted odd on day {i}"


# posts by split: index → long?  (2 long posts in train and test: dropped by max_prompt_tokens)
SPLITS = {"train": list(range(0, 16)), "valid": list(range(16, 20)), "test": list(range(20, 30))}
LONG = {3, 11, 22, 27}
MAX_PROMPT_TOKENS = 120


def tldr_splits() -> dict:
    return {split: {"prompt": [post(i, i in LONG) + "\nTL;DR:" for i in idx], "label": [label(i) for i in idx]}
            for split, idx in SPLITS.items()}


def comparison_rows() -> dict:
    rows = [(post(i), f"TL;DR: {label(i)} and I need advice", f"TL;DR: {THINGS[i % 8]} bad") for i in range(8)]
    rows.append((post(3, long=True), "TL;DR: long post summary", "TL;DR: other"))  # long post: dropped
    rows.append((post(8), "TL;DR: same", "TL;DR: same"))  # no preference: dropped
    rows.append((post(9), "TL;DR: " + " ".join(["very"] * 40) + " long", "TL;DR: short"))  # over max_new_tokens
    return {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("tldr-hub")
    tldr = tldr_splits()
    comparisons = comparison_rows()
    other = {"prompt": comparisons["prompt"][:2], "chosen": comparisons["chosen"][:2],
             "rejected": comparisons["rejected"][:2]}
    texts = [t for s in tldr.values() for t in s["prompt"] + s["label"]] + comparisons["chosen"] + [MARKER]
    return {
        "dataset": write_dataset(base / "openai_summarize_tldr", ["prompt", "label"], tldr),
        "pairs_dataset": write_dataset(base / "openai_summarize_comparisons", ["prompt", "chosen", "rejected"],
                                       {"train": comparisons, "test": other, "valid1": other, "valid2": other}),
        "sft_model": str(save_tiny_gpt2(base / "gpt2", texts)),
        "rm": str(save_tiny_classifier(base / "rm", texts, id2label={0: "LABEL_0"})),
    }


def small(hub, **changes):
    from envs.tldr import TldrParams

    values = dict(dataset=hub["dataset"], pairs_dataset=hub["pairs_dataset"], sft_model=hub["sft_model"],
                  tokenizer="", num_train_prompts=100, num_eval_prompts=100, max_prompt_tokens=MAX_PROMPT_TOKENS,
                  max_new_tokens=24, judge={"kind": "reward_model", "model": hub["rm"], "batch_size": 3, "max_length": 256})
    return TldrParams(**{**values, **changes})


@pytest.fixture(scope="module")
def built(hub, tmp_path_factory):
    """build → the init policy → finish (sft_epochs 0: the init policy is the SFT policy)."""
    from envs import ENVS

    env = ENVS.get("tldr")
    params = small(hub)
    workdir = tmp_path_factory.mktemp("tldr-env")
    env.build(params, 0, workdir)
    env.finish(env.load_policy(workdir, "init"), params, 0, workdir)
    return env, params, workdir


# --------------------------------------------------------------------- a judge HTTP server
PAPER_PROMPT = re.compile(
    r"\AWhich of the following summaries does a better job of summarizing the most important points in the given "
    r"forum post, without including unimportant or irrelevant details\? A good summary is both precise and "
    r"concise\.\n\nPost:\n(?P<post>.*)\n\nSummary A:\n(?P<a>.*)\n\nSummary B:\n(?P<b>.*)\n\n"
    r"FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why\. SECOND, on "
    r"a new line, state only \"A\" or \"B\" to indicate your choice\. Your response should use the format:\n"
    r"Comparison: <one-sentence comparison and explanation>\nPreferred: <\"A\" or \"B\">\Z",
    re.S,
)


class JudgeServer:
    """/v1/models and /v1/chat/completions on 127.0.0.1: answers the paper's prompt in the paper's format,
    preferring the summary with MARKER (else the longer one); can fail first with given status codes,
    or answer garbage. Records every comparison (post, A, B) and the Authorization header."""

    def __init__(self, model: str = "judge-model"):
        self.model = model
        self.requests: list[tuple[str, str, str]] = []
        self.auth: list[str | None] = []
        self.fail: list[int] = []
        self.garbage = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                self.reply(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    code = server.fail.pop(0) if server.fail else None
                    server.auth.append(self.headers.get("Authorization"))
                if code:
                    return self.reply(code, {"error": {"message": "injected"}})
                content = body["messages"][0]["content"]
                match = PAPER_PROMPT.match(content)
                if self.path != "/v1/chat/completions" or not match or body.get("temperature") != 0 \
                        or body.get("model") != server.model:
                    return self.reply(400, {"error": {"message": f"not the paper's request: {content[:200]!r}"}})
                a, b = match["a"], match["b"]
                with server.lock:
                    server.requests.append((match["post"], a, b))
                if server.garbage:
                    text = "Both summaries are fine, I cannot choose."
                else:
                    pick = "A" if (MARKER in a) > (MARKER in b) or ((MARKER in a) == (MARKER in b) and len(a) >= len(b)) else "B"
                    text = f"Comparison: Summary {pick} is more precise.\nPreferred: {pick}"
                self.reply(200, {"object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def judge(self, **changes) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "backoff_s": 0.01,
                "max_retries": 2, "api_key_env": "TLDR_TEST_JUDGE_KEY", **changes}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def with_judge(params, judge: dict):
    from envs.tldr import TldrParams

    return TldrParams(**{**params.__dict__, "judge": judge})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------- tests
def test_build_and_finish_write_prompts_human_pairs_and_human_references(built):
    from envs.base import load_env_data

    env, params, workdir = built
    data = load_env_data(workdir)
    # every post that fits, long ones dropped (and counted), in a seeded order; prompts end in "TL;DR:"
    fitting = {split: {post(i) + "\nTL;DR:" for i in idx if i not in LONG} for split, idx in SPLITS.items()}
    assert sorted(data.train_prompts) == sorted(fitting["train"])
    assert sorted(data.eval_prompts) == sorted(fitting["test"])  # eval_split defaults to the paper's test split
    stats = json.loads((workdir / "data_stats.json").read_text())
    assert stats["train"]["dropped_long"] == 2 and stats["eval"]["dropped_long"] == 2
    # references: each eval post's HUMAN summary, " " + label, judged a tie with itself (gold ½)
    refs = data.references
    assert refs["prompt"].tolist() == data.eval_prompts
    by_prompt = {post(i) + "\nTL;DR:": label(i) for i in SPLITS["test"]}
    assert refs["completion"].tolist() == [" " + by_prompt[p] for p in refs["prompt"]]
    assert (refs["gold"] == 0.5).all()
    # pairs: human comparisons, prompts given the "TL;DR:" line, summaries without their "TL;DR: " prefix;
    # no gold columns (human labels); the long post, the tie and the over-long summary dropped
    pairs = data.pairs
    assert list(pairs.columns) == ["prompt", "chosen", "rejected"]
    assert sorted(pairs["prompt"]) == sorted(post(i) + "\nTL;DR:" for i in range(8))
    for p, c, r in pairs.itertuples(index=False):
        i = int(re.search(r"\((\d+)\)", p)[1])
        assert (c, r) == (f" {label(i)} and I need advice", f" {THINGS[i % 8]} bad")
    assert stats["pairs"]["dropped_long"] == 2 and stats["pairs"]["kept"] == 8
    # the SFT policy is the named model as is: no SFT corpus
    assert env.sft_corpus(params, workdir) is None


def test_sft_corpus_is_prompt_space_label_and_selection_is_seeded(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("tldr")
    params = small(hub, sft_epochs=1.0, num_train_prompts=5, num_eval_prompts=3)
    one, two, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((one, 0), (two, 0), (other, 1)):
        d.mkdir()
        env.build(params, seed, d)
    corpus = env.sft_corpus(params, one)
    assert len(corpus) == 5
    for text in corpus:
        i = int(re.search(r"\((\d+)\)", text)[1])
        assert text == f"{post(i)}\nTL;DR: {label(i)}"
    table = pd.read_parquet(one / "summaries.parquet")
    assert table.equals(pd.read_parquet(two / "summaries.parquet"))  # same seed, same posts
    assert not table.equals(pd.read_parquet(other / "summaries.parquet"))
    assert env.sft_settings(params).steps == max(1, int(1.0 * 5 / params.sft_batch_size))


def test_a_missing_split_or_column_is_one_line_naming_the_param(hub, tmp_path):
    from envs import ENVS

    env = ENVS.get("tldr")
    with pytest.raises(ValueError, match=r"^env tldr: cannot load split 'validation' of .*\(env\.params\.dataset\)"):
        env.build(small(hub, eval_split="validation"), 0, tmp_path)  # the hub repo calls it "valid"
    with pytest.raises(ValueError, match=r"^env tldr: .*\(env\.params\.pairs_dataset\), split 'train', has columns "
                                         r"\['prompt', 'label'\]; missing \['chosen', 'rejected'\]"):
        env.build(small(hub, pairs_dataset=hub["dataset"]), 0, tmp_path)


def test_judge_params_are_validated_and_named(hub):
    from algorithms.interface import ParamError
    from bench.config import ConfigError, load_suite

    with pytest.raises(ParamError, match=r"^judge\.bogus: unknown key for the openai judge"):
        small(hub, judge={"kind": "openai", "model": "m", "bogus": 1})
    with pytest.raises(ParamError, match=r"^judge\.kind: unknown judge kind 'gpt'"):
        small(hub, judge={"kind": "gpt"})
    with pytest.raises(ParamError, match=r"^judge\.model: must name the model"):
        small(hub, judge={"kind": "openai"})
    with pytest.raises(ParamError, match=r"^judge\.max_concurrency: expected int"):
        small(hub, judge={"kind": "openai", "model": "m", "max_concurrency": "8"})
    with pytest.raises(ParamError, match=r"^judge\.batch_size: must be >= 1"):
        small(hub, judge={"kind": "reward_model", "batch_size": 0})
    # through a suite: one line naming the dotted key
    with pytest.raises(ConfigError, match=r"^env\.params\.judge\.timeout: unknown key"):
        load_suite(None, ["env.name=tldr", "env.params.judge={kind: openai, model: m, timeout: 3}"])
    # defaults filled in: the same judge written two ways is one env cache key
    assert small(hub, judge={"kind": "openai", "model": "m", "timeout_s": 60}).judge == \
        small(hub, judge={"kind": "openai", "model": "m"}).judge


def test_reward_model_gold_is_sigmoid_of_reward_difference_to_the_human_reference(built, hub):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from envs.base import gold_fn, load_env_data

    env, params, workdir = built
    prompts = load_env_data(workdir).eval_prompts[:4]
    refs = {post(i) + "\nTL;DR:": label(i) for i in SPLITS["test"]}
    completions = [" a short summary", refs[prompts[1]], "my cat did odd things all week long", ""]
    gold = gold_fn(env, params, workdir)(prompts, completions)

    tok = AutoTokenizer.from_pretrained(hub["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(hub["rm"]).eval()

    def r(x: str, y: str) -> float:  # one pair at a time: no padding
        with torch.no_grad():
            return float(model(**tok(x, y, return_tensors="pt")).logits[0, 0])

    for p, c, g in zip(prompts, completions, gold):
        x = p.removesuffix("\nTL;DR:")  # the judge reads the post without the TL;DR line
        expected = 1 / (1 + math.exp(-(r(x, c.strip()) - r(x, refs[p]))))
        assert g == pytest.approx(expected, abs=1e-5)
    assert gold[1] == 0.5  # the human reference against itself: a tie, exactly
    assert len(set(np.round(gold, 8))) == 4  # the untrained RM still tells the others apart

    with pytest.raises(ValueError, match="env tldr: no human reference summary for 1 prompt"):
        gold_fn(env, params, workdir)(["SUBREDDIT: r/x\nTITLE: t\nPOST: unknown\nTL;DR:"], ["y"])
    # its gold reward exists only bound to a prepared env (judge + human references): no unbound `gold`,
    # which the Env contract allows (contract_problems: gold or gold_for)
    from envs.base import contract_problems

    assert not hasattr(env, "gold") and contract_problems(env) == []


def test_endpoint_judge_asks_the_paper_prompt_and_gives_win_rates(built, server):
    from bench.evaluate import win_indicator
    from envs.base import load_env_data

    env, params, workdir = built
    data = load_env_data(workdir)
    prompts = data.eval_prompts  # 8 posts
    refs = dict(zip(data.references["prompt"], data.references["completion"]))
    # half the completions hold the marker (the server prefers them to the human summary), half are
    # shorter than the reference (the server prefers the reference), one IS the reference
    completions = [f" {MARKER} summary {i}" if i % 2 == 0 else " no" for i in range(len(prompts))]
    completions[1] = refs[prompts[1]]
    p = with_judge(params, server.judge())
    gold = env.gold_for(p, workdir)(prompts, completions)
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(len(prompts))]
    expected[1] = 0.5
    assert gold.tolist() == expected
    win = win_indicator(gold, data.references["gold"].to_numpy())
    assert win.mean() == pytest.approx((4 + 0.5) / 8)
    # the reference itself was never sent; every other comparison once, with the post without "TL;DR:"
    assert len(server.requests) == len(prompts) - 1
    posts = {p_.removesuffix("\nTL;DR:") for p_ in prompts}
    assert {r[0] for r in server.requests} <= posts
    assert server.auth == [None] * len(server.requests)  # no key in the environment: no header


def test_endpoint_judge_order_is_a_seeded_coin_deterministic_and_balanced(built, server):
    env, params, workdir = built
    prompts = [p for p in pd.read_parquet(workdir / "summaries.parquet")["prompt"]]  # train + eval: 20 posts
    completions = [f" {MARKER} take {k}" for k in range(3) for _ in prompts]
    prompts = prompts * 3  # 60 comparisons

    def run(seed: int):
        server.requests.clear()
        gold = env.gold_for(with_judge(params, server.judge(seed=seed)), workdir)(
            prompts, completions)
        assert (gold == 1.0).all()  # whichever position the marker summary was shown in
        return sorted(server.requests)

    first, again, other = run(0), run(0), run(1)
    assert first == again  # same seed: the same A/B order for every comparison
    ours_first = [MARKER in a for _, a, _ in first]
    assert 0.3 <= np.mean(ours_first) <= 0.7  # both orders occur, roughly balanced
    assert other != first  # another seed flips some


def test_endpoint_judge_retries_429_and_5xx_and_sends_the_api_key(built, server, monkeypatch):
    env, params, workdir = built
    monkeypatch.setenv("TLDR_TEST_JUDGE_KEY", "sk-local-test")
    prompt = pd.read_parquet(workdir / "summaries.parquet")["prompt"].iloc[0]
    server.fail = [500, 429, 503]
    p = with_judge(params, server.judge(max_retries=3, max_concurrency=1))
    gold = env.gold_for(p, workdir)([prompt], [f" {MARKER}!"])
    assert gold.tolist() == [1.0]
    assert len(server.auth) == 4 and set(server.auth) == {"Bearer sk-local-test"}
    # the endpoint still failing after every retry fails the evaluation loudly (not a silent ½)
    from envs.judges import JudgeError

    server.fail = [502] * 10
    with pytest.raises(JudgeError, match="no answer after 4 tries"):
        env.gold_for(p, workdir)([prompt], [f" {MARKER}?"])


def test_endpoint_judge_counts_unparseable_answers_as_ties(built, server, capsys):
    env, params, workdir = built
    prompts = pd.read_parquet(workdir / "summaries.parquet")["prompt"].iloc[:3].tolist()
    server.garbage = True
    gold = env.gold_for(with_judge(params, server.judge(max_retries=2)), workdir)(
        prompts, [" one", " two", " three"])
    assert gold.tolist() == [0.5, 0.5, 0.5]
    assert len(server.requests) == 3 * 3  # asked again after each unparseable answer
    assert "3 of 3 answers had no parseable 'Preferred: A|B' after 3 tries; counted as ties" in capsys.readouterr().err


def test_parse_preferred_reads_the_paper_format():
    from envs.judges import parse_preferred

    assert parse_preferred("Comparison: A is shorter.\nPreferred: A") == "A"
    assert parse_preferred('Comparison: x\nPreferred: "B"') == "B"
    assert parse_preferred("**Comparison:** x\n**Preferred:** B") == "B"
    assert parse_preferred("Comparison: I prefer neither.\nB") == "B"
    assert parse_preferred("Comparison: both fine.\nPreferred: neither") is None
    assert parse_preferred("") is None


def test_preflight_names_what_is_missing_in_one_line(hub, server, monkeypatch):
    from envs import ENVS

    env = ENVS.get("tldr")
    env.preflight(small(hub, judge=server.judge()))  # all local, the endpoint answers: fine

    def one_line(params) -> str:
        with pytest.raises(Unavailable) as e:
            env.preflight(params)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert one_line(small(hub, dataset="/no/such/tldr")) == \
        "env tldr: env.params.dataset = /no/such/tldr: no such file or directory"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unreachable hub id, fast and deterministic
    msg = one_line(small(hub, pairs_dataset="no-such-org/no-such-comparisons"))
    assert "cannot load dataset 'no-such-org/no-such-comparisons' (env.params.pairs_dataset)" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "(env.params.judge.model)" in one_line(small(hub, judge={"kind": "reward_model", "model": "no-org/no-rm"}))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    port = closed_port()
    msg = one_line(small(hub, judge=server.judge(base_url=f"http://127.0.0.1:{port}/v1")))
    assert msg.startswith(f"env tldr: the judge endpoint env.params.judge.base_url = http://127.0.0.1:{port}/v1 "
                          "is not usable (GET http://127.0.0.1:")
    assert "not judge.model = 'other-model'" in one_line(small(hub, judge=server.judge(model="other-model")))


@pytest.mark.slow
def test_prefbench_run_tldr_with_an_endpoint_judge(hub, server, tmp_path):
    """`prefbench run` end to end: tldr on the local files, DPO (2 steps) and best-of-n, judged by the
    local endpoint at T = 0 and 1, real Ray Train + DeepSpeed."""
    suite = {
        "name": "tldr-e2e",
        "env": {"name": "tldr", "params": {
            "dataset": hub["dataset"], "pairs_dataset": hub["pairs_dataset"], "sft_model": hub["sft_model"],
            "tokenizer": "", "num_train_prompts": 8, "num_eval_prompts": 4, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_new_tokens": 24, "judge": server.judge(max_concurrency=4)}},
        "seeds": [0],
        "baseline": False,
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 2},
        "eval": {"num_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "temperatures": [0.0, 1.0]},
        "reward_model": {"epochs": 1.0, "batch_size": 4},
        "algorithms": [{"name": "dpo", "sweep": {"beta": [0.5]}}, {"name": "best-of-n", "params": {"n": 2}}],
        "scaling": {"num_workers": 1, "max_concurrent_trials": 2},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(suite))  # JSON is YAML
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    evals = pd.read_parquet(out / "evals.parquet")
    final = evals[evals["final"]]
    assert set(final["algorithm"]) == {"dpo", "best-of-n"}
    assert sorted(set(final["temperature"])) == [0.0, 1.0]
    assert final["win_rate"].between(0, 1).all() and final["win_rate"].notna().all()
    assert len(server.requests) > 0  # the workers asked the endpoint
