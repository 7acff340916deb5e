"""`prefbench run --address` against a real 2-node Ray cluster (both nodes on this machine).

The cluster comes from Ray's own test utility (`ray.cluster_utils.Cluster`): a head node and a worker
node, each a full set of Ray processes (GCS/raylet, object store) with its own node id. The suite is
the e2e one shrunk to a single DPO trial with two Ray Train workers; a custom resource that each
node holds once makes Ray put the two workers on different nodes, so the env's SFT stage and the
trial both run data-parallel across the nodes (gloo, DeepSpeed) and the trial's `nodes` must name both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

E2E = str(Path(__file__).parent / "suites" / "e2e.yaml")
ONE_PER_NODE = "prefbench_test_worker_slot"  # each node has 1: no two Train workers share a node

# Why one trial with 2 workers rather than 2 concurrent 1-worker trials: a Tune trial's driver holds
# 1 CPU wherever Ray puts it, and nothing stops both drivers landing on one node, which then leaves
# both trials' workers to the other node. Resource arithmetic alone decides this placement.
SHRINK = [
    "algorithms=[{name: dpo, sweep: {beta: [0.5]}}]",
    "baseline=false",
    "scaling.num_workers=2",
    "scaling.max_concurrent_trials=1",
    f"scaling.resources_per_worker={{CPU: 1, {ONE_PER_NODE}: 1}}",
    "train.steps=4",
    "train.eval_every=2",
    "eval.num_prompts=16",
    "eval.temperatures=[1.0]",
]


@pytest.fixture
def two_node_cluster(monkeypatch):
    """(address, {head node id, worker node id}) of a fresh 2-node cluster; torn down afterwards."""
    # A private Ray temp dir: the Cluster writes its address to <tmp>/ray/ray_current_cluster, and a
    # plain `ray.init()` anywhere on this machine joins the cluster named there (and the teardown
    # deletes that file). A short path: Ray's unix sockets live under it (108-byte limit).
    ray_tmp = tempfile.mkdtemp(prefix="pbray", dir="/tmp" if os.path.isdir("/tmp") else None)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # --address alone picks the cluster
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 2, "resources": {ONE_PER_NODE: 1}}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        worker = cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster.address, {cluster.head_node.node_id, worker.node_id}
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_run_with_address_spreads_train_workers_over_both_nodes(two_node_cluster, tmp_path):
    address, node_ids = two_node_cluster
    assert len(node_ids) == 2
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench.cli", "run", E2E, "--out", str(out), "--address", address]
    for s in SHRINK:
        args += ["--set", s]
    env = {**os.environ, "PREFBENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SFT + pairs as a Ray Train job" in proc.stderr  # the env stage ran on the cluster too

    trials = pd.read_parquet(out / "trials.parquet")
    assert list(trials["trial_id"]) == ["dpo-beta=0.5-seed0"]
    assert (trials["status"] == "ok").all(), trials[["trial_id", "reason"]]
    per_trial = [set(n.split(",")) for n in trials["nodes"]]
    assert per_trial == [node_ids]  # rank 0 on one node, rank 1 on the other
    assert set().union(*per_trial) == node_ids
    evals = pd.read_parquet(out / "evals.parquet")
    assert sorted(evals["step"]) == [0, 2, 4]
    assert (evals["n_samples"] == 16 * 4).all()  # both ranks' halves of the eval prompts were gathered
