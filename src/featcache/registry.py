"""One small registry type, shared by backbones, tasks and dataset adapters.

A registry may also take names from other installed packages: with ``entry_points`` (a group name,
e.g. ``featcache.tasks``), each entry point of that group is loaded on first lookup; loading it
imports its module, whose ``@register(...)`` decorator registers it, and an object that did not
register itself is registered under the entry point's name. A package outside featcache adds a task
with one line in its ``pyproject.toml``::

    [project.entry-points."featcache.tasks"]
    mytask = "mypackage.task:MyTask"
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points

from .errors import FeatcacheError


class Registry:
    """Name -> class (or function), filled by a decorator; unknown names are one clear error.

    ``modules`` are imported on first lookup so that their ``@registry.register(...)``
    decorators run; ``error`` is the exception class for an unknown name; ``entry_points`` a group
    of installed packages' entry points loaded then too; ``on_register(name, obj)`` runs for each
    registration (the task registry records a plugin task's config file with it).
    """

    def __init__(self, what: str, modules: tuple[str, ...] = (), error: type[Exception] = FeatcacheError,
                 entry_points: str | None = None, on_register: Callable | None = None):
        self.what = what
        self.on_register = on_register
        self.modules = modules
        self.error = error
        self.group = entry_points
        self._items: dict[str, object] = {}
        self._plugins_loaded = False

    def register(self, name: str) -> Callable:
        def deco(obj):
            old = self._items.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (obj.__module__, obj.__qualname__):
                raise ValueError(f"a {self.what} named {name!r} is already registered ({old.__module__})")
            if isinstance(obj, type):
                obj.name = name
            self._items[name] = obj
            if self.on_register is not None:
                self.on_register(name, obj)
            return obj

        return deco

    def _load(self) -> None:
        for module in self.modules:
            import_module(module)
        if self.group and not self._plugins_loaded:
            self._plugins_loaded = True
            for ep in entry_points(group=self.group):
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plugin is named, not a traceback from deep inside
                    raise self.error(f"the {self.what} {ep.name!r} of entry point {ep.value!r} "
                                     f"({self.group}) cannot be loaded: {type(exc).__name__}: {exc}") from exc
                if ep.name not in self._items:
                    self.register(ep.name)(obj)

    def get(self, name: str):
        self._load()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown {self.what} {name!r}{hint}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)
