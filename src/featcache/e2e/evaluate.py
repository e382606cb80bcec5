"""``featcache evaluate RUN``: any run (a head or the MobileNetV4 filter), into the one layout.

Every evaluation goes through :func:`featcache.train.evaluate.write_evaluation` and writes
``RUN/eval/<name>_<split>/{predictions.csv, metrics.json, report.md, plots/}``. For the filter
the report adds the cascade threshold analysis (filtration, leakage, precision of what stops,
coverage per threshold; :mod:`featcache.metrics.cascade`) and, when the run is calibrated, the
uncalibrated calibration metrics; its plots add the confusion matrix, the reliability diagram
and the cascade curve. The metrics hold AUC, AP, EER, F1, accuracy, precision, recall,
specificity, the confusion counts, ECE, MCE, Brier, NLL (with the fitted temperature when the
run has one), and the fairness metrics when the manifest has demographics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config import load_config
from ..errors import FeatcacheError
from ..heads.task import check_run_dir
from ..metrics import all_metrics, calibration_metrics, reliability_bins
from ..metrics.cascade import default_grid, threshold_analysis
from ..metrics.detection import sigmoid
from ..report.plots import plot_cascade, plot_confusion, plot_reliability
from ..report.tables import markdown_table
from ..train.evaluate import (
    Evaluation,
    check_target,
    evaluate_head,
    resolve_target,
    run_provenance,
    sha256_file,
    write_evaluation,
)
from .mnv4 import TASK, FilterRun
from .train import SUMMARY_KEYS

DEFAULT_THRESHOLDS = (0.9, 0.95, 0.98, 0.99)


def run_task(run_dir) -> str | None:
    """The task a run directory's model.json names (None when there is none)."""
    spec = Path(run_dir) / "model.json"
    if not spec.is_file():
        return None
    try:
        return json.loads(spec.read_text()).get("task")
    except (ValueError, AttributeError):
        return None


def is_e2e_run(run_dir) -> bool:
    """True when ``run_dir`` holds a train-e2e run (its model.json names the mnv4 task)."""
    return run_task(run_dir) == TASK


def evaluate_filter(run_dir, manifest=None, *, split: str = "test", thresholds=DEFAULT_THRESHOLDS,
                    name: str | None = None, device=None, batch_size: int = 64, num_workers: int = 0,
                    progress: bool = True, command: str | None = None, overwrite: bool = False) -> Evaluation:
    """Evaluate the filter on ``split`` of ``manifest`` (default: the one it was trained on): into
    ``RUN/eval/<split>/`` for that manifest, ``RUN/eval/<name>_<split>/`` for another (``name``
    defaulting to its file name), never over another evaluation unless ``overwrite``."""
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise FeatcacheError(f"--thresholds must be numbers in [0, 1]; got {thresholds}")
    run_dir = Path(run_dir)
    filt = FilterRun(run_dir, device)
    recorded = load_config(run_dir / "config.yaml").get("manifest") or {}
    given, manifest = manifest, manifest if manifest is not None else recorded.get("path")
    if not manifest or not Path(manifest).is_file():
        raise FeatcacheError(f"manifest {manifest} does not exist; pass --manifest")
    sha = sha256_file(manifest)
    out, in_domain = resolve_target(run_dir, split, name, given=given, path=manifest, ident=sha, recorded=recorded,
                                    kind="manifest")
    provenance = {**run_provenance(run_dir, split, command),
                  "manifest": {"path": str(Path(manifest).resolve()), "sha256": sha}}
    check_target(out, provenance, overwrite=overwrite, in_domain=in_domain)
    preds = filt.predict(manifest, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
    y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
    temperature = filt.temperature or 1.0
    p = sigmoid(score / temperature)
    groups = preds["subgroup"].to_numpy()
    has_groups = bool((groups >= 0).any())
    metrics = all_metrics(y, score / temperature, groups=groups if has_groups else None)
    metrics["temperature"] = filt.temperature
    if filt.temperature is not None:
        metrics["uncalibrated"] = calibration_metrics(y, sigmoid(score))
    rows = threshold_analysis(y, p, thresholds)
    metrics["threshold_analysis"] = rows
    md = ["## Cascade thresholds (stop as real when 1 - P(fake) >= t)", "", markdown_table(pd.DataFrame(rows))]
    title = f"{run_dir.name} (filter)"

    def plots(out: Path, tag: str) -> list[str]:
        plot_confusion(metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"], out / "confusion_matrix.png",
                       f"{title}, {tag} (P(fake) >= 0.5)")
        cal = f"T = {temperature:.3f}" if filt.temperature is not None else "uncalibrated"
        plot_reliability([(f"{tag}, {cal}", reliability_bins(y, p), metrics)], out / "reliability_diagram.png")
        curve = pd.DataFrame(threshold_analysis(y, p, default_grid(thresholds)))
        plot_cascade(curve[["threshold", "filtration", "leakage", "precision"]], out / "cascade_analysis.png",
                     marks=thresholds, title=f"{title} as stage 1, {tag}")
        return ["confusion_matrix.png", "reliability_diagram.png", "cascade_analysis.png"]

    return write_evaluation(run_dir, split, metrics, preds.assign(prob=p), detects=True, summary_keys=SUMMARY_KEYS,
                            title=title, out=out, task_md="\n".join(md), plots=plots, provenance=provenance)


def evaluate_run(run_dir, cache=None, *, split: str = "test", name: str | None = None, device=None,
                 manifest=None, thresholds=DEFAULT_THRESHOLDS, progress: bool = False, overwrite: bool = False,
                 command: str | None = None) -> Evaluation:
    """Evaluate any run: a head on a cache (default: its own), the filter on a manifest."""
    run_dir = Path(run_dir)
    if is_e2e_run(run_dir):
        if cache is not None:
            raise FeatcacheError(f"{run_dir} is a train-e2e run: it reads images; pass --manifest, not --cache")
        return evaluate_filter(run_dir, manifest, split=split, name=name, device=device, progress=progress,
                               thresholds=thresholds, command=command, overwrite=overwrite)
    check_run_dir(run_dir)
    if manifest is not None:
        raise FeatcacheError(f"{run_dir} is a head run: it reads a cache (--cache), not a --manifest")
    return evaluate_head(run_dir, cache, split=split, name=name, device=device, overwrite=overwrite, command=command)


__all__ = ["DEFAULT_THRESHOLDS", "evaluate_filter", "evaluate_run", "is_e2e_run"]
