"""Reading a cache into memory (DESIGN.md: readers load what a head needs, then hand out tensors).

>>> cache = open_cache("runs/ffpp_clip")
>>> train = cache.load(split="train")          # CacheData: features (n, D) float32, meta DataFrame
>>> x, y = train.tensors("label")              # torch tensors
"""

from __future__ import annotations

import json
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
        out = {}
        for name in names:
            if name not in group:
                raise CacheError(f"{self.path} has no meta column {name!r}; it has {sorted(group.array_keys())}")
            arr = group[name]
            _check_chunks(arr, f"meta/{name}", self.path)
            values = arr[...]
            out[name] = values.astype(object) if values.dtype.kind == "T" else values
        return pd.DataFrame(out)

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

    def load_rows(self, name: str, dtype=None) -> np.ndarray:
        """Concatenate a per-row array (``features``, ``ok``, ``hidden``, ...) over all parts."""
        kinds = {**KIND_ARRAYS[self.kind], "ok": "row"}
        if kinds.get(name) != "row":
            raise CacheError(f"{name!r} is not a per-row array of a {self.kind} cache")
        first = self.part(0)[name]
        out = np.empty((self.rows, *first.shape[1:]), dtype=dtype or first.dtype)

        def read(i: int) -> None:
            start, stop = part_bounds(i, self.rows, self.part_rows)
            out[start:stop] = self.read_part(i, [name])[name]

        # File reads and large copies release the GIL: a few threads overlap them.
        with ThreadPoolExecutor(max_workers=min(4, self.n_parts)) as pool:
            list(pool.map(read, range(self.n_parts)))
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
        """Load features and meta of the selected split(s); rows that failed to read are dropped."""
        if self.kind != "pooled":
            raise CacheError(f"load() reads pooled caches; {self.path} is a {self.kind} cache")
        meta = self.meta(columns)
        mask = self._split_mask(meta, split)
        if ok_only:
            mask &= self.load_rows("ok")
        features = self.load_rows("features", dtype=dtype)
        index = np.flatnonzero(mask)
        if len(index) < self.rows:
            features, meta = features[index], meta.iloc[index].reset_index(drop=True)
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


def open_cache(path, *, require_complete: bool = True) -> FeatureCache:
    return FeatureCache(path, require_complete=require_complete)


def _meta_order(name: str):
    return (COLUMNS.index(name), "") if name in COLUMNS else (len(COLUMNS), name)


def _check_chunks(arr: zarr.Array, where: str, root: Path) -> None:
    """A missing chunk reads as the fill value; refuse instead (DESIGN.md)."""
    if arr.nchunks_initialized != arr.nchunks:
        raise CacheError(
            f"{root}: {where} has {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing; "
            "the cache is damaged: run `featcache cache verify`, then re-extract with --overwrite"
        )
