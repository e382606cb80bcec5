"""The one training loop: heads (R >= 1 stacked runs), the MobileNetV4 filter and the DETR fine-tune.

A *job* (:class:`featcache.heads.task.Job`: every hook declared there, with no-op defaults;
:class:`featcache.heads.task.Task` derives from it) supplies batches, a
loss and an evaluation; :func:`fit` does the rest, per run: epochs, the learning-rate schedule
(:class:`Schedule`), AdamW (fused on CUDA), per-run gradient clipping, ``training.class_balance``
(none | weight: the task's class-weighted loss, :meth:`Task.class_weighted_mean` | sampler: every
epoch draws the classes equally often, :func:`balanced_order`), selection on val by the configured
formula (:class:`Selection`: ``selection.score``, ``selection.min_epoch``, ``selection.rule:
best|last``; test is never looked at), early stopping (``training.patience``), per-epoch
checkpoints (``training.save_every``), ``log.jsonl``, ``training_log.csv``,
``plots/training_curves.png``, ``best.safetensors``, ``last.safetensors`` and the resume point
``resume.pt`` (weights, optimizer, batch-order generator, global RNG and the run's
:class:`RunState`; read with ``torch.load(weights_only=True)``, replaced atomically after every
epoch, so a run killed at any moment resumes from its last finished epoch and ends with the same
weights as an uninterrupted one). Every file name comes from :class:`featcache.runtime.RunDir`.
With ``tensorboard`` on (``logging.tensorboard: true`` in a task config, ``--tensorboard`` on
``train-head`` / ``train-e2e``) every run also writes its per-epoch scalars (train terms, val
metrics, lr, score) to ``RUN/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter``;
the ``tensorboard`` package is the optional extra ``featcache[tensorboard]``.

Stacked runs share one optimizer, so they share one learning-rate schedule: each run's resume
point keeps its own :class:`Schedule` (a run directory resumes on its own), and :func:`fit`
refuses stacked runs whose schedules differ (the task's ``stack_key`` keeps the training section,
so runs with another lr, schedule or epochs are never stacked).

This is the only file in ``src/`` that steps an optimizer.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..config import CONSTRAINTS, Config, Constraint, check_value, selection_score
from ..errors import FeatcacheError, write_atomic
from ..heads.task import Job, StepState
from ..progress import bar as progress_bar
from ..report.plots import plot_training_curves
from ..runtime import RunDir, json_default, load_state, rng_state, save_module, save_state, set_rng_state

#: The resume point's file name (:attr:`RunDir.RESUME`), for the callers that check it.
RESUME_FILE = RunDir.RESUME
#: ``training.class_balance``: none (the design's own), weight (class-weighted loss), sampler (balanced batches);
#: the options of its declared constraint (:class:`featcache.config.Training`).
CLASS_BALANCE = Constraint.parse(CONSTRAINTS["training.class_balance"]).options


@dataclass
class LoopSettings:
    """What the loop needs to know; :meth:`from_config` reads it from a task config's sections."""

    epochs: int
    batch_size: int
    lr: float
    seeds: list[int]
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    selection: str = "auc"
    min_epoch: int = 1
    rule: str = "best"
    patience: int = 0
    save_every: int = 0
    schedule: str = "constant"  # or "cosine": annealed to 0 over the epochs, stepped per epoch
    min_batch: int = 2
    tensorboard: bool = False  # per-epoch scalars to RUN/tensorboard/ (logging.tensorboard)
    plots: bool = True  # the training curves' PNG (logging.plots)
    class_balance: str = "none"  # training.class_balance: none | weight | sampler (see balanced_order)

    def __post_init__(self):
        """The settings' declared constraints (:data:`featcache.config.CONSTRAINTS`), by the one validator."""
        for key, value in (("training.epochs", self.epochs), ("training.batch_size", self.batch_size),
                           ("training.lr", self.lr), ("training.weight_decay", self.weight_decay),
                           ("training.patience", self.patience), ("training.save_every", self.save_every),
                           ("training.grad_clip", self.grad_clip), ("training.schedule", self.schedule),
                           ("training.class_balance", self.class_balance), ("selection.min_epoch", self.min_epoch),
                           ("selection.rule", self.rule)):
            check_value(key, value, CONSTRAINTS[key], "LoopSettings")

    @classmethod
    def from_config(cls, cfgs: list[dict | Config]) -> LoopSettings:
        """The settings of stacked runs' configs (run r's seed from its own config)."""
        confs = [Config.of(c) for c in cfgs]
        t, s = confs[0].training, confs[0].selection
        return cls(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seeds=[c.training.seed for c in confs],
                   weight_decay=t.weight_decay, grad_clip=t.grad_clip or 0.0, selection=s.score,
                   min_epoch=s.min_epoch, rule=s.rule, patience=t.patience, save_every=t.save_every,
                   schedule=t.schedule, class_balance=t.class_balance, tensorboard=confs[0].logging.tensorboard,
                   plots=confs[0].logging.plots)


