"""Verdicts over seeds: the paired difference of each preset of an ablation to a baseline, its
interval (seed noise and test-set noise together), and a ``*`` that survives the number of presets
compared (issue 23, after a statistical review with simulations of known truth; ARCHITECTURE.md,
"Verdicts over seeds").

What is compared (:func:`paired_differences`)
---------------------------------------------
An ablation trains every preset with the same seeds and evaluates every run on the same test rows.
Run ``(preset, seed)`` and ``(baseline, seed)`` share the seed, so the difference is taken per seed:
``Δ_s = M(preset, s) − M(baseline, s)`` over the ``k`` shared seeds where both values are defined;
``Δ̄`` is their mean, ``s²`` their variance (``ddof = 1``).

Two noises are in ``Δ̄``: the seeds (initialisation, batch order), which shrink as ``1/k``, and the
test set (which samples happened to be drawn), which every seed shares and which does not shrink
with more seeds.  A t interval over seeds alone holds the first only: it covers the true difference
less and less often as seeds are added once a preset helps some samples and hurts others (coverage
0.90 at 5 seeds, 0.855 at 10 in the review's simulation).  Here:

- ``V``: the test-set variance of ``Δ̄``.  One set of resamples ``W`` (:func:`bootstrap_weights`
  of the baseline's first predictions table: whole identities within their strata, ``n_boot``
  resamples, seeded) is applied to every run's predictions (rows matched on ``sample_id``: common
  random numbers); for each resample ``b`` the seed-averaged paired difference
  ``mean_s [M(preset_s; W_b) − M(baseline_s; W_b)]`` is computed with the vectorised engine
  (:class:`featcache.metrics.bootstrap._Weighted`; Brier, NLL and ECE as weighted means here), and
  ``V`` is its variance over the resamples.
- **Interval**: ``Δ̄ ± t_{(1+level)/2, ν} · sqrt(s²/k + V)`` with the Welch–Satterthwaite degrees
  of freedom ``ν = (k − 1)(1 + kV/s²)²`` (capped at 1,000) for ``k ≥ 3``, ``ν = 1`` for ``k = 2``,
  and ``ν = ∞`` (the normal quantile) when ``s² = 0``: every seed gave the same difference, so the
  interval is the test-set noise alone.  The review measured its coverage at 0.953–0.99 for
  ``k ≥ 3`` (and this module's tests and ``benchmarks/bench_verdicts.py`` re-measure it).
- **Fallback**: a column without predictions (no ``predictions.csv`` for some run, rows that do not
  match, an eval cache's column) gets the t interval over seeds alone,
  ``Δ̄ ± t_{(1+level)/2, k−1} · s/√k`` (none when ``s = 0``), and its ``basis`` says so.
- **p-value**: ``2 · P(T_ν > |Δ̄| / se)``; the interval excludes 0 exactly when ``p < 1 − level``.

The gaps against their floor (S3d)
----------------------------------
A raw fairness gap F̂ (F_FPR, F_EO, F_MEO, F_DP, F_OAE) grows with the binomial noise of each
subgroup's rate, which depends on where the scores sit around the threshold: a preset whose scores
sit lower (fewer false positives) gets a smaller F_FPR with no change in fairness.  Presets are
therefore compared on ``F̂ − floor`` (:func:`excess`; the floor is the mean gap of the same decisions
with the subgroup codes permuted within the label strata, ``metrics["fairness_null"]``), and ECE on
``ECE − ece_floor`` (its value for a perfectly calibrated detector with the run's own P(fake)), or on
Brier / NLL.  The raw gaps and the raw ECE/MCE get intervals but never a ``*`` (:data:`NO_VERDICT`).
The test-set variance of ``F̂ − floor`` is taken as that of F̂: the floor is fixed by the subgroup
sizes and the overall decision rates, which move little between test sets of one size (the
benchmark measures how little).

Verdicts (``differs``, the ``*`` of the tables)
-----------------------------------------------
- Only with ``k ≥ 3`` seeds; at ``k = 2`` the interval is given with the note "too few seeds for a
  verdict" (its ``t_{0.975, 1} = 12.7`` leaves almost no power).
- **Holm** across the presets of each (metric, baseline) family: the ``m`` presets with a p-value
  are sorted by it and the ``i``-th smallest (from 1) is multiplied by ``m − i + 1``, the products
  made non-decreasing and capped at 1 (``p_holm``); ``*`` when ``p_holm < 1 − level``.  The chance
  of at least one false ``*`` in a family is then at most ``1 − level``; metrics are not adjusted
  against each other (each is read on its own).
- **Degenerate runs** (every test sample got one decision; ``<split>_degenerate``) have fairness
  gaps of 0 by construction: their fairness values are left out of every aggregate
  (:func:`without_degenerate`), and ``n`` (seeds used) against ``n_runs`` (shared seeds) says how many.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special

from ..errors import FeatcacheError
from .bootstrap import CHUNK, _check_level, _Weighted, bootstrap_weights
from .calibration import EPS
from .detection import check_binary
from .fairness import FAIRNESS_KEYS

#: The suffix of a gap measured against its floor: ``test_f_fpr_excess`` = F_FPR − floor.
EXCESS = "_excess"

#: Metrics that get an interval but never a ``*``: the raw gaps (they move with the threshold; compare
#: ``<gap>_excess``) and the raw calibration errors (biased upward at small n; compare ``ece_excess``,
#: Brier or NLL).
NO_VERDICT = frozenset(FAIRNESS_KEYS) | {"ece", "mce"}

#: Metrics whose test-set resamples this module computes (per run, on its predictions table).
RESAMPLED = ("auc", "eer", "acc", *FAIRNESS_KEYS, "brier", "nll", "ece")

#: Below this many seeds no verdict is given.
MIN_SEEDS = 3

#: The cap on the Welch–Satterthwaite degrees of freedom.
MAX_DOF = 1000

COLUMNS = ["preset", "baseline", "metric", "n", "n_runs", "mean", "sd", "v_test", "se", "dof", "lo", "hi", "p",
           "p_holm", "m", "differs", "basis", "note"]


def excess(metrics: dict) -> dict[str, float]:
    """``{"<gap>_excess": F̂ − floor}`` for each gap with a floor in ``metrics["fairness_null"]``
    (``{gap: {"floor": x, "p": y}}``), and ``ece_excess`` = ``ece − ece_floor`` when both are there."""
    out = {}
    for key, null in (metrics.get("fairness_null") or {}).items():
        value, floor = metrics.get(key), (null or {}).get("floor")
        if isinstance(value, (int, float)) and isinstance(floor, (int, float)):
            out[f"{key}{EXCESS}"] = float(value) - float(floor)
    if isinstance(metrics.get("ece"), (int, float)) and isinstance(metrics.get("ece_floor"), (int, float)):
        out[f"ece{EXCESS}"] = float(metrics["ece"]) - float(metrics["ece_floor"])
    return out


def split_column(column: str) -> tuple[str, str]:
    """``test_f_fpr_excess`` -> ``("test", "f_fpr_excess")``; ``ffpp_auc`` -> ``("ffpp", "auc")``;
    a column that ends in no known metric -> ``("", column)``."""
    known = {*RESAMPLED, *NO_VERDICT, *(f"{m}{EXCESS}" for m in (*FAIRNESS_KEYS, "ece"))}
    for metric in sorted(known, key=len, reverse=True):
        if column.endswith(f"_{metric}"):
            return column[:-len(metric) - 1], metric
    return "", column


def resampled_metric(metric: str) -> str:
    """The metric whose resamples give a column's test-set variance (``f_fpr_excess`` -> ``f_fpr``)."""
    return metric[:-len(EXCESS)] if metric.endswith(EXCESS) else metric


