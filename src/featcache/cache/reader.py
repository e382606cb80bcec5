"""Reading a cache into memory (DESIGN.md: readers load what a head needs, then hand out tensors).

>>> cache = open_cache("runs/ffpp_clip")
>>> train = cache.load(split="train")          # CacheData: features (n, D) float32, meta DataFrame
>>> x, y = train.tensors("label")              # torch tensors
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from ..data.manifest import COLUMNS
from ..errors import CacheError
from .splits import split_mask
from .store import (
    ERRORS_FILE,
    FORMAT_VERSION,
    KIND_ARRAYS,
    part_bounds,
    part_name,
    read_attrs,
)


@dataclass
class CacheData:
    """Rows of a cache loaded into memory: an array per name, the meta table, the row indices."""

    arrays: dict[str, np.ndarray]
    meta: pd.DataFrame
    index: np.ndarray  # row numbers in the cache

    @property
    def features(self) -> np.ndarray:
        return self.arrays["features"]

    def __len__(self) -> int:
        return len(self.index)

    def tensors(self, *columns: str, device=None):
        """Features as a float tensor, then each named meta column as a tensor."""
        import torch

        out = [torch.from_numpy(np.array(self.features)).to(device)]
        for col in columns:
            values = self.meta[col].to_numpy()
            if values.dtype.kind not in "iufb":
                raise CacheError(f"meta column {col!r} is not numeric; encode it before making a tensor")
            out.append(torch.from_numpy(np.array(values)).to(device))
        return out[0] if len(out) == 1 else tuple(out)


class FeatureCache:
    """A cache opened for reading. Refuses unfinished caches unless ``require_complete=False``."""

    def __init__(self, path, *, require_complete: bool = True):
        self.path = Path(path)
        if self.path.is_file():
            hint = (": it looks like a manifest; a cache is the folder that `featcache extract --manifest "
                    f"{self.path.name} --out CACHE` writes" if self.path.suffix.lower() == ".csv" else
                    ": a cache is the folder that `featcache extract` writes")
            raise CacheError(f"{self.path} is a file, not a featcache cache{hint}")
        if not self.path.is_dir():
            raise CacheError(f"cache {self.path} does not exist")
        self.attrs = read_attrs(self.path)
        if "format_version" not in self.attrs:
            raise CacheError(f"{self.path} is a Zarr group but not a featcache cache")
        if self.attrs["format_version"] != FORMAT_VERSION:
            raise CacheError(
                f"{self.path} has cache format {self.attrs['format_version']}, this featcache reads "
                f"format {FORMAT_VERSION}; re-extract it with this version"
            )
        if "fingerprint" not in self.attrs:
            raise CacheError(f"{self.path}: its creation was interrupted before any part; rerun the extraction")
        if require_complete and not self.attrs.get("complete"):
            done = len(self.done_parts())
            raise CacheError(
                f"{self.path} is incomplete ({done} of {self.n_parts} parts); rerun the same "
                "`featcache extract` command to finish it"
            )
        # An absolute root: with a relative one, zarr 3.1 counts no stored chunks (nchunks_initialized 0).
        self._root = zarr.open_group(LocalStore(self.path.resolve(), read_only=True), mode="r")
        self._meta_cache: dict[str, np.ndarray] = {}

    # -- attributes ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.attrs["kind"]

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def rows(self) -> int:
        return int(self.attrs["manifest"]["rows"])

    @property
    def part_rows(self) -> int:
        return int(self.attrs["part_rows"])

    @property
    def n_parts(self) -> int:
        return int(self.attrs["n_parts"])

    @property
    def backbone(self) -> dict:
        return self.attrs["backbone"]

    @property
    def preprocess(self) -> dict:
        return self.attrs["preprocess"]

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, kind={self.kind!r}, rows={self.rows}, dim={self.dim})"

    @property
    def dim(self) -> int:
        """Feature dimension, read from the first part's main array."""
        name = next(iter(KIND_ARRAYS[self.kind]))
        return int(self.part(0)[name].shape[-1])

    def done_parts(self) -> list[int]:
        parts = self.path / "parts"
        return sorted(int(d.name) for d in parts.iterdir() if d.is_dir() and d.name.isdigit())

    # -- reading ---------------------------------------------------------------------------
    def meta(self, columns=None) -> pd.DataFrame:
        group = self._root["meta"]
        names = list(columns) if columns is not None else sorted(group.array_keys(), key=_meta_order)
        for name in names:
            if name not in group:
                raise CacheError(f"{self.path} has no meta column {name!r}; it has {sorted(group.array_keys())}")

        def read(name: str) -> None:
            values = _read_1d(self.path.resolve() / "meta" / name, f"meta/{name}", self.path)
            if values is None:  # a layout the direct decoder does not know: zarr reads it
                arr = group[name]
                _check_chunks(arr, f"meta/{name}", self.path)
                values = arr[...]
            self._meta_cache[name] = values.astype(object) if values.dtype.kind == "T" else values

        todo = [n for n in names if n not in self._meta_cache]  # each column is read once per instance
        if todo:
            with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
                list(pool.map(read, todo))
        return pd.DataFrame({name: self._meta_cache[name] for name in names})

    def part(self, index: int) -> zarr.Group:
        if not 0 <= index < self.n_parts:
            raise CacheError(f"{self.path}: part {index} out of range 0..{self.n_parts - 1}")
        name = f"parts/{part_name(index)}"
        if not (self.path / name).is_dir():
            raise CacheError(f"{self.path}: part {index} is missing; rerun the extraction to complete it")
        return self._root[name]

    def read_part(self, index: int, names=None) -> dict[str, np.ndarray]:
        group = self.part(index)
        out = {}
        for name in names or [*KIND_ARRAYS[self.kind], "ok"]:
            arr = group[name]
            _check_chunks(arr, f"parts/{part_name(index)}/{name}", self.path)
            out[name] = arr[...]
        return out

    def load_rows(self, name: str, dtype=None, rows: np.ndarray | None = None) -> np.ndarray:
        """A per-row array (``features``, ``ok``, ``hidden``, ...) over all parts, or only ``rows``.

        ``rows`` (sorted cache row numbers) selects rows: only those are converted to ``dtype``,
        straight into an output of their number (:func:`_read_selected`), part by part in a
        few threads.
        """
        kinds = {**KIND_ARRAYS[self.kind], "ok": "row"}
        if kinds.get(name) != "row":
            raise CacheError(f"{name!r} is not a per-row array of a {self.kind} cache")
        first = _ArrayInfo.of(self.path.resolve() / "parts" / part_name(0) / name) or self.part(0)[name]
        rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((self.rows if rows is None else len(rows), *first.shape[1:]), dtype=dtype or first.dtype)
        starts = np.arange(self.n_parts, dtype=np.int64) * self.part_rows
        if rows is None:
            spans = [(i, None, int(starts[i]), min(int(starts[i]) + self.part_rows, self.rows))
                     for i in range(self.n_parts)]
        else:
            cut = np.searchsorted(rows, np.append(starts, self.rows))
            spans = [(i, rows[cut[i]:cut[i + 1]] - starts[i], int(cut[i]), int(cut[i + 1]))
                     for i in range(self.n_parts) if cut[i + 1] > cut[i]]

        def read(span) -> None:
            i, local, o0, o1 = span
            where = f"parts/{part_name(i)}/{name}"
            array_dir = self.path.resolve() / "parts" / part_name(i) / name
            if not array_dir.parent.is_dir():
                self.part(i)  # raises: the part is missing
            info = _ArrayInfo.of(array_dir)  # plain-byte chunks: read without zarr's machinery
            if info is None and len(first.shape) == 1:  # ok: compressed 1-D, decoded by numcodecs
                data = _read_1d(array_dir, where, self.path)
                if data is not None:
                    out[o0:o1] = data if local is None else data[local]
                    return
            _read_selected(array_dir, info or self.part(i)[name], local, out[o0:o1], where, self.path)

        # File reads and large copies release the GIL: a few threads overlap them.
        if spans:
            with ThreadPoolExecutor(max_workers=min(_threads(), len(spans))) as pool:
                list(pool.map(read, spans))
        return out

    def load_ragged(self, name: str) -> list[np.ndarray]:
        """A flat array (``frames``, ``gt_boxes``, ...) cut per row by its part's ``offsets``."""
        if {**KIND_ARRAYS[self.kind]}.get(name) != "flat":
            raise CacheError(f"{name!r} is not a flat (per-offset) array of a {self.kind} cache")
        out: list[np.ndarray] = []
        for i in range(self.n_parts):
            data = self.read_part(i, ["offsets", name])
            off = data["offsets"]
            out.extend(data[name][off[j]:off[j + 1]] for j in range(len(off) - 1))
        return out

    def _split_mask(self, meta: pd.DataFrame, split) -> np.ndarray:
        """Rows in the split(s) (all rows for None); an error when there are none."""
        if split is None:
            return np.ones(self.rows, dtype=bool)
        return split_mask((meta if "split" in meta else self.meta(["split"]))["split"], split, where=str(self.path))

    def load(self, split: str | list[str] | None = None, *, columns=None, ok_only: bool = True,
             dtype=np.float32) -> CacheData:
        """Load features and meta of the selected split(s); rows that failed to read are dropped.

        Only the selected rows are read and converted to ``dtype``, straight into an array of
        the selected size: peak memory is that array and the meta, not the whole cache.
        """
        if self.kind != "pooled":
            raise CacheError(f"load() reads pooled caches; {self.path} is a {self.kind} cache")
        meta = self.meta(columns)
        mask = self._split_mask(meta, split)
        if ok_only:
            mask &= self.load_rows("ok")
        index = np.flatnonzero(mask)
        whole = len(index) == self.rows
        features = self.load_rows("features", dtype=dtype, rows=None if whole else index)
        if not whole:
            meta = meta.iloc[index].reset_index(drop=True)
        return CacheData(arrays={"features": features}, meta=meta, index=index)

    def load_splits(self, splits, *, columns=None, ok_only: bool = True, dtype=np.float32) -> dict[str, CacheData]:
        """Several splits in one pass: meta and ``ok`` read once, the features of each split
        read straight into its own array. Returns ``{split: CacheData}``."""
        if self.kind != "pooled":
            raise CacheError(f"load_splits() reads pooled caches; {self.path} is a {self.kind} cache")
        splits = [splits] if isinstance(splits, str) else list(splits)
        meta = self.meta(columns)
        all_splits = (meta if "split" in meta else self.meta(["split"]))["split"]
        ok = self.load_rows("ok") if ok_only else np.ones(self.rows, bool)
        out = {}
        for sp in splits:
            index = np.flatnonzero(all_splits.isin([sp]).to_numpy() & ok)
            if not len(index):
                raise CacheError(f"{self.path} has no rows in split {sp!r}")
            out[sp] = CacheData(arrays={"features": self.load_rows("features", dtype=dtype, rows=index)},
                                meta=meta.iloc[index].reset_index(drop=True), index=index)
        return out

    def load_frames(self, split: str | list[str] | None = None, *, columns=None, ok_only: bool = True,
                    dtype=np.float32) -> CacheData:
        """Frames of the selected rows of a ``frames`` cache, flat, with offsets into them.

        ``arrays``: ``frames`` (ΣT, D), ``frame_labels`` (ΣT,) int8 and ``offsets`` (n + 1,) int64:
        row i's frames are ``frames[offsets[i]:offsets[i + 1]]``.
        """
        if self.kind != "frames":
            raise CacheError(f"load_frames() reads frames caches; {self.path} is a {self.kind} cache")
        meta = self.meta(columns)
        mask = self._split_mask(meta, split)
        frames, labels, counts, index = [], [], [], []
        for i in range(self.n_parts):
            start, stop = part_bounds(i, self.rows, self.part_rows)
            if not mask[start:stop].any():
                continue
            part = self.read_part(i)
            off = part["offsets"]
            keep = mask[start:stop] & (part["ok"] if ok_only else True)
            for j in np.flatnonzero(keep):
                frames.append(part["frames"][off[j]:off[j + 1]])
                labels.append(part["frame_labels"][off[j]:off[j + 1]])
                counts.append(int(off[j + 1] - off[j]))
                index.append(start + j)
        index = np.asarray(index, dtype=np.int64)
        dim = self.dim
        return CacheData(arrays={
            "frames": np.concatenate(frames).astype(dtype) if frames else np.zeros((0, dim), dtype),
            "frame_labels": np.concatenate(labels) if labels else np.zeros(0, np.int8),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        }, meta=meta.iloc[index].reset_index(drop=True), index=index)

    def errors(self) -> list[dict]:
        f = self.path / ERRORS_FILE
        if not f.is_file():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def open_cache(path, kind: str | tuple[str, ...] | None = None, *, require_complete: bool = True) -> FeatureCache:
    """Open a cache for reading; with ``kind`` (``pooled``, ``frames``, ``queries`` or several),
    refuse a cache of another kind in one sentence that names the backbone it needs."""
    cache = FeatureCache(path, require_complete=require_complete)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        unknown = [k for k in kinds if k not in KIND_ARRAYS]
        if unknown:
            raise ValueError(f"unknown cache kind(s) {unknown}; kinds are {sorted(KIND_ARRAYS)}")
        if cache.kind not in kinds:
            made = {"pooled": "clip", "frames": "xlsr", "queries": "detr"}
            need = " or ".join(f"{k} cache (extract with --backbone {made[k]})" for k in kinds)
            raise CacheError(f"{cache.path} is a {cache.kind} cache (backbone {cache.backbone.get('name')}); "
                             f"this needs a {need}")
    return cache


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(2, min(8, cores))


