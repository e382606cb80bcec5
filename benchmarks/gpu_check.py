"""Every GPU figure of issue 17 in one run, within about 5 minutes on one H100.

    python benchmarks/gpu_check.py                 # on the GPU; log and table to $OUT if set
    python benchmarks/gpu_check.py --cpu --quick   # a small smoke run of the same code on the CPU

Figures, each printed the moment it is measured (goals from the issue):
1. CLIP ViT-L/14 fp16 extraction from 256-px PNGs (a few PNGs repeated, every row decoded)
   against the bare forward on the same batches, in the same run: >= 3,000 img/s and >= 0.9.
2. The same from JPEGs with ``--decode gpu`` (CUDA only): decoding on the GPU.
3. XLS-R ``tiny`` frame extraction against its bare forward: >= 0.8.
4. MobileNetV4 conv_small train step (loader, augmentation) against the bare step: >= 0.8
   (``benchmarks/bench_mnv4.measure``; fp16 autocast as well on CUDA).
5. The Stage-2 ablation (``benchmarks/bench_heads.ablation``), in whatever time is left.
Random weights throughout (the same cost as pretrained ones); nothing is downloaded.
The run ends with a markdown table naming the device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

T0 = time.perf_counter()
LOG: list[str] = []
ROWS: list[dict] = []


def say(text: str) -> None:
    line = f"[{time.perf_counter() - T0:6.1f} s] {text}"
    print(line, flush=True)
    LOG.append(line)
    out = os.environ.get("OUT")
    if out:  # written as it goes: a run stopped by a time limit leaves what it measured
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "gpu_check.log", "a") as fh:
            fh.write(line + "\n")


def figure(name: str, value: str, ratio: float | None, goal: str) -> None:
    ROWS.append({"figure": name, "value": value, "ratio": ratio, "goal": goal})
    say(f"FIGURE {name}: {value}" + (f"; ratio {ratio:.2f}" if ratio is not None else "") + f" (goal {goal})")


def photos(folder: Path, n: int, side: int, fmt: str) -> list[str]:
    """``n`` photo-like images (smooth colour, texture) of ``side`` px, to be repeated by a manifest."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:side, 0:side] / side
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + i / 3)], -1) * 80 + 128
        img = np.clip(base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        f = folder / f"{i:02d}.{fmt}"
        Image.fromarray(img).save(f, **({"quality": 90} if fmt == "jpg" else {}))
        out.append(str(f.resolve()))
    return out


def clip_figures(work: Path, cuda: bool, quick: bool) -> None:
    from bench_extract import extraction_vs_bare, tiled_manifest

    if cuda:
        n, model, batch, side, precision = (2048 if quick else 4096), "ViT-L-14", 256, 256, "fp16"
    else:
        n, model, batch, side, precision = (128 if quick else 1024), "tiny", 32, 64, "fp32"
    pretrained = "none" if model not in ("tiny", "small") else None
    for fmt, decode in (("png", "cpu"), ("jpg", "gpu")):
        if decode == "gpu" and not cuda:
            say("skipped: --decode gpu needs CUDA")
            continue
        manifest = tiled_manifest(work / fmt, n, files=photos(work / f"{fmt}_files", 32, side, fmt))
        r = extraction_vs_bare(manifest, work, model=model, pretrained=pretrained, batch_size=batch,
                               device="cuda" if cuda else "cpu", precision=precision, repeat=1, decode=decode)
        figure(f"CLIP {model} {precision}, {n} {fmt.upper()}s of {side} px, batch {batch}, --decode {decode}",
               f"{n / r['full']:.0f} img/s end to end vs {n / r['bare']:.0f} img/s bare", r["bare"] / r["full"],
               ">= 3,000 img/s and >= 0.9" if cuda else ">= 0.9 (CPU)")


def xlsr_figure(cuda: bool, quick: bool) -> None:
    from bench_xlsr import measure

    n, secs, batch = (60 if quick else 120, 6.0, 16) if cuda else (15 if quick else 60, 2.0 if quick else 6.0, 4)
    r = measure(n=n, model="tiny", batch_size=batch, device="cuda" if cuda else "cpu", max_seconds=secs, repeat=1)
    figure(f"XLS-R tiny frames, {r['n']} utterances ({r['audio_seconds']:.0f} s audio), batch {batch}",
           f"{r['audio_seconds'] / r['extract_s']:.0f} s audio/s end to end vs {r['audio_seconds'] / r['bare_s']:.0f} bare",
           r["ratio"], ">= 0.8")


def mnv4_figures(work: Path, cuda: bool, quick: bool) -> None:
    from bench_mnv4 import measure

    dev = torch.device("cuda" if cuda else "cpu")
    steps = (20 if quick else 40) if cuda else 2
    amps = [None, torch.float16] if cuda else [None]
    (work / "mnv4").mkdir(parents=True, exist_ok=True)
    for amp in amps:
        r = measure("mobilenetv4_conv_small", 64, 32, steps, dev, amp=amp, folder=work / "mnv4")
        label = "fp16 autocast" if amp is not None else "fp32"
        figure(f"MobileNetV4 conv_small train step, 64 px, batch 32, {label}",
               f"{r['full']:.0f} img/s with loader vs {r['bare']:.0f} img/s bare", r["full"] / r["bare"], ">= 0.8")


def ablation_figure(work: Path, cuda: bool, quick: bool, seconds_left: float) -> None:
    import bench_heads

    if not hasattr(bench_heads, "ablation"):
        say("skipped: benchmarks/bench_heads.py offers no ablation()")
        return
    if seconds_left < 30:
        say(f"skipped: the ablation, {seconds_left:.0f} s left of the budget")
        return
    import json
    import subprocess

    rows, epochs = (500, 1) if (quick or not cuda) else (10_000, None)
    # In a child process with what is left of the budget: a slow ablation cannot push the
    # whole check past its limit.
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import bench_heads; "
            "print(json.dumps(bench_heads.ablation(Path(sys.argv[2]), rows=int(sys.argv[3]), dim=768, "
            "epochs=None if sys.argv[4] == 'none' else int(sys.argv[4]), device=sys.argv[5])))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(work / "abl"),
                               str(rows), str(epochs or "none"), "cuda" if cuda else "cpu"],
                              capture_output=True, text=True, timeout=seconds_left - 10)
    except subprocess.TimeoutExpired:
        say(f"skipped: the ablation did not finish in the {seconds_left - 10:.0f} s left of the budget")
        return
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "the ablation failed")
    a = json.loads(proc.stdout.strip().splitlines()[-1])
    figure(f"Stage-2 ablation, 5 presets x 3 seeds, {rows} x 768 cached" + (f", {epochs} epoch" if epochs else ""),
           f"{a['wall']:.0f} s ({a['per_epoch']:.2f} s per epoch with val)", None, "the ablation issue's")


