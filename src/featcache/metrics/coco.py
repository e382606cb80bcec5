"""COCO AP@[.5:.95], AP@.5 and AR@100 with pycocotools, overall and per group (DESIGN.md, detection fairness).

Boxes come as DETR gives them: relative (cx, cy, w, h) in [0, 1], turned into COCO's absolute
(x, y, w, h) with each image's (height, width). A detection per query: its label is the most
probable class other than no-object, its score that probability (DETR's own post-processing).
Class indices are COCO category ids (as in facebook/detr-resnet-50 and the synthetic set).
"""

from __future__ import annotations

import contextlib
import io
import warnings

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


# -- bootstrap over images -------------------------------------------------------------------------
def image_matches(gt: dict, detections: list[dict], cat_ids=None) -> dict:
    """pycocotools' per-image matching (``COCOeval.evaluate``: bbox, all areas, 100 detections per
    image) of every image of ``gt``, kept so that AP can be recomputed for any image weights
    (:func:`weighted_ap_ar`) without matching again.

    Per category with ground truth, in pycocotools' accumulation order (images in id order, each
    image's detections by score, then all sorted by score with a stable sort): ``image`` (index
    into ``gt["images"]`` of each detection), ``tp`` and ``fp`` (T x D, per IoU threshold),
    ``npig`` (non-ignored ground-truth boxes per image); ``n_images`` and ``rec_thrs``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = {int(im["id"]): i for i, im in enumerate(gt["images"])}
    cats = sorted({int(a["category_id"]) for a in gt["annotations"]} if cat_ids is None else {int(c) for c in cat_ids})
    out = {"n_images": len(index), "categories": [], "rec_thrs": np.linspace(0.0, 1.0, 101)}
    if not detections:  # loadRes cannot take an empty list: every box of the ground truth is missed
        for cat in cats:
            npig = np.zeros(len(index))
            for a in gt["annotations"]:
                if int(a["category_id"]) == cat and not a.get("iscrowd", 0) and int(a["image_id"]) in index:
                    npig[index[int(a["image_id"])]] += 1
            if npig.sum():
                none = np.zeros((10, 0), bool)
                out["categories"].append({"image": np.zeros(0, np.int64), "tp": none, "fp": none, "npig": npig})
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), "bbox")
        ev.params.imgIds, ev.params.catIds = sorted(index), cats
        ev.evaluate()
    p = ev.params
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    out["rec_thrs"] = np.asarray(p.recThrs)
    for k in range(len(p.catIds)):
        entries = [e for e in ev.evalImgs[k * n_area * n_img:k * n_area * n_img + n_img] if e is not None]  # area "all"
        npig = np.zeros(n_img)
        for e in entries:
            npig[index[e["image_id"]]] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        if not npig.sum():
            continue
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det], dtype=np.float64) for e in entries])
        order = np.argsort(-scores, kind="mergesort")
        image = np.concatenate([np.full(len(e["dtScores"][:max_det]), index[e["image_id"]]) for e in entries])[order]
        dtm = np.concatenate([e["dtMatches"][:, :max_det] for e in entries], axis=1)[:, order] != 0
        dtig = np.concatenate([e["dtIgnore"][:, :max_det] for e in entries], axis=1)[:, order].astype(bool)
        out["categories"].append({"image": image.astype(np.int64), "tp": dtm & ~dtig, "fp": ~dtm & ~dtig,
                                  "npig": npig})
    return out


def weighted_ap_ar(matches: dict, weights) -> tuple[np.ndarray, np.ndarray]:
    """AP@[.5:.95] and AR@100 (B,) for image weights (B, n_images) of :func:`image_matches`.

    Weight ``w`` on an image is that image counted ``w`` times (a bootstrap resample's counts): the
    result is pycocotools' on the data set with every image repeated ``w`` times (tested against
    it), computed from one matching: precision and recall are weighted cumulative sums in the
    fixed score order, made monotone, read at the 101 recall thresholds. NaN where the weighted
    images hold no ground truth; 0 where there is ground truth but no detection.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    thr = matches["rec_thrs"]
    ap_parts, ar_parts = [], []
    for c in matches["categories"]:
        npig = w @ c["npig"]  # (B,)
        wd = w[:, c["image"]][:, None, :]  # (B, 1, D)
        tp = np.cumsum(wd * c["tp"][None], axis=-1)
        fp = np.cumsum(wd * c["fp"][None], axis=-1)
        valid = npig > 0
        rc = tp / np.where(valid, npig, 1.0)[:, None, None]
        pr = tp / (tp + fp + np.spacing(1))
        env = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # pycocotools' monotone precision
        env = np.concatenate([env, np.zeros(env.shape[:-1] + (1,))], axis=-1)  # beyond the last recall: 0
        q = np.empty(rc.shape[:2] + (len(thr),))
        for t in range(rc.shape[1]):
            idx = np.stack([np.searchsorted(r, thr, side="left") for r in rc[:, t]])
            q[:, t] = np.take_along_axis(env[:, t], idx, axis=-1)
        last = rc[..., -1] if rc.shape[-1] else np.zeros(rc.shape[:2])
        ap_parts.append(np.where(valid, q.mean(axis=(1, 2)), np.nan))
        ar_parts.append(np.where(valid, last.mean(axis=1), np.nan))
    if not ap_parts:
        return np.full(len(w), np.nan), np.full(len(w), np.nan)
    with warnings.catch_warnings():  # a resample without ground truth of any category: NaN, said above
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(ap_parts), axis=0), np.nanmean(np.stack(ar_parts), axis=0)


def bootstrap_group_ap_ar(matches: dict, groups, names: dict, *, n_boot: int = 200, seed: int = 0) -> dict:
    """``{"ap_<name>": (n_boot,), "ar_<name>": (n_boot,)}``: each group's AP and AR over ``n_boot``
    resamples of its own images (drawn with replacement, as many as it has; seeded, so two sets
    of detections of the same images get the same resamples: paired)."""
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    out = {}
    for code, name in names.items():
        members = np.flatnonzero(groups == code)
        w = np.zeros((n_boot, len(groups)))
        if len(members):
            w[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n_boot)
        out[f"ap_{name}"], out[f"ar_{name}"] = weighted_ap_ar(matches, w)
    return out