def is_fairness(metric: str) -> bool:
    """A fairness gap, raw or against its floor."""
    return resampled_metric(metric) in FAIRNESS_KEYS


def without_degenerate(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of the ablation table with the fairness values of degenerate runs set to NaN (every
    ``<prefix>_<gap>`` and ``<prefix>_<gap>_excess`` where ``<prefix>_degenerate`` is true): their
    gaps are 0 by construction, not "perfectly fair"."""
    out = df.copy()
    for column in df.columns:
        prefix, metric = split_column(str(column))
        flag = f"{prefix}_degenerate"
        if prefix and is_fairness(metric) and flag in df:
            out[column] = df[column].astype(float).mask(df[flag].fillna(False).astype(bool).to_numpy())
    return out


def resample_metrics(predictions: pd.DataFrame, weights: np.ndarray, *, threshold: float = 0.5,
                     keys=RESAMPLED) -> dict[str, np.ndarray]:
    """The metrics ``keys`` (of :data:`RESAMPLED`) under each row of ``weights`` (``(B, rows)`` counts
    in the table's row order): AUC, EER, ACC and the fairness gaps (with a ``subgroup`` column) from
    the bootstrap's engine, Brier, NLL and ECE (15 equal bins, as
    :func:`~featcache.metrics.calibration.calibration_metrics`) as weighted means.  At weights of
    ones each equals the metric of the table."""
    keys = set(keys)
    missing = [c for c in ("label", "prob") if c not in predictions]
    if missing:
        raise FeatcacheError(f"the predictions table lacks column(s) {', '.join(missing)}; test-set resamples "
                             "need label (0/1) and prob (P(fake)) per row")
    try:
        y, p = check_binary(predictions["label"].to_numpy(), predictions["prob"].to_numpy(), name="prob")
    except ValueError as exc:
        raise FeatcacheError(f"the predictions cannot be resampled: {exc}") from None
    groups = None
    if "subgroup" in predictions:
        g = predictions["subgroup"].to_numpy()
        if not np.isfinite(g.astype(np.float64)).all():
            raise FeatcacheError("the predictions' subgroup column must hold integer codes (negative: unknown)")
        groups = g.astype(np.int64)
    engine = _Weighted(y, p, groups, threshold)
    ys, ps = y[engine.order].astype(np.float64), p[engine.order]
    pc = np.clip(ps, EPS, 1 - EPS)
    sq, ll = (ps - ys) ** 2, -(ys * np.log(pc) + (1 - ys) * np.log(1 - pc))
    edges = np.linspace(0.0, 1.0, 16)
    bins = np.searchsorted(edges[1:-1], ps, side="right")
    resid = np.zeros((len(ps), 15))
    resid[np.arange(len(ps)), bins] = ys - ps  # per bin: Σ w (y − p) = count · (frac_pos − mean_p)
    parts: dict[str, list] = {}
    for start in range(0, len(weights), CHUNK):
        w = weights[start:start + CHUNK][:, engine.order].astype(np.float64)
        total = w.sum(1)
        out = engine._ranks(w) if keys & {"auc", "eer"} else {}
        if "acc" in keys:
            out["acc"] = (w @ engine.correct) / total
        if engine.fair is not None and keys & set(FAIRNESS_KEYS):
            out.update(engine._fairness(w @ engine.fair))
        if "brier" in keys:
            out["brier"] = (w @ sq) / total
        if "nll" in keys:
            out["nll"] = (w @ ll) / total
        if "ece" in keys:
            out["ece"] = np.abs(w @ resid).sum(1) / total
        for name, v in out.items():
            parts.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in parts.items() if name in keys}


def _aligned(table: pd.DataFrame, ids: pd.Index, labels: np.ndarray) -> pd.DataFrame | None:
    """``table``'s rows in the order of ``ids`` (its sample_id), or None when the rows differ."""
    if "sample_id" not in table or "label" not in table:
        return None
    own = table["sample_id"].astype(str)
    if len(own) == len(ids) and np.array_equal(own.to_numpy(), ids.to_numpy()):  # the same order already
        out = table.reset_index(drop=True)
        return out if np.array_equal(out["label"].to_numpy(), labels) else None
    if own.duplicated().any() or len(own) != len(ids) or set(own) != set(ids):
        return None
    out = table.set_index(own.to_numpy()).loc[ids.to_numpy()].reset_index(drop=True)
    return out if np.array_equal(out["label"].to_numpy(), labels) else None


class _TestNoise:
    """The resampled metrics of every run of one prediction prefix, on the resamples drawn once from
    the baseline's first table; None for a run whose table is missing or holds other rows."""

    def __init__(self, tables: dict, first_key, *, n_boot: int, seed: int, cluster: str | None, threshold: float,
                 keys=RESAMPLED):
        first = tables[first_key]
        if "sample_id" not in first:
            raise FeatcacheError("the baseline's predictions lack sample_id; paired resamples match rows on it")
        self.ids = first["sample_id"].astype(str).reset_index(drop=True)
        if self.ids.duplicated().any():
            raise FeatcacheError("the baseline's predictions repeat a sample_id; paired resamples match rows on it")
        self.weights = bootstrap_weights(first, n_boot=n_boot, seed=seed, cluster=cluster)
        self.labels = first["label"].to_numpy()
        self.tables, self.threshold, self.keys = tables, threshold, tuple(keys)
        self.cache: dict = {}

    def of(self, key) -> dict[str, np.ndarray] | None:
        if key not in self.cache:
            table = self.tables.get(key)
            aligned = None if table is None else _aligned(table, pd.Index(self.ids), self.labels)
            try:
                self.cache[key] = None if aligned is None else resample_metrics(
                    aligned, self.weights, threshold=self.threshold, keys=self.keys)
            except FeatcacheError:  # a table without valid label/prob: as if missing
                self.cache[key] = None
        return self.cache[key]


def combined_interval(d: np.ndarray, boot: np.ndarray | None, level: float = 0.95) -> dict:
    """The interval of the mean of the per-seed differences ``d`` (see the module docstring):
    with ``boot`` (the resampled seed-averaged differences) seeds and test set together, else
    seeds alone.  Returns ``mean, sd, v_test, se, dof, lo, hi, p`` (NaN where undefined)."""
    nan = float("nan")
    d = np.asarray(d, dtype=np.float64)
    k = len(d)
    mean = float(d.mean()) if k else nan
    s2 = float(d.var(ddof=1)) if k >= 2 else nan
    out = {"mean": mean, "sd": float(np.sqrt(s2)) if k >= 2 else nan, "v_test": nan, "se": nan, "dof": nan,
           "lo": nan, "hi": nan, "p": nan}
    if k < 2:
        return out
    if s2 <= 1e-24 * max(1.0, mean * mean):
        s2 = 0.0
    if boot is None:
        if s2 == 0:  # every seed the same difference: a coarse metric, not a noiseless one
            return out
        se, dof = np.sqrt(s2 / k), float(k - 1)
    else:
        boot = np.asarray(boot, dtype=np.float64)
        boot = boot[~np.isnan(boot)]
        v = float(boot.var(ddof=1)) if len(boot) >= 2 else nan
        if np.isnan(v):
            return out
        out["v_test"] = v
        se = np.sqrt(s2 / k + v)
        if s2 == 0:
            dof = float("inf")
        elif k == 2:
            dof = 1.0
        else:
            dof = float(min(MAX_DOF, (k - 1) * (1 + k * v / s2) ** 2))
    if se <= 0:
        return out
    t = abs(mean) / se
    if np.isinf(dof):
        q, p = float(special.ndtri((1 + level) / 2)), float(2 * special.ndtr(-t))
    else:
        q, p = float(special.stdtrit(dof, (1 + level) / 2)), float(2 * special.stdtr(dof, -t))
    out.update(se=float(se), dof=dof, lo=mean - q * se, hi=mean + q * se, p=p)
    return out


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted): the i-th smallest of
    the m defined p-values times ``m − i + 1``, made non-decreasing, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adj
    return out


