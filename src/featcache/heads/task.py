"""One registry of tasks. A task is a head module plus how it is fed and judged.

The trainer (``featcache.train``) is shared by every task; the interface is CONTRACT.md's.
"""

from __future__ import annotations

import copy
import json
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
    """Where training is: epoch (1-based) of epochs; ``progress`` is the fraction of training done
    before this epoch, (epoch - 1) / epochs: 0 at the first epoch (the original design's p)."""

    epoch: int
    epochs: int

    @property
    def progress(self) -> float:
        return (self.epoch - 1) / self.epochs


# NOTE (heads worktree): a minimal copy of the base class of CONTRACT.md, enough for the stacked
# tasks and their tests; the "core" engineer's task.py replaces it at merge.
class Task(ABC):
    """Base class of the heads' tasks: one instance trains R = len(cfgs) >= 1 stacked runs."""

    name: str = ""
    cache_kind: str = "pooled"
    detects: bool = True
    #: > 1: the task can stack runs (every parameter and buffer has a leading dimension R)
    max_runs: int = 1
    #: option name -> task name of a finished run this task needs (the trainer fills self.inputs)
    requires_runs: dict[str, str] = {}
    #: loss-section keys that are per-run coefficients (excluded from stack_key)
    coefficient_keys: tuple[str, ...] = ()
    #: meta columns read from the cache
    meta_columns: list[str] | None = None

    def __init__(self, cfgs: dict | list[dict], device, run_dirs=None):
        self.cfgs = [cfgs] if isinstance(cfgs, dict) else list(cfgs)
        self.cfg = self.cfgs[0]
        self.runs = len(self.cfgs)
        self.run_dirs = run_dirs
        self.inputs: dict = {}
        self.device = torch.device(device)
        self.data: dict[str, SplitData] = {}
        self.module: torch.nn.Module | None = None
        self.spec: dict = {}
        self.backbone: dict | None = None
        for cfg in self.cfgs:
            self.check_config(cfg)

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Refuse a config that cannot train as asked (one line that says how to fix it)."""
        epochs = int(cfg["training"]["epochs"])
        min_epoch = int(cfg.get("selection", {}).get("min_epoch", 1))
        if min_epoch > epochs:
            raise FeatcacheError(f"selection.min_epoch={min_epoch} is after the last epoch (training.epochs={epochs}), "
                                 f"so no epoch could be selected; set training.epochs >= {min_epoch} or "
                                 f"--set selection.min_epoch={epochs}")

    # -- data --------------------------------------------------------------------------------
    def check_cache(self, cache: FeatureCache) -> None:
        if cache.kind != self.cache_kind:
            raise FeatcacheError(f"task {self.name} reads a {self.cache_kind} cache; {cache.path} is {cache.kind}")
        if self.spec:
            check_same_backbone(self.spec.get("backbone"), cache, f"this {self.name} run")

    def read(self, cache: FeatureCache):
        return cache.load(None, columns=self.meta_columns)

    @abstractmethod
    def tensors(self, data) -> SplitData:
        """Tensors and meta of all the rows of ``data``."""

    def load(self, cache: FeatureCache, splits=("train", "val", "test")) -> None:
        self.check_cache(cache)
        self.backbone = backbone_identity(cache)
        everything = self.tensors(self.read(cache))
        split_col = everything.meta["split"].astype(str).to_numpy()
        for split in splits:
            rows = np.flatnonzero(split_col == split)
            idx = torch.from_numpy(rows)
            self.data[split] = SplitData({k: v[idx] for k, v in everything.tensors.items()},
                                         everything.meta.iloc[rows].reset_index(drop=True)).to(self.device)

    # -- model -------------------------------------------------------------------------------
    @abstractmethod
    def make_spec(self) -> dict:
        """What ``build`` needs, from the loaded data, the config and ``self.inputs``."""

    @abstractmethod
    def build(self, spec: dict) -> torch.nn.Module:
        """A module for ``self.runs`` runs; uses only ``spec`` and ``self.inputs``."""

    def seeds(self) -> list[int]:
        return [int(c["training"]["seed"]) for c in self.cfgs]

    def run_state_dict(self, r: int) -> dict:
        sd = self.module.state_dict()
        return {k: v[r:r + 1] for k, v in sd.items()} if self.max_runs > 1 else dict(sd)

    def load_run_state_dict(self, r: int, sd) -> None:
        if self.max_runs > 1:
            own = self.module.state_dict()
            for k, v in sd.items():
                own[k][r:r + 1].copy_(v)
        else:
            self.module.load_state_dict(sd)

    # -- training and evaluation ---------------------------------------------------------------
    def coefficients(self) -> dict[str, torch.Tensor]:
        """Per-run loss weights, (R,) tensors on the device."""
        return {}

    def _coef(self, values) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.get_default_dtype(), device=self.device)

    @abstractmethod
    def batch_loss(self, batch: dict[str, torch.Tensor], state: StepState) -> tuple[torch.Tensor, dict]:
        """(R,) losses and (R,) terms of one (R, B, ...) batch; no host-device synchronisation."""

    def epoch_values(self, state: StepState) -> dict:
        return {}

    @abstractmethod
    def evaluate(self, split: str) -> list[tuple[dict, pd.DataFrame]]:
        """One (metrics, predictions) per run."""

    def stop_reason(self, row: dict, r: int) -> str | None:
        return None

    def finish(self, run_dir: Path, r: int) -> dict:
        return {}

    @classmethod
    def stack_key(cls, cfg: dict) -> str:
        """Runs with equal keys may be stacked: the config minus the seed, the preset's name and the
        loss coefficients (``coefficient_keys``)."""
        c = copy.deepcopy(cfg)
        c.pop("preset", None)
        c.get("training", {}).pop("seed", None)
        for k in cls.coefficient_keys:
            c.get("loss", {}).pop(k, None)
        return json.dumps(c, sort_keys=True, default=str)


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
