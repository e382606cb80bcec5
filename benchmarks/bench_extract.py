"""Extraction and cache-load throughput, as ratios measured in one run.

    python benchmarks/bench_extract.py [--n 2000] [--model small] [--device cpu]

(``suite()`` gives the same figures, and peak memory at N and 4N samples, to benchmarks/run.py.)

1. Extraction (PNG decoding in DataLoader workers, forward, fp16 cache writes) against the
   bare backbone forward on the same batches, already decoded and in memory.
   A ratio of 1.0 means extraction costs nothing beyond the forward pass.
2. Loading the cached features into memory against ``np.load`` of the same array from a
   ``.npy`` file (both from the page cache, best of several runs).

Not part of the tests: the figures go in the README's performance section, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from featcache.cache import open_cache  # noqa: E402
from featcache.cache.store import CacheSpec, CacheWriter  # noqa: E402
from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_faces import synth_faces  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.extract.runner import default_num_workers  # noqa: E402
from featcache.runtime import resolve_device  # noqa: E402


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


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def extraction_vs_bare(manifest, work: Path, *, model: str, pretrained: str | None = None, batch_size: int = 64,
                       num_workers: int | None = None, device: str | None = None, precision: str = "fp32",
                       repeat: int = 2, decode: str = "cpu") -> dict:
    """Extraction (decoding in workers, forward, fp16 writes) against the bare forward on the same batches.

    The bare side decodes every batch first and keeps it in memory (uint8, pinned on CUDA), then
    times only the model on them (``forward_async``: the copy to the device, normalisation and
    forward, one synchronisation at the end); the extraction side is :func:`extract` from the files.
    """
    dev = resolve_device(device)
    bb = get_backbone("clip", model, pretrained).to(dev)
    man = read_manifest(manifest)
    n = len(man)
    ds = bb.dataset(man.absolute_paths(), man.df)
    batches = [bb.collate([ds[i] for i in range(s, min(s + batch_size, n))])[1] for s in range(0, n, batch_size)]
    if dev.type == "cuda":
        batches = [torch.utils.data._utils.pin_memory.pin_memory(b) for b in batches]
    dtype = PRECISIONS[precision]
    run = getattr(bb, "forward_async", bb.forward)

    def bare():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            for x in batches:
                run(x, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    bare()  # warm-up
    t_bare = best_of(bare, repeat)
    batches.clear()  # free the decoded inputs before extracting

    def full() -> float:  # the extraction's own seconds: building the model is not timed
        shutil.rmtree(work / "cache", ignore_errors=True)
        return extract("clip", manifest, work / "cache", model=model, pretrained=pretrained, batch_size=batch_size,
                       num_workers=num_workers, device=device, precision=precision, decode=decode,
                       progress=False).seconds

    t_full = min(full() for _ in range(repeat))
    shutil.rmtree(work / "cache", ignore_errors=True)
    return {"n": n, "bare": t_bare, "full": t_full}


def cache_load(work: Path, rows: int, dim: int) -> dict:
    """Loading cached features against ``np.load`` of the same array (both from the page cache)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(rows, dim)).astype(np.float16)
    npy = work / "features.npy"
    np.save(npy, feats)
    meta = pd.DataFrame({"sample_id": np.arange(rows).astype(str), "split": "train",
                         "label": np.zeros(rows, np.int8)})
    spec = CacheSpec(kind="pooled", backbone={"name": "bench"}, preprocess={}, manifest_sha256="0", rows=rows)
    with CacheWriter(work / "load", spec, meta) as w:
        for i in w.missing_parts():
            s, e = w.part_bounds(i)
            w.write_part(i, {"features": feats[s:e]}, np.ones(e - s, bool))
        w.finalize()
    cache = open_cache(work / "load")
    assert np.array_equal(cache.load_rows("features"), np.load(npy))
    out = {"mb": feats.nbytes / 2**20, "np": best_of(lambda: np.load(npy), 5),
           "cache": best_of(lambda: cache.load_rows("features"), 5),
           "load": best_of(lambda: cache.load(split="train"), 3)}
    shutil.rmtree(work / "load")
    npy.unlink()
    return out


_PEAK_CHILD = """
import json, os, sys, threading, time
from featcache.extract import extract
from featcache.data.manifest import read_manifest
model, part_rows, warm_manifest, out, *manifests = sys.argv[1:]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
kw = dict(model=model, batch_size=64, num_workers=0, part_rows=int(part_rows), device="cpu", progress=False)
extract("clip", warm_manifest, out + "/warm", **kw)  # the same settings, so that what is measured is what grows
result = []
for i, manifest in enumerate(manifests):
    meta = int(read_manifest(manifest).df.memory_usage(deep=True).sum())
    before, peak, running = rss(), [0], [True]
    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    extract("clip", manifest, f"{out}/{i}", **kw)
    running[0] = False
    t.join()
    result.append({"before": before, "peak": max(peak[0], rss()), "meta_bytes": meta})
print(json.dumps(result))
"""


def tiled_manifest(root: Path, rows: int, *, files: list[str] | None = None, side: int = 48) -> Path:
    """A manifest of ``rows`` samples cycling over ``files`` (default 16 small noise PNGs made here).

    Every row is decoded for real; repeating files keeps the data set small on disk.
    """
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if files is None:
        rng = np.random.default_rng(0)
        files = []
        for i in range(16):
            f = root / f"{i:02d}.png"
            if not f.exists():
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(f)
            files.append(str(f.resolve()))
    ids = np.arange(rows)
    df = pd.DataFrame({"sample_id": [f"s{i:07d}" for i in ids], "path": [files[i % len(files)] for i in ids],
                       "label": ids % 2, "split": np.array(["train", "val", "test", "train"])[ids % 4]})
    manifest = root / f"manifest_{rows}.csv"
    df.to_csv(manifest, index=False)
    return manifest


