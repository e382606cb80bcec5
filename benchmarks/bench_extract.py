"""Extraction and cache-load throughput, as ratios measured in one run.

    python benchmarks/bench_extract.py [--n 2000] [--model small] [--device cpu]

1. Extraction (PNG decoding in DataLoader workers, forward, fp16 cache writes) against the
   bare backbone forward on the same batches, already decoded and in memory.
   A ratio of 1.0 means extraction costs nothing beyond the forward pass.
2. Loading the cached features into memory against ``np.load`` of the same array from a
   ``.npy`` file (both from the page cache, best of several runs).

Not part of the tests: the figures go in the README's performance section, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.cache import open_cache  # noqa: E402
from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_faces import synth_faces  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.extract.runner import resolve_device  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images")
    ap.add_argument("--model", default="small", help="clip model (offline presets: tiny, small)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--size", type=int, default=64, help="synthetic image side")
    ap.add_argument("--load-rows", type=int, default=200_000, help="rows of the cache-load comparison")
    ap.add_argument("--load-dim", type=int, default=768)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        synth_faces(work / "data", n=args.n, seed=0, size=args.size, progress=False)
        manifest = work / "data" / "manifest.csv"
        n = len(read_manifest(manifest))

        # -- 1. extraction against the bare forward on the same batches --------------------------
        bb = get_backbone("clip", args.model).to(dev)
        man_ = read_manifest(manifest)
        ds = bb.dataset(man_.absolute_paths(), man_.df)
        batches = [bb.collate([ds[i] for i in range(s, min(s + args.batch_size, n))])[1]
                   for s in range(0, n, args.batch_size)]
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]

        def bare():
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                for x in batches:
                    bb.forward(x, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        bare()  # warm-up
        t_bare = best_of(bare, 2)

        def full():
            shutil.rmtree(work / "cache", ignore_errors=True)
            extract("clip", manifest, work / "cache", model=args.model, batch_size=args.batch_size,
                    num_workers=args.num_workers, device=args.device, precision=args.precision,
                    progress=False)

        t_full = best_of(full, 2)

        # -- 2. cache load against np.load of the same array ----------------------------------------
        rng = np.random.default_rng(0)
        feats = rng.normal(size=(args.load_rows, args.load_dim)).astype(np.float16)
        npy = work / "features.npy"
        np.save(npy, feats)
        import pandas as pd

        from featcache.cache.store import CacheSpec, CacheWriter

        meta = pd.DataFrame({"sample_id": np.arange(args.load_rows).astype(str), "split": "train",
                             "label": np.zeros(args.load_rows, np.int8)})
        spec = CacheSpec(kind="pooled", backbone={"name": "bench"}, preprocess={}, manifest_sha256="0",
                         rows=args.load_rows)
        with CacheWriter(work / "load", spec, meta) as w:
            for i in w.missing_parts():
                s, e = w.part_bounds(i)
                w.write_part(i, {"features": feats[s:e]}, np.ones(e - s, bool))
            w.finalize()
        cache = open_cache(work / "load")
        assert np.array_equal(cache.load_rows("features"), np.load(npy))
        t_np = best_of(lambda: np.load(npy), 5)
        t_cache = best_of(lambda: cache.load_rows("features"), 5)
        t_load = best_of(lambda: cache.load(split="train"), 3)

        mb = feats.nbytes / 2**20
        print(f"machine: {machine()}; device {dev}")
        print("| measure | featcache | reference | ratio |")
        print("|---|---|---|---|")
        print(f"| extraction, clip {args.model}, {n} PNGs {args.size}px, {args.precision}, batch {args.batch_size} "
              f"| {n / t_full:.0f} img/s | bare forward {n / t_bare:.0f} img/s | {t_bare / t_full:.2f} |")
        print(f"| cache load, {args.load_rows} x {args.load_dim} fp16 ({mb:.0f} MiB) "
              f"| {mb / t_cache:.0f} MiB/s | np.load {mb / t_np:.0f} MiB/s | {t_np / t_cache:.2f} |")
        print(f"| `load(split=...)` with meta, same cache | {mb / t_load:.0f} MiB/s | np.load | {t_np / t_load:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
