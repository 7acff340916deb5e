"""Policy: generation (seeded, greedy, EOS) and teacher-forced log-probs agree with each other."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from algorithms.policy import Policy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_match_the_sampled_tokens(policy, prompts, temperature):
    roll = policy.generate(prompts, n=8, temperature=temperature, max_new_tokens=12, seed=3, return_logps=True)
    scored = policy.sequence_logps_batched(roll.prompt_ids, roll.completion_ids, temperature=temperature)
    # left-padded KV-cache generation vs right-padded teacher forcing: same numbers up to float noise
    np.testing.assert_allclose(scored.numpy(), roll.extras["sample_logps"], rtol=1e-4, atol=1e-4)
    assert np.all(scored.numpy() < 0)


def test_token_logps_mask_prompt_and_padding(policy):
    p_ids = policy.encode_prompts(["the movie was", "i"])
    c_ids = policy.encode_completions(["very good .", "loved the film and the cast ."])
    logps, mask = policy.token_logps(p_ids, c_ids)
    assert logps.shape == mask.shape == (2, max(len(c) for c in c_ids))
    assert mask.sum(-1).tolist() == [len(c) for c in c_ids]
    assert torch.all(logps[mask == 0] == 0)
    # each row scored alone gives the same numbers: padding does not leak into real tokens
    for i in range(2):
        alone, _ = policy.token_logps([p_ids[i]], [c_ids[i]])
        torch.testing.assert_close(alone[0, : len(c_ids[i])], logps[i, : len(c_ids[i])], atol=1e-5, rtol=1e-5)


def test_generation_is_seeded_greedy_is_deterministic_and_stops_at_eos(policy, prompts):
    a = policy.generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=7)
    b = policy.generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=7)
    c = policy.generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=8)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    g1 = policy.generate(prompts, n=2, temperature=0.0, max_new_tokens=10, seed=1)
    g2 = policy.generate(prompts, n=1, temperature=0.0, max_new_tokens=10, seed=2)
    assert g1.completion_ids[::2] == g2.completion_ids
    eos = policy.tokenizer.eos_token_id
    for ids in a.completion_ids + g1.completion_ids:
        assert 1 <= len(ids) <= 10
        assert eos not in ids[:-1]  # nothing after EOS


def test_reference_is_frozen_and_save_load_round_trips(policy, tmp_path, prompts):
    ref = policy.frozen_copy()
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert not ref.model.training
    policy.save_pretrained(tmp_path / "p")
    loaded = Policy.from_pretrained(tmp_path / "p")
    roll = policy.generate(prompts, n=2, temperature=1.0, max_new_tokens=8, seed=0)
    a = policy.sequence_logps_batched(roll.prompt_ids, roll.completion_ids)
    b = loaded.sequence_logps_batched(roll.prompt_ids, roll.completion_ids)
    torch.testing.assert_close(a, b)
    # plain transformers reads it too
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.n_layer == 1
    assert AutoTokenizer.from_pretrained(tmp_path / "p").eos_token == "<eos>"


def test_completion_text_is_the_decoded_sample_unstripped_with_a_sub_word_tokenizer(tmp_path):
    """Pair algorithms and reward models re-encode completion TEXT: with a byte-level BPE model the
    text must keep its leading space (" good"), or encoding it gives ids the policy never sampled."""
    from tests.local_hub import save_tiny_gpt2

    texts = ["the movie was really good and i liked it a lot", "a dull film with a weak plot and bad acting"] * 20
    policy = Policy.from_pretrained(save_tiny_gpt2(tmp_path / "bpe", texts))
    roll = policy.generate(["the movie was", "a dull"], n=8, temperature=1.0, max_new_tokens=12, seed=0)
    assert roll.completions == policy.tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)
    assert any(c[:1].isspace() for c in roll.completions)
    # a canonical sample, " really good": its text encodes back to it; stripped, it would not
    ids = policy.encode_completions([" really good"], add_eos=False)[0]
    text = policy.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == " really good" and policy.encode_completions([text], add_eos=False)[0] == ids
    assert policy.encode_completions([text.strip()], add_eos=False)[0] != ids


def test_teacher_forced_logps_project_only_completion_positions_and_match_the_full_forward(policy):
    """`token_logps` asks the model for logits from the shortest prompt's last position on
    (`logits_to_keep`); the log-probs are those of the whole-sequence forward."""
    prompts = policy.encode_prompts(["overall the acting and the plot were", "the movie was", "i loved the"])
    completions = policy.encode_completions(["very good .", "bad", "film . ten out of ten ."], ended=[True, False, True])
    seen = []
    forward = policy.model.forward

    @functools.wraps(forward)  # the signature stays the model's
    def spy(*args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    policy.model.forward = spy
    with torch.no_grad():
        logps, mask = policy.token_logps(prompts, completions, temperature=0.8)
    del policy.model.forward
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    assert seen == [width - (min(len(p) for p in prompts) - 1)]
    for row, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            full = torch.log_softmax(policy.model(input_ids=torch.tensor([p + c])).logits[0].float() / 0.8, -1)
        want = full[len(p) - 1 : len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None]).squeeze(1)
        assert int(mask[row].sum()) == len(c)
        np.testing.assert_allclose(logps[row, : len(c)].numpy(), want.numpy(), atol=1e-5)


def test_autocast_runs_every_forward_in_bf16_and_only_when_set(policy, prompts):
    """`set_autocast(bf16)` (`deepspeed.autocast`) puts sampling, teacher forcing and the scalar
    models' scoring under torch.autocast: their Linear layers compute in bf16, the weights stay fp32,
    and the log-probs are float32 and close to the fp32 ones. Unset, everything is fp32 again."""
    from algorithms.policy import set_autocast
    from algorithms.reward_model import ScalarModel

    rm = ScalarModel(copy_as_scalar(policy), policy.tokenizer).freeze()
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
             for m in (policy.model.get_output_embeddings(), rm.head.model.score)]
    p_ids = policy.encode_prompts(prompts)
    c_ids = policy.encode_completions(["very good .", "film .", "was bad", "the cast ."], ended=[True, True, False, True])

    def everything():
        seen.clear()
        with torch.no_grad():
            roll = policy.generate(prompts, n=2, temperature=1.0, max_new_tokens=6, seed=1)
            logps, _ = policy.token_logps(p_ids, c_ids)
            scores = rm.sequence_scores(p_ids, c_ids)
        return roll, logps, scores, set(seen)

    try:
        _, fp32, fp32_scores, dtypes = everything()
        assert dtypes == {torch.float32}
        set_autocast(torch.bfloat16)
        roll, mixed, mixed_scores, dtypes = everything()
        assert dtypes == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in policy.model.parameters())
        assert mixed.dtype == torch.float32 and roll.token_logps.dtype == torch.float32
        assert not torch.equal(mixed, fp32)  # it did compute differently
        torch.testing.assert_close(mixed, fp32, atol=0.05, rtol=0.02)  # bf16 rounding of a tiny model
        torch.testing.assert_close(mixed_scores, fp32_scores, atol=0.05, rtol=0.02)
        # sampling's log-probs are still those of the distribution it drew from (bf16 noise apart)
        with torch.no_grad():
            forced = policy.sequence_logps_batched(roll.prompt_ids, roll.completion_ids)
        np.testing.assert_allclose(forced.numpy(), roll.token_logps.double().sum(-1).numpy(), atol=0.05)
        set_autocast(None)
        assert everything()[3] == {torch.float32}
    finally:
        set_autocast(None)
        for h in hooks:
            h.remove()


def copy_as_scalar(policy):
    """A GPT-2 sequence-classification model with the policy's config (random head), for scoring."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = policy.model.config
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config)
