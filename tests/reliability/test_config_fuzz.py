"""Config fuzzing: an invalid suite or --set is one line on stderr and exit code 2, never a
traceback, and nothing is created under --out; arbitrary YAML is a suite or a one-line ConfigError.

Every fuzzed suite is invalid by construction: a valid suite (bench/suites/quick.yaml or
tests/suites/e2e.yaml) with one or more mutations, each of which breaks a rule of bench/config.py
or of the params' own checks, so whatever else the draws do, the suite stays invalid. The CLI runs
in-process with the steps after validation replaced by a loud failure: a suite that were wrongly
accepted fails the test instead of starting Ray.

Counts of configs tried and rejected cleanly, by class: run with -s (printed at the end of the
module), or with --hypothesis-show-statistics.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import math
import string
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from algorithms import ALGORITHMS
from algorithms.interface import TrainSettings
from algorithms.reward_model import RewardModelParams
from bench import config
from bench.cli import main
from bench.config import (
    MAX_TRIALS,
    AlgorithmSpec,
    ConfigError,
    DeepSpeedSettings,
    EnvSpec,
    EvalSettings,
    ReportSettings,
    ScalingSettings,
    SuiteConfig,
    expand_trials,
    load_suite,
)
from envs import ENVS

ROOT = Path(__file__).resolve().parents[2]
BASE_FILES = {"quick": ROOT / "bench" / "suites" / "quick.yaml", "e2e": ROOT / "tests" / "suites" / "e2e.yaml"}
BASES = {name: yaml.safe_load(path.read_text()) for name, path in BASE_FILES.items()}


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, deadline=None,
        derandomize=True, database=None,  # the same examples on every machine and run, no example database
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


TRIED: collections.Counter = collections.Counter()
REJECTED: collections.Counter = collections.Counter()  # one line on stderr, exit 2, no traceback, no --out
ARBITRARY: collections.Counter = collections.Counter()  # what arbitrary YAML turned out to be


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml where there is one: faster
    """Writes YAML that bench's loader reads back unchanged: it quotes every string that loader would
    read as something else (1e-3 is a float there) and writes integers of 4,000+ digits in hex."""


class _Reader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Reads values as bench's loader does (its duplicate-key check aside), to check what _Dumper wrote."""


_Dumper.yaml_implicit_resolvers = _Reader.yaml_implicit_resolvers = config._UniqueKeyLoader.yaml_implicit_resolvers
_Dumper.add_representer(int, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:int", str(value) if abs(value) < 10**4000 else hex(value)))


def to_yaml(value: Any, flow: bool = False) -> str:
    text = yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=flow, width=10**9)
    assert _same(yaml.load(text, Loader=_Reader), value), f"the fuzz's YAML does not read back as written: {text[:200]!r}"
    return text.removesuffix("...\n")


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ------------------------------------------------------------------------ the suites' schema
def fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def kinds(tp: Any) -> set[str] | None:
    """The YAML value kinds a field of type `tp` accepts (a bool is not a number; None where Optional)."""
    if dataclasses.is_dataclass(tp):
        return {"dict", "none"}  # a section: null is an empty one
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        return set().union(*(kinds(a) for a in typing.get_args(tp)))
    names = {type(None): "none", bool: "bool", int: "int", float: "int float", str: "str", list: "list", dict: "dict"}
    plain = typing.get_origin(tp) or tp
    return set(names[plain].split()) if plain in names else None


VALUE = {
    "none": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-1000, 1000),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=12),
}
SCALAR = st.one_of(*VALUE.values())
VALUE["list"] = st.lists(SCALAR, max_size=3)
VALUE["dict"] = st.dictionaries(st.text(max_size=6), SCALAR, max_size=3)
ANY_VALUE = st.one_of(*VALUE.values())


class Slot(NamedTuple):
    """A field of the suite: where it is, its type, the dataclass it belongs to."""

    path: tuple
    tp: Any
    cls: type
    in_sweep: bool = False  # an algorithm param swept over: a value is written as the one-point list [value]
    params_cls: type | None = None  # under algorithms[i]: that algorithm's params

    def write(self, value: Any) -> tuple[tuple, Any]:
        return self.path, [value] if self.in_sweep else value


