"""Errors a user can cause.

Every exception here is printed by the CLI as one line ``error: <message>`` with exit
status 2 (``--debug`` shows the traceback).  Library code raises them with a message that
says what is wrong and, where possible, how to fix it.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

#: Who is calling: ``"python"`` (the library's callers) or ``"cli"`` (set by ``featcache.cli.main``).
#: Error messages name the option as that caller wrote it (:func:`option`).
CALLER: ContextVar[str] = ContextVar("featcache_caller", default="python")


@contextlib.contextmanager
def called_from(caller: str):
    """Within the block, error messages spell options for ``caller`` (``"cli"`` or ``"python"``)."""
    token = CALLER.set(caller)
    try:
        yield
    finally:
        CALLER.reset(token)


def option(name: str, value: str | bool = True, *, python: str | None = None) -> str:
    """An option as the caller writes it: ``--overwrite`` / ``--stage1 RUN`` on the command line;
    ``overwrite=True`` (or ``python``, e.g. ``options={'stage1': RUN}``) from Python. ``name`` is
    the Python keyword (underscores); the flag is derived from it."""
    if CALLER.get() == "cli":
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {value}"
    return python or f"{name}={value!r}"


def set_option(item: str) -> str:
    """One ``section.key=value`` override as the caller wrote it: ``--set training.epochs=0`` or
    ``sets=['training.epochs=0']``."""
    return f"--set {item}" if CALLER.get() == "cli" else f"sets=[{item!r}]"


class FeatcacheError(Exception):
    """Base class of the errors a user can cause (bad input, stale cache, missing weights)."""

    exit_code = 2


class ManifestError(FeatcacheError):
    """A manifest is malformed: missing column, unknown value, duplicate id, missing file."""


class CacheError(FeatcacheError):
    """A cache is missing, incomplete, corrupt or belongs to another extraction."""


class StaleCacheError(CacheError):
    """An existing cache was made from another manifest, backbone or preprocessing."""


class CacheLockedError(CacheError):
    """Another writer holds the cache's lock."""


class BackboneError(FeatcacheError):
    """A backbone or its weights cannot be built or loaded."""


class SampleError(FeatcacheError):
    """One sample cannot be read (raised only with ``--on-error raise``)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
