"""The no-disparity floor of each fairness gap and its permutation p-value (:func:`fairness_floor`).

Why: F_FPR, F_EO, F_MEO, F_DP and F_OAE are sums or ranges of *absolute* differences between
subgroup rates, so sampling noise alone makes them positive, and how positive depends on the
operating point (a subgroup's FPR noise is sqrt(FPR (1 - FPR) / n_g)).  Two detectors with no
disparity at all, the second the first minus one logit, score F_FPR 30.5 and 12.8 on 1,000 rows
(the statistics review; ARCHITECTURE.md, "Fairness gaps against their floor").  The gap alone cannot say "fair"; the gap
against what the same decisions give when subgroup does not matter can.

Method (a permutation test, exact under its null):

- The units permuted are the (cluster, subgroup) pairs of the rows with a known subgroup
  (clusters from the ``cluster`` column, ``identity`` by default, as the bootstrap's; rows when
  the table has no such column): the frames of one person move together, and keep their labels
  and decisions.  Rows with an unknown subgroup (code < 0) take no part, as in the metrics.
- F_FPR, F_EO and F_MEO (rate-based: the null is "the decision is independent of the subgroup
  given the label", equalized odds) permute the units' subgroup codes *within their label set*
  (real only, fake only, both), so each subgroup keeps its real and fake units.  F_DP and F_OAE
  (the null: decision, resp. correctness, independent of the subgroup) permute them across all
  units.
- ``n_perm`` permutations (1,000), seeded with ``numpy.random.default_rng(seed)`` (the run's
  interval seed); every permutation's (subgroup, label, decision) cell counts come from one
  ``bincount`` and go through the one formula, :func:`.fairness.fairness_from_counts`.
- ``floor`` = the mean of the permuted values: what the gap is expected to be when the subgroups
  do not differ, with this detector's decisions and these subgroups' sizes.  ``F - floor`` is
  the gap beyond the noise; compare presets on it, not on raw F.
- ``p`` = (1 + #{permuted >= F}) / (n_perm + 1): the chance of a gap at least this large when
  the subgroups do not differ.  Small p: the disparity is beyond what the group sizes make by
  chance.  A large p is not evidence of fairness: at 160 test rows a true F_FPR of 40 points is
  detected about 1 time in 10.

Checked by simulation (``tests/test_statistics.py``, ``benchmarks/bench_stats.py``): rejection
at 0.05 stays at or below 0.05 on zero-disparity data, and two zero-disparity detectors one
logit apart get ``F - floor`` within 2 points of each other while their raw F_FPR differ by 18.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import FeatcacheError
from .fairness import FAIRNESS_KEYS, fairness_coverage, fairness_from_counts
from .table import clusters, columns, label_sets, subgroups

#: The gaps whose null permutes within label sets (the rest permute across all units).
WITHIN_LABEL = ("f_fpr", "f_eo", "f_meo")
#: Permutations processed together (memory: a few (chunk x cells) arrays).
CHUNK = 250


def fairness_floor(predictions: pd.DataFrame, *, threshold: float = 0.5, n_perm: int = 1000, seed: int = 0,
                   cluster: str | None = "identity") -> dict[str, dict[str, float]]:
    """``{f_key: {"floor": float, "p": float}}`` for every fairness metric (see the module
    docstring); ``{}`` when the table has no fairness metric (no subgroup column, no row with a
    known subgroup, or one subgroup only)."""
    observed, permuted = permutation_values(predictions, threshold=threshold, n_perm=n_perm, seed=seed,
                                            cluster=cluster)
    return {k: summarise(observed[k], permuted[k]) for k in observed}


def summarise(observed: float, permuted: np.ndarray) -> dict[str, float]:
    """``floor`` (mean of the defined permuted values) and ``p`` ((1 + #{>= observed}) / (P + 1))."""
    v = permuted[~np.isnan(permuted)]
    if np.isnan(observed) or not len(v):
        return {"floor": float("nan"), "p": float("nan")}
    at_least = int((v >= observed - 1e-9 * max(1.0, abs(observed))).sum())  # ties count, rounding aside
    return {"floor": float(v.mean()), "p": (1 + at_least) / (len(v) + 1)}


def permutation_values(predictions: pd.DataFrame, *, threshold: float = 0.5, n_perm: int = 1000, seed: int = 0,
                       cluster: str | None = "identity") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The observed gaps and their ``(n_perm,)`` permuted values (``{}``, ``{}`` without fairness)."""
    if int(n_perm) != n_perm or n_perm < 1:
        raise FeatcacheError(f"n_perm must be a positive integer; got {n_perm!r}")
    y, p = columns(predictions)
    g = subgroups(predictions)
    if fairness_coverage(y, g)["unavailable"] is not None:
        return {}, {}
    codes, _ = clusters(predictions, cluster, [])
    return _permute(y, p, g, codes, threshold, int(n_perm), seed)


def _permute(y, p, g, codes, threshold, n_perm, seed):
    known = g >= 0
    y, d, g, codes = y[known], (p[known] >= threshold).astype(np.int64), g[known], codes[known]
    group_codes = np.unique(g)
    gi = np.searchsorted(group_codes, g)
    n_groups = len(group_codes)
    # units: (cluster, subgroup) pairs; each unit's rows keep their labels and decisions
    unit, _ = pd.factorize(codes * n_groups + gi)
    n_units = int(unit.max()) + 1
    unit_group = np.zeros(n_units, dtype=np.int64)
    unit_group[unit] = gi
    # the (unit, cell) pairs that hold rows, with their counts
    pair_counts = np.bincount(unit * 4 + y * 2 + d, minlength=4 * n_units)
    pairs = np.flatnonzero(pair_counts)
    pair_unit, pair_cell, pair_w = pairs // 4, pairs % 4, pair_counts[pairs].astype(np.float64)
    weighted = not (pair_w == 1).all()
    one_pair = len(pairs) == n_units  # every unit's rows in one cell (always so for rows)
    observed_counts = np.bincount(unit_group[pair_unit] * 4 + pair_cell, weights=pair_w, minlength=4 * n_groups)
    observed = {k: float(v[0]) for k, v in fairness_from_counts(observed_counts[None]).items()}

    rng = np.random.default_rng(seed)
    strata = {"label": label_sets(unit, y, n_units), "all": np.zeros(n_units, dtype=np.int64)}
    permuted: dict[str, list] = {}
    for scheme in ("label", "all"):
        keys = [k for k in FAIRNESS_KEYS if (k in WITHIN_LABEL) == (scheme == "label")]
        members = [np.flatnonzero(strata[scheme] == s) for s in np.unique(strata[scheme])]
        for start in range(0, n_perm, CHUNK):
            rows = min(CHUNK, n_perm - start)
            perm = np.empty((rows, n_units), dtype=np.int64)
            for idx in members:
                perm[:, idx] = rng.permuted(np.broadcast_to(unit_group[idx], (rows, len(idx))), axis=1)
            if not one_pair:  # a unit's rows may fill several cells
                perm = perm[:, pair_unit]
            perm *= 4
            perm += pair_cell + (np.arange(rows) * (4 * n_groups))[:, None]
            cell = perm.ravel()
            counts = np.bincount(cell, weights=np.broadcast_to(pair_w, (rows, len(pair_w))).ravel() if weighted
                                 else None, minlength=rows * n_groups * 4).reshape(rows, -1)
            values = fairness_from_counts(counts)
            for k in keys:
                permuted.setdefault(k, []).append(values[k])
    return observed, {k: np.concatenate(permuted[k]) for k in FAIRNESS_KEYS}