def slots(doc: dict) -> list[Slot]:
    out = []
    for name, tp in fields(SuiteConfig).items():
        out.append(Slot((name,), tp, SuiteConfig))
        if dataclasses.is_dataclass(tp):
            out += [Slot((name, f), ftp, tp) for f, ftp in fields(tp).items()]
    env_cls = ENVS.get(doc["env"]["name"]).params_cls
    out += [Slot(("env", "params", f), ftp, env_cls) for f, ftp in fields(env_cls).items()]
    for i, entry in enumerate(doc["algorithms"]):
        at, params_cls = ("algorithms", i), ALGORITHMS.get(entry["name"]).params_cls
        sweep = entry.get("sweep") or {}
        out.append(Slot(at, AlgorithmSpec, SuiteConfig, params_cls=params_cls))
        out += [Slot(at + (f,), ftp, AlgorithmSpec, params_cls=params_cls) for f, ftp in fields(AlgorithmSpec).items()]
        out += [Slot(at + ("train", f), ftp, TrainSettings) for f, ftp in fields(TrainSettings).items()]
        out += [Slot(at + ("sweep" if f in sweep else "params", f), ftp, params_cls, in_sweep=f in sweep)
                for f, ftp in fields(params_cls).items()]
    return out


def mapping_levels(doc: dict) -> list[tuple[tuple, set]]:
    """Every mapping of the suite whose keys are checked, with its known keys."""
    out = [((), set(fields(SuiteConfig)))]
    out += [((name,), set(fields(tp))) for name, tp in fields(SuiteConfig).items() if dataclasses.is_dataclass(tp)]
    out.append((("env", "params"), set(fields(ENVS.get(doc["env"]["name"]).params_cls))))
    for i, entry in enumerate(doc["algorithms"]):
        known = set(fields(ALGORITHMS.get(entry["name"]).params_cls))
        out += [(("algorithms", i), set(fields(AlgorithmSpec))), (("algorithms", i, "params"), known),
                (("algorithms", i, "sweep"), known), (("algorithms", i, "train"), set(fields(TrainSettings)))]
    return out


SLOTS = {name: slots(doc) for name, doc in BASES.items()}
LEVELS = {name: mapping_levels(doc) for name, doc in BASES.items()}

# ------------------------------------------------------------------- out-of-range values
BIG_INT = 2**63 - 1  # out-of-range ints stay in 64 bits: that rule is the "huge" class's


def ints(lo: int = -(2**63), hi: int = BIG_INT) -> st.SearchStrategy:
    return st.integers(lo, hi)


def floats(**bounds) -> st.SearchStrategy:
    return st.floats(allow_nan=False, allow_infinity=False, **bounds)


NEGATIVE = floats(max_value=0, exclude_max=True) | ints(-1000, -1)  # a float field also takes an int
NOT_POSITIVE = floats(max_value=0) | ints(-1000, 0)
OUTSIDE_OPEN_UNIT = floats(max_value=0) | floats(min_value=1)


def list_with(bad: st.SearchStrategy, good: st.SearchStrategy) -> st.SearchStrategy:
    """A list of valid values with one bad one somewhere."""
    return st.tuples(st.lists(good, max_size=3), bad, st.integers(0, 3)).map(lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:])


TINY = ENVS.get("tiny-sentiment").params_cls
PPO, DPO, IPO = (ALGORITHMS.get(n).params_cls for n in ("ppo", "dpo", "ipo"))
BON, UNLIKELIHOOD = ALGORITHMS.get("best-of-n").params_cls, ALGORITHMS.get("unlikelihood").params_cls
TRAIN_RANGES = {"steps": ints(hi=0), "batch_size": ints(hi=0), "lr": NOT_POSITIVE, "warmup_steps": ints(hi=-1),
                "weight_decay": NEGATIVE, "max_grad_norm": NEGATIVE, "eval_every": ints(hi=0)}
