"""Uncertainty of the metrics: a vectorised, stratified, clustered bootstrap (the paired differences
over seeds of an ablation are :mod:`.compare`'s).

What an evaluation's metrics.json holds (:func:`with_intervals`)
---------------------------------------------------------------
``with_intervals(metrics, predictions, *, n_boot=1000, seed=0, cluster="identity", threshold=0.5,
n_perm=1000)`` returns ``metrics`` plus:

- ``ci95``: ``{"auc", "eer", "acc": [lo, hi]}``, 95 % bootstrap intervals (below): BCa for the
  AUC, percentile for the EER and ACC.  An interval covers the detector's *true* value about 95
  times in 100; a second test set's value falls inside it only about 83 times in 100 (two noisy
  estimates differ by more than one).  No fairness metric has a ``ci95`` (next items).
- ``ci95_info``: how: ``method`` ({metric: text}), ``level``, ``n_boot``, ``seed``, ``cluster``
  (the column resampled, or ``"row"``), ``n_clusters`` (how many clusters the intervals rest
  on), ``strata``, ``threshold``, ``notes`` (fallbacks, left-out resamples) and ``warnings``
  (``n_clusters`` below 30: a bootstrap from so few clusters is too narrow); ``spread95`` and
  ``fairness_range95``: the legends of those keys.
- ``spread95``: ``{f_key: [lo, hi]}``, the 2.5 % and 97.5 % quantiles of each fairness gap over
  the same resamples: how noisy the gap is, *not* a confidence interval.  A gap is a sum or range
  of absolute differences, biased upward, and biased again under resampling: percentile, BC and
  BCa intervals of it cover the true gap 0 % of the time at a true gap of 0 (the statistics
  review; ARCHITECTURE.md, "Fairness gaps against their floor"), and can lie wholly above the point.
- ``fairness_null``: ``{f_key: {"floor": float, "p": float}}``, each gap's permutation
  no-disparity floor and p-value (:func:`.permutation.fairness_floor`, ``n_perm`` permutations
  seeded with ``seed``); ``{}`` without demographics.  Read ``f_fpr 48.4 (floor 52.1, p 0.61)``:
  the gap is what the subgroups' sizes give by chance at this operating point.
- ``fairness_range95``: ``{f_key: [lo, hi]}``, a simultaneous 95 % range of each gap's true
  value: Wilson intervals of the subgroup rates, Bonferroni over the rates, projected onto the gap
  (:func:`.fairness.gap_ranges`; with identity clusters, each rate's count is divided by its
  bootstrap design effect).  It covers (0.993-1.000 in ``bench_stats.py``), holds the point and reaches 0,
  at the price of width (at 160 rows, nearly the whole scale): that is the honest uncertainty of
  a gap.  Absent without demographics.
- ``fairness_coverage``: which rows and subgroups the gaps cover
  (:func:`.fairness.fairness_coverage`: ``rows`` of ``of_rows``, ``subgroups`` of
  ``of_subgroups``, ``with_both_labels``, ``unavailable``: None or why there is no fairness
  metric, e.g. a test set without demographics).
- ``ece_floor``: when ``metrics`` holds ``ece``, the ECE a perfectly calibrated detector with
  these probabilities scores (:func:`.calibration.ece_floor`, 200 seeded draws).

Bootstrap of one predictions table (:func:`bootstrap`, :func:`bootstrap_ci`)
----------------------------------------------------------------------------
The table has one row per test sample with ``label`` (0 real, 1 fake) and ``prob`` (P(fake)),
and optionally ``subgroup`` (integer codes, negative = unknown) and a cluster column
(``identity`` by default; ``video`` or any other column name may be given).

- **Clusters.**  Frames of one person (or one video) are not independent, so when the table
  has the cluster column, whole clusters are resampled, not rows.  A row whose cluster value is
  missing (NaN or empty) is its own cluster (counted in ``notes``).  Without the column, or with
  ``cluster=None``, rows are resampled.  The clustering is one-way: a face-swap fake also
  depends on its source identity, so the intervals are a lower bound on the noise there.
- **Strata (label set × subgroup).**  Each cluster belongs to the stratum of its label set: only
  real rows, only fake rows, or both (a person's real video and the fakes made from it share an
  identity); with a ``subgroup`` column, crossed with the cluster's subgroup (the one code its
  rows carry; clusters with several codes or only unknown ones go to one "mixed" stratum per label
  set, counted in ``notes``).  Every resample draws, with replacement, as many clusters from each
  stratum as it holds, so every resample has real and fake rows (with row clusters: exactly as
  many of each as the table) and every subgroup keeps its number of real and fake clusters: no
  subgroup drops out of a resample and changes what a gap is made of.
- **Resamples as weights.**  Resample ``b`` is a vector of counts: ``w[b, i]`` = how many times
  row ``i`` was drawn (:func:`bootstrap_weights`).  Each metric is computed for all resamples at
  once as a weighted metric, which equals the metric of the table that repeats row ``i``
  ``w[b, i]`` times (the tests check this against a plain loop over such tables with sklearn's
  ``roc_auc_score``, :func:`~featcache.metrics.detection.eer` and
  :func:`~featcache.metrics.fairness.fairness_metrics`):

  * AUC: the Mann-Whitney statistic over the rows sorted once by ``prob``, ties counting one
    half (sklearn's trapezoidal ROC area), from cumulative weights of reals below each value;
  * EER: the ROC points at each distinct ``prob`` from the same cumulative weights, with the
    interpolated crossing of :func:`~featcache.metrics.detection.eer`;
  * ACC and every fairness metric: weighted counts per (subgroup, label, decision) cell, then
    :func:`~featcache.metrics.fairness.fairness_from_counts`, the one definition of the gaps.

- **Intervals.**  EER and ACC: the percentile interval, the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the resampled values.  AUC:
  the BCa interval (Efron & Tibshirani 1993, §14.3), the quantiles
  ``Φ(z0 + (z0 + z_q) / (1 - a (z0 + z_q)))`` with ``z0 = Φ⁻¹((#{θ* < θ̂} + ½ #{θ* = θ̂}) / B)``
  (clipped to [½/B, 1 − ½/B]) and the acceleration ``a`` from the leave-one-*cluster*-out AUCs,
  per stratum as scipy's multi-sample BCa (``a = Σ_s Σ_j U³/n_s³ / (6 (Σ_s Σ_j U²/n_s²)^{3/2})``,
  ``U = (n_s − 1)(mean_s − θ₍ⱼ₎)``).  The leave-one-out AUCs have a closed form (the
  Mann-Whitney pair count less the cluster's pairs), O(n log n) for any number of clusters; the
  tests check it against the weighted engine with each cluster's rows zeroed.  With a jackknife
  variance of 0 the AUC falls back to the percentile interval (a note says so).  Why: with about
  65 clusters at AUC 0.97 the AUC's sampling distribution is skewed (−1); over 1,000 simulated test
  sets BCa covered 0.945 / 0.932 at AUC 0.9 / 0.97 against 0.930 / 0.910 for the percentile
  interval of the same resamples (``benchmarks/bench_stats.py``; the statistics review measured
  0.915 / 0.887 for the percentile); the EER gained nothing from BCa in the review (0.915 vs
  0.927) and keeps the percentile interval.
- Resamples where a metric is undefined (nan) are left out of its quantiles and counted in
  ``notes``; with no defined value the interval is ``[nan, nan]``.
- Seeded (``numpy.random.default_rng(seed)``): the same table and seed give the same interval.

Paired differences of two runs on the same rows (:func:`paired_bootstrap`)
-------------------------------------------------------------------------
The same resamples (drawn from the first table's clusters and labels) applied to both tables,
rows matched on ``sample_id``: the interval of ``metric(a) - metric(b)`` over the test rows
(percentile intervals: no acceleration for a difference). Paired differences over seeds, with the
test-set noise combined, are :func:`featcache.metrics.compare.paired_differences`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from ..errors import FeatcacheError
from .calibration import ece_floor
from .fairness import FAIRNESS_KEYS, cell_counts, fairness_coverage, fairness_from_counts, gap_ranges
from .permutation import fairness_floor
from .table import clusters, columns, label_sets, subgroups

#: The metrics :func:`bootstrap_ci` gives intervals for, in order (the fairness ones only with a
#: ``subgroup`` column).
DETECTION_KEYS = ("auc", "eer", "acc")
METRICS = DETECTION_KEYS + FAIRNESS_KEYS

#: Resamples processed together (memory: a few (chunk x rows) float64 matrices).
CHUNK = 125

#: Fewer clusters than this: ``ci95_info`` warns that the intervals are too narrow.
FEW_CLUSTERS = 30

#: What ``spread95`` is (its legend, also in ``ci95_info["spread95"]``).
SPREAD95_MEANING = ("resampled spread of the gap (2.5 % and 97.5 % quantiles over the bootstrap); not a "
                    "confidence interval: the gap is biased upward under resampling")

#: What ``fairness_range95`` is (its legend, also in ``ci95_info["fairness_range95"]``).
RANGE95_MEANING = ("simultaneous 95 % range of the true gap: every subgroup rate's Wilson interval, Bonferroni over "
                   "the rates, projected onto the gap; conservative and wide on small test sets")

#: The AUC's interval method (EER and ACC: ``"percentile"``).
BCA = "BCa (cluster jackknife)"


@dataclass
class Bootstrap:
    """Resampled metric values and how they were drawn (see the module docstring)."""

    values: dict[str, np.ndarray]  # metric -> (n_boot,) values, nan where undefined
    n_boot: int
    seed: int
    cluster: str | None  # the column whose clusters were resampled; None: rows
    n_clusters: int
    threshold: float
    notes: list[str] = field(default_factory=list)
    point: dict[str, float] = field(default_factory=dict)  # metric -> its value on the table itself
    accel: dict[str, float] = field(default_factory=dict)  # metric -> BCa acceleration (BCa intervals only)
    strata: str = "label set"
    cells: np.ndarray | None = None  # (n_boot, 4 * subgroups) resampled (subgroup, label, decision) counts

    def ci(self, level: float = 0.95) -> dict[str, list[float]]:
        """``{metric: [lo, hi]}`` at ``level``: BCa for the metrics in ``accel`` (the AUC of
        :func:`bootstrap`), the percentile interval otherwise (for a fairness gap: its spread, not
        a confidence interval; see the module docstring)."""
        _check_level(level)
        out = {}
        for name, v in self.values.items():
            v = v[~np.isnan(v)]
            if not len(v):
                out[name] = [float("nan")] * 2
                continue
            q = [(1 - level) / 2, (1 + level) / 2]
            if name in self.accel and name in self.point:
                q = bca_levels(v, self.point[name], self.accel[name], level)
            out[name] = [float(x) for x in np.quantile(v, q)]
        return out

    def methods(self) -> dict[str, str]:
        """``{metric: how its interval is made}``."""
        return {name: BCA if name in self.accel else "percentile" for name in self.values}

    def warnings(self) -> list[str]:
        """What a reader must know before trusting the intervals (few clusters)."""
        if self.n_clusters >= FEW_CLUSTERS:
            return []
        unit = f"{self.cluster!r} clusters" if self.cluster else "rows"
        return [f"the intervals rest on {self.n_clusters} {unit}, fewer than {FEW_CLUSTERS}: a bootstrap from so few "
                "understates the noise; read them as rough"]

    def info(self, level: float = 0.95) -> dict:
        """How the interval was made, for metrics.json (``ci95_info``)."""
        methods = self.methods()
        return {"method": {k: methods[k] for k in DETECTION_KEYS if k in methods}, "level": level,
                "n_boot": self.n_boot, "seed": self.seed, "cluster": self.cluster or "row",
                "n_clusters": self.n_clusters, "strata": self.strata, "threshold": self.threshold,
                "notes": list(self.notes), "warnings": self.warnings()}


def bca_levels(values: np.ndarray, point: float, accel: float, level: float = 0.95) -> list[float]:
    """The two quantile levels of the BCa interval (module docstring) of resampled ``values``
    (no nan) around ``point`` with acceleration ``accel``; the percentile levels when they are
    not finite."""
    b = len(values)
    below = (np.count_nonzero(values < point) + 0.5 * np.count_nonzero(values == point)) / b
    z0 = ndtri(np.clip(below, 0.5 / b, 1 - 0.5 / b))
    zq = ndtri(np.array([(1 - level) / 2, (1 + level) / 2]))
    with np.errstate(invalid="ignore", divide="ignore"):
        q = ndtr(z0 + (z0 + zq) / (1 - accel * (z0 + zq)))
    if not np.isfinite(q).all() or (1 - accel * (z0 + zq) <= 0).any():
        return [(1 - level) / 2, (1 + level) / 2]
    return [float(x) for x in q]


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise FeatcacheError(f"the interval level must be in (0, 1), e.g. 0.95; got {level}")


def _strata(y: np.ndarray, groups: np.ndarray | None, codes: np.ndarray, notes: list | None = None,
            unit: str = "cluster") -> np.ndarray:
    """Each cluster's stratum index (module docstring): its label set, crossed with its subgroup."""
    m = int(codes.max()) + 1
    sets = label_sets(codes, y, m)
    if groups is None or not (groups >= 0).any():  # no demographics: label sets only
        return sets
    lo = np.full(m, np.iinfo(np.int64).max)
    hi = np.full(m, np.iinfo(np.int64).min)
    np.minimum.at(lo, codes, groups)
    np.maximum.at(hi, codes, groups)
    single = (lo == hi) & (lo >= 0)
    mixed = int((~single).sum())
    if mixed and notes is not None:
        notes.append(f"{mixed} {unit}(s) with an unknown subgroup or several resampled in one 'mixed' stratum "
                     "per label set")
    sub = np.where(single, lo, -1)
    _, stratum = np.unique(sets * (int(groups.max(initial=0)) + 2) + sub + 1, return_inverse=True)
    return stratum.reshape(-1)


