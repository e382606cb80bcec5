"""Reading a cache into memory (DESIGN.md: readers load what a head needs, then hand out tensors).

>>> cache = open_cache("runs/ffpp_clip")
>>> train = cache.load(split="train")          # CacheData: features (n, D) float32, meta DataFrame
>>> x, y = train.tensors("label")              # torch tensors
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from ..data.manifest import COLUMNS
from ..errors import CacheDamageError, CacheError
from .arrays import ArrayFile, damaged, repair_hint
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
        return int(self.part_array(0, next(iter(KIND_ARRAYS[self.kind]))).shape[-1])

    def done_parts(self) -> list[int]:
        parts = self.path / "parts"
        return sorted(int(d.name) for d in parts.iterdir() if d.is_dir() and d.name.isdigit())

    # -- reading ---------------------------------------------------------------------------
    def array(self, where: str) -> ArrayFile:
        """The array at ``where`` (``meta/label``, ``parts/00002/features``): the one decoder."""
        return ArrayFile(self.path.resolve() / where, where, self.path)

    def meta_columns(self) -> list[str]:
        """The meta columns stored (folders under ``meta/``), in the manifest's order."""
        meta = self.path / "meta"
        names = [d.name for d in meta.iterdir() if d.is_dir()] if meta.is_dir() else []
        return sorted(names, key=_meta_order)

    def meta(self, columns=None) -> pd.DataFrame:
        """The meta columns (all stored ones by default) as a table; strings as objects."""
        have = self.meta_columns()
        if columns is None:  # all of them: a column the manifest had and the cache lost is damage, not absence
            lost = [c for c in self.attrs.get("meta_columns", ()) if c not in have]
            if lost:
                raise damaged(self.path, f"meta/{lost[0]}", "the column is missing")
        names = list(columns) if columns is not None else have
        for name in names:
            if name not in have:
                expected = name in self.attrs.get("meta_columns", ())
                raise (damaged(self.path, f"meta/{name}", "the column is missing") if expected else
                       CacheError(f"{self.path} has no meta column {name!r}; it has {have}"))

        def read(name: str) -> None:
            arr = self.array(f"meta/{name}")
            if arr.shape != (self.rows,):
                raise damaged(self.path, f"meta/{name}", f"{arr.shape[0]} of {self.rows} rows")
            self._meta_cache[name] = arr.read()

        todo = [n for n in names if n not in self._meta_cache]  # each column is read once per instance
        if todo:
            with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
                list(pool.map(read, todo))
        return pd.DataFrame({name: self._meta_cache[name] for name in names})

    def part(self, index: int) -> zarr.Group:
        """Part ``index`` as a Zarr group, for inspection (chunking, attributes); featcache itself
        reads arrays through :meth:`part_array`, the one decoder."""
        self._check_part(index)
        # An absolute root: with a relative one, zarr 3.1 counts no stored chunks (nchunks_initialized 0).
        root = zarr.open_group(LocalStore(self.path.resolve(), read_only=True), mode="r")
        return root[f"parts/{part_name(index)}"]

    def _check_part(self, index: int) -> None:
        if not 0 <= index < self.n_parts:
            raise CacheError(f"{self.path}: part {index} out of range 0..{self.n_parts - 1}")
        if not (self.path / "parts" / part_name(index)).is_dir():
            raise CacheDamageError(f"{self.path}: part {index} is missing (parts/{part_name(index)}); "
                                   f"{repair_hint(self.path)}", f"parts/{part_name(index)}", f"part {index} is missing")

    def part_array(self, index: int, name: str) -> ArrayFile:
        """Array ``name`` of part ``index`` (its shape, dtype and chunks; :meth:`ArrayFile.read`)."""
        self._check_part(index)
        return self.array(f"parts/{part_name(index)}/{name}")

    def read_part(self, index: int, names=None) -> dict[str, np.ndarray]:
        return {name: self.part_array(index, name).read() for name in names or [*KIND_ARRAYS[self.kind], "ok"]}

    def load_rows(self, name: str, dtype=None, rows: np.ndarray | None = None) -> np.ndarray:
        """A per-row array (``features``, ``ok``, ``hidden``, ...) over all parts, or only ``rows``.

        ``rows`` (sorted cache row numbers) selects rows: only those are converted to ``dtype``,
        straight into an output of their number (:meth:`ArrayFile.read_into`), part by part in a
        few threads.
        """
        kinds = {**KIND_ARRAYS[self.kind], "ok": "row"}
        if kinds.get(name) != "row":
            raise CacheError(f"{name!r} is not a per-row array of a {self.kind} cache")
        first = self.part_array(0, name)
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
            arr = first if i == 0 else self.part_array(i, name)
            start, stop = part_bounds(i, self.rows, self.part_rows)
            if arr.shape != (stop - start, *first.shape[1:]):
                raise damaged(self.path, arr.where, f"shape {arr.shape}, expected {(stop - start, *first.shape[1:])}")
            arr.read_into(out[o0:o1], local)

        # File reads and large copies release the GIL: a few threads overlap them.
        if spans:
            with ThreadPoolExecutor(max_workers=min(_threads(), len(spans))) as pool:
                list(pool.map(read, spans))
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


def _meta_order(name: str):
    return (COLUMNS.index(name), "") if name in COLUMNS else (len(COLUMNS), name)
