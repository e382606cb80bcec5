"""COCO AP@[.5:.95], AP@.5 and AR@100 with pycocotools, overall and per group (DESIGN.md, detection fairness).

Boxes come as DETR gives them: relative (cx, cy, w, h) in [0, 1], turned into COCO's absolute
(x, y, w, h) with each image's (height, width). A detection per query: its label is the most
probable class other than no-object, its score that probability (DETR's own post-processing).
Class indices are COCO category ids (as in facebook/detr-resnet-50 and the synthetic set).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def to_coco_xywh(boxes: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Relative (cx, cy, w, h) boxes (..., 4) and (height, width) -> absolute (x, y, w, h)."""
    b = np.asarray(boxes, dtype=np.float64)
    h, w = float(size[0]), float(size[1])
    return np.stack([(b[..., 0] - b[..., 2] / 2) * w, (b[..., 1] - b[..., 3] / 2) * h,
                     b[..., 2] * w, b[..., 3] * h], axis=-1)


def coco_ground_truth(sizes, gt_boxes, gt_classes, image_ids=None) -> dict:
    """A COCO ground-truth dict from per-image relative boxes and class ids."""
    ids = list(range(1, len(sizes) + 1)) if image_ids is None else [int(i) for i in image_ids]
    images, anns = [], []
    cats = sorted({int(c) for cl in gt_classes for c in np.asarray(cl).ravel()})
    for img_id, size, boxes, classes in zip(ids, sizes, gt_boxes, gt_classes):
        images.append({"id": img_id, "height": int(size[0]), "width": int(size[1])})
        for box, cat in zip(to_coco_xywh(np.asarray(boxes).reshape(-1, 4), size), np.asarray(classes).ravel()):
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(cat),
                         "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}


def detr_detections(logits: np.ndarray, boxes: np.ndarray, sizes, image_ids=None) -> list[dict]:
    """COCO result records, one per query: DETR's post-processing (softmax, no-object dropped)."""
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True))[..., :-1]
    labels, scores = probs.argmax(-1), probs.max(-1)
    ids = list(range(1, len(sizes) + 1)) if image_ids is None else [int(i) for i in image_ids]
    out = []
    for i, (img_id, size) in enumerate(zip(ids, sizes)):
        xywh = to_coco_xywh(boxes[i], size)
        for q in range(len(xywh)):
            out.append({"image_id": img_id, "category_id": int(labels[i, q]), "bbox": [float(v) for v in xywh[q]],
                        "score": float(scores[i, q])})
    return out


def coco_ap_ar(gt: dict, detections: list[dict], image_ids=None, cat_ids=None) -> dict:
    """AP@[.5:.95] (``ap``), AP@.5 (``ap50``) and AR@100 (``ar``) (pycocotools COCOeval, bbox) over
    ``image_ids`` and ``cat_ids`` (default: all).

    NaN where no ground truth box of ``cat_ids`` is in the selected images (pycocotools' -1);
    0 where there is ground truth but no detection in those images (what pycocotools gives:
    every box missed; its ``loadRes`` cannot take an empty list, so that case is answered here).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [im["id"] for im in gt["images"]] if image_ids is None else [int(i) for i in image_ids]
    wanted = set(ids)
    cats = None if cat_ids is None else {int(c) for c in cat_ids}
    has_gt = any(a["image_id"] in wanted and (cats is None or int(a["category_id"]) in cats)
                 for a in gt["annotations"])
    if not has_gt:
        return {"ap": float("nan"), "ap50": float("nan"), "ar": float("nan")}
    dets = [dict(d) for d in detections if d["image_id"] in wanted]  # loadRes writes into the records
    if not dets:
        return {"ap": 0.0, "ap50": 0.0, "ar": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        if cat_ids is not None:
            ev.params.catIds = [int(c) for c in cat_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # AP@[.5:.95], AP@.5 and AR@100, all areas; pycocotools' -1 (nothing to score) as NaN
    ap, ap50, ar = (float(ev.stats[i]) for i in (0, 1, 8))
    return {k: v if v >= 0 else float("nan") for k, v in (("ap", ap), ("ap50", ap50), ("ar", ar))}


def group_ap_ar(gt: dict, detections: list[dict], groups, names: dict, cat_ids=None) -> dict:
    """``{"ap", "ap50", "ar", "ap_<name>", "ap50_<name>", "ar_<name>"}`` overall and for each group code,
    over the categories ``cat_ids`` (default: all in the ground truth)."""
    ids = np.array([im["id"] for im in gt["images"]])
    groups = np.asarray(groups)
    out = coco_ap_ar(gt, detections, cat_ids=cat_ids)
    for code, name in names.items():
        r = coco_ap_ar(gt, detections, ids[groups == code].tolist(), cat_ids)
        out.update({f"{k}_{name}": v for k, v in r.items()})
    return out
