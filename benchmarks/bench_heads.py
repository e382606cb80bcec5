"""The Stage-2 ablation batched (stacked runs, issue 16) against sequential, and its arithmetic bound.

    python benchmarks/bench_heads.py                      # 10,000 x 768, the configs' 50 epochs: long on a CPU
    python benchmarks/bench_heads.py --quick              # 1,000 rows, 2 epochs: a few minutes on 2 cores
    python benchmarks/bench_heads.py --rows 2000 --epochs 3 [--devices cpu] [--recompute]

In one run, on each device (the CPU, and CUDA when present), on a controlled cache
(``featcache.cache.synth``):
1. The 15-run ablation (presets full, cvar, ldam, minimal, none x seeds 0, 1, 2) through
   ``featcache.train.ablate`` (the runs stacked as one job), timed end to end, against the same 15
   runs trained one ``train_head`` after another. Ratio = sequential / batched.
2. Per training step: the stacked step of the 15 runs against 15 one-run modules stepped in turn,
   on the same batches; the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``, forward +
   backward; it counts matmuls and convolutions, not geomloss's logsumexp) divided by the fp32
   matmul rate measured on the same device = the step's compute; the rest is overhead.
3. The arithmetic bound of the whole ablation (every epoch's steps and val pass, in FLOPs / rate),
   and batched / bound.
4. On CUDA also the batched ablation on 100,000 x 768 (``--big-rows``).
``--recompute`` adds one Stage-2 epoch from the cache against the same epoch recomputing the frozen
backbone from PNGs (``--model ViT-L-14``: random weights, nothing is downloaded).
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


#: The ablation of issue 16: five presets of one architecture (``linear`` is another, a 6th group).
PRESETS = ("full", "cvar", "ldam", "minimal", "none")


def stage2_schedule(epochs: int | None) -> list[str]:
    """``--set`` values for ``epochs`` (None: the configs' 50); below 11 epochs (where the config's warm-up 5 -> 10 reaches weight 1)
    the warm-up is scaled into the run, as the demo does (a shorter run with the config's warm-up is
    refused), and selection starts at the first epoch of weight 1."""
    if not epochs:
        return []
    if epochs >= 11:  # the config's warm-up reaches weight 1 at epoch 11 (the design counts epochs from 0)
        return [f"training.epochs={epochs}"]
    start, end = max(1, epochs // 3), max(1, (2 * epochs) // 3)
    return [f"training.epochs={epochs}", f"fairness.warmup_start={start}", f"fairness.warmup_end={end}",
            f"selection.min_epoch={end + 1}"]


def matmul_rate(device: torch.device, n: int | None = None, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n fp32 matmul on ``device`` (TF32 if the process allows it), measured here."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10:
            continue
        sync()
    sync()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def _stacked(cfgs, cache_path, stage1_run, dev, data=None):
    """A Stage-2 task of len(cfgs) stacked runs on ``dev``, its data loaded once (or shared)."""
    task = get_task("stage2")(cfgs, dev)
    task.inputs["stage1"] = load_run(stage1_run, dev)
    if data is None:
        task.load(open_cache(cache_path))
    else:
        task.data, task.backbone = data
    task.spec = task.make_spec()
    task.module = task.build(task.spec).to(dev)
    return task


def step_breakdown(cache_path, stage1_run, cfgs, dev: torch.device, *, steps: int = 5) -> dict:
    """Per training step (forward, every loss term, backward, AdamW) of the R runs: stacked as one
    module against R one-run modules stepped one after the other, on the same batches; the FLOPs of
    one stacked step and of one val evaluation (``FlopCounterMode``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    stacked = _stacked(cfgs, cache_path, stage1_run, dev)
    data = (stacked.data, stacked.backbone)
    singles = [_stacked([c], cache_path, stage1_run, dev, data) for c in cfgs]
    train = stacked.data["train"].tensors
    n, b, runs = len(stacked.data["train"]), int(cfgs[0]["training"]["batch_size"]), len(cfgs)
    state = StepState(10, 50)  # past the warm-up: every loss term is on
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fused = {"fused": True}  # as the loop steps it, on CUDA and on the CPU

    def batch_of(step):
        gens = [torch.Generator().manual_seed(1000 * step + r) for r in range(runs)]
        idx = torch.stack([torch.randperm(n, generator=g)[:b] for g in gens]).to(dev)
        return {k: v[idx] for k, v in train.items()}

    def run(tasks) -> float:
        opts = [torch.optim.AdamW(t.trainable_parameters(), lr=3e-4, **fused) for t in tasks]
        per = runs // len(tasks)
        for t in tasks:
            t.module.train()
        total = 0.0
        for step in range(steps + 2):  # two warm-up steps
            full = batch_of(step)
            sync()
            t0 = time.perf_counter()
            for i, (t, opt) in enumerate(zip(tasks, opts)):
                loss, _ = t.batch_loss({k: v[i * per:(i + 1) * per] for k, v in full.items()}, state)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
            sync()
            if step >= 2:
                total += time.perf_counter() - t0
        return total / steps

    batched, sequential = run([stacked]), run(singles)
    batch = batch_of(0)
    with FlopCounterMode(display=False) as fc:
        loss, _ = stacked.batch_loss(batch, state)
        loss.sum().backward()
    step_flops = fc.get_total_flops()
    stacked.module.eval()
    with FlopCounterMode(display=False) as fc:
        stacked.forward_all(stacked.data["val"].tensors["x"])
    return {"runs": runs, "batch": b, "steps_per_epoch": sum(1 for s in range(0, n, b) if min(b, n - s) >= 2),
            "step_batched": batched, "step_sequential": sequential, "step_flops": step_flops,
            "val_flops": fc.get_total_flops()}


def ablation(work: Path, *, rows: int, dim: int = 768, epochs: int | None = None, device: str = "cpu",
             presets=PRESETS, seeds=(0, 1, 2), sequential: bool = False, breakdown: bool = True,
             echo=lambda *_: None) -> dict:
    """The Stage-2 ablation (``presets`` x ``seeds``) on ``rows`` x ``dim`` cached samples, on ``device``.

    Always: the batched ablation (``featcache.train.ablate``: stacked groups), timed end to end, its
    mean epoch (training and val) from the runs' logs; with ``breakdown`` the per-step comparison and
    FLOPs (:func:`step_breakdown`) and the matmul rate of the device. With ``sequential`` also the
    same runs one ``train_head`` after another (the way ``ablate`` trained before). ``epochs`` None:
    the configs' 50. Keys ``wall`` and ``per_epoch`` are what ``gpu_check.py`` reads.
    """
    work = Path(work)
    dev = torch.device(device)
    synth_feature_cache(work / "big", rows=rows, dim=dim)
    train_head("stage1", work / "big", work / "big_s1", sets=["training.epochs=1", f"training.device={device}"],
               progress=False)
    sets = [f"training.device={device}", *stage2_schedule(epochs)]
    opts = {"stage1": work / "big_s1"}
    out: dict = {"rows": rows, "dim": dim, "device": str(dev), "presets": list(presets), "seeds": list(seeds)}
    t = time.perf_counter()
    res = ablate("stage2", work / "big", work / "batched", presets=list(presets), seeds=list(seeds), sets=sets,
                 options=opts, devices=[device], progress=False, echo=lambda *_: None)
    out["wall"] = out["batched_wall"] = time.perf_counter() - t
    out["groups"] = res.groups
    logs = [[json.loads(line) for line in log.read_text().splitlines()]
            for log in sorted((work / "batched").glob("*/seed*/log.jsonl"))]
    out["runs"] = len(res.table)
    out["epochs_run"] = max(len(x) for x in logs)
    # every run of a group logs the group's epoch time: the mean over the first run of each group
    group_epochs = {tuple(r["seconds"] for r in x) for x in logs}
    out["per_epoch"] = float(np.mean([s for g in group_epochs for s in g]))
    echo(f"batched: {out['wall']:.1f} s for {out['runs']} runs in {len(res.groups)} group(s)")
    if sequential:
        t = time.perf_counter()
        for p in presets:
            for s in seeds:
                train_head("stage2", work / "big", work / "seq" / p / f"seed{s}", preset=p,
                           sets=[*sets, f"training.seed={s}"], options=opts, progress=False)
        out["sequential_wall"] = time.perf_counter() - t
        echo(f"sequential: {out['sequential_wall']:.1f} s")
    if breakdown:
        cfgs = [resolve_config("stage2", p, sets=[*sets, f"training.seed={s}"]) for p in presets for s in seeds]
        for c in cfgs:
            c["options"] = {"stage1": str(work / "big_s1")}
        out.update(step_breakdown(work / "big", work / "big_s1", cfgs, dev))
        out["matmul_flops_per_s"] = matmul_rate(dev)
        epochs_run = out["epochs_run"]
        flops = epochs_run * (out["steps_per_epoch"] * out["step_flops"] + out["val_flops"])
        out["ablation_flops"] = flops
        out["bound_s"] = flops / out["matmul_flops_per_s"]
        out["step_bound_s"] = out["step_flops"] / out["matmul_flops_per_s"]
        echo(f"step: batched {out['step_batched'] * 1e3:.1f} ms, sequential {out['step_sequential'] * 1e3:.1f} ms, "
             f"bound {out['step_bound_s'] * 1e3:.1f} ms")
    return out


def report(a: dict, machine_name: str) -> list[str]:
    """Markdown rows of one :func:`ablation` result."""
    g = f"{len(a['presets'])} presets x {len(a['seeds'])} seeds"
    size = f"{a['rows']:,} x {a['dim']}, {a['epochs_run']} epochs per run, {a['device']}"
    lines = [f"machine: {machine_name}; {size}", "", "| measure | value |", "|---|---|",
             f"| Stage-2 ablation {g}, batched (stacked groups: {len(a['groups'])}) | {a['wall']:.1f} s |"]
    if "sequential_wall" in a:
        lines.append(f"| same runs one `train_head` after another (sequential) | {a['sequential_wall']:.1f} s |")
        lines.append(f"| **sequential / batched** | **{a['sequential_wall'] / a['wall']:.2f}x** |")
    lines.append(f"| one epoch of all runs (training and val), mean | {a['per_epoch']:.2f} s |")
    if "step_flops" in a:
        rate = a["matmul_flops_per_s"]
        lines += [
            f"| one training step of {a['runs']} runs (batch {a['batch']}): stacked | {a['step_batched'] * 1e3:.1f} ms |",
            f"| same step, {a['runs']} one-run modules one after another | {a['step_sequential'] * 1e3:.1f} ms "
            f"({a['step_sequential'] / a['step_batched']:.2f}x the stacked step) |",
            f"| FLOPs of one stacked step (FlopCounterMode, forward + backward) | {a['step_flops'] / 1e9:.2f} GFLOP |",
            f"| matmul rate measured on this device (fp32 square matmul) | {rate / 1e9:.1f} GFLOP/s |",
            f"| step compute (FLOPs / rate) vs overhead (the rest) | {a['step_bound_s'] * 1e3:.1f} ms compute, "
            f"{(a['step_batched'] - a['step_bound_s']) * 1e3:.1f} ms overhead |",
            f"| arithmetic bound of the ablation ({a['ablation_flops'] / 1e12:.2f} TFLOP / rate) | {a['bound_s']:.1f} s |",
            f"| **batched / bound** | **{a['wall'] / a['bound_s']:.2f}x** |",
        ]
    return lines


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py: a head epoch from the cache against recomputing, and the ablation
    batched against sequential (quick: 1,000 rows, 2 epochs; else 10,000 rows at the configs' 50)."""
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
        n_rows, epochs = (1_000, 2) if quick else (10_000, None)
        a = ablation(work, rows=n_rows, dim=768, epochs=epochs, device=dev, sequential=True)
        rows.append({"measure": f"Stage-2 ablation, 5 presets x 3 seeds, {n_rows} x 768 cached, {a['epochs_run']} "
                                f"epoch(s) per run: sequential / batched",
                     "ratio": a["sequential_wall"] / a["wall"],
                     "value": f"{a['sequential_wall']:.0f} s vs {a['wall']:.0f} s",
                     "note": f"batched / arithmetic bound {a['wall'] / a['bound_s']:.1f}x "
                             f"({a['ablation_flops'] / 1e12:.2f} TFLOP at {a['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000, help="cached samples for the ablation")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run [the configs' 50]")
    ap.add_argument("--quick", action="store_true", help="1,000 rows, 2 epochs, no recompute epoch, no 100,000 rows")
    ap.add_argument("--devices", default=None, help="cpu and/or cuda [cpu, and cuda when present]")
    ap.add_argument("--big-rows", type=int, default=100_000, help="the CUDA-only batched ablation's rows (0: skip)")
    ap.add_argument("--no-sequential", action="store_true", help="time the batched ablation only")
    ap.add_argument("--recompute", action="store_true", help="also the Stage-2 epoch from the cache vs recomputing")
    ap.add_argument("--n", type=int, default=600, help="synthetic face images for the recompute comparison")
    ap.add_argument("--model", default="small", help="CLIP preset of the recompute comparison (ViT-L-14: random weights)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch of the recompute comparison")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.epochs, args.big_rows = min(args.rows, 1_000), args.epochs or 2, 0
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.manual_seed(0)
    name = machine()
    print(f"machine: {name}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-heads-"))
    try:
        for device in devices:
            a = ablation(work / device, rows=args.rows, dim=args.dim, epochs=args.epochs, device=device,
                         sequential=not args.no_sequential, echo=lambda s, d=device: print(f"  {d}: {s}", flush=True))
            print("\n".join(report(a, name)) + "\n", flush=True)
            if device.startswith("cuda") and args.big_rows:
                b = ablation(work / f"{device}-big", rows=args.big_rows, dim=args.dim, epochs=args.epochs,
                             device=device, sequential=False, echo=lambda s, d=device: print(f"  {d}: {s}", flush=True))
                print("\n".join(report(b, name)) + "\n", flush=True)
        if args.recompute:
            dev = devices[-1]
            e = epoch_cache_vs_recompute(work / "recompute", n=args.n, model=args.model, batch_size=args.batch_size,
                                         device=dev)
            print(f"| Stage-2 epoch, {e['n']} samples, clip {args.model}, batch {args.batch_size}, {dev}: "
                  f"from the cache | {e['cache']:.2f} s |")
            print(f"| same epoch recomputing the frozen backbone from PNGs | {e['recompute']:.2f} s |")
            print(f"| **ratio recompute / cache** | **{e['recompute'] / e['cache']:.1f}x** |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
