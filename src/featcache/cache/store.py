"""The cache on disk: layout, fingerprint, lock and writer (DESIGN.md, "Cache").

A cache is one Zarr v3 group::

    NAME/zarr.json          attributes (format_version, kind, backbone, preprocess, manifest,
                            part_rows, n_parts, fingerprint, complete, ...)
    NAME/meta/<column>      one 1-D array per manifest column, written before any part
    NAME/parts/00000/       part i: rows [i * part_rows, (i + 1) * part_rows); written into
                            parts/00000.tmp/ by exactly one writer and renamed when whole
    NAME/errors.jsonl       one line per sample that could not be read
    NAME/.lock              held (flock) while a writer works on the cache; under
                            torch.distributed rank 0 holds it for the whole run and the
                            other ranks join as members of that run (CacheWriter(member_of=))

Every chunk is stored, empty ones included, so that a missing chunk is detectable: Zarr
would otherwise read it back as its fill value.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from .. import __version__
from ..errors import CacheDamageError, CacheError, CacheLockedError, StaleCacheError, write_atomic, writing
from .arrays import ArrayFile

FORMAT_VERSION = 1
DEFAULT_PART_ROWS = 4096
#: Target size of one chunk; parts larger than this are split along their first axis.
CHUNK_BYTES = 16 * 2**20

#: Arrays of a part per cache kind, and how their first axis relates to the part's rows n:
#: "row" has n rows, "offsets" n + 1, "flat" as many as the part's last offset.
KIND_ARRAYS: dict[str, dict[str, str]] = {
    "pooled": {"features": "row"},
    "frames": {"frames": "flat", "offsets": "offsets", "frame_labels": "flat"},
    "queries": {"hidden": "row", "logits": "row", "boxes": "row", "image_size": "row",
                "offsets": "offsets", "gt_boxes": "flat", "gt_classes": "flat"},  # ground truth per image
}
#: The attributes that determine the arrays; the fingerprint is their sha256.
FINGERPRINT_KEYS = ("format_version", "kind", "backbone", "preprocess", "manifest", "part_rows")

ERRORS_FILE = "errors.jsonl"
PART_ERRORS_FILE = "errors.jsonl"
LOCK_FILE = ".lock"


def part_name(index: int) -> str:
    return f"{index:05d}"


def n_parts_for(rows: int, part_rows: int) -> int:
    return (rows + part_rows - 1) // part_rows


def part_bounds(index: int, rows: int, part_rows: int) -> tuple[int, int]:
    start = index * part_rows
    return start, min(start + part_rows, rows)


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(spec: dict) -> str:
    """sha256 of the attributes that determine the arrays (:data:`FINGERPRINT_KEYS`)."""
    missing = [k for k in FINGERPRINT_KEYS if k not in spec]
    if missing:
        raise ValueError(f"fingerprint spec lacks {missing}")
    return hashlib.sha256(_canonical_json({k: spec[k] for k in FINGERPRINT_KEYS}).encode()).hexdigest()


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def describe_differences(old: dict, new: dict) -> list[str]:
    """Human-readable list of the fingerprinted attributes that differ between two specs."""
    a = _flatten({k: old.get(k) for k in FINGERPRINT_KEYS})
    b = _flatten({k: new.get(k) for k in FINGERPRINT_KEYS})
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _canonical_json(a.get(key)) != _canonical_json(b.get(key)):
            if key == "manifest.sha256":
                diffs.append("the manifest's contents changed")
            else:
                diffs.append(f"{key}: {a.get(key)!r} in the cache, {b.get(key)!r} now")
    return diffs


def is_cache(path: Path) -> bool:
    """True when ``path`` holds a featcache cache (complete or not)."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return "format_version" in attrs


def read_attrs(path: Path) -> dict:
    try:
        return dict(json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {}))
    except FileNotFoundError:
        raise CacheError(f"{path} is not a featcache cache (no zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: cannot read zarr.json ({exc})") from None


