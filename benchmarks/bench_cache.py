"""Cache load at scale: ``load(split="train")`` with meta against ``np.load`` of the same bytes.

    python benchmarks/bench_cache.py [--rows 200000] [--dim 768] [--part-rows 4096] [--million]

A controlled pooled cache (fp16 features, a realistic meta: sample_id, path, label, split 70/15/15,
gender, race, subgroup, identity) is written once; then, each in a fresh child process so that
the page cache is warm and the peak is the measured call's alone:

- ``np.load`` of the same fp16 features from one ``.npy`` (the raw read of the bytes);
- ``load_rows("features")``: every row, fp16, as stored;
- ``load(split="train")``: the train rows as float32 with their meta (what a head gets).

Time is the best of several runs; peak memory is the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) during one call, against the bytes it returns.
Goals (issue 17): load >= 0.8 of np.load's speed on the 2-core CPU; peak <= 1.2x the output.
``--million`` adds the 1,000,000-row cache in 16 parts; time and memory should grow linearly.
``suite(quick, device)`` is the interface of benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from featcache.cache.store import CacheSpec, CacheWriter

_CHILD = r"""
import json, sys, time
import numpy as np
what, cache_path, npy, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from featcache.cache import open_cache

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def call():
    if what == "np.load":
        return np.load(npy), 0
    cache = open_cache(cache_path)  # a fresh reader each time: nothing memoised between runs
    if what == "load_rows":
        return cache.load_rows("features"), 0
    d = cache.load(split="train")
    return d.features, int(d.meta.memory_usage(deep=True).sum())

times = []
for _ in range(repeat):
    t = time.perf_counter(); out = call(); times.append(time.perf_counter() - t); del out
import gc; gc.collect()
before = rss(); reset()
arr, meta_bytes = call()
peak = hwm() - before
print(json.dumps({"seconds": min(times), "peak": peak, "out_bytes": int(arr.nbytes), "meta_bytes": meta_bytes,
                  "rows": int(arr.shape[0])}))
"""


def make_cache(root: Path, rows: int, dim: int, part_rows: int, seed: int = 0) -> tuple[Path, Path]:
    """A pooled cache and a .npy of the same fp16 features."""
    rng = np.random.default_rng(seed)
    ids = np.arange(rows)
    split = np.array(["train"] * 70 + ["val"] * 15 + ["test"] * 15)[rng.integers(0, 100, rows)]
    meta = pd.DataFrame({
        "sample_id": [f"ffpp/c23/{i:08d}.png" for i in ids], "path": [f"frames/{i // 32:06d}/{i % 32:02d}.png" for i in ids],
        "label": (ids % 2).astype(np.int8), "split": split,
        "gender": np.array(["male", "female"])[ids % 2], "race": np.array(["asian", "white", "black", "other"])[ids % 4],
        "subgroup": (ids % 8).astype(np.int8), "identity": [f"id{i // 32}" for i in ids],
    })
    spec = CacheSpec(kind="pooled", backbone={"name": "bench"}, preprocess={}, manifest_sha256="0" * 64, rows=rows,
                     part_rows=part_rows)
    npy = root / "features.npy"
    feats = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(rows, dim))
    with CacheWriter(root / "cache", spec, meta) as w:
        for i in w.missing_parts():
            s, e = w.part_bounds(i)
            block = rng.standard_normal((e - s, dim), dtype=np.float32).astype(np.float16)
            feats[s:e] = block
            w.write_part(i, {"features": block}, np.ones(e - s, bool))
        w.finalize()
    feats.flush()
    del feats
    return root / "cache", npy


def measure(what: str, cache: Path, npy: Path, repeat: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, what, str(cache), str(npy), str(repeat)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(rows: int, dim: int, part_rows: int, repeat: int = 5) -> dict:
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-cache-"))
    try:
        cache, npy = make_cache(work, rows, dim, part_rows)
        return {"rows": rows, "dim": dim, "part_rows": part_rows,
                **{k: measure(k, cache, npy, repeat) for k in ("np.load", "load_rows", "load")}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table_rows(r: dict) -> list[dict]:
    n, npl, lr, ld = r["rows"], r["np.load"], r["load_rows"], r["load"]
    mb = npl["out_bytes"] / 2**20
    out_ld = ld["out_bytes"] + ld["meta_bytes"]
    return [
        {"measure": f"load_rows('features') / np.load, {n} x {r['dim']} fp16 ({mb:.0f} MiB), parts of {r['part_rows']}",
         "ratio": npl["seconds"] / lr["seconds"],
         "value": f"{lr['seconds'] * 1e3:.0f} ms vs {npl['seconds'] * 1e3:.0f} ms; peak {lr['peak'] / lr['out_bytes']:.2f}x output",
         "note": "goal >= 0.8"},
        {"measure": f"load(split='train') with meta, float32 ({ld['rows']} rows) / np.load of all {n} rows",
         "ratio": npl["seconds"] / ld["seconds"],
         "value": f"{ld['seconds'] * 1e3:.0f} ms vs {npl['seconds'] * 1e3:.0f} ms; peak {ld['peak'] / 2**20:.0f} MiB = "
                  f"{ld['peak'] / out_ld:.2f}x output ({ld['out_bytes'] / 2**20:.0f} MiB features + "
                  f"{ld['meta_bytes'] / 2**20:.0f} MiB meta)",
         "note": "goals >= 0.8 of np.load; peak <= 1.2x output"},
    ]


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py (CPU only: the cache is read on the host)."""
    return table_rows(compare(50_000 if quick else 200_000, 768, 4096, repeat=3 if quick else 5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--part-rows", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--million", action="store_true", help="also 1,000,000 rows in 16 parts (about 1.5 GB on disk)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_extract import machine

    results = [compare(args.rows, args.dim, args.part_rows, args.repeat)]
    if args.million:
        results.append(compare(1_000_000, args.dim, 62_500, max(2, args.repeat // 2)))
    print(f"machine: {machine()}")
    print("| measure | ratio | value | note |")
    print("|---|---|---|---|")
    for r in results:
        for row in table_rows(r):
            print(f"| {row['measure']} | {row['ratio']:.2f} | {row['value']} | {row['note']} |")


if __name__ == "__main__":
    main()
