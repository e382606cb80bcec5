"""The DETR fine-tune as a registered task (``detr``), and ``featcache finetune-detr``, its alias.

A randomly initialised DETR detects nothing (AP 0), so a fairness perturbation of its outputs
would show nothing; this fits it (by default the offline ``tiny`` preset) to one split of a
detection manifest (``training.split``, train) with DETR's own set loss (transformers: Hungarian
matching, class, L1 and GIoU terms, deep supervision over every decoder layer), AdamW (weight
decay 1e-4), gradient norm clipped at 0.1, seeded (configs/detr.yaml). ``featcache train-head detr
--manifest M --out RUN`` trains it like any task: :func:`featcache.train.loop.fit` runs the epochs,
so the fine-tune writes the one run layout and resumes after Ctrl-C or kill -9 when the same
command is run again. Detection manifests need no val split: ``selection.rule: last``.

Evaluation (each epoch on val when the manifest has one, at the end on every split besides the
training split that exists, and by ``featcache evaluate RUN``: one code path,
:meth:`DetrTask.evaluate`): COCO AP@[.5:.95], AP@.5 and AR@100 with pycocotools
(:mod:`featcache.metrics.coco`, the code FAAP's tables use), over ``evaluation.categories``, overall
and per gender where the manifest has a ``gender`` column, with the gaps (male - female). The
predictions are one row per image: sample_id, image_id, split, gender, ``boxes`` (ground-truth
boxes), ``detected`` (queries whose best class other than no-object has probability >= 0.5) and
``score`` (the mean of the top-10 queries' best class probability, FAAP's image score).

At the end (:meth:`DetrTask.finish`) the folder also holds a Hugging Face model (``config.json``,
weights, processor) that ``featcache extract --backbone detr --model RUN`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Shortcut
from ..data.detection_images import DetectionImages
from ..data.manifest import Manifest
from ..errors import FeatcacheError
from ..extract.detr import load_detr
from ..heads.task import ManifestTask, meta_codes, register_task
from ..losses.faap import image_scores
from ..metrics.coco import coco_ap_ar, coco_ground_truth, detr_detections, group_ap_ar
from ..report.tables import markdown_table
from ..runtime import RunDir
from ..train.trainer import RunResult, train_head

TASK = "detr"
GENDERS = ("male", "female")  # codes 0, 1


@register_task(TASK)
class DetrTask(ManifestTask):
    """A DETR fit to a detection manifest's images (R = 1)."""

    detects = False
    summary_keys = ("ap", "ap50", "ar", "ap_gap", "ar_gap")
    ablation_axes = ("test_ap_gap", "test_ap")
    ablation_notes = "The DETR fine-tune's columns are COCO AP (ap, ap50), AR@100 and their gender gaps (male - female)."

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        self.items: dict[str, tuple[pd.DataFrame, list]] = {}  # split -> (meta rows, decoded items)
        self._encoded: dict[str, tuple] = {}  # split -> (pixels, mask, labels) on the device, made once
        self.processor = None
        self._aux = False

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        df = manifest.df
        has = [df[c].fillna("").astype(str).str.len().gt(0) for c in ("image_id", "annotations") if c in df]
        if len(has) < 2 or not (has[0] & has[1]).any():
            raise FeatcacheError(f"{manifest.source}: the DETR fine-tune needs a detection manifest: no row has both "
                                 "image_id and annotations (featcache manifest faap-coco|coco-gender, or featcache "
                                 "synth detection)")

    # -- data ----------------------------------------------------------------------------------------
    def train_split(self) -> str:
        return self.conf.training.split

    def load(self, manifest: Manifest, splits=None) -> None:
        """Decode the images and ground truth of ``splits``; by default (training) the training split
        (at least 2 readable images) and every other split of val and test the manifest has."""
        present = set(manifest.df["split"].astype(str))
        if splits is None:
            splits = [self.train_split(), *(s for s in ("val", "test") if s in present and s != self.train_split())]
        self.items, self._encoded = {}, {}
        for split in splits:
            rows = manifest.df[manifest.df["split"] == split].reset_index(drop=True)
            if len(rows) == 0:
                raise FeatcacheError(f"{manifest.source}: no rows in split {split!r} (splits present: "
                                     f"{', '.join(sorted(present))})")
            paths = [p if os.path.isabs(p) else str(manifest.root / p) for p in rows["path"]]
            data = DetectionImages(paths, rows)
            items = [data[i] for i in range(len(data))]
            bad = [(rows["sample_id"][i], it[2]) for i, it in enumerate(items) if it[2]]
            if bad:
                raise FeatcacheError(f"cannot read {len(bad)} image(s) of split {split}, e.g. {bad[0][0]}: {bad[0][1]}")
            self.items[split] = (rows, [it[1] for it in items])
        if splits and splits[0] == self.train_split() and len(self.items[splits[0]][0]) < 2:
            raise FeatcacheError(f"{manifest.source}: split {splits[0]!r} has {len(self.items[splits[0]][0])} "
                                 "image(s); fine-tuning needs at least 2")

    def eval_splits(self) -> tuple[str, ...]:
        """Every loaded split besides the training split (val and test where the manifest has them)."""
        return tuple(s for s in ("val", "test") if s in self.items and s != self.train_split())

    def encoded(self, split: str) -> tuple:
        """(pixel values, pixel mask or None, DETR labels) of a split, by the model's processor, on the device."""
        if split not in self._encoded:
            _, items = self.items[split]
            enc = self.processor(images=[it[0] for it in items], return_tensors="pt")
            mask = enc.get("pixel_mask")
            labels = [{"class_labels": torch.as_tensor(it[3], device=self.device),
                       "boxes": torch.as_tensor(it[2], device=self.device)} for it in items]
            self._encoded[split] = (enc["pixel_values"].to(self.device),
                                    None if mask is None else mask.to(self.device), labels)
        return self._encoded[split]

    # -- model ---------------------------------------------------------------------------------------
    def make_spec(self) -> dict:
        return {"model": self.conf.model.name}

    def build(self, spec: dict) -> torch.nn.Module:
        """The starting DETR (``model.name``), or a finished run's own Hugging Face folder; every
        parameter trainable (transformers freezes the ResNet stem; from random weights it must learn
        too) and DETR's deep supervision on (every decoder layer's outputs matched)."""
        own = self.run_dirs[0] if self.run_dirs and RunDir(self.run_dirs[0]).hf_config.is_file() else None
        net, self.processor, _ = load_detr(str(own) if own is not None else spec["model"],
                                           seed=self.conf.training.seed)
        for p in net.parameters():
            p.requires_grad_(True)
        self._aux = net.config.auxiliary_loss
        net.config.auxiliary_loss = True
        return net

    # -- training ------------------------------------------------------------------------------------
    def batches(self, epoch: int, generators, batch_size: int):
        n = len(self.items[self.train_split()][0])
        order = torch.randperm(n, generator=generators[0]).to(self.device)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield {"idx": idx[None]}, len(idx)

    def batch_loss(self, batch, state):
        pixels, mask, labels = self.encoded(self.train_split())
        idx = batch["idx"][0]
        res = self.module(pixel_values=pixels[idx], pixel_mask=None if mask is None else mask[idx],
                          labels=[labels[i] for i in idx.tolist()])
        terms = {k: v.detach().reshape(1) for k, v in res.loss_dict.items() if k[-1].isalpha()}
        return res.loss.reshape(1), terms

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Class logits (n, Q, C+1) and relative boxes (n, Q, 4) of a split's images."""
        pixels, mask, _ = self.encoded(split)
        bs = self.conf.evaluation.batch_size
        self.module.eval()
        logits, boxes = [], []
        for s in range(0, len(pixels), bs):
            out = self.module(pixel_values=pixels[s:s + bs], pixel_mask=None if mask is None else mask[s:s + bs])
            logits.append(out.logits.float())
            boxes.append(out.pred_boxes.float())
        return torch.cat(logits).cpu().numpy(), torch.cat(boxes).cpu().numpy()

    def evaluate(self, split: str):
        """COCO AP, AP50, AR@100 of ``split`` overall and per gender, the gaps, and one row per image;
        a split the manifest lacks (val, each epoch) gives no metrics."""
        if split not in self.items:
            return [({}, pd.DataFrame())]
        rows, items = self.items[split]
        logits, boxes = self.outputs(split)
        sizes = np.stack([it[1] for it in items])
        gt = coco_ground_truth(sizes, [it[2] for it in items], [it[3] for it in items])
        dets = detr_detections(logits, boxes, sizes)
        cats = self.conf.evaluation.categories.strip()  # all, or COCO ids: 1 or 1,3
        cat_ids = None if cats == "all" else [int(c) for c in cats.split(",")]
        gender = meta_codes(rows, "gender", GENDERS) if "gender" in rows else np.full(len(rows), -1)
        if (gender >= 0).any():
            metrics = group_ap_ar(gt, dets, gender, dict(enumerate(GENDERS)), cat_ids)
            metrics.update(ap_gap=metrics["ap_male"] - metrics["ap_female"],
                           ar_gap=metrics["ar_male"] - metrics["ar_female"])
        else:
            metrics = {**coco_ap_ar(gt, dets, cat_ids=cat_ids),
                       "remarks": ["no gender in this split: no per-gender AP, AR or gap"]}
        metrics.update(images=len(rows), boxes=int(sum(len(it[3]) for it in items)))
        return [(metrics, self._per_image(rows, items, logits))]

    def _per_image(self, rows: pd.DataFrame, items: list, logits: np.ndarray) -> pd.DataFrame:
        """The predictions table: one row per image (see the module docstring)."""
        t = torch.from_numpy(logits)
        best = t.softmax(-1)[..., :-1].max(-1).values  # each query's best class other than no-object
        preds = rows[[c for c in ("sample_id", "image_id", "split", "gender") if c in rows]].copy()
        preds["boxes"] = [len(it[3]) for it in items]
        preds["detected"] = (best >= 0.5).sum(-1).numpy()
        preds["score"] = image_scores(t, 10).numpy()
        return preds

    def report(self, metrics: dict, predictions: pd.DataFrame) -> str:
        """COCO AP, AP50 and AR@100 overall and per gender (rows), with the gap."""
        if "ap_male" not in metrics:
            return ""
        table = pd.DataFrame([{"": who, "AP": metrics[f"ap{s}"], "AP50": metrics[f"ap50{s}"], "AR@100": metrics[f"ar{s}"]}
                              for who, s in (("all", ""), ("male", "_male"), ("female", "_female"))])
        return ("## COCO detection per gender (pycocotools)\n\n" + markdown_table(table) +
                f"\n\nAP gap (male - female) {metrics['ap_gap']:.4f}; AR gap {metrics['ar_gap']:.4f}\n")

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        """The Hugging Face folder (config.json, weights, processor) beside the run's files, what
        ``featcache extract --backbone detr --model RUN`` reads; summary.json gets the images trained on."""
        net = self.module
        net.config.auxiliary_loss = self._aux
        net.save_pretrained(run_dir)
        self.processor.save_pretrained(run_dir)
        net.config.auxiliary_loss = True
        return {"model": self.spec["model"], "images": len(self.items[self.train_split()][0])}


# -- the alias: featcache finetune-detr ------------------------------------------------------------------
def finetune_detr(manifest, out, *, model: str | None = None, epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
                  split: str | None = None, device: str | None = None, overwrite: bool = False,
                  progress: bool = True, echo=None) -> RunResult:
    """``train_head("detr", manifest, out, sets=...)`` with the fine-tune's options as keywords (the
    alias of ``featcache finetune-detr``); ``None`` keeps configs/detr.yaml's value (tiny, 30 epochs,
    batch 16, lr 1e-3). An interrupted fine-tune in ``out`` with the same options resumes; one with
    other options is refused (``overwrite`` replaces it)."""
    given = {"model.name": ("model", model), "training.epochs": ("epochs", epochs),
             "training.batch_size": ("batch_size", batch_size), "training.lr": ("lr", lr),
             "training.seed": ("seed", seed), "training.split": ("split", split), "training.device": ("device", device)}
    # each checked by the declared constraints, its errors naming the option (--epochs 0 / epochs=0)
    sets = [Shortcut(key, value, name) for key, (name, value) in given.items() if value is not None]
    return train_head(TASK, manifest, out, sets=sets, overwrite=overwrite, progress=progress, echo=echo)


__all__ = ["DetrTask", "finetune_detr"]
