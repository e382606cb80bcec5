"""The MobileNetV4 filter's training throughput (images/s), measured in one run.

    python benchmarks/bench_mnv4.py [--full] [--device cpu|cuda] [--workers N]

For each configuration, on synthetic PNG images written to a temporary folder:

* train step: what ``train-e2e`` does per batch: persistent DataLoader workers decode, resize and
  centre crop to uint8 (pinned on CUDA); on the device the design's augmentations per image
  (``mnv4.prepare_batch`` with a seeded generator), normalisation, forward, BCE, backward, AdamW
  step; channels-last on CUDA; in images/s over a second pass (the first starts the workers);
* bare step: forward + backward + AdamW step on one pre-made tensor batch of the same shape
  (channels-last on CUDA), the same precision; ratio = train-step / bare-step throughput (the
  share of the model's speed that survives the input pipeline; the goal on one H100 is >= 0.8);
* input pipeline alone: the training batches (augmented on the device) against the evaluation
  batches (normalised only) on the same images, as a ratio (the cost of the augmentations);
* on CUDA also the mixed-precision step (autocast fp16 + GradScaler) against fp32, as a ratio.

quick: mobilenetv4_conv_small at 64 px, batch 32 (issue 17's row). full adds the default
mobilenetv4_hybrid_medium at 256 px (random weights: the speed does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from featcache.e2e.mnv4 import (  # noqa: E402
    EpochSampler,
    create_model,
    data_config,
    pixel_loader,
    prepare_batch,
)


def _images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        if not p.is_file():
            Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(net, opt, scaler, x, y, device, amp):
    ctx = torch.autocast("cuda", dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = net(x).squeeze(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def default_workers() -> int:
    """Decoding workers: one core is left to the training process, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def measure(model: str, size: int, batch: int, steps: int, device: torch.device, amp=None,
            folder: Path | None = None, num_workers: int | None = None) -> dict:
    """images/s of the bare model step, and with ``folder`` of the full train step (loader and
    device-side augmentation included) and of the two input pipelines alone."""
    cl = device.type == "cuda"
    net = create_model(model, "none").to(device).train()
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    y = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(0)).float().to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # warm-up
        _step(net, opt, scaler, x, y, device, amp)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(net, opt, scaler, x, y, device, amp)
    _sync(device)
    bare = steps * batch / (time.perf_counter() - t0)
    if folder is None:
        return {"bare": bare, "full": None}
    workers = default_workers() if num_workers is None else num_workers
    paths = _images(folder, batch * steps, size)
    cfg = data_config(model, size)
    sampler = EpochSampler(len(paths), 0)
    loader = pixel_loader(paths, size, cfg, batch_size=batch, num_workers=workers, sampler=sampler, pin_memory=cl)

    def train_pass(epoch: int) -> tuple[int, float]:
        sampler.set_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(epoch)
        t0, n = time.perf_counter(), 0
        for _, pixels, _ in loader:
            xb = prepare_batch(pixels, device, cfg, generator=gen, channels_last=cl)
            _step(net, opt, scaler, xb, y[:len(xb)], device, amp)
            n += len(xb)
        _sync(device)
        return n, time.perf_counter() - t0

    train_pass(0)  # starts the persistent workers and warms the augmentation kernels
    n, dt = train_pass(1)
    full = n / dt
    loaders = {}
    for name, augment in (("augmented", True), ("eval", False)):
        gen = torch.Generator(device=device).manual_seed(0) if augment else None
        t0, n = time.perf_counter(), 0
        for _, pixels, _ in loader:
            n += len(prepare_batch(pixels, device, cfg, generator=gen, channels_last=cl))
        _sync(device)
        loaders[name] = n / (time.perf_counter() - t0)
    return {"bare": bare, "full": full, "loaders": loaders, "workers": workers}


def suite(quick: bool, device: str, num_workers: int | None = None) -> list[dict]:
    dev = torch.device(device)
    configs = [("mobilenetv4_conv_small", 64, 32, 4 if quick else 12)]
    if not quick:
        configs.append(("mobilenetv4_hybrid_medium", 256, 16, 3))
    rows = []
    for model, size, batch, steps in configs:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(model, size, batch, steps, dev, folder=Path(tmp), num_workers=num_workers)
        rows.append({
            "measure": f"mnv4 train step, {model} {size}px b{batch} ({dev.type}, {torch.get_num_threads()} threads, "
                       f"{r['workers']} workers)",
            "ratio": r["full"] / r["bare"],
            "value": f"{r['full']:.1f} images/s with decoding and device augmentation; bare fwd+bwd+AdamW "
                     f"{r['bare']:.1f} images/s",
            "note": "ratio = train-e2e step / bare model step throughput",
        })
        ld = r["loaders"]
        rows.append({
            "measure": f"mnv4 input pipeline, {size}px b{batch} ({dev.type}, {torch.get_num_threads()} threads)",
            "ratio": ld["augmented"] / ld["eval"],
            "value": f"training batches {ld['augmented']:.1f} images/s; evaluation batches {ld['eval']:.1f} images/s",
            "note": "ratio = augmented / normalised-only batch throughput (decoding included in both)",
        })
        if dev.type == "cuda":
            fp16 = measure(model, size, batch, steps, dev, amp=torch.float16)
            rows.append({
                "measure": f"mnv4 mixed precision, {model} {size}px b{batch} (cuda)",
                "ratio": fp16["bare"] / r["bare"],
                "value": f"fp16 autocast {fp16['bare']:.1f} images/s vs fp32 {r['bare']:.1f} images/s",
                "note": "ratio = fp16 / fp32 bare step throughput",
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also the default hybrid_medium at 256 px")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None, help="decoding workers [cores - 1, at most 8]")
    args = ap.parse_args()
    from bench_extract import machine

    print(machine())
    for row in suite(not args.full, args.device, args.workers):
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x  "
        print(f"{row['measure']}: {ratio}{row['value']}  ({row['note']})")


if __name__ == "__main__":
    main()
