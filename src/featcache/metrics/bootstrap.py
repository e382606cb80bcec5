"""Uncertainty of the metrics: a vectorised, stratified, clustered bootstrap (the paired differences
over seeds of an ablation are :mod:`.compare`'s).

Bootstrap of one predictions table (:func:`bootstrap_ci`)
---------------------------------------------------------
The table has one row per test sample with ``label`` (0 real, 1 fake) and ``prob`` (P(fake)),
and optionally ``subgroup`` (integer codes, negative = unknown) and a cluster column
(``identity`` by default; ``video`` or any other column name may be given).

- **Clusters.**  Frames of one person (or one video) are not independent, so when the table
  has the cluster column, whole clusters are resampled, not rows.  A row whose cluster value is
  missing (NaN or empty) is its own cluster (counted in ``notes``).  Without the column, or with
  ``cluster=None``, rows are resampled.
- **Strata (stratified by label).**  Each cluster belongs to the stratum of its label set: only
  real rows, only fake rows, or both (a person's real video and the fakes made from it share an
  identity).  Every resample draws, with replacement, as many clusters from each stratum as it
  holds, so every resample has real and fake rows (with row clusters: exactly as many of each as
  the table).
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
    the rates and F_FPR, F_EO, F_MEO, F_DP, F_OAE with the rules of :mod:`.fairness`
    (a subgroup absent from a resample has no rates; a rate defined in fewer than two
    subgroups gives no term).

- **Interval.**  The percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
  quantiles (numpy's linear interpolation) of the resampled values.  Resamples where a metric
  is undefined (nan) are left out of its quantiles and counted in ``notes``; with no defined
  value the interval is ``[nan, nan]``.
- Seeded (``numpy.random.default_rng(seed)``): the same table and seed give the same interval.

Paired differences of two runs on the same rows (:func:`paired_bootstrap`)
-------------------------------------------------------------------------
The same resamples (drawn from the first table's clusters and labels) applied to both tables,
rows matched on ``sample_id``: the interval of ``metric(a) - metric(b)`` over the test rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import FeatcacheError
from .fairness import FAIRNESS_KEYS

#: The metrics :func:`bootstrap_ci` gives intervals for, in order (the fairness ones only with a
#: ``subgroup`` column).
DETECTION_KEYS = ("auc", "eer", "acc")
METRICS = DETECTION_KEYS + FAIRNESS_KEYS

#: Resamples processed together (memory: a few (chunk x rows) float64 matrices).
CHUNK = 125


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

    def ci(self, level: float = 0.95) -> dict[str, list[float]]:
        """``{metric: [lo, hi]}``: the percentile interval at ``level``."""
        _check_level(level)
        q = [(1 - level) / 2, (1 + level) / 2]
        out = {}
        for name, v in self.values.items():
            v = v[~np.isnan(v)]
            out[name] = [float(x) for x in np.quantile(v, q)] if len(v) else [float("nan")] * 2
        return out

    def info(self, level: float = 0.95) -> dict:
        """How the interval was made, for metrics.json (``ci95_info``)."""
        return {"method": "percentile bootstrap, stratified by label", "level": level, "n_boot": self.n_boot,
                "seed": self.seed, "cluster": self.cluster or "row", "n_clusters": self.n_clusters,
                "threshold": self.threshold, "notes": list(self.notes)}


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise FeatcacheError(f"the interval level must be in (0, 1), e.g. 0.95; got {level}")


def _columns(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
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


def _clusters(predictions: pd.DataFrame, y: np.ndarray, cluster: str | None, notes: list) -> tuple:
    """Cluster index per row, each cluster's stratum, and the column used (None: rows)."""
    n = len(y)
    if cluster is None or cluster not in predictions:
        if cluster is not None:
            notes.append(f"no {cluster!r} column: rows resampled independently")
        return np.arange(n), y.copy(), None
    raw = predictions[cluster]
    missing = (raw.isna() | (raw.astype(str).str.strip() == "")).to_numpy()
    keys = raw.astype(str).to_numpy(dtype=object)
    keys[missing] = [f"\0row{i}" for i in np.flatnonzero(missing)]  # a row of its own
    if missing.any():
        notes.append(f"{int(missing.sum())} row(s) without {cluster!r} resampled as their own clusters")
    codes, _ = pd.factorize(keys)
    m = codes.max() + 1
    fakes = np.bincount(codes, weights=y, minlength=m)
    rows = np.bincount(codes, minlength=m)
    stratum = np.where(fakes == 0, 0, np.where(fakes == rows, 1, 2))
    return codes, stratum, cluster


def bootstrap_weights(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                      cluster: str | None = "identity") -> np.ndarray:
    """``(n_boot, n_rows)`` int32 counts: how often each row is drawn in each resample."""
    counts, codes, _, _ = _draw(predictions, n_boot, seed, cluster)
    return counts[:, codes]


def _draw(predictions, n_boot, seed, cluster):
    if int(n_boot) != n_boot or n_boot < 1:
        raise FeatcacheError(f"n_boot must be a positive integer; got {n_boot!r}")
    y, _ = _columns(predictions)
    notes: list[str] = []
    codes, stratum, used = _clusters(predictions, y, cluster, notes)
    rng = np.random.default_rng(seed)
    m = len(stratum)
    counts = np.zeros((int(n_boot), m), dtype=np.int32)
    offsets = (np.arange(int(n_boot)) * m)[:, None]
    for s in (0, 1, 2):
        members = np.flatnonzero(stratum == s)
        if len(members) == 0:
            continue
        draws = members[rng.integers(0, len(members), size=(int(n_boot), len(members)))]
        counts += np.bincount((draws + offsets).ravel(), minlength=int(n_boot) * m).reshape(int(n_boot), m).astype(
            np.int32)
    return counts, codes, used, notes


