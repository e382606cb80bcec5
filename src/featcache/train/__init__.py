"""The one trainer, evaluation of runs, and ablations over presets and seeds."""

from .ablate import ablate
from .evaluate import evaluate_run
from .trainer import RunResult, load_run, train_head

__all__ = ["RunResult", "ablate", "evaluate_run", "load_run", "train_head"]