def peak_memory(work: Path, n: int, *, model: str = "tiny", part_rows: int = 256) -> dict:
    """How much resident memory an extraction adds, at ``n`` and then ``4 n`` samples.

    A child process first runs a two-part extraction with the same settings (imports, model,
    allocator pools), then samples
    its resident set every 2 ms during each measured one: the peak above the RSS before it.
    """
    manifests = [tiled_manifest(work / "mem", rows) for rows in (n, 4 * n)]
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, model, str(part_rows),
                           str(tiled_manifest(work / "mem", 2 * part_rows)), str(work / "mem_caches"), *map(str, manifests)],
                          capture_output=True, text=True, check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    small, large = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(work / "mem_caches")
    return {n: small, 4 * n: large}


def suite(quick: bool, device: str, precision: str | None = None) -> list[dict]:
    """Rows for benchmarks/run.py: extraction against the bare forward, cache load, peak memory."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    precision = precision or ("fp16" if cuda else "fp32")
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-extract-"))
    rows = []
    try:
        if cuda:  # ViT-L/14 from 256 px PNG faces; random weights (same throughput as pretrained)
            n, size, model, pretrained, batch = (4096 if quick else 8192), 256, "ViT-L-14", "none", 256
            synth_faces(work / "data", n=512, seed=0, size=size, progress=False)
            files = [str(p.resolve()) for p in sorted((work / "data").rglob("*.png"))]
            manifest = tiled_manifest(work / "tiled", n, files=files)
        else:
            n, size, model, pretrained, batch = (300 if quick else 2000), 64, "small", None, 64
            synth_faces(work / "data", n=n, seed=0, size=size, progress=False)
            manifest = work / "data" / "manifest.csv"
        repeat = 1 if quick else 2
        r = extraction_vs_bare(manifest, work, model=model, pretrained=pretrained, batch_size=batch,
                               device=str(dev), precision=precision, repeat=repeat)
        rows.append({
            "measure": f"extraction / bare forward, clip {model}, {r['n']} PNG decodes {size} px, {precision}, batch {batch}",
            "ratio": r["bare"] / r["full"],
            "value": f"{r['n'] / r['full']:.0f} img/s vs {r['n'] / r['bare']:.0f} img/s",
            "note": "goal >= 0.9; bare = forward only on pre-decoded batches in memory",
        })
        if not cuda:  # decoding in DataLoader workers against decoding in the main process
            r0 = extraction_vs_bare(manifest, work, model=model, batch_size=batch, num_workers=0,
                                    device=str(dev), precision=precision, repeat=repeat)
            rows.append({
                "measure": f"extraction with decoding in {default_num_workers()} DataLoader worker(s) / in the main process",
                "ratio": r0["full"] / r["full"],
                "value": f"{r['n'] / r['full']:.0f} img/s vs {r0['n'] / r0['full']:.0f} img/s",
                "note": "above 1: workers help",
            })
        load_rows = 50_000 if quick else 200_000
        c = cache_load(work, load_rows, 768)
        rows.append({"measure": f"cache load / np.load, {load_rows} x 768 fp16 ({c['mb']:.0f} MiB)",
                     "ratio": c["np"] / c["cache"], "value": f"{c['mb'] / c['cache']:.0f} vs {c['mb'] / c['np']:.0f} MiB/s",
                     "note": "load_rows('features'); np.load is one contiguous read"})
        rows.append({"measure": "load(split='train') with meta and float32 / np.load",
                     "ratio": c["np"] / c["load"], "value": f"{c['mb'] / c['load']:.0f} MiB/s", "note": "what a head gets"})
        n_mem = 500 if quick else 5000
        m = peak_memory(work, n_mem)
        a, b = m[n_mem], m[4 * n_mem]
        added_a, added_b = a["peak"] - a["before"], b["peak"] - b["before"]
        rows.append({
            "measure": f"memory added by extraction, {4 * n_mem} / {n_mem} samples (clip tiny, CPU, one process)",
            "ratio": added_b / added_a,
            "value": f"{added_b / 2**20:.0f} vs {added_a / 2**20:.0f} MiB",
            "note": f"peak RSS above the RSS before, sampled every 2 ms; the manifest's own frame is "
                    f"{b['meta_bytes'] / 2**20:.1f} vs {a['meta_bytes'] / 2**20:.1f} MiB",
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


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
        r = extraction_vs_bare(work / "data" / "manifest.csv", work, model=args.model, batch_size=args.batch_size,
                               num_workers=args.num_workers, device=args.device, precision=args.precision)
        c = cache_load(work, args.load_rows, args.load_dim)
        n, mb = r["n"], c["mb"]
        print(f"machine: {machine()}; device {dev}")
        print("| measure | featcache | reference | ratio |")
        print("|---|---|---|---|")
        print(f"| extraction, clip {args.model}, {n} PNGs {args.size}px, {args.precision}, batch {args.batch_size} "
              f"| {n / r['full']:.0f} img/s | bare forward {n / r['bare']:.0f} img/s | {r['bare'] / r['full']:.2f} |")
        print(f"| cache load, {args.load_rows} x {args.load_dim} fp16 ({mb:.0f} MiB) "
              f"| {mb / c['cache']:.0f} MiB/s | np.load {mb / c['np']:.0f} MiB/s | {c['np'] / c['cache']:.2f} |")
        print(f"| `load(split=...)` with meta, same cache | {mb / c['load']:.0f} MiB/s | np.load "
              f"| {c['np'] / c['load']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
