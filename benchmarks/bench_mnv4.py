"""The MobileNetV4 filter's training throughput (images/s), measured in one run.

    python benchmarks/bench_mnv4.py [--full] [--device cpu|cuda]

For each configuration, on synthetic PNG images written to a temporary folder:

* train step: what ``train-e2e`` does per batch (decode, timm's resize and crop, the design's
  augmentations and normalisation in the DataLoader, forward, BCE, backward, AdamW step), in images/s;
* bare step: forward + backward + AdamW step on one pre-made tensor batch of the same shape;
  ratio = train-step / bare-step throughput (the share of the model's speed that survives the
  input pipeline; 1.0 means decoding costs nothing);
* input pipeline alone: the training loader (augmented) against the evaluation loader
  (timm's transform, no augmentation) on the same images, as a ratio (the cost of the design's
  augmentations: flip, colour jitter, affine, a Gaussian blur on every image);
* on CUDA also the mixed-precision step (autocast fp16 + GradScaler) against fp32, as a ratio.

quick: mobilenetv4_conv_small at 64 px (the demo's filter). full adds the default
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

from featcache.e2e.mnv4 import create_model, image_loader  # noqa: E402


def _images(folder: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
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


def measure(model: str, size: int, batch: int, steps: int, device: torch.device, amp=None,
            folder: Path | None = None) -> dict:
    """images/s of the full train step (loader included) and of the bare model step."""
    net = create_model(model, "none").to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    y = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(0)).float().to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    _step(net, opt, scaler, x, y, device, amp)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(net, opt, scaler, x, y, device, amp)
    _sync(device)
    bare = steps * batch / (time.perf_counter() - t0)
    full = None
    if folder is not None:
        paths = _images(folder, batch * steps, size)
        loader = image_loader(paths, size, train=True, batch_size=batch, generator=torch.Generator().manual_seed(0),
                              model=model)
        t0 = time.perf_counter()
        n = 0
        for _, xb, _ in loader:
            _step(net, opt, scaler, xb.to(device), y[:len(xb)], device, amp)
            n += len(xb)
        _sync(device)
        full = n / (time.perf_counter() - t0)
        loaders = {}
        for name, train in (("augmented", True), ("eval", False)):
            t0 = time.perf_counter()
            n = sum(len(xb) for _, xb, _ in image_loader(paths, size, train=train, batch_size=batch, model=model,
                                                         generator=torch.Generator().manual_seed(0)))
            loaders[name] = n / (time.perf_counter() - t0)
        return {"bare": bare, "full": full, "loaders": loaders}
    return {"bare": bare, "full": full}


def suite(quick: bool, device: str) -> list[dict]:
    dev = torch.device(device)
    configs = [("mobilenetv4_conv_small", 64, 32, 4 if quick else 12)]
    if not quick:
        configs.append(("mobilenetv4_hybrid_medium", 256, 16, 3))
    rows = []
    for model, size, batch, steps in configs:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(model, size, batch, steps, dev, folder=Path(tmp))
        rows.append({
            "measure": f"mnv4 train step, {model} {size}px b{batch} ({dev.type}, {torch.get_num_threads()} threads)",
            "ratio": r["full"] / r["bare"],
            "value": f"{r['full']:.1f} images/s with decoding+augmentation; bare fwd+bwd+AdamW {r['bare']:.1f} images/s",
            "note": "ratio = train-e2e step / bare model step throughput",
        })
        ld = r["loaders"]
        rows.append({
            "measure": f"mnv4 input pipeline, {size}px b{batch} ({dev.type}, {torch.get_num_threads()} threads)",
            "ratio": ld["augmented"] / ld["eval"],
            "value": f"training loader {ld['augmented']:.1f} images/s; evaluation loader {ld['eval']:.1f} images/s",
            "note": "ratio = augmented / unaugmented loader throughput (decoding included in both)",
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
    args = ap.parse_args()
    from bench_extract import machine

    print(machine())
    for row in suite(not args.full, args.device):
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x  "
        print(f"{row['measure']}: {ratio}{row['value']}  ({row['note']})")


if __name__ == "__main__":
    main()
