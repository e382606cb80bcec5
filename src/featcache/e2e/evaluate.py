"""``featcache evaluate RUN --manifest M`` for a train-e2e filter run.

Writes into ``RUN/eval_<split>/`` (or ``eval_<name>_<split>/``):

- ``evaluation_report.json``: AUC, AP, EER, F1, accuracy, precision, recall, specificity, the
  confusion matrix, ECE, MCE, Brier, NLL (with the fitted temperature when the run has one; the
  uncalibrated calibration metrics beside them), per-subgroup rates and the fairness metrics
  when the manifest has demographics;
- ``threshold_analysis.json``: the cascade rates at each threshold (filtration, leakage,
  precision of what stops, coverage; :mod:`featcache.metrics.cascade`);
- ``roc_curve.png``, ``confusion_matrix.png``, ``reliability_diagram.png``, ``cascade_analysis.png``;
- ``predictions.csv`` with ``save_predictions``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..metrics import all_metrics, calibration_metrics, reliability_bins, subgroup_table
from ..metrics.cascade import default_grid, threshold_analysis
from ..metrics.detection import sigmoid
from ..train.trainer import write_json
from .mnv4 import FilterRun

DEFAULT_THRESHOLDS = (0.9, 0.95, 0.98, 0.99)


def evaluate_e2e(run_dir, manifest, *, split: str = "test", thresholds=DEFAULT_THRESHOLDS, name: str | None = None,
                 save_predictions: bool = False, device=None, batch_size: int = 64, num_workers: int = 0,
                 progress: bool = True) -> dict:
    """Evaluate the filter on ``split`` of ``manifest``; write the files above; return the report."""
    from ..errors import FeatcacheError
    from ..report.plots import plot_cascade, plot_confusion, plot_reliability, plot_roc, plot_subgroup_rates

    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise FeatcacheError(f"--thresholds must be numbers in [0, 1]; got {thresholds}")
    run_dir = Path(run_dir)
    filt = FilterRun(run_dir, device)
    preds = filt.predict(manifest, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
    y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
    temperature = filt.temperature or 1.0
    p = sigmoid(score / temperature)
    groups = preds["subgroup"].to_numpy()
    has_groups = bool((groups >= 0).any())
    metrics = all_metrics(y, score / temperature, groups=groups if has_groups else None)
    report = {"run": str(run_dir), "split": split, "n": int(len(y)), "temperature": filt.temperature,
              "metrics": metrics,
              "confusion_matrix": {"rows": "true real, fake", "columns": "predicted real, fake",
                                   "matrix": [[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]]}}
    if filt.temperature is not None:
        report["uncalibrated"] = calibration_metrics(y, sigmoid(score))
    tag = f"{name}_{split}" if name else split
    out = run_dir / f"eval_{tag}"
    out.mkdir(exist_ok=True)
    if has_groups:
        table = subgroup_table(y, p, groups)
        report["subgroups"] = table.to_dict(orient="records")
        plot_subgroup_rates(table, out / "subgroup_rates.png", f"filter, {tag}")
    rows = threshold_analysis(y, p, thresholds)
    write_json(out / "threshold_analysis.json", {"split": split, "temperature": filt.temperature,
                                                 "rule": "stop as real when 1 - P(fake) >= t", "thresholds": rows})
    report["threshold_analysis"] = rows
    write_json(out / "evaluation_report.json", report)

    plot_roc(y, p, out / "roc_curve.png", f"filter, {tag}")
    plot_confusion(metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"], out / "confusion_matrix.png",
                   f"filter, {tag} (P(fake) >= 0.5)")
    cal_name = f"T = {temperature:.3f}" if filt.temperature is not None else "uncalibrated"
    plot_reliability([(f"{tag}, {cal_name}", reliability_bins(y, p), metrics)], out / "reliability_diagram.png")
    curve = pd.DataFrame(threshold_analysis(y, p, default_grid(thresholds)))
    plot_cascade(curve[["threshold", "filtration", "leakage", "precision"]], out / "cascade_analysis.png",
                 marks=thresholds, title=f"filter as stage 1, {tag}")
    if save_predictions:
        preds.assign(prob=p).to_csv(out / "predictions.csv", index=False)
    report["out"] = str(out)
    return report


def is_e2e_run(run_dir) -> bool:
    """True when ``run_dir`` holds a train-e2e run (its model.json names the mnv4 task)."""
    import json

    spec = Path(run_dir) / "model.json"
    if not spec.is_file():
        return False
    try:
        return json.loads(spec.read_text()).get("task") == "mnv4"
    except (ValueError, AttributeError):
        return False


__all__ = ["DEFAULT_THRESHOLDS", "evaluate_e2e", "is_e2e_run"]
