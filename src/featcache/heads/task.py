"""One registry of tasks. A task is a head module plus how it is fed and judged.

:class:`Job` is the declared contract of the one training loop (:func:`featcache.train.loop.fit`):
every hook the loop calls, with a no-op default where one makes sense, so the loop never asks
whether a job has a capability. :class:`Task` (every task: the heads, and through
:class:`ManifestTask` the filter and the DETR fine-tune) derives from it. The one training loop is shared by every task; a task provides:

- ``read(cache)`` / ``tensors(data)``: the cache is read ONCE (all splits), turned into tensors
  once, and split by the one split-mask helper (:meth:`Task.load`);
- ``make_spec()`` / ``build(spec)``: what rebuilds the module without the cache, and the module
  (for ``self.runs`` stacked runs when ``max_runs > 1``);
- ``batch_loss(batch, state)``: the loss of one minibatch per run, shape (R,), and its terms;
- ``evaluate(split)``: one (metrics, predictions) per run;
- ``finish(run_dir, r)``: optional analysis after training (e.g. Stage 1's leakage probes).

Options that are finished runs of another task (Stage 2's ``stage1``) are declared in
``requires_runs``; the trainer loads them with :func:`load_run` and puts them into
``self.inputs`` before ``make_spec()``: a task never imports the trainer.

A task declares its data source (``source``): a feature cache (the heads) or a manifest
(:class:`ManifestTask`: the MobileNetV4 filter ``mnv4`` and the DETR fine-tune ``detr``, which
read images). :meth:`Task.open_source` opens and checks it and returns a :class:`Source` (its
path, its identity: a cache's fingerprint or a manifest's sha256, and the opened object); the
trainer records it in the run's config under ``cache`` or ``manifest`` and hands the opened
object to :meth:`Task.load`. The trainer never asks which kind it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import CacheData, FeatureCache, open_cache
from ..cache.splits import split_mask
from ..config import (
    SOURCE_IDENTITY,
    Config,
    Shortcut,
    constraints_of,
    load_config,
    register_config_file,
    with_settings,
    without_keys,
)
from ..data.manifest import Manifest, read_manifest
from ..errors import FeatcacheError
from ..metrics.threshold import parse_rule
from ..registry import Registry
from ..runtime import RunDir, load_weights, resolve_device
from .blocks import RunRNG, StackedDropout


def _record_config(name: str, obj) -> None:
    """A task from another package brings its own YAML (``config_file``); featcache's are package data."""
    if isinstance(obj, type) and issubclass(obj, Task) and obj.config_file is not None:
        register_config_file(name, obj.config_file)


#: Importing a task's module registers it; tasks of other installed packages come from the entry-point
#: group ``featcache.tasks`` (README, "A method of your own"). The two tasks that read images (the
#: filter, the DETR fine-tune) live with their models in ``e2e/`` and are named here as a plugin's
#: entry point would be: by module name, loaded on first lookup (no import runs up the layers).
TASKS = Registry("task", ("featcache.heads.stage1", "featcache.heads.stage2", "featcache.heads.xai",
                         "featcache.heads.faap", "featcache.e2e.train", "featcache.e2e.detr_finetune"),
                 entry_points="featcache.tasks", on_register=_record_config)
register_task = TASKS.register
get_task = TASKS.get
list_tasks = TASKS.names


#: What each source is called in messages and options (``--cache CACHE``, ``--manifest MANIFEST``).
SOURCE_METAVAR = {"cache": "CACHE", "manifest": "MANIFEST"}


@dataclass(frozen=True)
class Source:
    """A task's opened and checked data: ``kind`` (cache | manifest), ``path``, ``ident`` (a cache's
    fingerprint, a manifest's sha256) and ``data`` (the :class:`FeatureCache` or :class:`Manifest`)."""

    kind: str
    path: Path
    ident: str
    data: object

    @property
    def key(self) -> str:
        """The identity's key in the config: ``fingerprint`` or ``sha256``."""
        return SOURCE_IDENTITY[self.kind]

    def record(self) -> dict:
        """What a run's config records: ``{"path": absolute, <key>: ident}``."""
        return {"path": str(Path(self.path).resolve()), self.key: self.ident}


