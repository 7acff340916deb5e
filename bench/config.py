"""Suite files: YAML → typed, validated dataclasses, before anything starts.

Every mistake a user can make in a suite (unknown key, wrong type, out-of-range value, unknown
algorithm or env, a sweep over a parameter that does not exist) raises `ConfigError` whose message
names the dotted key; the CLI prints it as one line and exits 2. Rules that hold for every key:
a bool is not a number, numbers are finite and integers fit in 64 bits (they end up in numpy,
torch and parquet), and a suite expands to at most MAX_TRIALS trials.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import types
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from algorithms import ALGORITHMS
from algorithms.interface import ParamError, TrainSettings, params_from_dict
from algorithms.registry import first_line
from algorithms.reward_model import RewardModelParams
from envs import ENVS

QUICK_SUITE = Path(__file__).parent / "suites" / "quick.yaml"
MAX_TRIALS = 10_000  # trials one suite may expand to: a bigger sweep is a typo, not a benchmark Tune can hold


class ConfigError(Exception):
    """A user mistake in a suite file or --set; str() is the one line to print."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.splitlines()))  # one line, whatever a key or value held


@dataclass
class EnvSpec:
    name: str = "tiny-sentiment"
    params: dict = field(default_factory=dict)  # the env's params_cls fields


@dataclass
class AlgorithmSpec:
    name: str = ""
    params: dict = field(default_factory=dict)  # fixed params_cls fields
    sweep: dict = field(default_factory=dict)  # param → list of values (grid), or a distribution (random)
    search: str = "grid"  # "grid": every combination of the sweep lists; "random": num_samples draws
    num_samples: int = 1  # random search: points drawn (distinct ones kept), each run on every seed
    train: dict = field(default_factory=dict)  # overrides of the suite's train settings
    knob: str | None = None  # report this param as the frontier knob instead of the algorithm's own (e.g. target_kl)


@dataclass
class EvalSettings:
    num_prompts: int = 256  # eval prompts used (the env's first ones)
    samples_per_prompt: int = 4  # k samples per prompt at each temperature
    max_new_tokens: int = 32
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    batch_size: int = 512  # sequences per generation batch (KV-cached sampling likes them large)
    score_batch_size: int = 128  # sequences per teacher-forced scoring batch (on CPU, memory-bound: 128 ran 1.8x faster than 512)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ParamError(name, "must be >= 1")
        if not self.temperatures:
            raise ParamError("temperatures", "must list at least one temperature")
        for t in self.temperatures:
            if t < 0:
                raise ParamError("temperatures", f"must be >= 0, got {t}")


@dataclass
class ScalingSettings:
    num_workers: int = 1  # Ray Train workers per trial and per shared stage (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker (CUDA + nccl); nothing in algorithms/ changes
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1.0})  # Ray resources of each worker
    max_concurrent_trials: int = 2  # Tune trials at once (each also holds 1 CPU for its driver)
    max_failures: int = 1  # times a trial whose worker died is restarted from its last checkpoint

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ParamError("num_workers", "must be >= 1")
        for name, amount in self.resources_per_worker.items():
            if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                raise ParamError("resources_per_worker", f"expected resource name -> amount >= 0, got {name!r}: {amount!r}")
        if self.use_gpu and self.resources_per_worker.get("GPU", 1) <= 0:
            raise ParamError("resources_per_worker", "use_gpu needs GPU > 0 per worker")
        if self.max_concurrent_trials < 1:
            raise ParamError("max_concurrent_trials", "must be >= 1")
        if self.max_failures < 0:
            raise ParamError("max_failures", "must be >= 0")

    def worker_resources(self) -> dict:
        """Ray resources of one worker: resources_per_worker, plus 1 GPU when use_gpu and none is named."""
        res = {"CPU": 1.0, **{k: float(v) for k, v in self.resources_per_worker.items()}}
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 0  # 0-3: 1 shards optimizer state, 2 also gradients, 3 also parameters
    bf16: bool = False  # bf16 weights and compute, fp32 master copy in the optimizer
    # torch.autocast to bf16 in every forward of every model (fp32 weights, gradients and optimizer;
    # matmuls in bf16; DeepSpeed's `torch_autocast`); off by default: the numbers change
    autocast: bool = False
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (ZeRO >= 1)
    offload_param: bool = False  # ZeRO-Infinity: parameters live on the CPU between uses (ZeRO-3)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ParamError("zero_stage", "must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ParamError("offload_optimizer", "needs zero_stage >= 1")
        if self.offload_param and self.zero_stage != 3:
            raise ParamError("offload_param", "needs zero_stage 3")
        if self.autocast and self.bf16:
            raise ParamError("autocast", "and bf16 exclude each other (bf16 weights compute in bf16 already)")