@dataclass
class FitResult:
    """One run's training outcome (the weights of ``best_epoch`` are in ``run_dir/best.safetensors``)."""

    run_dir: Path
    best_epoch: int
    epochs_run: int
    score: float | None
    stopped: str | None
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    note: str | None = None


@dataclass
class Schedule:
    """A run's learning-rate schedule over epochs ``start``..``end``: ``constant`` at ``lr``, or
    ``cosine``, annealed from ``lr`` towards 0 and stepped per epoch."""

    kind: str
    lr: float
    start: int
    end: int

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch``."""
        if self.kind == "constant":
            return self.lr
        span = self.end - self.start + 1
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - self.start) / span))


@dataclass
class Selection:
    """One run's selection rule and its best so far: the score is ``formula`` on val
    (:func:`featcache.config.selection_score`); from epoch ``min_epoch`` on, the ``best`` epoch
    (the highest score, a NaN never) or the ``last`` one is selected; ``patience`` epochs in a row
    without a better score stop the run (never at its last epoch, ``epochs``)."""

    formula: str = "auc"
    min_epoch: int = 1
    rule: str = "best"
    patience: int = 0
    epochs: int = 1
    best_score: float = -math.inf
    best_epoch: int = 0
    bad: int = 0

    @classmethod
    def from_settings(cls, settings: LoopSettings) -> Selection:
        epochs = int(settings.epochs)  # fewer epochs than min_epoch: all compete
        return cls(settings.selection, min(int(settings.min_epoch), epochs), settings.rule, int(settings.patience),
                   epochs)

    def score(self, metrics: dict) -> float:
        return selection_score(self.formula, metrics)

    def update(self, epoch: int, score: float) -> tuple[bool, str | None]:
        """Record ``epoch``'s ``score``: (is this epoch the selected one now, a reason to stop or None)."""
        competes = epoch >= self.min_epoch
        number = competes and not math.isnan(score)
        improved = self.rule == "last" or (number and score > self.best_score)
        if improved:
            if number:
                self.best_score = score
            self.best_epoch, self.bad = epoch, 0
        elif competes:
            self.bad += 1
        if self.patience and self.bad >= self.patience and epoch < self.epochs:
            return improved, f"no better {self.formula!r} on val for {self.patience} epochs (early stopping)"
        return improved, None


@dataclass
class RunState:
    """Where one run is: the last finished ``epoch``, its :class:`Selection` (best score and epoch,
    epochs without improvement), why it ``stopped`` (None: it goes on), its ``log`` rows, its
    :class:`Schedule` and the ``note`` an extension left.  :meth:`state_dict` is the resume point's
    ``loop`` entry."""

    schedule: Schedule
    selection: Selection
    epoch: int = 0
    stopped: str | None = None
    log: list[dict] = field(default_factory=list)
    note: str | None = None

    @classmethod
    def start(cls, settings: LoopSettings) -> RunState:
        return cls(Schedule(settings.schedule, settings.lr, 1, int(settings.epochs)), Selection.from_settings(settings))

    def state_dict(self) -> dict:
        """Plain numbers, strings, lists and dicts (what ``torch.load(weights_only=True)`` reads back)."""
        sel = self.selection
        return {"epoch": self.epoch, "best_score": sel.best_score, "best_epoch": sel.best_epoch, "bad": sel.bad,
                "stopped": self.stopped, "log": list(self.log), "schedule": asdict(self.schedule), "note": self.note}

    def load_state_dict(self, sd: dict) -> None:
        """Load :meth:`state_dict`'s dict, or the ``{"epoch", "json"}`` entry of a resume point written
        before run states (the same fields as JSON, the best score None while there was none)."""
        if "json" in sd:
            sd = json.loads(sd["json"])
            sd["best_score"] = -math.inf if sd["best_score"] is None else sd["best_score"]
        self.epoch, self.stopped, self.note = int(sd["epoch"]), sd["stopped"], sd.get("note")
        self.log = list(sd["log"])
        self.schedule = Schedule(**sd["schedule"])
        self.selection.best_score = float(sd["best_score"])
        self.selection.best_epoch, self.selection.bad = int(sd["best_epoch"]), int(sd["bad"])


