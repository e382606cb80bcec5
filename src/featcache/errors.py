"""Errors a user can cause.

Every exception here is printed by the CLI as one line ``error: <message>`` with exit
status 2 (``--debug`` shows the traceback).  Library code raises them with a message that
says what is wrong and, where possible, how to fix it.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

#: Who is calling: ``"python"`` (the library's callers) or ``"cli"`` (set by ``featcache.cli.main``).
#: Error messages name the option as that caller wrote it (:func:`option`).
CALLER: ContextVar[str] = ContextVar("featcache_caller", default="python")


@contextmanager
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


class CacheDamageError(CacheError):
    """Part of a cache is missing, truncated or undecodable; ``where`` names it (``meta/gender``,
    ``parts/00002/features``), ``what`` says what is wrong."""

    def __init__(self, message: str, where: str = "", what: str = ""):
        super().__init__(message)
        self.where, self.what = where, what


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


# -- writing files: one line for a full disk or a wrong --out ------------------------------------
class OutputError(FeatcacheError):
    """An output cannot be written: a file where a folder is expected, a parent that cannot be
    written, an existing file without ``--overwrite``."""


class DiskFullError(OutputError):
    """A write ran out of disk space (ENOSPC) or quota (EDQUOT); what it wrote was removed."""


_FULL_ERRNOS = {_errno.ENOSPC, _errno.EDQUOT}
#: How safetensors (Rust) words a full disk in the SafetensorError it raises instead of OSError, and
#: HDF5 in an OSError without an errno.
_FULL_TEXT = re.compile(r"os error (28|122)\b|code: (28|122)\b|errno = (28|122)\b|StorageFull|QuotaExceeded|No space left|quota exceeded",
                        re.IGNORECASE)


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, MiB, GiB or TiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the file system that holds ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, whether an ``OSError`` or safetensors' ``SafetensorError``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _FULL_ERRNOS
    # safetensors' SafetensorError, and h5py's OSError without an errno, say it in words
    return ((isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError")
            and bool(_FULL_TEXT.search(str(exc))))


def write_error(exc: BaseException, path: str | os.PathLike, need: int | None = None) -> FeatcacheError | None:
    """The one-line error for ``exc`` raised while writing ``path`` (``need`` bytes in all), or
    None when ``exc`` is not a failed write (a bug, Ctrl-C) and must propagate as it is."""
    if isinstance(exc, FeatcacheError):
        return None
    if is_disk_full(exc):
        free = free_bytes(path)
        has = f"{human_bytes(free)} free" if free is not None else "its free space unknown"
        short = need - free if need is not None and free is not None and need > free else None
        needs = (f"it needs about {human_bytes(need)}, " if need is not None else "") + has + (
            f": free at least {human_bytes(short)}" if short else ": free some space")
        return DiskFullError(f"no space left on the disk of {path} ({needs}) and rerun, or write elsewhere")
    if isinstance(exc, OSError):
        reason = exc.strerror or first_line(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        return OutputError(f"cannot write {path}: {reason}{where}")
    return None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def writing(path: str | os.PathLike, *, need: int | None = None, partial=()):
    """Write ``path`` inside this block: a full disk or any other failed write becomes one
    :class:`OutputError` line (:func:`write_error`), and every path in ``partial`` (the
    temporaries the block was writing) is removed first, so nothing half-written stays behind
    to be taken for finished. Every writer of featcache goes through here."""
    try:
        yield
    except BaseException as exc:
        for p in partial:
            _remove(Path(p))
        err = write_error(exc, path, need)
        if err is None:
            raise
        raise err from exc


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through ``path.tmp`` and a rename: a kill or a full disk never
    leaves half a file under the final name (:func:`writing`)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, need=len(raw), partial=[tmp]):
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    return path


def check_out(path: str | os.PathLike, *, kind: str = "folder", overwrite: bool = True, option: str = "--out",
              files=()) -> Path:
    """Refuse a wrong output path in one line, before any work: a file where a folder is
    expected (``kind="folder"``) or the reverse, an existing file without ``overwrite``
    (``kind="file"``; for a folder, any of the ``files`` it would write), or a parent that is a
    file or cannot be written. Returns the path."""
    path = Path(path)
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be folder or file, got {kind!r}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a folder")
    held = [f for f in files if (path / f).exists()] if kind == "folder" and not overwrite else []
    if held:
        raise OutputError(f"{path} already holds {', '.join(held)}; pass --overwrite to replace "
                          f"{'them' if len(held) > 1 else 'it'}, or choose another {option}")
    if kind == "file":
        if path.is_dir():
            raise OutputError(f"{option} {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite to replace it, or choose another {option}")
    parent = path if kind == "folder" and path.is_dir() else path.absolute().parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot write {option} {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {option} {path}: {p} is not writable")
            break
    return path
