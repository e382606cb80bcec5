"""`featcache evaluate`: a trained head on a split of its cache or of another cache."""

from __future__ import annotations

from pathlib import Path

from ..cache import open_cache
from ..errors import FeatcacheError
from .trainer import load_run, write_predictions


def evaluate_run(run_dir, cache=None, *, split: str = "test", name: str | None = None, device=None,
                 manifest=None, thresholds=None, save_predictions: bool = False, progress: bool = False) -> dict:
    """Predict ``split`` of ``cache`` (default: the run's own cache); write predictions, metrics, plots.

    A train-e2e run (the MobileNetV4 filter) reads images instead: ``manifest`` (default: the
    one it was trained on), evaluated by :func:`featcache.e2e.evaluate_e2e` into
    ``RUN/eval_<tag>/`` with the cascade ``thresholds``; the metrics are returned.

    Files are tagged ``<name>_<split>`` (or ``<split>``): ``predictions_*.csv``, ``metrics_*.json``,
    and for detectors ``subgroups_*.csv`` / ``.md``, ``plots/roc_*.png``, ``plots/subgroup_rates_*.png``.
    Returns the metrics.
    """
    from ..e2e.evaluate import DEFAULT_THRESHOLDS, evaluate_e2e, is_e2e_run
    from ..metrics import subgroup_table
    from ..report.plots import plot_roc, plot_subgroup_rates
    from ..report.tables import markdown_table

    run_dir = Path(run_dir)
    if is_e2e_run(run_dir):
        if cache is not None:
            raise FeatcacheError(f"{run_dir} is a train-e2e run: it reads images; pass --manifest, not --cache")
        if manifest is None:
            from ..config import load_config

            manifest = load_config(run_dir / "config.yaml")["manifest"]["path"]
        report = evaluate_e2e(run_dir, manifest, split=split, name=name, device=device, progress=progress,
                              thresholds=thresholds or DEFAULT_THRESHOLDS, save_predictions=save_predictions)
        return report["metrics"]
    if manifest is not None:
        raise FeatcacheError(f"{run_dir} is a head run: it reads a cache (--cache), not a --manifest")
    task = load_run(run_dir, device)
    cache_path = cache or task.cfg.get("cache", {}).get("path")
    if not cache_path:
        raise FeatcacheError(f"{run_dir} does not record its cache; pass --cache")
    c = open_cache(cache_path)
    task.check_cache(c)
    task.data[split] = task.split_data(c, split).to(task.device)
    metrics, preds = task.evaluate(split)
    tag = f"{name}_{split}" if name else split
    if task.detects:
        metrics = {**metrics, "n": int(len(preds))}
    write_predictions(run_dir, tag, metrics, preds)
    task.write_plots(run_dir, tag, split)
    task.report(run_dir, tag, metrics)
    if task.detects:
        table = subgroup_table(preds["label"].to_numpy(), preds["prob"].to_numpy(), preds["subgroup"].to_numpy())
        table.to_csv(run_dir / f"subgroups_{tag}.csv", index=False)
        (run_dir / f"subgroups_{tag}.md").write_text(markdown_table(table))
        (run_dir / "plots").mkdir(exist_ok=True)
        plot_roc(preds["label"].to_numpy(), preds["prob"].to_numpy(), run_dir / "plots" / f"roc_{tag}.png", tag)
        if len(table):
            plot_subgroup_rates(table, run_dir / "plots" / f"subgroup_rates_{tag}.png", tag)
    return metrics
