"""featcache's Python surface: what ``import featcache`` offers, and :func:`load_run`.

Every CLI command is one of these library calls (the CLI only parses and prints):

================================  ==========================================================
``featcache.extract_features``    ``featcache extract``: a backbone over a manifest into a cache
                                  (``featcache.extract`` is the extraction package)
``featcache.open_cache``          read a cache (features, meta, splits); ``verify_cache`` checks it
``featcache.train_head``          ``featcache train-head TASK``: one run (or resume it), from a cache
                                  (the heads) or a manifest (``mnv4``, ``detr``: they read images)
``featcache.ablate``              ``featcache ablate TASK``: presets x seeds, stacked, with tables
``featcache.evaluate``            ``featcache evaluate RUN``: any run on a split or another cache
``featcache.load_run``            a finished run's config, summary and evaluations, read-only
================================  ==========================================================

:func:`load_run` is the documented way to read a finished run's numbers: ``run.metrics("test")``
is ``RUN/eval/test/metrics.json`` as a dict, ``run.metrics("test", "celebdf")`` the evaluation
named ``celebdf`` on its test split, ``run.metric("test", "auc")`` one value, and
``run.predictions("test")`` the per-sample table the metrics were computed from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .cache import open_cache, verify_cache
from .config import load_config
from .e2e import evaluate_run as evaluate
from .errors import FeatcacheError
from .extract import extract as extract_features
from .runtime import RunDir, is_run_dir
from .train import ablate, train_head

__all__ = ["Run", "ablate", "evaluate", "extract_features", "load_run", "open_cache", "train_head", "verify_cache"]


@dataclass(frozen=True)
class Run:
    """A run directory, read-only: what was trained (``config``), how it ended (``summary``), and
    every evaluation written under ``RUN/eval/`` (by training's end and by ``featcache evaluate``)."""

    path: Path

    @property
    def config(self) -> dict:
        """The resolved config.yaml: task, preset, seed, the cache or manifest, every setting."""
        return load_config(RunDir(self.path).config)

    @property
    def summary(self) -> dict:
        """summary.json: best epoch, epochs run, selection, why it stopped, val and test metrics."""
        f = RunDir(self.path).summary
        if not f.is_file():
            raise FeatcacheError(f"{self.path} has no summary.json: the run has not finished "
                                 "(rerun its train command to resume it)")
        return json.loads(f.read_text())

    def evaluations(self) -> list[str]:
        """The evaluation folders under ``RUN/eval/`` (``test``, ``val``, ``celebdf_test``, ...)."""
        return RunDir(self.path).evaluations()

    def _eval(self, split: str, name: str | None) -> Path:
        folder = RunDir(self.path).eval(split, name)
        if not (folder / RunDir.METRICS).is_file():
            have = ", ".join(self.evaluations()) or "none"
            raise FeatcacheError(f"{self.path} has no evaluation {folder.name!r} (evaluations: {have}); "
                                 f"make it with featcache.evaluate({str(self.path)!r}, split={split!r}"
                                 + (f", name={name!r}, cache=...)" if name else ")"))
        return folder

    def metrics(self, split: str = "test", name: str | None = None) -> dict:
        """One evaluation's metrics.json: ``split`` of the run's own cache, or of the cache that
        ``featcache evaluate --name NAME`` evaluated."""
        return json.loads((self._eval(split, name) / RunDir.METRICS).read_text())

    def metric(self, split: str, key: str, name: str | None = None):
        """One value of :meth:`metrics` (``run.metric("test", "auc")``)."""
        m = self.metrics(split, name)
        if key not in m:
            raise FeatcacheError(f"evaluation {split!r} of {self.path} has no metric {key!r} "
                                 f"(it has: {', '.join(k for k, v in m.items() if not isinstance(v, (dict, list)))})")
        return m[key]

    def predictions(self, split: str = "test", name: str | None = None) -> pd.DataFrame:
        """The per-sample predictions.csv of one evaluation."""
        return pd.read_csv(self._eval(split, name) / RunDir.PREDICTIONS)


def load_run(path) -> Run:
    """The finished (or running) run at ``path``, read-only; see :class:`Run`."""
    path = Path(path)
    if not is_run_dir(path):
        raise FeatcacheError(f"{path} is not a featcache run directory (no config.yaml or summary.json)")
    return Run(path)