#: Rows converted per step when the stored and the output dtype differ: bounds the temporaries.
_BLOCK_BYTES = 4 * 2**20


class _ArrayInfo:
    """Shape, dtype and chunking of a Zarr v3 array whose chunks are plain little-endian bytes
    split along rows only (how write_array stores float features), read from its zarr.json."""

    def __init__(self, shape, dtype, chunk_rows):
        self.shape, self.dtype, self.chunk_rows = tuple(shape), np.dtype(dtype), int(chunk_rows)
        self.ndim = len(self.shape)

    @classmethod
    def of(cls, array_dir: Path) -> _ArrayInfo | None:
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        try:
            codecs = meta["codecs"]
            grid = meta["chunk_grid"]
            enc = meta["chunk_key_encoding"]
            shape, chunks = meta["shape"], grid["configuration"]["chunk_shape"]
            dtype = np.dtype(meta["data_type"])
        except (KeyError, TypeError):
            return None
        plain = (len(codecs) == 1 and codecs[0].get("name") == "bytes" and sys.byteorder == "little"
                 and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
                 and grid.get("name") == "regular" and enc.get("name") == "default"
                 and (enc.get("configuration") or {}).get("separator", "/") == "/"
                 and len(shape) >= 1 and list(chunks[1:]) == list(shape[1:]) and dtype.kind in "fiub"
                 and not meta.get("storage_transformers"))
        return cls(shape, dtype, chunks[0]) if plain else None


