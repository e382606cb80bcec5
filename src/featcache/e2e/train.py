"""``featcache train-e2e mnv4``: fine-tune the MobileNetV4 filter on pixels.

BCEWithLogitsLoss on one logit, AdamW, cosine annealing over the epochs (stepped per epoch),
training augmentations (``augment=False`` leaves them out), early stopping on validation AUC
(``patience`` epochs without a new best; 0 = never), mixed precision on CUDA
(``torch.autocast`` in fp16 with a GradScaler, or bf16); on the CPU it trains in fp32.

RUN/ config.yaml  model.json  log.jsonl  training_log.csv  plots/training_curves.png
     best_model.safetensors  final_model.safetensors  checkpoints/epoch_NNN.safetensors
     last.safetensors  last_state.pt  last.json      (the resume point, rewritten every epoch)
     predictions_{val,test}.csv  metrics_{val,test}.json  summary.json

``training_log.csv`` has per epoch: train loss and accuracy, val loss, accuracy, AUC and F1, the
learning rate, and ``train_images_per_s`` over the whole training loop (decoding included).

``last_state.pt`` holds only tensors and numbers (optimizer, scheduler and GradScaler state)
and is read back with ``torch.load(weights_only=True)``.  Epoch ``e`` draws its shuffling and
augmentations from seeds derived from (seed, e), so an interrupted run resumed with
``resume=True`` ends with the same weights as an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ..config import load_config, save_config
from ..data.manifest import read_manifest
from ..errors import FeatcacheError
from ..extract.runner import resolve_device
from ..metrics import all_metrics
from ..metrics.detection import detection_metrics, sigmoid
from ..train.trainer import prepare_run_dir, save_module, seed_everything, write_json, write_predictions
from .mnv4 import (
    DEFAULT_MODEL,
    TASK,
    FilterRun,
    autocast,
    create_model,
    default_pretrained,
    image_loader,
    load_split,
    predict_scores,
)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class E2EResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    val: dict
    test: dict
    images_per_second: float
    seconds: float


def _options(**kw) -> dict:
    return kw


def train_e2e(
    manifest,
    out,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    save_every: int = 0,
    patience: int = 5,
    mixed_precision: bool = False,
    amp_dtype: str = "fp16",
    augment: bool = True,
    image_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> E2EResult:
    """Fine-tune the filter on the train split of ``manifest``; select on val AUC; write ``out``.

    With ``resume=True`` the run in ``out`` continues from its last saved epoch with its own
    config (``epochs`` may extend it).  ``epochs`` defaults to 20.  ``on_epoch_end(epoch, row)`` is called after each
    epoch's checkpoint is written (a notebook hook; raising in it interrupts the run).
    """
    from ..progress import bar as tqdm
    from ..report.plots import plot_e2e_curves

    out = Path(out)
    m = read_manifest(manifest, require_label=False)
    if resume:
        cfg, state_json = _resume_config(out, m.sha256, epochs)
    else:
        epochs = 20 if epochs is None else epochs
        for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 2), ("image_size", image_size, 32),
                                 ("save_every", save_every, 0), ("patience", patience, 0), ("num_workers", num_workers, 0)):
            if int(value) != value or value < low:
                raise FeatcacheError(f"--{name.replace('_', '-')} must be an integer >= {low}; got {value!r}")
        if not (lr > 0 and weight_decay >= 0):
            raise FeatcacheError("--lr must be > 0 and --weight-decay >= 0")
        if amp_dtype not in AMP_DTYPES:
            raise FeatcacheError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}; got {amp_dtype!r}")
        cfg = {
            "task": TASK,
            "manifest": {"path": str(Path(manifest).resolve()), "sha256": m.sha256},
            "model": {"name": model, "pretrained": pretrained or default_pretrained(model),
                      "image_size": int(image_size)},
            "training": _options(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                 weight_decay=float(weight_decay), save_every=int(save_every), patience=int(patience),
                                 mixed_precision=bool(mixed_precision), amp_dtype=amp_dtype, augment=bool(augment),
                                 num_workers=int(num_workers), device=device or "auto", seed=int(seed)),
        }
        state_json = None
    tc, mc = cfg["training"], cfg["model"]
    dev = resolve_device(None if tc["device"] == "auto" else tc["device"])
    use_amp = bool(tc["mixed_precision"]) and dev.type == "cuda"
    amp = AMP_DTYPES[tc["amp_dtype"]] if use_amp else None

    train_rows, train_paths = load_split(m, "train")
    val_rows, val_paths = load_split(m, "val")
    y_train = torch.from_numpy(train_rows["label"].to_numpy().astype(np.float32))
    y_val = val_rows["label"].to_numpy().astype(np.int64)

    seed_everything(int(tc["seed"]))
    net = create_model(mc["name"], mc["pretrained"], seed=int(tc["seed"])).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(tc["epochs"]))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp == torch.float16)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    if resume:
        net.load_state_dict(load_file(str(out / "last.safetensors"), device=str(dev)))
        st = torch.load(out / "last_state.pt", map_location=dev, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        sched.T_max = int(tc["epochs"])  # an extended run anneals over its new length
        scaler.load_state_dict(st["scaler"])
        start = int(state_json["epoch"]) + 1
        best_auc, best_epoch, bad = state_json["best_auc"], int(state_json["best_epoch"]), int(state_json["bad_epochs"])
        log = list(state_json["log"])
    else:
        prepare_run_dir(out, overwrite)
        save_config(cfg, out / "config.yaml")
        write_json(out / "model.json", {"task": TASK, "spec": {"model": mc["name"], "pretrained": mc["pretrained"],
                                                               "image_size": mc["image_size"], "num_classes": 1}})
        start, best_auc, best_epoch, bad, log = 1, -math.inf, 0, 0, []
    save_every, patience = int(tc["save_every"]), int(tc["patience"])
    n_epochs, bs, size = int(tc["epochs"]), int(tc["batch_size"]), int(mc["image_size"])

    t_start = time.perf_counter()
    stopped_early = bool(state_json and state_json.get("stopped_early"))
    epoch = start - 1
    bar = tqdm(range(start, n_epochs + 1), desc=f"train-e2e {mc['name']}", unit="epoch", disable=not progress)
    for epoch in bar:
        if stopped_early:
            break
        t0 = time.perf_counter()
        torch.manual_seed(int(tc["seed"]) * 100_003 + epoch)  # augmentations drawn in this process
        gen = torch.Generator().manual_seed(int(tc["seed"]) * 1_000_003 + epoch)  # shuffling, worker seeds
        loader = image_loader(train_paths, size, train=True, batch_size=bs, num_workers=int(tc["num_workers"]),
                              generator=gen, augment=bool(tc.get("augment", True)))
        net.train()
        loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
        t_loop = time.perf_counter()
        for rows, x, errs in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress):
            keep = torch.tensor([not e for e in errs])
            skipped += int((~keep).sum())
            if int(keep.sum()) < 2:  # a batch of one breaks batch norm
                continue
            x, y = x[keep].to(dev, non_blocking=True), y_train[torch.from_numpy(rows)[keep]].to(dev)
            with autocast(dev, amp):
                logits = net(x).squeeze(1)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            k = len(y)
            seen += k
            loss_sum += float(loss.detach()) * k
            correct += int(((logits.detach() >= 0).float() == y).sum())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_loop = time.perf_counter() - t_loop
        lr_used = opt.param_groups[0]["lr"]
        sched.step()
        val_score = _predict(net, val_paths, size, dev, bs, int(tc["num_workers"]), amp)
        val_loss = float(loss_fn(torch.from_numpy(val_score), torch.from_numpy(y_val.astype(np.float64))))
        vm = detection_metrics(y_val, sigmoid(val_score))
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "seconds": seconds, "lr": lr_used,
               "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val_loss, "val_acc": vm["acc"], "val_auc": vm["auc"], "val_f1": vm["f1"],
               "train_images_per_s": seen / t_loop if t_loop else float("nan"), "unreadable": skipped}
        log.append(row)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        auc = vm["auc"]
        if not math.isnan(auc) and auc > best_auc:
            best_auc, best_epoch, bad = auc, epoch, 0
            save_module(net, out / "best_model.safetensors")
        else:
            bad += 1
        if save_every and epoch % save_every == 0:
            (out / "checkpoints").mkdir(exist_ok=True)
            save_module(net, out / "checkpoints" / f"epoch_{epoch:03d}.safetensors")
        stopped_early = bool(patience and bad >= patience and epoch < n_epochs)
        _save_resume_point(out, net, opt, sched, scaler, {
            "epoch": epoch, "best_auc": best_auc, "best_epoch": best_epoch, "bad_epochs": bad, "log": log,
            "stopped_early": stopped_early})
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{auc:.3f}",
                        img_s=f"{row['train_images_per_s']:.0f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stopped_early:
            break
    epochs_run = int(log[-1]["epoch"]) if log else 0
    save_module(net, out / "final_model.safetensors")
    if best_epoch == 0:  # every val AUC was NaN (one class in val): keep the last epoch, and say so
        best_epoch = epochs_run
        save_module(net, out / "best_model.safetensors")
    df = pd.DataFrame(log)
    df.to_csv(out / "training_log.csv", index=False)
    plot_e2e_curves(df, out / "plots" / "training_curves.png", best_epoch=best_epoch)

    filt = FilterRun(out, dev)
    results = {}
    for split in ("val", "test"):
        preds = filt.predict(m, split, batch_size=bs, num_workers=int(tc["num_workers"]))
        metrics = {**all_metrics(preds["label"].to_numpy(), preds["score"].to_numpy(),
                                 groups=preds["subgroup"].to_numpy()), "n": int(len(preds))}
        write_predictions(out, split, metrics, preds)
        results[split] = metrics
    ips = float(np.nanmean([r["train_images_per_s"] for r in log])) if log else float("nan")
    seconds = time.perf_counter() - t_start
    write_json(out / "summary.json", {
        "task": TASK, "model": mc["name"], "pretrained": mc["pretrained"], "seed": int(tc["seed"]),
        "best_epoch": best_epoch, "epochs_run": epochs_run, "stopped_early": stopped_early,
        "selection": "val auc", "score": best_auc if best_auc > -math.inf else None,
        "device": str(dev), "mixed_precision": tc["amp_dtype"] if use_amp else "off",
        "train_images_per_s": ips, "val": results["val"], "test": results["test"], "seconds": seconds,
    })
    return E2EResult(out, best_epoch, epochs_run, stopped_early, results["val"], results["test"], ips, seconds)


def _predict(net, paths, size, dev, bs, workers, amp) -> np.ndarray:
    scores, _, _ = predict_scores(net, paths, size, dev, batch_size=bs, num_workers=workers, amp_dtype=amp)
    return scores


def _save_resume_point(out: Path, net, opt, sched, scaler, state: dict) -> None:
    """Weights, optimizer/scheduler/scaler state and the loop's state; each file replaced atomically."""
    import os

    tmp = out / "last.safetensors.tmp"
    save_module(net, tmp)
    os.replace(tmp, out / "last.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict()},
               out / "last_state.pt.tmp")
    os.replace(out / "last_state.pt.tmp", out / "last_state.pt")
    write_json(out / "last.json.tmp", state)
    os.replace(out / "last.json.tmp", out / "last.json")


def _resume_config(out: Path, manifest_sha: str, epochs: int | None) -> tuple[dict, dict]:
    for f in ("config.yaml", "model.json", "last.safetensors", "last_state.pt", "last.json"):
        if not (out / f).is_file():
            raise FeatcacheError(f"cannot resume {out}: {f} is missing (no epoch was finished); start it again")
    cfg = load_config(out / "config.yaml")
    if cfg.get("task") != TASK:
        raise FeatcacheError(f"cannot resume {out}: it is not a train-e2e {TASK} run")
    if cfg["manifest"]["sha256"] != manifest_sha:
        raise FeatcacheError(f"cannot resume {out}: it was trained on another manifest ({cfg['manifest']['path']})")
    state = json.loads((out / "last.json").read_text())
    if epochs is not None and int(epochs) != int(cfg["training"]["epochs"]):
        if int(epochs) < int(state["epoch"]):
            raise FeatcacheError(f"cannot resume {out} to {epochs} epochs: it has run {state['epoch']} already")
        cfg["training"]["epochs"] = int(epochs)
        state["stopped_early"] = False
        save_config(cfg, out / "config.yaml")
    return cfg, state
