"""The one evaluation writer: ``RUN/eval/<name>_<split>/{predictions.csv, metrics.json, report.md, plots/}``.

Heads (:func:`evaluate_head`) and the MobileNetV4 filter (:func:`featcache.e2e.evaluate.evaluate_filter`)
both end here: the same files, the same subgroup table and ROC for detectors, and the task's own
markdown and plots. The returned :class:`Evaluation` carries its one-line summary (the task's
``summary_keys``, each with its 95 % interval), its remarks and its markdown; nothing is read back
from disk.

Intervals: when the predictions have ``label`` and ``prob`` (P(fake)), metrics.json holds
``ci95`` ({metric: [lo, hi]} for the AUC, EER, ACC and fairness metrics it reports) and
``ci95_info`` from :func:`featcache.metrics.bootstrap.with_intervals`: 1,000 seeded resamples
(seed 0), whole identities resampled when the predictions have an ``identity`` column,
stratified by label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..cache import open_cache
from ..errors import FeatcacheError
from ..heads.task import load_run
from ..metrics import subgroup_table
from ..metrics.bootstrap import with_intervals
from ..report.plots import plot_roc, plot_subgroup_rates
from ..report.tables import (
    METRIC_MEANINGS,
    decision_marks,
    format_metric,
    markdown_table,
    metric_legend,
    metrics_line,
    write_csv_rounded,
)
from ..runtime import eval_dir, write_eval


@dataclass
class Evaluation:
    """One evaluated split of one run, and where its files are."""

    run_dir: Path
    split: str
    out: Path
    metrics: dict
    summary_keys: tuple[str, ...]
    markdown: str
    files: list[str] = field(default_factory=list)
    subgroups: pd.DataFrame | None = None  # n, AUC, FPR, TPR, ACC per subgroup (detectors with demographics)

    def short(self) -> str:
        """The task's summary metrics on one line, each with its 95 % interval when it has one."""
        keys = [k for k in self.summary_keys if isinstance(self.metrics.get(k), (int, float))]
        return metrics_line(self.metrics, keys)

    @property
    def remarks(self) -> list[str]:
        """Why a figure is suspicious or NaN (a degenerate detector, one class, no subgroups)."""
        return list(self.metrics.get("remarks") or [])

    def legend(self) -> str:
        """The meaning of every metric of :meth:`short` (and of the interval), one bullet each."""
        keys = [k for k in self.summary_keys if k in METRIC_MEANINGS and isinstance(self.metrics.get(k), (int, float))]
        return metric_legend([*keys, *(["ci95"] if self.metrics.get("ci95") else [])])


#: Bootstrap resamples behind each evaluation's ``ci95`` (seeded: the same predictions, the same intervals).
N_BOOT = 1000


def add_intervals(metrics: dict, predictions: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """``metrics`` plus ``ci95`` and ``ci95_info`` when ``predictions`` has ``label`` and ``prob``;
    ``ci95`` keeps the metrics that ``metrics`` reports (an XAI run has no ACC to bound)."""
    if not {"label", "prob"} <= set(predictions.columns) or len(predictions) == 0:
        return metrics
    try:
        out = with_intervals(metrics, predictions, n_boot=n_boot, seed=seed)
    except FeatcacheError as exc:  # e.g. rows without a 0/1 label: no interval, and the reason kept
        return {**metrics, "ci95": {}, "ci95_info": {"notes": [f"no intervals: {exc}"]}}
    out["ci95"] = {k: v for k, v in out["ci95"].items() if k in metrics}
    return out


def write_evaluation(run_dir, split: str, metrics: dict, predictions: pd.DataFrame, *, detects: bool,
                     summary_keys, title: str, name: str | None = None, task_md: str = "",
                     plots=None) -> Evaluation:
    """Write one evaluation; ``plots(out_plots_dir, tag)`` adds the caller's plots."""
    run_dir = Path(run_dir)
    out = eval_dir(run_dir, split, name)
    tag = out.name
    metrics = add_intervals(dict(metrics), predictions)
    lines = [f"# {title}: {tag}", "", f"n = {len(predictions)}", ""]
    keys = [k for k in summary_keys if k in metrics]
    if keys:
        ci = metrics.get("ci95") or {}
        marks = decision_marks(metrics)
        cells = {k: format_metric(k, metrics[k], ci=ci.get(k), **marks) for k in keys}
        lines += [markdown_table(pd.DataFrame([cells])), "",
                  metric_legend([*(k for k in keys if k in METRIC_MEANINGS), *(["ci95"] if ci else []),
                                 *(k for k, on in marks.items() if on)])]
    if metrics.get("remarks"):
        lines += [*(f"Remark: {r}" for r in metrics["remarks"]), ""]
    files = ["predictions.csv", "metrics.json", "report.md"]
    table = None
    if detects and {"label", "prob"} <= set(predictions.columns):
        metrics.setdefault("n", int(len(predictions)))
        y, p = predictions["label"].to_numpy(), predictions["prob"].to_numpy()
        plot_roc(y, p, out / "plots" / "roc.png", f"{title}, {tag}")
        files.append("plots/roc.png")
        if "subgroup" in predictions and (predictions["subgroup"].to_numpy() >= 0).any():
            table = subgroup_table(y, p, predictions["subgroup"].to_numpy())
            if len(table):
                write_csv_rounded(table, out / "subgroups.csv")
                plot_subgroup_rates(table, out / "plots" / "subgroup_rates.png", f"{title}, {tag}")
                lines += ["## Subgroups (P(fake) >= 0.5)", "", markdown_table(table), ""]
                files += ["subgroups.csv", "plots/subgroup_rates.png"]
    if task_md:
        lines += [task_md, ""]
    if plots is not None:
        files += [f"plots/{f}" for f in plots(out / "plots", tag)]
    markdown = "\n".join(lines)
    write_eval(out, metrics, predictions, markdown)
    return Evaluation(run_dir, tag, out, metrics, tuple(summary_keys), markdown, files,
                      table if table is not None and len(table) else None)


def evaluate_head(run_dir, cache=None, *, split: str = "test", name: str | None = None, device=None) -> Evaluation:
    """Predict ``split`` of ``cache`` (default: the run's own) with a trained head."""
    task = load_run(run_dir, device)
    cache_path = cache or task.cfg.get("cache", {}).get("path")
    if not cache_path:
        raise FeatcacheError(f"{run_dir} does not record its cache; pass --cache")
    c = open_cache(cache_path)
    task.load(c, splits=(split,))
    metrics, preds = task.evaluate(split)[0]
    title = run_title(run_dir, task.name, task.cfg.get("preset"))
    return write_evaluation(run_dir, split, metrics, preds, detects=task.detects, summary_keys=task.summary_keys,
                            title=title, name=name, task_md=task.report(metrics, preds),
                            plots=lambda d, tag: task.write_plots(d, split, f"{title}, {tag}"))


def run_title(run_dir, task: str, preset: str | None = None) -> str:
    """``full/seed0 (stage2, preset full)``: the run (with its parent when the name is a seed
    folder of an ablation), the task and the preset, for report and plot titles."""
    run_dir = Path(run_dir)
    name = f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed") else run_dir.name
    return f"{name} ({task}" + (f", preset {preset})" if preset else ")")

