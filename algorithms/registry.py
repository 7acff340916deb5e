"""Name → plugin registries, shared by algorithms and envs.

Two ways in, both discovered the first time a registry is asked for a name:

- in-tree: a module in the registry's package (`algorithms/`, `envs/`) that registers an instance
  on import: `ALGORITHMS.register(DPO())`;
- out-of-tree: an installed distribution declaring an entry point in the group
  `prefbench.algorithms` (or `prefbench.envs`) whose object is the plugin instance, its class, or a
  zero-argument factory returning it.

Every plugin is checked against its contract (`algorithms.interface.contract_problems`,
`envs.base.contract_problems`) when it registers. A plugin that fails to import, breaks the
contract or takes a name already registered is remembered in `broken` with a one-line reason and
left out; unrelated runs go on, and a suite that names it gets that reason as its error.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable


@dataclass
class Registry:
    kind: str  # "algorithm" or "env"
    group: str  # entry-point group
    package: str  # in-tree package scanned for modules
    contract: str  # "module:function" returning a list of contract problems (strings) for a plugin
    _items: dict[str, Any] = field(default_factory=dict)
    _origin: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # plugin (or module / entry point) name -> one-line reason
    _loaded: bool = False

    def register(self, plugin: Any, *, origin: str | None = None) -> Any:
        """Add `plugin` under its `name`, or record why it cannot be added (never raises)."""
        name = getattr(plugin, "name", None)
        label = name if isinstance(name, str) and name else f"{type(plugin).__module__}.{type(plugin).__name__}"
        if origin is None:  # called from an in-tree module's import
            origin = f"in-tree ({type(plugin).__module__})"
        problems = self._problems(plugin)
        if not problems and name in self._items:
            problems = [f"name {name!r} is already taken by {self._origin[name]}"]
        if problems:
            self.broken[label] = f"breaks the {self.kind} contract ({origin}): " + "; ".join(problems)
            return plugin
        self._items[name] = plugin
        self._origin[name] = origin
        return plugin

    def _problems(self, plugin: Any) -> list[str]:
        module, func = self.contract.split(":")
        check: Callable[[Any], list[str]] = getattr(importlib.import_module(module), func)
        try:
            return check(plugin)
        except Exception as e:  # a plugin whose attributes raise on access breaks the contract too
            return [f"{type(e).__name__}: {first_line(e)}"]

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name.startswith("_"):
                continue
            try:
                importlib.import_module(f"{self.package}.{mod.name}")
            except Exception as e:  # a broken in-tree module must not hide the others
                self.broken[f"{self.package}.{mod.name}"] = f"failed to import: {type(e).__name__}: {first_line(e)}"
        for ep in entry_points(group=self.group):
            origin = f"package {ep.dist.name} {ep.dist.version}" if ep.dist else f"entry point {ep.value}"
            try:
                obj = ep.load()
                plugin = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "name")) else obj
            except Exception as e:
                self.broken[ep.name] = f"failed to load ({origin}, {ep.value}): {type(e).__name__}: {first_line(e)}"
                continue
            self.register(plugin, origin=origin)

    def get(self, name: str) -> Any:
        self._load()
        if name in self._items:
            return self._items[name]
        if name in self.broken:
            raise KeyError(f"{self.kind} plugin {name!r} {self.broken[name]}")
        known = f"unknown {self.kind} {name!r} (known: {', '.join(sorted(self._items))})"
        if self.broken:  # it may be one of these, under another name
            known += "; plugins that failed to load: " + ", ".join(sorted(self.broken))
        raise KeyError(known)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        self._load()
        return self._origin[name]


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def name_problems(name: Any) -> list[str]:
    """A plugin's name is what suites write and part of trial ids and directory names."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        return [f"name must be a string of letters, digits, '-', '_' or '.', got {name!r}"]
    return []


def dataclass_problems(params_cls: Any) -> list[str]:
    """`params_cls` must be a dataclass whose every field has a default (it is built from a suite's dict)."""
    import dataclasses

    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        return [f"params_cls must be a dataclass, got {params_cls!r}"]
    missing = [f.name for f in dataclasses.fields(params_cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        return [f"params_cls field(s) without a default: {', '.join(missing)}"]
    try:
        params_cls()
    except Exception as e:
        return [f"params_cls() with its defaults raises {type(e).__name__}: {first_line(e)}"]
    return []
