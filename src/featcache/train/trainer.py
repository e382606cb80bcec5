"""Training any task: config, run directories, the one loop (:mod:`.loop`), final evaluation, summary.

RUN/ config.yaml  model.json  log.jsonl  training_log.csv  best.safetensors  last.safetensors
     resume.pt  summary.json  plots/training_curves.png  eval/{val,test}/...   (ARCHITECTURE.md)

Every task goes through here, the heads (fed from a cache) and the tasks that read images from a
manifest (the filter ``mnv4``, the DETR fine-tune ``detr``): the task opens and checks its data
(:meth:`featcache.heads.task.Task.open_source`), the config records it (``cache`` or ``manifest``:
path, fingerprint or sha256, path relative to the run), and :func:`conclude` writes every run's
evaluations (the same writer as ``featcache evaluate``) and its summary.json, one schema for all.

Model selection uses the validation split only; test metrics are reported, never used to choose.
An interrupted run (Ctrl-C, kill -9) resumes when the same command is run again; a rerun with
another config is refused with the difference named (``--overwrite`` replaces the run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import CacheLock
from ..cache.store import LOCK_FILE
from ..config import Config, load_config, locate, resolve_config, run_config_differences, save_config, with_setting
from ..errors import FeatcacheError, RunLockedError
from ..heads.task import Task, get_task, load_run, run_fingerprint
from ..progress import library_bars
from ..runtime import RunDir, is_run_dir, load_weights, prepare_run_dir, resolve_device, seed_everything, write_json
from .evaluate import Evaluation, write_task_evaluation
from .loop import FitResult, LoopSettings, fit


@dataclass
class RunResult:
    """A trained run of any task: its selection, val/test metrics (``{}`` for a split the task does
    not evaluate) and what the task added (``extra``: what its ``finish`` returned); it prints itself."""

    run_dir: Path
    best_epoch: int
    val: dict
    test: dict
    seconds: float
    extra: dict
    summary_keys: tuple[str, ...] = ()
    evaluations: list[Evaluation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    epochs_run: int = 0

    @property
    def images_per_second(self) -> float:
        """Training throughput of a task that reads images (the filter's ``train_images_per_s``), else NaN."""
        return float(self.extra.get("train_images_per_s", float("nan")))

    def lines(self) -> list[str]:
        out = [f"{self.run_dir}: best epoch {self.best_epoch} of {self.epochs_run}, {self.seconds:.1f} s"]
        out += [f"  {e.split}: {e.short()}" for e in self.evaluations]
        for attr, row in (self.extra.get("probe") or {}).items():
            out.append(f"  probe {attr}: raw {row['raw']:.3f} -> debiased {row['debiased']:.3f} "
                       f"(chance {row['chance']:.3f})")
        if self.extra.get("stopped"):
            out.append(f"  stopped: {self.extra['stopped']}")
        out += [f"  {n}" if n.startswith("remark:") else f"  note: {n}" for n in self.notes]
        return out


def _resolve(task_name, source_path, preset, config_file, sets, options) -> dict:
    """The resolved config of a run: the task's YAML, preset, file and ``--set`` items, then where its
    inputs are: its data (``cache.path`` or ``manifest.path``, as the task's ``source`` says) and each
    required run (``options.<name>``) as absolute paths, each required run's fingerprint in
    ``inputs.<name>.fingerprint`` (:func:`locate` adds the paths relative to the run folder)."""
    cfg = resolve_config(task_name, preset, config_file, sets)
    cls = get_task(task_name)
    given = {k: str(v) for k, v in (options or {}).items() if v is not None}
    options = {k: str(Path(v).resolve()) if k in cls.requires_runs else v for k, v in given.items()}
    cfg["options"] = options
    cfg[cls.source] = {"path": str(Path(source_path).resolve())}
    inputs = {k: {"fingerprint": run_fingerprint(v)} for k, v in options.items()
              if k in cls.requires_runs and RunDir(v).best.is_file()}
    if inputs:
        cfg["inputs"] = inputs
    return cfg


def resolve_inputs(task: Task, device) -> None:
    """Load the finished runs a task requires (``requires_runs``) into ``task.inputs``."""
    for option, needed in task.requires_runs.items():
        path = task.conf.options.as_dict().get(option)
        if not path:
            raise FeatcacheError(f"{task.name} needs a finished {needed} run: pass --{option} RUN")
        if not Path(path).exists():
            raise FeatcacheError(f"--{option} {path} does not exist")
        run = load_run(path, device)
        if run.name != needed:
            raise FeatcacheError(f"--{option} {path} is a {run.name} run, not a {needed} run")
        task.inputs[option] = run


@contextmanager
def writer_lock(folders) -> Iterator[None]:
    """Hold each folder's writer lock (``FOLDER/.lock``, the cache's flock mechanism) for the block.

    A second writer of any of them is refused with one line naming the first (pid, host, start,
    command); a killed writer's lock is released by the kernel.  A folder this call created and
    left empty (the block failed before writing) is removed again.
    """
    created = []
    with ExitStack() as stack:
        try:
            for f in map(Path, folders):
                if f.exists() and not f.is_dir():
                    raise FeatcacheError(f"{f} exists and is not a directory; choose a new --out")
                if not f.exists():
                    f.mkdir(parents=True)
                    created.append(f)
                stack.enter_context(CacheLock(f, error=RunLockedError))
            yield
        finally:
            stack.close()
            for f in reversed(created):
                try:
                    f.rmdir()  # only when empty
                except OSError:
                    pass


def _start_or_resume(out: Path, cfg: dict, overwrite: bool, extend: bool = False) -> bool:
    """True when ``out`` holds an interrupted run of this very config (it resumes); with ``extend``
    also a finished run (with its resume point) whose config differs only by more ``training.epochs``
    (it is extended)."""
    if overwrite or not is_run_dir(out):
        return False
    rd = RunDir(out)
    finished = rd.summary.is_file()
    if finished and not extend:
        raise FeatcacheError(f"{out} already holds a finished run; pass --overwrite to replace it, or choose a new --out")
    if not rd.resume.is_file() or not rd.config.is_file():
        if finished:
            raise FeatcacheError(f"{out} holds a finished run without its resume point (resume.pt), so it cannot be "
                                 "extended; train it with --keep-resume to extend it later, or pass --overwrite")
        return False  # nothing finished: started afresh below (prepare_run_dir replaces it)
    saved = load_config(rd.config)
    if extend:
        old, epochs = Config.of(saved).training.epochs, Config.of(cfg).training.epochs
        if epochs < old:
            raise FeatcacheError(f"cannot resume {out} to {epochs} epochs: it was set up for {old}")
        saved = with_setting(saved, "training.epochs", epochs)
    diffs = run_config_differences(saved, cfg)
    if diffs:
        raise FeatcacheError(f"{out} holds an interrupted run with another config ({'; '.join(diffs[:4])}); "
                             "rerun it with the same options to resume, or pass --overwrite to replace it")
    return True


@dataclass
class _Job:
    """What :func:`train_runs` hands to the locked part: the options besides the runs."""

    overwrite: bool = False
    progress: bool = True
    echo: object = None
    keep_resume: bool = False
    extend: bool = False
    lr: float | None = None
    on_epoch_end: object = None


def train_runs(task_name: str, source_path, outs: list, *, cfgs: list[dict], overwrite: bool = False,
               progress: bool = True, echo=None, keep_resume: bool = False, extend: bool = False,
               lr: float | None = None, on_epoch_end=None) -> list[RunResult]:
    """Train R runs of one task stacked in one job (R = 1: ``train-head``); one run directory each.

    ``source_path`` is the task's data (a cache, or a manifest for the tasks that read images).
    ``keep_resume``: keep each finished run's resume point (``resume.pt``: the weights and AdamW's
    two moments, about 1.5 times the run's two weight files); by default it is deleted when the
    run finishes (the run is complete without it; extending it to more epochs needs it).
    ``extend``: a finished run (kept with its resume point) whose config asks for more
    ``training.epochs`` trains on to them, its schedule restarting from the last learning rate used
    or from ``lr``. ``on_epoch_end(epoch, rows)`` is called after each epoch's resume points are
    written (a notebook hook; raising in it interrupts the runs)."""
    outs = [Path(o) for o in outs]
    cls = get_task(task_name)
    keys = {cls.stack_key(c) for c in cfgs}
    if len(keys) > 1:
        raise FeatcacheError(f"{len(cfgs)} runs of {task_name} differ in more than seed and loss weights; "
                             "train them as separate jobs")
    dev_name = Config.of(cfgs[0]).training.device
    device = resolve_device(None if dev_name == "auto" else dev_name, what="training.device")
    source = cls.open_source(source_path)
    for o, c in zip(outs, cfgs):
        c.setdefault(source.kind, {}).update(source.record())
        locate(c, o)
    settings = LoopSettings.from_config(cfgs)
    job = _Job(overwrite, progress, echo, keep_resume, extend, lr, on_epoch_end)
    with writer_lock(outs), library_bars(progress):  # -q: a library's own bars (transformers' loading) too
        return _train_locked(task_name, cls, source, device, outs, cfgs, settings, job)


def _train_locked(task_name, cls, source, device, outs, cfgs, settings, job: _Job) -> list[RunResult]:
    """:func:`train_runs` once every run folder's writer lock is held."""
    overwrite, echo = job.overwrite, job.echo
    resumes = [_start_or_resume(o, c, overwrite, job.extend) for o, c in zip(outs, cfgs)]
    if any(resumes) and not all(resumes):
        raise FeatcacheError("some of these runs were interrupted and some not; train them one by one")
    seed_everything(settings.seeds[0])
    task: Task = cls(cfgs, device, run_dirs=outs)
    resolve_inputs(task, device)
    task.load(source.data)
    task.spec = task.make_spec()
    task.module = task.build(task.spec).to(device)
    if resumes[0]:  # a resumed run's config records what it resumed with: a new length, its logging
        for o, c in zip(outs, cfgs):
            save_config(c, RunDir(o).config)
    if not resumes[0]:
        for o, c in zip(outs, cfgs):
            rd = RunDir(o)
            prepare_run_dir(o, overwrite=True if is_run_dir(o) and not rd.summary.is_file() else overwrite,
                            keep=(LOCK_FILE,))
            save_config(c, rd.config)
            write_json(rd.model, {"task": task_name, "spec": task.spec})
    elif echo:
        echo(f"resuming {', '.join(map(str, outs))} from its last finished epoch")
    t0 = time.perf_counter()
    preset = task.conf.preset
    label = f"train {task_name}" + (f":{preset}" if preset and len(cfgs) == 1 else "")
    fits = fit(task, outs, settings, resume=resumes[0], lr=job.lr if resumes[0] else None, desc=label,
               progress=job.progress, echo=echo, on_epoch_end=job.on_epoch_end)
    return conclude(task, fits, cfgs, time.perf_counter() - t0, keep_resume=job.keep_resume)


def run_bytes(task: Task) -> dict[str, int]:
    """Bytes of one run's weight files, from its module's tensors: ``weights`` (best.safetensors;
    last.safetensors is as large) and ``resume`` (resume.pt: the weights and AdamW's two moments
    of every trainable tensor)."""
    weights = sum(v.numel() * v.element_size() for v in task.run_state_dict(0).values())
    trainable = sum(p.numel() * p.element_size() for p in task.trainable_parameters()) // max(1, task.runs)
    return {"weights": int(weights), "resume": int(weights + 2 * trainable)}


def estimate_run_bytes(task_name: str, source_path, cfg: dict) -> dict[str, int]:
    """:func:`run_bytes` of a run of ``cfg``, its module built on the CPU from its data (nothing trained)."""
    cfg = json.loads(json.dumps(cfg))
    cls = get_task(task_name)
    task: Task = cls([cfg], "cpu")
    resolve_inputs(task, "cpu")
    task.load(cls.open_source(source_path).data)
    task.spec = task.make_spec()
    task.module = task.build(task.spec)
    return run_bytes(task)


def conclude(task: Task, fits: list[FitResult], cfgs: list[dict], seconds: float, *,
             keep_resume: bool = True) -> list[RunResult]:
    """Each run's selected weights evaluated on the task's splits (:meth:`Task.eval_splits`) into
    RUN/eval/ by :func:`featcache.train.evaluate.write_task_evaluation` (what ``featcache evaluate``
    writes, the task's report and plots included), the task's ``finish``, then summary.json (one
    schema for every task: :func:`summary_record`); without ``keep_resume`` the finished run's
    resume point is deleted (after summary.json)."""
    for r, f in enumerate(fits):
        task.load_run_state_dict(r, load_weights(RunDir(f.run_dir).best, task.device))
    task.module.eval()
    written: list[dict[str, Evaluation]] = [{} for _ in fits]
    for split in task.eval_splits():  # per split: evaluated, then written (a task's plots use its last evaluation)
        results = task.evaluate(split)
        for r, f in enumerate(fits):
            written[r][split] = write_task_evaluation(task, f.run_dir, split, *results[r], cfg=cfgs[r], r=r)
    out = []
    for r, (f, cfg) in enumerate(zip(fits, cfgs)):
        extra = task.finish(f.run_dir, r) or {}
        if f.stopped:
            extra.setdefault("stopped", f.stopped)
        # the loop's note, the task's notes (e.g. a cache without demographics) and its remarks on
        # a suspicious result (e.g. Stage 1 raising the leakage it should lower)
        notes = [n for n in (f.note, *task.notes) if n] + list(extra.get("remarks", ()))
        resume = RunDir(f.run_dir).resume
        prune = not keep_resume and resume.is_file()
        if prune:
            notes.append(f"resume point pruned ({resume.stat().st_size / 2**20:.1f} MB): the run is complete "
                         "without it; pass --keep-resume to keep it (extending a run to more epochs needs it)")
        evals = written[r]
        write_json(RunDir(f.run_dir).summary, summary_record(task, f, cfg, evals, extra, notes, seconds))
        if prune:
            resume.unlink()  # after summary.json: a kill in between leaves a finished run and a spare file
        val, test = (evals[s].metrics if s in evals else {} for s in ("val", "test"))
        out.append(RunResult(f.run_dir, f.best_epoch, val, test, seconds, extra, task.summary_keys,
                             list(evals.values()), notes, f.epochs_run))
    return out


#: The top-level keys of every run's summary.json, in order (a task's ``finish`` adds its own after them).
SUMMARY_KEYS = ("task", "preset", "seed", "device", "best_epoch", "epochs_run", "selection", "rule", "score",
                "stopped", "val", "test", "evaluated", "notes", "summary_keys", "seconds")


def summary_record(task: Task, f: FitResult, cfg: dict, evals: dict[str, Evaluation], extra: dict, notes: list,
                   seconds: float) -> dict:
    """summary.json of one run: :data:`SUMMARY_KEYS` (``val`` / ``test``: each split's metrics as written
    to eval/<split>/metrics.json, with their intervals and floors, which the ablation tables compare on;
    ``{}`` for a split the task does not evaluate; ``evaluated``: the splits it did), then the task's extras."""
    conf = Config.of(cfg)
    record = {
        "task": task.name, "preset": conf.preset, "seed": conf.training.seed,
        "device": str(task.device), "best_epoch": f.best_epoch, "epochs_run": f.epochs_run,
        "selection": conf.selection.score, "rule": conf.selection.rule, "score": f.score,
        "stopped": f.stopped, "val": evals["val"].metrics if "val" in evals else {},
        "test": evals["test"].metrics if "test" in evals else {}, "evaluated": list(evals),
        "notes": notes, "summary_keys": list(task.summary_keys), "seconds": seconds,
    }
    return {**record, **{k: v for k, v in extra.items() if k not in record}}


def train_head(task_name: str, source, out, *, preset: str | None = None, config_file=None, sets=(),
               overwrite: bool = False, progress: bool = True, options: dict | None = None, echo=None,
               keep_resume: bool = False, extend: bool = False, lr: float | None = None,
               on_epoch_end=None) -> RunResult:
    """Train a task from its data ``source`` (a cache; a manifest for ``mnv4`` and ``detr``) into the
    run directory ``out`` (R = 1 of :func:`train_runs`, whose docstring has ``keep_resume``,
    ``extend``, ``lr`` and ``on_epoch_end``).

    ``options`` are task inputs that are not hyper-parameters (Stage 2's ``stage1`` run). An
    interrupted run in ``out`` with the same config resumes.
    """
    cfg = _resolve(task_name, source, preset, config_file, sets, options)
    return train_runs(task_name, source, [out], cfgs=[cfg], overwrite=overwrite, progress=progress, echo=echo,
                      keep_resume=keep_resume, extend=extend, lr=lr, on_epoch_end=on_epoch_end)[0]
