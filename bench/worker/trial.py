"""One trial in one worker (a Ray Train rank, or the Tune trial process for algorithms that train
no policy): open the env and models, hand the algorithm its `TrainContext`, evaluate and
checkpoint when it asks, write the trial's files. No Ray here: bench.run.ray_runner passes a
`TrialPayload` and a `report(metrics, checkpoint=None)` callable.

    Trial(payload, report).run():
        open()        env data, eval set, reference, reward model, policy (+ critic) in ONE DeepSpeed
                      engine, and the checkpoint to resume from
        context()     the TrainContext the algorithm sees (optimize, evaluate, log, cache, ...)
        algo.train(ctx), which calls
            optimize(loss)            one optimizer step (faults are injected here in tests)
            evaluate(sampler, step)   the one evaluator on this rank's prompts, rows gathered to rank 0;
                                      then checkpoint(step), a restart point
            log(step, metrics)        training metrics averaged over ranks, guarded, rank 0 writes
        finish(summary)   the trained policy and summary.json (written last: it marks the trial done)

The reward model and the gold reward the algorithm gets are counted (`QueryCount`): how many samples
it had scored while it trained, the cost column of the report's online-vs-offline view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from algorithms import ALGORITHMS
from algorithms.interface import NonFiniteError, TrainContext, TrainSettings, require_finite
from algorithms.reward_model import ScalarModel
from algorithms.samplers import RerankingSampler
from bench.config import TrialSpec, env_params
from bench.evaluate import EvalSet, best_of_n_stats, concat_stats, sample_stats, summarize
from bench.results import FAILURE_FILE, LOG_FILE, POLICY_DIR, ROWS_FILE, SUMMARY_FILE, write_text_atomic
from bench.worker.checkpoints import checkpoint_dir, load_checkpoint, save_checkpoint
from bench.worker.engine import Report, all_gather, barrier, mean_over_ranks, rank0_json_cache, save_hf, worker_setup, wrap_with_deepspeed
from bench.worker.faults import inject_fault, step_fault
from envs import ENVS
from envs.base import GoldRewardError, gold_fn, load_env_data

REFERENCE_EVAL_FORMAT = 5  # part of the cache key of reference evaluations: bump when the evaluator or sampler changes
# logged training metrics that are a loss, a reward or a KL: NaN/inf in one stops the trial
GUARDED_METRICS = ("losses/", "rewards/", "objective/", "policy/")


class QueryCount:
    """Samples this rank had scored by the trial's reward model (`reward_model`) and by the env's gold
    reward (`gold`) through its TrainContext while the algorithm trained.

    Not counted: calls inside `ctx.cache`'s compute (a value computed by the first trial that asks,
    e.g. the reference's score statistics, and read by the rest: counting it would make a trial's
    count depend on the order trials ran in) and inside `ctx.evaluate` (the evaluator's measurement,
    equal for every algorithm; best-of-n's reranking there is its inference cost, n per prompt).
    Saved with every checkpoint, so a resumed trial counts on from where it was."""

    def __init__(self, counts: dict | None = None):
        self.counts = {"reward_model": 0, "gold": 0, **(counts or {})}
        self._paused = 0

    def add(self, scorer: str, n: int) -> None:
        if not self._paused:
            self.counts[scorer] += n

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def counted_gold(self, gold: Callable[[list[str], list[str]], np.ndarray]) -> Callable[[list[str], list[str]], np.ndarray]:
        def counted(prompts: list[str], completions: list[str]) -> np.ndarray:
            self.add("gold", len(completions))
            return gold(prompts, completions)

        return counted


class CountedScorer:
    """The trial's reward model as the algorithm sees it: `score` counts its samples in a QueryCount;
    everything else is the ScalarModel's own."""

    def __init__(self, model: ScalarModel, count: QueryCount):
        self._model, self._count = model, count

    def score(self, prompts: list[str], completions: list[str], **kwargs) -> np.ndarray:
        self._count.add("reward_model", len(completions))
        return self._model.score(prompts, completions, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass(frozen=True)
class TrialPayload:
    """What a trial's worker is sent (as a plain dict: Ray Train's train_loop_config), all paths absolute."""

    suite: dict  # the validated SuiteConfig, as dataclasses.asdict gives it
    trial: dict  # the TrialSpec, likewise
    env_dir: str  # the prepared env of the trial's seed
    trial_dir: str  # OUT/trials/<trial_id>
    rm_dir: str | None = None  # the shared reward model of the seed, when the suite trains one
    threads: int = 1  # torch threads of this process
    node_id: str = ""  # the Ray node the worker runs on (summary.json `nodes`)
    resume_from: str | None = None  # a reported checkpoint directory to continue from


def run_trial(payload: TrialPayload | dict, report: Report) -> None:
    """One trial. A NaN/inf loss, reward or KL, or a gold reward that broke its contract, stops it:
    retrying would only repeat it, so on one rank the reason goes to `failure.json` (trials.parquet:
    status failed) and the trial ends without raising. With several ranks the error is raised:
    another rank may be waiting in a collective, and Ray Train stops the whole group (FailureConfig
    may retry it from its checkpoint first; trials.parquet gets the reason)."""
    payload = payload if isinstance(payload, TrialPayload) else TrialPayload(**payload)
    try:
        Trial(payload, report).run()
    except (NonFiniteError, GoldRewardError) as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise
        reason = f"{type(e).__name__}: {e}"
        write_text_atomic(Path(payload.trial_dir) / FAILURE_FILE, json.dumps({"reason": reason}))
        report({"trial_id": payload.trial["trial_id"], "stopped": reason})


def check_logged(step: int, metrics: dict) -> None:
    """A logged loss, reward or KL (GUARDED_METRICS) that is NaN/inf stops the trial; lr, grad norm
    and the like may be NaN (e.g. no norm tracked)."""
    for key, value in metrics.items():
        if key.startswith(GUARDED_METRICS):
            require_finite(f"{key} at step {step}", value)


def check_eval_rows(rows: list[dict], step: int) -> None:
    """An evaluation with a NaN/inf metric stops the trial before its rows are written (no NaN rows in
    tables). KL is NaN by definition where it is not estimated (greedy decoding; analytic for best-of-n)."""
    for r in rows:
        where = f"the evaluation at step {step} (T={r['temperature']:g})"
        keys = ["gold_reward", "win_rate", "gen_len"] + (["kl", "kl_k3"] if r.get("kl_kind") == "estimated" else [])
        for key in keys:
            require_finite(f"{key} of {where}", r[key])


class Trial:
    """A trial's state in one worker, and the steps the algorithm drives through its TrainContext."""

    def __init__(self, payload: TrialPayload, report: Report):
        self.payload, self.report = payload, report
        self.suite, self.rank, self.world, self.device = worker_setup(payload.suite, payload.threads)
        self.spec = TrialSpec(**payload.trial)
        self.algo = ALGORITHMS.get(self.spec.algorithm)
        self.env = ENVS.get(self.suite.env.name)
        self.env_dir, self.trial_dir = Path(payload.env_dir), Path(payload.trial_dir)
        self.rows_path, self.log_path = self.trial_dir / ROWS_FILE, self.trial_dir / LOG_FILE
        self.t_start = time.time()
        self.eval_time = 0.0
        self.stepped = False  # until the first optimizer step the policy is the reference, weight for weight
        self.n_steps = 0  # optimizer steps (= trial steps for the pair methods)
        self.resume: dict | None = None
        self.engine_step: Callable[..., dict] | None = None  # wrap_with_deepspeed's optimize
        self.ctx: TrainContext | None = None
        self.queries = QueryCount()

    def run(self) -> None:
        self.open()
        self.ctx = self.context()
        if self.resume:
            self.report({"trial_id": self.spec.trial_id, "resumed_from": self.resume["step"]})
        self.finish(self.algo.train(self.ctx) or {})

    # ------------------------------------------------------------------------------- open
    def open(self) -> None:
        """Load what the trial works with; resume from a checkpoint when the payload names one."""
        spec, ev, device = self.spec, self.suite.eval, self.device
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.trial_dir / FAILURE_FILE).unlink(missing_ok=True)  # from an earlier attempt (a --resume reruns it)
        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed)

        self.data = load_env_data(self.env_dir)
        self.n_eval = min(ev.num_prompts, len(self.data.eval_prompts))
        if self.data.references["prompt"].tolist()[: self.n_eval] != self.data.eval_prompts[: self.n_eval]:
            raise ValueError(f"env {self.env.name}: references.parquet is not aligned with the eval prompts")
        self.gold = gold_fn(self.env, env_params(self.suite), self.env_dir)
        self.evalset = EvalSet(prompts=self.data.eval_prompts[: self.n_eval],
                               reference_gold=self.data.references["gold"].to_numpy()[: self.n_eval], gold=self.gold)
        self.my_prompts = np.arange(self.rank, self.n_eval, self.world)  # this rank's slice; rank 0 gathers
        self.reference = self.env.load_policy(self.env_dir, "sft").freeze()
        self.reference.model.to(device)
        self.train = TrainSettings(**spec.train)
        self.params = self.algo.params_cls(**spec.params)

        self.reward_model, self.rm_metrics = None, {}
        rm_dir = Path(self.payload.rm_dir) if self.payload.rm_dir else None
        if "reward_model" in self.algo.needs:
            self.reward_model = ScalarModel.from_pretrained(rm_dir / "model").freeze().to(device)
            self.rm_metrics = json.loads((rm_dir / "metrics.json").read_text())
        self.policy, self.critic = self.reference, None
        if self.algo.trains_policy:
            self.policy = self.env.load_policy(self.env_dir, "sft")
            self.policy.model.to(device)
            trainables = [self.policy]
            if "critic" in self.algo.needs:  # stepped with the policy, in the same engine
                # from the shared reward model, backbone and head, where the trial has one (TRL, OpenRLHF);
                # otherwise (ppo-gt, or params `critic_init: sft`) the SFT backbone with a zero value head
                if self.reward_model is not None and getattr(self.params, "critic_init", "reward_model") == "reward_model":
                    self.critic = ScalarModel.from_pretrained(rm_dir / "model").to(device)
                else:
                    self.critic = ScalarModel.from_pretrained(self.env_dir / "sft", zero_head=True).to(device)
                trainables.append(self.critic)
            self.engine_step = wrap_with_deepspeed(trainables, self.train, self.suite.deepspeed, self.world)
            self.resume = load_checkpoint(self.payload.resume_from, self.engine_step, self.trial_dir, self.rank,
                                          self.world)
        if self.resume:  # wall and eval time carry on from the run that saved the checkpoint
            self.eval_time = self.resume["eval_time_s"]
            self.queries = QueryCount(self.resume.get("queries"))
            self.t_start -= self.resume["wall_time_s"]
            self.stepped = self.resume["step"] > 0
            self.n_steps = self.resume["step"]
        elif self.rank == 0:  # a trial restarted from scratch starts its rows afresh
            self.rows_path.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)
        self.meta = {
            "suite": self.suite.name, "env": self.suite.env.name, "algorithm": spec.algorithm, "trial_id": spec.trial_id,
            "seed": spec.seed, "knob": spec.knob, "knob_value": spec.knob_value,
            "params": json.dumps(spec.params, sort_keys=True),
        }

    def context(self) -> TrainContext:
        """The algorithm's view of the trial (algorithms/interface.py)."""
        scope = {"reward_model": Path(self.payload.rm_dir).name if self.reward_model is not None else None}
        return TrainContext(
            policy=self.policy, reference=self.reference, params=self.params, train=self.train, data=self.data,
            optimize=self.optimize if self.engine_step else _no_optimizer, evaluate=self.evaluate, log=self.log,
            gold=self.queries.counted_gold(self.gold) if "gold" in self.algo.needs else None,
            reward_model=CountedScorer(self.reward_model, self.queries) if self.reward_model is not None else None,
            critic=self.critic,
            seed=self.spec.seed, rank=self.rank, world_size=self.world, max_new_tokens=self.suite.eval.max_new_tokens,
            mean_over_ranks=lambda m: mean_over_ranks(m, self.world),
            start_step=self.resume["step"] if self.resume else 0,
            state=dict(self.resume["algorithm_state"]) if self.resume else {},
            cache=self.algorithm_cache(scope),
        )

    # ------------------------------------------------------------------ what the algorithm calls
    def optimize(self, loss: torch.Tensor, accumulate: bool = False) -> dict:
        """`ctx.optimize`: one step of the trial's DeepSpeed engine (accumulate: one micro-batch's backward)."""
        self.stepped = True
        if self.rank == 0 and step_fault(self.spec.trial_id, self.n_steps + 1) == "nan":
            loss = loss * float("nan")
        if not accumulate:
            self.n_steps += 1
        return self.engine_step(loss, accumulate=accumulate)

    def log(self, step: int, metrics: dict) -> None:
        """`ctx.log`: training metrics, averaged over ranks (a W-worker log reads like a 1-worker log);
        at every tenth of the trial's steps (every second at least) also a report of the step and the
        metrics, for the progress lines and the tracking loggers (every rank logs the same steps, so
        every rank reports alike: a report is a barrier)."""
        metrics = mean_over_ranks(metrics, self.world)
        check_logged(step, metrics)
        if self.rank == 0:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        total = self.train.steps
        if 0 < step < total and step % max(2, total // 10) == 0:  # also what TensorBoard/MLflow log (tracking:)
            self.report({"trial_id": self.spec.trial_id, "progress_step": step, "total_steps": total, **metrics})

    def evaluate(self, sampler, step: int, *, final: bool = False) -> dict:
        """`ctx.evaluate`: the one evaluator at T = 1 (every eval temperature when `final`); rank 0
        appends the rows to evals.jsonl; a restart point follows (`checkpoint`). Returns the T = 1 row."""
        resume = self.resume
        if resume and not final and step == resume["step"]:
            return resume["last_eval"]  # evaluated (and its rows kept) before the checkpoint we resumed from
        with self.queries.paused():
            return self._evaluate(sampler, step, final)

    def _evaluate(self, sampler, step: int, final: bool) -> dict:
        t0 = time.time()
        rows = []
        with (sampler.gathered() if sampler is self.policy else contextlib.nullcontext()):
            for temperature in (self.suite.eval.temperatures if final else [1.0]):
                seed = 1_000_003 * self.spec.seed + int(round(temperature * 1000))
                if isinstance(sampler, RerankingSampler):  # best-of-n: every n from one set of samples
                    rows += self._reranked_rows(sampler, temperature, seed)
                    continue
                untouched = sampler is self.reference or (sampler is self.policy and not self.stepped)
                rows.append(self._reference_row(temperature, seed) if untouched else self._measure(sampler, temperature, seed))
        check_eval_rows(rows, step)
        self.eval_time += time.time() - t0
        wall = time.time() - self.t_start
        at_t1 = ([r for r in rows if r["temperature"] == 1.0] or rows)[-1]  # best-of-n: its largest n
        if self.rank == 0:
            with self.rows_path.open("a") as f:
                for r in rows:
                    f.write(json.dumps({**self.meta, "step": step, **r, "final": final,
                                        "train_time_s": wall - self.eval_time, "wall_time_s": wall}) + "\n")
        metrics = {
            "trial_id": self.spec.trial_id, "step": step, "final": int(final),
            "gold_reward": at_t1["gold_reward"], "kl": at_t1["kl"], "win_rate": at_t1["win_rate"],
        }
        if self.engine_step is not None and not final and step > 0:
            self.checkpoint(step, metrics, at_t1)
        else:
            self.report(metrics)
        return at_t1

    def checkpoint(self, step: int, metrics: dict, last_eval: dict) -> None:
        """A restart point: DeepSpeed's state and the trial's files, reported with `metrics`."""
        state = {"step": step, "algorithm_state": self.ctx.state, "last_eval": last_eval, "eval_time_s": self.eval_time,
                 "wall_time_s": time.time() - self.t_start, "queries": dict(self.queries.counts)}
        with checkpoint_dir(self.trial_dir, self.rank, step) as ckpt:
            save_checkpoint(ckpt, self.engine_step, state, self.rows_path, self.log_path, self.rank)
            self.report(metrics, checkpoint=ckpt)
        inject_fault(self.trial_dir, self.spec.trial_id, step, self.rank)

    # -------------------------------------------------------------------------- evaluation
    def _measure(self, sampler, temperature: float, seed: int) -> dict:
        ev = self.suite.eval
        stats = sample_stats(
            sampler, self.reference, self.evalset, temperature=temperature, samples_per_prompt=ev.samples_per_prompt,
            max_new_tokens=ev.max_new_tokens, seed=seed, batch_size=ev.batch_size,
            score_batch_size=ev.score_batch_size, prompt_subset=self.my_prompts,
        )
        return summarize(concat_stats(all_gather(stats, self.world)), temperature=temperature)

    def _reranked_rows(self, sampler: RerankingSampler, temperature: float, seed: int) -> list[dict]:
        per_n = best_of_n_stats(sampler, self.evalset, temperature=temperature, max_new_tokens=self.suite.eval.max_new_tokens,
                                seed=seed, prompt_subset=self.my_prompts)
        return [{"knob_value": float(n), **summarize(concat_stats(all_gather(stats, self.world)), temperature=temperature)}
                for n, stats in per_n.items()]

    def _reference_row(self, temperature: float, seed: int) -> dict:
        """The reference's evaluation, computed once per env and eval setting and then read back.

        Every trial's step-0 evaluation is of the SFT policy itself (nothing stepped yet), with the
        same seeded samples as the `sft` baseline: identical numbers, so they are computed once.
        """
        key = {"eval": dataclasses.asdict(self.suite.eval), "n": self.n_eval, "seed": seed, "t": temperature,
               "world": self.world, "format": REFERENCE_EVAL_FORMAT}
        return rank0_json_cache(self.env_dir / "reference_evals", key, lambda: self._measure(self.reference, temperature, seed),
                                self.rank, self.world)

    def algorithm_cache(self, scope: dict) -> Callable[[str, Callable[[], Any]], Any]:
        """`TrainContext.cache`: JSON files under the env dir's `algorithm_cache/`, one per (scope, key),
        e.g. PPO's reward statistics of reference samples, computed by the first trial that asks and
        read by the rest. `scope` names what the env dir does not (the trial's reward model). Scoring
        inside it is not counted (`QueryCount`)."""
        cache = algorithm_cache(self.env_dir, scope, self.rank, self.world)

        def uncounted(key: str, compute: Callable[[], Any]) -> Any:
            with self.queries.paused():
                return cache(key, compute)

        return uncounted

    # ----------------------------------------------------------------------------- finish
    def finish(self, summary: dict) -> None:
        """The trained policy, then summary.json, written last and atomically: the trial is done."""
        if self.algo.trains_policy:
            save_hf(self.policy, self.trial_dir / POLICY_DIR, self.rank)
        nodes = sorted(set(all_gather(self.payload.node_id, self.world)) - {""})
        queries = all_gather(self.queries.counts, self.world)  # every rank's, summed
        cuda = self.device.type == "cuda"
        peak_gpu = max(all_gather(torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0, self.world))
        if self.rank == 0:
            wall = time.time() - self.t_start
            init_s = round(self.engine_step.init_s, 2) if self.engine_step else 0.0
            write_text_atomic(self.trial_dir / SUMMARY_FILE, json.dumps({
                **self.meta, "algorithm_summary": summary, **self.rm_metrics, "train_time_s": wall - self.eval_time,
                "wall_time_s": wall, "eval_time_s": self.eval_time, "deepspeed_init_s": init_s,
                "nodes": ",".join(nodes), "resumed_from": self.resume["step"] if self.resume else None,
                "rm_queries": sum(q["reward_model"] for q in queries), "gold_queries": sum(q["gold"] for q in queries),
                **({"peak_gpu_memory_gib": round(peak_gpu, 3)} if cuda else {}),
            }))
        barrier(self.world)


def algorithm_cache(env_dir: Path, scope: dict, rank: int, world: int) -> Callable[[str, Callable[[], Any]], Any]:
    """`TrainContext.cache` over `env_dir/algorithm_cache/` (see `Trial.algorithm_cache`): rank 0 reads;
    on a miss every rank computes (compute may use collectives) and takes rank 0's value, which rank 0
    writes atomically (two trials racing write the same value). An unreadable file is computed again."""
    def cache(key: str, compute: Callable[[], Any]) -> Any:
        return rank0_json_cache(env_dir / "algorithm_cache", {"key": key, **scope}, compute, rank, world, wrap="value")

    return cache


def _no_optimizer(loss: torch.Tensor, accumulate: bool = False) -> dict:
    raise RuntimeError("this algorithm declared trains_policy=False but called ctx.optimize")