def bootstrap(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, cluster: str | None = "identity",
              threshold: float = 0.5) -> Bootstrap:
    """Every resample's AUC, EER, ACC and fairness metrics (see the module docstring)."""
    return _bootstrap(predictions, _draw(predictions, n_boot, seed, cluster), seed, threshold)


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
    return Bootstrap(values, ra.n_boot, ra.seed, ra.cluster, ra.n_clusters, ra.threshold, notes)


def _bootstrap(predictions: pd.DataFrame, draw, seed: int, threshold: float) -> Bootstrap:
    y, p = _columns(predictions)
    counts, codes, used, notes = draw
    notes = list(notes)
    groups = None
    if "subgroup" in predictions:
        g = predictions["subgroup"].to_numpy()
        if not np.isfinite(g.astype(np.float64)).all():
            raise FeatcacheError("the predictions' subgroup column must hold integer codes (negative: unknown)")
        groups = g.astype(np.int64)
    engine = _Weighted(y, p, groups, threshold)
    sorted_codes = codes[engine.order]  # weights are built directly in the engine's row order
    parts: dict[str, list] = {}
    for start in range(0, counts.shape[0], CHUNK):
        w = counts[start:start + CHUNK][:, sorted_codes].astype(np.float64)
        for name, v in engine(w).items():
            parts.setdefault(name, []).append(v)
    values = {name: np.concatenate(parts[name]) for name in METRICS if name in parts}
    for name, v in values.items():
        bad = int(np.isnan(v).sum())
        if bad:
            notes.append(f"{name}: undefined in {bad} of {len(v)} resamples, left out of its interval")
    return Bootstrap(values, int(counts.shape[0]), int(seed), used, int(counts.shape[1]), float(threshold), notes)


def bootstrap_ci(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 cluster: str | None = "identity", threshold: float = 0.5) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}`` for auc, eer, acc and (with a ``subgroup`` column) every fairness metric.

    See the module docstring: clusters (``cluster`` column when present) resampled within the
    strata of their labels, ``n_boot`` seeded resamples, percentile interval at ``level``.
    """
    _check_level(level)
    return bootstrap(predictions, n_boot=n_boot, seed=seed, cluster=cluster, threshold=threshold).ci(level)


def with_intervals(metrics: dict, predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                   cluster: str | None = "identity", threshold: float = 0.5) -> dict:
    """``metrics`` plus ``"ci95"`` ({metric: [lo, hi]}) and ``"ci95_info"`` (how; notes): what a
    metrics.json holds."""
    b = bootstrap(predictions, n_boot=n_boot, seed=seed, cluster=cluster, threshold=threshold)
    return {**metrics, "ci95": b.ci(0.95), "ci95_info": b.info(0.95)}


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

    @staticmethod
    def _fairness(c: np.ndarray) -> dict[str, np.ndarray]:
        c = c.reshape(len(c), -1, 4)  # (B, groups, [real kept, real flagged, fake missed, fake flagged])
        tn_, fp, fn_, tp = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
        n_neg, n_pos = tn_ + fp, fn_ + tp
        n = n_neg + n_pos

        def ratio(a, b):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

        rates = {"tpr": ratio(tp, n_pos), "fpr": ratio(fp, n_neg), "tnr": ratio(n_neg - fp, n_neg),
                 "fnr": ratio(n_pos - tp, n_pos), "pr": ratio(tp + fp, n), "nr": ratio(n - tp - fp, n),
                 "acc": ratio(tp + n_neg - fp, n)}
        fpr_all = ratio(fp.sum(1), n_neg.sum(1))
        tpr_all = ratio(tp.sum(1), n_pos.sum(1))

        def dev(r, overall):
            ok = ~np.isnan(r)
            s = np.where(ok, np.abs(r - overall[:, None]), 0.0).sum(1)
            return np.where((ok.sum(1) >= 2) & ~np.isnan(overall), s, np.nan)

        def spread(r):
            ok = ~np.isnan(r)
            hi = np.where(ok, r, -np.inf).max(1)
            lo = np.where(ok, r, np.inf).min(1)
            return np.where(ok.sum(1) >= 2, hi - lo, np.nan)

        def nanmax(*vs):
            v = np.stack(vs)
            any_ok = ~np.isnan(v).all(0)
            return np.where(any_ok, np.where(np.isnan(v), -np.inf, v).max(0), np.nan)

        d_fpr, d_tpr = dev(rates["fpr"], fpr_all), dev(rates["tpr"], tpr_all)
        return {
            "f_fpr": 100 * d_fpr,
            "f_eo": 100 * (d_fpr + d_tpr),
            "f_meo": 100 * nanmax(*(spread(rates[r]) for r in ("fpr", "fnr", "tnr", "tpr"))),
            "f_dp": 100 * nanmax(spread(rates["pr"]), spread(rates["nr"])),
            "f_oae": 100 * spread(rates["acc"]),
        }