def device_name(cuda: bool) -> str:
    from bench_extract import machine

    return (torch.cuda.get_device_name(0) + "; " if cuda else "CPU; ") + machine()


def table(cuda: bool) -> str:
    lines = [f"GPU check on {device_name(cuda)}", "", "| figure | measured | ratio | goal |", "|---|---|---|---|"]
    for r in ROWS:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['figure']} | {r['value']} | {ratio} | {r['goal']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke run of the same code)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds; the ablation runs only in what is left")
    ap.add_argument("--only", default=None, help="comma-separated subset of clip,xlsr,mnv4,ablation")
    args = ap.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("error: no CUDA device is visible; pass --cpu --quick for the CPU smoke run", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    only = set(args.only.split(",")) if args.only else None
    out = os.environ.get("OUT")
    say(f"gpu_check on {device_name(cuda)}")
    work = Path(tempfile.mkdtemp(prefix="featcache-gpu-check-"))
    failures = 0
    try:
        steps = [("clip", lambda: clip_figures(work, cuda, args.quick)),
                 ("xlsr", lambda: xlsr_figure(cuda, args.quick)),
                 ("mnv4", lambda: mnv4_figures(work, cuda, args.quick)),
                 ("ablation", lambda: ablation_figure(work, cuda, args.quick,
                                                      args.budget - (time.perf_counter() - T0)))]
        for name, step in steps:
            if only and name not in only:
                continue
            try:
                step()
            except Exception as exc:  # one figure failing must not hide the others
                failures += 1
                say(f"FAILED {name}: {type(exc).__name__}: {exc}")
                LOG.append(traceback.format_exc())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        text = table(cuda)
        print(text, flush=True)
        say(f"done in {time.perf_counter() - T0:.0f} s, {failures} step(s) failed")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            with open(Path(out) / "gpu_check.log", "a") as fh:  # the tracebacks of failed steps
                fh.write("\n".join(line for line in LOG if not line.startswith("[")) + "\n")
            (Path(out) / "gpu_check.md").write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