@dataclass(frozen=True)
class TaskOption:
    """A command-line option of ``train-head`` and ``ablate`` that registered tasks declare: a finished
    run a task requires (``requires_runs``: Stage 2's ``--stage1``; ``key`` None) or a shortcut for one
    of its settings (``cli_options``: ``--prototype-mode`` sets ``model.prototype_mode``)."""

    name: str  # the Python name (``prototype_mode``); the option is ``--prototype-mode``
    key: str | None  # the config key it sets; None: a run input (recorded in ``options.<name>``)
    help: str
    choices: tuple[str, ...]  # the key's declared ``one of`` constraint, or ()
    tasks: tuple[str, ...]  # the tasks that declare it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def task_options() -> list[TaskOption]:
    """Every registered task's own command-line options (:class:`TaskOption`), in task order; one option
    two tasks declare is one, naming both (one line when they declare it differently)."""
    out: dict[str, TaskOption] = {}
    for name in list_tasks():
        cls = get_task(name)
        declared = [(opt, None, f"a finished {needed} run (RUN folder)", ()) for opt, needed in cls.requires_runs.items()]
        for opt, (key, text) in cls.cli_options.items():
            c = constraints_of(name).get(key)
            declared.append((opt, key, f"{text} (sets {key})", c.options if c is not None and c.kind == "options" else ()))
        for opt, key, text, choices in declared:
            seen = out.get(opt)
            if seen is not None and (seen.key, seen.choices) != (key, choices):
                raise FeatcacheError(f"tasks {', '.join(seen.tasks)} and {name} declare --{opt} differently; "
                                     "a task's option needs a name of its own")
            tasks = (*seen.tasks, name) if seen else (name,)
            out[opt] = TaskOption(opt, key, seen.help if seen else text, choices, tasks)
    return list(out.values())


def task_option_values(task_name: str, given: dict) -> tuple[dict[str, str], list[str]]:
    """The task options given on the command line (name -> value; None: not given) as ``task_name``'s
    required runs (``options`` of :func:`featcache.train.train_head`) and ``section.key=value`` items
    (``sets``); an option ``task_name`` does not declare is one line naming the tasks that do."""
    cls = get_task(task_name)
    runs, sets = {}, []
    for opt, value in given.items():
        if value is None:
            continue
        if opt in cls.requires_runs:
            runs[opt] = str(value)
        elif opt in cls.cli_options:
            sets.append(Shortcut(cls.cli_options[opt][0], str(value), opt))
        else:
            users = next((o.tasks for o in task_options() if o.name == opt), ())
            own = [o.flag for o in task_options() if task_name in o.tasks]
            raise FeatcacheError(f"--{opt.replace('_', '-')} is an option of {', '.join(users) or 'no task'}, not of "
                                 f"{task_name}; {task_name} takes {', '.join(own) or 'no task option'}")
    return runs, sets


def choose_source(task_name: str, cache=None, manifest=None):
    """The one of ``cache`` / ``manifest`` that task ``task_name`` reads (``--cache`` or ``--manifest``):
    exactly that one must be given; one line otherwise, saying which the task needs."""
    cls = get_task(task_name)
    given = {k: v for k, v in (("cache", cache), ("manifest", manifest)) if v is not None}
    other = [k for k in given if k != cls.source]
    if cls.source not in given or other:
        extra = f", not --{other[0]}" if other else ""
        raise FeatcacheError(f"{task_name} trains from a {cls.source}: pass --{cls.source} "
                             f"{SOURCE_METAVAR[cls.source]}{extra}")
    return given[cls.source]


@dataclass
class SplitData:
    """Rows of a cache in memory: tensors of equal length (first dimension), and the meta table."""

    tensors: dict[str, torch.Tensor]
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)

    def to(self, device) -> SplitData:
        return SplitData({k: v.to(device) for k, v in self.tensors.items()}, self.meta)

    def subset(self, mask: np.ndarray) -> SplitData:
        """The rows where ``mask`` is true (meta re-indexed from 0)."""
        index = torch.from_numpy(np.flatnonzero(mask))
        return SplitData({k: v[index] for k, v in self.tensors.items()},
                         self.meta.iloc[index.numpy()].reset_index(drop=True))


