"""`prefbench perf`: the hot paths of a trial, timed against a baseline in the same process.

On the quick suite's shapes (tiny-sentiment GPT-2, untrained weights, 256 prompts × 4 samples,
32 new tokens, 32 pairs per DPO step) it reports medians over `--repeats` runs of:

- generation: `Policy.generate` vs bare `model.generate` on the same pre-tokenised batch (the
  cost of our wrapper: tokenisation, EOS trimming, decoding);
- teacher-forced scoring: `Policy.sequence_logps_batched` of the sampled completions;
- a DPO step: plain PyTorch AdamW vs the same step through a DeepSpeed ZeRO-0 engine;
- one evaluation at T = 1 (sampling, two log-prob passes, VADER, statistics).

No Ray: this measures the code inside one worker. The machine is shared and noisy: compare the
ratios, not absolute times across machines.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_perf(repeats: int = 5, threads: int | None = None) -> dict:
    from algorithms.dpo import DPO, DPOParams
    from algorithms.interface import EnvData, TrainContext, TrainSettings, plain_optimizer
    from bench.config import DeepSpeedSettings
    from bench.evaluate import EvalSet, evaluate
    from bench.worker import _quiet, single_process_dist_env, wrap_with_deepspeed
    from envs import ENVS

    _quiet()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    env = ENVS.get("tiny-sentiment")
    params = env.params_cls(num_reviews=2000, num_train_prompts=256, num_eval_prompts=256)
    workdir = Path(tempfile.mkdtemp(prefix="prefbench-perf-"))
    env.build(params, 0, workdir)
    prompts = json.loads((workdir / "prompts.json").read_text())["eval"]  # tiny-sentiment's held-out openings
    policy = env.load_policy(workdir, "init")
    reference = env.load_policy(workdir, "init").freeze()
    n, new = 4, 32
    results: dict[str, float] = {}

    # generation: wrapper vs bare HF generate on identical left-padded input
    roll = policy.generate(prompts, n=n, temperature=1.0, max_new_tokens=new, seed=0)
    tokens = int(roll.lengths.sum())
    flat = [ids for ids in policy.encode_prompts(prompts) for _ in range(n)]
    width = max(len(x) for x in flat)
    pad = policy.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in flat])
    mask = (input_ids != pad).long()
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           eos_token_id=policy.tokenizer.eos_token_id, pad_token_id=pad)

    def bare():
        with torch.no_grad():
            policy.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)

    results["generate_bare_s"] = _median_time(bare, repeats)
    results["generate_policy_s"] = _median_time(
        lambda: policy.generate(prompts, n=n, temperature=1.0, max_new_tokens=new, seed=0), repeats)
    results["generate_tokens"] = tokens
    results["generate_policy_tokens_per_s"] = tokens / results["generate_policy_s"]
    results["score_s"] = _median_time(
        lambda: reference.sequence_logps_batched(roll.prompt_ids, roll.completion_ids), repeats)

    # one DPO step, plain vs DeepSpeed (same data, same settings)
    pairs = pd.DataFrame({"prompt": roll.prompts[0::2][:512], "chosen": roll.completions[0::2][:512],
                          "rejected": roll.completions[1::2][:512]})
    steps = 4 * repeats + 1  # the median step of these (the first is dropped)
    train = TrainSettings(steps=steps, batch_size=32, lr=1e-4, warmup_steps=1, eval_every=10**6)

    def dpo_step_time(p, optimize) -> float:
        step_times: list[float] = []
        last = [time.perf_counter()]

        def log(step, metrics):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        ctx = TrainContext(policy=p, reference=reference, params=DPOParams(beta=0.5), train=train,
                           data=EnvData([], [], pairs, pd.DataFrame()), optimize=optimize,
                           evaluate=lambda *a, **k: last.__setitem__(0, time.perf_counter()) or {}, log=log)
        DPO().train(ctx)
        return statistics.median(step_times[1:])  # the first step pays for warm-up

    plain = env.load_policy(workdir, "init")
    results["dpo_step_plain_s"] = dpo_step_time(plain, plain_optimizer(plain, train=train))
    single_process_dist_env()
    ds = env.load_policy(workdir, "init")
    results["dpo_step_deepspeed_s"] = dpo_step_time(ds, wrap_with_deepspeed(ds, train, DeepSpeedSettings(), 1))

    # one evaluation at T = 1 (the reference against itself: same work as any trial's evaluation)
    evalset = EvalSet(prompts=prompts, reference_gold=np.full(len(prompts), 0.5), gold=env.gold)
    results["evaluate_s"] = _median_time(
        lambda: evaluate(policy, reference, evalset, temperature=1.0, samples_per_prompt=n, max_new_tokens=new),
        repeats)
    results["ratio_generate_policy_vs_bare"] = results["generate_policy_s"] / results["generate_bare_s"]
    results["ratio_dpo_deepspeed_vs_plain"] = results["dpo_step_deepspeed_s"] / results["dpo_step_plain_s"]
    results["threads"] = torch.get_num_threads()
    results["repeats"] = repeats
    return results


def format_perf(r: dict) -> str:
    return "\n".join([
        f"prefbench perf (median of {r['repeats']}, {r['threads']} threads; tiny-sentiment shapes, 1024 samples × ≤32 tokens)",
        f"  generate  bare HF      {r['generate_bare_s']:.3f} s",
        f"  generate  Policy       {r['generate_policy_s']:.3f} s  ({r['generate_policy_tokens_per_s']:.0f} tokens/s; "
        f"×{r['ratio_generate_policy_vs_bare']:.2f} of bare)",
        f"  score     1024 seqs    {r['score_s']:.3f} s",
        f"  DPO step  plain torch  {1000 * r['dpo_step_plain_s']:.1f} ms",
        f"  DPO step  DeepSpeed-0  {1000 * r['dpo_step_deepspeed_s']:.1f} ms  (×{r['ratio_dpo_deepspeed_vs_plain']:.2f} of plain)",
        f"  evaluate  T=1          {r['evaluate_s']:.3f} s",
    ])
