"""Operating points: the decision threshold chosen on the validation split (issue 23, item 3).

Every F_* and ACC is reported at P(fake) >= 0.5 (PG-FDD's convention).  That couples the
fairness metrics to where a detector's scores sit: a detector and the same detector minus one
logit have identical rankings but different F_FPR at 0.5.  Beside it, each evaluation reports
the rates and fairness metrics at a threshold chosen on the run's *validation* predictions by
the config key ``evaluation.threshold``:

- ``0.5``: no second operating point.
- ``val_eer``: the threshold of the validation ROC point nearest to FPR = FNR (the highest such
  threshold when several are equally near).  The candidates are the validation P(fake) values
  themselves (``sklearn.metrics.roc_curve`` without dropping points), plus "above every value".
- ``val_fpr=<x>``: the lowest threshold whose validation FPR (reals flagged as fake) is at most
  ``x``, e.g. ``val_fpr=0.05``.

Both rules depend on the validation scores' order only, so a threshold moves with a monotone
change of the scores: a detector shifted by one logit gets the threshold shifted by one logit
and the same decisions, hence the same fairness metrics at that threshold (score-shift
invariance; tested against a brute-force loop).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from ..config import ConfigError
from .detection import check_binary, detection_metrics
from .fairness import fairness_metrics

#: The rule when a run's config has no ``evaluation.threshold``.
DEFAULT_RULE = "val_eer"
#: The threshold of the headline metrics (acc, F_*).
HEADLINE = 0.5


def parse_rule(value) -> tuple[str, float | None]:
    """``0.5`` -> ("0.5", 0.5); ``val_eer`` -> ("val_eer", None); ``val_fpr=0.05`` -> ("val_fpr", 0.05)."""
    text = str(DEFAULT_RULE if value is None else value).strip()
    hint = "evaluation.threshold must be 0.5, val_eer or val_fpr=<x> with 0 <= x <= 1 (e.g. val_fpr=0.05)"
    if text == "val_eer":
        return "val_eer", None
    if text.startswith("val_fpr="):
        try:
            x = float(text.split("=", 1)[1])
        except ValueError:
            raise ConfigError(f"{hint}; got {value!r}") from None
        if not 0.0 <= x <= 1.0:
            raise ConfigError(f"{hint}; got {value!r}")
        return "val_fpr", x
    try:
        t = float(text)
    except ValueError:
        raise ConfigError(f"{hint}; got {value!r}") from None
    if t != HEADLINE:
        raise ConfigError(f"{hint}; got {value!r} (the headline metrics are at 0.5 already)")
    return "0.5", HEADLINE


def rule_name(value) -> str:
    """The rule as written in metrics.json: ``0.5``, ``val_eer`` or ``val_fpr=0.05``."""
    kind, x = parse_rule(value)
    return f"val_fpr={x:g}" if kind == "val_fpr" else kind


def choose_threshold(y, p, rule) -> float:
    """The threshold ``rule`` (see the module docstring) picks on validation labels ``y`` and P(fake) ``p``.

    "Above every value" is returned as the next float above ``max(p)``.  Raises ``ValueError`` when
    the validation predictions hold one class only (no ROC curve).
    """
    kind, x = parse_rule(rule)
    if kind == "0.5":
        return HEADLINE
    y, p = check_binary(y, p)
    if len(np.unique(y)) < 2:
        raise ValueError("the validation predictions hold one class only: no ROC curve to choose a threshold on")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)  # thresholds descending, the first above all
    if kind == "val_eer":
        i = int(np.argmin(np.abs((1.0 - tpr) - fpr)))  # the first: the highest threshold among equally near
    else:
        i = int(np.flatnonzero(fpr <= x + 1e-12)[-1])  # FPR grows as the threshold falls
    if i == 0:
        return float(np.nextafter(p.max(), np.inf))
    return float(thresholds[i])


def operating_point(y, p, threshold: float, groups=None) -> dict:
    """``threshold`` and, at it, ``acc``, ``fpr``, ``tpr`` and (with ``groups``) the fairness metrics."""
    d = detection_metrics(y, p, threshold)
    out = {"threshold": float(threshold), "acc": d["acc"],
           "fpr": 1.0 - d["specificity"] if d["specificity"] == d["specificity"] else float("nan"),
           "tpr": d["recall"]}
    if groups is not None:
        out.update(fairness_metrics(y, p, groups, threshold))
    return out


__all__ = ["DEFAULT_RULE", "HEADLINE", "choose_threshold", "operating_point", "parse_rule", "rule_name"]
