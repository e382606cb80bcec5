"""The one training loop, the head trainer, the one evaluation writer, and ablations."""

from ..heads.task import load_run
from .ablate import ablate
from .evaluate import Evaluation, evaluate_head, write_evaluation
from .loop import FitResult, LoopSettings, fit
from .trainer import RunResult, train_head, train_runs

__all__ = ["Evaluation", "FitResult", "LoopSettings", "RunResult", "ablate", "evaluate_head", "fit", "load_run", "train_head",
           "train_runs", "write_evaluation"]
