"""``featcache evaluate RUN``: a run of any task (a head on a cache, the filter or the DETR fine-tune
on a manifest), into the one layout.

Every evaluation goes through :func:`featcache.train.evaluate.evaluate_head`, which writes
``RUN/eval/<name>_<split>/{predictions.csv, metrics.json, report.md, plots/}`` with the task's own
report and plots (the filter's cascade threshold analysis, confusion matrix, reliability diagram
and cascade curve; the DETR fine-tune's COCO AP/AR per gender), exactly as training's end does.
A run reads the data its task declares (``source``): ``--cache`` for a head, ``--manifest`` for the
tasks that read images; the other is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FeatcacheError
from ..heads.task import check_run_dir, get_task
from ..runtime import RunDir
from ..train.evaluate import Evaluation, evaluate_head
from .mnv4 import TASK


def run_task(run_dir) -> str | None:
    """The task a run directory's model.json names (None when there is none)."""
    spec = RunDir(run_dir).model
    if not spec.is_file():
        return None
    try:
        return json.loads(spec.read_text()).get("task")
    except (ValueError, AttributeError):
        return None


def evaluate_run(run_dir, cache=None, *, split: str = "test", name: str | None = None, device=None,
                 manifest=None, thresholds=None, plots: bool | None = None, progress: bool = False,
                 overwrite: bool = False, command: str | None = None) -> Evaluation:
    """Evaluate a run of any task on ``split`` of its own data or of the ``cache`` / ``manifest`` given
    (the one its task reads). ``thresholds``: the filter's cascade thresholds for this evaluation
    (``evaluation.thresholds``; the run's own when None); ``plots``: draw this evaluation's plots or
    not (``logging.plots``; the run's own when None)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    task = run_task(run_dir)
    source = get_task(task).source
    given = {k: v for k, v in (("cache", cache), ("manifest", manifest)) if v is not None}
    other = [k for k in given if k != source]
    if other:
        reads = "images" if source == "manifest" else "features from a cache"
        raise FeatcacheError(f"{run_dir} is a {task} run: it reads {reads}; pass --{source}, not --{other[0]}")
    options = {}
    if thresholds is not None:
        options["evaluation.thresholds"] = [float(t) for t in thresholds]
    if plots is not None:
        options["logging.plots"] = bool(plots)
    return evaluate_head(run_dir, given.get(source), split=split, name=name, device=device, overwrite=overwrite,
                         command=command, options=options or None)


def evaluate_filter(run_dir, manifest=None, *, split: str = "test", thresholds=None, name: str | None = None,
                    device=None, progress: bool = True, command: str | None = None,
                    overwrite: bool = False) -> Evaluation:
    """:func:`evaluate_run` of a filter run on ``manifest`` (default: the one it was trained on)."""
    if run_task(run_dir) != TASK:
        raise FeatcacheError(f"{run_dir} is a {run_task(run_dir)!r} run, not a {TASK} (filter) run")
    return evaluate_run(run_dir, manifest=manifest, split=split, thresholds=thresholds, name=name, device=device,
                        progress=progress, command=command, overwrite=overwrite)


__all__ = ["evaluate_filter", "evaluate_run", "run_task"]
