"""`cache info` and `cache verify`: what a cache holds, and whether all of it is sound."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CacheDamageError, CacheError
from .arrays import repair_hint
from .reader import FeatureCache
from .store import KIND_ARRAYS, fingerprint, part_bounds, part_damage, part_name


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
    """What ``cache verify`` found: each problem (what is damaged, where), and how to repair them."""

    path: str
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    ok_rows: int = 0
    parts_checked: int = 0
    n_parts: int = 0
    repair: str = ""  # how to repair the problems a rerun of the extraction repairs ('' when none)
    damaged_parts: list[int] = field(default_factory=list)
    damaged_meta: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "repair": self.repair,
                "damaged_parts": self.damaged_parts, "damaged_meta": self.damaged_meta, "rows": self.rows,
                "ok_rows": self.ok_rows, "parts_checked": self.parts_checked, "n_parts": self.n_parts}


#: Meta columns every cache has, for caches written before the column list was recorded.
_REQUIRED_META = ("sample_id", "path", "split")


def verify_cache(path, *, max_problems: int = 20) -> VerifyReport:
    """Check every array of every part and every meta column: present, complete (its row count),
    decodable (every chunk read), then shapes across parts, finite values, the ok flags against
    errors.jsonl. Never raises for a damaged cache: each problem found goes into the report,
    with the repair (:attr:`VerifyReport.repair`) when rerunning the extraction repairs it.
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
        problems.append("the fingerprint does not match the attributes (zarr.json was edited); "
                        "re-extract with --overwrite")
    if not cache.attrs.get("complete"):
        problems.append(f"incomplete: {len(cache.done_parts())} of {cache.n_parts} parts written")

    stored = _check_meta(cache, report)
    ids = None
    if "sample_id" in stored and "sample_id" not in report.damaged_meta:
        ids = cache.meta(["sample_id"])["sample_id"]

    arrays = KIND_ARRAYS[cache.kind]
    dims: dict[str, tuple] = {}
    failed_ids: list[str] = []
    done = set(cache.done_parts())
    for i in range(cache.n_parts):
        if len(problems) >= max_problems:
            problems.append("... (stopped after too many problems)")
            break
        start, stop = part_bounds(i, cache.rows, cache.part_rows)
        where = f"part {part_name(i)}"
        if i not in done:
            if cache.attrs.get("complete"):
                problems.append(f"part {i} is missing (parts/{part_name(i)})")
                report.damaged_parts.append(i)
            continue
        # The same check a rerun of the extraction makes to decide what to recompute.
        damage = part_damage(cache.path, i, cache.kind, stop - start)
        if damage:
            problems.append(damage)
            report.damaged_parts.append(i)
            continue
        try:
            data = cache.read_part(i)  # every chunk read again, the features too
        except CacheDamageError as exc:
            problems.append(f"{exc.where}: {exc.what}")
            report.damaged_parts.append(i)
            continue
        report.parts_checked += 1
        ok = data["ok"]
        report.ok_rows += int(ok.sum())
        if ids is not None:
            failed_ids.extend(ids.iloc[start:stop][~ok].tolist())
        for name, rel in arrays.items():
            arr = data[name]
            if dims.setdefault(name, arr.shape[1:]) != arr.shape[1:]:
                problems.append(f"{where}: {name} has trailing shape {arr.shape[1:]}, other parts {dims[name]}; "
                                f"delete {cache.path / 'parts' / part_name(i)} and rerun the extraction")
            if arr.dtype.kind == "f":
                sel = arr[ok] if rel == "row" else arr
                bad = int((~np.isfinite(sel)).sum())
                if bad:
                    problems.append(f"{where}: {name} has {bad} NaN or Inf values; if the backbone did not make them, "
                                    f"delete {cache.path / 'parts' / part_name(i)} and rerun the extraction")

    recorded = {e.get("sample_id") for e in cache.errors()}
    if report.parts_checked == cache.n_parts and ids is not None and recorded != set(failed_ids):
        problems.append(
            f"errors.jsonl records {len(recorded)} failed samples but {len(failed_ids)} rows have ok=False"
        )
    if report.damaged_parts or report.damaged_meta or not cache.attrs.get("complete") or any(
            p.startswith("errors.jsonl") for p in problems):
        report.repair = repair_hint(cache.path)
    return report


def _check_meta(cache: FeatureCache, report: VerifyReport) -> list[str]:
    """Every meta column the cache should hold: present, complete, decodable; problems and damaged
    columns go into ``report``. Returns the columns stored."""
    problems = report.problems
    stored = cache.meta_columns()
    if not (cache.path / "meta" / "zarr.json").is_file():
        problems.append("meta: the group's zarr.json is missing")
        report.damaged_meta.append("(group)")
    expected = list(cache.attrs.get("meta_columns") or _REQUIRED_META)
    for col in [*expected, *(c for c in stored if c not in expected)]:
        where = f"meta/{col}"
        if col not in stored:
            problems.append(f"{where}: the column is missing")
            report.damaged_meta.append(col)
            continue
        try:
            arr = cache.array(where)
            if arr.shape != (cache.rows,):
                problems.append(f"{where}: {arr.shape[0]} of {cache.rows} rows")
                report.damaged_meta.append(col)
                continue
            arr.check()
        except CacheDamageError as exc:
            problems.append(f"{exc.where}: {exc.what}")
            report.damaged_meta.append(col)
        except CacheError as exc:
            problems.append(f"{where}: {exc}")
            report.damaged_meta.append(col)
    return stored


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