RANGES: dict[type, dict[str, st.SearchStrategy]] = {
    SuiteConfig: {
        "seeds": list_with(ints(hi=-1), ints(0, BIG_INT)),
        "deepspeed": st.sampled_from([{"zero_stage": 0, "offload_optimizer": True}, {"zero_stage": 0, "offload_param": True},
                                      {"zero_stage": 1, "offload_param": True}, {"zero_stage": 2, "offload_param": True}]),
        "scaling": st.just({"use_gpu": True, "resources_per_worker": {"GPU": 0}}),
    },
    TrainSettings: TRAIN_RANGES,
    EvalSettings: {**{f: ints(hi=0) for f in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size",
                                             "score_batch_size")},
                   "temperatures": list_with(NEGATIVE, floats(min_value=0, max_value=2))},
    ScalingSettings: {"num_workers": ints(hi=0), "max_concurrent_trials": ints(hi=0), "max_failures": ints(hi=-1),
                      "resources_per_worker": st.fixed_dictionaries({"CPU": NEGATIVE})},
    DeepSpeedSettings: {"zero_stage": ints().filter(lambda z: not 0 <= z <= 3)},
    RewardModelParams: {**TRAIN_RANGES, "epochs": NOT_POSITIVE, "heldout_fraction": OUTSIDE_OPEN_UNIT},
    ReportSettings: {"kl_budgets": list_with(NOT_POSITIVE, floats(min_value=0.1, max_value=100)),
                     "temperature_kl_budget": NOT_POSITIVE, "confidence": OUTSIDE_OPEN_UNIT},
    AlgorithmSpec: {"num_samples": ints(hi=0)},
    TINY: {**{f: ints(hi=0) for f in ("num_reviews", "num_train_prompts", "num_eval_prompts", "n_layer", "n_embd",
                                      "n_head", "sft_batch_size", "max_new_tokens")},
           "samples_per_prompt": ints(hi=1), "min_gold_gap": NEGATIVE, "sft_epochs": NOT_POSITIVE, "sft_lr": NOT_POSITIVE,
           "sft_warmup_steps": ints(hi=-1)},
    DPO: {"beta": NOT_POSITIVE},
    IPO: {"beta": NOT_POSITIVE},
    PPO: {"kl_coef": NEGATIVE, "target_kl": NOT_POSITIVE, "kl_horizon": ints(hi=0),
          "gamma": floats(max_value=0) | floats(min_value=1, exclude_min=True),
          "lam": NEGATIVE | floats(min_value=1, exclude_min=True), "cliprange": NOT_POSITIVE,
          "cliprange_value": NOT_POSITIVE, "vf_coef": NEGATIVE, "ppo_epochs": ints(hi=0), "num_minibatches": ints(hi=0),
          "rollout_temperature": NOT_POSITIVE, "rollout_chunk": ints(hi=0), "reward_norm_samples": ints(hi=1)},
    BON: {"n": ints(hi=0)},
    UNLIKELIHOOD: {"alpha": NEGATIVE},
}
BOUNDED_ABOVE = {(ReportSettings, "confidence"), (RewardModelParams, "heldout_fraction"), (PPO, "gamma"), (PPO, "lam")}
CHOICES = {(AlgorithmSpec, "search"): {"grid", "random"}, (PPO, "kl_estimator"): {"k1", "k2", "k3"},
           (PPO, "critic_init"): {"reward_model", "sft"},
           (PPO, "kl_placement"): {"per_token", "sequence", "loss"},
           (PPO, "loss_aggregation"): {"token_mean", "sequence_mean"}}

HUGE_INT = (st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)
            | st.sampled_from([2**63, -(2**63) - 1, 2**64]) | st.integers(4000, 5000).map(lambda n: 16**n))
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])
LONG_TEXT = st.builds(lambda text, n: text * n, st.text(min_size=1, max_size=4), st.integers(101, 3000))


# ---------------------------------------------------------------- mutations, one per class
# Each draws (path, value) against a base suite; every one breaks a rule wherever it lands.
@st.composite
def unknown_key(draw, base: str, keys: st.SearchStrategy) -> tuple[tuple, Any]:
    at, known = draw(st.sampled_from(LEVELS[base]))
    key = draw(keys.filter(lambda k: k not in known))
    return at + (key,), draw(ANY_VALUE)