def bootstrap_weights(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                      cluster: str | None = "identity") -> np.ndarray:
    """``(n_boot, n_rows)`` int32 counts: how often each row is drawn in each resample."""
    counts, codes, _, _ = _draw(predictions, n_boot, seed, cluster)
    return counts[:, codes]


def _draw(predictions, n_boot, seed, cluster):
    if int(n_boot) != n_boot or n_boot < 1:
        raise FeatcacheError(f"n_boot must be a positive integer; got {n_boot!r}")
    y, _ = columns(predictions)
    notes: list[str] = []
    codes, used = clusters(predictions, cluster, notes)
    stratum = _strata(y, subgroups(predictions), codes, notes, "cluster" if used else "row")
    rng = np.random.default_rng(seed)
    m, n_boot = len(stratum), int(n_boot)
    draws = np.empty((n_boot, m), dtype=np.int64)  # each stratum's draws, side by side, then one bincount
    at = 0
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        draws[:, at:at + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        at += len(members)
    draws += (np.arange(n_boot) * m)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_boot * m).reshape(n_boot, m).astype(np.int32)
    return counts, codes, used, notes


def bootstrap(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, cluster: str | None = "identity",
              threshold: float = 0.5) -> Bootstrap:
    """Every resample's AUC, EER, ACC and fairness metrics, and the AUC's BCa acceleration (see
    the module docstring)."""
    draw = _draw(predictions, n_boot, seed, cluster)
    b = _bootstrap(predictions, draw, seed, threshold)
    y, p = columns(predictions)
    groups = subgroups(predictions)
    codes = draw[1]
    b.strata = "label set" if groups is None or not (groups >= 0).any() else "label set x subgroup"
    accel = acceleration(loo_auc(y, p, codes), _strata(y, groups, codes))
    if accel is None:
        b.notes.append("auc: the leave-one-cluster-out AUCs do not vary; percentile interval instead of BCa")
    else:
        b.accel["auc"] = accel
    return b


