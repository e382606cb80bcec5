"""Export a cache to HDF5 for tools that read HDF5 (h5py), one part at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import check_out, writing
from ..progress import bar as tqdm
from .reader import FeatureCache
from .store import KIND_ARRAYS, part_bounds


def export_h5(cache_path, out, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Write every array (concatenated over parts), ``ok`` and ``meta/<column>`` to ``out``.

    Frame and query caches keep their layout: flat arrays (``frames``, ``gt_boxes``) with global ``offsets`` (n + 1).
    The cache's attributes are stored as JSON in the file attribute ``featcache``. An existing
    ``out`` is replaced only with ``overwrite``; the file is written as ``out.tmp`` and renamed
    when whole, so a full disk (one line: the path and the space needed) leaves ``out`` as it was.
    """
    cache = FeatureCache(cache_path)
    out = check_out(out, kind="file", overwrite=overwrite, option="--h5")
    with writing(out, need=_dir_bytes(cache.path)):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with writing(out, need=_dir_bytes(cache.path), partial=[tmp]):
        _write(cache, tmp, progress)
        os.replace(tmp, out)
    return out


def _dir_bytes(path: Path) -> int:
    """Bytes under ``path``: about what the export of the cache there needs."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _write(cache: FeatureCache, tmp: Path, progress: bool) -> None:
    kinds = {**KIND_ARRAYS[cache.kind], "ok": "row"}
    first = cache.read_part(0)
    flat_total = 0
    if "offsets" in kinds:
        flat_total = sum(int(cache.read_part(i, ["offsets"])["offsets"][-1]) for i in range(cache.n_parts))
    with h5py.File(tmp, "w") as h5:
        h5.attrs["featcache"] = json.dumps(cache.attrs)
        dsets = {}
        for name, rel in kinds.items():
            shape0 = {"row": cache.rows, "offsets": cache.rows + 1, "flat": flat_total}[rel]
            dsets[name] = h5.create_dataset(name, shape=(shape0, *first[name].shape[1:]), dtype=first[name].dtype,
                                            chunks=True if shape0 else None)
        flat_at = 0
        for i in tqdm(range(cache.n_parts), desc="export", unit="part", disable=not progress):
            start, stop = part_bounds(i, cache.rows, cache.part_rows)
            data = cache.read_part(i)
            for name, rel in kinds.items():
                if rel == "row":
                    dsets[name][start:stop] = data[name]
                elif rel == "flat":
                    dsets[name][flat_at:flat_at + len(data[name])] = data[name]
                else:  # offsets, made global
                    dsets[name][start:stop + 1] = data[name] + flat_at
            if "offsets" in data:
                flat_at += int(data["offsets"][-1])
        meta = cache.meta()
        grp = h5.create_group("meta")
        for col in meta.columns:
            values = meta[col].to_numpy()
            if values.dtype == object:
                grp.create_dataset(col, data=np.array(values, dtype=h5py.string_dtype("utf-8")))
            else:
                grp.create_dataset(col, data=values)