@st.composite
def wrong_type(draw, base: str) -> tuple[tuple, Any]:
    slot = draw(st.sampled_from([s for s in SLOTS[base] if kinds(s.tp) is not None]))
    bad = [k for k in VALUE if k not in kinds(slot.tp)]
    if typing.get_origin(slot.tp) is list:  # or a list with one element of a wrong kind
        elem = typing.get_args(slot.tp)[0]
        bad += [f"[{k}]" for k in VALUE if k not in kinds(elem)]
    kind = draw(st.sampled_from(bad))
    value = [draw(VALUE[kind[1:-1]])] if kind.startswith("[") else draw(VALUE[kind])
    return slot.write(value)


@st.composite
def out_of_range(draw, base: str) -> tuple[tuple, Any]:
    slot = draw(st.sampled_from([s for s in SLOTS[base] if s.path[-1] in RANGES.get(s.cls, {})]))
    return slot.write(draw(RANGES[slot.cls][slot.path[-1]]))


@st.composite
def huge(draw, base: str) -> tuple[tuple, Any]:
    options = []
    for s in SLOTS[base]:
        ok, elem = kinds(s.tp) or set(), typing.get_args(s.tp)[0] if typing.get_origin(s.tp) is list else None
        if ok == {"int"}:
            options.append((s, HUGE_INT))
        if "float" in ok:
            options.append((s, NON_FINITE))
        if elem is int:
            options.append((s, list_with(HUGE_INT, ints(0, 100))))
        if elem is float:
            options.append((s, list_with(NON_FINITE, floats(min_value=0.1, max_value=2))))
        if (s.cls, s.path[-1]) in BOUNDED_ABOVE:
            options.append((s, st.sampled_from([1e308, sys.float_info.max])))
        if s.path[-1] == "num_samples":
            options.append((s, ints(MAX_TRIALS + 1)))  # more trials than a suite may have
        if s.path[-1] in ("name", "search", "knob") or (s.cls, s.path[-1]) in CHOICES:
            options.append((s, LONG_TEXT))  # no such name, and a suite name is at most 100 characters
    slot, values = draw(st.sampled_from(options))
    return slot.write(draw(values))


@st.composite
def empty_list(draw, base: str) -> tuple[tuple, Any]:
    options = [("seeds",), ("algorithms",), ("eval", "temperatures"), ("report", "kl_budgets")]
    options += [("algorithms", i, "sweep", f) for i, entry in enumerate(BASES[base]["algorithms"])
                for f in fields(ALGORITHMS.get(entry["name"]).params_cls)]  # a grid axis with no values
    return draw(st.sampled_from(options)), []


@st.composite
def unknown_name(draw, base: str) -> tuple[tuple, Any]:
    slot = draw(st.sampled_from([s for s in SLOTS[base] if (s.cls, s.path[-1]) in CHOICES
                                 or s.path[-1] in ("name", "knob") and s.cls in (EnvSpec, AlgorithmSpec)]))
    field = slot.path[-1]
    if slot.cls is EnvSpec:
        known = set(ENVS.names()) | set(ENVS.broken)
    elif field == "name":
        known = set(ALGORITHMS.names()) | set(ALGORITHMS.broken)
    elif field == "knob":  # "" is no knob: the algorithm's own one
        known = set(fields(slot.params_cls)) | {""}
    else:
        known = CHOICES[slot.cls, field]
    return slot.write(draw(st.text(max_size=20).filter(lambda name: name not in known)))


KEYS = st.text(max_size=12) | st.integers(-5, 5) | st.booleans() | st.none()
OVERRIDE_KEYS = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)  # no "." or "="
MUTATIONS = {
    "unknown_key": lambda base, keys=KEYS: unknown_key(base, keys),
    "wrong_type": lambda base, keys=KEYS: wrong_type(base),
    "out_of_range": lambda base, keys=KEYS: out_of_range(base),
    "huge": lambda base, keys=KEYS: huge(base),
    "empty_list": lambda base, keys=KEYS: empty_list(base),
    "unknown_name": lambda base, keys=KEYS: unknown_name(base),
}


