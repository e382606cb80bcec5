"""A 2-D map of a cache's features, coloured by subgroup, label, dataset or split.

The features are L2-normalised first (the cosine geometry every neighbour search uses), then
projected by PCA (scikit-learn) or, with umap-learn installed, by UMAP (cosine metric).  Above
``max_points`` rows a seeded random subsample is drawn.

>>> embedding_map("caches/ffpp_clip", "reports/map_subgroup.png", color_by="subgroup", split="train")
{'method': 'pca', 'points': 20000, 'explained_variance': [0.11, 0.07], ...}
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..cache import open_cache
from ..data.manifest import SUBGROUP_NAMES
from ..errors import FeatcacheError, check_out, writing
from ..report.plots import image_format, plot_embedding_map
from .index import as_unit_float32

COLOR_BY = ("subgroup", "label", "dataset", "split")
METHODS = ("auto", "pca", "umap")


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def group_names(values, color_by: str) -> np.ndarray:
    """Legend names of each row's group: subgroup names, real / fake, or the stored string."""
    values = np.asarray(values)
    if color_by == "subgroup":
        return np.array([SUBGROUP_NAMES[v] if 0 <= v < len(SUBGROUP_NAMES) else "unknown" for v in values.tolist()],
                        dtype=object)
    if color_by == "label":
        return np.array([{0: "real", 1: "fake"}.get(v, "unknown") for v in values.tolist()], dtype=object)
    return np.array([str(v) if str(v) not in ("", "nan", "None") else "(none)" for v in values.tolist()],
                    dtype=object)


def embedding_map(cache_path, out_png, *, color_by: str = "subgroup", split: str | None = None,
                  method: str = "auto", max_points: int = 20000, seed: int = 0, overwrite: bool = False) -> dict:
    """Write a 2-D map of the cache's features to ``out_png``; return what was drawn.

    ``split``: one split or None for all rows.  ``method``: ``pca``, ``umap`` (needs umap-learn)
    or ``auto`` (UMAP when umap-learn is importable, else PCA).  Returns ``{"method", "points",
    "rows", "color_by", "groups", "explained_variance", "path"}``; ``explained_variance`` holds
    the two components' explained-variance ratios for PCA and is None for UMAP. An existing
    ``out_png`` is replaced only with ``overwrite``.
    """
    if color_by not in COLOR_BY:
        raise FeatcacheError(f"cannot colour the map by {color_by!r}; choose one of {', '.join(COLOR_BY)}")
    if method not in METHODS:
        raise FeatcacheError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "umap" and not umap_available():
        raise FeatcacheError("method umap needs umap-learn: pip install umap-learn (or use method pca)")
    if int(max_points) < 3:
        raise FeatcacheError(f"max_points must be at least 3, got {max_points}")
    use = "umap" if method == "umap" or (method == "auto" and umap_available()) else "pca"
    image_format(check_out(out_png, kind="file", overwrite=overwrite))  # a wrong --out is one line, before any work

    cache = open_cache(Path(cache_path).resolve())
    if cache.kind != "pooled":
        raise FeatcacheError(f"a map reads a pooled cache (one vector per sample); {cache.path} is a {cache.kind} "
                             "cache: extract the dataset with an image backbone (e.g. --backbone clip)")
    if split is not None:
        counts = cache.meta(["split"])["split"].value_counts()
        if counts.get(split, 0) == 0:
            have = ", ".join(f"{s} ({n})" for s, n in counts.items()) or "none"
            raise FeatcacheError(f"{cache.path} has no rows in split {split!r}; choose one of its splits: {have}, "
                                 "or leave the split out for all rows")
    data = cache.load(split, columns=[color_by] if color_by != "split" else ["split"])
    rows = len(data)
    if rows < 3:
        raise FeatcacheError(f"{cache.path} has {rows} readable row(s) {'in ' + repr(split) if split else ''}; "
                             "a map needs at least 3")
    keep = np.arange(rows)
    if rows > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=int(max_points), replace=False))
    x = as_unit_float32(data.features[keep])
    groups = group_names(data.meta[color_by].to_numpy()[keep], color_by)

    explained = None
    if use == "umap":
        import umap

        xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(2, x.shape[1]), random_state=seed)
        xy = pca.fit_transform(x)
        if xy.shape[1] == 1:  # one-dimensional features: draw them on a line
            xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
        explained = [float(v) for v in pca.explained_variance_ratio_]

    out_png = Path(out_png)
    with writing(out_png):
        out_png.parent.mkdir(parents=True, exist_ok=True)
    where = f"split {split}" if split else "all splits"
    label = "PCA" if use == "pca" else "UMAP"
    if explained:
        label += " (" + ", ".join(f"{100 * v:.1f}%" for v in explained) + " of the variance)"
    order = {"subgroup": [*SUBGROUP_NAMES, "unknown"], "label": ["real", "fake", "unknown"]}.get(color_by)
    plot_embedding_map(np.asarray(xy), groups, out_png, legend_title=color_by, order=order,
                       title=f"{Path(cache_path).name}: {label}, {where}, {len(keep)} of {rows} points")
    names, counts = np.unique(groups, return_counts=True)
    return {"method": use, "points": int(len(keep)), "rows": int(rows), "color_by": color_by,
            "groups": {str(n): int(c) for n, c in zip(names, counts)}, "explained_variance": explained,
            "path": str(out_png)}