def loo_auc(y: np.ndarray, p: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``(m,)``: the AUC with cluster ``j``'s rows left out, for every cluster ``j`` (nan when that
    leaves one class).

    Closed form: with ``U`` the Mann-Whitney count of (fake, real) pairs (ties ½), leaving cluster
    ``j`` out removes the pairs of its fakes (``A_j``) and of its reals (``R_j``), the pairs inside
    it (``D_j``) counted twice: ``AUC₍ⱼ₎ = (U − A_j − R_j + D_j) / ((n_pos − P_j)(n_neg − N_j))``.
    """
    yf = y.astype(np.float64)
    m = int(codes.max()) + 1
    order = np.argsort(p, kind="stable")
    ys, ps = yf[order], p[order]
    new = np.r_[True, ps[1:] != ps[:-1]]
    run = np.cumsum(new) - 1  # tie run of each sorted row
    pos, neg = np.bincount(run, weights=ys), np.bincount(run, weights=1 - ys)
    n_pos, n_neg = pos.sum(), neg.sum()
    below_neg = np.cumsum(neg) - neg
    above_pos = n_pos - np.cumsum(pos)
    # each fake's pairs (reals below it, ties ½) and each real's (fakes above it)
    share = np.where(ys == 1, below_neg[run] + 0.5 * neg[run], above_pos[run] + 0.5 * pos[run])
    u = float((ys * share).sum())
    removed = np.bincount(codes[order], weights=share, minlength=m)
    # pairs inside each cluster: the same count on the rows sorted by (cluster, prob)
    o2 = np.lexsort((p, codes))
    c2, p2, y2 = codes[o2], p[o2], yf[o2]
    new2 = np.r_[True, (c2[1:] != c2[:-1]) | (p2[1:] != p2[:-1])]
    run2 = np.cumsum(new2) - 1
    pos2, neg2 = np.bincount(run2, weights=y2), np.bincount(run2, weights=1 - y2)
    run_cluster = c2[new2]
    before = np.cumsum(neg2) - neg2  # reals in earlier runs, across clusters
    first = np.flatnonzero(np.r_[True, run_cluster[1:] != run_cluster[:-1]])
    start = first[np.cumsum(np.r_[True, run_cluster[1:] != run_cluster[:-1]]) - 1]  # first run of its cluster
    inside = np.bincount(run_cluster, weights=pos2 * (before - before[start] + 0.5 * neg2), minlength=m)
    fakes = np.bincount(codes, weights=yf, minlength=m)
    reals = np.bincount(codes, weights=1 - yf, minlength=m)
    den = (n_pos - fakes) * (n_neg - reals)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (u - removed + inside) / np.where(den > 0, den, 1), np.nan)


def acceleration(theta: np.ndarray, stratum: np.ndarray) -> float | None:
    """BCa acceleration from leave-one-cluster-out values ``theta`` grouped by ``stratum`` (module
    docstring; nan values left out); None when they do not vary."""
    num = den = 0.0
    ok = ~np.isnan(theta)
    for s in np.unique(stratum[ok]):
        t = theta[ok & (stratum == s)]
        n = len(t)
        u = (n - 1) * (t.mean() - t)
        num += float((u ** 3).sum()) / n ** 3
        den += float((u ** 2).sum()) / n ** 2
    if not den > 1e-300:
        return None
    return num / (6 * den ** 1.5)


def paired_bootstrap(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                     cluster: str | None = "identity", threshold: float = 0.5) -> Bootstrap:
    """The resampled differences ``metric(a) - metric(b)`` of two prediction tables of the same
    test rows (matched on ``sample_id``), each resample drawing the same rows for both: the test-set
    noise of a difference between two runs (over seeds: :func:`featcache.metrics.compare.paired_differences`)."""
    for name, t in (("first", a), ("second", b)):
        if "sample_id" not in t:
            raise FeatcacheError(f"the {name} predictions table lacks sample_id; paired intervals match rows on it")
    ids_a, ids_b = a["sample_id"].astype(str), b["sample_id"].astype(str)
    if ids_a.duplicated().any() or len(ids_a) != len(ids_b) or set(ids_a) != set(ids_b):
        raise FeatcacheError("the two predictions tables do not hold the same test rows (sample_id); "
                             "a paired interval needs both runs evaluated on one split of one cache")
    b = b.set_index(ids_b).loc[ids_a.to_numpy()].reset_index(drop=True)
    if not np.array_equal(a["label"].to_numpy(), b["label"].to_numpy()):
        raise FeatcacheError("the two predictions tables disagree on the labels of the same sample_id")
    draw = _draw(a, n_boot, seed, cluster)
    ra, rb = _bootstrap(a, draw, seed, threshold), _bootstrap(b, draw, seed, threshold)
    values = {k: ra.values[k] - rb.values[k] for k in ra.values if k in rb.values}
    notes = [f"first: {n}" for n in ra.notes] + [f"second: {n}" for n in rb.notes if n not in ra.notes]
    point = {k: ra.point[k] - rb.point[k] for k in values if k in ra.point and k in rb.point}
    return Bootstrap(values, ra.n_boot, ra.seed, ra.cluster, ra.n_clusters, ra.threshold, notes, point)


def _bootstrap(predictions: pd.DataFrame, draw, seed: int, threshold: float) -> Bootstrap:
    y, p = columns(predictions)
    counts, codes, used, notes = draw
    notes = list(notes)
    groups = subgroups(predictions)
    engine = _Weighted(y, p, groups if groups is not None and (groups >= 0).any() else None, threshold)
    sorted_codes = codes[engine.order]  # weights are built directly in the engine's row order
    parts: dict[str, list] = {}
    for start in range(0, counts.shape[0], CHUNK):
        w = counts[start:start + CHUNK][:, sorted_codes].astype(np.float64)
        for name, v in engine(w).items():
            parts.setdefault(name, []).append(v)
        if engine.fair is not None:
            parts.setdefault("cells", []).append(w @ engine.fair)
    values = {name: np.concatenate(parts[name]) for name in METRICS if name in parts}
    for name, v in values.items():
        bad = int(np.isnan(v).sum())
        if bad:
            notes.append(f"{name}: undefined in {bad} of {len(v)} resamples, left out of its interval")
    point = {name: float(v[0]) for name, v in engine(np.ones((1, len(y)))).items()}
    cells = np.concatenate(parts["cells"]) if "cells" in parts else None
    return Bootstrap(values, int(counts.shape[0]), int(seed), used, int(counts.shape[1]), float(threshold), notes,
                     point, cells=cells)


def bootstrap_ci(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 cluster: str | None = "identity", threshold: float = 0.5) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}`` for auc, eer, acc and (with a ``subgroup`` column) every fairness metric.

    See the module docstring: clusters (``cluster`` column when present) resampled within the
    strata of their labels (and subgroups), ``n_boot`` seeded resamples; BCa for the AUC,
    percentile otherwise, at ``level``.  A fairness metric's entry is its resampled spread, not a
    confidence interval (:data:`SPREAD95_MEANING`).
    """
    _check_level(level)
    return bootstrap(predictions, n_boot=n_boot, seed=seed, cluster=cluster, threshold=threshold).ci(level)


