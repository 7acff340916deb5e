"""Plugins: the contract checks, an in-tree module dropped into algorithms/, the out-of-tree example
package (examples/prefbench-slic) pip-installed and swept next to DPO, and broken plugins reported
by name without breaking unrelated commands."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from algorithms.interface import contract_problems
from envs.base import contract_problems as env_contract_problems

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "prefbench-slic"
TINY_ENV = ["--set", "env.params.num_reports=800", "--set", "env.params.sft_epochs=1",
            "--set", "env.params.num_train_prompts=60", "--set", "env.params.num_eval_prompts=24"]


def cli(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def table(stdout: str) -> dict[str, list[str]]:
    """`prefbench list` rows by plugin name: [kind, knob, needs, origin...]."""
    rows = [line.split() for line in stdout.splitlines()[1:]]
    return {r[1]: [r[0], *r[2:]] for r in rows}


# ------------------------------------------------------------------------- the contract
@dataclasses.dataclass
class GoodParams:
    beta: float = 0.1


class Good:
    name = "good"
    params_cls = GoodParams
    knob = "beta"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx):
        return {}


def variant(**changes):
    algo = Good()
    for k, v in changes.items():
        setattr(algo, k, v)
    return algo


@dataclasses.dataclass
class NoDefault:
    beta: float


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"knob": None}, None),
    ({"name": "has space"}, "name must be"),
    ({"knob": "gamma"}, "knob 'gamma' is not a field"),
    ({"needs": frozenset({"pairs", "votes"})}, "needs must be a subset"),
    ({"needs": ["pairs"]}, "needs must be a subset"),
    ({"params_cls": dict}, "params_cls must be a dataclass"),
    ({"params_cls": NoDefault}, "without a default: beta"),
    ({"trains_policy": "yes"}, "trains_policy must be True or False"),
    ({"train": None}, "no train(ctx) method"),
])
def test_algorithm_contract_names_each_problem(changes, problem):
    problems = contract_problems(variant(**changes))
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_env_contract_requires_the_stages_and_a_gold_reward():
    from envs import ENVS

    assert env_contract_problems(ENVS.get("tiny-sentiment")) == []

    class HalfEnv:
        name = "half"
        params_cls = GoodParams
        version = "2"

        def build(self, params, seed, workdir): ...

    problems = env_contract_problems(HalfEnv())
    assert "missing method(s): sft_corpus, sft_settings, load_policy, finish, gold (or gold_for)" in problems
    assert "version must be an int" in problems


def test_registry_records_broken_plugins_by_name_and_keeps_the_rest():
    from algorithms.registry import Registry

    reg = Registry(kind="algorithm", group="prefbench.no-such-group", package="algorithms",
                   contract="algorithms.interface:contract_problems")
    reg._loaded = True  # only what this test registers
    reg.register(Good(), origin="test")
    reg.register(variant(name="bad", knob="gamma"), origin="test")
    reg.register(variant(), origin="package other 1.0")  # "good" again: the first one stays
    assert reg.names() == ["good"] and reg.origin("good") == "test"
    assert "knob 'gamma'" in reg.broken["bad"]
    with pytest.raises(KeyError, match="bad.*knob 'gamma'"):
        reg.get("bad")
    with pytest.raises(KeyError, match="unknown algorithm 'nope'.*failed to load: bad, good"):
        reg.get("nope")
    assert "already taken by test" in reg.broken["good"]


# -------------------------------------------------------------------------- SLiC-HF loss
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """examples/prefbench-slic pip-installed (no deps: prefbench is already here) into a fresh
    directory that subprocesses get on PYTHONPATH, plus a hand-made broken distribution whose
    entry point names an attribute that does not exist."""
    target, src = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "prefbench-slic"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # pip builds in place
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = target / "prefbench_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prefbench-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[prefbench.algorithms]\nbroken-algo = prefbench_slic.slic:NoSuchThing\n")
    return target


def with_path(*paths: Path) -> dict:
    pythonpath = os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": pythonpath}


def test_slic_loss_matches_hand_numbers(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    from prefbench_slic.slic import SLiCParams, slic_loss

    chosen = torch.tensor([-3.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-4.0, -5.0], requires_grad=True)
    losses, calibration = slic_loss(chosen, rejected, delta=2.0, reg_weight=0.1)
    # pair 0: max(0, 2 + 3 - 4) = 1, plus 0.1 * 3 = 1.3; pair 1: max(0, 2 + 2 - 5) = 0, plus 0.1 * 2 = 0.2
    assert torch.allclose(losses, torch.tensor([1.3, 0.2]))
    assert torch.allclose(calibration, torch.tensor([1.0, 0.0]))
    losses.sum().backward()
    assert torch.allclose(chosen.grad, torch.tensor([-1.1, -0.1]))  # the hinge only where it is active
    assert torch.allclose(rejected.grad, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="delta"):
        SLiCParams(delta=0)


# ----------------------------------------------------------------------- out of tree
def test_installed_package_is_listed_with_its_origin(site):
    proc = cli("list", env=with_path(site))
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert rows["slic"] == ["algorithm", "delta", "pairs", "package", "prefbench-slic", "0.1.0"]
    assert rows["toy-weather"] == ["env", "-", "-", "package", "prefbench-slic", "0.1.0"]
    assert rows["dpo"][:3] == ["algorithm", "beta", "pairs"]
    # the broken distribution: one line on stderr, by name, and skipped
    broken = [line for line in proc.stderr.splitlines() if "broken-algo" in line]
    assert len(broken) == 1 and "AttributeError" in broken[0] and "prefbench-broken" in broken[0]
    assert "broken-algo" not in rows


@pytest.mark.slow
def test_installed_plugins_sweep_next_to_dpo(site, tmp_path):
    """The example's own suite, shrunk: SLiC-HF at two margins and DPO on the toy-weather env,
    through Ray Train + DeepSpeed like every in-tree algorithm."""
    out = tmp_path / "out"
    proc = cli("run", str(site / "prefbench_slic" / "suite.yaml"), "--out", str(out), *TINY_ENV,
               "--set", "train.steps=8", "--set", "train.eval_every=4", "--set", "eval.num_prompts=24",
               "--set", "baseline=false", "--set", "algorithms.0.sweep.delta=[2.0]",
               env={**with_path(site), "PREFBENCH_CACHE": str(tmp_path / "cache")}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert set(trials.index) == {"slic-delta=2.0-seed0", "dpo-beta=0.5-seed0"}
    assert (trials["status"] == "ok").all(), trials["reason"].tolist()
    assert 0 <= json.loads(trials.loc["slic-delta=2.0-seed0", "summary"])["slic/final_hinge_active"] <= 1
    evals = pd.read_parquet(out / "evals.parquet")
    slic = evals[evals["algorithm"] == "slic"]
    assert set(slic["step"]) == {0, 4, 8} and (slic["knob"] == "delta").all() and (slic["env"] == "toy-weather").all()
    final = slic[(slic["step"] == 8) & (slic["temperature"] == 1.0)].iloc[0]
    assert final["kl"] > 0 and 0 <= final["gold_reward"] <= 1
    log = [json.loads(line) for line in (out / "trials" / "slic-delta=2.0-seed0" / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, 9)) and "losses/calibration" in log[0]
    assert "slic" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- in tree
IN_TREE_ALGORITHM = '''
from algorithms import ALGORITHMS


class SLiCInTree(SLiC):
    name = "slic-intree"


ALGORITHMS.register(SLiCInTree())
'''

BAD_KNOB = '''
from dataclasses import dataclass
from algorithms import ALGORITHMS


@dataclass
class P:
    beta: float = 1.0


class BadKnob:
    name = "bad-knob"
    params_cls = P
    knob = "gamma"
    needs = frozenset({"pairs"})
    trains_policy = True

    def train(self, ctx):
        return {}


ALGORITHMS.register(BadKnob())
'''


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of prefbench's source with three modules dropped into algorithms/: a working one
    (SLiC-HF, registered by name), one whose import fails, and one that breaks the contract."""
    src = tmp_path_factory.mktemp("tree")
    for pkg in ("algorithms", "envs", "bench"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    slic = (EXAMPLE / "prefbench_slic" / "slic.py").read_text()
    (src / "algorithms" / "slic_intree.py").write_text(slic + IN_TREE_ALGORITHM)
    (src / "algorithms" / "needs_missing.py").write_text("import prefbench_no_such_dependency\n")
    (src / "algorithms" / "bad_knob.py").write_text(BAD_KNOB)
    return src


def test_in_tree_module_registers_and_broken_ones_are_reported(tree, tmp_path):
    proc = cli("list", env=with_path(tree), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert rows["slic-intree"] == ["algorithm", "delta", "pairs", "in-tree", "(algorithms.slic_intree)"]
    assert "dpo" in rows and "bad-knob" not in rows
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("prefbench: skipped")]
    assert any("algorithms.needs_missing" in s and "ModuleNotFoundError" in s for s in skipped), skipped
    assert any("bad-knob" in s and "knob 'gamma' is not a field of params_cls" in s for s in skipped), skipped

    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nalgorithms:\n  - {name: dpo}\n  - {name: slic-intree, sweep: {delta: [1.0, 3.0]}}\n")
    proc = cli("run", str(suite), "--dry-run", env=with_path(tree), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # the broken plugins do not touch a suite that doesn't use them
    assert "slic-intree-delta=3.0-seed0" in proc.stdout

    for name, reason in [("bad-knob", "knob 'gamma'"), ("needs-missing", "algorithms.needs_missing")]:
        suite.write_text(f"name: t\nalgorithms:\n  - {{name: {name}}}\n")
        proc = cli("run", str(suite), "--out", str(tmp_path / "out"), env=with_path(tree), cwd=tmp_path)
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
        assert proc.stderr.count("prefbench: error:") == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_in_tree_module_trains_in_one_process(tree):
    """The dropped-in algorithm runs against a hand-built TrainContext, as docs/plugins.md shows."""
    script = textwrap.dedent('''
        import json, pandas as pd, tempfile, torch
        from pathlib import Path
        from algorithms import ALGORITHMS
        from algorithms.interface import EnvData, TrainContext, TrainSettings, plain_optimizer
        from algorithms.policy import Policy
        from envs import ENVS

        algo = ALGORITHMS.get("slic-intree")
        env = ENVS.get("tiny-sentiment")
        work = Path(tempfile.mkdtemp())
        env.build(env.params_cls(num_reviews=200, num_train_prompts=8, num_eval_prompts=8, n_layer=1, n_embd=32,
                                 n_head=2), 0, work)
        torch.manual_seed(0)
        policy = Policy.from_pretrained(work / "init")
        pairs = pd.DataFrame({"prompt": ["the movie was", "i loved the"] * 4,
                              "chosen": ["very good .", "film ."] * 4, "rejected": ["very bad .", "plot ."] * 4})
        train = TrainSettings(steps=15, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=100)
        logs, evals = [], []
        ctx = TrainContext(policy=policy, reference=policy.frozen_copy(), params=algo.params_cls(delta=5.0),
                           train=train, data=EnvData([], [], pairs, pd.DataFrame()),
                           optimize=plain_optimizer(policy, train=train),
                           evaluate=lambda sampler, step, final=False: evals.append((step, final)) or {},
                           log=lambda step, m: logs.append(m))
        summary = algo.train(ctx)
        print("RESULT", json.dumps([logs[0]["logps/margin"], logs[-1]["logps/margin"], evals, summary]))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=with_path(tree),
                          cwd=tree, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    first, last, evals, summary = json.loads(result.removeprefix("RESULT "))
    assert last > first + 1.0  # the hinge pushed chosen above rejected (nats per sequence)
    assert evals == [[0, False], [15, True]]  # eval_every=100: step 0 and the final evaluation
    assert 0 <= summary["slic/final_hinge_active"] <= 1


def test_docs_show_the_example_as_it_is():
    """docs/plugins.md quotes the example package's files verbatim: they must not drift apart."""
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for path in ("pyproject.toml", "prefbench_slic/slic.py", "prefbench_slic/suite.yaml"):
        assert (EXAMPLE / path).read_text() in doc, path
