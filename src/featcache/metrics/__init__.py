"""Metrics shared by the trainer and ``featcache evaluate`` (DESIGN.md, "Metric definitions").

- :mod:`.detection`: AUC, AP, EER, threshold metrics, video-level AUC.
- :mod:`.fairness`: per-subgroup rates and F_FPR, F_EO, F_MEO, F_DP, F_OAE.
- :mod:`.calibration`: ECE, MCE, Brier, NLL, reliability bins, temperature scaling.

Every function takes array-likes, raises ``ValueError`` on malformed input and returns plain
Python floats (``nan`` where undefined) so results serialize to JSON.
"""

from __future__ import annotations

import numpy as np

from .calibration import calibration_metrics, fit_temperature, reliability_bins
from .detection import detection_metrics, eer, sigmoid, video_auc
from .fairness import fairness_metrics, group_rates, subgroup_table

__all__ = [
    "all_metrics",
    "calibration_metrics",
    "detection_metrics",
    "eer",
    "fairness_metrics",
    "fit_temperature",
    "group_rates",
    "reliability_bins",
    "sigmoid",
    "subgroup_table",
    "video_auc",
]


def all_metrics(y, score, groups=None, identity=None, threshold: float = 0.5) -> dict:
    """Flat dict of every metric of a binary detector from its raw scores (``p = sigmoid(score)``).

    Detection (``auc, ap, eer, acc, f1, precision, recall, specificity, tp, fp, tn, fn``) and
    calibration (``ece, mce, brier, nll``) always; ``f_fpr, f_eo, f_meo, f_dp, f_oae`` when
    ``groups`` is given; ``video_auc`` when ``identity`` is given and non-empty.
    """
    score = np.asarray(score, dtype=np.float64)
    if not np.isfinite(score).all():
        raise ValueError("score must be finite (no nan or inf)")
    p = sigmoid(score)
    out = {**detection_metrics(y, p, threshold), **calibration_metrics(y, p)}
    if groups is not None:
        out.update(fairness_metrics(y, p, groups, threshold))
    if identity is not None and len(identity) > 0:
        out["video_auc"] = video_auc(y, p, identity)
    return out
