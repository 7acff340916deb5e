"""Equal terms between algorithms (issue 19): what every algorithm shares must not depend on the
algorithm — dropout, EOS handling, the sampling distribution. Each test fails on the behaviour before
the fix (ee3b389): dropout on in train mode, an EOS appended to every truncated sample, and the
model's own generation_config leaking into sampling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from algorithms.dpo import DPO, DPOParams
from algorithms.interface import EnvData, TrainContext, TrainSettings, plain_optimizer
from algorithms.ipo import IPO, IPOParams
from algorithms.pairs import EncodedPairs
from algorithms.policy import Policy
from algorithms.preferred_ft import PreferredFT, PreferredFTParams, preferred_examples
from algorithms.reward_model import ScalarModel
from algorithms.sft import sft_loss
from algorithms.simpo import SimPO, SimPOParams, simpo_loss
from algorithms.unlikelihood import Unlikelihood, UnlikelihoodParams, unlikelihood_loss
from envs.base import pairs_from_samples

PAIRS = pd.DataFrame({
    "prompt": ["the movie was", "i loved the", "the plot was", "overall it was"] * 4,
    "chosen": ["very good .", "film . ten out of ten .", "great .", "wonderful ."] * 4,
    "rejected": ["very bad .", "film . one out of ten .", "awful .", "boring ."] * 4,
})


@pytest.fixture
def dropout_dir(tiny_env_dir, tmp_path):
    """The tiny env's initial model saved with dropout 0.1 everywhere (gpt2-large's, the imdb/tldr policies')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_env_dir / "init"), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, summary_first_dropout=0.1)
    assert model.config.resid_pdrop == 0.1
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(str(tiny_env_dir / "init")).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _ctx(policy, params, steps=1):
    train = TrainSettings(steps=steps, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=1000)
    logs = []
    ctx = TrainContext(
        policy=policy, reference=Policy.from_pretrained(policy.model.name_or_path, frozen=True), params=params,
        train=train, data=EnvData(train_prompts=[], eval_prompts=[], pairs=PAIRS, references=pd.DataFrame()),
        optimize=plain_optimizer(policy, train=train), evaluate=lambda *a, **k: {}, log=lambda step, m: logs.append(m),
    )
    return ctx, logs


def test_dropout_is_off_in_train_mode_for_policies_and_scalar_models(dropout_dir):
    policy = Policy.from_pretrained(dropout_dir)
    policy.model.train()
    p, c = policy.encode_prompts(["the movie was"] * 4), policy.encode_completions(["very good ."] * 4)
    a, b = policy.sequence_logps(p, c), policy.sequence_logps(p, c)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # with dropout 0.1 two train-mode passes differ
    rm = ScalarModel.from_pretrained(dropout_dir)
    rm.head.train()
    torch.testing.assert_close(rm.sequence_scores(p, c), rm.sequence_scores(p, c), rtol=0, atol=0)


@pytest.mark.parametrize("algo, params, key, closed_form", [
    (DPO(), DPOParams(beta=0.5), "losses/dpo", math.log(2.0)),  # −log σ(0)
    (IPO(), IPOParams(beta=0.5), "losses/ipo", 1 / (4 * 0.5**2)),  # (0 − 1/(2β))²
    (IPO(), IPOParams(beta=0.25, average_logps=False), "losses/ipo", 1 / (4 * 0.25**2)),
])
def test_first_pair_loss_at_the_reference_is_its_closed_form_with_dropout_in_the_config(dropout_dir, algo, params, key, closed_form):
    ctx, logs = _ctx(Policy.from_pretrained(dropout_dir), params)
    algo.train(ctx)
    assert logs[0][key] == pytest.approx(closed_form, abs=1e-5)  # at ee3b389 (dropout on): DPO 0.684, IPO 0.974 and 3.85


