"""``featcache calibrate``: temperature scaling of the filter, fitted on a split (val).

p = sigmoid(score / T); T fitted by :func:`featcache.metrics.fit_temperature` (L-BFGS-B in
[0.1, 10], objective ``nll`` or ``ece``).  Writes into the run:

- ``calibration_temp.json``: temperature, objective, split, n;
- ``calibration_metrics.json``: ECE, MCE, Brier, NLL before (T = 1) and after;
- ``plots/reliability_diagram.png``: before and after;
- ``calibrated_predictions.csv``: sample_id, label, score, prob (T = 1), prob_calibrated, ...

Later ``evaluate`` and ``cascade`` use the temperature.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FeatcacheError
from ..metrics import calibration_metrics, fit_temperature, reliability_bins
from ..metrics.detection import sigmoid
from ..report.plots import plot_reliability
from ..runtime import write_json
from .mnv4 import FilterRun

OBJECTIVES = ("nll", "ece")


def calibrate_run(run_dir, manifest, *, split: str = "val", objective: str = "nll", device=None,
                  batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> dict:
    """Fit the run's temperature on ``split`` of ``manifest``; write the files; return the report."""
    if objective not in OBJECTIVES:
        raise FeatcacheError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    run_dir = Path(run_dir)
    filt = FilterRun(run_dir, device)
    filt.temperature = None  # fit from the raw logits, whatever was fitted before
    preds = filt.predict(manifest, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
    y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
    if len(set(y.tolist())) < 2:
        raise FeatcacheError(f"split {split} holds only one class; calibration needs real and fake samples")
    t = fit_temperature(score, y, objective=objective)
    p0, p1 = sigmoid(score), sigmoid(score / t)
    before, after = calibration_metrics(y, p0), calibration_metrics(y, p1)
    write_json(run_dir / "calibration_temp.json", {"temperature": t, "objective": objective, "split": split,
                                                    "n": int(len(y)), "bounds": [0.1, 10.0]})
    report = {"temperature": t, "objective": objective, "split": split, "n": int(len(y)),
              "before": before, "after": after}
    write_json(run_dir / "calibration_metrics.json", report)
    (run_dir / "plots").mkdir(exist_ok=True)
    plot_reliability([("before (T = 1)", reliability_bins(y, p0), before),
                      (f"after (T = {t:.3f})", reliability_bins(y, p1), after)],
                     run_dir / "plots" / "reliability_diagram.png", title=f"calibration on {split} ({objective})")
    out = preds.copy()
    out["prob"] = p0
    out.insert(out.columns.get_loc("prob") + 1, "prob_calibrated", p1)
    out.to_csv(run_dir / "calibrated_predictions.csv", index=False)
    return report
