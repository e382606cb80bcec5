"""Binary detection metrics (DESIGN.md, "Metric definitions").

Labels ``y`` are 0 (real) or 1 (fake); ``p`` is the probability of fake, ``p = sigmoid(score)``;
the decision is fake when ``p >= threshold`` (0.5 by default).

- ``auc``: area under the ROC curve; ``ap``: average precision (area under the PR curve).
- ``eer``: equal error rate, the error where FPR = FNR on the ROC curve.  The ROC curve is the
  step-free polyline through the operating points of :func:`sklearn.metrics.roc_curve`; the EER
  is read off where ``FNR - FPR`` changes sign, linearly interpolated between the two nearest
  points (exact when an operating point has FPR = FNR).
- ``acc``, ``f1``, ``precision``, ``recall`` (TPR), ``specificity`` (TNR) and the counts
  ``tp, fp, tn, fn`` at the threshold.
- ``video_auc``: AUC over videos, a video (one ``identity``) scored by the mean probability of
  its frames and labelled by its frames' common label.

A value that is undefined (AUC with one class present, precision with no predicted fakes, ...)
is ``nan``.  All values are plain Python floats (counts are ints) so they serialize to JSON.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

NAN = float("nan")


def sigmoid(score) -> np.ndarray:
    """Numerically stable logistic function, as a float64 array."""
    return expit(np.asarray(score, dtype=np.float64))


def check_binary(y, p, name: str = "p") -> tuple[np.ndarray, np.ndarray]:
    """Validate labels in {0, 1} and probabilities in [0, 1] of equal length; return arrays."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y and {name} must be 1-D; got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y and {name} differ in length: {len(y)} != {len(p)}")
    if len(y) == 0:
        raise ValueError("no samples: y is empty")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"labels must be 0 or 1; got dtype {y.dtype}") from None
    if not np.isin(yf, (0.0, 1.0)).all():
        bad = np.unique(y[~np.isin(yf, (0.0, 1.0))])[:5]
        raise ValueError(f"labels must be 0 or 1; found {bad.tolist()}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must hold finite probabilities in [0, 1]")
    return yf.astype(np.int64), p


def _one_class(y: np.ndarray) -> bool:
    return len(np.unique(y)) < 2


def auc(y, p) -> float:
    """ROC AUC; nan when only one class is present."""
    y, p = check_binary(y, p)
    return NAN if _one_class(y) else float(roc_auc_score(y, p))


def eer(y, p) -> float:
    """Equal error rate (see module docstring); nan when only one class is present."""
    y, p = check_binary(y, p)
    if _one_class(y):
        return NAN
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (nothing flagged), ends at -1 (everything flagged)
    i = int(np.argmax(diff <= 0))
    if diff[i] == 0:
        return float(fpr[i])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def _ratio(num: int, den: int) -> float:
    return num / den if den else NAN


def detection_metrics(y, p, threshold: float = 0.5) -> dict:
    """AUC, AP, EER and the threshold metrics (see module docstring) as a dict of floats/ints."""
    y, p = check_binary(y, p)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    one = _one_class(y)
    return {
        "auc": NAN if one else float(roc_auc_score(y, p)),
        "ap": NAN if one else float(average_precision_score(y, p)),
        "eer": eer(y, p),
        "acc": (tp + tn) / len(y),
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=np.nan)),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def video_scores(y, p, identity) -> pd.DataFrame:
    """One row per identity (index): ``label`` and ``p`` (mean frame probability), ``n_frames``.

    Rows whose identity is missing (None, NaN or an empty string) are left out.  An identity
    whose frames carry both labels is an error.
    """
    y, p = check_binary(y, p)
    ident = pd.Series(np.asarray(identity, dtype=object))
    if ident.ndim != 1 or len(ident) != len(y):
        raise ValueError(f"identity must be 1-D with one entry per sample; got {len(ident)} for {len(y)} samples")
    known = (ident.notna() & (ident.astype(str).str.strip() != "")).to_numpy()
    df = pd.DataFrame({"identity": ident[known].astype(str).to_numpy(), "y": y[known], "p": p[known]})
    g = df.groupby("identity", sort=True)
    out = g.agg(label=("y", "first"), p=("p", "mean"), n_frames=("y", "size"), n_labels=("y", "nunique"))
    mixed = out.index[out["n_labels"] > 1]
    if len(mixed):
        raise ValueError(f"identities with both real and fake frames: {list(mixed[:5])}; a video has one label")
    return out.drop(columns="n_labels")


def video_auc(y, p, identity) -> float:
    """AUC over videos scored by mean frame probability; nan when fewer than two classes of video."""
    v = video_scores(y, p, identity)
    if len(v) == 0 or v["label"].nunique() < 2:
        return NAN
    return float(roc_auc_score(v["label"].to_numpy(), v["p"].to_numpy()))
