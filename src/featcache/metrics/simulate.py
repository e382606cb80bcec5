"""Seeded predictions tables with known truth, for checking the statistics by simulation.

The generators of the statistics review (its appendix):

- :func:`clustered_binormal`: identities of 1-5 rows, score = δ·y + u_cluster + e with
  Var(u) = ``icc``, Var(u) + Var(e) = 1, p = sigmoid(score); the true AUC is Φ(δ/√2).
  ``mixed=False``: every identity is all real or all fake (label-pure); ``True``: each row's
  label drawn inside its identity.
- :func:`subgroup_scores`: 8 subgroups with the review's shares, half real and half fake, reals
  scoring N(μ0_g, 1) and fakes N(μ1_g, 1) as logits; the true FPR_g = Φ(μ0_g − logit(threshold))
  and TPR_g = Φ(μ1_g − logit(threshold)), so the true gaps follow (:func:`true_gaps`).
  :func:`subgroup_design` is that design's subgroup codes and labels alone.
- :func:`seed_ablation`: the review's seed model (its §3 model 2): two presets, ``k`` seeds, one
  shared test set; row score = (μ + τ·z_seed)·y + a_row + b_run,row (+ γ_row for the preset: an
  interaction with the samples shared by all its seeds). :func:`seed_ablation_truth` is the
  population AUC difference averaged over the seed effect.

Written once for the tests (``tests/test_statistics.py``, ``tests/test_compare.py``) and the
benchmarks (``benchmarks/bench_stats.py``, ``benchmarks/bench_verdicts.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from .fairness import fairness_from_counts

#: The review's subgroup shares (8 subgroups, as FF++'s gender x race).
SHARES = (0.30, 0.20, 0.12, 0.10, 0.08, 0.08, 0.06, 0.06)
#: Zero disparity: every subgroup's reals at −1 and fakes at +1 (FPR 0.16, TPR 0.84 everywhere).
ZERO = ((-1.0,) * 8, (1.0,) * 8)
#: The review's moderate disparity (true F_FPR 40.6, F_MEO 17.7).
MODERATE = ((-1.0, -1.3, -0.7, -1.1, -0.8, -1.2, -0.6, -0.9), (1.0, 0.7, 1.3, 0.9, 1.2, 0.8, 1.4, 1.1))
#: The review's large disparity: twice the moderate spread around −1 / +1.
LARGE = tuple(tuple(c + 2 * (m - c) for m in row) for c, row in zip((-1.0, 1.0), MODERATE))


def clustered_binormal(n: int, auc: float, rng: np.random.Generator, *, icc: float = 0.3,
                       mixed: bool = False, max_size: int = 5) -> pd.DataFrame:
    """``label``, ``prob``, ``identity`` of ``n`` rows in clusters of 1..``max_size`` rows (see
    the module docstring; the true AUC is ``auc``)."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, max_size + 1)))
    sizes[-1] -= sum(sizes) - n
    identity = np.repeat(np.arange(len(sizes)), sizes)
    y = rng.integers(0, 2, n) if mixed else rng.integers(0, 2, len(sizes))[identity]
    delta = np.sqrt(2) * norm.ppf(auc)
    score = delta * y + rng.normal(0, np.sqrt(icc), len(sizes))[identity] + rng.normal(0, np.sqrt(1 - icc), n)
    return pd.DataFrame({"label": y, "prob": 1 / (1 + np.exp(-score)), "identity": identity})


def _sizes(n: int, shares=SHARES) -> np.ndarray:
    return np.maximum(4, np.round(n * np.asarray(shares))).astype(int)


def subgroup_design(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Subgroup codes and labels of the review's 8-subgroup design: max(4, round(n·share)) rows a
    subgroup, half real (the first half), half fake."""
    sizes = _sizes(n)
    g = np.repeat(np.arange(len(sizes)), sizes)
    y = np.concatenate([np.r_[np.zeros(s // 2, int), np.ones(s - s // 2, int)] for s in sizes])
    return g, y


def subgroup_scores(n: int, rng: np.random.Generator, mu=ZERO, shift: float = 0.0) -> pd.DataFrame:
    """``label``, ``prob``, ``subgroup`` of about ``n`` rows (one row per person: no clusters);
    ``shift`` is added to every logit (the review's detector B is ``shift=-1``)."""
    g, y = subgroup_design(n)
    mu = np.asarray(mu)
    logit = rng.normal(mu[y, g], 1.0) + shift
    return pd.DataFrame({"label": y, "prob": 1 / (1 + np.exp(-logit)), "subgroup": g})


def true_gaps(n: int, mu=ZERO, shift: float = 0.0, threshold: float = 0.5) -> dict[str, float]:
    """The population F_* of :func:`subgroup_scores` (its subgroup and class sizes, exact rates)."""
    sizes = _sizes(n)
    reals, fakes = sizes // 2, sizes - sizes // 2
    cut = np.log(threshold / (1 - threshold)) - shift
    fpr, tpr = norm.sf(cut - np.asarray(mu[0])), norm.sf(cut - np.asarray(mu[1]))
    counts = np.stack([reals * (1 - fpr), reals * fpr, fakes * (1 - tpr), fakes * tpr], axis=1)
    return {k: float(v[0]) for k, v in fairness_from_counts(counts.reshape(1, -1)).items()}


def _rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC from ranks (continuous scores: no ties)."""
    r = rankdata(p)
    n1 = y.sum()
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def seed_ablation(rng: np.random.Generator, k: int, *, n: int = 400, mu: float = 1.8, tau: float = 0.08,
                  var_gamma: float = 0.15, rho: float = 0.5) -> tuple[pd.DataFrame, dict]:
    """Presets ``none`` (the baseline) and ``x`` over ``k`` seeds on one test set of ``n`` balanced
    rows (see the module docstring): per row a (shared difficulty, variance 0.5), b (per-run noise,
    variance 0.5, a share ``rho`` shared by the presets of a seed), z (the seed effect, likewise),
    γ (``x`` only, variance ``var_gamma``). Returns the ablation table (``preset``, ``seed``,
    ``test_auc``) and each run's predictions ``{(preset, seed): DataFrame}``."""
    y = np.repeat([0, 1], n // 2)
    a = rng.normal(0, np.sqrt(0.5), n)
    gamma = rng.normal(0, np.sqrt(var_gamma), n)
    rows, tables = [], {}
    for s in range(k):
        c, c_rows = rng.normal(), rng.normal(size=n)
        for preset in ("none", "x"):
            z = np.sqrt(rho) * c + np.sqrt(1 - rho) * rng.normal()
            b = np.sqrt(0.5) * (np.sqrt(rho) * c_rows + np.sqrt(1 - rho) * rng.normal(size=n))
            p = 1 / (1 + np.exp(-((mu + tau * z) * y + a + b + (gamma if preset == "x" else 0.0))))
            rows.append({"preset": preset, "seed": s, "test_auc": _rank_auc(y, p)})
            tables[(preset, s)] = pd.DataFrame({"sample_id": np.arange(n), "label": y, "prob": p})
    return pd.DataFrame(rows), tables


def seed_ablation_truth(*, mu: float = 1.8, tau: float = 0.08, var_gamma: float = 0.15) -> float:
    """E_z AUC(x) − E_z AUC(none) of :func:`seed_ablation`, Gauss–Hermite (60 nodes) over z ~ N(0, 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()

    def mean_auc(var):
        return float((w * norm.cdf((mu + tau * x) / np.sqrt(2 * var))).sum())

    return mean_auc(1.0 + var_gamma) - mean_auc(1.0)
