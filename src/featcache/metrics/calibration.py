"""Calibration of the positive-class (fake) probability (DESIGN.md, "Metric definitions").

- Bins: ``n_bins`` (15) equal-width bins on [0, 1]; bin b holds ``lo <= p < hi``, the last bin
  also holds p = 1.
- ``ece``: Σ_b (count_b / n) · |frac_pos_b − mean_p_b| over the bins (empty bins weigh 0).
- ``mce``: max_b |frac_pos_b − mean_p_b| over the non-empty bins.
- ``brier``: mean (p − y)².
- ``nll``: binary cross-entropy, mean −[y log p + (1 − y) log(1 − p)], p clipped to
  [1e-7, 1 − 1e-7].
- ``ece_floor`` (:func:`ece_floor`): the ECE a *perfectly calibrated* detector with these
  probabilities would score: the mean ECE of ``n_draws`` (200) label sets drawn as
  Bernoulli(p) from the run's own p, seeded.  The plug-in ECE is biased upward by roughly
  sqrt(bins / n) (a calibrated detector averages 0.095 at n = 152, 0.038 at 1,000): an ECE near
  its floor is as calibrated as this many samples can show; compare presets on ``ece - ece_floor``
  (or on Brier/NLL, unbiased means), not on raw ECE.

Convention: the bins are [lo, hi) on P(fake) itself, against the fraction of fakes (the
"positive-class" reliability diagram).  Guo et al. (2017) bin the top-label confidence
max(p, 1 − p) against the accuracy of the predicted label; on a binary detector the two ECEs
differ (a bin here mixes predictions of both classes, theirs folds p and 1 − p together).

Temperature scaling: p = sigmoid(score / T).  :func:`fit_temperature` minimises the NLL over
T ∈ [0.1, 10] with L-BFGS-B from T = 1 (the NLL is smooth; it is computed from logits, without
clipping, with its analytic gradient).  With ``objective="ece"`` (piecewise constant in T, so no
gradient) it evaluates the ECE on a grid of 101 log-spaced temperatures in [0.1, 10] and refines
the best one with a bounded Brent search (``scipy.optimize.minimize_scalar``) between its grid
neighbours.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import log_loss

from .detection import check_binary, sigmoid

EPS = 1e-7
T_BOUNDS = (0.1, 10.0)


def _check_bins(n_bins) -> int:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def reliability_bins(y, p, n_bins: int = 15) -> pd.DataFrame:
    """Per bin: ``lo``, ``hi``, ``count``, ``mean_p``, ``frac_pos``, ``gap`` (nan in empty bins)."""
    y, p = check_binary(y, p)
    n_bins = _check_bins(n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="right")
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=y, minlength=n_bins) / count
    return pd.DataFrame({
        "lo": edges[:-1], "hi": edges[1:], "count": count,
        "mean_p": mean_p, "frac_pos": frac_pos, "gap": np.abs(frac_pos - mean_p),
    })


def _ece(bins: pd.DataFrame) -> float:
    filled = bins[bins["count"] > 0]
    return float((filled["count"] * filled["gap"]).sum() / filled["count"].sum())


def calibration_metrics(y, p, n_bins: int = 15) -> dict:
    """``ece``, ``mce``, ``brier``, ``nll`` (see module docstring) as plain floats."""
    y, p = check_binary(y, p)
    bins = reliability_bins(y, p, n_bins)
    return {
        "ece": _ece(bins),
        "mce": float(bins["gap"].max()),  # empty bins (nan gap) are skipped
        "brier": float(np.mean((p - y) ** 2)),
        "nll": float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1])),
    }


def ece_draws(p, *, n_draws: int = 200, seed: int = 0, n_bins: int = 15) -> np.ndarray:
    """``(n_draws,)`` ECEs of ``p`` against labels drawn as Bernoulli(p) (seeded), all at once."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or not len(p) or not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be a non-empty 1-D array of probabilities in [0, 1]")
    if int(n_draws) != n_draws or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer; got {n_draws!r}")
    n_bins = _check_bins(n_bins)
    idx = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p, side="right")  # reliability_bins' bins
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    y = np.random.default_rng(seed).random((int(n_draws), len(p))) < p
    offsets = (np.arange(int(n_draws)) * n_bins)[:, None]
    sum_y = np.bincount((idx + offsets)[y], minlength=int(n_draws) * n_bins).reshape(int(n_draws), n_bins)
    # Σ_b (count_b / n) |frac_pos_b - mean_p_b| = Σ_b |sum_y_b - sum_p_b| / n
    return np.abs(sum_y - sum_p).sum(1) / count.sum()


def ece_floor(p, *, n_draws: int = 200, seed: int = 0, n_bins: int = 15) -> float:
    """The mean ECE of labels redrawn as Bernoulli(p) (see the module docstring)."""
    return float(ece_draws(p, n_draws=n_draws, seed=seed, n_bins=n_bins).mean())


def _nll_and_grad(t: np.ndarray, score: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = score / t[0]
    nll = np.mean(np.logaddexp(0.0, z) - y * z)
    grad = np.mean((sigmoid(z) - y) * (-score / t[0] ** 2))
    return float(nll), np.array([grad])


def fit_temperature(score, y, objective: str = "nll") -> float:
    """Temperature T in [0.1, 10] minimising the NLL (or ECE) of ``sigmoid(score / T)``."""
    score = np.asarray(score, dtype=np.float64)
    if not np.isfinite(score).all():
        raise ValueError("score must be finite")
    y, _ = check_binary(y, sigmoid(score), name="score")
    lo, hi = T_BOUNDS
    if objective == "nll":
        res = minimize(_nll_and_grad, x0=np.array([1.0]), args=(score, y), jac=True,
                       method="L-BFGS-B", bounds=[T_BOUNDS])
        return float(np.clip(res.x[0], lo, hi))
    if objective == "ece":
        grid = np.geomspace(lo, hi, 101)
        def ece_at(t: float) -> float:
            return _ece(reliability_bins(y, sigmoid(score / t)))

        values = [ece_at(t) for t in grid]
        i = int(np.argmin(values))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = minimize_scalar(ece_at, bounds=(a, b), method="bounded")
        best = res.x if res.fun <= values[i] else grid[i]
        return float(np.clip(best, lo, hi))
    raise ValueError(f"objective must be 'nll' or 'ece'; got {objective!r}")
