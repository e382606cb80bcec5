"""`featcache demo`: the main job on the embedded synthetic default, offline.

Synthesize a face-forgery set, extract CLIP features with the offline ``small`` preset into
a cache, verify it and print its summary.  Rerunning resumes: nothing is recomputed.
"""

from __future__ import annotations

import time
from pathlib import Path

from .cache import cache_info, format_info, verify_cache
from .errors import CacheError


def run_demo(out: str | Path = "featcache-demo", *, n: int = 800, progress: bool = True, echo=print) -> dict:
    from .data.synth_faces import synth_faces
    from .extract import extract

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    echo(f"[1/3] synthetic faces: {n} images in 8 subgroups -> {data}")
    synth_faces(data, n=n, seed=0, bias=0.6, size=64, progress=progress)

    cache_dir = out / "caches" / "clip-small"
    echo(f"[2/3] CLIP extraction (offline preset 'small', random weights, seed 0) -> {cache_dir}")
    result = extract("clip", data / "manifest.csv", cache_dir, model="small", batch_size=64,
                     part_rows=256, num_workers=1, progress=progress)
    echo(f"      {result.parts_written} parts written, {result.parts_resumed} resumed, "
         f"{result.failed} unreadable, {result.seconds:.1f} s")

    echo("[3/3] cache verify and info")
    report = verify_cache(cache_dir)
    if not report.ok:
        raise CacheError("demo cache failed verification: " + "; ".join(report.problems))
    info = cache_info(cache_dir)
    echo(format_info(info))
    seconds = time.perf_counter() - t0
    echo(f"demo done in {seconds:.0f} s; next: featcache cache verify {cache_dir}")
    return {"cache": str(cache_dir), "info": info, "seconds": seconds}