def with_intervals(metrics: dict, predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                   cluster: str | None = "identity", threshold: float = 0.5, n_perm: int = 1000) -> dict:
    """``metrics`` plus ``ci95``, ``ci95_info``, ``fairness_null``, ``fairness_coverage``, with
    demographics ``spread95`` and ``fairness_range95``, and (when ``metrics`` has ``ece``)
    ``ece_floor``: what a metrics.json holds (see the module docstring)."""
    b = bootstrap(predictions, n_boot=n_boot, seed=seed, cluster=cluster, threshold=threshold)
    ci = b.ci(0.95)
    y, p = columns(predictions)
    coverage = fairness_coverage(y, subgroups(predictions))
    out = {**metrics, "ci95": {k: ci[k] for k in DETECTION_KEYS if k in ci}, "ci95_info": b.info(0.95)}
    if coverage["unavailable"] is None:
        out["spread95"] = {k: ci[k] for k in FAIRNESS_KEYS if k in ci}
        out["ci95_info"]["spread95"] = SPREAD95_MEANING
        _, cells = cell_counts(y, p, subgroups(predictions), threshold)
        out["fairness_range95"] = gap_ranges(cells, b.cells if b.cluster else None)
        out["ci95_info"]["fairness_range95"] = RANGE95_MEANING
    out["fairness_null"] = fairness_floor(predictions, threshold=threshold, n_perm=n_perm, seed=seed, cluster=cluster)
    out["fairness_coverage"] = coverage
    if "ece" in metrics:
        out["ece_floor"] = ece_floor(p, seed=seed)
    return out


