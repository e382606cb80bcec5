"""``featcache finetune-detr``: fit a DETR to a detection manifest's train split, on the one loop.

A randomly initialised DETR detects nothing (AP 0), so a fairness perturbation of its outputs
would show nothing; this fits it (by default the offline ``tiny`` preset) to the train split with
DETR's own set loss (transformers: Hungarian matching, class, L1 and GIoU terms, deep
supervision over every decoder layer), AdamW (weight decay 1e-4), gradient norm clipped at 0.1,
seeded. :func:`featcache.train.loop.fit` runs the epochs, so the fine-tune writes the one run
layout (config.yaml, model.json, log.jsonl, training_log.csv, best/last.safetensors, resume.pt,
summary.json, plots/) and resumes after Ctrl-C or kill -9 when the same command is run again.
There is no val split here (only ``split`` is used, so the val and test images stay unseen):
the rule is ``selection.rule: last``. At the end the folder also holds a Hugging Face model
(``config.json``, weights, processor) that ``featcache extract --backbone detr --model OUT`` reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import torch

from ..config import load_config, save_config
from ..data.detection_images import DetectionImages
from ..data.manifest import read_manifest
from ..errors import FeatcacheError
from ..extract.detr import load_detr
from ..progress import library_bars
from ..runtime import RunDir, is_run_dir, prepare_run_dir, resolve_device, seed_everything, write_json
from ..train.loop import LoopSettings, OneModelJob, fit
from ..train.trainer import config_differences

TASK = "detr-finetune"


class DetrJob(OneModelJob):
    """DETR on pre-processed train images as a job of the one loop (R = 1, no val split)."""

    name = TASK
    summary_keys = ("loss",)

    def __init__(self, net, device, pixels, mask, labels):
        self.module, self.device = net, device
        self.pixels, self.mask, self.labels = pixels, mask, labels
        self.last_loss = float("nan")

    def batches(self, epoch: int, generators, batch_size: int):
        order = torch.randperm(len(self.labels), generator=generators[0]).to(self.device)
        for s in range(0, len(self.labels), batch_size):
            idx = order[s:s + batch_size]
            yield {"idx": idx[None]}, len(idx)

    def batch_loss(self, batch, state):
        idx = batch["idx"][0]
        res = self.module(pixel_values=self.pixels[idx], pixel_mask=None if self.mask is None else self.mask[idx],
                          labels=[self.labels[i] for i in idx.tolist()])
        terms = {k: v.detach().reshape(1) for k, v in res.loss_dict.items() if k[-1].isalpha()}
        return res.loss.reshape(1), terms

    def evaluate(self, split: str):
        return [({}, pd.DataFrame())]  # no val split: selection.rule is last


def finetune_detr(manifest, out, *, model: str = "tiny", epochs: int = 30, batch_size: int = 16, lr: float = 1e-3,
                  seed: int = 0, split: str = "train", device: str | None = None, overwrite: bool = False,
                  progress: bool = True, echo=None) -> dict:
    """Train a DETR on one split of a detection manifest into ``out`` (see the module docstring).

    An interrupted fine-tune in ``out`` with the same options resumes; one with other options is
    refused (``overwrite`` replaces it). Returns {out, images, epochs, final_loss, seconds}.
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise FeatcacheError(f"--epochs must be an integer of at least 1; got {epochs!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise FeatcacheError(f"--batch-size must be an integer of at least 1; got {batch_size!r}")
    if not lr > 0:
        raise FeatcacheError(f"--lr must be > 0; got {lr!r}")
    out = Path(out)
    rd = RunDir(out)
    dev = resolve_device(device)
    man = read_manifest(manifest)
    df = man.df[man.df["split"] == split].reset_index(drop=True)
    if len(df) < 2:
        raise FeatcacheError(f"{manifest}: split {split!r} has {len(df)} image(s); fine-tuning needs at least 2")
    cfg = {"task": TASK, "manifest": {"path": str(Path(manifest).resolve()), "sha256": man.sha256},
           "model": {"name": str(model)},
           "training": {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": 1e-4,
                        "grad_clip": 0.1, "seed": int(seed), "split": split},
           "selection": {"score": "0", "rule": "last"}}
    resume = False
    if not overwrite and is_run_dir(out) and rd.resume.is_file() and not rd.summary.is_file():
        diffs = config_differences(load_config(rd.config), cfg)
        if diffs:
            raise FeatcacheError(f"{out} holds an interrupted fine-tune with other options ({'; '.join(diffs[:4])}); "
                                 "rerun it with the same options to resume, or pass --overwrite")
        resume = True
    paths = [p if os.path.isabs(p) else str(man.root / p) for p in df["path"]]
    data = DetectionImages(paths, df)
    items = [data[i] for i in range(len(data))]
    bad = [df["sample_id"][i] for i, it in enumerate(items) if it[2]]
    if bad:
        raise FeatcacheError(f"cannot read {len(bad)} training image(s), e.g. {bad[0]}: {items[0][2] or 'see the manifest'}")
    seed_everything(int(seed))
    with library_bars(progress):  # -q: transformers' own "Loading weights" bar too
        net, processor, _ = load_detr(model, seed=seed)
    enc = processor(images=[it[1][0] for it in items], return_tensors="pt")
    pixels, mask = enc["pixel_values"].to(dev), None if enc.get("pixel_mask") is None else enc["pixel_mask"].to(dev)
    labels = [{"class_labels": torch.as_tensor(it[1][3], device=dev), "boxes": torch.as_tensor(it[1][2], device=dev)}
              for it in items]
    net.to(dev)
    for p in net.parameters():  # transformers freezes the ResNet stem; from random weights it must learn too
        p.requires_grad_(True)
    aux = net.config.auxiliary_loss
    net.config.auxiliary_loss = True  # DETR's deep supervision: every decoder layer's outputs are matched
    if not resume:
        prepare_run_dir(out, overwrite)
        save_config(cfg, rd.config)
        write_json(rd.model, {"task": TASK, "spec": {"model": str(model)}})
    settings = LoopSettings(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), seeds=[int(seed)],
                            weight_decay=1e-4, grad_clip=0.1, selection="0", rule="last", min_batch=1)
    t0 = time.perf_counter()
    job = DetrJob(net, dev, pixels, mask, labels)
    f = fit(job, [out], settings, resume=resume, desc="finetune detr", progress=progress, echo=echo)[0]
    net.eval().cpu()
    net.config.auxiliary_loss = aux
    net.save_pretrained(out)
    processor.save_pretrained(out)
    final = f.log[-1]["train_loss"]
    seconds = time.perf_counter() - t0
    write_json(rd.summary, {"task": TASK, "model": str(model), "images": len(items), "epochs": f.epochs_run,
                                      "best_epoch": f.best_epoch, "rule": "last", "final_loss": final,
                                      "seconds": seconds})
    return {"out": str(out), "images": len(items), "epochs": f.epochs_run, "final_loss": final, "seconds": seconds}
