"""The performance suite: one table, every figure a ratio (or a time) measured in this run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--precision fp16] [--only extract,faiss]

Each module in MODULES exposes ``suite(quick, device) -> list[dict]`` with rows
``{"measure", "ratio", "value", "note"}`` (benchmarks/README interface); adding a backbone's
benchmark is one line here. The machine is named above the table. Not part of the tests.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: name -> module of benchmarks/ with a suite(); one line per module.
MODULES = {
    "extract": "bench_extract",  # clip: extraction vs bare forward, cache load, peak memory
    "heads": "bench_heads",  # head epoch from the cache vs recomputing; the Stage-2 ablation
    "faiss": "bench_faiss",  # FAISS kNN vs exact and vs scikit-learn
    "xlsr": "bench_xlsr",  # xlsr: frame extraction vs bare forward
    "mnv4": "bench_mnv4",  # the MobileNetV4 filter's training throughput
    "faap": "bench_faap",  # detr: one FAAP epoch from the query cache vs rerunning DETR
    "bootstrap": "bench_bootstrap",  # 1,000 bootstrap resamples of 10,000 predictions vs a plain loop
}


def run_suite(quick: bool, device: str | None, precision: str | None = None, only=None, echo=print) -> list[dict]:
    """Run every known module's suite and return its rows, each with its module and seconds."""
    rows = []
    for name, module_name in MODULES.items():
        if only and name not in only:
            continue
        fn = importlib.import_module(module_name).suite
        kwargs = {"precision": precision} if precision and "precision" in inspect.signature(fn).parameters else {}
        t = time.perf_counter()
        got = fn(quick, device, **kwargs)
        seconds = time.perf_counter() - t
        echo(f"  {name}: {len(got)} rows in {seconds:.0f} s", file=sys.stderr)
        rows.extend({**r, "module": name} for r in got)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| measure | ratio | value | note |", "|---|---|---|---|"]
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['measure']} | {ratio} | {r['value']} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and fewer epochs: minutes on a 2-core CPU")
    ap.add_argument("--device", default=None, help="cpu or cuda [cuda when present]")
    ap.add_argument("--precision", default=None, help="extraction precision [fp16 on CUDA, fp32 on CPU]")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(MODULES)}")
    args = ap.parse_args()
    import torch
    from bench_extract import machine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.only.split(",")) if args.only else None
    t = time.perf_counter()
    rows = run_suite(args.quick, device, args.precision, only, echo=print)
    total = time.perf_counter() - t
    print(f"machine: {machine()}; device {device}; {'--quick; ' if args.quick else ''}"
          f"suite wall time {total / 60:.1f} min")
    print(table(rows))


if __name__ == "__main__":
    main()
