"""Cascade rates of a fast filter in front of a detector (DESIGN.md, "Metric definitions").

``p`` is the filter's probability of fake.  At threshold ``t`` a sample stops at stage 1 as
"simple real" when ``1 - p >= t``; the others go on to stage 2.

- ``filtration`` = stopped / all
- ``leakage`` = stopped fakes / all fakes (fakes the detector never sees)
- ``precision`` = stopped reals / stopped (nan when nothing stops)
- ``coverage`` = 1 - filtration (the fraction sent to stage 2)

plus the counts ``n``, ``stopped``, ``stopped_fakes``, ``fakes``.  :func:`recommend_threshold`
picks, among candidate thresholds, the one that stops the most samples with leakage within a
budget (ties go to the higher, safer threshold).
"""

from __future__ import annotations

import numpy as np

from .detection import NAN, check_binary


def stopped_mask(p, threshold: float) -> np.ndarray:
    """True where a sample stops at stage 1: ``1 - p >= threshold``."""
    return (1.0 - np.asarray(p, dtype=np.float64)) >= float(threshold)


def cascade_rates(y, p, threshold: float) -> dict:
    """Filtration, leakage, precision and coverage at one threshold (see the module docstring)."""
    y, p = check_binary(y, p)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
    stop = stopped_mask(p, threshold)
    n, stopped = len(y), int(stop.sum())
    fakes = int(y.sum())
    stopped_fakes = int((stop & (y == 1)).sum())
    return {
        "threshold": float(threshold),
        "filtration": stopped / n,
        "leakage": stopped_fakes / fakes if fakes else NAN,
        "precision": (stopped - stopped_fakes) / stopped if stopped else NAN,
        "coverage": 1.0 - stopped / n,
        "n": n,
        "stopped": stopped,
        "stopped_fakes": stopped_fakes,
        "fakes": fakes,
    }


def threshold_analysis(y, p, thresholds) -> list[dict]:
    """:func:`cascade_rates` at each threshold, in the order given."""
    return [cascade_rates(y, p, t) for t in thresholds]


def recommend_threshold(rows: list[dict], max_leakage: float) -> dict | None:
    """The row with the highest filtration whose leakage is at most ``max_leakage``.

    Rows are :func:`cascade_rates` results (``leakage`` nan, with no fakes, counts as 0).
    Ties in filtration go to the higher threshold.  None when no row is within the budget.
    """
    ok = [r for r in rows if (0.0 if np.isnan(r["leakage"]) else r["leakage"]) <= max_leakage]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["filtration"], r["threshold"]))


def default_grid(extra=()) -> np.ndarray:
    """Thresholds for trade-off curves: 0.50 to 0.99 by 0.01, 0.995, 0.999, and ``extra``."""
    grid = np.concatenate([np.round(np.arange(0.50, 0.9901, 0.01), 4), [0.995, 0.999], np.asarray(extra, float)])
    return np.unique(grid)