class CacheLock:
    """An exclusive advisory lock on ``CACHE/.lock`` (or any folder's ``.lock``: run and ablation
    folders are locked the same way, with ``error`` their own error type).

    ``flock`` is released by the kernel when its holder dies, so a cache left by a killed
    extraction can be resumed at once, while a live second writer is refused with one line that
    names the holder (pid, host, start time and command, as recorded in the lock file).
    """

    def __init__(self, root: Path, *, error: type[Exception] = CacheLockedError):
        self.path = Path(root) / LOCK_FILE
        self.error = error
        self.fd: int | None = None
        self.member_ino: int | None = None
        self.member_run: str | None = None

    def acquire(self, run: str | None = None) -> CacheLock:
        """Take the lock exclusively; ``run`` (a token shared by the ranks of one distributed
        run) is recorded in the lock file so that the other ranks can join (:meth:`join`)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise self.error(
                    f"{self.path.parent} is being written by another process ({holder}); "
                    "wait for it to finish or stop it (a lock left by a killed process is released by itself)"
                ) from None
            # The previous holder may have unlinked the file between our open and our lock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
        if run is not None:
            holder["run"] = run
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd
        return self

    def join(self, run: str) -> CacheLock:
        """Join the distributed run ``run`` whose rank 0 holds the lock, without taking it.

        ``flock`` belongs to one process, so the ranks of a run cannot all hold it: rank 0
        holds it exclusively, and each other rank checks that the lock is held and that the
        holder recorded this run's token. A process of any other run is refused.
        """
        fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
            text = os.read(fd, 4096).decode(errors="replace")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
            ino = os.fstat(fd).st_ino
        except FileNotFoundError:
            text, held, ino = "", False, None
        finally:
            if fd is not None:
                os.close(fd)
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        if not held or holder.get("run") != run:
            who = f"another process ({text.strip()})" if held else "no process"
            raise CacheLockedError(
                f"{self.path.parent}: cannot join distributed run {run}: the lock is held by {who}"
            )
        self.member_ino, self.member_run = ino, run
        return self
    def check(self) -> None:
        """Raise unless the lock file on disk is still the one this process holds (or joined).

        A member (a rank joined to rank 0's run) checks again that the lock is held, by its run:
        if rank 0 died, another writer could take the cache, so this rank must stop writing.
        """
        if self.member_run is not None:
            ino = self.member_ino
            self.join(self.member_run)
            if self.member_ino != ino:
                raise CacheLockedError(f"{self.path} was removed or replaced while this process held it")
            return
        try:
            held = self.fd is not None and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            held = False
        if not held:
            raise CacheLockedError(f"{self.path} was removed or replaced while this process held it")

    def release(self) -> None:
        self.member_ino = self.member_run = None
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _chunks_for(arr: np.ndarray) -> tuple[int, ...]:
    if arr.ndim == 0 or arr.shape[0] == 0:
        return tuple(max(1, s) for s in arr.shape)
    row_bytes = max(1, arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, min(arr.shape[0], CHUNK_BYTES // row_bytes))
    return (rows,) + tuple(max(1, s) for s in arr.shape[1:])


def write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    """Write one whole array with every chunk stored (fill-valued chunks too).

    Floating-point arrays (features) are stored uncompressed: zstd saves under 10 % on them
    and makes loading about 3.5 times slower (benchmarks/bench_extract.py). Strings and
    integers keep Zarr's default compressor.
    """
    data = np.asarray(data)
    kwargs = {}
    if data.dtype.kind in ("U", "O", "T"):
        data = data.astype(str)
        dtype = str
    else:
        dtype = data.dtype
        if dtype.kind == "f":
            kwargs["compressors"] = None
    arr = group.create_array(name, shape=data.shape, dtype=dtype, chunks=_chunks_for(data),
                             config={"write_empty_chunks": True}, **kwargs)
    if data.size:
        arr[...] = data


def part_damage(root: Path, index: int, kind: str, rows: int) -> str:
    """What is wrong with part ``index`` of ``rows`` rows ('' when whole): an array missing, a
    chunk missing, truncated or undecodable, or a row count that disagrees (:class:`.arrays.ArrayFile`).

    Plain-byte chunks (features) are checked by their size, the others decoded (flags, offsets:
    small), so the check of a resumed cache reads no features.
    """
    root = Path(root).resolve()
    prefix = f"parts/{part_name(index)}"
    where = root / "parts" / part_name(index)
    if not (where / "zarr.json").is_file():
        return f"{prefix}: " + ("its zarr.json is missing" if where.is_dir() else "the part is missing")
    try:
        flat = None
        if "offsets" in KIND_ARRAYS[kind]:
            off = ArrayFile(where / "offsets", f"{prefix}/offsets", root).read()
            if off.shape != (rows + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
                return f"{prefix}/offsets: not {rows + 1} non-decreasing values from 0"
            flat = int(off[-1])
        for name, rel in [*KIND_ARRAYS[kind].items(), ("ok", "row")]:
            arr = ArrayFile(where / name, f"{prefix}/{name}", root)
            want = {"row": rows, "offsets": rows + 1, "flat": flat}[rel]
            if arr.shape[0] != want:
                return f"{prefix}/{name}: {arr.shape[0]} rows, expected {want}"
            arr.check(read=False)
    except CacheDamageError as exc:
        return f"{exc.where}: {exc.what}"
    except CacheError as exc:
        return str(exc)
    return ""


def meta_damage(root: Path, name: str, want: np.ndarray) -> str:
    """What is wrong with meta column ``name`` ('' when it holds ``want``): missing, truncated,
    undecodable, or values that differ from the manifest's."""
    root = Path(root).resolve()
    try:
        got = ArrayFile(root / "meta" / name, f"meta/{name}", root).read()
    except CacheDamageError as exc:
        return exc.what
    except CacheError as exc:
        return str(exc)
    if got.shape != want.shape:
        return f"{got.shape[0]} of {want.shape[0]} rows"
    if got.dtype == object:
        got = got.astype(str)
    return "" if np.array_equal(got, want) else "values differ from the manifest's"


def meta_arrays(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Manifest columns as 1-D arrays: strings, label and subgroup as int8."""
    out = {}
    for col in df.columns:
        values = df[col].to_numpy()
        if col in ("label", "subgroup"):
            out[col] = values.astype(np.int8)
        else:
            out[col] = np.array(["" if v is None else str(v) for v in values], dtype=str)
    return out


@dataclass
class CacheSpec:
    """What determines a cache's arrays: the fingerprinted attributes."""

    kind: str
    backbone: dict
    preprocess: dict
    manifest_sha256: str
    rows: int
    part_rows: int = DEFAULT_PART_ROWS

    def __post_init__(self):
        if self.kind not in KIND_ARRAYS:
            raise ValueError(f"unknown cache kind {self.kind!r}")
        if self.part_rows < 1:
            raise CacheError(f"--part-rows must be at least 1, got {self.part_rows}")

    def attrs(self) -> dict:
        attrs = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "backbone": self.backbone,
            "preprocess": self.preprocess,
            "manifest": {"sha256": self.manifest_sha256, "rows": self.rows},
            "part_rows": self.part_rows,
        }
        # Round-trip through JSON so the comparison with stored attributes is like for like.
        attrs = json.loads(_canonical_json(attrs))
        attrs["fingerprint"] = fingerprint(attrs)
        return attrs

    @property
    def n_parts(self) -> int:
        return n_parts_for(self.rows, self.part_rows)


class CacheWriter:
    """Creates or resumes a cache and writes its parts; one instance per writing process.

    Use as a context manager::

        with CacheWriter(path, spec, manifest_df) as w:
            for i in w.missing_parts():
                w.write_part(i, {"features": f}, ok, errors)
            w.finalize()

    Under torch.distributed, rank 0 opens with ``run=TOKEN`` (it takes the lock, checks the
    fingerprint, writes the meta arrays and later finalizes) and, once it has, every other
    rank opens with ``member_of=TOKEN``: it joins without re-initialising and writes only its
    own parts. Each part still has exactly one writer.
    """

    def __init__(self, path, spec: CacheSpec, meta: pd.DataFrame, *, overwrite: bool = False,
                 run: str | None = None, member_of: str | None = None):
        self.path = Path(path).resolve()  # zarr 3.1 miscounts chunks under a relative root
        self.spec = spec
        self.meta = meta
        self.overwrite = overwrite
        self.run = run
        self.member_of = member_of
        self.attrs = spec.attrs()
        self.lock = CacheLock(self.path)
        self.resumed = False
        self.repaired: list[int] = []  # parts found damaged on resume, deleted to be computed again
        self.repaired_meta: list[str] = []  # meta columns found damaged on resume, written again
        if len(meta) != spec.rows:
            raise ValueError("meta rows differ from spec rows")

    # -- opening ---------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self) -> None:
        if self.member_of is not None:
            self._join()
            return
        p = self.path
        if p.exists() and not p.is_dir():
            raise CacheError(f"{p} exists and is not a directory")
        if p.is_dir() and not is_cache(p) and any(c.name != LOCK_FILE for c in p.iterdir()):
            raise CacheError(f"{p} exists, is not empty and is not a featcache cache; choose a new --out")
        with writing(p):  # a parent that is a file or cannot be written: one line
            p.mkdir(parents=True, exist_ok=True)
        self.lock.acquire(self.run)
        try:
            self._prepare()
            self.lock.check()
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self) -> None:
        old = read_attrs(self.path) if is_cache(self.path) else None
        if old is not None and "fingerprint" in old:
            if old["fingerprint"] == self.attrs["fingerprint"]:
                self.resumed = True
                for tmp in (self.path / "parts").glob("*.tmp"):
                    shutil.rmtree(tmp)
                self._repair_meta()
                self._remove_damaged_parts()
                return
            if not self.overwrite:
                diffs = describe_differences(old, self.attrs) or ["the fingerprint"]
                raise StaleCacheError(
                    f"{self.path} was made by another extraction ({'; '.join(diffs)}); "
                    "pass --overwrite to replace it, or choose a new --out"
                )
        # New cache, an initialisation that was interrupted, or --overwrite: start afresh.
        self._clear()
        # mode "a" (create, never delete), not "w": "w" empties the whole directory, the lock
        # file included, which would let a second writer in; _clear() already emptied the rest.
        arrays = meta_arrays(self.meta)
        # A full disk here leaves no fingerprint: the next run starts afresh.
        with writing(self.path / "meta", need=sum(v.nbytes for v in arrays.values())):
            root = zarr.open_group(LocalStore(self.path), mode="a", attributes={"format_version": FORMAT_VERSION})
            meta = root.create_group("meta")
            for col, values in arrays.items():
                write_array(meta, col, values)
            root.create_group("parts")
            (self.path / ERRORS_FILE).write_text("")
        attrs = dict(self.attrs)
        attrs.update(n_parts=self.spec.n_parts, featcache_version=__version__, meta_columns=list(self.meta.columns),
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     complete=False)
        # The fingerprint is written last: a cache without one is an unfinished initialisation.
        root.attrs.update(attrs)

    def _join(self) -> None:
        self.lock.join(self.member_of)
        old = read_attrs(self.path) if is_cache(self.path) else {}
        if old.get("fingerprint") != self.attrs["fingerprint"]:
            diffs = describe_differences(old, self.attrs) or ["the fingerprint"]
            raise StaleCacheError(f"{self.path}: this rank's extraction differs from rank 0's ({'; '.join(diffs)})")
        self.resumed = True

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def close(self) -> None:
        self.lock.release()

    def _repair_meta(self) -> None:
        """Write again each meta column that is missing, damaged or differs from the manifest's
        (the manifest is the one the fingerprint names, so its columns are the truth)."""
        want = meta_arrays(self.meta)
        if (self.path / "meta" / "zarr.json").is_file():
            bad = [col for col, values in want.items() if meta_damage(self.path, col, values)]
        else:  # the group itself is gone: write it and every column again
            bad = list(want)
        stored = read_attrs(self.path)
        if not bad and stored.get("meta_columns") == list(want):
            return
        root = zarr.open_group(LocalStore(self.path), mode="r+")
        if bad:
            root.attrs.update({"complete": False})  # a run killed before the rewrite leaves a cache that says so
            if not (self.path / "meta" / "zarr.json").is_file():
                shutil.rmtree(self.path / "meta", ignore_errors=True)
                root.create_group("meta")
            meta = root["meta"]
            for col in bad:
                shutil.rmtree(self.path / "meta" / col, ignore_errors=True)
                with writing(self.path / "meta" / col, need=want[col].nbytes, partial=[self.path / "meta" / col]):
                    write_array(meta, col, want[col])
        root.attrs.update({"meta_columns": list(want)})
        self.repaired_meta = sorted(bad)

    def _remove_damaged_parts(self) -> None:
        """Delete each existing part that is damaged (:func:`part_damage`), so that it is computed again.

        The cache is marked incomplete first: a run killed in between leaves a cache that says so.
        """
        damaged = [i for i in sorted(self.done_parts())
                   if part_damage(self.path, i, self.spec.kind, self.part_bounds(i)[1] - self.part_bounds(i)[0])]
        if not damaged:
            return
        root = zarr.open_group(LocalStore(self.path), mode="r+")
        root.attrs.update({"complete": False})
        for i in damaged:
            shutil.rmtree(self.path / "parts" / part_name(i))
        self.repaired = damaged

    # -- parts -----------------------------------------------------------------------------
    def done_parts(self) -> set[int]:
        parts = self.path / "parts"
        return {int(d.name) for d in parts.iterdir() if d.is_dir() and d.name.isdigit()} if parts.is_dir() else set()

    def missing_parts(self) -> list[int]:
        done = self.done_parts()
        return [i for i in range(self.spec.n_parts) if i not in done]

    def part_bounds(self, index: int) -> tuple[int, int]:
        return part_bounds(index, self.spec.rows, self.spec.part_rows)

    def write_part(self, index: int, arrays: dict[str, np.ndarray], ok: np.ndarray,
                   errors: list[dict] | None = None) -> None:
        """Write part ``index`` under a temporary name, then rename it into place."""
        start, stop = self.part_bounds(index)
        n = stop - start
        expected = KIND_ARRAYS[self.spec.kind]
        if set(arrays) != set(expected):
            raise ValueError(f"a {self.spec.kind} part holds {sorted(expected)}, got {sorted(arrays)}")
        if len(ok) != n:
            raise ValueError(f"part {index} has {n} rows, ok has {len(ok)}")
        self.lock.check()
        tmp = self.path / "parts" / (part_name(index) + ".tmp")
        final = self.path / "parts" / part_name(index)
        if tmp.exists():
            shutil.rmtree(tmp)
        need = sum(np.asarray(a).nbytes for a in arrays.values()) + n
        # A full disk: the half-written part is removed and never renamed into place.
        with writing(final, need=need, partial=[tmp]):
            group = zarr.open_group(LocalStore(tmp), mode="w", attributes={"start": start, "stop": stop})
            for name, data in arrays.items():
                write_array(group, name, data)
            write_array(group, "ok", np.asarray(ok, dtype=bool))
            with open(tmp / PART_ERRORS_FILE, "w") as fh:
                for rec in errors or []:
                    fh.write(json.dumps(rec) + "\n")
            os.rename(tmp, final)

    def part_errors(self, index: int) -> list[dict]:
        f = self.path / "parts" / part_name(index) / PART_ERRORS_FILE
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    def failed_rows(self) -> int:
        """Rows recorded as unreadable over the parts written so far (their errors.jsonl lines)."""
        total = 0
        for i in self.done_parts():
            f = self.path / "parts" / part_name(i) / PART_ERRORS_FILE
            if f.is_file():
                with open(f, "rb") as fh:
                    total += sum(1 for line in fh if line.strip())
        return total

    def finalize(self, files: dict[str, bytes] | None = None) -> None:
        """Gather the parts' error records into errors.jsonl, write ``files`` (e.g. the frozen heads
        a later phase needs, ``heads.safetensors``) and mark the cache complete."""
        if self.member_of is not None:
            raise CacheError("only the process holding the lock (rank 0) finalizes a cache")
        missing = self.missing_parts()
        if missing:
            raise CacheError(f"{self.path}: cannot finalize, parts {missing[:5]} are missing")
        lines = []
        for i in range(self.spec.n_parts):
            f = self.path / "parts" / part_name(i) / PART_ERRORS_FILE
            if f.is_file():
                lines.append(f.read_text())
        write_atomic(self.path / ERRORS_FILE, "".join(lines))
        for name, data in (files or {}).items():
            write_atomic(self.path / name, data)
        with writing(self.path / "zarr.json", need=4096):
            root = zarr.open_group(LocalStore(self.path), mode="r+")
            root.attrs.update({"complete": True})
