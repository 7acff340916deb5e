"""Judges of summaries for the tldr env: how likely a summary is better than the human reference.

A judge maps (post, summary, reference) to P(summary beats reference) in [0, 1]; the tldr env uses
it as its gold reward, so the evaluator's win rate (gold vs the reference's own gold of ½) is the
win rate against the human reference summary. Two kinds, chosen by the env param `judge`:

- `{kind: reward_model, model, batch_size, max_length}`: a scalar-head sequence classifier
  (num_labels = 1) scoring tokenizer(post, summary) pairs, e.g. OpenAssistant's
  reward-model-deberta-v3-large-v2. P = sigmoid(r(x, y) − r(x, ref)) (Bradley–Terry).
- `{kind: openai, base_url, model, api_key_env, max_concurrency, timeout_s, max_retries,
  backoff_s, max_tokens, seed}`: an OpenAI-compatible chat endpoint (GPT-4 as in the paper, or a
  local vLLM server) asked the DPO paper's summarization prompt (Rafailov et al. 2023, App. C.2)
  at temperature 0. The two summaries' order is a seeded coin per comparison (deterministic given
  `seed`, the post and the summaries): LLM judges favour a position. P is 1 or 0; an answer with
  no parseable "Preferred: A|B" after every retry counts as a tie (½) and is counted and logged.
  Only the standard library (urllib, threads), so nothing beyond prefbench's own dependencies.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from algorithms.interface import ParamError, check

# The DPO paper's GPT-4 prompt for summarization win rates (Appendix C.2), its wording verbatim.
PAPER_PROMPT = """Which of the following summaries does a better job of summarizing the most \
important points in the given forum post, without including unimportant or irrelevant details? \
A good summary is both precise and concise.

Post:
{post}

Summary A:
{summary_a}

