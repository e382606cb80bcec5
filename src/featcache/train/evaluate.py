"""The one evaluation writer: ``RUN/eval/<name>_<split>/{predictions.csv, metrics.json, report.md, plots/}``.

Heads (:func:`evaluate_head`) and the MobileNetV4 filter (:func:`featcache.e2e.evaluate.evaluate_filter`)
both end here: the same files, the same subgroup table and ROC for detectors, and the task's own
markdown and plots. The returned :class:`Evaluation` carries its one-line summary (the task's
``summary_keys``) and its markdown; nothing is read back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..cache import open_cache
from ..errors import FeatcacheError
from ..heads.task import load_run
from ..metrics import subgroup_table
from ..report.plots import plot_roc, plot_subgroup_rates
from ..report.tables import markdown_table
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

    def short(self) -> str:
        """The task's summary metrics on one line."""
        return ", ".join(f"{k} {self.metrics[k]:.3f}" for k in self.summary_keys
                         if isinstance(self.metrics.get(k), (int, float)) and self.metrics[k] is not None)


def write_evaluation(run_dir, split: str, metrics: dict, predictions: pd.DataFrame, *, detects: bool,
                     summary_keys, title: str, name: str | None = None, task_md: str = "",
                     plots=None) -> Evaluation:
    """Write one evaluation; ``plots(out_plots_dir, tag)`` adds the caller's plots."""
    run_dir = Path(run_dir)
    out = eval_dir(run_dir, split, name)
    tag = out.name
    metrics = dict(metrics)
    lines = [f"# {title}: {tag}", "", f"n = {len(predictions)}", ""]
    keys = [k for k in summary_keys if k in metrics]
    if keys:
        lines += [markdown_table(pd.DataFrame([{k: metrics[k] for k in keys}])), ""]
    files = ["predictions.csv", "metrics.json", "report.md"]
    if detects and {"label", "prob"} <= set(predictions.columns):
        metrics.setdefault("n", int(len(predictions)))
        y, p = predictions["label"].to_numpy(), predictions["prob"].to_numpy()
        plot_roc(y, p, out / "plots" / "roc.png", f"{title}, {tag}")
        files.append("plots/roc.png")
        if "subgroup" in predictions and (predictions["subgroup"].to_numpy() >= 0).any():
            table = subgroup_table(y, p, predictions["subgroup"].to_numpy())
            if len(table):
                table.to_csv(out / "subgroups.csv", index=False)
                plot_subgroup_rates(table, out / "plots" / "subgroup_rates.png", f"{title}, {tag}")
                lines += ["## Subgroups (P(fake) >= 0.5)", "", markdown_table(table), ""]
                files += ["subgroups.csv", "plots/subgroup_rates.png"]
    if task_md:
        lines += [task_md, ""]
    if plots is not None:
        files += [f"plots/{f}" for f in plots(out / "plots", tag)]
    markdown = "\n".join(lines)
    write_eval(out, metrics, predictions, markdown)
    return Evaluation(run_dir, tag, out, metrics, tuple(summary_keys), markdown, files)


def evaluate_head(run_dir, cache=None, *, split: str = "test", name: str | None = None, device=None) -> Evaluation:
    """Predict ``split`` of ``cache`` (default: the run's own) with a trained head."""
    task = load_run(run_dir, device)
    cache_path = cache or task.cfg.get("cache", {}).get("path")
    if not cache_path:
        raise FeatcacheError(f"{run_dir} does not record its cache; pass --cache")
    c = open_cache(cache_path)
    task.load(c, splits=(split,))
    metrics, preds = task.evaluate(split)[0]
    return write_evaluation(run_dir, split, metrics, preds, detects=task.detects, summary_keys=task.summary_keys,
                            title=f"{Path(run_dir).name} ({task.name})", name=name, task_md=task.report(metrics, preds),
                            plots=lambda d, tag: task.write_plots(d, split, f"{Path(run_dir).name}, {tag}"))

