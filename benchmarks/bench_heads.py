"""Heads from the cache: speed against recomputing the backbone, and the ablation's wall time.

    python benchmarks/bench_heads.py [--n 600] [--model small] [--rows 10000] [--epochs 1]

1. One Stage-2 training epoch whose features come from the cache, against the same epoch
   (same samples, batches, model, device) whose features are recomputed by the frozen
   backbone from the PNG files, as the prior art did on every step. Ratio = recompute / cache.
2. The wall time of a 5-preset x 3-seed Stage-2 ablation on ``--rows`` cached 768-d samples,
   run for real with ``--epochs`` epochs per run. The time at the configs' 50 epochs is
   printed as derived from the measured per-epoch and per-run costs, and labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_extract import machine  # noqa: E402

from featcache.cache import open_cache  # noqa: E402
from featcache.config import resolve_config  # noqa: E402
from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_faces import synth_faces  # noqa: E402
from featcache.data.synth_features import synth_feature_cache  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.heads.task import StepState, get_task  # noqa: E402
from featcache.train import ablate, train_head  # noqa: E402


def stage2_task(cache_path, stage1_run, batch_size: int):
    cfg = resolve_config("stage2", sets=[f"training.batch_size={batch_size}"])
    cfg["options"] = {"stage1": str(stage1_run)}
    task = get_task("stage2")(cfg, torch.device("cpu"))
    task.load(open_cache(cache_path), splits=("train",))
    task.spec = task.make_spec()
    task.module = task.build(task.spec)
    return task


def one_epoch(task, batches, features, state) -> float:
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=3e-4)
    train = task.data["train"].tensors
    task.module.train()
    t = time.perf_counter()
    for idx in batches:
        batch = {k: v[idx] for k, v in train.items()}
        batch["x"] = features(idx)
        loss, _ = task.batch_loss(batch, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="synthetic face images for the epoch comparison")
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=10_000, help="cached samples for the ablation")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per ablation run")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-heads-"))
    try:
        # -- 1. one epoch from the cache against one that recomputes the backbone ------------------
        synth_faces(work / "faces", n=args.n, size=64, progress=False)
        extract("clip", work / "faces" / "manifest.csv", work / "det", model=args.model, progress=False)
        extract("clip", work / "faces" / "stage1_manifest.csv", work / "s1c", model=args.model, progress=False)
        train_head("stage1", work / "s1c", work / "s1", sets=["training.epochs=1"], progress=False)
        task = stage2_task(work / "det", work / "s1", args.batch_size)
        train = task.data["train"]
        n = len(train)
        batches = [torch.arange(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
        backbone = get_backbone("clip", args.model)
        man = read_manifest(work / "faces" / "manifest.csv")
        row_of = {sid: i for i, sid in enumerate(man.df["sample_id"])}
        dataset = backbone.dataset(man.absolute_paths())
        rows = np.array([row_of[s] for s in train.meta["sample_id"]])

        def recompute(idx):
            _, x, _ = backbone.collate([dataset[int(r)] for r in rows[idx.numpy()]])
            return torch.from_numpy(backbone.forward(x, torch.device("cpu"))["features"])

        state = StepState(10, 50)  # past the warm-up: every loss term is on
        one_epoch(task, batches[:2], lambda idx: train.tensors["x"][idx], state)  # warm-up
        t_cache = one_epoch(task, batches, lambda idx: train.tensors["x"][idx], state)
        t_recompute = one_epoch(task, batches, recompute, state)

        # -- 2. the 5-preset x 3-seed ablation on cached 768-d samples ------------------------------
        synth_feature_cache(work / "big", rows=args.rows, dim=args.dim)
        train_head("stage1", work / "big", work / "big_s1", sets=["training.epochs=1"], progress=False)
        t = time.perf_counter()
        df = ablate("stage2", work / "big", work / "abl", presets="all", seeds=(0, 1, 2),
                    sets=[f"training.epochs={args.epochs}"], options={"stage1": work / "big_s1"},
                    progress=False, echo=lambda *_: None)
        t_ablation = time.perf_counter() - t
        epoch_seconds = [json.loads(line)["seconds"] for log in (work / "abl").glob("*/seed*/log.jsonl")
                         for line in log.read_text().splitlines()]
        per_epoch = float(np.mean(epoch_seconds))  # training + val evaluation of one epoch
        per_run = (t_ablation - sum(epoch_seconds)) / len(df)  # loading, final evaluation, writing

        print(f"machine: {machine()}; device cpu")
        print("| measure | value |")
        print("|---|---|")
        print(f"| Stage-2 epoch, {n} samples, clip {args.model}, batch {args.batch_size}: from the cache "
              f"| {t_cache:.2f} s |")
        print(f"| same epoch recomputing the frozen backbone from PNGs | {t_recompute:.2f} s |")
        print(f"| **ratio recompute / cache** | **{t_recompute / t_cache:.1f}x** |")
        print(f"| ablation: 5 presets x 3 seeds x {args.epochs} epoch(s), {args.rows} x {args.dim} cached "
              f"| {t_ablation:.0f} s measured |")
        print(f"| one epoch (training and val evaluation), mean over the runs | {per_epoch:.2f} s measured |")
        print(f"| per run besides its epochs (loading, final evaluation, writing) | {per_run:.2f} s measured |")
        print(f"| the same ablation at the configs' 50 epochs (derived: 15 x (per run + 50 x per epoch)) "
              f"| {15 * (per_run + 50 * per_epoch) / 60:.0f} min derived |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