def put(doc: Any, path: tuple, value: Any) -> bool:
    """doc[path] = value, creating missing mappings as --set does; False where an earlier mutation
    left no mapping or list item on the way (that mutation keeps the suite invalid)."""
    node = doc
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    last = path[-1]
    if isinstance(node, dict) or isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
        return True
    return False


# ------------------------------------------------------- documents that are not a suite's mapping
NOT_A_MAPPING = st.one_of(
    st.lists(ANY_VALUE, max_size=4).map(to_yaml),
    SCALAR.map(to_yaml),
    st.sampled_from(["", "\n", "null\n", "~\n", "# only a comment\n", "---\n", "--- null\n...\n", "[]\n", "- name: t\n"]),
)


@st.composite
def bad_yaml(draw) -> bytes:
    suite = BASE_FILES[draw(st.sampled_from(sorted(BASE_FILES)))].read_text()
    lines = suite.splitlines(keepends=True)
    at = draw(st.integers(0, len(lines)))
    kind = draw(st.sampled_from(["syntax", "garbage", "two documents", "list key", "duplicate key", "bad date",
                                 "long int"]))
    event(f"bad_yaml: {kind}")
    if kind == "syntax":  # a broken line somewhere in a valid suite
        line = draw(st.sampled_from(["{\n", "a: [1, 2\n", "key: 'unterminated\n", "\tname: x\n", "- a\nb: c\n",
                                     "*undefined\n", "a: b: c\n", "@x\n", "`x\n", "]\n", "? ? ?\n"]))
        text = "".join(lines[:at]) + line + "".join(lines[at:])
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            return text.encode()
        assume(False)  # that line happened to be valid YAML where it landed: not this class
    if kind == "garbage":  # \xff is never UTF-8; a file starting with a UTF-16 BOM would be read as UTF-16
        data = draw(st.binary(max_size=200))
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + b"\xff" + data[cut:]
        assume(not data.startswith((b"\xff\xfe", b"\xfe\xff")))
        return data
    if kind == "two documents":
        return (suite + "---\n" + suite).encode()
    if kind == "list key":
        return (suite + "? [a, b]\n: 1\n").encode()
    if kind == "duplicate key":
        return (suite + draw(st.sampled_from(["name", "seeds", "train", "algorithms"])) + ": x\n").encode()
    if kind == "bad date":  # YAML reads it as a date, then cannot build it
        return (suite + f"cache_dir: 2024-{draw(st.integers(13, 99))}-01\n").encode()
    return (suite + "cache_dir: " + "9" * draw(st.integers(4301, 6000)) + "\n").encode()  # Python's int digit limit


# --------------------------------------------------------------------------- --set overrides
SCALAR_PATHS = ["name", "seeds.0", "env.name", "train.steps", "algorithms.0.name"]
UNPARSABLE = ["[1, 2", "{a: 1", "'x", '"x', "a: b: c", "*nope", "@x", "`x", "%x", "{a: 1, a: 2}", "2024-13-01",
              "9" * 5000, "[" * 2000, "!!python/object/apply:os.system ['true']", "? [a]\n: 1"]


@st.composite
def bad_override(draw, base: str) -> str:
    kind = draw(st.sampled_from(["mutation", "no =", "unparsable", "list index", "through a scalar", "empty key"]))
    event(f"override: {kind}")
    doc = BASES[base]
    if kind == "mutation":  # a mutation of the suite, written as --set dotted.path=value
        path, value = draw(MUTATIONS[draw(st.sampled_from(sorted(MUTATIONS)))](base, OVERRIDE_KEYS))
        return ".".join(map(str, path)) + "=" + to_yaml(value, flow=True).rstrip("\n")
    if kind == "no =":
        return draw(st.text(max_size=30).filter(lambda s: "=" not in s))
    if kind == "unparsable":
        return draw(st.sampled_from(SCALAR_PATHS)) + "=" + draw(st.sampled_from(UNPARSABLE))
    if kind == "list index":
        field = draw(st.sampled_from(["algorithms", "seeds"]))
        index = draw(st.integers(len(doc[field]), 10**30).map(str) | st.text(max_size=6).filter(
            lambda s: not (s.strip().isascii() and s.strip().isdigit() and int(s) < len(doc[field]))))  # --set strips the key
        return f"{field}.{index}.name=dpo" if field == "algorithms" else f"{field}.{index}=1"
    if kind == "through a scalar":
        return f"{draw(st.sampled_from(SCALAR_PATHS))}.{draw(OVERRIDE_KEYS)}=1"
    return draw(st.sampled_from(["=1", " =1", "train.=1", ".train=1", "algorithms.0.=1"]))