@dataclass
class TrackingSettings:
    """Experiment tracking of the sweep, through Ray Tune's own logger callbacks: every trial's
    reported metrics (its training metrics at each tenth of its steps, its evaluations) and params."""

    tensorboard: bool = True  # Tune's TBXLoggerCallback: event files in each trial's Ray dir (OUT/ray/sweep/<trial>/)
    mlflow: bool = False  # Ray's MLflowLoggerCallback: one MLflow run per trial (needs mlflow or mlflow-skinny)
    mlflow_tracking_uri: str = ""  # "" = a local file store, OUT/mlruns
    mlflow_experiment: str = ""  # "" = the suite's name
    wandb: bool = False  # Ray's WandbLoggerCallback: one W&B run per trial (needs wandb)
    wandb_project: str = "prefbench"
    wandb_mode: str = "offline"  # offline (files under OUT/wandb, `wandb sync` later) or online

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online"):
            raise ParamError("wandb_mode", f"must be offline or online, got {_show(self.wandb_mode)}")


@dataclass
class ReportSettings:
    kl_budgets: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])  # nats: best gold and area under each front up to each
    temperature_kl_budget: float = 3.0  # nats: each algorithm's point in the temperature plot = its best final point with KL(T=1) <= this
    confidence: float = 0.95  # level of every confidence interval (Student t over seeds)
    baseline: str = "dpo"  # algorithm the paired differences (per seed, other − baseline) are taken against

    def __post_init__(self) -> None:
        if not (0 < len(self.baseline) <= 100 and self.baseline.isprintable()):
            raise ParamError("baseline", f"must name an algorithm (1 to 100 printable characters), got {_show(self.baseline)}")
        if not self.kl_budgets:
            raise ParamError("kl_budgets", "must list at least one KL budget")
        for b in self.kl_budgets:
            if not b > 0 or b != b or b == float("inf"):
                raise ParamError("kl_budgets", f"must be finite numbers > 0 (nats), got {b}")
        if not 0 < self.temperature_kl_budget < float("inf"):
            raise ParamError("temperature_kl_budget", f"must be a finite number > 0 (nats), got {self.temperature_kl_budget}")
        if not 0 < self.confidence < 1:
            raise ParamError("confidence", f"must be between 0 and 1, got {self.confidence}")
        self.kl_budgets = sorted(float(b) for b in self.kl_budgets)


@dataclass
class SuiteConfig:
    name: str = "quick"
    env: EnvSpec = field(default_factory=EnvSpec)
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    algorithms: list[AlgorithmSpec] = field(default_factory=list)
    baseline: bool = True  # also evaluate the SFT reference itself (algorithm "sft")
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    reward_model: RewardModelParams = field(default_factory=RewardModelParams)  # the shared learned-RM stage
    cache_dir: str | None = None  # env / shared-stage cache; default $PREFBENCH_CACHE or ~/.cache/prefbench
    storage_path: str | None = None  # Ray Train/Tune storage (checkpoints): a shared path or s3://...; default OUT/ray
    report: ReportSettings = field(default_factory=ReportSettings)  # what the report measures (prefbench report reads it back)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # TensorBoard / MLflow / W&B logging of the sweep

    def __post_init__(self) -> None:
        # the default output directory is runs/NAME-TIME: a name must make one file name
        if not (0 < len(self.name) <= 100 and self.name.isprintable() and "/" not in self.name
                and "\\" not in self.name and self.name not in (".", "..")):
            raise ParamError("name", f"must be 1 to 100 printable characters without / or \\ (it names the run's "
                                     f"directory runs/NAME-TIME), got {_show(self.name)}")


@dataclass(frozen=True)
class TrialSpec:
    """One Tune trial: an algorithm at one point of its sweep, one seed."""

    trial_id: str
    algorithm: str
    params: dict
    train: dict  # resolved TrainSettings as a dict
    seed: int
    knob: str | None
    knob_value: float | None


