"""One registry of tasks. A task is a head module plus how it is fed and judged.

The trainer (``featcache.train``) is shared by every task; a task provides:

- ``load(cache)``: read what it needs from the cache into tensors (train/val/test);
- ``build()`` / ``model_spec()``: the nn.Module, and what rebuilds it without the cache;
- ``batch_loss(batch, state)``: the training loss of one minibatch and its logged terms;
- ``evaluate(split)``: metrics and a predictions table for a split;
- ``finish(run_dir)``: optional analysis after training (e.g. Stage 1's leakage probes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import FeatureCache
from ..errors import FeatcacheError
from ..registry import Registry

#: Importing a task's module registers it.
TASKS = Registry("task", ("featcache.heads.stage1", "featcache.heads.stage2", "featcache.heads.xai",
                         "featcache.heads.faap"))
register_task = TASKS.register
get_task = TASKS.get
list_tasks = TASKS.names


@dataclass
class SplitData:
    """One split of a cache in memory: tensors of equal length, and the meta table."""

    tensors: dict[str, torch.Tensor]
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)

    def to(self, device) -> SplitData:
        return SplitData({k: v.to(device) for k, v in self.tensors.items()}, self.meta)


@dataclass
class StepState:
    """Where training is: epoch (1-based), epochs, and progress p = epoch / epochs."""

    epoch: int
    epochs: int

    @property
    def progress(self) -> float:
        return self.epoch / self.epochs


class Task(ABC):
    """Base class of the heads' tasks; see the module docstring."""

    name: str = ""
    #: The cache kind this task reads.
    cache_kind: str = "pooled"
    #: Column of the predictions table that holds the label / score, when the task detects.
    detects: bool = True

    def __init__(self, cfg: dict, device: torch.device, run_dir: Path | None = None):
        self.cfg = cfg
        self.device = device
        self.run_dir = run_dir
        self.data: dict[str, SplitData] = {}
        self.module: torch.nn.Module | None = None
        self.spec: dict = {}
        self.backbone: dict | None = None

    # -- data --------------------------------------------------------------------------------
    def check_cache(self, cache: FeatureCache) -> None:
        if cache.kind != self.cache_kind:
            raise FeatcacheError(f"task {self.name} reads a {self.cache_kind} cache; {cache.path} is {cache.kind}")
        if self.spec:  # a trained head meeting a cache: same backbone, same dimension
            check_same_backbone(self.spec.get("backbone"), cache, f"this {self.name} run")

    def load(self, cache: FeatureCache, splits=("train", "val", "test")) -> None:
        """Read the splits this task needs into ``self.data`` (as tensors on ``self.device``)."""
        self.check_cache(cache)
        self.backbone = backbone_identity(cache)
        for split in splits:
            self.data[split] = self.split_data(cache, split).to(self.device)

    @abstractmethod
    def split_data(self, cache: FeatureCache, split: str) -> SplitData:
        """See the module docstring."""

    # -- model -------------------------------------------------------------------------------
    @abstractmethod
    def build(self, spec: dict) -> torch.nn.Module:
        """See the module docstring."""

    @abstractmethod
    def make_spec(self) -> dict:
        """What ``build`` needs, derived from the loaded data and the config."""

    def trainable_parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    # -- training and evaluation ---------------------------------------------------------------
    @abstractmethod
    def batch_loss(self, batch: dict[str, torch.Tensor], state: StepState) -> tuple[torch.Tensor, dict]:
        """See the module docstring."""

    def epoch_values(self, state: StepState) -> dict:
        """Schedule values to log for this epoch (GRL lambda, fairness weight, ...)."""
        return {}

    @abstractmethod
    def evaluate(self, split: str) -> tuple[dict, pd.DataFrame]:
        """See the module docstring."""

    def stop_reason(self, row: dict) -> str | None:
        """A message to stop training after this epoch's log ``row`` (e.g. a collapse), or None."""
        return None

    def write_plots(self, run_dir: Path, tag: str, split: str) -> None:
        """Task-specific plots of an evaluated split (``featcache evaluate``); none by default."""
        return None

    def finish(self, run_dir: Path) -> dict:
        return {}

    def report(self, run_dir: Path, tag: str, metrics: dict) -> dict:
        """Task-specific files for ``featcache evaluate`` (FAAP: its per-gender table); none by default."""
        return {}


BACKBONE_KEYS = ("name", "model", "pretrained", "weights_sha256", "layer", "pooling")


def backbone_identity(cache: FeatureCache) -> dict:
    """What must agree between a head's training cache and any cache it is applied to."""
    return {k: cache.backbone.get(k) for k in BACKBONE_KEYS}


def check_same_backbone(trained_on: dict | None, cache: FeatureCache, what: str) -> None:
    if not trained_on:
        return
    now = backbone_identity(cache)
    diffs = [f"{k}: {trained_on.get(k)!r} vs {now.get(k)!r}" for k in ("name", "model", "weights_sha256", "layer")
             if trained_on.get(k) != now.get(k)]
    if diffs:
        raise FeatcacheError(f"{what} was trained on features of another backbone than {cache.path} "
                             f"({'; '.join(d if 'sha256' not in d else 'the weights differ' for d in diffs)}); "
                             "extract this dataset with the same backbone and weights")


def meta_codes(meta: pd.DataFrame, column: str, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Index of each value in ``vocabulary``; -1 for empty or unknown values."""
    lookup = {v: i for i, v in enumerate(vocabulary)}
    return np.array([lookup.get(v, -1) for v in meta[column].astype(str)], dtype=np.int64)
