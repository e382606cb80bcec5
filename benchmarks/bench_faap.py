"""FAAP from the DETR query cache against FAAP that reruns DETR on every step.

    python benchmarks/bench_faap.py [--n 200] [--model tiny] [--batch-size 32] [--device cpu]

One FAAP training epoch (generator, projection head, all three losses, optimizer step) whose
decoder queries come from the cache, against the same epoch (same samples, batches, model,
device) whose queries come from the frozen DETR rerun on the PNG files, as FAAP's original runs
did. Ratio = rerun / cache. ``suite()`` is the interface of benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.cache import open_cache  # noqa: E402
from featcache.config import resolve_config  # noqa: E402
from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_detection import synth_detection  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.heads.task import StepState, get_task  # noqa: E402


def faap_task(cache_path, batch_size: int, device: torch.device):
    cfg = resolve_config("faap", sets=[f"training.batch_size={batch_size}"])
    cfg["options"] = {}
    task = get_task("faap")(cfg, device)
    task.load(open_cache(cache_path), splits=("train",))
    task.spec = task.make_spec()
    task.module = task.build(task.spec).to(device)
    return task


def one_epoch(task, batches, hidden_of, state) -> float:
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-4)
    train = task.data["train"].tensors
    task.module.train()
    t = time.perf_counter()
    for idx in batches:
        batch = {k: v[idx][None] for k, v in train.items()}  # (R = 1, B, ...)
        batch["hidden"] = hidden_of(idx)[None]
        loss, _ = task.batch_loss(batch, state)
        opt.zero_grad()
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), 0.1)
        opt.step()
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(n: int = 200, model: str = "tiny", batch_size: int = 32, device: str = "cpu") -> dict:
    dev = torch.device(device)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-faap-"))
    try:
        synth_detection(work / "det", n=n, progress=False)
        extract("detr", work / "det" / "manifest.csv", work / "cache", model=model, device=device,
                num_workers=0, progress=False)
        task = faap_task(work / "cache", batch_size, dev)
        train = task.data["train"]
        rows_n = len(train)
        batches = [torch.arange(s, min(s + batch_size, rows_n)) for s in range(0, rows_n, batch_size)]
        bb = get_backbone("detr", model).to(dev)
        man = read_manifest(work / "det" / "manifest.csv")
        row_of = {sid: i for i, sid in enumerate(man.df["sample_id"])}
        dataset = bb.dataset(man.absolute_paths(), man.df)
        rows = np.array([row_of[s] for s in train.meta["sample_id"]])

        def rerun(idx):  # decode, preprocess and run the frozen DETR, as FAAP's original runs did
            _, inputs, _ = bb.collate([dataset[int(r)] for r in rows[idx.cpu().numpy()]])
            with torch.inference_mode():
                out = bb.net(pixel_values=inputs[0].to(dev), pixel_mask=inputs[1].to(dev))
            return out.last_hidden_state.float().clone()

        def cached(idx):
            return train.tensors["hidden"][idx]

        state = StepState(10, 30)  # past the warm-ups: every loss term is on
        one_epoch(task, batches[:2], cached, state)  # warm-up
        t_cache = one_epoch(task, batches, cached, state)
        t_rerun = one_epoch(task, batches, rerun, state)
        return {"n": rows_n, "model": model, "batch_size": batch_size, "cache_s": t_cache, "rerun_s": t_rerun,
                "ratio": t_rerun / t_cache}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def suite(quick: bool, device: str) -> list[dict]:
    r = measure(n=80 if quick else 400, model="tiny", batch_size=32, device=device)
    return [{"measure": f"FAAP epoch: rerun DETR / from the query cache ({r['n']} train images, tiny DETR, "
                        f"batch {r['batch_size']})",
             "ratio": r["ratio"], "value": f"{r['rerun_s']:.2f} s vs {r['cache_s']:.3f} s",
             "note": "same samples, batches, model and device; rerun decodes the PNGs and runs the frozen DETR"}]


def main() -> None:
    from bench_extract import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="synthetic detection images (60 %% are train)")
    ap.add_argument("--model", default="tiny", help="tiny (offline), or a DETR name or folder")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    r = measure(args.n, args.model, args.batch_size, args.device)
    print(f"machine: {machine()}; device {args.device}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| FAAP epoch, {r['n']} train images, detr {r['model']}, batch {r['batch_size']}: from the cache "
          f"| {r['cache_s']:.3f} s |")
    print(f"| same epoch rerunning the frozen DETR on the PNGs | {r['rerun_s']:.2f} s |")
    print(f"| **ratio rerun / cache** | **{r['ratio']:.1f}x** |")


if __name__ == "__main__":
    main()