def test_reference_free_pair_methods_see_the_eval_mode_model_at_step_one(dropout_dir):
    """Unlikelihood, SimPO and Preferred-FT have no closed form at the reference: their first loss must be
    the loss of the model in eval mode (no dropout noise), computed here by hand."""
    ref = Policy.from_pretrained(dropout_dir, frozen=True)
    enc = EncodedPairs.encode(ref, PAIRS, "test")
    train = TrainSettings(steps=1, batch_size=8, lr=1e-3, warmup_steps=0, eval_every=1000)
    ctx, logs = _ctx(Policy.from_pretrained(dropout_dir), UnlikelihoodParams(alpha=1.0))
    idx = ctx.batch_indices(0, len(enc))
    with torch.no_grad():
        logps, mask = ref.token_logps(*enc.both(idx))
    b = len(idx)
    expected, _, _ = unlikelihood_loss(logps[:b], mask[:b], logps[b:], mask[b:], 1.0)
    Unlikelihood().train(ctx)
    assert logs[0]["losses/unlikelihood"] == pytest.approx(float(expected.mean()), abs=1e-5)

    ctx, logs = _ctx(Policy.from_pretrained(dropout_dir), SimPOParams(beta=2.0, gamma=0.5))
    avg = (logps * mask).sum(-1) / mask.sum(-1)  # (2B,) the same first batch: nats per token
    SimPO().train(ctx)
    assert logs[0]["losses/simpo"] == pytest.approx(float(simpo_loss(avg[:b], avg[b:], 2.0, 0.5)[0].mean()), abs=1e-5)

    ctx, logs = _ctx(Policy.from_pretrained(dropout_dir), PreferredFTParams())
    examples = preferred_examples(PAIRS)
    idx = ctx.batch_indices(0, len(examples))
    p_ids = ref.encode_prompts(examples["prompt"].tolist())
    c_ids = ref.encode_completions(examples["chosen"].tolist())
    with torch.no_grad():
        logps, mask = ref.token_logps([p_ids[i] for i in idx], [c_ids[i] for i in idx])
    PreferredFT().train(ctx)
    assert train.steps == 1 and logs[0]["losses/preferred_ft"] == pytest.approx(float(sft_loss(logps, mask)), abs=1e-5)


# ---------------------------------------------------------------------------------------------- EOS
def _plain_words(policy, ids) -> bool:
    """No special token but EOS in `ids` (decoding drops specials, so only such samples round-trip)."""
    tok = policy.tokenizer
    specials = set(tok.all_special_ids) - {tok.eos_token_id}
    return not specials & set(ids)


def test_a_truncated_sample_keeps_no_eos_through_rollouts_pairs_and_reward_model(policy, prompts):
    roll = policy.generate(prompts, n=16, temperature=1.0, max_new_tokens=3, seed=0)
    eos = policy.tokenizer.eos_token_id
    assert (~roll.ended).sum() > 0  # an untrained model rarely stops within 3 tokens
    for ids, ended in zip(roll.completion_ids, roll.ended):
        assert (ids[-1:] == [eos]) == bool(ended)
        assert ended or len(ids) == 3
    keep = [i for i, ids in enumerate(roll.completion_ids) if _plain_words(policy, ids)]
    assert len(keep) > 10
    texts, ended = [roll.completions[i] for i in keep], roll.ended[keep]
    # re-encoding the text with its flag gives back exactly the sampled ids (an EOS only where sampled)
    assert policy.encode_completions(texts, ended=ended) == [roll.completion_ids[i] for i in keep]
    rm = ScalarModel(policy.frozen_copy().model, policy.tokenizer)
    assert rm.encode(["x"] * len(texts), texts, ended)[1] == [roll.completion_ids[i] for i in keep]
    assert policy.encode_completions(["good ."])[0][-1] == eos  # text without a flag: complete, EOS


def test_pairs_record_which_sample_ended_and_pair_methods_encode_accordingly(policy, prompts):
    words = lambda ps, cs: np.array([len(c.split()) + 0.01 * i for i, c in enumerate(cs)], dtype=float)  # distinct
    pairs = pairs_from_samples(policy, prompts, words, samples_per_prompt=6, max_new_tokens=3, min_gap=0.0, seed=1)
    assert {"chosen_ended", "rejected_ended"} <= set(pairs.columns) and len(pairs)
    assert (~pairs["chosen_ended"]).any() or (~pairs["rejected_ended"]).any()
    enc = EncodedPairs.encode(policy, pairs, "test")
    eos = policy.tokenizer.eos_token_id
    for ids, ended in zip(enc.chosen_ids + enc.rejected_ids, pairs["chosen_ended"].tolist() + pairs["rejected_ended"].tolist()):
        assert (ids[-1:] == [eos]) == bool(ended)
    plain = pairs[["prompt", "chosen", "rejected"]]  # human-written pairs without flags: complete texts
    assert all(ids[-1] == eos for ids in EncodedPairs.encode(policy, plain, "test").chosen_ids)


# ------------------------------------------------------------------------------------- sampling
def test_generation_draws_from_softmax_over_t_whatever_the_models_generation_config(policy, prompts):
    gc = policy.model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 2.0, 2, 4
    gc.top_k, gc.min_p, gc.typical_p = 5, 0.2, 0.5
    for temperature in (1.0, 0.7):
        roll = policy.generate(prompts, n=8, temperature=temperature, max_new_tokens=10, seed=3, return_logps=True)
        scored = policy.sequence_logps_batched(roll.prompt_ids, roll.completion_ids, temperature=temperature)
        # generation's own per-sample log-probs are those of softmax(logits / T), teacher-forced
        np.testing.assert_allclose(roll.extras["sample_logps"], scored.numpy(), rtol=1e-4, atol=1e-4)
    assert policy.model.generation_config.repetition_penalty == 2.0  # the model's config is left as it was
