"""XAI localization: does a frame-importance map point at the spoofed frames? (DESIGN.md)

On spoofed utterances with frame ground truth (frame label 1 = spoofed, 0 = bonafide, -1 unknown):

- ``loc_auroc`` / ``loc_ap``: AUROC and average precision of w(t) against spoof frames, frames
  of all spoofed utterances pooled (sklearn);
- ``loc_auroc_utt``: mean per-utterance AUROC over partially spoofed utterances (both classes);
- ``pointing_game``: fraction of partially spoofed utterances whose top frame is spoofed; with
  tied top importances the first of them (``argmax``) decides, where Quantus' PointingGame
  scores a hit when *any* tied top frame is in the ground truth (higher on flat maps);
- ``relevance_mass``: mean over those of sum of w inside the spoof intervals / sum of w.

The utterance spoof score of an importance map is the mean of its top 10 % importances.
"""

from __future__ import annotations

import numpy as np


def importance_score(w: np.ndarray, top_fraction: float = 0.1) -> float:
    """Mean of the top ``top_fraction`` of the importances (at least one frame)."""
    w = np.asarray(w, dtype=np.float64)
    if len(w) == 0:
        return float("nan")
    k = max(1, int(round(top_fraction * len(w))))
    return float(np.sort(w)[-k:].mean())


def localization_metrics(importances, frame_labels, labels) -> dict:
    """See the module docstring; ``importances`` and ``frame_labels`` are lists of per-utterance arrays."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    pooled_w, pooled_y, utt_auc, pointing, mass = [], [], [], [], []
    for w, fl, lab in zip(importances, frame_labels, labels):
        w, fl = np.asarray(w, dtype=np.float64), np.asarray(fl)
        if int(lab) != 1:
            continue
        known = fl >= 0
        if not known.any():
            continue
        w, fl = w[known], fl[known]
        pooled_w.append(w)
        pooled_y.append(fl)
        if 0 < fl.sum() < len(fl):
            utt_auc.append(roc_auc_score(fl, w))
            pointing.append(float(fl[int(np.argmax(w))] == 1))
            mass.append(float(w[fl == 1].sum() / max(w.sum(), 1e-12)))
    out = {"loc_utterances": len(pooled_w), "loc_partial_utterances": len(utt_auc)}
    if pooled_w:
        y, s = np.concatenate(pooled_y), np.concatenate(pooled_w)
        both = 0 < y.sum() < len(y)
        out["loc_auroc"] = float(roc_auc_score(y, s)) if both else float("nan")
        out["loc_ap"] = float(average_precision_score(y, s)) if both else float("nan")
        out["loc_spoof_fraction"] = float(y.mean())
    else:
        out.update(loc_auroc=float("nan"), loc_ap=float("nan"), loc_spoof_fraction=float("nan"))
    out["loc_auroc_utt"] = float(np.mean(utt_auc)) if utt_auc else float("nan")
    out["pointing_game"] = float(np.mean(pointing)) if pointing else float("nan")
    out["relevance_mass"] = float(np.mean(mass)) if mass else float("nan")
    return out
