"""The one trainer: every task trains, selects its best epoch and writes its run directory here.

RUN/ config.yaml  log.jsonl  training_log.csv  best.safetensors  last.safetensors  model.json
     predictions_<split>.csv  metrics_<split>.json  plots/*.png  summary.json   (DESIGN.md)

Model selection uses the validation split only; test metrics are reported, never used to choose.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..cache import open_cache
from ..config import load_config, resolve_config, save_config, selection_score
from ..errors import FeatcacheError
from ..extract.runner import resolve_device
from ..heads.task import StepState, Task, get_task

RUN_MARKERS = ("config.yaml", "log.jsonl", "summary.json")


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    val: dict
    test: dict
    seconds: float
    extra: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise FeatcacheError(f"{out} is not empty and is not a run directory; choose a new --out")
        if not overwrite:
            raise FeatcacheError(f"{out} already holds a run; pass --overwrite to replace it, or choose a new --out")
        shutil.rmtree(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=True))


def write_predictions(run_dir: Path, name: str, metrics: dict, predictions: pd.DataFrame) -> None:
    predictions.to_csv(run_dir / f"predictions_{name}.csv", index=False)
    write_json(run_dir / f"metrics_{name}.json", metrics)


def save_module(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def train_head(
    task_name: str,
    cache_path,
    out,
    *,
    preset: str | None = None,
    config_file=None,
    sets=(),
    overwrite: bool = False,
    progress: bool = True,
    options: dict | None = None,
) -> RunResult:
    """Train a task's head from a cache into the run directory ``out``.

    ``options`` are task inputs that are not hyper-parameters (Stage 2's ``stage1`` run).
    """
    from ..progress import bar as tqdm
    from ..report.plots import plot_training_curves

    out = Path(out)
    cfg = resolve_config(task_name, preset, config_file, sets)
    cfg["options"] = {k: str(v) for k, v in (options or {}).items() if v is not None}
    tcfg = cfg["training"]
    device = resolve_device(None if tcfg["device"] == "auto" else tcfg["device"])
    cache = open_cache(cache_path)
    cfg["cache"] = {"path": str(Path(cache_path).resolve()), "fingerprint": cache.fingerprint}
    seed_everything(int(tcfg["seed"]))

    task: Task = get_task(task_name)(cfg, device, run_dir=out)
    task.load(cache)
    task.spec = task.make_spec()
    task.module = task.build(task.spec).to(device)
    prepare_run_dir(out, overwrite)
    save_config(cfg, out / "config.yaml")
    write_json(out / "model.json", {"task": task_name, "spec": task.spec})

    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    epochs, bs = int(tcfg["epochs"]), int(tcfg["batch_size"])
    grad_clip = float(tcfg.get("grad_clip") or 0.0)  # max gradient norm; 0 or absent: no clipping
    if epochs < 1 or bs < 1:
        raise FeatcacheError("training.epochs and training.batch_size must be at least 1")
    train = task.data["train"]
    n = len(train)
    gen = torch.Generator().manual_seed(int(tcfg["seed"]))
    formula = cfg["selection"]["score"]
    # Only epochs from min_epoch on compete (Stage 2: after the fairness warm-up, so that every
    # preset is judged as trained with its whole objective); fewer epochs than that: all compete.
    min_epoch = min(int(cfg["selection"].get("min_epoch", 1)), epochs)
    best_score, best_epoch, log = -math.inf, 0, []
    t_start = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc=f"train {task_name}" + (f":{cfg['preset']}" if cfg["preset"] else ""),
               unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        state = StepState(epoch, epochs)
        task.module.train()
        sums: dict[str, float] = {}
        seen = 0
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if len(idx) < 2:  # a batch of one breaks batch statistics and group losses
                continue
            batch = {k: v[idx] for k, v in train.tensors.items()}
            loss, terms = task.batch_loss(batch, state)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            k = len(idx)
            seen += k
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * k
        task.module.eval()
        val_metrics, _ = task.evaluate("val")
        score = selection_score(formula, val_metrics)
        row = {"epoch": epoch, "seconds": time.perf_counter() - t0, "lr": opt.param_groups[0]["lr"],
               **task.epoch_values(state),
               **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
               **{f"val_{k}": v for k, v in val_metrics.items()}, "score": score}
        log.append(row)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if epoch >= min_epoch and not math.isnan(score) and score > best_score:
            best_score, best_epoch = score, epoch
            save_module(task.module, out / "best.safetensors")
        bar.set_postfix(loss=f"{row.get('train_loss', float('nan')):.3f}", score=f"{score:.3f}")
        stop = task.stop_reason(row)
        if stop:
            bar.write(f"stopped: {stop}")
            break
    save_module(task.module, out / "last.safetensors")
    if best_epoch == 0:  # every score was NaN: keep the last epoch, and say so
        best_epoch = epochs
        shutil.copy(out / "last.safetensors", out / "best.safetensors")
    pd.DataFrame(log).to_csv(out / "training_log.csv", index=False)
    plot_training_curves(pd.DataFrame(log), out / "plots" / "training_curves.png", best_epoch=best_epoch)

    task.module.load_state_dict(load_file(str(out / "best.safetensors"), device=str(device)))
    task.module.eval()
    results = {}
    for split in ("val", "test"):
        metrics, preds = task.evaluate(split)
        write_predictions(out, split, metrics, preds)
        results[split] = metrics
    extra = task.finish(out)
    seconds = time.perf_counter() - t_start
    write_json(out / "summary.json", {
        "task": task_name, "preset": cfg["preset"], "seed": int(tcfg["seed"]), "best_epoch": best_epoch,
        "selection": formula, "score": best_score if best_score > -math.inf else None,
        "val": results["val"], "test": results["test"], **extra, "seconds": seconds,
    })
    return RunResult(out, best_epoch, results["val"], results["test"], seconds, extra)


def load_run(run_dir, device=None, *, weights: str = "best") -> Task:
    """Rebuild a trained task from its run directory (config.yaml, model.json, weights)."""
    run_dir = Path(run_dir)
    for f in ("config.yaml", "model.json", f"{weights}.safetensors"):
        if not (run_dir / f).is_file():
            raise FeatcacheError(f"{run_dir} is not a finished run: {f} is missing")
    cfg = load_config(run_dir / "config.yaml")
    spec = json.loads((run_dir / "model.json").read_text())
    dev = resolve_device(device)
    task = get_task(spec["task"])(cfg, dev, run_dir=run_dir)
    task.spec = spec["spec"]
    task.module = task.build(task.spec).to(dev)
    task.module.load_state_dict(load_file(str(run_dir / f"{weights}.safetensors"), device=str(dev)))
    task.module.eval()
    return task
