"""The one decoder of a cache's arrays, as :func:`.store.write_array` stores them.

Every array of a cache (features, ``ok``, offsets, every meta column) is a Zarr v3 array chunked
along its first axis only, with the default chunk-key encoding, and one of three codec chains:
``bytes`` (floats: plain little-endian rows), ``bytes`` + ``zstd`` (integers, booleans) or
``vlen-utf8`` + ``zstd`` (strings). :class:`ArrayFile` reads its ``zarr.json`` once and decodes
its chunk files itself: the reader (:mod:`.reader`), ``cache verify`` (:mod:`.verify`) and the
writer's check of a resumed cache (:func:`.store.part_damage`) all go through it, so a chunk that
is missing, truncated or undecodable is found, and named, the same way everywhere; it is never
read as Zarr's fill value, and never ends in a codec's traceback.

Plain-byte chunks are read straight into the output with ``readinto`` (no copy when nothing is
converted), or in blocks of a few MiB of which only the selected rows are converted: loading
features costs a file read, not Zarr's machinery (benchmarks/bench_extract.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import CacheDamageError, CacheError

#: Rows converted per step when the stored and the output dtype differ: bounds the temporaries.
BLOCK_BYTES = 4 * 2**20

_CHAINS = (["bytes"], ["bytes", "zstd"], ["vlen-utf8", "zstd"], ["vlen-utf8"])


def repair_hint(root) -> str:
    """How to repair a damaged cache at ``root``: rerun what made it, which redoes only the damage."""
    try:
        name = json.loads((Path(root) / "zarr.json").read_text())["attributes"]["backbone"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if name == "synthetic":
        return f"rerun `featcache synth features {root} ... --overwrite` to write it again"
    return (f"rerun the `featcache extract` command that made it (same --manifest, --out {root}; "
            "no --overwrite needed): it recomputes only what is damaged")


def damaged(root, where: str, what: str) -> CacheDamageError:
    """The one-line error for damage found while reading: where, what, and how to repair it."""
    return CacheDamageError(f"{root}: {where} is damaged ({what}); {repair_hint(root)}", where, what)


class ArrayFile:
    """One array of a cache on disk: its shape, dtype and chunking, and the decoder of its chunks.

    ``where`` names the array in messages (``parts/00002/features``, ``meta/gender``); ``root`` is
    the cache. Opening raises :class:`CacheError` for an array that is missing, whose ``zarr.json``
    is unreadable, or whose layout is not one write_array makes.
    """

    def __init__(self, array_dir: Path, where: str, root: Path):
        self.dir, self.where, self.root = Path(array_dir), where, root
        try:
            meta = json.loads((self.dir / "zarr.json").read_text())
        except FileNotFoundError:
            what = "missing" if not self.dir.is_dir() else "without its zarr.json"
            raise damaged(root, where, f"the array is {what}") from None
        except (OSError, ValueError) as exc:
            raise damaged(root, where, f"its zarr.json is unreadable: {exc}") from None
        try:
            shape = [int(s) for s in meta["shape"]]
            chunks = [int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"]]
            codecs = meta["codecs"]
            names = [c.get("name") for c in codecs]
            enc = meta["chunk_key_encoding"]
            data_type = meta["data_type"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise damaged(root, where, f"its zarr.json lacks {exc}") from None
        endian = (codecs[0].get("configuration") or {}).get("endian", "little") if names[:1] == ["bytes"] else "little"
        supported = (names in _CHAINS and len(shape) >= 1 and len(chunks) == len(shape)
                     and chunks[1:] == shape[1:] and chunks[0] >= 1
                     and enc.get("name") == "default" and (enc.get("configuration") or {}).get("separator", "/") == "/"
                     and not meta.get("storage_transformers") and (names[0] == "vlen-utf8") == (data_type == "string")
                     and endian == "little" and sys.byteorder == "little")
        if not supported:
            raise CacheError(f"{root}: {where} is stored in a layout this featcache does not read "
                             f"(codecs {names}, chunks {chunks}); re-extract the cache with this version")
        self.shape = tuple(shape)
        self.strings = names[0] == "vlen-utf8"
        self.zstd = "zstd" in names
        self.dtype = np.dtype(object) if self.strings else np.dtype(data_type)
        self.chunk_rows = chunks[0]
        self.row_bytes = 0 if self.strings else self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.nchunks = -(-self.shape[0] // self.chunk_rows)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def plain(self) -> bool:
        """True when each chunk file is the rows' bytes (floats: readable straight into place)."""
        return not self.strings and not self.zstd

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.chunk_rows, min((k + 1) * self.chunk_rows, self.shape[0])

    def _path(self, k: int) -> Path:
        return self.dir / "c" / (f"{k}" + "/0" * (self.ndim - 1))

    def _missing(self, k: int) -> CacheError:
        return damaged(self.root, self.where, f"1 of {self.nchunks} chunks missing: chunk {k}")

    def _full_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes  # Zarr stores edge chunks at the full chunk shape

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, k: int) -> np.ndarray:
        """Rows ``bounds(k)`` of chunk ``k``; a chunk that is missing, short or undecodable is a
        :class:`CacheError` naming it, never fill values."""
        c0, c1 = self.bounds(k)
        try:
            data = self._path(k).read_bytes()
        except FileNotFoundError:
            raise self._missing(k) from None
        if self.zstd:
            from numcodecs import Zstd

            try:
                data = Zstd().decode(data)
            except Exception as exc:  # numcodecs raises RuntimeError for a damaged frame
                raise damaged(self.root, self.where, f"chunk {k} cannot be decoded: {exc}") from None
        if self.strings:
            from numcodecs import VLenUTF8

            try:
                values = VLenUTF8().decode(data)
            except Exception as exc:
                raise damaged(self.root, self.where, f"chunk {k} cannot be decoded: {exc}") from None
            if len(values) != self.chunk_rows:
                raise damaged(self.root, self.where, f"chunk {k} holds {len(values)} of {self.chunk_rows} values")
            return values[:c1 - c0]
        if len(data) != self._full_bytes():
            raise damaged(self.root, self.where, f"chunk {k} has {len(data)} of {self._full_bytes()} bytes: truncated")
        return np.frombuffer(data, dtype=self.dtype, count=(c1 - c0) * self.row_bytes // max(1, self.dtype.itemsize)
                             ).reshape((c1 - c0, *self.shape[1:]))

    def check(self, *, read: bool = True) -> None:
        """Raise :class:`CacheError` unless every chunk is present and whole. ``read=False``
        checks plain-byte chunks by their size only (no read of the features) and decodes the
        others (small: flags, offsets, meta)."""
        for k in range(self.nchunks):
            if self.plain and not read:
                try:
                    size = self._path(k).stat().st_size
                except FileNotFoundError:
                    raise self._missing(k) from None
                if size != self._full_bytes():
                    raise damaged(self.root, self.where,
                                  f"chunk {k} has {size} of {self._full_bytes()} bytes: truncated")
            else:
                self.decode(k)

    def read(self, rows: np.ndarray | None = None, dtype=None) -> np.ndarray:
        """The whole array, or its ``rows`` (sorted), as ``dtype`` (the stored one by default)."""
        n = self.shape[0] if rows is None else len(rows)
        out = np.empty((n, *self.shape[1:]), dtype=self.dtype if dtype is None else dtype)
        self.read_into(out, rows)
        return out

    def read_into(self, out: np.ndarray, local: np.ndarray | None = None) -> None:
        """Rows ``local`` (sorted), all when None, into ``out``, chunk file by chunk file.

        Plain-byte chunks go straight into ``out`` when nothing needs converting, else in blocks
        of :data:`BLOCK_BYTES` of which only the selected rows are converted; other chunks are
        decoded whole (:meth:`decode`).
        """
        o = 0
        for k in range(self.nchunks):
            c0, c1 = self.bounds(k)
            sel = None
            if local is not None:
                lo, hi = np.searchsorted(local, [c0, c1])
                if lo == hi:
                    continue
                sel = local[lo:hi] - c0
            if not self.plain:
                data = self.decode(k)
                m = c1 - c0 if sel is None else len(sel)
                out[o:o + m] = data if sel is None else data[sel]
                o += m
                continue
            o = self._read_plain(k, c0, c1, sel, out, o)
        if o != len(out):
            raise damaged(self.root, self.where, f"read {o} rows, expected {len(out)}")

    def _read_plain(self, k: int, c0: int, c1: int, sel, out: np.ndarray, o: int) -> int:
        try:
            fh = open(self._path(k), "rb", buffering=0)
        except FileNotFoundError:
            raise self._missing(k) from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != self._full_bytes():
                raise damaged(self.root, self.where, f"chunk {k} has {size} of {self._full_bytes()} bytes: truncated")
            if sel is None and out.dtype == self.dtype:  # the file's bytes are the rows: one read into place
                view = memoryview(out[o:o + c1 - c0].reshape(-1).view(np.uint8))
                if fh.readinto(view) != len(view):
                    raise damaged(self.root, self.where, f"chunk {k} could not be read whole")
                return o + c1 - c0
            block_rows = max(1, min(BLOCK_BYTES // max(1, self.row_bytes), c1 - c0))
            buf = np.empty((block_rows, *self.shape[1:]), dtype=self.dtype)
            for b0 in range(c0, c1, block_rows):
                b1 = min(b0 + block_rows, c1)
                bsel = None
                if sel is not None:
                    bsel = sel[(sel >= b0 - c0) & (sel < b1 - c0)] - (b0 - c0)
                    if len(bsel) == 0:
                        continue
                fh.seek((b0 - c0) * self.row_bytes)
                view = memoryview(buf[:b1 - b0].reshape(-1).view(np.uint8))
                if fh.readinto(view) != len(view):
                    raise damaged(self.root, self.where, f"chunk {k} could not be read whole")
                m = b1 - b0 if bsel is None else len(bsel)
                _convert(buf[:b1 - b0] if bsel is None else np.take(buf[:b1 - b0], bsel, axis=0), out[o:o + m])
                o += m
        return o


def _convert(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` with a dtype conversion: torch's vectorised casts (fp16 -> fp32 with
    F16C) where both dtypes are torch's, several times numpy's scalar half-float loop."""
    if src.dtype == dst.dtype:
        dst[...] = src
        return
    try:
        import torch

        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    except (TypeError, ValueError):
        dst[...] = src