def paired_differences(df: pd.DataFrame, columns, *, baseline: str = "none", by: str = "preset",
                       pair: str = "seed", level: float = 0.95, predictions: dict | None = None,
                       n_boot: int = 1000, seed: int = 0, cluster: str | None = "identity",
                       threshold: float = 0.5) -> pd.DataFrame:
    """Per preset (≠ ``baseline``) and metric column: the paired difference to ``baseline`` over the
    seeds both have, its interval and verdict (see the module docstring).

    ``df``: one row per run with columns ``by`` (preset), ``pair`` (seed), the metric ``columns`` and,
    per prefix, ``<prefix>_degenerate`` (fairness values of degenerate runs are left out).
    ``predictions``: ``{prefix: {(preset, seed): table}}``, each run's predictions (``sample_id``,
    ``label``, ``prob``, optional ``subgroup`` and ``identity``) for the columns ``<prefix>_<metric>``;
    a column without them gets the interval over seeds alone.  ``n_boot``, ``seed``, ``cluster``:
    the test-set resamples (drawn once per prefix from the baseline's first table); ``threshold``:
    the decision threshold of the acc and fairness resamples.

    Returns one row per (preset, metric): ``preset, baseline, metric``; ``n`` (seeds used: both
    values defined, neither run degenerate for a fairness gap), ``n_runs`` (shared seeds); ``mean, sd``
    (of the per-seed differences); ``v_test`` (the test-set variance of the mean; NaN without
    predictions); ``se, dof, lo, hi, p`` (the interval and its p-value); ``p_holm`` and ``m`` (Holm
    over the ``m`` presets of this metric with a p-value and at least 3 seeds); ``differs`` (the
    verdict: ``p_holm < 1 − level``); ``basis`` (``seeds + test set`` or ``seeds only``); ``note``
    (why there is no verdict, or why the basis is seeds only).
    """
    _check_level(level)
    for c in (by, pair):
        if c not in df:
            raise FeatcacheError(f"the ablation table lacks a {c!r} column")
    if baseline not in set(df[by]):
        raise FeatcacheError(f"baseline preset {baseline!r} is not in the ablation "
                             f"(presets: {', '.join(map(str, pd.unique(df[by])))}); add it to --presets")
    used = without_degenerate(df)
    presets = used[by].to_numpy()
    seeds = used[pair].to_numpy()
    base_rows = {sd: i for i, sd in enumerate(seeds) if presets[i] == baseline}
    values = {col: used[col].to_numpy(dtype=np.float64) for col in columns if col in df}
    noise = {}
    for prefix, tables in (predictions or {}).items():
        first = next((sd for sd in base_rows if (baseline, sd) in tables), None)
        keys = {resampled_metric(m) for c in values for p, m in [split_column(c)] if p == prefix} & set(RESAMPLED)
        if first is not None and keys:
            try:
                noise[prefix] = _TestNoise(tables, (baseline, first), n_boot=n_boot, seed=seed, cluster=cluster,
                                           threshold=threshold, keys=keys)
            except FeatcacheError as exc:  # e.g. no label/prob columns: these columns fall back to the seeds
                noise[prefix] = str(exc)
    rows = []
    for preset in pd.unique(presets):
        if preset == baseline:
            continue
        mine = [(sd, i) for i, sd in enumerate(seeds) if presets[i] == preset and sd in base_rows]
        shared = [sd for sd, _ in mine]
        ia = np.array([i for _, i in mine], dtype=np.int64)
        ib = np.array([base_rows[sd] for sd in shared], dtype=np.int64)
        for col, v in values.items():
            d = v[ia] - v[ib]
            ok = ~np.isnan(d)
            d, kept = d[ok], [sd for sd, keep in zip(shared, ok) if keep]
            prefix, metric = split_column(col)
            boot, basis, note = _test_noise(noise.get(prefix), resampled_metric(metric), preset, baseline, kept,
                                            predictions is not None and prefix in predictions)
            r = combined_interval(d, boot, level)
            if len(d) == 2:
                note = "too few seeds for a verdict"
            elif metric in NO_VERDICT and not np.isnan(r["mean"]):
                note = ("raw gap: no verdict (it moves with the threshold; compare the gap minus its floor)"
                        if metric in FAIRNESS_KEYS else "raw calibration error: no verdict (biased upward at "
                                                        "small n; compare ece minus its floor, brier or nll)")
            rows.append({"preset": preset, "baseline": baseline, "metric": col, "n": len(d), "n_runs": len(shared),
                         **r, "p_holm": float("nan"), "m": 0, "differs": False, "basis": basis, "note": note})
    for col in values:  # Holm within each (metric, baseline) family
        if split_column(col)[1] in NO_VERDICT:
            continue
        family = [r for r in rows if r["metric"] == col and r["n"] >= MIN_SEEDS and not np.isnan(r["p"])]
        adjusted = holm([r["p"] for r in family])
        for r, adj in zip(family, adjusted):
            r.update(p_holm=float(adj), m=len(family), differs=bool(adj < 1 - level))
        for r in rows:
            if r["metric"] == col:
                r["m"] = len(family)
    return pd.DataFrame(rows, columns=COLUMNS).astype({"n": int, "n_runs": int, "m": int, "differs": bool})


def _test_noise(noise: _TestNoise | str | None, metric: str, preset, baseline, seeds: list, given: bool):
    """(resampled seed-averaged differences or None, basis, note) of one (preset, metric); ``noise``
    a string: why the baseline's predictions could not be resampled."""
    if metric not in RESAMPLED:
        return None, "seeds only", "seeds only: no test-set resamples for this column" if given else ""
    if isinstance(noise, str):
        return None, "seeds only", f"seeds only: {noise}"
    if noise is None:
        return None, "seeds only", "seeds only: no predictions for this column's runs" if given else ""
    diffs = []
    for s in seeds:
        a, b = noise.of((preset, s)), noise.of((baseline, s))
        if a is None or b is None:
            missing = f"{preset} seed {s}" if a is None else f"{baseline} seed {s}"
            return None, "seeds only", f"seeds only: no predictions of the baseline's test rows for {missing}"
        if metric not in a or metric not in b:
            return None, "seeds only", "seeds only: the predictions have no subgroup column"
        diffs.append(a[metric] - b[metric])
    if not diffs:
        return None, "seeds only", ""
    return np.mean(diffs, axis=0), "seeds + test set", ""
