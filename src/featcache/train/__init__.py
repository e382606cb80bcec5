"""The one training loop, the head trainer, the one evaluation writer, and ablations."""

from .ablate import ablate
from .evaluate import Evaluation, evaluate_head, write_evaluation
from .loop import FitResult, LoopSettings, fit
from .trainer import RunResult, train_head, train_runs

__all__ = ["Evaluation", "FitResult", "LoopSettings", "RunResult", "ablate", "evaluate_head", "fit", "train_head",
           "train_runs", "write_evaluation"]
