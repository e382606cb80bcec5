"""The one training loop: heads (R >= 1 stacked runs), the MobileNetV4 filter and the DETR fine-tune.

A *job* supplies batches, a loss and an evaluation; :func:`fit` does the rest, per run:
epochs, the learning-rate schedule, AdamW (fused on CUDA), per-run gradient clipping,
``training.class_balance`` (none | weight: the task's class-weighted loss, :meth:`Task.class_weighted_mean`
| sampler: every epoch draws the classes equally often, :func:`balanced_order`),
selection on val by the configured formula (``selection.score``, ``selection.min_epoch``,
``selection.rule: best|last``; test is never looked at), early stopping (``training.patience``),
per-epoch checkpoints (``training.save_every``), ``log.jsonl``, ``training_log.csv``,
``plots/training_curves.png``, ``best.safetensors``, ``last.safetensors`` and the resume point
``resume.pt`` (weights, optimizer, batch-order generator, global RNG and the loop's state; read
with ``torch.load(weights_only=True)``, replaced atomically after every epoch, so a run killed
at any moment resumes from its last finished epoch and ends with the same weights as an
uninterrupted one). With ``tensorboard`` on (``logging.tensorboard: true`` in a task config,
``--tensorboard`` on ``train-head`` / ``train-e2e``) every run also writes its per-epoch scalars
(train terms, val metrics, lr, score) to ``RUN/tensorboard/`` through
``torch.utils.tensorboard.SummaryWriter``; the ``tensorboard`` package is the optional extra
``featcache[tensorboard]``.

This is the only file in ``src/`` that steps an optimizer.

The job protocol (a :class:`featcache.heads.task.Task` implements it; so do the end-to-end models):

- ``runs``, ``max_runs``, ``module``, ``device``, ``trainable_parameters()``,
  ``run_state_dict(r)``, ``load_run_state_dict(r, sd)``;
- ``batch_loss(batch, state) -> (loss (R,), {term: (R,)})``; no host sync inside;
- ``evaluate(split) -> [(metrics, predictions)] * R``;  ``epoch_values(state)``, ``stop_reason(row, r)``;
- either ``data["train"]`` (a :class:`SplitData`: the loop draws each run's order from its own
  generator seeded with the run's seed, gathers (R, B, ...) batches and skips batches of one row)
  or ``batches(epoch, generators, batch_size)`` yielding (batch, rows) itself (image loaders);
- optionally ``amp_dtype`` (``torch.float16``/``bfloat16``: autocast on CUDA, with a GradScaler for fp16).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..config import selection_score
from ..errors import FeatcacheError, write_atomic
from ..heads.task import StepState
from ..progress import bar as progress_bar
from ..report.plots import plot_training_curves
from ..runtime import json_default, load_state, rng_state, save_module, save_state, set_rng_state

RESUME_FILE = "resume.pt"
#: ``training.class_balance``: none (the design's own), weight (class-weighted loss), sampler (balanced batches).
CLASS_BALANCE = ("none", "weight", "sampler")



class OneModelJob:
    """The parts of the job protocol that every one-model job (R = 1: the MobileNetV4 filter, the
    DETR fine-tune) shares: its trainable parameters and its weights as run 0's."""

    runs = max_runs = 1
    module: torch.nn.Module

    def trainable_parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def run_state_dict(self, r: int):
        return self.module.state_dict()

    def load_run_state_dict(self, r: int, sd) -> None:
        self.module.load_state_dict(sd)

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
    class_balance: str = "none"  # training.class_balance: none | weight | sampler (see balanced_order)

    def __post_init__(self):
        for key, value, low in (("training.epochs", self.epochs, 1), ("training.batch_size", self.batch_size, 1),
                                ("training.patience", self.patience, 0), ("training.save_every", self.save_every, 0),
                                ("selection.min_epoch", self.min_epoch, 1)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise FeatcacheError(f"{key} must be an integer of at least {low}; got {value!r}")
        if not self.lr > 0:
            raise FeatcacheError(f"training.lr must be > 0; got {self.lr!r}")
        if self.rule not in ("best", "last"):
            raise FeatcacheError(f"selection.rule must be best or last; got {self.rule!r}")
        if self.schedule not in ("constant", "cosine"):
            raise FeatcacheError(f"training.schedule must be constant or cosine; got {self.schedule!r}")
        if self.class_balance not in CLASS_BALANCE:
            raise FeatcacheError(f"training.class_balance must be {', '.join(CLASS_BALANCE)}; got {self.class_balance!r}")

    @classmethod
    def from_config(cls, cfgs: list[dict]) -> LoopSettings:
        cfg = cfgs[0]
        t, s = cfg["training"], cfg.get("selection", {})
        return cls(epochs=t["epochs"], batch_size=t["batch_size"], lr=float(t["lr"]),
                   seeds=[int(c["training"]["seed"]) for c in cfgs],
                   weight_decay=float(t.get("weight_decay", 0.0)), grad_clip=float(t.get("grad_clip") or 0.0),
                   selection=s.get("score", "auc"), min_epoch=s.get("min_epoch", 1), rule=s.get("rule", "best"),
                   patience=t.get("patience", 0) or 0, save_every=t.get("save_every", 0) or 0,
                   schedule=t.get("schedule", "constant"), class_balance=str(t.get("class_balance") or "none"),
                   tensorboard=bool((cfg.get("logging") or {}).get("tensorboard", False)))


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


def lr_at(epoch: int, schedule: dict) -> float:
    """The learning rate of ``epoch`` under ``schedule`` = {kind, lr, start, end}."""
    if schedule["kind"] == "constant":
        return schedule["lr"]
    span = schedule["end"] - schedule["start"] + 1
    return schedule["lr"] * 0.5 * (1.0 + math.cos(math.pi * (epoch - schedule["start"]) / span))


def _slice_opt_state(opt_state: dict, r: int, stacked: bool) -> dict:
    if not stacked:
        return opt_state
    state = {i: {k: (v[r:r + 1].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
             for i, s in opt_state["state"].items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


def _stack_opt_state(states: list[dict], stacked: bool) -> dict:
    if not stacked:
        return states[0]
    first = states[0]
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


def tensorboard_writers(run_dirs: list[Path]) -> list:
    """One ``SummaryWriter`` per run, logging to ``RUN/tensorboard/``; one clear error without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FeatcacheError("TensorBoard logging needs the tensorboard package: pip install 'featcache[tensorboard]' "
                             "(or pip install tensorboard), or leave out --tensorboard / logging.tensorboard") from None
    return [SummaryWriter(log_dir=str(Path(d) / "tensorboard")) for d in run_dirs]


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


def fit(job, run_dirs: list[Path], settings: LoopSettings, *, resume: bool = False, lr: float | None = None,
        desc: str = "train", progress: bool = True, echo: Callable[[str], None] | None = None,
        on_epoch_end: Callable[[int, list[dict]], None] | None = None) -> list[FitResult]:
    """Train ``job``'s R runs into ``run_dirs`` (already prepared: config.yaml, model.json).

    ``resume``: continue from each run's ``resume.pt``. When the runs had finished and
    ``settings.epochs`` is larger, the schedule restarts from the last learning rate used, or
    from ``lr`` when given, and ``echo`` says which.
    """
    R, dev = job.runs, job.device
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) != R or len(settings.seeds) != R:
        raise FeatcacheError(f"{R} run(s) need as many run directories and seeds")
    if settings.class_balance == "sampler" and hasattr(job, "batches"):
        raise FeatcacheError("training.class_balance=sampler applies to heads trained from a cache; this job "
                             "draws its own batches")
    stacked = job.max_runs > 1
    params = job.trainable_parameters()
    # fused AdamW on the CPU too: on stacked runs' large tensors it is ~7x the default per-tensor
    # loop there (6 x 12 tensors of 1280 x 1280 on the 2-core CPU: 0.05 s vs 0.41 s a step)
    fused = dev.type in ("cuda", "cpu") and all(p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, **({"fused": True} if fused else {}))
    amp = getattr(job, "amp_dtype", None) if dev.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    gens = [torch.Generator().manual_seed(int(s)) for s in settings.seeds]
    epochs = int(settings.epochs)
    min_epoch = min(int(settings.min_epoch), epochs)  # fewer epochs than min_epoch: all compete
    st = [{"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad": 0, "stopped": None, "log": [],
           "schedule": {"kind": settings.schedule, "lr": settings.lr, "start": 1, "end": epochs}, "note": None}
          for _ in range(R)]
    if resume:
        saved = [load_state(d / RESUME_FILE, dev) for d in run_dirs]
        done = {int(s["loop"]["epoch"]) for s in saved}
        if len(done) != 1:
            raise FeatcacheError("stacked runs resumed from different epochs: resume them one by one")
        for r, s in enumerate(saved):
            job.load_run_state_dict(r, s["weights"])
            gens[r].set_state(s["generator"])
            if hasattr(job, "set_run_rng_state"):  # the run's own streams (a stacked task's dropout)
                job.set_run_rng_state(r, s.get("run_rng", {}))
            st[r] = json.loads(s["loop"]["json"])
            st[r]["best_score"] = -math.inf if st[r]["best_score"] is None else st[r]["best_score"]
        opt.load_state_dict(_stack_opt_state([s["optimizer"] for s in saved], stacked))
        if "scaler" in saved[0] and scaler.is_enabled():
            scaler.load_state_dict(saved[0]["scaler"])
        set_rng_state(saved[0]["rng"])
        start = done.pop() + 1
        for r in range(R):
            sch = st[r]["schedule"]
            if epochs > sch["end"]:  # extending a finished (or stopped) run
                last = st[r]["log"][-1]["lr"] if st[r]["log"] else sch["lr"]
                new = float(lr) if lr is not None else float(last)
                if not new > 0:
                    raise FeatcacheError(f"{run_dirs[r]}: the last learning rate was {last}; pass --lr to extend it")
                st[r]["schedule"] = {"kind": sch["kind"], "lr": new, "start": start, "end": epochs}
                st[r]["stopped"] = None
                st[r]["bad"] = 0
                msg = (f"{run_dirs[r]}: extending to {epochs} epochs; the {sch['kind']} schedule restarts at "
                       + (f"the given lr {new:g}" if lr is not None else f"the last lr used, {new:g}"))
                st[r]["note"] = msg
                if echo:
                    echo(msg)
            elif lr is not None:
                raise FeatcacheError(f"{run_dirs[r]}: --lr applies when extending a run to more epochs; "
                                     f"it has {sch['end']} epochs (pass --epochs N with N > {sch['end']})")
            _truncate_log(run_dirs[r], st[r]["epoch"])
    else:
        start = 1
    active = [st[r]["stopped"] is None for r in range(R)]
    writers = tensorboard_writers(run_dirs) if settings.tensorboard else None
    t_start = time.perf_counter()
    bar = progress_bar(range(start, epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        if not any(active):
            break
        t0 = time.perf_counter()
        state = StepState(epoch, epochs)
        for g, r in zip(opt.param_groups, [0] * len(opt.param_groups)):
            g["lr"] = lr_at(epoch, st[r]["schedule"])
        job.module.train()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        batches = (job.batches(epoch, gens, settings.batch_size) if hasattr(job, "batches")
                   else _default_batches(job, gens, settings.batch_size, settings.min_batch, settings.class_balance))
        for batch, k in batches:
            with torch.autocast("cuda", dtype=amp) if amp is not None else _null():
                loss, terms = job.batch_loss(batch, state)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss.float().sum()).backward()
            if settings.grad_clip > 0:
                scaler.unscale_(opt)
                if stacked:
                    _clip_per_run(params, settings.grad_clip, R)
                else:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            scaler.step(opt)
            scaler.update()
            seen += k
            for name, value in {"loss": loss, **terms}.items():  # on the device; read once an epoch
                v = torch.as_tensor(value, device=dev).detach().float().reshape(-1) * k
                sums[name] = sums[name] + v if name in sums else v
        means = {k: (v / max(seen, 1)).cpu().tolist() for k, v in sums.items()}
        job.module.eval()
        vals = job.evaluate("val")
        values = job.epoch_values(state)
        seconds = time.perf_counter() - t0
        for r in range(R):
            if not active[r]:
                continue
            metrics = vals[r][0]
            score = selection_score(settings.selection, metrics)
            row = {"epoch": epoch, "seconds": seconds, "lr": opt.param_groups[0]["lr"], **values,
                   **{f"train_{k}": (v[r] if len(v) == R else v[0]) for k, v in means.items()},
                   **{f"val_{k}": v for k, v in metrics.items() if not isinstance(v, (dict, list))}, "score": score}
            s, d = st[r], run_dirs[r]
            s["epoch"] = epoch
            s["log"].append(row)
            with open(d / "log.jsonl", "a") as fh:
                fh.write(json.dumps(row, default=json_default) + "\n")
            if writers is not None:
                log_scalars(writers[r], row, epoch)
                writers[r].flush()
            weights = job.run_state_dict(r)
            competes = epoch >= min_epoch
            if settings.rule == "last" or (competes and not math.isnan(score) and score > s["best_score"]):
                if competes and not math.isnan(score):
                    s["best_score"] = score
                s["best_epoch"], s["bad"] = epoch, 0
                save_module(weights, d / "best.safetensors")
            elif competes:
                s["bad"] += 1
            if settings.save_every and epoch % settings.save_every == 0:
                (d / "checkpoints").mkdir(exist_ok=True)
                save_module(weights, d / "checkpoints" / f"epoch_{epoch:04d}.safetensors")
            reason = job.stop_reason(row, r)
            if reason is None and settings.patience and s["bad"] >= settings.patience and epoch < epochs:
                reason = f"no better {settings.selection!r} on val for {settings.patience} epochs (early stopping)"
            s["stopped"] = reason
            save_module(weights, d / "last.safetensors")
            loop_json = json.dumps({**s, "best_score": s["best_score"] if s["best_score"] > -math.inf else None},
                                   default=json_default)
            save_state({"weights": weights, "optimizer": _slice_opt_state(opt.state_dict(), r, stacked),
                        "generator": gens[r].get_state(), "rng": rng_state(),
                        "run_rng": job.run_rng_state(r) if hasattr(job, "run_rng_state") else {},
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "loop": {"epoch": epoch, "json": loop_json}}, d / RESUME_FILE)
            if reason:
                active[r] = False
                if echo:
                    echo(f"{d}: stopped at epoch {epoch}: {reason}")
        if R == 1:
            last = st[0]["log"][-1]
            bar.set_postfix(loss=f"{last.get('train_loss', float('nan')):.3f}", score=f"{last['score']:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, [s["log"][-1] for s in st])
    seconds = time.perf_counter() - t_start
    for w in writers or ():
        w.close()
    results = []
    for r, d in enumerate(run_dirs):
        s = st[r]
        note = s.get("note")
        if s["best_epoch"] == 0:  # no epoch ever competed with a number: keep the last, and say so
            shutil.copy(d / "last.safetensors", d / "best.safetensors")
            s["best_epoch"] = s["epoch"]
            note = f"every selection score was NaN; the last epoch ({s['epoch']}) is kept"
        log = pd.DataFrame(s["log"])
        write_atomic(d / "training_log.csv", log.to_csv(index=False))
        (d / "plots").mkdir(exist_ok=True)
        plot_training_curves(log, d / "plots" / "training_curves.png", best_epoch=s["best_epoch"],
                             title=f"{d.parent.name}/{d.name}, {desc}" if d.name.startswith("seed") else f"{d.name}, {desc}")
        best = s["best_score"]
        results.append(FitResult(d, s["best_epoch"], s["epoch"], best if best > -math.inf else None, s["stopped"],
                                 s["log"], seconds, note))
    return results


def _truncate_log(run_dir: Path, epoch: int) -> None:
    """Keep the log rows of finished epochs (a kill may have come between the log and the resume point)."""
    f = run_dir / "log.jsonl"
    if f.is_file():
        rows = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        write_atomic(f, "".join(r + "\n" for r in rows))  # a full disk never leaves half the log


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
