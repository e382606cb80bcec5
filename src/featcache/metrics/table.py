"""Reading a predictions table for the resampling statistics (:mod:`.bootstrap`, :mod:`.permutation`).

The table has one row per test sample with ``label`` (0 real, 1 fake) and ``prob`` (P(fake)),
and optionally ``subgroup`` (integer codes, negative = unknown) and a cluster column
(``identity`` by default; ``video`` or any other column name may be given).  A bad table is a
user's file: :class:`~featcache.errors.FeatcacheError` with what to fix.

- :func:`columns`: the labels and probabilities, checked.
- :func:`subgroups`: the subgroup codes, or None without the column.
- :func:`clusters`: a cluster index per row.  A row whose cluster value is missing (NaN or empty)
  is a cluster of its own; without the column, or with ``cluster=None``, every row is one (both
  said in ``notes``).
- :func:`label_sets`: each cluster's label set (0 only real rows, 1 only fake rows, 2 both).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import FeatcacheError


def columns(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(y, p)``: int64 labels and float64 probabilities of a non-empty predictions table."""
    missing = [c for c in ("label", "prob") if c not in predictions]
    if missing:
        raise FeatcacheError(f"the predictions table lacks column(s) {', '.join(missing)}; "
                             "bootstrap intervals need label (0/1) and prob (P(fake)) per row")
    if len(predictions) == 0:
        raise FeatcacheError("the predictions table is empty: nothing to bootstrap")
    y = predictions["label"].to_numpy()
    p = predictions["prob"].to_numpy(dtype=np.float64)
    if not np.isin(y, (0, 1)).all():
        raise FeatcacheError("the predictions' label column must hold 0 (real) or 1 (fake)")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise FeatcacheError("the predictions' prob column must hold probabilities in [0, 1]")
    return y.astype(np.int64), p


def subgroups(predictions: pd.DataFrame) -> np.ndarray | None:
    """The ``subgroup`` column as int64 codes (negative: unknown), or None without it."""
    if "subgroup" not in predictions:
        return None
    g = predictions["subgroup"].to_numpy()
    try:
        gf = g.astype(np.float64)
    except (TypeError, ValueError):
        gf = np.array([np.nan])
    if not np.isfinite(gf).all() or (gf != np.round(gf)).any():
        raise FeatcacheError("the predictions' subgroup column must hold integer codes (negative: unknown)")
    return gf.astype(np.int64)


def clusters(predictions: pd.DataFrame, cluster: str | None, notes: list) -> tuple[np.ndarray, str | None]:
    """Cluster index per row (0 .. m-1, in order of first appearance) and the column used (None: rows)."""
    n = len(predictions)
    if cluster is None or cluster not in predictions:
        if cluster is not None:
            notes.append(f"no {cluster!r} column: rows resampled independently")
        return np.arange(n), None
    raw = predictions[cluster]
    missing = (raw.isna() | (raw.astype(str).str.strip() == "")).to_numpy()
    keys = raw.astype(str).to_numpy(dtype=object)
    keys[missing] = [f"\0row{i}" for i in np.flatnonzero(missing)]  # a row of its own
    if missing.any():
        notes.append(f"{int(missing.sum())} row(s) without {cluster!r} resampled as their own clusters")
    codes, _ = pd.factorize(keys)
    return codes.astype(np.int64), cluster


def label_sets(codes: np.ndarray, y: np.ndarray, m: int | None = None) -> np.ndarray:
    """Per cluster: 0 when all its rows are real, 1 when all are fake, 2 when it holds both."""
    m = int(codes.max()) + 1 if m is None else m
    fakes = np.bincount(codes, weights=y, minlength=m)
    rows = np.bincount(codes, minlength=m)
    return np.where(fakes == 0, 0, np.where(fakes == rows, 1, 2))