# ------------------------------------------------------------------------------- parsing
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is not None or not isinstance(tp, type):  # Literal, tuple[...], ...: a plugin's own checks decide
        return True
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    plain = typing.get_origin(tp) is None and getattr(tp, "__name__", None)  # list[int] has the __name__ "list"
    return plain or str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut to 60 characters (an int of 5,000 digits has none)."""
    try:
        text = repr(value)
    except ValueError:
        text = "an integer too large to print"
    return text if len(text) <= 60 else text[:57] + "..."


def _key(key: Any) -> str:
    """A mapping key for a dotted path: as written when it is a short printable string, else its repr."""
    return key if isinstance(key, str) and 0 < len(key) <= 60 and key.isprintable() else _show(key)


def _check_numbers(value: Any, where: str, finite: bool = True, seen: set[int] | None = None) -> None:
    """Every integer in `value` fits in 64 bits and (with `finite`) every float is finite: numpy,
    torch and parquet take them, where a bigger integer is an OverflowError and inf or NaN is silently wrong."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: must fit in a 64-bit integer, got {_show(value)}")
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if isinstance(value, (dict, list)):
        seen = set() if seen is None else seen
        if id(value) in seen:  # a YAML alias: checked once, so an alias bomb stays linear
            return
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_numbers(item, f"{where}.{_key(key)}" if isinstance(value, dict) else f"{where}[{key}]", finite, seen)


