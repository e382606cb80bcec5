"""The tasks that read images (from a manifest): the MobileNetV4 fast filter of the detection
cascade, and the DETR fine-tune of the offline detection branch.

- :mod:`.mnv4`: the timm model, its transforms, reading images from a manifest, prediction.
- :mod:`.train`: the task ``mnv4`` (``featcache train-head mnv4 --manifest M``) and its alias
  ``featcache train-e2e mnv4`` (:func:`train_e2e`).
- :mod:`.detr_finetune`: the task ``detr`` and its alias ``featcache finetune-detr``.
- :mod:`.calibrate`: ``featcache calibrate`` (temperature scaling).
- :mod:`.evaluate`: ``featcache evaluate`` of any run (heads and the filter; one layout).
- :mod:`.cascade`: ``featcache cascade`` (the filter in front of a Stage-2 detector).
"""

from .calibrate import calibrate_run
from .cascade import run_cascade
from .evaluate import evaluate_filter, evaluate_run
from .train import train_e2e

__all__ = ["calibrate_run", "evaluate_filter", "evaluate_run", "run_cascade", "train_e2e"]
