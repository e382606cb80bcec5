"""The MobileNetV4 filter: a timm model with one output logit, its transforms and prediction.

Model: ``timm.create_model(MODEL, num_classes=1)``; default ``mobilenetv4_hybrid_medium``
with the ``ix_e550_r256_in1k`` ImageNet weights.  ``pretrained`` is a timm tag (downloaded
where there is network), a local weights file (safetensors, or a tensors-only torch file
read with ``weights_only=True``; its classifier is not used), or ``none`` (random
initialisation with the seed: tests and the demo use ``mobilenetv4_conv_small``).

Inputs: resize to ``image_size`` square, ImageNet mean/std.  Training adds a horizontal flip,
colour jitter, a random affine transform and a Gaussian blur (:func:`make_transform`).
Score = the logit of fake; p = sigmoid(score / T) with the run's temperature T (1 when the
run is not calibrated).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ..data.images import ImageFiles, collate_images
from ..data.manifest import read_manifest
from ..errors import BackboneError, FeatcacheError, first_line
from ..metrics.detection import sigmoid
from ..runtime import resolve_device

TASK = "mnv4"
DEFAULT_MODEL = "mobilenetv4_hybrid_medium"
DEFAULT_TAG = "ix_e550_r256_in1k"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Columns carried from the manifest into predictions tables.
META = ["sample_id", "label", "split", "subgroup", "identity", "dataset", "method", "gender", "race"]


def default_pretrained(model: str) -> str:
    """The weights used when ``--pretrained`` is not given."""
    return DEFAULT_TAG if model == DEFAULT_MODEL else "default"


def create_model(model: str = DEFAULT_MODEL, pretrained: str | None = None, *, seed: int = 0) -> torch.nn.Module:
    """A timm MobileNetV4 (any timm model name works) with one output logit."""
    import timm

    if not timm.is_model(model):
        close = [m for m in timm.list_models("mobilenetv4*")]
        raise BackboneError(f"unknown timm model {model!r}; MobileNetV4 models: {', '.join(close)}")
    pretrained = pretrained or default_pretrained(model)
    torch.manual_seed(seed)  # the new classifier (and everything, with pretrained none)
    if pretrained == "none":
        return _zero_head(timm.create_model(model, pretrained=False, num_classes=1))
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise BackboneError(f"weights file {pretrained} does not exist")
        try:  # timm reads the file (weights_only=True); its classifier is not used
            return _zero_head(timm.create_model(model, pretrained=True, num_classes=1,
                                                pretrained_cfg_overlay={"file": str(Path(pretrained).resolve())}))
        except Exception as exc:
            raise BackboneError(f"cannot load weights {pretrained} into {model}: {first_line(exc)}") from exc
    name = model if pretrained == "default" else f"{model}.{pretrained}"
    try:
        return _zero_head(timm.create_model(name, pretrained=True, num_classes=1))
    except Exception as exc:  # no network, unknown tag, ...
        raise BackboneError(
            f"cannot load the {model} weights {pretrained!r} ({first_line(exc)}); without network, download "
            f"them elsewhere (timm model {name}) and pass the file with --pretrained PATH, or --pretrained none "
            "for random weights") from exc


def _zero_head(net: torch.nn.Module) -> torch.nn.Module:
    """Start the new one-logit classifier at zero: every image begins at p = 0.5 (a randomly
    initialised head on 1280 unnormalised features starts with logits in the tens)."""
    head = net.get_classifier()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return net


def make_transform(image_size: int, train: bool):
    """Resize + (training augmentations when ``train``) + ImageNet normalisation (torchvision)."""
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if train:
        steps += [
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            T.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            T.RandomApply([T.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
        ]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def load_split(manifest, split: str) -> tuple[pd.DataFrame, list[str]]:
    """The labelled rows of ``split`` of a manifest (path or :class:`Manifest`), and their file paths."""
    m = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    df = m.df
    rows = df[df["split"] == split]
    if len(rows) == 0:
        raise FeatcacheError(f"{m.source}: no rows in split {split!r} (splits present: "
                             f"{', '.join(sorted(df['split'].unique()))})")
    if (rows["label"] < 0).any():
        raise FeatcacheError(f"{m.source}: split {split} has rows without a label; the filter needs labels")
    rows = rows.reset_index(drop=True)
    paths = [p if os.path.isabs(p) else str(m.root / p) for p in rows["path"]]
    return rows, paths


def image_loader(paths: list[str], image_size: int, *, train: bool, batch_size: int, num_workers: int = 0,
                 generator: torch.Generator | None = None, augment: bool = True) -> torch.utils.data.DataLoader:
    """Batches ``(rows, images, errors)`` of decoded images (unreadable ones: error set, zeros).

    ``train``: shuffled, and augmented unless ``augment`` is False."""
    ds = ImageFiles(paths, make_transform(image_size, train and augment), (3, image_size, image_size))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=train, num_workers=num_workers, collate_fn=collate_images,
        generator=generator, drop_last=False)  # workers read PNG files only (no Zarr): the default fork is safe


@torch.no_grad()
def predict_scores(model: torch.nn.Module, paths: list[str], image_size: int, device: torch.device, *,
                   batch_size: int = 64, num_workers: int = 0, amp_dtype: torch.dtype | None = None,
                   progress: bool = False, desc: str = "predict") -> tuple[np.ndarray, np.ndarray, dict]:
    """Logits of every path (float64), a readable mask, and {row: error} for unreadable files."""
    from tqdm.auto import tqdm

    model.eval()
    scores = np.zeros(len(paths), dtype=np.float64)
    ok = np.ones(len(paths), dtype=bool)
    errors = {}
    loader = image_loader(paths, image_size, train=False, batch_size=batch_size, num_workers=num_workers)
    for rows, x, errs in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        with autocast(device, amp_dtype):
            out = model(x.to(device)).float().squeeze(1)
        scores[rows] = out.cpu().numpy()
        for r, e in zip(rows, errs):
            if e:
                ok[r] = False
                errors[int(r)] = e
    return scores, ok, errors


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` in ``amp_dtype`` on CUDA; nothing (fp32) otherwise."""
    import contextlib

    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype)


