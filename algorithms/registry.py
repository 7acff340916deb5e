"""Name → plugin registries, shared by algorithms and envs.

In-tree modules register themselves on import (`ALGORITHMS.register(DPO())`). Out-of-tree
packages declare an entry point in the group `prefbench.algorithms` (or `prefbench.envs`) whose
object is the plugin instance (or a zero-argument factory returning one). A plugin that fails to
load is remembered by name with its error, never fatal for unrelated runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any


@dataclass
class Registry:
    kind: str  # "algorithm" or "env"
    group: str  # entry-point group
    package: str  # in-tree package scanned for modules
    _items: dict[str, Any] = field(default_factory=dict)
    _origin: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # name -> one-line error
    _loaded: bool = False

    def register(self, plugin: Any, *, origin: str = "in-tree") -> Any:
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} plugin {plugin!r} has no string `name`")
        self._items[name] = plugin
        self._origin[name] = origin
        return plugin

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
                self.broken[f"{self.package}.{mod.name}"] = f"{type(e).__name__}: {e}"
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
                plugin = obj() if callable(obj) and not hasattr(obj, "name") else obj
                self.register(plugin, origin=f"package {ep.dist.name if ep.dist else ep.value}")
            except Exception as e:
                self.broken[ep.name] = f"{type(e).__name__}: {e}"

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._items:
            if name in self.broken:
                raise KeyError(f"{self.kind} {name!r} failed to load: {self.broken[name]}")
            raise KeyError(f"unknown {self.kind} {name!r} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        self._load()
        return self._origin[name]
