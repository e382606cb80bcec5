"""One small registry type, shared by backbones, tasks and dataset adapters."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import import_module

from .errors import FeatcacheError


class Registry:
    """Name -> class (or function), filled by a decorator; unknown names are one clear error.

    ``modules`` are imported on first lookup so that their ``@registry.register(...)``
    decorators run; ``error`` is the exception class for an unknown name.
    """

    def __init__(self, what: str, modules: tuple[str, ...] = (), error: type[Exception] = FeatcacheError):
        self.what = what
        self.modules = modules
        self.error = error
        self._items: dict[str, object] = {}

    def register(self, name: str) -> Callable:
        def deco(obj):
            old = self._items.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (obj.__module__, obj.__qualname__):
                raise ValueError(f"a {self.what} named {name!r} is already registered ({old.__module__})")
            if isinstance(obj, type):
                obj.name = name
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        for module in self.modules:
            import_module(module)

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