class FilterRun:
    """A trained filter read back from its run directory (``model.json`` + weights + temperature)."""

    def __init__(self, run_dir, device=None, weights: str = "best"):
        self.run_dir = Path(run_dir)
        spec_file = self.run_dir / "model.json"
        if not self.run_dir.exists():
            raise FeatcacheError(f"run {self.run_dir} does not exist")
        if (self.run_dir / "best_model.safetensors").is_file() and not (self.run_dir / f"{weights}.safetensors").is_file():
            raise FeatcacheError(f"{self.run_dir} was written by an older featcache (another run layout); retrain it")
        if not spec_file.is_file():
            raise FeatcacheError(f"{self.run_dir} is not a run directory: model.json is missing")
        spec = json.loads(spec_file.read_text())
        if spec.get("task") != TASK:
            raise FeatcacheError(f"{self.run_dir} is a {spec.get('task')!r} run, not a train-e2e {TASK} run")
        wfile = self.run_dir / f"{weights}.safetensors"
        if not wfile.is_file():
            raise FeatcacheError(f"{self.run_dir} is not a finished run: {wfile.name} is missing")
        self.spec = spec["spec"]
        self.device = resolve_device(device)
        self.model = create_model(self.spec["model"], "none")
        self.model.load_state_dict(load_file(str(wfile)))
        self.model.to(self.device).eval()
        temp_file = self.run_dir / "calibration_temp.json"
        self.temperature = float(json.loads(temp_file.read_text())["temperature"]) if temp_file.is_file() else None

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    def predict(self, manifest, split: str, *, batch_size: int = 64, num_workers: int = 0,
                progress: bool = False) -> pd.DataFrame:
        """Predictions table of ``split``: meta columns, ``score`` (logit) and ``prob`` = sigmoid(score / T).

        Unreadable images are an error naming them (a filter must see every sample it judges).
        """
        rows, paths = load_split(manifest, split)
        scores, ok, errors = predict_scores(self.model, paths, self.image_size, self.device, batch_size=batch_size,
                                            num_workers=num_workers, progress=progress, desc=f"filter {split}")
        if errors:
            shown = "; ".join(f"{rows.at[r, 'sample_id']}: {e}" for r, e in list(errors.items())[:3])
            raise FeatcacheError(f"{len(errors)} image(s) of split {split} cannot be read ({shown})")
        preds = rows[[c for c in META if c in rows.columns]].copy()
        t = self.temperature or 1.0
        preds.insert(2, "score", scores)
        preds.insert(3, "prob", sigmoid(scores / t))
        return preds
