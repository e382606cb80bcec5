"""The one split-mask helper: which rows of a meta table belong to a split (or splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import CacheError


def split_mask(values, split, *, where: str = "the cache") -> np.ndarray:
    """Rows whose split is ``split`` (a name or a list of names; ``None``: all rows).

    ``values`` is the split column (a Series or array). A split with no row is an error that
    names the splits there are.
    """
    values = pd.Series(np.asarray(values, dtype=object)).astype(str)
    if split is None:
        return np.ones(len(values), dtype=bool)
    splits = [split] if isinstance(split, str) else list(split)
    mask = np.array(values.isin(splits).to_numpy(), dtype=bool)  # hashing (np.isin sorts strings); writable
    if not mask.any():
        have = ", ".join(sorted(set(values.tolist()))) or "none"
        raise CacheError(f"{where} has no rows in split {' or '.join(map(repr, splits))}; its splits: {have}")
    return mask
