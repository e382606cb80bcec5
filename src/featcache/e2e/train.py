"""``featcache train-e2e mnv4``: fine-tune the MobileNetV4 filter on pixels, on the one loop.

BCEWithLogitsLoss on one logit, AdamW (fused on CUDA), cosine annealing over the epochs
(stepped per epoch), training augmentations (``augment=False`` leaves them out), selection and
early stopping on validation AUC (``patience`` epochs without a new best; 0 = never), fp32 as
the design trains (``mixed_precision=True``: ``torch.autocast`` on CUDA in fp16 with a GradScaler, or
bf16; the CPU trains in fp32 either way). On CUDA the model and its batches are
channels-last. :func:`featcache.train.loop.fit` does the epochs, checkpoints, logs and resume;
this module supplies the batches, the loss and the evaluation.

Input pipeline: DataLoader workers (persistent when ``num_workers`` > 0, one loader for every
epoch) decode and bring each image to the square (``geometry``: ``design``, the default, resizes
to ``image_size`` square, so a 256-px face passes as it is; ``timm``, timm's evaluation resize and
centre crop) as uint8; batches travel
pinned as uint8; on the device each image gets its own augmentation parameters from a
``torch.Generator`` there, seeded per epoch, then float conversion and normalisation
(:func:`featcache.e2e.mnv4.prepare_batch`). Evaluation runs in batches of
``mnv4.DEFAULTS["eval_batch_size"]``.

The run directory is the one layout (ARCHITECTURE.md): config.yaml, model.json (spec:
``model``, ``pretrained``, ``image_size``, ``geometry``, ``num_classes``), log.jsonl, training_log.csv,
best.safetensors, last.safetensors, resume.pt, summary.json, plots/, eval/{val,test}/.
``training_log.csv`` has per epoch: train loss and accuracy, val loss, accuracy, AUC and F1, the
learning rate, and ``unreadable`` (images skipped). Epoch ``e`` draws its shuffling and
augmentations from seeds derived from (seed, e), so an interrupted run resumed with
``resume=True`` ends with the same weights as an uninterrupted one (on the CPU; on CUDA with
deterministic mode, see :mod:`featcache.runtime`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import load_config, save_config
from ..data.manifest import read_manifest
from ..errors import FeatcacheError
from ..metrics import all_metrics
from ..metrics.detection import detection_metrics, sigmoid
from ..runtime import (
    is_run_dir,
    load_weights,
    prepare_run_dir,
    resolve_device,
    seed_everything,
    write_json,
)
from ..train.evaluate import Evaluation, write_evaluation
from ..train.loop import RESUME_FILE, LoopSettings, OneModelJob, fit
from .mnv4 import (
    DEFAULT_MODEL,
    DEFAULTS,
    GEOMETRIES,
    META,
    TASK,
    EpochSampler,
    create_model,
    data_config,
    default_pretrained,
    load_split,
    pixel_loader,
    predict_scores,
    prepare_batch,
)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: The metrics a filter run's one-line summary shows.
SUMMARY_KEYS = ("auc", "acc", "eer", "f1", "ece", "f_fpr")


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
    evaluations: list[Evaluation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        early = ", stopped early" if self.stopped_early else ""
        out = [f"{self.run_dir}: best epoch {self.best_epoch} of {self.epochs_run}{early}, {self.seconds:.1f} s, "
               f"{self.images_per_second:.1f} train images/s"]
        out += [f"  {e.split}: {e.short()}" for e in self.evaluations]
        return out + [f"  note: {n}" for n in self.notes]


class FilterJob(OneModelJob):
    """The filter as a job of the one loop (R = 1)."""

    name = TASK
    detects = True
    summary_keys = SUMMARY_KEYS

    def __init__(self, net, device, manifest, cfg: dict):
        self.module, self.device, self.cfg = net, device, cfg
        tc, mc = cfg["training"], cfg["model"]
        self.size, self.workers, self.seed = int(mc["image_size"]), int(tc["num_workers"]), int(tc["seed"])
        self.augment, self.bs = bool(tc.get("augment", True)), int(tc["batch_size"])
        self.amp_dtype = AMP_DTYPES[tc["amp_dtype"]] if tc["mixed_precision"] and device.type == "cuda" else None
        self.cuda = device.type == "cuda"
        self.manifest = manifest
        # the preprocessing of this model and weights in the run's geometry (a run configured before
        # issue 26 has none: timm's), the same for training and evaluation
        self.data_config = data_config(mc["name"], self.size, mc["pretrained"], mc.get("geometry", "timm"))
        self.train_rows, self.train_paths = load_split(manifest, "train")
        self.y_train = torch.from_numpy(self.train_rows["label"].to_numpy().astype(np.float32))
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.unreadable = 0
        self.images_per_s = []
        self._sampler = EpochSampler(len(self.train_paths), self.seed)
        self._loaders: dict = {}  # built once: persistent workers serve every epoch

    def _loader(self, key: str, paths: list[str], batch_size: int, sampler=None):
        if key not in self._loaders:
            self._loaders[key] = pixel_loader(paths, self.size, self.data_config, batch_size=batch_size,
                                              num_workers=self.workers, sampler=sampler, pin_memory=self.cuda)
        return self._loaders[key]

    def batches(self, epoch: int, generators, batch_size: int):
        self._sampler.set_epoch(epoch)  # shuffling: seeded by (seed, epoch)
        loader = self._loader(f"train{batch_size}", self.train_paths, batch_size, self._sampler)
        # augmentations: one generator on the device, seeded by (seed, epoch); each image draws its own
        gen = (torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch)
               if self.augment else None)
        self.unreadable, seen, t0 = 0, 0, time.perf_counter()
        for rows, pixels, errs in loader:
            bad = [i for i, e in enumerate(errs) if e]
            if bad:  # counted in the epoch's `unreadable` column and left out of the batch
                self.unreadable += len(bad)
                keep = torch.tensor([not e for e in errs])
                rows, pixels = rows[keep.numpy()], pixels[keep]
            k = len(rows)
            if k < 2:  # a batch of one breaks batch norm
                continue
            seen += k
            y = self.y_train[torch.from_numpy(rows)]
            if self.cuda:  # pinned, so that the copies do not wait for the device's queue
                y, pixels = y.pin_memory(), pixels if pixels.is_pinned() else pixels.pin_memory()
            x = prepare_batch(pixels, self.device, self.data_config, generator=gen, channels_last=self.cuda)
            y = y.to(self.device, non_blocking=True)
            yield {"x": x[None], "y": y[None]}, k
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.images_per_s.append(seen / dt if dt else float("nan"))

    def batch_loss(self, batch, state):
        x, y = batch["x"][0], batch["y"][0]
        logits = self.module(x).squeeze(1).float()
        loss = self.loss_fn(logits, y)
        acc = ((logits.detach() >= 0).float() == y).float().mean()
        return loss.reshape(1), {"acc": acc.reshape(1)}

    def epoch_values(self, state) -> dict:
        return {"unreadable": self.unreadable,
                "train_images_per_s": self.images_per_s[-1] if self.images_per_s else float("nan")}

    def stop_reason(self, row: dict, r: int):
        return None

    def predictions(self, split: str, manifest=None) -> pd.DataFrame:
        rows, paths = load_split(manifest if manifest is not None else self.manifest, split)
        if manifest is None:  # the run's own splits: one loader each, kept with its workers
            loader = self._loader(split, paths, max(self.bs, DEFAULTS["eval_batch_size"]))
        else:
            loader = None
        scores, _, errors = predict_scores(self.module, paths, self.size, self.device,
                                           batch_size=max(self.bs, DEFAULTS["eval_batch_size"]),
                                           num_workers=self.workers, amp_dtype=self.amp_dtype,
                                           config=self.data_config, loader=loader)
        if errors:
            shown = "; ".join(f"{rows.at[r, 'sample_id']}: {e}" for r, e in list(errors.items())[:3])
            raise FeatcacheError(f"{len(errors)} image(s) of split {split} cannot be read ({shown})")
        preds = rows[[c for c in META if c in rows.columns]].copy()
        preds.insert(2, "score", scores)
        preds.insert(3, "prob", sigmoid(scores))
        return preds

    def evaluate(self, split: str):
        preds = self.predictions(split)
        y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
        if split == "val":  # every epoch: the quick metrics the selection and the curves use
            m = detection_metrics(y, sigmoid(score))
            loss = float(self.loss_fn(torch.tensor(score), torch.tensor(y, dtype=torch.float64)))
            return [({"loss": loss, "acc": m["acc"], "auc": m["auc"], "f1": m["f1"]}, preds)]
        return [(all_metrics(y, score, groups=preds["subgroup"].to_numpy()), preds)]

    def report(self, metrics, predictions) -> str:
        return ""


def train_e2e(
    manifest,
    out,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    epochs: int | None = None,
    batch_size: int = DEFAULTS["batch_size"],
    lr: float | None = None,
    weight_decay: float = DEFAULTS["weight_decay"],
    save_every: int = 0,
    patience: int = DEFAULTS["patience"],
    mixed_precision: bool = False,
    amp_dtype: str = DEFAULTS["amp_dtype"],
    augment: bool = True,
    image_size: int = DEFAULTS["image_size"],
    geometry: str = DEFAULTS["geometry"],
    num_workers: int = 0,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    tensorboard: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> E2EResult:
    """Fine-tune the filter on the train split of ``manifest``; select on val AUC; write ``out``.

    With ``resume=True`` the run in ``out`` continues from its last finished epoch with its own
    config; ``epochs`` larger than the run's extends it, the cosine schedule restarting from the
    last learning rate used or from ``lr`` when given (``echo`` says which). ``epochs`` defaults
    to 50 and ``lr`` to 1e-4 (``mnv4.DEFAULTS``, the design's values). ``on_epoch_end(epoch, row)`` is called after each epoch's resume point
    is written (a notebook hook; raising in it interrupts the run). ``mixed_precision`` (off by
    default: the design trains in fp32) trains under autocast in ``amp_dtype`` on CUDA; the CPU trains
    in fp32 either way. ``geometry``: ``design`` (the image resized to ``image_size`` square: a face of
    that size as it is) or ``timm`` (timm's evaluation resize and centre crop), for training and evaluation.
    ``tensorboard``: the per-epoch scalars also go to ``out/tensorboard/`` (recorded in the config
    as ``logging.tensorboard``).
    """
    out = Path(out)
    m = read_manifest(manifest, require_label=False)
    if resume:
        cfg = _resume_config(out, m.sha256, epochs)
    else:
        epochs = DEFAULTS["epochs"] if epochs is None else epochs
        lr = DEFAULTS["lr"] if lr is None else lr
        for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 2), ("image_size", image_size, 32),
                                 ("save_every", save_every, 0), ("patience", patience, 0), ("num_workers", num_workers, 0)):
            if int(value) != value or value < low:
                raise FeatcacheError(f"--{name.replace('_', '-')} must be an integer >= {low}; got {value!r}")
        if not (lr > 0 and weight_decay >= 0):
            raise FeatcacheError("--lr must be > 0 and --weight-decay >= 0")
        if amp_dtype not in AMP_DTYPES:
            raise FeatcacheError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}; got {amp_dtype!r}")
        if geometry not in GEOMETRIES:
            raise FeatcacheError(f"--geometry must be one of {', '.join(GEOMETRIES)}; got {geometry!r}")
        if is_run_dir(out) and (out / RESUME_FILE).is_file() and not (out / "summary.json").is_file() and not overwrite:
            raise FeatcacheError(f"{out} holds an interrupted run; continue it with --resume, or pass --overwrite")
        cfg = {
            "task": TASK,
            "manifest": {"path": str(Path(manifest).resolve()), "sha256": m.sha256},
            "model": {"name": model, "pretrained": pretrained or default_pretrained(model),
                      "image_size": int(image_size), "geometry": geometry},
            "training": dict(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                 weight_decay=float(weight_decay), save_every=int(save_every), patience=int(patience),
                                 mixed_precision=bool(mixed_precision), amp_dtype=amp_dtype, augment=bool(augment),
                                 num_workers=int(num_workers), device=device or "auto", seed=int(seed),
                                 schedule="cosine"),
            "selection": {"score": "auc", "min_epoch": 1, "rule": "best"},
            "logging": {"tensorboard": bool(tensorboard)},
        }
    tc, mc = cfg["training"], cfg["model"]
    dev = resolve_device(None if tc["device"] == "auto" else tc["device"])
    seed_everything(int(tc["seed"]))
    net = create_model(mc["name"], mc["pretrained"], seed=int(tc["seed"])).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    job = FilterJob(net, dev, m, cfg)
    load_split(m, "val")  # fail before training when val is missing
    if not resume:
        prepare_run_dir(out, overwrite)
        save_config(cfg, out / "config.yaml")
        write_json(out / "model.json", {"task": TASK, "spec": {"model": mc["name"], "pretrained": mc["pretrained"],
                                                               "image_size": mc["image_size"],
                                                               "geometry": mc["geometry"], "num_classes": 1}})
    settings = LoopSettings(epochs=int(tc["epochs"]), batch_size=int(tc["batch_size"]), lr=float(tc["lr"]),
                            seeds=[int(tc["seed"])], weight_decay=float(tc["weight_decay"]), selection="auc",
                            patience=int(tc["patience"]), save_every=int(tc["save_every"]), schedule="cosine",
                            tensorboard=bool(tensorboard or (cfg.get("logging") or {}).get("tensorboard")))
    t0 = time.perf_counter()
    hook = None if on_epoch_end is None else (lambda e, rows: on_epoch_end(e, rows[0]))
    f = fit(job, [out], settings, resume=resume, lr=lr if resume else None, desc=f"train-e2e {mc['name']}",
            progress=progress, echo=echo, on_epoch_end=hook)[0]
    net.load_state_dict(load_weights(out / "best.safetensors", dev))
    evals, results = [], {}
    for split in ("val", "test"):
        preds = job.predictions(split)
        metrics = all_metrics(preds["label"].to_numpy(), preds["score"].to_numpy(), groups=preds["subgroup"].to_numpy())
        results[split] = metrics
        evals.append(write_evaluation(out, split, metrics, preds, detects=True, summary_keys=SUMMARY_KEYS,
                                      title=f"{out.name} (filter {mc['name']})"))
    ips = float(np.nanmean([r.get("train_images_per_s", np.nan) for r in f.log])) if f.log else float("nan")
    seconds = time.perf_counter() - t0
    notes = [n for n in (f.note,) if n]
    write_json(out / "summary.json", {
        "task": TASK, "model": mc["name"], "pretrained": mc["pretrained"], "seed": int(tc["seed"]),
        "best_epoch": f.best_epoch, "epochs_run": f.epochs_run, "stopped": f.stopped,
        "selection": "auc", "rule": "best", "score": f.score, "device": str(dev),
        "mixed_precision": tc["amp_dtype"] if job.amp_dtype is not None else "off",
        "train_images_per_s": ips, "val": results["val"], "test": results["test"], "notes": notes,
        "summary_keys": list(SUMMARY_KEYS), "seconds": seconds,
    })
    return E2EResult(out, f.best_epoch, f.epochs_run, f.stopped is not None, results["val"], results["test"], ips,
                     seconds, evals, notes)


def _resume_config(out: Path, manifest_sha: str, epochs: int | None) -> dict:
    if not out.exists():
        raise FeatcacheError(f"cannot resume {out}: it does not exist")
    for f in ("config.yaml", "model.json", RESUME_FILE):
        if not (out / f).is_file():
            raise FeatcacheError(f"cannot resume {out}: {f} is missing (no epoch was finished); start it again")
    cfg = load_config(out / "config.yaml")
    if cfg.get("task") != TASK:
        raise FeatcacheError(f"cannot resume {out}: it is not a train-e2e {TASK} run")
    if cfg["manifest"]["sha256"] != manifest_sha:
        raise FeatcacheError(f"cannot resume {out}: it was trained on another manifest ({cfg['manifest']['path']})")
    if epochs is not None and int(epochs) != int(cfg["training"]["epochs"]):
        if int(epochs) < int(cfg["training"]["epochs"]):
            raise FeatcacheError(f"cannot resume {out} to {epochs} epochs: it was set up for "
                                 f"{cfg['training']['epochs']}")
        cfg["training"]["epochs"] = int(epochs)
        save_config(cfg, out / "config.yaml")
    return cfg
