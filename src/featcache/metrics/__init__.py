"""Metrics shared by the trainer and ``featcache evaluate`` (DESIGN.md, "Metric definitions").

- :mod:`.detection`: AUC, AP, EER, threshold metrics, video-level AUC.
- :mod:`.fairness`: per-subgroup rates and F_FPR, F_EO, F_MEO, F_DP, F_OAE.
- :mod:`.calibration`: ECE, MCE, Brier, NLL, reliability bins, temperature scaling.
- :mod:`.bootstrap`: 95 % bootstrap intervals of the metrics (BCa AUC), what metrics.json holds
  beside them (:func:`~.bootstrap.with_intervals`); paired differences over seeds.
- :mod:`.permutation`: each fairness gap's no-disparity floor and p-value.
- :mod:`.table`: reading a predictions table (labels, probabilities, subgroups, clusters).
- :mod:`.simulate`: seeded predictions with known truth, for checking the statistics.

Every function takes array-likes, raises ``ValueError`` on malformed input and returns plain
Python floats (``nan`` where undefined) so results serialize to JSON; :mod:`.bootstrap` takes a
predictions table and raises :class:`~featcache.errors.FeatcacheError` (a user's file).
"""

from __future__ import annotations

import numpy as np

from .calibration import calibration_metrics, fit_temperature, reliability_bins
from .detection import detection_metrics, eer, eer_asvspoof, is_degenerate, is_one_sided, sigmoid, video_auc
from .fairness import FAIRNESS_KEYS, fairness_metrics, group_rates, subgroup_table
from .permutation import fairness_floor

__all__ = [
    "all_metrics",
    "calibration_metrics",
    "detection_metrics",
    "eer",
    "eer_asvspoof",
    "fairness_floor",
    "is_degenerate",
    "is_one_sided",
    "fairness_metrics",
    "fit_temperature",
    "group_rates",
    "prob_metrics",
    "reliability_bins",
    "remarks",
    "sigmoid",
    "subgroup_table",
    "video_auc",
]


def all_metrics(y, score, groups=None, identity=None, threshold: float = 0.5) -> dict:
    """Flat dict of every metric of a binary detector from its raw scores (``p = sigmoid(score)``).

    Detection (``auc, ap, eer, acc, f1, precision, recall, specificity, tp, fp, tn, fn``) and
    calibration (``ece, mce, brier, nll``) always; ``f_fpr, f_eo, f_meo, f_dp, f_oae`` when
    ``groups`` is given; ``video_auc`` when ``identity`` is given and non-empty.  Also
    ``degenerate`` (bool: every sample got the same decision, see
    :func:`~.detection.is_degenerate`), ``one_sided`` (bool: nearly every sample got one decision,
    :func:`~.detection.is_one_sided`) and ``remarks`` (list of str: why a result is suspicious
    or nan; empty when nothing is).
    """
    score = np.asarray(score, dtype=np.float64)
    if not np.isfinite(score).all():
        raise ValueError("score must be finite (no nan or inf)")
    return prob_metrics(y, sigmoid(score), groups, identity, threshold)


def prob_metrics(y, p, groups=None, identity=None, threshold: float = 0.5) -> dict:
    """:func:`all_metrics` from the probabilities ``p`` = P(fake) themselves (``featcache score``
    reads a detector's P(fake), not its logits)."""
    out = {**detection_metrics(y, p, threshold), **calibration_metrics(y, p)}
    if groups is not None:
        out.update(fairness_metrics(y, p, groups, threshold))
    if identity is not None and len(identity) > 0:
        out["video_auc"] = video_auc(y, p, identity)
    out["degenerate"] = is_degenerate(p, threshold)
    out["one_sided"] = is_one_sided(y, p, threshold)
    out["remarks"] = remarks(out, groups=groups, threshold=threshold)
    return out


#: What the degenerate and one-sided remarks suggest when the training classes are imbalanced.
IMBALANCE_HINT = ("; if the training data are imbalanced, retrain with training.class_balance: sampler "
                  "(README, 'Imbalance')")


def remarks(metrics: dict, groups=None, threshold: float = 0.5) -> list[str]:
    """One sentence per suspicious or undefined result in ``metrics`` (from :func:`all_metrics`)."""
    out = []
    if metrics.get("degenerate"):
        decision = "fake" if metrics.get("tp", 0) + metrics.get("fp", 0) > 0 else "real"
        rate = 1 if decision == "fake" else 0
        fair = [k for k in ("f_fpr", "f_eo", "f_meo", "f_dp") if k in metrics]
        out.append(f"degenerate detector: every sample is predicted {decision} at threshold {threshold:g} "
                   f"(FPR = TPR = {rate} in every subgroup)"
                   + (f"; {', '.join(fair)} are 0 by construction and say nothing about fairness" if fair else "")
                   + IMBALANCE_HINT)
    if metrics.get("one_sided"):
        n = sum(int(metrics.get(k, 0)) for k in ("tp", "fp", "tn", "fn"))
        predicted, fake = metrics.get("tp", 0) + metrics.get("fp", 0), metrics.get("tp", 0) + metrics.get("fn", 0)
        fair = [k for k in FAIRNESS_KEYS if k in metrics]
        out.append(f"one-sided detector: {predicted} of {n} samples are predicted fake at threshold {threshold:g} "
                   f"({fake} are fake); acc" + (f" and {', '.join(fair)}" if fair else "")
                   + " mostly measure where the threshold sits (compare auc, or calibrate the scores)" + IMBALANCE_HINT)
    auc = metrics.get("auc")
    if auc is not None and auc != auc:
        out.append("auc, ap and eer are nan: the labels hold one class only")
    if groups is not None:
        g = np.asarray(groups)
        known = int(len(np.unique(g[g >= 0]))) if len(g) else 0
        undefined = [k for k in FAIRNESS_KEYS if k in metrics and metrics[k] != metrics[k]]
        if known < 2:
            out.append(f"fairness metrics are nan: {known} subgroup(s) with known gender and race "
                       f"({int((g < 0).sum())} of {len(g)} rows unknown); a disparity needs two")
        elif undefined:
            out.append(f"{', '.join(undefined)} nan: fewer than two subgroups hold both classes needed by the rate")
    return out