def _build_params(params_cls: type, values: dict) -> Any:
    """params_from_dict, after checking each value against its field's type (a bool is not a number);
    a wrong one is a ParamError naming the field, as the params' own checks raise."""
    try:
        hints = typing.get_type_hints(params_cls)
    except (NameError, TypeError):  # a plugin whose annotations do not resolve here: its own checks decide
        hints = {}
    for key, value in values.items():
        if key in hints and not _type_ok(value, hints[key]):
            raise ParamError(key, f"expected {_type_name(hints[key])}, got {_show(value)}")
    return params_from_dict(params_cls, values)


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; errors name `where.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'suite'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    plain = []  # (value, path) of the fields that are not sections
    for key, value in data.items():
        path = f"{where}.{_key(key)}" if where else _key(key)
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, path)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list")
            kwargs[key] = [build_dataclass(typing.get_args(tp)[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            if not _type_ok(value, tp):
                raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
            _check_numbers(value, path, finite=False)  # float() below takes any 64-bit integer
            if tp is float or (typing.get_origin(tp) is list and typing.get_args(tp) == (float,)):
                value = [float(v) for v in value] if isinstance(value, list) else float(value)
            kwargs[key] = value
            plain.append((value, path))
    try:
        built = cls(**kwargs)
    except ParamError as e:
        raise ConfigError(f"{where}.{e.field}: {e.message}" if where else f"{e.field}: {e.message}") from None
    for value, path in plain:  # after the dataclass's own checks, whose messages name the field's range
        _check_numbers(value, path)
    return built


def apply_override(raw: dict, assignment: str) -> None:
    """--set a.b.c=value (value parsed as YAML; a numeric part indexes a list)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {_key(assignment)}: expected dotted.key=value")
    key, text = assignment.split("=", 1)
    try:
        value = _parse_value(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date like 2024-13-01, an int of 5,000 digits
        raise ConfigError(f"--set {_key(key)}: cannot parse value {_show(text)}") from None
    except ConfigError as e:  # a repeated key
        raise ConfigError(f"--set {_key(key)}: {e}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not _is_index(part, node):
                raise ConfigError(f"--set {_key(key)}: no list item {_show(part)} at {_key('.'.join(parts[:i]))}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {_key(key)}: {_key('.'.join(parts[: i + 1]))} is not a mapping or a list")
    last = parts[-1]
    if isinstance(node, list):
        if not _is_index(last, node):
            raise ConfigError(f"--set {_key(key)}: no list item {_show(last)}")
        node[int(last)] = value
    else:
        node[last] = value


def _is_index(part: str, items: list) -> bool:
    """`part` is an index of `items` written in ASCII digits (int() would also take '٣', isdigit() '²')."""
    return part.isascii() and part.isdigit() and int(part) < len(items)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a repeated key is an error instead of a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # a list or mapping as a key: SafeLoader says so, with its line
                continue
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads "1e-3" (no dot) as a string; suites are full of such learning rates: read them as
# floats, as YAML 1.2 and every JSON parser do.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_value(text: str):
    """A --set value, parsed as YAML with the suite loader's rules."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_suite(path: str | Path | None = None, overrides: list[str] | None = None) -> SuiteConfig:
    path = Path(path) if path else QUICK_SUITE
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        raw = yaml.load(path.read_bytes(), Loader=_UniqueKeyLoader)  # bytes: YAML reads the encoding, rejects binary
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except ValueError as e:  # a value YAML matched but cannot build: a date like 2024-13-01, an int of 5,000 digits
        raise ConfigError(f"{path}: not valid YAML ({first_line(e).split(': ')[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite is a YAML mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    suite = build_dataclass(SuiteConfig, raw, "")
    validate(suite)
    return suite


def validate(suite: SuiteConfig) -> None:
    """Cross-field checks and plugin lookups; raises ConfigError naming the key."""
    import importlib.util

    for key, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if getattr(suite.tracking, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracking.{key}: needs the {package} package, which is not installed here "
                              f"(pip install {'mlflow-skinny' if key == 'mlflow' else 'wandb'})")
    if not suite.seeds:
        raise ConfigError("seeds: must list at least one seed")
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError("seeds: must not repeat")
    if min(suite.seeds) < 0:
        raise ConfigError(f"seeds: must be integers >= 0 (they seed numpy), got {min(suite.seeds)}")
    if not suite.algorithms:
        raise ConfigError("algorithms: must list at least one algorithm")
    try:
        env = ENVS.get(suite.env.name)
    except KeyError as e:
        raise ConfigError(f"env.name: {e.args[0]}") from None
    try:
        params = _build_params(env.params_cls, suite.env.params)
    except ParamError as e:
        raise ConfigError(f"env.params.{_key(e.field)}: {e.message}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"env.params: {suite.env.name}: {first_line(e)}") from None
    if suite.train.batch_size % suite.scaling.num_workers:
        raise ConfigError("train.batch_size: must be divisible by scaling.num_workers")
    sft = env.sft_settings(params)
    if sft.batch_size % suite.scaling.num_workers:
        raise ConfigError(f"env.params: the SFT batch ({sft.batch_size}) must be divisible by scaling.num_workers")
    if suite.reward_model.batch_size % suite.scaling.num_workers:
        raise ConfigError("reward_model.batch_size: must be divisible by scaling.num_workers")
    expand_trials(suite)  # validates every algorithm and sweep point


def env_params(suite: SuiteConfig) -> Any:
    return params_from_dict(ENVS.get(suite.env.name).params_cls, suite.env.params)


DISTRIBUTIONS = ("uniform", "loguniform", "randint")


def sweep_points(spec: AlgorithmSpec, where: str) -> list[tuple]:
    """The sweep's points, in order: the grid's combinations, or `num_samples` distinct random draws.

    Random search draws from a generator seeded by the algorithm's name and sweep, so the same suite
    gives the same points (and trial ids) on every run and machine. A sweep value is a list (drawn
    uniformly) or one of {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (inclusive);
    floats are rounded to 4 significant digits so trial ids stay readable.
    """
    if spec.search not in ("grid", "random"):
        raise ConfigError(f"{where}.search: must be 'grid' or 'random', got {_show(spec.search)}")
    if spec.num_samples < 1:
        raise ConfigError(f"{where}.num_samples: must be >= 1")
    keys = list(spec.sweep)
    if spec.search == "grid":
        if spec.num_samples != 1:
            raise ConfigError(f"{where}.num_samples: applies to search: random (a grid runs each point once)")
        for key in keys:
            values = spec.sweep[key]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.sweep.{_key(key)}: expected a non-empty list of values (distributions "
                                  "need search: random)")
        size = math.prod(len(spec.sweep[k]) for k in keys)
        if size > MAX_TRIALS:
            raise ConfigError(f"{where}.sweep: {size} grid points; a suite runs at most {MAX_TRIALS} trials")
        return list(itertools.product(*(spec.sweep[k] for k in keys)))
    if spec.num_samples > MAX_TRIALS:
        raise ConfigError(f"{where}.num_samples: must be <= {MAX_TRIALS} (a suite runs at most {MAX_TRIALS} trials)")
    try:
        text = json.dumps([spec.name, spec.sweep], sort_keys=True, default=str)
    except TypeError:  # sort_keys meets a mapping whose keys mix types
        raise ConfigError(f"{where}.sweep: values must be numbers, strings, lists or mappings with string keys") from None
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    points: list[tuple] = []
    for _ in range(spec.num_samples):
        point = tuple(_draw(spec.sweep[k], rng, f"{where}.sweep.{_key(k)}") for k in keys)
        if point not in points:
            points.append(point)
    return points


def _draw(dist: Any, rng, where: str) -> Any:
    if isinstance(dist, list) and dist:
        return dist[int(rng.integers(len(dist)))]
    if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
        raise ConfigError(f"{where}: expected a non-empty list or one of {{{'|'.join(DISTRIBUTIONS)}: [lo, hi]}}")
    kind, bounds = next(iter(dist.items()))
    number = int if kind == "randint" else (int, float)
    ok = (isinstance(bounds, list) and len(bounds) == 2
          and all(isinstance(b, number) and not isinstance(b, bool) for b in bounds) and bounds[0] <= bounds[1])
    if not ok or (kind == "loguniform" and bounds[0] <= 0):
        raise ConfigError(f"{where}.{kind}: expected [lo, hi] with lo <= hi" + (" and lo > 0" if kind == "loguniform" else "")
                          + (" (integers)" if kind == "randint" else ""))
    lo, hi = bounds
    try:
        if kind == "randint":
            return int(rng.integers(lo, hi + 1))
        x = rng.uniform(lo, hi) if kind == "uniform" else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    except (ValueError, OverflowError):  # beyond numpy's int64 or float64 range
        x = math.inf
    x = float(f"{x:.4g}")
    if not math.isfinite(x):
        raise ConfigError(f"{where}.{kind}: [lo, hi] is too wide to draw from (int64 / float64)")
    return x


def expand_trials(suite: SuiteConfig) -> list[TrialSpec]:
    """The sweep: algorithm × sweep point (grid or random) × seed (plus the SFT baseline per seed)."""
    trials: list[TrialSpec] = []
    seen: set[str] = set()
    specs = [(f"algorithms[{i}]", spec) for i, spec in enumerate(suite.algorithms)]
    if suite.baseline and not any(a.name == "sft" for a in suite.algorithms):
        specs.insert(0, ("baseline", AlgorithmSpec(name="sft")))
    for where, spec in specs:
        try:
            algo = ALGORITHMS.get(spec.name)
        except KeyError as e:
            raise ConfigError(f"{where}.name: {e.args[0]}") from None
        train = build_dataclass(TrainSettings, {**dataclasses.asdict(suite.train), **spec.train}, f"{where}.train")
        if train.batch_size % suite.scaling.num_workers:
            raise ConfigError(f"{where}.train.batch_size: must be divisible by scaling.num_workers")
        known = {f.name for f in dataclasses.fields(algo.params_cls)}
        for section in ("params", "sweep"):
            for key in getattr(spec, section):
                if key not in known:
                    raise ConfigError(f"{where}.{section}.{_key(key)}: unknown parameter "
                                      f"(known: {', '.join(sorted(known)) or f'none, {spec.name} has no parameters'})")
        keys = list(spec.sweep)
        points = sweep_points(spec, where)
        if len(trials) + len(points) * len(suite.seeds) > MAX_TRIALS:
            raise ConfigError(f"{where}: {len(points)} sweep points x {len(suite.seeds)} seeds make the suite more "
                              f"than {MAX_TRIALS} trials")
        for point in points:
            values = {**spec.params, **dict(zip(keys, point))}
            try:
                params = _build_params(algo.params_cls, values)
            except ParamError as e:
                section = "sweep" if e.field in spec.sweep else "params"
                raise ConfigError(f"{where}.{section}.{_key(e.field)}: {e.message}") from None
            except (TypeError, ValueError) as e:  # a plugin's own check that is not a ParamError
                raise ConfigError(f"{where}.params: {spec.name}: {first_line(e)}") from None
            chunk = getattr(params, "rollout_chunk", None)  # the on-policy algorithms' generation calls
            per_worker = train.batch_size // suite.scaling.num_workers
            if isinstance(chunk, int) and chunk < per_worker and per_worker % chunk:
                section = "sweep" if "rollout_chunk" in spec.sweep else "params"
                raise ConfigError(f"{where}.{section}.rollout_chunk: {chunk} must divide the per-worker batch "
                                  f"{per_worker} (train.batch_size / scaling.num_workers) or be above it")
            params_dict = dataclasses.asdict(params)
            knob = spec.knob or algo.knob
            if knob is not None and knob not in params_dict:
                raise ConfigError(f"{where}.knob: {spec.name} has no parameter {_show(knob)}")
            knob_value = params_dict.get(knob) if knob else None
            if knob_value is not None and (isinstance(knob_value, bool) or not isinstance(knob_value, (int, float))):
                raise ConfigError(f"{where}.knob: {knob} must be a number to be a frontier knob, got {_show(knob_value)}")
            for seed in suite.seeds:
                label = ",".join(f"{k}={v}" for k, v in zip(keys, point))
                trial_id = f"{spec.name}-" + (f"{label}-" if label else "") + f"seed{seed}"
                if trial_id in seen:
                    raise ConfigError(f"{where}: duplicates trial {trial_id}")
                seen.add(trial_id)
                trials.append(TrialSpec(
                    trial_id=trial_id, algorithm=spec.name, params=params_dict,
                    train=dataclasses.asdict(train), seed=seed, knob=knob,
                    knob_value=float(knob_value) if knob_value is not None else None,
                ))
    return trials


def to_yaml(suite: SuiteConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(suite))), sort_keys=False)
