"""Shared fixtures: a tiny, untrained tiny-sentiment policy built in seconds (no Ray, no SFT)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_env_dir(tmp_path_factory):
    from envs import ENVS

    env = ENVS.get("tiny-sentiment")
    params = env.params_cls(num_reviews=300, num_train_prompts=40, num_eval_prompts=16, n_layer=1, n_embd=32, n_head=2)
    workdir = tmp_path_factory.mktemp("tiny-env")
    env.build(params, 0, workdir)
    return workdir


@pytest.fixture
def policy(tiny_env_dir):
    import torch
    from algorithms.policy import Policy

    torch.manual_seed(0)
    return Policy.from_pretrained(tiny_env_dir / "init")


@pytest.fixture
def prompts():
    return ["the movie was", "i loved the", "overall it", "the plot and"]


@pytest.fixture(scope="session")
def e2e_cache(tmp_path_factory):
    """One prefbench cache (envs, reward models) shared by every test that prepares the env of
    tests/suites/e2e.yaml — the e2e run and the export-env tests — so its SFT runs once per session."""
    return tmp_path_factory.mktemp("e2e-cache")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, e2e_cache):
    """The e2e suite run once per session (tests/test_e2e.py reads it; tests/reliability/ compares
    its own runs with it): (OUT, the run's stderr, its cache)."""
    from tests.e2e_run import run_cli

    out = tmp_path_factory.mktemp("e2e") / "out"
    proc = run_cli(out, cache=e2e_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr, e2e_cache