# ------------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module", autouse=True)
def no_run_starts():
    """A suite that passed validation would start Ray and a real run: fail loudly instead."""
    import bench.run.driver

    def accepted(suite, *args, **kwargs):
        raise AssertionError(f"a fuzzed config was accepted: {config.to_yaml(suite)[:2000]}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.run.driver, "check_env_reachable", accepted)
        mp.setattr(bench.run.driver, "_run", accepted)
        if "bench.run.ray_runner" in sys.modules:
            mp.setattr(sys.modules["bench.run.ray_runner"], "start_ray", accepted)
        yield
    print("\nconfig fuzzing: tried / rejected cleanly, by class")
    for kind in sorted(TRIED):
        print(f"  {kind:14} {TRIED[kind]:5} / {REJECTED[kind]}")
    print(f"  {'total':14} {sum(TRIED.values()):5} / {sum(REJECTED.values())}")
    if ARBITRARY:
        print("arbitrary YAML: " + ", ".join(f"{n} {what}" for what, n in sorted(ARBITRARY.items())))


def assert_rejected_cleanly(kind: str, suite: bytes | Path, overrides: list[str] = ()) -> None:
    """`prefbench run SUITE --out OUT [--set ...]` exits 2 with one line on stderr and leaves no OUT."""
    TRIED[kind] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "suite.yaml", Path(tmp) / "out"
        if isinstance(suite, Path):
            path = suite
        else:
            path.write_bytes(suite)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["run", str(path), "--out", str(out), *(f"--set={a}" for a in overrides)])
            except SystemExit as e:  # argparse
                code = e.code
        err = stderr.getvalue()
        assert code == 2, err
        assert "Traceback" not in err
        assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("prefbench: error: "), err
        assert not out.exists()
    REJECTED[kind] += 1


@pytest.mark.parametrize("kind", sorted(MUTATIONS) + ["combined"])
@fuzz(100)
@given(data=st.data())
def test_invalid_suite_is_one_line_and_exit_2(kind, data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    doc = copy.deepcopy(BASES[base])
    names = data.draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=2, max_size=4)) if kind == "combined" else [kind]
    applied = 0
    for name in names:  # the first always lands; a later one may find its way cut by an earlier one
        path, value = data.draw(MUTATIONS[name](base), label=name)
        applied += put(doc, path, value)
    assert applied
    assert_rejected_cleanly(kind, to_yaml(doc).encode())


@fuzz(80)
@given(text=NOT_A_MAPPING)
def test_yaml_that_is_not_a_mapping_is_one_line_and_exit_2(text):
    assert_rejected_cleanly("not_a_mapping", text.encode())


@fuzz(100)
@given(data=bad_yaml())
def test_malformed_yaml_is_one_line_and_exit_2(data):
    assert_rejected_cleanly("bad_yaml", data)


@pytest.mark.parametrize("text", ["cache_dir: " + "[" * 600 + "]" * 600 + "\n",
                                  "cache_dir:\n" + "".join("  " * i + "-\n" for i in range(1000))],
                         ids=["flow", "block"])
def test_yaml_nested_past_the_recursion_limit_is_one_line_and_exit_2(tmp_path, text):
    # not fuzzed: PyYAML scans such nesting in quadratic time (a second for 1,000 levels of [)
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_suite(path)
    assert_rejected_cleanly("bad_yaml", path)


