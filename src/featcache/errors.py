"""Errors a user can cause.

Every exception here is printed by the CLI as one line ``error: <message>`` with exit
status 2 (``--debug`` shows the traceback).  Library code raises them with a message that
says what is wrong and, where possible, how to fix it.
"""

from __future__ import annotations


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


class RunLockedError(FeatcacheError):
    """Another writer holds a run folder's or an ablation folder's lock."""


class BackboneError(FeatcacheError):
    """A backbone or its weights cannot be built or loaded."""


class SampleError(FeatcacheError):
    """One sample cannot be read (raised only with ``--on-error raise``)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
