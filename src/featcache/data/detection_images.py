"""Detection images with their COCO ground truth, for the DETR extraction (and its fine-tune).

The annotations are read with ``pycocotools.coco.COCO``: one COCO object per annotation file,
built on first use and kept (in each DataLoader worker). Boxes are converted with
``torchvision.ops.box_convert`` from COCO's absolute ``(x, y, w, h)`` to DETR's relative
``(cx, cy, w, h)`` (the cache's ``gt_boxes``); crowd annotations are left out.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatcacheError
from .images import read_rgb


def read_coco(ann_file: str):
    """``pycocotools.coco.COCO`` of one annotation file (its progress prints silenced)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def image_annotations(coco, image_id: int) -> list[dict]:
    """The non-crowd annotations of one image, in file order."""
    return [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[int(image_id)])) if not a.get("iscrowd", 0)]


def ground_truth(anns: list[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO boxes (x, y, w, h in pixels) as relative (cx, cy, w, h) float32, and their category ids."""
    from torchvision.ops import box_convert

    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
    rel = box_convert(boxes, "xywh", "cxcywh") / torch.tensor([width, height, width, height], dtype=torch.float64)
    return rel.to(torch.float32).numpy(), np.array([int(a["category_id"]) for a in anns], dtype=np.int64)


def _manifest_root(abs_path: str, rel_path: str) -> Path:
    if os.path.isabs(rel_path):
        return Path(abs_path).parent
    return Path(abs_path[: len(abs_path) - len(rel_path)])


class DetectionImages(torch.utils.data.Dataset):
    """Decoded RGB images with their COCO ground truth; failures reported, never raised.

    Items are ``(row, (rgb array, [height, width], gt boxes, gt classes), error)``.
    """

    def __init__(self, paths: list[str], meta):
        self.paths = list(paths)
        if meta is None or "image_id" not in meta or "annotations" not in meta:
            raise FeatcacheError("detr extraction needs a detection manifest with image_id and annotations columns "
                                 "(featcache manifest faap-coco|coco-gender, or featcache synth detection)")
        has = meta["annotations"].fillna("").astype(str).str.len().gt(0) & meta["image_id"].fillna("").astype(str).str.len().gt(0)
        if len(meta) and not has.any():
            raise FeatcacheError("detr extraction needs ground truth: no row of the manifest has both image_id and "
                                 "annotations (featcache manifest faap-coco|coco-gender, or featcache synth detection)")
        self.ann = []
        for p, rel, a in zip(self.paths, meta["path"], meta["annotations"]):
            a = str(a)
            self.ann.append("" if not a else a if os.path.isabs(a) else str(_manifest_root(p, str(rel)) / a))
        self.image_ids = [str(v) for v in meta["image_id"]]
        self._coco: dict[str, object] = {}  # annotation file -> COCO, built on first use

    def coco(self, ann_file: str):
        if ann_file not in self._coco:
            self._coco[ann_file] = read_coco(ann_file)
        return self._coco[ann_file]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            arr = np.array(read_rgb(self.paths[row]))
            h, w = arr.shape[:2]
            if not self.ann[row] or not self.image_ids[row]:
                raise FeatcacheError("no annotations file or image_id in the manifest")
            anns = image_annotations(self.coco(self.ann[row]), int(self.image_ids[row]))
            boxes, classes = ground_truth(anns, h, w)
            return row, (arr, np.array([h, w], dtype=np.int64), boxes, classes), ""
        except Exception as exc:  # any failure is data, not a crash
            empty = (np.zeros((32, 32, 3), np.uint8), np.zeros(2, np.int64), np.zeros((0, 4), np.float32),
                     np.zeros(0, np.int64))
            return row, empty, f"{type(exc).__name__}: {exc}"