@dataclass
class StepState:
    """Where training is: ``epoch`` (1-based) of ``epochs``.

    ``progress`` = (epoch - 1) / epochs, the fraction of training done BEFORE this epoch (0 at
    the first epoch: the original designs' p = epoch / total with epochs counted from 0).
    """

    epoch: int
    epochs: int

    @property
    def progress(self) -> float:
        return (self.epoch - 1) / self.epochs


class Job(ABC):
    """What :func:`featcache.train.loop.fit` trains: R >= 1 runs of one module, stacked.

    Every hook the loop calls is declared here; those a job may leave out have a default that does
    nothing (the loop never probes a job with ``hasattr``). A job sets ``module`` and ``device``;
    a job fed from a cache sets ``data`` (a :class:`SplitData` per split) and keeps the default
    :meth:`batches`.
    """

    #: Runs trained at once (their parameters stacked on a leading dimension when ``max_runs > 1``).
    runs: int = 1
    #: > 1: the job can stack runs.
    max_runs: int = 1
    #: Mixed precision on CUDA: ``torch.float16`` (with a GradScaler) or ``torch.bfloat16``; None: fp32.
    amp_dtype: torch.dtype | None = None
    #: Notes the trainer adds to every run's summary (e.g. a cache without demographics).
    notes: Sequence[str] = ()
    module: torch.nn.Module
    device: torch.device
    data: dict[str, SplitData]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def run_state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's weights (one run: the module's)."""
        return self.module.state_dict()

    def load_run_state_dict(self, r: int, sd: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)

    def run_rng_state(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's own random streams (a stacked head's dropout), saved in its resume point; none by default."""
        return {}

    def set_run_rng_state(self, r: int, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`run_rng_state`'s streams (nothing by default)."""
        return None

    def batches(self, epoch: int, generators: list[torch.Generator], batch_size: int) -> Iterable | None:
        """The epoch's (batch, rows) pairs, drawn by the job itself (image loaders), or None (the default):
        the loop draws each run's order of ``data["train"]`` from that run's generator."""
        return None

    @abstractmethod
    def batch_loss(self, batch: dict[str, torch.Tensor], state: StepState) -> tuple[torch.Tensor, dict]:
        """Batch tensors are (R, B, ...); return the loss (R,) and terms {name: (R,)}, without a host sync."""

    def epoch_values(self, state: StepState) -> dict:
        """Schedule values to log for this epoch (GRL lambda, fairness weight, ...); none by default."""
        return {}

    @abstractmethod
    def evaluate(self, split: str) -> list[tuple[dict, pd.DataFrame]]:
        """One (metrics, predictions) per run for ``split``."""

    def stop_reason(self, row: dict, r: int) -> str | None:
        """A message to stop run r after this epoch's log ``row`` (e.g. a collapse), or None."""
        return None


class Task(Job):
    """Base class of every task: a :class:`Job` fed from its data source (a feature cache by default;
    :class:`ManifestTask`: a manifest); see the module docstring."""

    name: str = ""
    #: The data the task trains from: ``cache`` (a feature cache) or ``manifest`` (images it reads itself).
    source: str = "cache"
    #: The cache kind this task reads.
    cache_kind: str = "pooled"
    #: True when the task detects (predictions carry label and prob; subgroup tables apply).
    detects: bool = True
    #: > 1: the task can stack runs (every parameter and buffer has a leading dimension R = self.runs).
    max_runs: int = 1
    #: Option name -> task name of a finished run this task needs (loaded by the trainer into self.inputs).
    requires_runs: dict[str, str] = {}
    #: Command-line shortcuts for settings: option name -> (config key, help); ``featcache train-head`` and
    #: ``ablate`` offer ``--<option>`` (its choices: the key's declared ``one of`` constraint), as ``--set``.
    cli_options: dict[str, tuple[str, str]] = {}
    #: Loss-section keys that are per-run coefficients (presets differ by them; excluded from stack_key).
    coefficient_keys: tuple[str, ...] = ()
    #: Meta columns read from the cache (None: all).
    meta_columns: list[str] | None = None
    #: The metrics a one-line summary shows, in order (``featcache train-head`` / ``evaluate``).
    summary_keys: tuple[str, ...] = ("auc", "acc", "eer", "f_fpr", "f_meo")
    #: True when the task's classification loss goes through :meth:`class_weighted_mean`, so that
    #: ``training.class_balance: weight`` applies (a task without it refuses that setting).
    class_weighted: bool = False
    #: The task's YAML when it lives outside featcache (a plugin); featcache's own are ``configs/<name>.yaml``.
    config_file: str | Path | None = None
    #: The ablation plot's axes (x, y): columns of the ablation table.
    ablation_axes: tuple[str, str] = ("test_f_fpr", "test_auc")
    #: Markdown appended to an ablation's report (what the task's own columns mean).
    ablation_notes: str = ""

    def __init__(self, cfgs: dict | list[dict], device, run_dirs=None):
        self.cfgs = [cfgs] if isinstance(cfgs, dict) else list(cfgs)
        if not self.cfgs:
            raise FeatcacheError(f"task {self.name}: no run to build")
        self.cfg = self.cfgs[0]  # model/training sections are equal across stacked runs
        self.confs = [Config.of(c) for c in self.cfgs]  # the typed settings, one per run (config.Config)
        self.conf = self.confs[0]
        self.runs = len(self.cfgs)
        if self.runs > self.max_runs:
            raise FeatcacheError(f"task {self.name} trains at most {self.max_runs} run(s) at once, got {self.runs}")
        self.run_dirs = None if run_dirs is None else [Path(p) for p in
                                                       ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
        for cfg in self.cfgs:
            self.check_config(cfg)
        self.inputs: dict = {}
        self.device = torch.device(device)
        self.data: dict[str, SplitData] = {}
        self.module: torch.nn.Module | None = None
        self.spec: dict = {}
        self.backbone: dict | None = None
        self._coefficients: dict[str, torch.Tensor] | None = None  # made on first use (coefficients())
        self._class_weights: torch.Tensor | None = None  # made on first use (class_weights())

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Refuse a config that cannot train as asked (one line that says how to fix it)."""
        conf = Config.of(cfg)
        balance = conf.training.class_balance
        if balance != "none" and not cls.detects:
            raise FeatcacheError(f"training.class_balance={balance} applies to detectors (real/fake labels); "
                                 f"{cls.name} is not one")
        if balance == "weight" and not cls.class_weighted:
            raise FeatcacheError(f"{cls.name} does not weigh its loss by class yet; use training.class_balance=sampler "
                                 "(balanced batches) or none")

        epochs, min_epoch = conf.training.epochs, conf.selection.min_epoch
        if min_epoch > epochs:
            raise FeatcacheError(f"selection.min_epoch={min_epoch} is after the last epoch (training.epochs={epochs}), "
                                 f"so no epoch could be selected; set training.epochs >= {min_epoch} or "
                                 f"--set selection.min_epoch={epochs}")
        parse_rule(conf.evaluation.threshold)  # a wrong operating-point rule, before training

    def seeds(self) -> list[int]:
        """Each run's seed (initialisation, batch order, dropout)."""
        return [c.training.seed for c in self.confs]

    # -- data --------------------------------------------------------------------------------
    @classmethod
    def open_source(cls, path) -> Source:
        """Open and check the task's data at ``path``: a cache of :attr:`cache_kind` (one line when it
        is missing or of another kind)."""
        if not Path(path).exists():
            raise FeatcacheError(f"--cache {path} does not exist")
        cache = open_cache(path)
        if cache.kind != cls.cache_kind:
            raise FeatcacheError(f"task {cls.name} reads a {cls.cache_kind} cache; {path} is {cache.kind}")
        return Source("cache", Path(path), cache.fingerprint, cache)

    def eval_splits(self) -> tuple[str, ...]:
        """The splits a finished run is evaluated on (into ``RUN/eval/<split>/``)."""
        return ("val", "test")

    def evaluation_inputs(self) -> tuple[str, ...]:
        """Splits of the run's own data an evaluation reads besides the evaluated one (Stage 1's probe is
        fitted on train), so that ``featcache evaluate`` computes what training's end did; none by default."""
        return ()

    def check_cache(self, cache: FeatureCache) -> None:
        if cache.kind != self.cache_kind:
            raise FeatcacheError(f"task {self.name} reads a {self.cache_kind} cache; {cache.path} is {cache.kind}")
        if self.spec:  # a trained head meeting a cache: same backbone, same dimension
            check_same_backbone(self.spec.get("backbone"), backbone_identity(cache), f"this {self.name} run",
                                str(cache.path))

    def read(self, cache: FeatureCache) -> CacheData:
        """Every readable row of the cache, in one read."""
        return cache.load(None, columns=self.meta_columns)

    @abstractmethod
    def tensors(self, data) -> SplitData:
        """Tensors and meta for ALL rows of ``data`` (what :meth:`read` returned); meta has ``split``."""

    def load(self, cache: FeatureCache, splits=("train", "val", "test")) -> None:
        """Read the cache once, make tensors once, split them by mask into ``self.data`` on ``self.device``
        (each split's mask narrowed by :meth:`row_filter`, e.g. a leave-one-manipulation-out fold)."""
        self.check_cache(cache)
        self.backbone = backbone_identity(cache)
        everything = self.tensors(self.read(cache))
        for split in splits:
            mask = split_mask(everything.meta["split"], split, where=str(cache.path))
            keep = self.row_filter(everything.meta, split, cache)
            if keep is not None:
                mask &= keep
                if not mask.any():
                    raise FeatcacheError(f"{cache.path}: no {split} row is left by {self.describe_fold()}")
            self.data[split] = everything.subset(mask).to(self.device)

    def held_out_method(self) -> str | None:
        """The manipulation method a leave-one-manipulation-out run never trains on
        (``protocol.held_out_method``; ``featcache ablate --protocol lomo``), or None."""
        held = self.conf.protocol.held_out_method
        return None if held in (None, "") else str(held)

    def describe_fold(self) -> str:
        return f"the leave-one-manipulation-out fold without {self.held_out_method()!r}"

    def row_filter(self, meta: pd.DataFrame, split: str, cache: FeatureCache) -> np.ndarray | None:
        """Rows of ``split`` this run uses, or None (all).  A leave-one-manipulation-out run trains
        and selects (train, val) on every row whose ``method`` is not the held-out one (reals
        included) and is tested on the test reals plus the held-out method's fakes.  On another
        cache than its own (cross-dataset evaluation) every row is used."""
        held = self.held_out_method()
        if held is None or cache.fingerprint != self.conf.cache.fingerprint:
            return None
        if "method" not in meta:
            raise FeatcacheError(f"{self.name} reads no method column, so it cannot hold out a manipulation method")
        method = meta["method"].astype(str).to_numpy()
        if split == "test":
            return (meta["label"].to_numpy() == 0) | (method == held)
        return method != held

    # -- model -------------------------------------------------------------------------------
    @abstractmethod
    def make_spec(self) -> dict:
        """What ``build`` needs, derived from the loaded data, the config and ``self.inputs``."""

    @abstractmethod
    def build(self, spec: dict) -> torch.nn.Module:
        """The module for ``self.runs`` runs, from ``spec`` (and ``self.inputs``) only."""

    def run_state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's weights: with stacked runs every tensor sliced [r:r+1] (a run dir holds a 1-run module)."""
        sd = self.module.state_dict()
        if self.max_runs == 1:
            return sd
        return {k: v[r:r + 1] for k, v in sd.items()}

    def load_run_state_dict(self, r: int, sd: dict[str, torch.Tensor]) -> None:
        if self.max_runs == 1:
            self.module.load_state_dict(sd)
            return
        with torch.no_grad():
            own = self.module.state_dict()
            missing = sorted(set(own) - set(sd))
            if missing:
                raise FeatcacheError(f"weights of run {r} lack {', '.join(missing[:3])}")
            for k, v in own.items():
                v[r:r + 1].copy_(sd[k].to(v.device))

    def module_rng(self) -> RunRNG | None:
        """The module's per-run dropout streams: the :class:`RunRNG` its :class:`StackedDropout` layers
        share (a head builds one per module), or None."""
        return next((m.rng for m in self.module.modules() if isinstance(m, StackedDropout) and m.rng is not None),
                    None)

    def run_rng_state(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's dropout stream (:meth:`module_rng`), saved in its resume point; none without dropout layers."""
        rng = self.module_rng()
        return {} if rng is None else rng.get_state(r)

    def set_run_rng_state(self, r: int, state: dict[str, torch.Tensor]) -> None:
        rng = self.module_rng()
        if state and rng is not None:
            rng.set_state(r, state)

    # -- training and evaluation ---------------------------------------------------------------
    def coefficients(self) -> dict[str, torch.Tensor]:
        """Per-run loss weights, (R,) tensors on ``self.device``, made once (no host-to-device copy
        per step) by :meth:`_make_coefficients`."""
        if self._coefficients is None:
            self._coefficients = self._make_coefficients()
        return self._coefficients

    def _make_coefficients(self) -> dict[str, torch.Tensor]:
        """One (R,) tensor per ``coefficient_keys`` entry, from each run's ``loss`` section."""
        return {k: self._coef(getattr(c.loss, k) for c in self.confs) for k in self.coefficient_keys}

    def _coef(self, values) -> torch.Tensor:
        """One float per run as an (R,) tensor on the device."""
        return torch.tensor([float(v) for v in values], dtype=torch.get_default_dtype(), device=self.device)

    def class_weights(self) -> torch.Tensor:
        """Per class c of the training labels, ``n / (C * n_c)`` (scikit-learn's ``balanced``
        weights, :func:`sklearn.utils.class_weight.compute_class_weight`), on the device, made once."""
        if self._class_weights is None:
            y = self.data["train"].tensors["label"].long()
            counts = torch.bincount(y).to(torch.get_default_dtype())
            present = counts > 0
            w = torch.zeros_like(counts)
            w[present] = len(y) / (int(present.sum()) * counts[present])
            self._class_weights = w.to(self.device)
        return self._class_weights

    def class_weighted_mean(self, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch mean of ``per_sample`` losses over the last axis; with ``training.class_balance:
        weight`` each sample weighted by its class's :meth:`class_weights` and normalised by the
        weights' sum, as ``F.cross_entropy(weight=...)`` does (the classes then count equally)."""
        if self.conf.training.class_balance != "weight":
            return per_sample.mean(-1)
        w = self.class_weights()[y]
        return (per_sample * w).sum(-1) / w.sum(-1)

    def finish(self, run_dir: Path, r: int) -> dict:
        """Analysis after training, added to run r's summary (none by default)."""
        return {}

    def report(self, metrics: dict, predictions: pd.DataFrame) -> str:
        """Task-specific markdown for ``featcache evaluate``'s report.md (none by default)."""
        return ""

    def write_plots(self, out: Path, split: str, title: str, r: int = 0) -> list[str]:
        """Task-specific plots of run r on ``split`` into ``out``; the file names written (none by default)."""
        return []

    @classmethod
    def stack_key(cls, cfg: dict) -> str:
        """Runs with equal keys may be stacked: the config without the seed, the preset's name and the
        loss coefficients (``coefficient_keys``).  The training section stays in the key, so stacked
        runs have one learning-rate schedule (``training.lr``, ``schedule``, ``epochs``): they share
        one AdamW, whose learning rate is one number per parameter tensor, not per run."""
        c = without_keys(cfg, ["training.seed", "preset", *(f"loss.{k}" for k in cls.coefficient_keys)])
        return json.dumps(c, sort_keys=True)


class ManifestTask(Task):
    """A task that reads its images from a manifest (``source = "manifest"``): the filter, the DETR
    fine-tune. :meth:`open_source` reads and validates the manifest (:meth:`check_manifest` adds the
    task's own checks); :meth:`load` gets the :class:`Manifest` and keeps what the task needs."""

    source = "manifest"
    cache_kind = ""
    max_runs = 1

    @classmethod
    def open_source(cls, path) -> Source:
        manifest = read_manifest(path)
        cls.check_manifest(manifest)
        return Source("manifest", Path(path), manifest.sha256, manifest)

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        """The task's own checks of a manifest (columns, splits), one line each; none by default."""
        return None

    def tensors(self, data) -> SplitData:
        raise FeatcacheError(f"{self.name} reads images from a manifest, not tensors from a cache")

    @abstractmethod
    def load(self, manifest: Manifest, splits=("train", "val", "test")) -> None:
        """Keep what the task needs of ``splits`` of ``manifest`` (refusing a missing split)."""


BACKBONE_KEYS = ("name", "model", "pretrained", "weights_sha256", "layer", "pooling")


def backbone_identity(cache: FeatureCache) -> dict:
    """What must agree between a head's training cache and any cache it is applied to."""
    return {k: cache.backbone.get(k) for k in BACKBONE_KEYS}


def check_same_backbone(trained_on: dict | None, now: dict | None, what: str, where: str) -> None:
    """The one backbone-identity check: ``what`` (a run) was trained on ``trained_on``; ``where`` has ``now``."""
    if not trained_on or not now:
        return
    diffs = [f"{k}: {trained_on.get(k)!r} vs {now.get(k)!r}" for k in ("name", "model", "weights_sha256", "layer")
             if trained_on.get(k) != now.get(k)]
    if diffs:
        raise FeatcacheError(f"{what} was trained on features of another backbone than {where} "
                             f"({'; '.join(d if 'sha256' not in d else 'the weights differ' for d in diffs)}); "
                             "extract this dataset with the same backbone and weights")


def meta_codes(meta: pd.DataFrame, column: str, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Index of each value in ``vocabulary``; -1 for empty or unknown values."""
    lookup = {v: i for i, v in enumerate(vocabulary)}
    return np.array([lookup.get(v, -1) for v in meta[column].astype(str)], dtype=np.int64)


#: Files of the run layouts featcache wrote before the one run layout (issue 13).
OLD_LAYOUT_FILES = ("best_model.safetensors", "metrics_test.json", "last_state.pt")


def check_run_dir(run_dir: Path, weights: str = "best") -> None:
    """One line for a run directory that does not exist, is unfinished or has an older layout."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FeatcacheError(f"run {run_dir} does not exist")
    if not run_dir.is_dir():
        raise FeatcacheError(f"{run_dir} is not a run directory (it is a file)")
    rd = RunDir(run_dir)
    if any((run_dir / f).exists() for f in OLD_LAYOUT_FILES) and not rd.weights(weights).is_file():
        raise FeatcacheError(f"{run_dir} was written by an older featcache (another run layout); retrain it")
    for f in (rd.config, rd.model, rd.weights(weights)):
        if not f.is_file():
            raise FeatcacheError(f"{run_dir} is not a finished run: {f.name} is missing")


def run_fingerprint(run_dir) -> str:
    """sha256 of a finished run's selected weights (``best.safetensors``): what a run trained on
    it depends on, wherever it lies (a moved or copied run has the same fingerprint)."""
    f = RunDir(run_dir).best
    st = f.stat()
    return _file_sha256(str(f.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_cache(run_dir, cfg: dict, kind: str = "cache") -> Path:
    """The cache (or with ``kind="manifest"`` the manifest) a run was trained on: its recorded
    absolute path, else its path relative to the run folder (``cache.relative``: a run moved
    together with its data); one line when neither is there."""
    rec = getattr(Config.of(cfg), kind)  # config.RECORD_SECTIONS: cache, manifest
    if rec.path and Path(rec.path).exists():
        return Path(rec.path)
    if rec.relative and (Path(run_dir) / rec.relative).exists():
        return (Path(run_dir) / rec.relative).resolve()
    if not rec.path:
        raise FeatcacheError(f"{run_dir} does not record its {kind}; pass --{kind}")
    raise FeatcacheError(f"{run_dir}'s {kind} {rec.path} is not there (moved?); pass --{kind} with its new place "
                         f"(it is matched by {SOURCE_IDENTITY[kind]})")


def load_run(run_dir, device=None, *, weights: str = "best", settings: dict | None = None) -> Task:
    """Rebuild a trained task (R = 1) from its run directory (config.yaml, model.json, weights).

    The module and every tensor the task later loads sit on ``device`` (default: CUDA when
    present); no data is loaded. ``settings`` (``{"evaluation.thresholds": [...]}``) replace the run's
    own for this task only (each a setting of the task's config today; :func:`config.with_settings`):
    the task's typed settings are built once, with them.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, weights)
    rd = RunDir(run_dir)
    cfg = load_config(rd.config)
    spec = json.loads(rd.model.read_text())
    if spec.get("task") not in list_tasks():
        raise FeatcacheError(f"{run_dir} is a {spec.get('task')!r} run, not a run of a registered task "
                             f"(tasks: {', '.join(list_tasks())})")
    dev = resolve_device(device)
    task = get_task(spec["task"])(with_settings(cfg, settings, spec["task"]), dev, run_dirs=[run_dir])
    task.spec = spec["spec"]
    task.module = task.build(task.spec).to(dev)
    task.load_run_state_dict(0, load_weights(rd.weights(weights), dev))
    task.module.eval()
    return task