Summary B:
{summary_b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. \
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

_PREFERRED = re.compile(r"Preferred:\s*[\"'*<]*\s*([AB])\b")


class JudgeError(RuntimeError):
    """The judge could not be asked (endpoint down after retries, a 4xx): the evaluation fails."""


@dataclass
class RewardModelJudgeSpec:
    kind: str = "reward_model"
    model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"  # hub id or local dir, num_labels = 1
    batch_size: int = 32  # (post, summary) pairs per forward pass
    max_length: int = 512  # tokens per pair; longer pairs are truncated (the post first: it is longer)

    def __post_init__(self) -> None:
        check(bool(self.model), "judge.model", "must name a reward model (hub id or local directory)")
        check(self.batch_size >= 1, "judge.batch_size", "must be >= 1")
        check(self.max_length >= 8, "judge.max_length", "must be >= 8")


@dataclass
class OpenAIJudgeSpec:
    kind: str = "openai"
    base_url: str = "http://localhost:8000/v1"  # OpenAI-compatible API root (vLLM: http://HOST:PORT/v1)
    model: str = ""  # the model name the endpoint serves (the paper: gpt-4-0314)
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key, sent as a Bearer token when set
    max_concurrency: int = 8  # requests in flight per process (each data-parallel rank has its own)
    timeout_s: float = 60.0  # per request
    max_retries: int = 5  # retries after a 429 / 5xx / timeout / unparseable answer
    backoff_s: float = 1.0  # first retry wait after a 429 / 5xx / timeout, doubled each retry
    max_tokens: int = 256  # room for "Comparison: ..." and "Preferred: X"
    seed: int = 0  # seeds the coin that orders the two summaries of each comparison

    def __post_init__(self) -> None:
        check(self.base_url.startswith(("http://", "https://")), "judge.base_url", "must be an http(s) URL")
        check(bool(self.model), "judge.model", "must name the model the endpoint serves (e.g. vLLM's --served-model-name)")
        check(self.max_concurrency >= 1, "judge.max_concurrency", "must be >= 1")
        check(self.timeout_s > 0, "judge.timeout_s", "must be > 0")
        check(self.max_retries >= 0, "judge.max_retries", "must be >= 0")
        check(self.backoff_s >= 0, "judge.backoff_s", "must be >= 0")
        check(self.max_tokens >= 1, "judge.max_tokens", "must be >= 1")


KINDS = {"reward_model": RewardModelJudgeSpec, "openai": OpenAIJudgeSpec}


def judge_spec(raw) -> RewardModelJudgeSpec | OpenAIJudgeSpec:
    """The judge dataclass of the env param `judge` (a mapping); ParamError names `judge.KEY`."""
    if isinstance(raw, (RewardModelJudgeSpec, OpenAIJudgeSpec)):
        return raw
    if not isinstance(raw, dict):
        raise ParamError("judge", f"expected a mapping with a kind ({', '.join(sorted(KINDS))}), got {raw!r}")
    kind = raw.get("kind", "reward_model")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ParamError("judge.kind", f"unknown judge kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    cls = KINDS[kind]
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ParamError(f"judge.{key}", f"unknown key for the {kind} judge (known: {', '.join(sorted(hints))})")
        tp = hints[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) if tp is str else number and (tp is float or isinstance(value, int))):
            raise ParamError(f"judge.{key}", f"expected {tp.__name__}, got {value!r}")
        values[key] = float(value) if tp is float else value  # 30 and 30.0: one cache key
    return cls(**values)


def make_judge(spec) -> "RewardModelJudge | OpenAIJudge":
    spec = judge_spec(spec)
    return RewardModelJudge(spec) if isinstance(spec, RewardModelJudgeSpec) else OpenAIJudge(spec)


def _same(summary: str, reference: str) -> bool:
    return summary.strip() == reference.strip()


# ---------------------------------------------------------------------------- reward model
class RewardModelJudge:
    """P(y beats ref | x) = sigmoid(r(x, y) − r(x, ref)) with a scalar-head classifier."""

    def __init__(self, spec: RewardModelJudgeSpec):
        self.spec = spec
        self._model = None
        self._tokenizer = None
        self._ref_scores: dict[tuple[str, str], float] = {}  # r(x, ref) per post: scored once

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.spec.model)
        model = AutoModelForSequenceClassification.from_pretrained(self.spec.model)
        if model.config.num_labels != 1:
            raise ValueError(f"judge.model {self.spec.model}: a reward model has one output (num_labels = 1), "
                             f"this one has {model.config.num_labels}")
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        # in a GPU worker the judge sits on that worker's device, beside the policy
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._model = model.to(device).eval()

    def scores(self, posts: list[str], summaries: list[str]) -> np.ndarray:
        """r(x, y) per (post, summary), (N,) float64."""
        import torch

        if self._model is None:
            self._load()
        out = []
        with torch.no_grad():
            for i in range(0, len(posts), self.spec.batch_size):
                enc = self._tokenizer(
                    posts[i : i + self.spec.batch_size], summaries[i : i + self.spec.batch_size],
                    truncation=True, max_length=self.spec.max_length, padding=True, return_tensors="pt",
                ).to(self._model.device)
                out.append(self._model(**enc).logits[:, 0].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def prefer(self, posts: list[str], summaries: list[str], references: list[str]) -> np.ndarray:
        summaries = [s.strip() for s in summaries]
        references = [r.strip() for r in references]
        todo = sorted({(p, r) for p, r in zip(posts, references)} - set(self._ref_scores))
        if todo:
            ref_scores = self.scores([p for p, _ in todo], [r for _, r in todo])
            self._ref_scores.update(zip(todo, ref_scores.tolist()))
        diff = self.scores(posts, summaries) - np.array([self._ref_scores[(p, r)] for p, r in zip(posts, references)])
        prob = 1.0 / (1.0 + np.exp(-diff))
        # the reference against itself is a tie exactly, whatever padding did to the float
        return np.where([_same(s, r) for s, r in zip(summaries, references)], 0.5, prob)


# ------------------------------------------------------------------------- OpenAI endpoint
def summary_is_a(seed: int, post: str, summary: str, reference: str) -> bool:
    """The seeded coin of one comparison: True when the judged summary is shown as "A"."""
    digest = hashlib.sha256(json.dumps([seed, post, summary, reference]).encode()).digest()
    return digest[0] % 2 == 0


def parse_preferred(text: str) -> str | None:
    """"A" or "B" from the judge's answer ("Preferred: A", the paper's format), else None."""
    found = _PREFERRED.findall(text or "")
    if found:
        return found[-1]
    lines = [line.strip().strip("\"'*.") for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines and lines[-1] in ("A", "B") else None


class OpenAIJudge:
    """The paper's GPT-4 judge against any OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, spec: OpenAIJudgeSpec):
        self.spec = spec
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self._cache: dict[bytes, float] = {}  # identical comparisons are asked once (keyed by a digest)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "unparsed": 0}

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.spec.api_key_env) if self.spec.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        self._count("retries")
        try:
            delay = float(retry_after) if retry_after is not None else self.spec.backoff_s * 2**attempt
        except ValueError:  # an HTTP-date Retry-After: fall back to our own schedule
            delay = self.spec.backoff_s * 2**attempt
        time.sleep(min(delay, 60.0))

    def ask(self, content: str) -> str | None:
        """The judge's choice ("A"/"B") for one prompt, or None when no answer parsed after the retries."""
        body = json.dumps({
            "model": self.spec.model, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": self.spec.max_tokens,
        }).encode()
        last = "no attempt"
        transport_failed = False
        for attempt in range(self.spec.max_retries + 1):
            self._count("requests")
            request = urllib.request.Request(self.url, data=body, headers=self.headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
                    reply = json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:  # rate limit, overloaded server: back off and retry
                    last, transport_failed = f"HTTP {e.code}", True
                    e.close()
                    if attempt < self.spec.max_retries:
                        self._wait(attempt, e.headers.get("Retry-After"))
                    continue
                detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
                raise JudgeError(f"judge endpoint {self.url}: HTTP {e.code} {e.reason}: {detail}") from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError,
                    json.JSONDecodeError) as e:  # down, dropped, timed out, cut short
                last, transport_failed = f"{type(e).__name__}: {getattr(e, 'reason', e)}", True
                if attempt < self.spec.max_retries:
                    self._wait(attempt)
                continue
            transport_failed = False
            try:
                text = reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                text = None
            choice = parse_preferred(text)
            if choice is not None:
                return choice
            last = f"unparseable answer {str(text)[:80]!r}"  # asked again at once: not a rate problem
        if transport_failed:
            raise JudgeError(f"judge endpoint {self.url}: no answer after {self.spec.max_retries + 1} tries ({last})")
        self._count("unparsed")
        return None

    def _compare(self, item: tuple[str, str, str]) -> float:
        post, summary, reference = item
        first = summary_is_a(self.spec.seed, post, summary, reference)
        a, b = (summary, reference) if first else (reference, summary)
        choice = self.ask(PAPER_PROMPT.format(post=post, summary_a=a, summary_b=b))
        if choice is None:
            return 0.5
        return 1.0 if (choice == "A") == first else 0.0

    def prefer(self, posts: list[str], summaries: list[str], references: list[str]) -> np.ndarray:
        items = [(p.strip(), s.strip(), r.strip()) for p, s, r in zip(posts, summaries, references)]
        keys = [hashlib.sha256(json.dumps(it).encode()).digest() for it in items]
        todo = dict((k, it) for k, it in zip(keys, items) if k not in self._cache and not _same(it[1], it[2]))
        unparsed_before = self.stats["unparsed"]
        if todo:
            with ThreadPoolExecutor(max_workers=self.spec.max_concurrency) as pool:
                self._cache.update(zip(todo, pool.map(self._compare, todo.values())))
        unparsed = self.stats["unparsed"] - unparsed_before
        if unparsed:
            print(f"[prefbench] tldr judge {self.spec.model}: {unparsed} of {len(todo)} answers had no "
                  f"parseable 'Preferred: A|B' after {self.spec.max_retries + 1} tries; counted as ties (1/2)",
                  file=sys.stderr, flush=True)
        return np.array([0.5 if _same(it[1], it[2]) else self._cache[k] for k, it in zip(keys, items)], dtype=np.float64)

    def check_reachable(self) -> str | None:
        """None when GET {base_url}/models answers and lists the model (or lists none); else why not."""
        url = self.spec.base_url.rstrip("/") + "/models"
        request = urllib.request.Request(url, headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.spec.timeout_s, 10.0)) as response:
                listing = json.loads(response.read())
        except urllib.error.HTTPError as e:
            hint = f" (is ${self.spec.api_key_env} set?)" if e.code in (401, 403) else ""
            return f"GET {url}: HTTP {e.code} {e.reason}{hint}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as e:
            return f"GET {url}: {getattr(e, 'reason', e)}"
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)] if isinstance(listing, dict) else []
        if served and self.spec.model not in served:
            return f"it serves {', '.join(map(str, served[:5]))}, not judge.model = {self.spec.model!r}"
        return None
