"""XLS-R frame extraction against the bare forward, as a ratio measured in one run.

    python benchmarks/bench_xlsr.py [--n 120] [--model tiny] [--device cpu] [--quick]

Extraction (FLAC decoding, resampling and normalisation in DataLoader workers, padded batches
with attention masks, forward, frame labels, fp16 flat frames + offsets written to Zarr) against
the bare backbone forward on the same padded batches, already decoded and in memory.  A ratio
of 1.0 means extraction costs nothing beyond the forward pass.  ``suite(quick, device)`` is the
interface of benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_extract import best_of  # noqa: E402

from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_audio import synth_audio  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.runtime import resolve_device  # noqa: E402


def measure(n: int = 120, model: str = "tiny", batch_size: int = 8, device: str | None = None,
            num_workers: int | None = None, max_seconds: float = 6.0, repeat: int = 2) -> dict:
    dev = resolve_device(device)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-xlsr-"))
    try:
        synth_audio(work / "data", n=n, seed=0, max_seconds=max_seconds, progress=False)
        manifest = work / "data" / "manifest.csv"
        man = read_manifest(manifest)
        bb = get_backbone("xlsr", model).to(dev)
        ds = bb.dataset(man.absolute_paths(), man.df)
        batches = [bb.collate([ds[i] for i in range(s, min(s + batch_size, n))])[1] for s in range(0, n, batch_size)]
        audio_seconds = sum(float(b[2].sum()) for b in batches) / 16000

        run = getattr(bb, "forward_async", bb.forward)  # the model alone: one synchronisation at the end

        def bare():
            for x in batches:
                run(x, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        bare()  # warm-up
        t_bare = best_of(bare, repeat)

        def full():
            shutil.rmtree(work / "cache", ignore_errors=True)
            extract("xlsr", manifest, work / "cache", model=model, batch_size=batch_size, device=str(dev),
                    num_workers=num_workers, progress=False)

        t_full = best_of(full, repeat)
        return {"n": n, "audio_seconds": audio_seconds, "bare_s": t_bare, "extract_s": t_full,
                "ratio": t_bare / t_full, "device": str(dev), "model": model, "batch_size": batch_size}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py: extraction throughput over the bare forward (measured now)."""
    r = measure(n=30 if quick else 120, max_seconds=3.0 if quick else 6.0, device=device,
                repeat=1 if quick else 2, num_workers=1 if quick else None)
    return [{
        "measure": f"xlsr {r['model']} extraction vs bare forward ({r['n']} utterances, {r['audio_seconds']:.0f} s audio)",
        "ratio": r["ratio"],
        "value": f"{r['audio_seconds'] / r['extract_s']:.0f} s audio/s (bare {r['audio_seconds'] / r['bare_s']:.0f})",
        "note": f"batch {r['batch_size']}, {r['device']}; 1.0 = extraction costs nothing beyond the forward",
    }]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="utterances (1-6 s)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="the suite's quick setting")
    args = ap.parse_args()
    if args.quick:
        rows = suite(True, args.device or "cpu")
        for row in rows:
            print(row)
        return
    r = measure(args.n, args.model, args.batch_size, args.device, args.num_workers)
    print(f"| xlsr {r['model']}, {r['n']} utterances ({r['audio_seconds']:.0f} s), batch {r['batch_size']}, {r['device']} "
          f"| {r['audio_seconds'] / r['extract_s']:.1f} s audio/s | bare forward {r['audio_seconds'] / r['bare_s']:.1f} s audio/s "
          f"| {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