@fuzz(150)
@given(data=st.data())
def test_bad_overrides_are_one_line_and_exit_2(data):
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    overrides = data.draw(st.lists(bad_override(base), min_size=1, max_size=3), label="overrides")
    assert_rejected_cleanly("override", BASE_FILES[base], overrides)


# What the fuzzing found (each once a traceback, a hang, a silently accepted value or a message that
# did not name the key), kept as plain cases so that they stay fixed whatever the draws.
TENTHS = [i / 10 for i in range(1, 11)]
GOOD = "name: t\nseeds: [0]\nenv: {name: tiny-sentiment}\ntrain: {steps: 5, batch_size: 8}\nalgorithms: [{name: dpo}]\n"
FOUND = [
    (GOOD + "? [a, b]\n: 1\n", [], "not valid YAML (line 6)"),
    (GOOD + "cache_dir: " + "9" * 5000 + "\n", [], "not valid YAML (Exceeds the limit (4300 digits)"),
    (GOOD + "cache_dir: 2024-13-01\n", [], "not valid YAML (month must be in 1..12)"),
    (GOOD + '"a\\nb": 1\n', [], "'a\\nb': unknown key"),
    (GOOD, ["eval.temperatures=[0.5, .nan]"], "eval.temperatures[1]: must be a finite number, got nan"),
    (GOOD, ["eval.temperatures=[.inf]"], "eval.temperatures[0]: must be a finite number, got inf"),
    (GOOD, ["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    (GOOD, ["scaling.resources_per_worker={CPU: .nan}"], "scaling.resources_per_worker.CPU: must be a finite number"),
    (GOOD, ["seeds=[-1]"], "seeds: must be integers >= 0"),
    (GOOD, ["seeds=[18446744073709551616]"], "seeds[0]: must fit in a 64-bit integer"),
    (GOOD, ["name=" + "x" * 101], "name: must be 1 to 100 printable characters"),
    (GOOD, ["name=runs/../../x"], "name: must be 1 to 100 printable characters without / or \\"),
    (GOOD, ["algorithms=[{name: dpo, sweep: {beta: [true]}}]"], "algorithms[0].sweep.beta: expected float, got True"),
    (GOOD, ["algorithms=[{name: dpo, sweep: {beta: [abc]}}]"], "algorithms[0].sweep.beta: expected float, got 'abc'"),
    (GOOD, ["algorithms=[{name: dpo, params: {beta: .inf}}]"], "algorithms[0].params.beta: must be a finite number"),
    (GOOD, ["algorithms=[{name: best-of-n, params: {n: true}}]"], "algorithms[0].params.n: expected int, got True"),
    (GOOD, ["algorithms=[{name: ppo, params: {whiten_advantages: maybe}}]"],
     "algorithms[0].params.whiten_advantages: expected bool, got 'maybe'"),
    (GOOD, ["env.params={num_reviews: true}"], "env.params.num_reviews: expected int, got True"),
    (GOOD, ["algorithms=[{name: ipo, knob: average_logps}]"], "knob: average_logps must be a number to be a frontier knob"),
    (GOOD, ["algorithms=[{name: dpo, search: random, sweep: {beta: [1.0], 1: [2]}}]"], "algorithms[0].sweep.1: unknown parameter"),
    (GOOD, ["algorithms=[{name: best-of-n, search: random, sweep: {n: {randint: [1, 100000000000000000000000]}}}]"],
     "algorithms[0].sweep.n.randint[1]: must fit in a 64-bit integer"),
    (GOOD, ["algorithms=[{name: best-of-n, search: random, sweep: {n: {randint: [0.5, 2.5]}}}]"],
     "algorithms[0].sweep.n.randint: expected [lo, hi] with lo <= hi (integers)"),
    (GOOD, ["algorithms=[{name: dpo, search: random, sweep: {beta: {uniform: [-1.0e+308, 1.0e+308]}}}]"],
     "algorithms[0].sweep.beta.uniform: [lo, hi] is too wide to draw from"),
    (GOOD, ["algorithms=[{name: dpo, search: random, num_samples: 100000000, sweep: {beta: {uniform: [0.1, 1]}}}]"],
     "algorithms[0].num_samples: must be <= 10000"),
    (GOOD, [f"algorithms=[{{name: ppo, sweep: {{kl_coef: {TENTHS}, gamma: {TENTHS}, lam: {TENTHS}, vf_coef: {TENTHS + [0]}}}}}]"],
     "algorithms[0].sweep: 11000 grid points; a suite runs at most 10000 trials"),
    (GOOD, ["seeds.0.x=1"], "--set seeds.0.x: seeds.0 is not a mapping or a list"),
    (GOOD, ["algorithms.\u00b2.name=dpo"], "--set algorithms.\u00b2.name: no list item '\u00b2'"),
    (GOOD, ["algorithms.\u0660.name=ipo"], "no list item '\u0660'"),  # int() reads the Arabic-Indic 0 as 0
    (GOOD, ["name={a: 1, a: 2}"], "--set name: duplicate key 'a' (line 1)"),
    (GOOD, ["cache_dir=2024-13-01"], "--set cache_dir: cannot parse value '2024-13-01'"),
]


@pytest.mark.parametrize("suite, overrides, message", FOUND, ids=[message for *_, message in FOUND])
def test_what_fuzzing_found_is_one_config_error(tmp_path, suite, overrides, message):
    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    with pytest.raises(ConfigError) as err:
        expand_trials(load_suite(path, overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_utf8_is_one_config_error(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_bytes(GOOD.encode() + b"cache_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_suite(path)


# ----------------------------------------------------------------- arbitrary YAML, deep into validation
REAL_KEYS = sorted({f for cls in [EnvSpec, *RANGES] for f in fields(cls)} | set(config.DISTRIBUTIONS))
REAL_WORDS = sorted(set(ALGORITHMS.names()) | set(ENVS.names()) | {"grid", "random", "k1", "k3"})
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 100), HUGE_INT, st.floats(), st.text(max_size=8),
    st.sampled_from(REAL_WORDS), st.dates(), st.binary(max_size=4),
)
KEY = st.sampled_from(REAL_KEYS) | st.sampled_from(REAL_WORDS) | st.text(max_size=6) | st.integers(-2, 3) | st.none()
TREE = st.recursive(LEAF, lambda children: st.lists(children, max_size=4) | st.dictionaries(KEY, children, max_size=5),
                    max_leaves=25)


@st.composite
def arbitrary_suite(draw) -> bytes:
    shape = draw(st.sampled_from(["tree", "suite-shaped", "grafted", "retyped", "text", "bytes"]))
    event(f"arbitrary: {shape}")
    if shape == "text":
        return draw(st.text(max_size=200)).encode()
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    if shape == "tree":
        return to_yaml(draw(TREE)).encode()
    if shape == "suite-shaped":
        return to_yaml(draw(st.dictionaries(st.sampled_from(sorted(fields(SuiteConfig))), TREE, max_size=6))).encode()
    base = draw(st.sampled_from(sorted(BASES)))
    doc = copy.deepcopy(BASES[base])
    for _ in range(draw(st.integers(1, 3))):
        if shape == "grafted":  # a real suite with arbitrary subtrees, mostly under known keys
            at, known = draw(st.sampled_from(LEVELS[base]))
            put(doc, at + (draw(st.sampled_from(sorted(known)) | KEY if known else KEY),), draw(TREE))
        else:  # a real suite with fields set to any value of their type: in range or not, sometimes valid
            slot = draw(st.sampled_from([s for s in SLOTS[base] if kinds(s.tp)]))
            put(doc, *slot.write(draw(VALUE[draw(st.sampled_from(sorted(kinds(slot.tp))))])))
    return to_yaml(doc).encode()


@fuzz(200)
@given(data=arbitrary_suite())
def test_arbitrary_yaml_is_a_suite_or_one_config_error(data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "arbitrary.yaml"
    path.write_bytes(data)
    try:
        expand_trials(load_suite(path))
        ARBITRARY["valid suites"] += 1
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, message
        ARBITRARY["one-line ConfigErrors"] += 1