def plain(row: dict) -> dict:
    """``row`` as JSON's types (NumPy scalars and tensors as numbers): a log row is the same in memory,
    in ``log.jsonl`` and in the resume point."""
    return json.loads(json.dumps(row, default=json_default))


class Stepper:
    """One AdamW over every run's parameters (fused where every parameter is floating), autocast and
    its GradScaler (fp16 on CUDA), per-run gradient clipping; each run's slice of its state."""

    def __init__(self, job: Job, settings: LoopSettings):
        self.params, self.runs, self.stacked = job.trainable_parameters(), job.runs, job.max_runs > 1
        self.grad_clip = settings.grad_clip
        dev = job.device
        # fused AdamW on the CPU too: on stacked runs' large tensors it is ~7x the default per-tensor
        # loop there (6 x 12 tensors of 1280 x 1280 on the 2-core CPU: 0.05 s vs 0.41 s a step)
        fused = dev.type in ("cuda", "cpu") and all(p.is_floating_point() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay,
                                     **({"fused": True} if fused else {}))
        self.amp = job.amp_dtype if dev.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp) if self.amp is not None else _null()

    def step(self, loss: torch.Tensor) -> None:
        """Backward of the runs' summed loss, clipping, one optimizer step."""
        opt, scaler = self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss.float().sum()).backward()
        if self.grad_clip > 0:
            scaler.unscale_(opt)
            if self.stacked:
                _clip_per_run(self.params, self.grad_clip, self.runs)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        scaler.step(opt)
        scaler.update()

    def run_state(self, r: int) -> dict:
        """Run r's part of the resume point: its slice of AdamW's state, and the scaler's."""
        return {"optimizer": _slice_opt_state(self.opt.state_dict(), r, self.stacked),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_run_states(self, saved: list[dict], ref: int) -> None:
        """The runs' :meth:`run_state` parts back, stacked; step counts and the scaler from run ``ref``."""
        self.opt.load_state_dict(_stack_opt_state([s["optimizer"] for s in saved], self.stacked, ref))
        if saved[ref].get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved[ref]["scaler"])


