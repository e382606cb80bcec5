"""Nearest samples of a cache: to one of its samples (by ``sample_id``) or to a new image file.

>>> nearest_samples("runs/ffpp_clip", query="000_003/0012", k=5)
>>> nearest_samples("runs/ffpp_clip", image="suspect.png", split="train")

An image is embedded by the backbone that made the cache, rebuilt from the cache's recorded
backbone (name, model, weights, layer) and checked against it: the rebuilt weights must have
the recorded sha256 and the preprocessing must equal the recorded one, else the query is
refused (a different backbone puts the image in another feature space, and its neighbours
would mean nothing).  Every search goes through :func:`featcache.analyze.index.build_index`.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache.reader import FeatureCache, open_cache
from ..cache.splits import split_mask
from ..cache.store import describe_differences
from ..errors import CacheError, FeatcacheError
from ..extract.registry import get_backbone
from ..runtime import resolve_device
from .index import build_index

#: Meta columns returned with each neighbour (empty where the cache has no such column).
META_COLUMNS = ("label", "split", "subgroup", "identity", "dataset", "method", "path")
RESULT_COLUMNS = ("rank", "sample_id", "similarity", *META_COLUMNS)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise FeatcacheError(f"k must be an integer of at least 1, got {k!r}")
    return int(k)


def open_pooled(cache_path, what: str = "neighbour analyses") -> FeatureCache:
    """The one pooled-cache check of the analyses: ``what`` names the analysis in the error."""
    cache = open_cache(Path(cache_path).resolve())
    if cache.kind != "pooled":
        raise FeatcacheError(f"{what} need(s) a pooled cache (one vector per sample); {cache.path} is a "
                             f"{cache.kind} cache: extract one with an image backbone (e.g. --backbone clip)")
    return cache


def meta_column(meta: pd.DataFrame, name: str) -> np.ndarray:
    """A meta column as an array of strings/ints; empty strings where the cache lacks it."""
    if name in meta:
        return meta[name].to_numpy()
    return np.full(len(meta), "", dtype=object)


def _split_mask(meta: pd.DataFrame, split) -> np.ndarray:
    try:
        return split_mask(meta_column(meta, "split"), split, where="the cache's readable rows")
    except CacheError as exc:
        raise FeatcacheError(str(exc)) from None


def _find_query_row(cache: FeatureCache, meta: pd.DataFrame, query: str) -> int:
    ids = meta["sample_id"].astype(str)
    hits = np.flatnonzero((ids == str(query)).to_numpy())
    if len(hits):
        return int(hits[0])
    all_ids = cache.meta(["sample_id"])["sample_id"].astype(str)
    if (all_ids == str(query)).any():
        raise FeatcacheError(f"sample {query!r} could not be read at extraction and has no features "
                             f"(see {cache.path / 'errors.jsonl'}); query another sample")
    close = difflib.get_close_matches(str(query), all_ids.tolist(), n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise FeatcacheError(f"sample_id {query!r} is not in {cache.path}{hint}; pass a sample_id of the cache's manifest")


def rebuild_backbone(cache: FeatureCache):
    """The backbone that made ``cache``, rebuilt and checked (weights sha256, preprocessing, kind)."""
    rec = dict(cache.backbone)
    desc = f"{rec.get('name')}:{rec.get('model')} (pretrained {rec.get('pretrained')})"
    try:
        bb = get_backbone(rec.get("name"), rec.get("model"), rec.get("pretrained"), layer=rec.get("layer"))
    except FeatcacheError as exc:
        raise FeatcacheError(f"an image query needs the backbone that made the cache, and {desc} cannot be rebuilt "
                             f"here ({exc}); query by sample id instead") from exc
    want = rec.get("weights_sha256")
    got = bb.fingerprint()["weights_sha256"]
    if got != want:
        why = ("its random ('none') weights depend on the seed of the extraction and are rebuilt here with seed 0"
               if rec.get("pretrained") == "none" else "the weights file or tag now holds other weights")
        raise FeatcacheError(
            f"the backbone {desc} rebuilt here has weights sha256 {got[:12]}, the cache records {str(want)[:12]} "
            f"({why}); image queries need a cache extracted with pretrained weights (or seed 0), or query by sample id")
    spec = json.loads(json.dumps(bb.preprocess_spec()))
    if spec != cache.preprocess:
        diffs = describe_differences({"preprocess": cache.preprocess}, {"preprocess": spec})
        raise FeatcacheError(f"the preprocessing of the rebuilt backbone {desc} differs from the cache's "
                             f"({'; '.join(diffs)}); re-extract the cache with this featcache, or query by sample id")
    if bb.kind != "pooled":
        raise FeatcacheError(f"the backbone {desc} gives {bb.kind} outputs; image queries need a pooled backbone")
    return bb


def embed_image(cache: FeatureCache, image, *, device: str | None = "cpu") -> np.ndarray:
    """The (1, D) feature of one image file, computed as the cache's backbone computed its rows."""
    path = Path(image)
    if not path.is_file():
        raise FeatcacheError(f"image file {image} does not exist; pass the path of an image file")
    bb = rebuild_backbone(cache)
    dev = resolve_device(device)
    item = bb.dataset([os.fspath(path.resolve())])[0]
    _, inputs, errors = bb.collate([item])
    if errors[0]:
        raise FeatcacheError(f"cannot read image {image} ({errors[0]}); pass a readable image file")
    feats = np.asarray(bb.to(dev).forward(inputs, dev)["features"], dtype=np.float32)
    if feats.shape[-1] != cache.dim:
        raise FeatcacheError(f"the rebuilt backbone gives {feats.shape[-1]}-d features, the cache holds "
                             f"{cache.dim}-d ones; re-extract the cache")
    return feats.reshape(1, -1)


