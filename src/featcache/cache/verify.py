"""`cache info` and `cache verify`: what a cache holds, and whether all of it is sound."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CacheError
from .reader import FeatureCache
from .store import KIND_ARRAYS, fingerprint, part_bounds, part_name


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_info(path) -> dict:
    """Rows, dimension, parts done, fingerprint, backbone and size on disk (reads no features)."""
    cache = FeatureCache(path, require_complete=False)
    done = cache.done_parts()
    ok_rows = None
    if len(done) == cache.n_parts:
        ok_rows = int(sum(int(cache.read_part(i, ["ok"])["ok"].sum()) for i in done))
    splits = cache.meta(["split"])["split"].value_counts().to_dict()
    return {
        "path": str(cache.path),
        "kind": cache.kind,
        "rows": cache.rows,
        "dim": cache.dim if done else None,
        "ok_rows": ok_rows,
        "errors": len(cache.errors()),
        "parts_done": len(done),
        "n_parts": cache.n_parts,
        "part_rows": cache.part_rows,
        "complete": bool(cache.attrs.get("complete")),
        "splits": {k: int(v) for k, v in sorted(splits.items())},
        "fingerprint": cache.fingerprint,
        "backbone": cache.backbone,
        "preprocess": cache.preprocess,
        "created": cache.attrs.get("created"),
        "featcache_version": cache.attrs.get("featcache_version"),
        "size_bytes": _dir_size(cache.path),
    }


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    ok_rows: int = 0
    parts_checked: int = 0
    n_parts: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "rows": self.rows,
                "ok_rows": self.ok_rows, "parts_checked": self.parts_checked, "n_parts": self.n_parts}


def verify_cache(path, *, max_problems: int = 20) -> VerifyReport:
    """Check every part is present and readable, shapes agree, values are finite, counts match.

    Never raises for a damaged cache: each problem found goes into the report.
    """
    report = VerifyReport(path=str(path))
    try:
        cache = FeatureCache(path, require_complete=False)
    except CacheError as exc:
        report.problems.append(str(exc))
        return report
    report.rows, report.n_parts = cache.rows, cache.n_parts
    problems = report.problems

    if fingerprint(cache.attrs) != cache.fingerprint:
        problems.append("the fingerprint does not match the attributes (zarr.json was edited)")
    if not cache.attrs.get("complete"):
        problems.append(f"incomplete: {len(cache.done_parts())} of {cache.n_parts} parts written; rerun the extraction")

    try:
        meta = cache.meta()
        for col in meta.columns:
            if len(meta[col]) != cache.rows:
                problems.append(f"meta/{col} has {len(meta[col])} rows, expected {cache.rows}")
    except (CacheError, KeyError, ValueError) as exc:
        problems.append(f"meta: {exc}")
        meta = None

    arrays = KIND_ARRAYS[cache.kind]
    dims: dict[str, tuple] = {}
    failed_ids: list[str] = []
    for i in range(cache.n_parts):
        if len(problems) >= max_problems:
            problems.append("... (stopped after too many problems)")
            break
        start, stop = part_bounds(i, cache.rows, cache.part_rows)
        n = stop - start
        where = f"part {part_name(i)}"
        try:
            data = cache.read_part(i)
        except (CacheError, KeyError, OSError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        report.parts_checked += 1
        ok = data["ok"]
        if ok.shape != (n,) or ok.dtype != bool:
            problems.append(f"{where}: ok has shape {ok.shape} {ok.dtype}, expected ({n},) bool")
            continue
        report.ok_rows += int(ok.sum())
        if meta is not None and "sample_id" in meta:
            failed_ids.extend(meta["sample_id"].iloc[start:stop][~ok].tolist())
        flat_rows = None
        if "offsets" in data:
            off = data["offsets"]
            if off.shape != (n + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
                problems.append(f"{where}: offsets are not {n + 1} non-decreasing values from 0")
            else:
                flat_rows = int(off[-1])
        for name, rel in arrays.items():
            arr = data[name]
            want = {"row": n, "offsets": n + 1, "flat": flat_rows}[rel]
            if want is not None and arr.shape[0] != want:
                problems.append(f"{where}: {name} has {arr.shape[0]} rows, expected {want}")
            if dims.setdefault(name, arr.shape[1:]) != arr.shape[1:]:
                problems.append(f"{where}: {name} has trailing shape {arr.shape[1:]}, other parts {dims[name]}")
            if arr.dtype.kind == "f":
                sel = arr[ok] if rel == "row" else arr
                bad = int((~np.isfinite(sel)).sum())
                if bad:
                    problems.append(f"{where}: {name} has {bad} NaN or Inf values")

    recorded = {e.get("sample_id") for e in cache.errors()}
    if report.parts_checked == cache.n_parts and recorded != set(failed_ids):
        problems.append(
            f"errors.jsonl records {len(recorded)} failed samples but {len(failed_ids)} rows have ok=False"
        )
    return report


def format_info(info: dict) -> str:
    bb = info["backbone"]
    pre = info["preprocess"]
    size = info["size_bytes"]
    human = f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"
    lines = [
        f"cache        {info['path']}",
        f"kind         {info['kind']}",
        f"rows         {info['rows']}" + (f" ({info['ok_rows']} ok, {info['errors']} failed)" if info["ok_rows"] is not None else ""),
        f"dimension    {info['dim']}",
        f"parts        {info['parts_done']} of {info['n_parts']} done ({info['part_rows']} rows each)"
        + ("" if info["complete"] else "  INCOMPLETE: rerun the extraction"),
        "splits       " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()),
        f"backbone     {bb.get('name')} {bb.get('model')} (weights {bb.get('pretrained')}, "
        f"sha256 {str(bb.get('weights_sha256'))[:12]}, {bb.get('dtype')})",
        "preprocess   " + json.dumps(pre, sort_keys=True),
        f"fingerprint  {info['fingerprint']}",
        f"size         {human}",
    ]
    return "\n".join(lines)
