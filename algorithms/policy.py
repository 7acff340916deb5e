"""The shared policy/reference interface: a Hugging Face causal LM + its tokenizer.

Every algorithm trains a `Policy` against a frozen reference `Policy`, and the one evaluator
(bench.evaluate) measures any `Sampler`. Conventions, used everywhere in prefbench:

- A *prompt* is encoded with the tokenizer's special tokens (a BOS where the tokenizer adds one);
  a *completion* is encoded without them and ends with EOS exactly when the model stopped on its
  own. A sample that hit `max_new_tokens` has no EOS, and none is added when it is re-encoded:
  `Rollout.ended` says which samples ended, and it travels with them (pairs carry `chosen_ended` /
  `rejected_ended`, references `ended`) so that no algorithm and no reward model learns from a token
  the policy never sampled. Text without such a flag (human-written pairs) is taken as complete:
  EOS appended, TRL's convention for pairs.
- Completion text is the decoded sampled tokens as they are, leading space included where a
  sub-word tokenizer put one (" like", as TRL's pairs write it): prompt + completion is the text,
  and encoding a sampled completion gives back the sampled ids. (Stripping it made byte-level BPE
  models re-encode "like" instead of the sampled " like", so pair algorithms trained on token ids
  the policy never produced.)
- Log-probs are natural logs (nats). `token_logps` at temperature T scores the distribution that
  sampling at T draws from: softmax(logits / T). Temperature 0 means greedy decoding; it has no
  log-probs.
- Generation is prefbench's own decoding loop (`Policy._generate_batch`): batched (left padding),
  a KV cache (preallocated on GPUs), seeded, and each token drawn from the full distribution softmax(logits / T)
  by inverse CDF: no top-k, top-p, min-p, typical or η/ε cutoffs, no repetition penalty, no n-gram
  ban, no minimum length. Nothing of the model's own `generation_config` is read (transformers'
  `generate` fills every unset field from it). That is what makes sampled log-probs and KL
  estimates honest. The log-prob of every sampled token comes with the samples (`Rollout.token_logps`):
  the evaluator's KL needs no second pass of the policy.
- Dropout is off in every model a Policy or ScalarModel holds (`disable_dropout`, applied when one
  is made): trained policies, critics and reward models are scored in train mode exactly as the
  reference is in eval mode, as TRL and the DPO paper's code do. A DPO loss at the reference is
  then exactly log 2 whatever the model's config says about dropout.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@dataclass
class Rollout:
    """Completions sampled for prompts: `n` per prompt, prompt-major (prompt 0's n samples first)."""

    prompts: list[str]  # (N,) the prompt text of each sample
    prompt_index: np.ndarray  # (N,) index of the sample's prompt in the input list
    completions: list[str]  # (N,) decoded completion text, special tokens removed, NOT stripped (a leading space stays)
    prompt_ids: list[list[int]]  # (N, variable) prompt tokens, no padding
    completion_ids: list[list[int]]  # (N, variable) sampled tokens, up to and including EOS where the sample ended
    temperature: float
    ended: np.ndarray  # (N,) bool: the sample stopped on EOS (False: it hit max_new_tokens, no EOS)
    # extra per-sample columns a sampler may attach (e.g. a reward used to rerank)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # (N, T) log π_T of each sampled token (nats, float32) as the sampling step computed it,
    # left-aligned, 0 past each sample's end; None for greedy decoding or a sampler that keeps none
    token_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> np.ndarray:
        """Completion length in tokens (EOS included), shape (N,)."""
        return np.array([len(c) for c in self.completion_ids], dtype=np.int64)


def encode_completions(
    tokenizer, completions: Sequence[str], *, add_eos: bool = True, ended: Sequence[bool] | None = None
) -> list[list[int]]:
    """Completion texts as ids without special tokens, + EOS where `ended` (all, when None) and `add_eos`.
    The one encoding of completions: the policy's (`Policy.encode_completions`) and the reward model's."""
    ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    if ended is None:
        ended = [True] * len(ids)
    elif len(ended) != len(ids):
        raise ValueError(f"{len(ids)} completions but {len(ended)} ended flags")
    eos = tokenizer.eos_token_id
    return [list(x) + [eos] if add_eos and bool(e) else list(x) for x, e in zip(ids, ended)]


def ended_flags(frame, column: str) -> list[bool] | None:
    """The `<column>_ended` flags of a pairs/references frame (None when the frame has none: complete texts)."""
    name = f"{column}_ended" if column else "ended"
    return [bool(x) for x in frame[name].tolist()] if name in frame.columns else None


def right_padded(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion per row, right-padded: (input_ids, attention_mask), both (B, L)."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return input_ids, attention_mask


def completion_span(
    values: torch.Tensor, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
    *, offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion tokens' columns of per-position `values` (B, W), left-aligned: (values, mask), (B, Tc).

    Column len(prompt) − 1 + t belongs to completion token t: the position that predicts it (log-probs)
    or the state just before it (values). mask is 1 on real completion tokens, 0 on padding. `offset`:
    `values` starts at that position (its first `offset` columns were never computed).
    """
    dev = values.device
    c_len = torch.tensor([len(c) for c in completion_ids], device=dev)
    start = torch.tensor([len(p) - 1 - offset for p in prompt_ids], device=dev)
    t = torch.arange(int(c_len.max()), device=dev)
    idx = (start[:, None] + t[None, :]).clamp(max=values.shape[1] - 1)
    mask = (t[None, :] < c_len[:, None]).to(values.dtype)
    return torch.gather(values, 1, idx) * mask, mask


# ------------------------------------------------------------------------ mixed precision
_AUTOCAST_DTYPE: torch.dtype | None = None  # see set_autocast


def set_autocast(dtype: torch.dtype | None) -> None:
    """Run every forward of every `Policy` and `ScalarModel` in this process (sampling, scoring,
    training; policy, reference, reward model and critic alike) under `torch.autocast(dtype)`, or in
    the weights' own dtype with None (the default). A process setting, like torch's thread count:
    bench sets it once per worker from `deepspeed.autocast`, so that no model of a trial computes
    differently from another. Weights, gradients and the optimizer stay in their own dtype (fp32);
    matmuls run in `dtype`; log-probs and log-softmax are taken in float32 from the logits."""
    global _AUTOCAST_DTYPE
    _AUTOCAST_DTYPE = dtype


def autocast(device: torch.device):
    """The process's autocast context (`set_autocast`) for a forward on `device`, or a no-op."""
    if _AUTOCAST_DTYPE is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE)


def forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    """The keyword arguments `model.forward` takes (e.g. whether it has `logits_to_keep`, and whether
    its KV cache argument is `cache` or, before transformers 5.2x, `past_key_values`)."""
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)


def _kv_cache(model: torch.nn.Module, length: int, static: bool):
    """A KV cache for `length` positions: preallocated (`StaticCache`) where the model supports it,
    else transformers' growing `DynamicCache`."""
    from transformers import DynamicCache, StaticCache

    return StaticCache(config=model.config, max_cache_len=length) if static else DynamicCache()


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off every dropout of `model`, in train mode too: each `nn.Dropout`'s p and every float
    attribute named like a dropout rate that modules read at forward time (attention dropout in
    sdpa/eager attention, e.g. Llama's `attention_dropout`). The config is left as it is."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    return model


class Policy:
    """A causal LM + tokenizer with generation and teacher-forced log-probs.

    `model` is any `transformers` causal LM (e.g. GPT2LMHeadModel); `tokenizer` a fast tokenizer
    with `eos_token_id` and `pad_token_id` set. When bench wraps the model in a DeepSpeed engine it
    sets `policy.engine`; training forward passes (with grad) then go through the engine,
    generation and no-grad scoring through the bare module. `gathered()` is a context manager under
    which the whole model is materialised on this rank: a no-op, except under ZeRO-3 where bench
    sets it to gather the parameter shards once (generation then runs without per-layer
    collectives, so ranks may generate different numbers of tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, frozen: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError("Policy needs a tokenizer with an EOS token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = disable_dropout(model) if model is not None else None
        self.tokenizer = tokenizer
        self.engine = None  # a deepspeed.DeepSpeedEngine wrapping `model`, set by bench
        self.gathered = contextlib.nullcontext  # () -> context with every parameter whole (ZeRO-3: set by bench)
        self.frozen = False
        self._forward_parameters: frozenset[str] | None = None  # model.forward's keywords, looked up once
        # generation's KV cache: preallocated (True), growing (False), or None: preallocated on CUDA
        # where the model supports it. On 2 CPU cores the growing cache was as fast or faster (SmolLM2,
        # 128 x 16 tokens: 12.0 s vs 12.6 s; transformers' generate 14.4 s): a static cache attends
        # over its whole length at every step.
        self.static_cache: bool | None = None
        if frozen:
            self.freeze()

    # ----------------------------------------------------------------- construction and I/O
    @classmethod
    def from_pretrained(cls, path: str | Path, *, frozen: bool = False, **model_kwargs) -> "Policy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
        return cls(model, tokenizer, frozen=frozen)

    def save_pretrained(self, path: str | Path) -> None:
        """Hugging Face format: any HF tool can load the result."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    def freeze(self) -> "Policy":
        """Make this a reference: eval mode, no grads, never updated."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self

    def frozen_copy(self) -> "Policy":
        return Policy(copy.deepcopy(self.model), self.tokenizer, frozen=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------- tokenisation
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    def encode_completions(
        self, completions: Sequence[str], *, add_eos: bool = True, ended: Sequence[bool] | None = None
    ) -> list[list[int]]:
        """Completion texts as token ids (no special tokens), EOS appended where the completion ended:
        `ended` per completion (a sample that hit max_new_tokens: False), all ended when None."""
        return encode_completions(self.tokenizer, completions, add_eos=add_eos, ended=ended)

    # ------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        seed: int = 0,
        batch_size: int = 512,
        return_logps: bool = False,
    ) -> Rollout:
        """Sample `n` completions per prompt at `temperature` (0 = greedy), stopping at EOS.

        `token_logps` of the result holds log π_T of every sampled token as the sampling step computed
        it, (N, T) (None at temperature 0); with `return_logps`, `extras["sample_logps"]` holds their
        per-sample sums, the sequence log-prob under the distribution it was drawn from, shape (N,).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode_prompts(prompts)
        flat_prompt_ids = [ids for ids in prompt_ids for _ in range(n)]
        flat_prompts = [p for p in prompts for _ in range(n)]
        index = np.repeat(np.arange(len(prompts)), n)
        completion_ids: list[list[int]] = []
        ended: list[bool] = []
        token_logps: list[torch.Tensor] = []  # per batch (B, T_batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.gathered(), torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(seed)
                for start in range(0, len(flat_prompt_ids), batch_size):
                    batch = flat_prompt_ids[start : start + batch_size]
                    ids, stopped, logps = self._generate_batch(batch, temperature, max_new_tokens)
                    completion_ids.extend(ids)
                    ended.extend(stopped)
                    token_logps.append(logps)
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        steps = max((x.shape[1] for x in token_logps), default=0)
        logps = torch.cat([torch.nn.functional.pad(x, (0, steps - x.shape[1])) for x in token_logps]) if token_logps \
            else torch.zeros(0, 0)  # (N, T)
        return Rollout(
            prompts=flat_prompts,
            prompt_index=index,
            completions=texts,  # as decoded: encode_completions gives back the sampled ids (see the module doc)
            prompt_ids=flat_prompt_ids,
            completion_ids=completion_ids,
            temperature=float(temperature),
            ended=np.asarray(ended, dtype=bool),
            extras={"sample_logps": logps.double().sum(-1).numpy()} if return_logps and temperature > 0 else {},
            token_logps=logps if temperature > 0 else None,
        )

    def _rng_devices(self) -> list:
        dev = self.device
        return [dev] if dev.type == "cuda" else []

    def _generate_batch(self, batch: list[list[int]], temperature: float, max_new_tokens: int):
        """prefbench's own decoding loop: one prefill, then one token per step through the KV cache
        (`static_cache`), each sampled from softmax(logits / T) exactly (greedy at T = 0).

        Sampling is by inverse CDF: one uniform u per row, the token is the first whose cumulative
        probability (float64) exceeds u · total: exactly the categorical distribution, with one
        random number per row where `torch.multinomial` draws one exponential per vocabulary entry
        (94 ms of a 230 ms step on SmolLM2's 49 k vocabulary). Only the last prompt position's logits
        are computed in the prefill (`logits_to_keep=1`). A row that sampled EOS keeps being fed
        padding (as transformers does) until every row ended or `max_new_tokens` is reached.
        Returns (completion ids up to and including EOS, ended flags, per-token log π_T (B, T) float32).
        """
        model, tok = self.model, self.tokenizer
        dev, pad, eos = self.device, tok.pad_token_id, tok.eos_token_id
        rows, width = len(batch), max(len(x) for x in batch)
        total = width + max_new_tokens
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in batch], device=dev)  # (B, W), left-padded
        mask = torch.zeros(rows, total, dtype=torch.long, device=dev)  # (B, W + max_new): 1 where a real token sits
        mask[:, :width] = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=dev)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # (B, W): left padding does not shift positions
        static = self.static_cache
        if static is None:  # a preallocated cache on GPUs, where the model takes one (transformers' flag)
            static = dev.type == "cuda" and getattr(model, "_can_compile_fullgraph", False)
        accepts = self._accepts()
        cache = {"cache" if "cache" in accepts else "past_key_values": _kv_cache(model, total, static)}
        # a static cache attends over its whole length: the mask covers it (future columns 0)
        step_mask = (lambda n: mask) if static else (lambda n: mask[:, :n])
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        with autocast(dev):
            out = model(input_ids=input_ids, attention_mask=step_mask(width), position_ids=positions, **cache,
                        use_cache=True, cache_position=torch.arange(width, device=dev), **last_only)
        logits = out.logits[:, -1]  # (B, V)
        position = positions[:, -1:] + 1  # (B, 1)
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        tokens, logps = [], []
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)  # (B, V)
            if temperature > 0:
                cdf = logp.double().exp().cumsum(-1)  # (B, V)
                u = torch.rand(rows, 1, dtype=torch.float64, device=dev) * cdf[:, -1:]
                token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logp.shape[-1] - 1)
            else:
                token = logp.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)  # (B,)
            tokens.append(token)
            logps.append(torch.where(done, 0.0, logp.gather(1, token[:, None]).squeeze(1)))
            done = done | (token == eos)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            mask[:, width + t] = 1
            with autocast(dev):
                out = model(input_ids=token[:, None], attention_mask=step_mask(width + t + 1), position_ids=position,
                            **cache, use_cache=True, cache_position=torch.tensor([width + t], device=dev))
            logits = out.logits[:, -1]
            position = position + 1
        new_ids = torch.stack(tokens, 1)  # (B, T)
        result, stopped = [], []
        for row in new_ids.tolist():
            ended = eos in row
            if ended:
                row = row[: row.index(eos) + 1]  # keep the EOS: its probability is part of y
            result.append(row)
            stopped.append(ended)
        return result, stopped, torch.stack(logps, 1).cpu()

    # ------------------------------------------------------------------ teacher forcing
    def token_logps(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π_T(y_t | x, y_<t) of completions given prompts.

        Returns (logps, mask), both (B, Tc) with completions left-aligned; mask is 1 on real
        completion tokens, 0 on padding. Prompt tokens are never scored. Gradients flow unless the
        caller disables them (the reference is frozen, so its log-probs carry none).
        """
        if temperature <= 0:
            raise ValueError("log-probs need a temperature > 0 (temperature 0 is greedy decoding)")
        if len(prompt_ids) != len(completion_ids):
            raise ValueError("prompt_ids and completion_ids differ in length")
        input_ids, attention_mask = right_padded(prompt_ids, completion_ids, self.tokenizer.pad_token_id, self.device)
        forward = self.engine if self.engine is not None and torch.is_grad_enabled() else self.model
        # logits only from the position before the first completion token on (the shortest prompt's
        # last token): the vocabulary projection of prompt positions is never scored
        first = min(len(p) for p in prompt_ids) - 1  # (B, L) columns [first, L) are kept
        keep = {"logits_to_keep": input_ids.shape[1] - first} if first > 0 and "logits_to_keep" in self._accepts() else {}
        first = first if keep else 0
        with autocast(input_ids.device):
            logits = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
        logits = logits[:, :-1].float() / temperature  # (B, L-1-first, V): column i predicts token first+i+1
        targets = input_ids[:, first + 1 :]  # (B, L-1-first)
        all_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return completion_span(all_logps, prompt_ids, completion_ids, offset=first)

    def _accepts(self) -> frozenset[str]:
        """`forward_parameters` of the model, looked up once."""
        if self._forward_parameters is None:
            self._forward_parameters = forward_parameters(self.model)
        return self._forward_parameters

    def sequence_logps(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Σ_t log π_T(y_t | x, y_<t): per-sequence log-prob in nats, shape (B,)."""
        logps, mask = self.token_logps(prompt_ids, completion_ids, temperature=temperature)
        return (logps * mask).sum(-1)

    @torch.no_grad()
    def sequence_logps_batched(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        batch_size: int = 128,
    ) -> torch.Tensor:
        """`sequence_logps` without grads, in batches (for references and evaluation), (B,) on CPU."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                self.sequence_logps(
                    prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size], temperature=temperature
                ).cpu()
                for i in range(0, len(prompt_ids), batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

