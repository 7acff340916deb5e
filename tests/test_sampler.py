"""prefbench's own decoding loop (`Policy._generate_batch`): it draws exactly from softmax(logits / T).

Checked against exact enumeration of the first two tokens on the tiny vocabulary, against transformers'
own `generate` in distribution (sampling) and token for token (greedy), with left padding, for GPT-2
and Llama (rotary positions), each with a preallocated and a growing KV cache.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.policy import Policy

PROMPT = "the movie was"


@pytest.fixture
def peaked(policy):
    """The tiny policy with its matrices drawn N(0, 0.2²): next-token distributions that put 5-10 % on
    their likeliest tokens (the untrained model is near uniform over its vocabulary: too few
    two-token outcomes would be frequent enough to test)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return policy.freeze()


def exact_two_token_distribution(policy: Policy, prompt: str, temperature: float) -> dict[tuple, float]:
    """P(y1, y2) for every pair of first tokens by enumeration (an EOS first ends the sample: (eos,))."""
    ids = policy.encode_prompts([prompt])[0]
    eos, vocab = policy.tokenizer.eos_token_id, policy.model.config.vocab_size
    with torch.no_grad():
        first = torch.log_softmax(policy.model(input_ids=torch.tensor([ids])).logits[0, -1].double() / temperature, -1)
        seconds = torch.tensor([ids + [y] for y in range(vocab)])
        second = torch.log_softmax(policy.model(input_ids=seconds).logits[:, -1].double() / temperature, -1)  # (V, V)
    joint = (first[:, None] + second).exp().numpy()  # (V, V)
    dist = {(a, b): float(joint[a, b]) for a in range(vocab) if a != eos for b in range(vocab)}
    dist[(eos,)] = float(first[eos].exp())
    return dist


def outcomes(completion_ids: list[list[int]]) -> list[tuple]:
    return [tuple(c[:2]) for c in completion_ids]


def binned(counts_or_probs: dict[tuple, float], bins: list[tuple]) -> np.ndarray:
    """Values of `bins` and, last, everything else."""
    inside = [counts_or_probs.get(b, 0.0) for b in bins]
    return np.array(inside + [sum(counts_or_probs.values()) - sum(inside)])


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z of 1e-4), Wilson-Hilferty's approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def counts(samples: list[tuple]) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for s in samples:
        out[s] = out.get(s, 0.0) + 1.0
    return out


def hf_generate(policy: Policy, prompts: list[str], temperature: float, max_new_tokens: int, seed: int) -> list[list[int]]:
    """transformers' `generate` with every logits processor and warper neutral: the reference sampler."""
    from transformers import GenerationConfig

    tok = policy.tokenizer
    batch = policy.encode_prompts(prompts)
    width = max(len(x) for x in batch)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in batch])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    sample = temperature > 0
    config = GenerationConfig(
        do_sample=sample, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
    )
    saved, policy.model.generation_config = policy.model.generation_config, GenerationConfig()
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = policy.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        policy.model.generation_config = saved
    result = []
    for row in out[:, width:].tolist():
        result.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return result


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_first_two_tokens_follow_exact_enumeration_and_transformers_generate(peaked, temperature):
    policy = peaked
    exact = exact_two_token_distribution(policy, PROMPT, temperature)
    n = 30_000
    ours = outcomes(policy.generate([PROMPT], n=n, temperature=temperature, max_new_tokens=2, seed=1,
                                    batch_size=4096).completion_ids)
    theirs = outcomes(hf_generate(policy, [PROMPT] * 6000, temperature, 2, seed=2))
    bins = [b for b, p in sorted(exact.items(), key=lambda kv: -kv[1]) if p * len(theirs) >= 5][:400]
    assert len(bins) > 50  # enough outcomes for the test to see a wrong distribution
    expected = binned(exact, bins)
    for samples in (ours, theirs):  # the test is fair: transformers' sampler passes it too
        observed = binned(counts(samples), bins)
        stat = float(((observed - len(samples) * expected) ** 2 / (len(samples) * expected)).sum())
        assert stat < chi2_critical(len(bins)), (stat, chi2_critical(len(bins)))
    # and the two samplers agree with each other (a two-sample chi-square of homogeneity)
    a, b = binned(counts(ours), bins), binned(counts(theirs), bins)
    pooled = (a + b) / (len(ours) + len(theirs))
    stat = float((((a - len(ours) * pooled) ** 2) / (len(ours) * pooled)
                  + ((b - len(theirs) * pooled) ** 2) / (len(theirs) * pooled)).sum())
    assert stat < chi2_critical(len(bins))


def test_a_wrong_temperature_fails_the_enumeration_test(peaked):
    """The statistic above sees a sampler that is off: samples at T = 0.8 against P at T = 1."""
    policy = peaked
    exact = exact_two_token_distribution(policy, PROMPT, 1.0)
    samples = outcomes(policy.generate([PROMPT], n=30_000, temperature=0.8, max_new_tokens=2, seed=1,
                                       batch_size=4096).completion_ids)
    bins = [b for b, p in sorted(exact.items(), key=lambda kv: -kv[1]) if p * len(samples) >= 5][:400]
    observed, expected = binned(counts(samples), bins), binned(exact, bins)
    stat = float(((observed - len(samples) * expected) ** 2 / (len(samples) * expected)).sum())
    assert stat > chi2_critical(len(bins))


def _llama(policy: Policy) -> Policy:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=policy.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, eos_token_id=policy.tokenizer.eos_token_id,
                         pad_token_id=policy.tokenizer.pad_token_id)
    return Policy(LlamaForCausalLM(config), policy.tokenizer)


@pytest.mark.parametrize("arch, static", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_greedy_is_transformers_greedy_token_for_token_and_sampled_logps_are_teacher_forced(policy, arch, static):
    policy = _llama(policy) if arch == "llama" else policy
    policy.static_cache = static  # a preallocated StaticCache, or transformers' growing DynamicCache
    policy.model.eval()
    prompts = ["the movie was", "i", "overall the acting and the plot were", "a"]  # left padding of 0-7 tokens
    greedy = policy.generate(prompts, n=1, temperature=0.0, max_new_tokens=20, seed=0)
    assert greedy.completion_ids == hf_generate(policy, prompts, 0.0, 20, seed=0)
    assert greedy.token_logps is None
    roll = policy.generate(prompts, n=4, temperature=0.7, max_new_tokens=20, seed=3)
    scored, mask = policy.token_logps(roll.prompt_ids, roll.completion_ids, temperature=0.7)
    width = mask.shape[1]
    np.testing.assert_allclose(roll.token_logps[:, :width].numpy(), (scored * mask).detach().numpy(), atol=1e-4)
    assert (roll.token_logps[:, width:] == 0).all() and (roll.token_logps[:, :width][mask == 0] == 0).all()