def nearest_samples(cache_path, *, query: str | None = None, image: str | None = None, k: int = 10,
                    split=None, device: str | None = "cpu") -> pd.DataFrame:
    """The ``k`` samples of the cache nearest (cosine) to a sample of it or to an image file.

    Exactly one of ``query`` (a ``sample_id`` of the cache; the sample itself is left out) or
    ``image`` (a file, embedded with the cache's own backbone and preprocessing, which must
    be rebuildable with the recorded weights).  ``split`` (a name or a list) restricts the
    candidates; the query sample may be in any split.  ``device`` runs the backbone for
    ``image``.  Returns ``rank`` (1 = nearest), ``sample_id``, ``similarity`` and
    :data:`META_COLUMNS`, nearest first; samples that failed at extraction are never returned.
    """
    if (query is None) == (image is None):
        raise FeatcacheError("pass exactly one of query (a sample_id of the cache) or image (an image file)")
    k = check_k(k)
    cache = open_pooled(cache_path)
    qvec = embed_image(cache, image, device=device) if image is not None else None
    data = cache.load()
    meta = data.meta
    qrow = None
    if query is not None:
        qrow = _find_query_row(cache, meta, query)
        qvec = data.features[qrow:qrow + 1]
    cand = np.flatnonzero(_split_mask(meta, split))
    if len(cand) == int(qrow is not None and qrow in cand):
        raise FeatcacheError(f"the cache has no other readable sample{' in split ' + str(split) if split else ''} "
                             "to compare with; pass another split")
    index = build_index(data.features if len(cand) == len(meta) else data.features[cand])  # no copy of all rows
    sims, ids = index.search(qvec, k + 1 if qrow is not None else k)
    rows = cand[ids[0][ids[0] >= 0]]
    sims = sims[0][ids[0] >= 0]
    keep = rows != qrow if qrow is not None else np.ones(len(rows), dtype=bool)  # the query itself is left out
    rows, sims = rows[keep][:k], sims[keep][:k]
    out = pd.DataFrame({"rank": np.arange(1, len(rows) + 1), "sample_id": meta["sample_id"].to_numpy()[rows],
                        "similarity": sims.astype(np.float64)})
    for col in META_COLUMNS:
        out[col] = meta_column(meta, col)[rows]
    return out