def _raw_layout(arr):
    """(chunk rows, row bytes) when the array's chunks are plain little-endian bytes along rows
    (how write_array stores floats); None for anything else (then zarr decodes)."""
    if isinstance(arr, _ArrayInfo):
        return arr.chunk_rows, int(arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    meta = arr.metadata
    try:
        codecs = [c.to_dict() for c in meta.codecs]
        grid = meta.chunk_grid.chunk_shape
        enc = meta.chunk_key_encoding.to_dict()
    except AttributeError:
        return None
    if (arr.ndim < 1 or len(codecs) != 1 or codecs[0].get("name") != "bytes" or sys.byteorder != "little"
            or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
            or enc.get("name") != "default" or (enc.get("configuration") or {}).get("separator", "/") != "/"
            or tuple(grid[1:]) != tuple(arr.shape[1:]) or arr.dtype.kind not in "fiub"):
        return None
    return int(grid[0]), int(arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))


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


def _read_selected(array_dir: Path, arr, local, out: np.ndarray, where: str, root: Path) -> None:
    """Rows ``local`` (sorted) of one part's array, all when None, into ``out``, chunk file by chunk file.

    For plain-byte chunks (features) the file is read straight into ``out`` when nothing needs
    converting, else in blocks of a few MiB of which only the selected rows are converted. A
    chunk file that is missing or short is an error, never zeros. Other arrays go through zarr.
    """
    n = arr.shape[0]
    if n == 0:
        return
    layout = _raw_layout(arr)
    if layout is None and arr.ndim == 1:  # ok (compressed bool): numcodecs, without zarr's machinery
        data = _read_1d(array_dir, where, root)
        if data is not None:
            out[...] = data if local is None else data[local]
            return
    if layout is None:
        if isinstance(arr, _ArrayInfo):
            raise AssertionError("a plain-byte array has a layout")
        _check_chunks(arr, where, root)
        data = arr[...]
        out[...] = data if local is None else data[local]
        return
    chunk_rows, row_bytes = layout
    n_chunks = -(-n // chunk_rows)
    tail = "/0" * (arr.ndim - 1)
    stored = arr.dtype
    block_rows = max(1, _BLOCK_BYTES // max(1, row_bytes))
    buf = None
    o = 0
    for k in range(n_chunks):
        c0, c1 = k * chunk_rows, min((k + 1) * chunk_rows, n)
        sel = None
        if local is not None:
            lo, hi = np.searchsorted(local, [c0, c1])
            if lo == hi:
                continue
            sel = local[lo:hi] - c0
        path = array_dir / "c" / f"{k}{tail}"
        try:
            fh = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise CacheError(f"{root}: {where} has 1 of {n_chunks} chunks missing (chunk {k}); the cache is damaged: "
                             "run `featcache cache verify`, then rerun the extraction to redo the part") from None
        with fh:
            if os.fstat(fh.fileno()).st_size < (c1 - c0) * row_bytes:
                raise CacheError(f"{root}: {where}: chunk {k} is shorter than its rows; the cache is damaged")
            if sel is None and out.dtype == stored:  # the file's bytes are the rows: one read into place
                view = memoryview(out[o:o + c1 - c0].reshape(-1).view(np.uint8))
                if fh.readinto(view) != len(view):
                    raise CacheError(f"{root}: {where}: chunk {k} could not be read whole")
                o += c1 - c0
                continue
            if buf is None:
                buf = np.empty((min(block_rows, chunk_rows), *arr.shape[1:]), dtype=stored)
            for b0 in range(c0, c1, block_rows):
                b1 = min(b0 + block_rows, c1)
                bsel = None
                if sel is not None:
                    bsel = sel[(sel >= b0 - c0) & (sel < b1 - c0)] - (b0 - c0)
                    if len(bsel) == 0:
                        continue
                fh.seek((b0 - c0) * row_bytes)
                view = memoryview(buf[:b1 - b0].reshape(-1).view(np.uint8))
                if fh.readinto(view) != len(view):
                    raise CacheError(f"{root}: {where}: chunk {k} could not be read whole")
                m = b1 - b0 if bsel is None else len(bsel)
                src = buf[:b1 - b0] if bsel is None else np.take(buf[:b1 - b0], bsel, axis=0)
                _convert(src, out[o:o + m])
                o += m
    if o != len(out):
        raise CacheError(f"{root}: {where}: read {o} rows, expected {len(out)}")


def _meta_order(name: str):
    return (COLUMNS.index(name), "") if name in COLUMNS else (len(COLUMNS), name)


def _check_chunks(arr: zarr.Array, where: str, root: Path) -> None:
    """A missing chunk reads as the fill value; refuse instead (DESIGN.md)."""
    if arr.nchunks_initialized != arr.nchunks:
        raise CacheError(
            f"{root}: {where} has {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing; "
            "the cache is damaged: run `featcache cache verify`, then re-extract with --overwrite"
        )


def _read_1d(array_dir: Path, where: str, root: Path) -> np.ndarray | None:
    """A whole 1-D array (meta columns, ``ok``) decoded chunk by chunk with numcodecs, when its
    codecs are the ones write_array uses (bytes or vlen-utf8, then optionally zstd); None for
    anything else (then zarr reads it). Strings come back as an object array. A missing chunk
    is an error, never the fill value."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        names = [c.get("name") for c in meta["codecs"]]
        enc = meta["chunk_key_encoding"]
        dtype = meta["data_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (len(shape) != 1 or enc.get("name") != "default" or meta.get("storage_transformers")
            or names not in (["bytes"], ["bytes", "zstd"], ["vlen-utf8"], ["vlen-utf8", "zstd"])
            or (names[0] == "bytes" and (sys.byteorder != "little" or (meta["codecs"][0].get("configuration") or {})
                                         .get("endian", "little") != "little"))):
        return None
    from numcodecs import VLenUTF8, Zstd

    strings = names[0] == "vlen-utf8"
    if strings != (dtype == "string"):
        return None
    np_dtype = None if strings else np.dtype(dtype)
    n, step = int(shape[0]), int(chunks[0])
    n_chunks = -(-n // step) if n else 0
    pieces = []
    for k in range(n_chunks):
        try:
            data = (array_dir / "c" / str(k)).read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{root}: {where} has 1 of {n_chunks} chunks missing (chunk {k}); the cache is damaged: "
                             "run `featcache cache verify`, then re-extract with --overwrite") from None
        if "zstd" in names:
            data = Zstd().decode(data)
        values = VLenUTF8().decode(data) if strings else np.frombuffer(data, dtype=np_dtype)
        pieces.append(values[:min(step, n - k * step)])
    if not pieces:
        return np.empty(0, dtype=object if strings else np_dtype)
    return np.concatenate(pieces)