class _Weighted:
    """Metrics of a binary detector under row weights, for a (B, n) matrix of weights at once.

    The rows are taken in ``self.order`` (ascending ``p``): the weight matrices passed in must
    have their columns in that order.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, threshold: float):
        self.order = np.argsort(p, kind="stable")
        y, p = y[self.order], p[self.order]
        groups = None if groups is None else groups[self.order]
        self.y = y.astype(np.float64)
        self.starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # first row of each distinct prob
        self.ties = len(self.starts) < len(p)
        pred = (p >= threshold).astype(np.int64)
        self.correct = (pred == y).astype(np.float64)
        self.fair = None
        if groups is not None:
            codes = np.unique(groups[groups >= 0])
            known = groups >= 0
            cell = np.full(len(y), -1)
            gi = np.searchsorted(codes, groups[known])
            cell[known] = gi * 4 + y[known] * 2 + pred[known]  # (group, label, decision)
            onehot = np.zeros((len(y), 4 * len(codes)))
            onehot[np.flatnonzero(known), cell[known]] = 1.0
            self.fair = onehot

    #: F_FPR, F_EO, F_MEO, F_DP, F_OAE of each row of a (B, 4 * groups) matrix of cell counts.
    _fairness = staticmethod(fairness_from_counts)

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        out = self._ranks(w)
        total = w.sum(1)
        out["acc"] = (w @ self.correct) / total
        if self.fair is not None:
            out.update(self._fairness(w @ self.fair))
        return out

    def _ranks(self, w: np.ndarray) -> dict[str, np.ndarray]:
        pos = w * self.y  # (B, rows), ascending prob
        neg = w - pos
        if self.ties:  # one column per distinct prob
            pos = np.add.reduceat(pos, self.starts, axis=1)
            neg = np.add.reduceat(neg, self.starts, axis=1)
        below_pos = np.cumsum(pos, axis=1) - pos  # weight of fakes strictly below each distinct prob
        below_neg = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = below_pos[:, -1] + pos[:, -1], below_neg[:, -1] + neg[:, -1]
        both = (n_pos > 0) & (n_neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos * (below_neg + 0.5 * neg)).sum(1) / (n_pos * n_neg)
            # ROC point j flags every row with p >= the j-th distinct prob (sklearn's roc_curve points;
            # its first point (0, 0), nothing flagged, is column K here): integer counts, then rates
            tpr = (n_pos[:, None] - below_pos) / n_pos[:, None]
            fpr = (n_neg[:, None] - below_neg) / n_neg[:, None]
        diff = (1.0 - tpr) - fpr  # FNR - FPR: nondecreasing in j, -1 at j = 0, 1 at the (0, 0) point
        k = diff.shape[1]
        crossed = (diff <= 0).sum(1)  # points j < crossed have FNR <= FPR
        rows = np.arange(len(w))
        j1 = np.maximum(crossed - 1, 0)  # the first point, from the top, with FNR <= FPR
        j0 = np.minimum(crossed, k - 1)  # the point before it (the origin when crossed == k)
        origin = crossed == k
        d1, f1 = diff[rows, j1], fpr[rows, j1]
        d0 = np.where(origin, 1.0, diff[rows, j0])
        f0 = np.where(origin, 0.0, fpr[rows, j0])
        with np.errstate(invalid="ignore", divide="ignore"):
            eer = np.where(d1 == 0, f1, f0 + d0 / (d0 - d1) * (f1 - f0))
        nan = np.full(len(w), np.nan)
        return {"auc": np.where(both, auc, nan), "eer": np.where(both, eer, nan)}
