"""`python -m bench.tools.determinism`: does the same training run give the same numbers twice on this device?

Each run is a fresh process (one DeepSpeed engine per process) doing what a trial does, without Ray:
the tiny env's GPT-2 (seeded init) wrapped in a 1-rank DeepSpeed engine (`bench.worker`), DPO
steps on pairs sampled from it, then sampling and teacher-forced log-probs of the samples. It prints
a fingerprint — every loss and gradient norm as exact floats, sha256 of the final weights, of the
sampled token ids and of the log-probs — and the runs of each mode are compared bit for bit.

Modes:
- `default`: prefbench's settings (seeded torch and numpy, fixed torch threads on CPU).
- `deterministic`: also `torch.use_deterministic_algorithms(True)`, `CUBLAS_WORKSPACE_CONFIG=:4096:8`
  and cuDNN's benchmark off: PyTorch's switches for reproducible CUDA kernels.

    python -m bench.tools.determinism --device cuda --zero-stage 2 --bf16      # on a GPU
    python -m bench.tools.determinism --device cpu                             # CPU: 2 runs per mode

Exit 0 when the runs of every mode agree, 1 when some differ (the table says where), 2 for bad
arguments. bench/PERF.md and the README's "Determinism" record what was seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.tools.common import run_child, versions

TAG = "DETERMINISM_RESULT "
MODES = ("default", "deterministic")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tools.determinism", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (DeepSpeed bf16)")
    p.add_argument("--runs", type=int, default=2, help="runs per mode (>= 2)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=10, help="DPO optimizer steps per run")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--pairs", type=int, default=32, help="DPO pairs per step")
    p.add_argument("--json", dest="json_out", help="also write the fingerprints and the verdict here")
    p.add_argument("--_child", dest="child", choices=MODES, help=argparse.SUPPRESS)
    return p


def _sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def child(args: argparse.Namespace) -> dict:
    """One run in this process; returns its fingerprint."""
    import numpy as np
    import torch

    if args.child == "deterministic":
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    from algorithms.dpo import dpo_loss
    from algorithms.interface import TrainSettings
    from algorithms.policy import Policy
    from bench.config import DeepSpeedSettings
    from bench.worker.engine import quiet_libraries, single_process_dist_env, wrap_with_deepspeed
    from envs import ENVS

    quiet_libraries()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    single_process_dist_env()
    env = ENVS.get("tiny-sentiment")
    params = env.params_cls(num_reviews=200, num_train_prompts=args.pairs, num_eval_prompts=64,
                            n_layer=args.n_layer, n_embd=args.n_embd, n_head=4)
    with tempfile.TemporaryDirectory(prefix="prefbench-determinism-") as tmp:
        env.build(params, 0, Path(tmp))
        prompts = json.loads((Path(tmp) / "prompts.json").read_text())
        torch.manual_seed(0)
        np.random.seed(0)
        policy = Policy.from_pretrained(Path(tmp) / "init")
    policy.model.to(device)
    reference = policy.frozen_copy()
    roll = policy.generate(prompts["train"], n=2, temperature=1.0, max_new_tokens=24, seed=1)
    prompt_ids, chosen, rejected = roll.prompt_ids[0::2], roll.completion_ids[0::2], roll.completion_ids[1::2]
    ref_c = reference.sequence_logps_batched(prompt_ids, chosen).to(device)
    ref_r = reference.sequence_logps_batched(prompt_ids, rejected).to(device)
    b = len(prompt_ids)
    train = TrainSettings(steps=args.steps, batch_size=b, lr=1e-4, warmup_steps=0, eval_every=10**6)
    optimize = wrap_with_deepspeed(policy, train, DeepSpeedSettings(zero_stage=args.zero_stage, bf16=args.bf16), 1)
    policy.model.train()
    losses, norms = [], []
    for _ in range(args.steps):
        logps = policy.sequence_logps(prompt_ids * 2, chosen + rejected)  # (2B,)
        loss = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=0.5)[0].mean()
        opt = optimize(loss)
        losses.append(float(loss.detach()))
        norms.append(float(opt["grad_norm"]))
    policy.model.eval()
    with policy.gathered(), torch.no_grad():
        after = policy.generate(prompts["eval"], n=4, temperature=1.0, max_new_tokens=24, seed=2)
        logps = policy.sequence_logps_batched(after.prompt_ids, after.completion_ids)
        weights = [p for _, p in sorted(policy.model.named_parameters())]
        return {
            "mode": args.child, "losses": [x.hex() for x in losses], "grad_norms": [x.hex() for x in norms],
            "weights_sha": _sha(weights), "samples_sha": hashlib.sha256(
                json.dumps([list(map(int, c)) for c in after.completion_ids]).encode()).hexdigest()[:16],
            "logps_sha": _sha([logps]), "final_loss": losses[-1],
        }


def run(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {}
    for mode in args.modes:
        for i in range(args.runs):
            cmd = [sys.executable, "-m", "bench.tools.determinism", "--_child", mode, "--device", args.device,
                   "--zero-stage", str(args.zero_stage), "--steps", str(args.steps), "--n-layer", str(args.n_layer),
                   "--n-embd", str(args.n_embd), "--pairs", str(args.pairs), *(["--bf16"] if args.bf16 else [])]
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
                   **({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if mode == "deterministic" else {})}
            proc = run_child(cmd, env=env)
            lines = [x for x in proc["stdout_lines"] if x.startswith(TAG)]
            if proc["returncode"] or not lines:
                tail = "\n".join(proc["stdout_lines"])[-2000:]
                raise RuntimeError(f"{mode} run {i + 1} failed (exit {proc['returncode']}): {tail}")
            runs.setdefault(mode, []).append(json.loads(lines[-1][len(TAG):]))
            print(f"[determinism] {mode} run {i + 1}: final loss {runs[mode][-1]['final_loss']:.6f}, "
                  f"weights {runs[mode][-1]['weights_sha']}", file=sys.stderr, flush=True)
    verdict = {}
    for mode, rs in runs.items():
        fields = ("losses", "grad_norms", "weights_sha", "samples_sha", "logps_sha")
        verdict[mode] = {f: all(r[f] == rs[0][f] for r in rs[1:]) for f in fields}
        first_loss_diff = next((i + 1 for i, (a, b) in enumerate(zip(rs[0]["losses"], rs[1]["losses"])) if a != b), None)
        verdict[mode]["first_differing_step"] = first_loss_diff
        verdict[mode]["identical"] = all(verdict[mode][f] for f in fields)
    return {"device": args.device, "zero_stage": args.zero_stage, "bf16": args.bf16, "runs": runs, "verdict": verdict,
            "versions": versions(args.device)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        print(TAG + json.dumps(child(args)), flush=True)
        return 0
    if args.runs < 2:
        print("python -m bench.tools.determinism: error: --runs must be >= 2", file=sys.stderr)
        return 2
    report = run(args)
    for mode, v in report["verdict"].items():
        parts = ", ".join(f"{k} {'same' if v[k] else 'DIFFER'}" for k in
                          ("losses", "grad_norms", "weights_sha", "samples_sha", "logps_sha"))
        where = f" (first differing loss at step {v['first_differing_step']})" if v["first_differing_step"] else ""
        print(f"{mode:13s} {'identical' if v['identical'] else 'NOT identical'}: {parts}{where}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0 if all(v["identical"] for v in report["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
