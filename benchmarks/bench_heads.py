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
from featcache.cache.synth import synth_feature_cache  # noqa: E402
from featcache.config import resolve_config  # noqa: E402
from featcache.data.manifest import read_manifest  # noqa: E402
from featcache.data.synth_faces import synth_faces  # noqa: E402
from featcache.extract import extract, get_backbone  # noqa: E402
from featcache.heads.task import StepState, get_task, load_run  # noqa: E402
from featcache.train import ablate, train_head  # noqa: E402


def stage2_task(cache_path, stage1_run, batch_size: int, device: torch.device | None = None):
    cfg = resolve_config("stage2", sets=[f"training.batch_size={batch_size}"])
    cfg["options"] = {"stage1": str(stage1_run)}
    task = get_task("stage2")(cfg, device or torch.device("cpu"))
    task.inputs["stage1"] = load_run(stage1_run, task.device)
    task.load(open_cache(cache_path), splits=("train",))
    task.spec = task.make_spec()
    task.module = task.build(task.spec).to(task.device)
    return task


def one_epoch(task, batches, features, state) -> float:
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=3e-4)
    train = task.data["train"].tensors
    task.module.train()
    t = time.perf_counter()
    for idx in batches:
        batch = {k: v[idx][None] for k, v in train.items()}  # (R = 1, B, ...)
        batch["x"] = features(idx)[None]
        loss, _ = task.batch_loss(batch, state)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def epoch_cache_vs_recompute(work: Path, *, n: int, model: str, batch_size: int, device: str = "cpu") -> dict:
    """One Stage-2 epoch from the cache against the same epoch recomputing the frozen backbone."""
    dev = torch.device(device)
    synth_faces(work / "faces", n=n, size=64, progress=False)
    extract("clip", work / "faces" / "manifest.csv", work / "det", model=model, device=device, progress=False)
    extract("clip", work / "faces" / "stage1_manifest.csv", work / "s1c", model=model, device=device, progress=False)
    train_head("stage1", work / "s1c", work / "s1", sets=["training.epochs=1", f"training.device={device}"],
               progress=False)
    task = stage2_task(work / "det", work / "s1", batch_size, dev)
    train = task.data["train"]
    n_train = len(train)
    batches = [torch.arange(s, min(s + batch_size, n_train)) for s in range(0, n_train, batch_size)]
    backbone = get_backbone("clip", model).to(dev)
    man = read_manifest(work / "faces" / "manifest.csv")
    row_of = {sid: i for i, sid in enumerate(man.df["sample_id"])}
    dataset = backbone.dataset(man.absolute_paths())
    rows = np.array([row_of[s] for s in train.meta["sample_id"]])

    def recompute(idx):
        _, x, _ = backbone.collate([dataset[int(r)] for r in rows[idx.numpy()]])
        return torch.from_numpy(backbone.forward(x, dev)["features"]).to(dev)

    def cached(idx):
        return train.tensors["x"][idx]

    state = StepState(10, 50)  # past the warm-up: every loss term is on
    one_epoch(task, batches[:2], cached, state)  # warm-up
    return {"n": n_train, "cache": one_epoch(task, batches, cached, state),
            "recompute": one_epoch(task, batches, recompute, state)}


def ablation(work: Path, *, rows: int, dim: int, epochs: int | None, device: str = "cpu") -> dict:
    """The 5-preset x 3-seed Stage-2 ablation on ``rows`` cached samples; ``epochs`` None = the configs'."""
    synth_feature_cache(work / "big", rows=rows, dim=dim)
    train_head("stage1", work / "big", work / "big_s1", sets=["training.epochs=1", f"training.device={device}"],
               progress=False)
    sets = [f"training.device={device}"] + ([f"training.epochs={epochs}"] if epochs else [])
    t = time.perf_counter()
    df = ablate("stage2", work / "big", work / "abl", presets="all", seeds=(0, 1, 2), sets=sets,
                options={"stage1": work / "big_s1"}, progress=False, echo=lambda *_: None)
    wall = time.perf_counter() - t
    epoch_seconds = [json.loads(line)["seconds"] for log in (work / "abl").glob("*/seed*/log.jsonl")
                     for line in log.read_text().splitlines()]
    return {"runs": len(df), "wall": wall, "epochs_run": len(epoch_seconds),
            "per_epoch": float(np.mean(epoch_seconds)),  # training + val evaluation of one epoch
            "per_run": (wall - sum(epoch_seconds)) / len(df)}  # loading, final evaluation, writing


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py: a head epoch from the cache against recomputing, and the ablation."""
    dev = "cuda" if device in (None, "", "auto") and torch.cuda.is_available() else (device or "cpu")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-heads-"))
    rows = []
    try:
        e = epoch_cache_vs_recompute(work, n=300 if quick else 600, model="small", batch_size=64, device=dev)
        rows.append({"measure": f"Stage-2 epoch recomputing clip small from PNGs / from the cache ({e['n']} samples)",
                     "ratio": e["recompute"] / e["cache"],
                     "value": f"{e['recompute']:.2f} s vs {e['cache']:.2f} s",
                     "note": "the offline 3 M-parameter small preset at 64 px; ViT-L/14 widens the gap"})
        n_rows, epochs = (500, 1) if quick else (10_000, None)
        a = ablation(work, rows=n_rows, dim=768, epochs=epochs, device=dev)
        per_run_epochs = a["epochs_run"] / a["runs"]
        rows.append({"measure": f"Stage-2 ablation, 5 presets x 3 seeds, {n_rows} x 768 cached, "
                                f"{per_run_epochs:.0f} epoch(s) per run" + (" (quick: not the configs' 50)" if quick else ""),
                     "ratio": None, "value": f"{a['wall']:.0f} s",
                     "note": f"{a['per_epoch']:.2f} s per epoch with val, {a['per_run']:.2f} s per run besides"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


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
        e = epoch_cache_vs_recompute(work, n=args.n, model=args.model, batch_size=args.batch_size)
        n, t_cache, t_recompute = e["n"], e["cache"], e["recompute"]
        a = ablation(work, rows=args.rows, dim=args.dim, epochs=args.epochs)
        t_ablation, per_epoch, per_run = a["wall"], a["per_epoch"], a["per_run"]

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
