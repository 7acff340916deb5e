"""The arrows docs/design.md promises, read off the code's imports: algorithms/ and envs/ never import
bench/; exactly one module (bench/run/ray_runner.py) imports Ray; no import circle among the modules
of bench/, algorithms/ and envs/ (imports inside functions included: a lazy import is still an arrow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "algorithms", "envs")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module → the modules it imports (absolute names, as written)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            names = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names |= {f"{node.module}.{a.name}" for a in node.names}  # `from bench.run import driver`
            out[_module(path)] = names
    return out


def test_algorithms_and_envs_never_import_bench():
    wrong = {m: sorted(n for n in names if n == "bench" or n.startswith("bench."))
             for m, names in _imports().items() if m.split(".")[0] in ("algorithms", "envs")}
    assert {m: n for m, n in wrong.items() if n} == {}


def test_exactly_one_module_imports_ray():
    users = sorted(m for m, names in _imports().items() if any(n == "ray" or n.startswith("ray.") for n in names))
    assert users == ["bench.run.ray_runner"]


def test_no_import_circle():
    imports = _imports()
    modules = set(imports)
    graph = {m: {n for n in names if n in modules and n != m and not m.startswith(n + ".")} for m, names in imports.items()}
    # a package's __init__ is not an arrow to its own submodules' importers: drop package → own child edges
    graph = {m: {n for n in targets if not n.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_evaluator_and_the_report_depend_on_contracts_not_on_plugins_or_the_run_path():
    """bench.evaluate imports no algorithm's module (best-of-n is a RerankingSampler to it); the report
    (rebuilt from the parquet files alone) imports nothing of the run path."""
    from algorithms import ALGORITHMS

    imports = _imports()
    plugins = {type(ALGORITHMS.get(name)).__module__ for name in ALGORITHMS.names()}
    assert "algorithms.best_of_n" in plugins
    assert sorted(imports["bench.evaluate"] & plugins) == []
    report = {m: sorted(n for n in names if n.startswith(("bench.run", "bench.worker")))
              for m, names in imports.items() if m.startswith("bench.report")}
    assert {m: n for m, n in report.items() if n} == {}
