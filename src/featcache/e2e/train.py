"""The MobileNetV4 filter as a registered task (``mnv4``), and ``featcache train-e2e mnv4``, its alias.

``featcache train-head mnv4 --manifest M --out RUN [--preset design|timm|mixed_precision] [--set ...]``
trains it like any task (configs/mnv4.yaml; resume by rerunning the command; ``featcache evaluate RUN``;
``featcache ablate mnv4 --manifest M``). BCEWithLogitsLoss on one logit, AdamW (fused on CUDA),
cosine annealing over the epochs (stepped per epoch), training augmentations
(``training.augment: false`` leaves them out), selection and early stopping on validation AUC
(``training.patience`` epochs without a new best; 0 = never), fp32 as the design trains
(``training.mixed_precision: true``: ``torch.autocast`` on CUDA in fp16 with a GradScaler, or bf16;
the CPU trains in fp32 either way). On CUDA the model and its batches are channels-last.
:func:`featcache.train.loop.fit` does the epochs, checkpoints, logs and resume; :class:`FilterTask`
supplies the batches, the loss and the evaluation.

Input pipeline: DataLoader workers (persistent when ``training.num_workers`` > 0, one loader for every
epoch) decode and bring each image to the square (``model.geometry``: ``design``, the default, resizes
to ``image_size`` square, so a 256-px face passes as it is; ``timm``, timm's evaluation resize and
centre crop) as uint8; batches travel pinned as uint8; on the device each image gets its own
augmentation parameters from a ``torch.Generator`` there, seeded per epoch, then float conversion
and normalisation (:func:`featcache.e2e.mnv4.prepare_batch`). Evaluation runs in batches of
``evaluation.batch_size``. Unreadable training images are counted per epoch (``unreadable``) and
left out; prediction refuses them by name.

Evaluation (every epoch on val, at the end on val and test, and by ``featcache evaluate``: one code
path): every detection, calibration and fairness metric (:func:`featcache.metrics.all_metrics`) of
p = sigmoid(score / T) with the run's temperature T (``featcache calibrate``; 1 before), the
uncalibrated calibration metrics when T is fitted, and the cascade's threshold analysis
(``evaluation.thresholds``: filtration, leakage, precision of what stops, coverage); report.md adds
its table, plots/ the confusion matrix, the reliability diagram and the cascade curve.

The run directory is the one layout (ARCHITECTURE.md); model.json's spec (``model``,
``pretrained``, ``image_size``, ``geometry``, ``num_classes``) is what ``featcache calibrate`` /
``cascade`` (:class:`featcache.e2e.mnv4.FilterRun`) and ``extract --backbone timm --model RUN`` read.
Epoch ``e`` draws its shuffling and augmentations from seeds derived from (seed, e), so an
interrupted run resumed by rerunning its command ends with the same weights as an uninterrupted one
(on the CPU; on CUDA with deterministic mode, see :mod:`featcache.runtime`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, Shortcut, given_settings, load_config
from ..data.manifest import Manifest, read_manifest
from ..errors import FeatcacheError
from ..heads.task import ManifestTask, register_task
from ..metrics import all_metrics, calibration_metrics, reliability_bins
from ..metrics.cascade import default_grid, threshold_analysis
from ..metrics.detection import sigmoid
from ..report.plots import plot_cascade, plot_confusion, plot_reliability
from ..report.tables import markdown_table
from ..runtime import RunDir
from ..train.trainer import RunResult, train_head
from .mnv4 import (
    DEFAULT_MODEL,
    DEFAULTS,
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
    read_temperature,
)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: The metrics a filter run's one-line summary shows.
SUMMARY_KEYS = ("auc", "acc", "eer", "f1", "ece", "f_fpr")


@register_task(TASK)
class FilterTask(ManifestTask):
    """The filter: a timm model with one logit, trained on the manifest's images (R = 1)."""

    detects = True
    summary_keys = SUMMARY_KEYS
    ablation_notes = ("The filter's runs train one at a time (max_runs = 1): each preset x seed is its own "
                      "job; the columns are the detection metrics of its test split.")

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        tc, mc = self.conf.training, self.conf.model
        self.size, self.workers, self.seed = mc.image_size, tc.num_workers, tc.seed
        self.augment, self.bs = tc.augment, tc.batch_size
        self.amp_dtype = AMP_DTYPES[tc.amp_dtype] if tc.mixed_precision and self.device.type == "cuda" else None
        self.cuda = self.device.type == "cuda"
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.splits: dict[str, tuple[pd.DataFrame, list[str]]] = {}
        self.unreadable, self.images_per_s = 0, []
        self._loaders: dict = {}  # built once: persistent workers serve every epoch
        self._last: tuple = (None,)  # (split, y, p, metrics) of the last evaluate, for write_plots

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        super().check_config(cfg)
        thresholds(cfg)

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        if "label" not in manifest.df or (manifest.df["label"] < 0).all():
            raise FeatcacheError(f"{manifest.source}: the filter needs labels (0 real, 1 fake)")

    # -- data and model ---------------------------------------------------------------------------
    def load(self, manifest: Manifest, splits=("train", "val", "test")) -> None:
        """Each split's labelled rows and file paths (a missing split is one line naming those present)."""
        self.manifest = manifest
        self.splits = {s: load_split(manifest, s) for s in splits}
        self._loaders.clear()  # a loader serves the paths of the manifest it was made for

    def make_spec(self) -> dict:
        mc = self.conf.model  # a run written before model.geometry existed reads timm (config.OLDER_DEFAULTS)
        return {"model": mc.name, "pretrained": mc.pretrained or default_pretrained(mc.name),
                "image_size": mc.image_size, "geometry": mc.geometry, "num_classes": 1}

    def build(self, spec: dict) -> torch.nn.Module:
        """The timm model; its pretrained weights when training (the train split loaded), else the bare
        architecture (a finished run's weights are loaded over it)."""
        weights = spec["pretrained"] if "train" in self.splits else "none"
        net = create_model(spec["model"], weights, seed=self.seed)
        return net.to(self.device, memory_format=torch.channels_last) if self.cuda else net

    @property
    def data_config(self) -> dict:
        """The preprocessing of the run's model and weights at its image size, in its geometry (the
        same for training and evaluation; ``timm`` for a run written before issue 26)."""
        s = self.spec
        return data_config(s["model"], int(s["image_size"]), s.get("pretrained"), s.get("geometry", "timm"))

    def _loader(self, key: str, paths: list[str], batch_size: int, sampler=None):
        if key not in self._loaders:
            self._loaders[key] = pixel_loader(paths, self.size, self.data_config, batch_size=batch_size,
                                              num_workers=self.workers, sampler=sampler, pin_memory=self.cuda)
        return self._loaders[key]

    # -- training ----------------------------------------------------------------------------------
    def batches(self, epoch: int, generators, batch_size: int):
        rows_all, paths = self.splits["train"]
        y_all = torch.from_numpy(rows_all["label"].to_numpy().astype(np.float32))
        sampler = self._loaders.get("train-sampler") or self._loaders.setdefault(
            "train-sampler", EpochSampler(len(paths), self.seed))
        sampler.set_epoch(epoch)  # shuffling: seeded by (seed, epoch)
        loader = self._loader(f"train{batch_size}", paths, batch_size, sampler)
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
            y = y_all[torch.from_numpy(rows)]
            if self.cuda:  # pinned, so that the copies do not wait for the device's queue
                y, pixels = y.pin_memory(), pixels if pixels.is_pinned() else pixels.pin_memory()
            x = prepare_batch(pixels, self.device, self.data_config, generator=gen, channels_last=self.cuda)
            yield {"x": x[None], "y": y.to(self.device, non_blocking=True)[None]}, k
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

    # -- evaluation ----------------------------------------------------------------------------------
    def temperature(self) -> float | None:
        """The run's fitted temperature (``featcache calibrate``), or None."""
        return read_temperature(self.run_dirs[0]) if self.run_dirs else None

    def predictions(self, split: str) -> pd.DataFrame:
        """Meta columns, ``score`` (the logit) and ``prob`` = sigmoid(score / T) of a loaded split."""
        rows, paths = self.splits[split]
        bs = max(self.bs, self.conf.evaluation.batch_size)
        loader = self._loader(split, paths, bs)  # one loader per split, kept with its workers
        scores, _, errors = predict_scores(self.module, paths, self.size, self.device, batch_size=bs,
                                           num_workers=self.workers, amp_dtype=self.amp_dtype,
                                           config=self.data_config, loader=loader)
        if errors:
            shown = "; ".join(f"{rows.at[r, 'sample_id']}: {e}" for r, e in list(errors.items())[:3])
            raise FeatcacheError(f"{len(errors)} image(s) of split {split} cannot be read ({shown})")
        preds = rows[[c for c in META if c in rows.columns]].copy()
        preds.insert(2, "score", scores)
        preds.insert(3, "prob", sigmoid(scores / (self.temperature() or 1.0)))
        return preds

    def evaluate(self, split: str):
        preds = self.predictions(split)
        y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
        t = self.temperature()
        p = preds["prob"].to_numpy()
        metrics = all_metrics(y, score / (t or 1.0), groups=preds["subgroup"].to_numpy())
        metrics["loss"] = float(self.loss_fn(torch.tensor(score), torch.tensor(y, dtype=torch.float64)))
        if t is not None:
            metrics["temperature"] = t
            metrics["uncalibrated"] = calibration_metrics(y, sigmoid(score))
        metrics["threshold_analysis"] = threshold_analysis(y, p, thresholds(self.conf))
        self._last = (split, y, p, metrics)
        return [(metrics, preds)]

    def report(self, metrics: dict, predictions: pd.DataFrame) -> str:
        """The cascade threshold table (stop as real when 1 - P(fake) >= t)."""
        rows = metrics.get("threshold_analysis") or []
        return "## Cascade thresholds (stop as real when 1 - P(fake) >= t)\n\n" + markdown_table(pd.DataFrame(rows))

    def write_plots(self, out: Path, split: str, title: str, r: int = 0) -> list[str]:
        """The confusion matrix, the reliability diagram and the cascade curve of ``split``."""
        if self._last[0] != split:
            self.evaluate(split)
        _, y, p, m = self._last
        plot_confusion(m["tn"], m["fp"], m["fn"], m["tp"], out / "confusion_matrix.png", f"{title} (P(fake) >= 0.5)")
        t = m.get("temperature")
        cal = f"T = {t:.3f}" if t is not None else "uncalibrated"
        plot_reliability([(f"{split}, {cal}", reliability_bins(y, p), m)], out / "reliability_diagram.png")
        marks = thresholds(self.conf)
        curve = pd.DataFrame(threshold_analysis(y, p, default_grid(marks)))
        plot_cascade(curve[["threshold", "filtration", "leakage", "precision"]], out / "cascade_analysis.png",
                     marks=marks, title=f"{title}, as stage 1")
        return ["confusion_matrix.png", "reliability_diagram.png", "cascade_analysis.png"]

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        """What summary.json adds for the filter: the model, its weights, the precision, the throughput."""
        ips = [v for v in self.images_per_s if np.isfinite(v)]
        return {"model": self.spec["model"], "pretrained": self.spec["pretrained"],
                "mixed_precision": self.conf.training.amp_dtype if self.amp_dtype is not None else "off",
                "train_images_per_s": float(np.mean(ips)) if ips else float("nan")}


