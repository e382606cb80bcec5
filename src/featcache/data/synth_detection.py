"""`featcache synth detection OUT`: drawn people with a gender attribute, COCO JSON, FAAP layout.

Each image shows one person (COCO category 1) and up to two other objects (``car`` 3,
``sports ball`` 37) on a textured background.  Every image carries a gender (half ``women``,
half ``men``); ``gap`` controls how much harder the women's figures are to detect: their
colours are blended towards the background (contrast ``1 - 0.75 * gap``) and they are drawn
smaller (height ``1 - 0.3 * gap`` of the men's), so a detector finds them less confidently,
as DETR does with women on COCO (male AP 0.511, female AP 0.404).

Layout, as the FAAP reference code reads it::

    OUT/women_split/{train,val,test}/000012.png     OUT/women_split/gender_women_{split}.json
    OUT/men_split/{train,val,test}/000013.png       OUT/men_split/gender_men_{split}.json
    OUT/manifest.csv                                 (the faap-coco adapter's canonical manifest)

Image ids are unique across all six JSON files.  The same seed gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import FeatcacheError
from ..progress import bar as tqdm
from .adapters import build_manifest

GROUPS = ("women", "men")
#: COCO category ids (those of facebook/detr-resnet-50's label space).
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 37, "name": "sports ball", "supercategory": "sports"}]
SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def _split_of(k: int, m: int) -> str:
    """Split of the k-th of m images of one group: the first 60 % train, then 20 % val, 20 % test."""
    edge = 0.0
    for name, frac in SPLIT_FRACTIONS:
        edge += frac
        if k < round(edge * m):
            return name
    return "test"


def synth_detection(out, *, n: int = 600, seed: int = 0, gap: float = 0.5, size: int = 64, others: int = 2,
                    progress: bool = True) -> dict:
    """Write ``n`` images (half per gender) with COCO annotations and the manifest; return a summary."""
    if int(n) < 10:
        raise FeatcacheError(f"--n must be at least 10 (a few images per gender and split), got {n}")
    if not 0.0 <= float(gap) <= 1.0:
        raise FeatcacheError(f"--gap must be in [0, 1], got {gap}")
    if int(size) < 32:
        raise FeatcacheError(f"--size must be at least 32 pixels, got {size}")
    if not 0 <= int(others) <= 4:
        raise FeatcacheError(f"--others must be in 0..4 (other objects per image at most), got {others}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_group = {"women": n // 2, "men": n - n // 2}
    coco = {(g, s): {"images": [], "annotations": [], "categories": CATEGORIES}
            for g in GROUPS for s, _ in SPLIT_FRACTIONS}
    image_id, ann_id = 0, 0
    bar = tqdm(total=int(n), desc="synth detection", unit="img", disable=not progress)
    for g in GROUPS:
        for k in range(per_group[g]):
            image_id += 1
            split = _split_of(k, per_group[g])
            rng = np.random.default_rng([int(seed), image_id])
            img, objects = draw_image(rng, size, women=g == "women", gap=float(gap), others=int(others))
            name = f"{image_id:06d}.png"
            folder = out / f"{g}_split" / split
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / name, format="PNG", optimize=False)
            entry = coco[(g, split)]
            entry["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
            for cat, box in objects:
                ann_id += 1
                entry["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat,
                                             "bbox": [round(float(v), 2) for v in box],
                                             "area": round(float(box[2] * box[3]), 2), "iscrowd": 0})
            bar.update(1)
    bar.close()
    for (g, s), data in coco.items():
        (out / f"{g}_split" / f"gender_{g}_{s}.json").write_text(json.dumps(data, indent=1))
    m = build_manifest("faap-coco", out, out / "manifest.csv")
    counts = m.df.groupby(["split", "gender"]).size()
    return {"out": str(out), "images": int(n), "annotations": ann_id, "gap": float(gap), "seed": int(seed),
            "others": int(others),
            "manifest": str(out / "manifest.csv"),
            "counts": {f"{s}/{g}": int(v) for (s, g), v in counts.items()}}


def draw_image(rng: np.random.Generator, size: int, *, women: bool, gap: float, others: int = 2):
    """One image: a textured background, a person, up to ``others`` other objects; (PIL image, [(cat, xywh)])."""
    base = rng.uniform(60, 190, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tilt = rng.uniform(-30, 30, 3)
    bg = base + tilt * (xx[..., None] - 0.5) + rng.normal(0, 8, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects = []
    # other objects first, so the person is drawn on top
    for _ in range(int(rng.integers(0, others + 1))):
        cat = int(rng.choice([3, 37]))
        w = float(rng.uniform(0.15, 0.3) * size)
        h = w * (0.6 if cat == 3 else 1.0)
        x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if cat == 3:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
        else:
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colour)
        objects.append((cat, [x, y, w, h]))
    # the person: head, torso, legs, in a colour far from the background, blended back by the gap
    scale = 1.0 - 0.3 * gap if women else 1.0
    h = float(rng.uniform(0.5, 0.8) * size * scale)
    w = h * 0.42
    x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
    contrast = 1.0 - 0.75 * gap if women else 1.0
    far = np.where(base > 127, rng.uniform(0, 50, 3), rng.uniform(205, 255, 3))
    colour = tuple(int(c) for c in np.clip(base + contrast * (far - base), 0, 255))
    head = w * 0.5
    draw.ellipse([x + (w - head) / 2, y, x + (w + head) / 2 - 1, y + head - 1], fill=colour)
    draw.rectangle([x, y + head, x + w - 1, y + h * 0.65 - 1], fill=colour)
    leg = w * 0.35
    draw.rectangle([x, y + h * 0.65, x + leg - 1, y + h - 1], fill=colour)
    draw.rectangle([x + w - leg, y + h * 0.65, x + w - 1, y + h - 1], fill=colour)
    objects.append((1, [x, y, w, h]))
    return img, objects