def _slice_opt_state(opt_state: dict, r: int, stacked: bool) -> dict:
    if not stacked:
        return opt_state
    state = {i: {k: (v[r:r + 1].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
             for i, s in opt_state["state"].items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


def _stack_opt_state(states: list[dict], stacked: bool, ref: int = 0) -> dict:
    """The runs' optimizer slices as one state; what all runs share (step counts, param groups) from run ``ref``."""
    if not stacked:
        return states[ref]
    first = states[ref]
    state = {i: {k: (torch.cat([st["state"][i][k] for st in states]) if torch.is_tensor(v) and v.dim() > 0 else v)
                 for k, v in s.items()} for i, s in first["state"].items()}
    return {"state": state, "param_groups": first["param_groups"]}


def balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An epoch of ``len(labels)`` row indices drawing every class equally often (``class_balance:
    sampler``): class c gets n // C draws (the first n % C classes one more), taken from successive
    random permutations of its rows (a minority row is drawn ceil or floor of draws / rows times, a
    majority row at most once), then shuffled together.  Seeded by ``generator`` alone."""
    labels = labels.detach().cpu()
    classes = torch.unique(labels)
    n, k = len(labels), len(classes)
    picks = []
    for i, c in enumerate(classes):
        rows = torch.nonzero(labels == c).flatten()
        want = n // k + (1 if i < n % k else 0)
        rounds = -(-want // len(rows))
        picks.append(torch.cat([rows[torch.randperm(len(rows), generator=generator)] for _ in range(rounds)])[:want])
    order = torch.cat(picks)
    return order[torch.randperm(n, generator=generator)]


def _default_batches(job, gens: list[torch.Generator], batch_size: int, min_batch: int, balance: str = "none"):
    train = job.data["train"]
    n = len(train)
    if balance == "sampler":
        if "label" not in train.tensors:
            raise FeatcacheError("training.class_balance=sampler needs labelled training rows; this task has none")
        orders = torch.stack([balanced_order(train.tensors["label"], g) for g in gens]).to(job.device)
    else:
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(job.device)
    for start in range(0, n, batch_size):
        idx = orders[:, start:start + batch_size]
        if idx.shape[1] < min_batch:  # a batch of one breaks batch statistics and group losses
            continue
        yield {k: v[idx] for k, v in train.tensors.items()}, idx.shape[1]


def epoch_batches(job: Job, epoch: int, gens: list[torch.Generator], settings: LoopSettings):
    """The epoch's (batch, rows): the job's own :meth:`Job.batches`, or each run's order of ``data["train"]``."""
    own = job.batches(epoch, gens, settings.batch_size)
    if own is None:
        return _default_batches(job, gens, settings.batch_size, settings.min_batch, settings.class_balance)
    if settings.class_balance == "sampler":
        raise FeatcacheError("training.class_balance=sampler applies to heads trained from a cache; this job "
                             "draws its own batches")
    return own


def tensorboard_writers(run_dirs: list[Path]) -> list:
    """One ``SummaryWriter`` per run, logging to ``RUN/tensorboard/``; one clear error without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FeatcacheError("TensorBoard logging needs the tensorboard package: pip install 'featcache[tensorboard]' "
                             "(or pip install tensorboard), or leave out --tensorboard / logging.tensorboard") from None
    return [SummaryWriter(log_dir=str(RunDir(d).tensorboard)) for d in run_dirs]


def log_scalars(writer, row: dict, epoch: int) -> None:
    """Every finite number of an epoch's log row as a scalar: ``train_loss`` -> ``train/loss``."""
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        head, _, rest = key.partition("_")
        writer.add_scalar(f"{head}/{rest}" if head in ("train", "val") and rest else key, value, epoch)


def _clip_per_run(params, max_norm: float, runs: int) -> None:
    """Clip each run's gradient (its slice of every parameter) to ``max_norm``, as clip_grad_norm_ does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = torch.stack([g.reshape(runs, -1).float().pow(2).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(runs, *([1] * (g.dim() - 1))))


def fit(job: Job, run_dirs: list[Path], settings: LoopSettings, *, resume: bool = False, lr: float | None = None,
        desc: str = "train", progress: bool = True, echo: Callable[[str], None] | None = None,
        on_epoch_end: Callable[[int, list[dict]], None] | None = None) -> list[FitResult]:
    """Train ``job``'s R runs into ``run_dirs`` (already prepared: config.yaml, model.json).

    ``resume``: continue from each run's ``resume.pt``. When the runs had finished and
    ``settings.epochs`` is larger, the schedule restarts from the last learning rate used, or
    from ``lr`` when given, and ``echo`` says which.
    """
    R = job.runs
    dirs = [RunDir(p) for p in run_dirs]
    if len(dirs) != R or len(settings.seeds) != R:
        raise FeatcacheError(f"{R} run(s) need as many run directories and seeds")
    stepper = Stepper(job, settings)
    gens = [torch.Generator().manual_seed(int(s)) for s in settings.seeds]
    states = [RunState.start(settings) for _ in range(R)]
    start = resume_runs(job, dirs, states, gens, stepper, settings, lr, echo) if resume else 1
    if len({astuple(s.schedule) for s in states}) > 1:
        raise FeatcacheError("stacked runs share one optimizer, so one learning-rate schedule; these runs' "
                             "schedules differ: train them one by one")
    writers = tensorboard_writers([d.path for d in dirs]) if settings.tensorboard else None
    t_start = time.perf_counter()
    bar = progress_bar(range(start, settings.epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        active = [r for r in range(R) if states[r].stopped is None]
        if not active:
            break
        rows = run_epoch(job, epoch, gens, stepper, settings, {r: states[r] for r in active})
        for r, row in zip(active, rows):
            record_epoch(job, r, dirs[r], states[r], row, stepper, gens[r], settings.save_every,
                         None if writers is None else writers[r], echo)
        if R == 1:
            last = states[0].log[-1]
            bar.set_postfix(loss=f"{last.get('train_loss', float('nan')):.3f}", score=f"{last['score']:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, [s.log[-1] for s in states])
    seconds = time.perf_counter() - t_start
    for w in writers or ():
        w.close()
    return [finish_run(d, s, seconds, desc, plots=settings.plots) for d, s in zip(dirs, states)]


def resume_runs(job: Job, dirs: list[RunDir], states: list[RunState], gens: list[torch.Generator], stepper: Stepper,
                settings: LoopSettings, lr: float | None, echo) -> int:
    """Load every run's resume point into the job, the optimizer, the generators and ``states``;
    extend finished runs to ``settings.epochs`` (:func:`extend_run`). Returns the first epoch to train.

    Runs stopped early (patience, a collapse) keep the epoch they stopped at; the runs still going
    must share theirs, which the global generators, the scaler and AdamW's step counts come from."""
    saved = [load_state(d.resume, job.device) for d in dirs]
    for st, s in zip(states, saved):
        st.load_state_dict(s["loop"])
    going = {st.epoch for st in states if st.stopped is None} or {max(st.epoch for st in states)}
    last = max(going)
    if len(going) != 1 or any(st.epoch > last for st in states):
        raise FeatcacheError("stacked runs resumed from different epochs: resume them one by one")
    ref = next(r for r, st in enumerate(states) if st.epoch == last)
    for r, s in enumerate(saved):
        job.load_run_state_dict(r, s["weights"])
        gens[r].set_state(s["generator"])
        job.set_run_rng_state(r, s.get("run_rng", {}))  # the run's own streams (a stacked task's dropout)
    stepper.load_run_states(saved, ref)
    set_rng_state(saved[ref]["rng"])
    epochs = int(settings.epochs)
    if any(epochs > st.schedule.end for st in states) and len({st.epoch for st in states}) > 1:
        raise FeatcacheError("stacked runs stopped at different epochs: extend them one by one")
    for d, st in zip(dirs, states):
        extend_run(d, st, epochs, last + 1, lr, echo)
        _truncate_log(d, st.epoch)
    return last + 1


def extend_run(d: RunDir, st: RunState, epochs: int, start: int, lr: float | None, echo) -> None:
    """A finished (or stopped) run asked for more ``epochs``: its schedule restarts at ``start`` from the
    last learning rate used, or ``lr``; ``lr`` without more epochs is refused."""
    sch = st.schedule
    if epochs <= sch.end:
        if lr is not None:
            raise FeatcacheError(f"{d.path}: --lr applies when extending a run to more epochs; "
                                 f"it has {sch.end} epochs (pass --epochs N with N > {sch.end})")
        return
    last = st.log[-1]["lr"] if st.log else sch.lr
    new = float(lr) if lr is not None else float(last)
    if not new > 0:
        raise FeatcacheError(f"{d.path}: the last learning rate was {last}; pass --lr to extend it")
    st.schedule = Schedule(sch.kind, new, start, epochs)
    st.stopped, st.selection.bad = None, 0
    st.note = (f"{d.path}: extending to {epochs} epochs; the {sch.kind} schedule restarts at "
               + (f"the given lr {new:g}" if lr is not None else f"the last lr used, {new:g}"))
    if echo:
        echo(st.note)


def run_epoch(job: Job, epoch: int, gens: list[torch.Generator], stepper: Stepper, settings: LoopSettings,
              going: dict[int, RunState]) -> list[dict]:
    """Train every run one epoch (a stopped one too: it is stacked with the rest, its weights no longer
    saved), evaluate on val; the log row of each run r of ``going`` ({r: its state}), in order."""
    t0 = time.perf_counter()
    state = StepState(epoch, settings.epochs)
    stepper.set_lr(next(iter(going.values())).schedule.lr_at(epoch))  # one schedule for all (checked by fit)
    job.module.train()
    means = train_epoch(job, epoch_batches(job, epoch, gens, settings), stepper, state)
    job.module.eval()
    vals = job.evaluate("val")
    values = job.epoch_values(state)
    seconds = time.perf_counter() - t0
    rows = []
    for r, st in going.items():
        metrics = vals[r][0]
        rows.append(plain({"epoch": epoch, "seconds": seconds, "lr": stepper.lr, **values,
                           **{f"train_{k}": (v[r] if len(v) == job.runs else v[0]) for k, v in means.items()},
                           **{f"val_{k}": v for k, v in metrics.items() if not isinstance(v, (dict, list))},
                           "score": st.selection.score(metrics)}))
    return rows


def train_epoch(job: Job, batches, stepper: Stepper, state: StepState) -> dict[str, list[float]]:
    """One optimizer step per batch; each loss term's mean over the epoch's rows, per run (read once)."""
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for batch, k in batches:
        with stepper.autocast():
            loss, terms = job.batch_loss(batch, state)
        stepper.step(loss)
        seen += k
        for name, value in {"loss": loss, **terms}.items():  # on the device; read once an epoch
            v = torch.as_tensor(value, device=job.device).detach().float().reshape(-1) * k
            sums[name] = sums[name] + v if name in sums else v
    return {k: (v / max(seen, 1)).cpu().tolist() for k, v in sums.items()}


def record_epoch(job: Job, r: int, d: RunDir, st: RunState, row: dict, stepper: Stepper, gen: torch.Generator,
                 save_every: int, writer, echo) -> None:
    """Run r's end of an epoch: its log row (log.jsonl, TensorBoard), the selection (best.safetensors),
    the checkpoint, the stop decision, last.safetensors and, last, the resume point."""
    epoch = row["epoch"]
    st.epoch = epoch
    st.log.append(row)
    with open(d.log, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if writer is not None:
        log_scalars(writer, row, epoch)
        writer.flush()
    weights = job.run_state_dict(r)
    improved, patience_stop = st.selection.update(epoch, row["score"])
    if improved:
        save_module(weights, d.best)
    if save_every and epoch % save_every == 0:
        d.checkpoint(epoch).parent.mkdir(exist_ok=True)
        save_module(weights, d.checkpoint(epoch))
    reason = job.stop_reason(row, r)
    st.stopped = patience_stop if reason is None else reason
    save_module(weights, d.last)
    save_state({"weights": weights, **stepper.run_state(r), "generator": gen.get_state(), "rng": rng_state(),
                "run_rng": job.run_rng_state(r), "loop": st.state_dict()}, d.resume)
    if st.stopped and echo:
        echo(f"{d.path}: stopped at epoch {epoch}: {st.stopped}")


def finish_run(d: RunDir, st: RunState, seconds: float, desc: str, *, plots: bool = True) -> FitResult:
    """training_log.csv and (with ``plots``) the training curves of a run; its :class:`FitResult`.  When no epoch ever
    competed with a number, the last one is kept as the selected one, with a note."""
    note = st.note
    if st.selection.best_epoch == 0:
        shutil.copy(d.last, d.best)
        st.selection.best_epoch = st.epoch
        note = f"every selection score was NaN; the last epoch ({st.epoch}) is kept"
    log = pd.DataFrame(st.log)
    write_atomic(d.log_csv, log.to_csv(index=False))
    if plots:
        d.plots.mkdir(exist_ok=True)
        name = d.path.name
        plot_training_curves(log, d.curves, best_epoch=st.selection.best_epoch,
                             title=f"{d.path.parent.name}/{name}, {desc}" if name.startswith("seed") else f"{name}, {desc}")
    best = st.selection.best_score
    return FitResult(d.path, st.selection.best_epoch, st.epoch, best if best > -math.inf else None, st.stopped,
                     st.log, seconds, note)


def _truncate_log(d: RunDir, epoch: int) -> None:
    """Keep the log rows of finished epochs (a kill may have come between the log and the resume point)."""
    if d.log.is_file():
        rows = [ln for ln in d.log.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        write_atomic(d.log, "".join(r + "\n" for r in rows))  # a full disk never leaves half the log


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
