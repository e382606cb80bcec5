"""Binary detection metrics (DESIGN.md, "Metric definitions").

Labels ``y`` are 0 (real) or 1 (fake); ``p`` is the probability of fake, ``p = sigmoid(score)``;
the decision is fake when ``p >= threshold`` (0.5 by default).

- ``auc``: area under the ROC curve; ``ap``: average precision (area under the PR curve).
- ``eer``: equal error rate, the error where FPR = FNR on the ROC curve.  The ROC curve is the
  step-free polyline through the operating points of :func:`sklearn.metrics.roc_curve`; the EER
  is read off where ``FNR - FPR`` changes sign, linearly interpolated between the two nearest
  points (exact when an operating point has FPR = FNR).
- ``eer_asvspoof``: the EER as the ASVspoof challenges' ``eval_metric.compute_eer`` computes it
  (used by SSL_Anti-spoofing and PartialSpoof): reported beside ``eer`` for audio.
- ``acc``, ``f1``, ``precision``, ``recall`` (TPR), ``specificity`` (TNR) and the counts
  ``tp, fp, tn, fn`` at the threshold.
- ``video_auc``: AUC over videos, a video (one ``identity``) scored by the mean probability of
  its frames and labelled by its frames' common label.
- ``is_degenerate``: every sample gets one decision at the threshold; :func:`featcache.metrics.all_metrics`
  reports it as ``degenerate`` and adds a remark, since the fairness metrics of such a detector
  are 0 by construction.
- ``is_one_sided``: not degenerate, but the decisions at the threshold are nearly all one way: fewer
  than ``ONE_SIDED_RATIO`` (1/4) of the fakes' share of the samples is predicted fake (or the same
  for real).  A detector whose scores shrank towards the threshold (CVaR and other worst-case
  objectives do this on small data) keeps its AUC, but its accuracy and rate-based fairness metrics
  then measure where the threshold sits more than how fair it is.

EER conventions (on the same untied inputs, ``eer_asvspoof`` and ``eer`` differ by at most
0.25 / min(n_pos, n_neg); the DeepfakeBench value by several times 1 / min(n_pos, n_neg) on small sets):

- featcache ``eer``: the interpolated crossing above; a continuous function of the ROC curve.
- ASVspoof (``eer_asvspoof``): rows sorted by score, one operating point after each row (tied
  scores are not merged: the bona fide rows of a tie come first, as in the reference), the first
  point nearest to FNR = FPR, and the mean of its FNR and FPR.
- DeepfakeBench / PG-FDD: the FPR (not the mean) at the point of sklearn's default ROC curve
  (``drop_intermediate=True``) nearest to FNR = FPR; not computed here.

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


def eer_asvspoof(y, p) -> float:
    """EER by the ASVspoof ``eval_metric`` rule (nearest point, averaged); nan with one class.

    ASVspoof scores bona fide (real) high; here that score is ``-p``.  The rows are sorted by
    it, ascending, bona fide first among tied scores (the reference sorts the concatenation
    [bona fide; spoof] with a stable sort).  Point k (k = 0..n) rejects the first k rows:
    FRR_k = bona fide rejected / n_real (featcache's FPR: reals flagged as fake) and
    FAR_k = spoofs accepted / n_fake (FNR).  The EER is (FRR_k + FAR_k) / 2 at the first k that
    minimises |FRR_k - FAR_k|.  See the module docstring for how it differs from :func:`eer`.
    """
    y, p = check_binary(y, p)
    if _one_class(y):
        return NAN
    order = np.lexsort((y, -p))  # bona fide score -p ascending; real (0) before fake among ties
    fake = y[order]
    n_fake = int(fake.sum())
    n_real = len(fake) - n_fake
    real_rejected = np.r_[0, np.cumsum(1 - fake)]
    fake_rejected = np.r_[0, np.cumsum(fake)]
    frr = real_rejected / n_real
    far = (n_fake - fake_rejected) / n_fake
    k = int(np.argmin(np.abs(frr - far)))
    return float((frr[k] + far[k]) / 2)


def is_degenerate(p, threshold: float = 0.5) -> bool:
    """True when every sample gets the same decision at ``threshold`` (all fake or all real).

    Such a detector has FPR = TPR = 1 (or 0) in every subgroup, so every fairness metric is 0
    by construction: "perfectly fair" by a detector that does not detect.
    """
    pred = np.asarray(p, dtype=np.float64) >= threshold
    return bool(pred.all() or not pred.any())


#: :func:`is_one_sided`'s bound: predicted fake rate under this share of the fake rate (or the same for real).
ONE_SIDED_RATIO = 0.25


def is_one_sided(y, p, threshold: float = 0.5, ratio: float = ONE_SIDED_RATIO) -> bool:
    """True when, without being degenerate, fewer than ``ratio`` x (the fraction of fakes) of the
    samples are predicted fake, or fewer than ``ratio`` x (the fraction of reals) predicted real."""
    y = np.asarray(y)
    pred = np.asarray(p, dtype=np.float64) >= threshold
    if len(y) == 0 or pred.all() or not pred.any():
        return False
    fake, predicted = float(np.mean(y == 1)), float(np.mean(pred))
    return bool(predicted < ratio * fake or (1.0 - predicted) < ratio * (1.0 - fake))


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
