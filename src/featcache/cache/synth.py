"""A synthetic *feature* cache: a controlled test bed for the heads, independent of any backbone.

Each sample's feature is ``center[subgroup] * subgroup_scale + label * strength[subgroup] * fake_dir
+ noise`` (unit-variance noise, unit-norm ``fake_dir``): subgroups differ in where they sit, and
fakes are shifted by ``strength = signal * (1 - bias * hardness)`` noise standard deviations
(d'), which shrinks for the hard subgroups as ``bias`` grows, with the same hardness table as the
synthetic faces (:data:`featcache.data.synth_faces.HARDNESS`).  A plain detector is then less
accurate, and its error rates differ, on the hard subgroups: the question the fairness presets
must answer, asked without the noise of a randomly initialised backbone.

Subgroups follow the FF++ imbalance; identities (4 samples each) decide the splits (70/15/15).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.manifest import FFPP_SUBGROUP_COUNTS, GENDERS, RACES
from ..data.synth_faces import HARDNESS
from ..errors import FeatcacheError
from .store import CacheSpec, CacheWriter


def synth_feature_cache(path, *, rows: int = 10_000, dim: int = 768, bias: float = 0.6, signal: float = 2.0,
                        subgroup_scale: float = 0.6, seed: int = 0, part_rows: int = 4096,
                        methods: tuple[str, ...] = ("shift",), demographics: bool = True) -> dict:
    """Write a pooled cache of ``rows`` x ``dim`` fp16 features with full manifest meta; return counts.

    ``methods``: the manipulation methods of the fakes (the ``method`` column).  With more than one,
    each fake is drawn a method (uniformly, from a generator of its own, so that one method gives
    the same cache as before) and is shifted along its method's own unit direction, half shared
    with the others (cosine 0.5 between methods): a held-out method is harder to detect than the
    trained ones, as in a leave-one-manipulation-out protocol.  ``demographics=False``: gender and
    race unknown (empty; subgroup -1), as in Celeb-DF or DFDC.

    ``featcache synth features OUT --rows N --dim D --bias B --seed S`` calls it (the command
    refuses a non-empty OUT without ``--overwrite``; this function replaces a cache at ``path``).
    """
    if not 0 <= bias <= 1:
        raise FeatcacheError(f"--bias must be in [0, 1] (0: every subgroup equally easy); got {bias}")
    for name, value, low in (("rows", rows, 40), ("dim", dim, 1), ("part_rows", part_rows, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise FeatcacheError(f"--{name.replace('_', '-')} must be an integer of at least {low}; got {value!r}")
    rng = np.random.default_rng(seed)
    weights = np.array(FFPP_SUBGROUP_COUNTS, dtype=float)
    subgroup = rng.choice(8, size=rows, p=weights / weights.sum())
    label = rng.integers(0, 2, size=rows)
    centers = rng.normal(size=(8, dim))
    fake_dir = rng.normal(size=dim)
    fake_dir /= np.linalg.norm(fake_dir)  # unit norm: the shift is `signal` noise standard deviations
    strength = signal * (1.0 - bias * np.array(HARDNESS))
    noise = rng.normal(size=(rows, dim))
    methods = tuple(methods)
    if not methods or any(not str(m) for m in methods):
        raise FeatcacheError(f"methods must be non-empty names; got {methods!r}")
    method = np.zeros(rows, dtype=np.int64)
    directions = fake_dir[None, :]
    if len(methods) > 1:
        mrng = np.random.default_rng([seed, len(methods)])
        method = mrng.integers(0, len(methods), size=rows)
        own = mrng.normal(size=(len(methods), dim))
        own -= np.outer(own @ fake_dir, fake_dir)  # orthogonal to the shared direction
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        directions = np.sqrt(0.5) * fake_dir[None, :] + np.sqrt(0.5) * own  # unit norm; cosine 0.5 between two
    feats = (subgroup_scale * centers[subgroup] + (label * strength[subgroup])[:, None] * directions[method]
             + noise).astype(np.float16)
    identity = np.arange(rows) // 4
    order = rng.permutation(identity.max() + 1)
    cut = np.searchsorted([0.7, 0.85], (order[identity] + 0.5) / (identity.max() + 1), side="right")
    split = np.array(["train", "val", "test"])[cut]
    meta = pd.DataFrame({
        "sample_id": [f"f{i:06d}" for i in range(rows)], "path": "", "label": label.astype(np.int8),
        "split": split, "dataset": "synthfeatures",
        "gender": np.array(GENDERS)[subgroup // 4], "race": np.array(RACES)[subgroup % 4],
        "subgroup": subgroup.astype(np.int8), "identity": [f"p{i}" for i in identity],
        "method": np.where(label == 1, np.array(methods, dtype=object)[method], ""),
    })
    if not demographics:
        meta["gender"], meta["race"], meta["subgroup"] = "", "", np.int8(-1)
    spec = CacheSpec(kind="pooled",
                     backbone={"name": "synthetic", "model": f"gaussian-{dim}", "pretrained": "none",
                               "weights_sha256": f"seed{seed}", "layer": "final", "pooling": "none"},
                     preprocess={"bias": bias, "signal": signal, "subgroup_scale": subgroup_scale},
                     manifest_sha256=f"synthetic-{rows}-{dim}-{bias}-{signal}-{seed}"
                     + ("" if methods == ("shift",) else f"-{'+'.join(methods)}") + ("" if demographics else "-nodemo"),
                     rows=rows, part_rows=part_rows)
    with CacheWriter(path, spec, meta, overwrite=True) as w:
        for i in w.missing_parts():
            s, e = w.part_bounds(i)
            w.write_part(i, {"features": feats[s:e]}, np.ones(e - s, bool))
        w.finalize()
    return {"rows": rows, "dim": dim, "strength": strength.tolist(),
            "splits": meta["split"].value_counts().to_dict()}