def thresholds(cfg: dict | Config) -> list[float]:
    """The run's cascade thresholds (``evaluation.thresholds``), each in [0, 1] (one line otherwise)."""
    given = Config.of(cfg).evaluation.thresholds
    try:
        values = [float(t) for t in given]
    except (TypeError, ValueError):
        values = []
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        shown = list(given) if isinstance(given, tuple) else given
        raise FeatcacheError(f"evaluation.thresholds must be numbers in [0, 1]; got {shown!r}")
    return values


# -- the alias: featcache train-e2e mnv4 ---------------------------------------------------------------
#: ``train_e2e``'s keyword -> the config key it sets.
OPTION_KEYS = {"model": "model.name", "pretrained": "model.pretrained", "image_size": "model.image_size",
               "geometry": "model.geometry", "epochs": "training.epochs", "batch_size": "training.batch_size",
               "lr": "training.lr", "weight_decay": "training.weight_decay", "save_every": "training.save_every",
               "patience": "training.patience", "mixed_precision": "training.mixed_precision",
               "amp_dtype": "training.amp_dtype", "augment": "training.augment",
               "num_workers": "training.num_workers", "device": "training.device", "seed": "training.seed",
               "tensorboard": "logging.tensorboard"}


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
) -> RunResult:
    """``train_head("mnv4", manifest, out, sets=...)`` with the filter's options as keywords (the alias of
    ``featcache train-e2e mnv4``); each keyword sets one config key (:data:`OPTION_KEYS`); ``None``
    keeps the config's value (configs/mnv4.yaml: 50 epochs, lr 1e-4, the design's).

    The finished run keeps its resume point. An interrupted run resumes when called again with the
    same options; ``resume=True`` continues the run in ``out`` with its own config whatever the other
    keywords, and a larger ``epochs`` extends it, the cosine schedule restarting from the last
    learning rate used or from ``lr`` when given (``echo`` says which). ``on_epoch_end(epoch, row)``
    is called after each epoch's resume point is written (a notebook hook; raising interrupts the run).
    """
    hook = None if on_epoch_end is None else (lambda e, rows: on_epoch_end(e, rows[0]))
    kw = dict(progress=progress, echo=echo, keep_resume=True, on_epoch_end=hook)
    if resume:
        preset, sets = _resume_sets(Path(out), manifest, epochs)
        return train_head(TASK, manifest, out, preset=preset, sets=sets, extend=True, lr=lr, **kw)
    given = dict(model=model, pretrained=pretrained, image_size=image_size, geometry=geometry, epochs=epochs,
                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, save_every=save_every, patience=patience,
                 mixed_precision=mixed_precision, amp_dtype=amp_dtype, augment=augment, num_workers=num_workers,
                 device=device or "auto", seed=seed, tensorboard=tensorboard)
    sets = [Shortcut(OPTION_KEYS[k], v, k) for k, v in given.items() if v is not None]
    return train_head(TASK, manifest, out, sets=sets, overwrite=overwrite, **kw)


def _resume_sets(out: Path, manifest, epochs: int | None) -> tuple[str | None, dict]:
    """The preset and settings of the run in ``out`` (to resume it with its own config), its epochs
    raised to ``epochs``; one line when there is no run to resume or it read another manifest."""
    if not out.exists():
        raise FeatcacheError(f"cannot resume {out}: it does not exist")
    rd = RunDir(out)
    for f in (rd.config, rd.model, rd.resume):
        if not f.is_file():
            raise FeatcacheError(f"cannot resume {out}: {f.name} is missing (no epoch was finished); start it again")
    conf = Config.of(load_config(rd.config))
    if conf.task != TASK:
        raise FeatcacheError(f"cannot resume {out}: it is not a {TASK} run")
    if conf.manifest.sha256 != read_manifest(manifest).sha256:
        raise FeatcacheError(f"cannot resume {out}: it was trained on another manifest ({conf.manifest.path})")
    sets = given_settings(conf.as_dict(), ("model", "training", "selection", "evaluation", "logging"))
    if epochs is not None:
        sets["training.epochs"] = int(epochs)
    return conf.preset, sets


__all__ = ["FilterTask", "OPTION_KEYS", "SUMMARY_KEYS", "train_e2e"]
