"""`prefbench perf`: every part measured, rates consistent, TRL on the same work (subprocesses: each
part initialises DeepSpeed or TRL in its own process). After test_e2e.py by name: the e2e env is
then already in the shared cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli import cli_in_process


@pytest.mark.slow
def test_perf_measures_every_part_against_peak_and_trl(tmp_path, e2e_cache):
    """`prefbench perf --vs trl` on the e2e env (shared cache): every part runs, rates are positive and
    consistent (tokens/s = tokens per step / step time), fractions of peak are fractions, ratios vs TRL exist."""
    out = tmp_path / "perf.json"
    sets = [a for p in ("num_reviews=1500", "sft_epochs=1", "num_train_prompts=100", "num_eval_prompts=32",
                        "n_layer=2", "n_embd=64") for a in ("--set", f"env.params.{p}")]
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "perf", *sets, "--steps", "3", "--ppo-steps", "1",
                           "--repeats", "1", "--vs", "trl", "--json", str(out)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PREFBENCH_CACHE": str(e2e_cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRL DPOTrainer" in proc.stdout and "of fp32 peak" in proc.stdout
    r = json.loads(out.read_text())
    assert r["peak"]["fp32_flops"] > 1e8 and r["peak"]["bf16_flops"] > 1e8
    for train in (r["dpo"]["train"], r["rm"]["train"], r["trl"]["dpo"], r["trl"]["rm"]):
        assert train["tokens_per_s"] == pytest.approx(train["tokens_per_step"] / train["step_s"])
        assert 0 < train["flops"] < 2 * r["peak"]["fp32_flops"]
    # both sides count the same tokens (same pairs, batch size and ids), except the EOS TRL appends to a
    # completion cut at max_new_tokens: at most one token per completion, two per pair
    ours, trl = r["dpo"]["train"]["tokens_per_step"], r["trl"]["dpo"]["tokens_per_step"]
    batch = r["ppo"]["batch_size"]  # the pairs (and prompts) per step of every part
    assert ours <= trl <= ours + 2 * batch
    assert r["dpo_vs_trl"] > 0 and r["rm_vs_trl"] > 0
    assert set(r["dpo"]["generate"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert r["ppo"]["rollout"]["tokens_per_s"] > 0 and r["ppo"]["update"]["s"] > 0
    assert r["dpo"]["evaluate"]["s"] > 0 and r["versions"]["trl"] != "not installed"
    assert all(0.1 < r[part]["peak_rss_gib"] < 64 for part in ("dpo", "rm", "ppo", "trl"))


@pytest.mark.slow
def test_perf_suite_measures_wall_start_up_and_memory_of_all_processes(tmp_path, e2e_cache):
    """`prefbench perf --suite`: a whole `prefbench run` in a child process, measured from outside —
    wall time, the run's own start-up split (timing.json), peak memory of the whole process tree."""
    out = tmp_path / "suite.json"
    suite = os.path.join(os.path.dirname(__file__), "suites", "perf-suite.yaml")
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "perf", "--suite", suite, "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PREFBENCH_CACHE": str(e2e_cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "start-up" in proc.stdout and "peak memory" in proc.stdout
    r = json.loads(out.read_text())
    t = r["timing"]
    assert r["wall_s"] >= t["wall_s"] > 0 and 0 < t["startup_share"] < 1
    assert [x["trial_id"] for x in t["trials"]] == ["dpo-beta=0.5-seed0", "sft-seed0"]  # every suite has the SFT baseline
    # the driver, Ray's own processes (GCS, raylet, ...) and the trial's workers were all counted
    assert r["processes_at_peak"] >= 4 and 0.3 < r["peak_pss_gib"] <= r["peak_rss_sum_gib"] < 64


def test_perf_suite_user_errors_are_one_line_exit_2(tmp_path, capsys):
    """A mistake the run itself finds (here an env package that is not installed) comes back as the
    run's one line; --vs with --suite is refused before anything runs."""
    suite = os.path.join(os.path.dirname(__file__), "..", "bench", "suites", "smol-quick.yaml")
    missing = subprocess.run([sys.executable, "-m", "bench.cli", "perf", "--suite", suite, "--set",
                              "env.params.package=no_such_pkg"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "prefbench: error: env smol-sentiment: the package 'no_such_pkg' (env.params.package) is not installed")
    both = cli_in_process(capsys, "perf", "--suite", "--vs", "trl")
    assert both.returncode == 2 and both.stderr.strip() == (
        "prefbench: error: --vs trl measures the parts of a trial; it does not combine with --suite")


def test_tree_memory_counts_a_process_and_its_children():
    import psutil

    from bench.tools.perf import tree_memory

    me = psutil.Process()
    alone = tree_memory(me)
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has allocated its 300 MiB
            with_child = tree_memory(me)
            if with_child[0] > alone[0] + 250 * 2**20:
                break
            import time
            time.sleep(0.1)
        assert with_child[2] == alone[2] + 1 and with_child[0] > alone[0] + 250 * 2**20
    finally:
        child.kill()


def test_perf_rejects_keys_that_are_not_env_or_shapes(capsys):
    proc = cli_in_process(capsys, "perf", "--set", "algorithms=[]")
    assert proc.returncode == 2 and proc.stderr.startswith("prefbench: error: --set algorithms: perf takes env.params.*")
    assert "Traceback" not in proc.stderr


def test_step_clock_takes_the_median_after_the_warm_up():
    from bench.tools.perf import StepClock, WARMUP_STEPS

    clock = StepClock()
    clock.start = 0.0
    clock.stamps = [5.0, 6.0, 6.5, 7.0, 7.5, 8.0, 10.0]  # warm-up gaps, then 0.5 s steps and one 2 s outlier
    assert WARMUP_STEPS == 3 and clock.median_step_s() == 0.5
    assert clock.setup_s() == 4.5  # to the first step's end (5 s), less one median step



def test_rounds_merge_to_element_wise_medians():
    from bench.tools.perf import median_merge

    runs = [{"a": 1.0, "b": {"c": 10, "d": "x"}}, {"a": 3.0, "b": {"c": 30, "d": "y"}}, {"a": 2.0, "b": {"c": 20, "d": "z"}}]
    assert median_merge(runs) == {"a": 2.0, "b": {"c": 20, "d": "x"}}
