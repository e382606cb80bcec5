"""`featcache ablate`: every preset x seed of a task, trained as few stacked jobs, then tabled.

1. **Plan and validate** (before anything trains): presets exist, seeds are non-empty and
   unique, the finished runs a task needs (Stage 2's ``--stage1``) exist, every ``--eval`` cache
   exists and was extracted with the training cache's backbone, every config passes the task's
   checks (e.g. Stage 2's warm-up).  Run ``r`` of the plan is ``out/<preset>/seed<k>``.
2. **Group**: runs whose ``Task.stack_key`` is equal (same cache, architecture and training
   hyper-parameters; they differ in seed and loss coefficients) form one group, trained as ONE job
   by :func:`featcache.train.trainer.train_runs` (at most ``max_runs`` runs per job); the command
   says once which groups were formed and why runs were grouped apart.  Every run writes its own
   run directory exactly as ``train-head`` does.
3. **Resume**: a finished run (``summary.json`` present, same config) is reused; a half-written
   run (no ``summary.json``) is redone from scratch, never reused.
4. **Devices**: the groups are spread over ``devices`` (default: every visible GPU, else the CPU),
   one spawned process per device (in-process with one device).  Out of GPU memory, a group is
   split in two and retried, with one line saying so.  ``shard=(i, n)`` trains only the i-th of n
   contiguous blocks of the run list (SLURM array jobs); ``collect=True`` trains nothing and tables
   the finished runs, listing the missing ones.
5. **Tables**: ``ablation.csv`` (rounded; one row per run), ``ablation.json`` (full precision),
   ``ablation.md`` (mean ± sd per preset, paired differences to ``none`` and to ``baseline``),
   a plot with error bars.  Each task tables its own metrics (Stage 1: cos, adversary accuracies,
   leakage probes raw vs debiased; XAI: its localisation metrics).
"""

from __future__ import annotations

import json
import queue as queue_mod
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..cache import open_cache
from ..config import (
    Config,
    config_differences,
    load_config,
    presets_of,
    run_config_differences,
    with_setting,
    without_keys,
)
from ..errors import FeatcacheError, write_atomic
from ..heads.task import backbone_identity, check_run_dir, check_same_backbone, get_task, list_tasks
from ..metrics.compare import EXCESS, excess, paired_differences, without_degenerate
from ..metrics.fairness import FAIRNESS_KEYS
from ..report.plots import plot_ablation
from ..report.protocol import CROSS_METRICS, LOMO_METRICS, long_rows, write_protocol
from ..report.tables import ABLATION_METRICS, ablation_table, metrics_line, write_csv_rounded
from ..runtime import RunDir, write_json
from .evaluate import evaluate_head
from .trainer import _resolve, estimate_run_bytes, train_runs, writer_lock


@dataclass
class PlannedRun:
    """One preset x seed of the ablation: its run directory and resolved config."""

    preset: str
    seed: int
    out: Path
    cfg: dict
    held_out: str | None = None  # --protocol lomo: the manipulation method this run never trains on

    @property
    def label(self) -> str:
        fold = f" without {self.held_out}" if self.held_out is not None else ""
        return f"{self.preset}{fold} seed {self.seed}"


@dataclass
class AblationResult:
    """The ablation's table (one row per finished run), its markdown, and what happened."""

    task: str
    out: Path
    table: pd.DataFrame
    markdown: str
    groups: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    diffs: pd.DataFrame | None = None
    files: list[str] = field(default_factory=list)


# -- planning and validation -----------------------------------------------------------------
def parse_shard(text) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N, as ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` with ``--array=0-(N-1)``)."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        i, n = text
    else:
        parts = str(text).split("/")
        try:
            i, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            i, n = None, None
        if i is None:
            raise FeatcacheError(f"--shard {text!r}: expected I/N with integers, e.g. 0/4 "
                                 "(under SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    if not (isinstance(i, int) and isinstance(n, int)) or n < 1 or not 0 <= i < n:
        raise FeatcacheError(f"--shard {i}/{n}: need N >= 1 shards and 0 <= I < N (I counts from 0, "
                             "as $SLURM_ARRAY_TASK_ID does with --array=0-(N-1))")
    return i, n


def shard_runs(runs: list, shard: tuple[int, int] | None) -> list:
    """The i-th of n contiguous, balanced blocks of the run list (every run in exactly one shard)."""
    if shard is None:
        return list(runs)
    i, n = shard
    k = len(runs)
    return list(runs[i * k // n:(i + 1) * k // n])


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise FeatcacheError("no seeds to ablate; pass --seeds 0,1,2")
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise FeatcacheError(f"seeds must be integers, got {seeds}") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise FeatcacheError(f"seed(s) {', '.join(map(str, repeated))} given twice; each seed is one run "
                             "(pass distinct seeds, e.g. --seeds 0,1,2)")
    return seeds


def _presets(task: str, presets) -> list[str]:
    known = presets_of(task)
    names = known if presets in ("all", ["all"], ("all",)) else list(presets)
    if not names:
        raise FeatcacheError(f"no presets to ablate; {task} has {', '.join(known) or 'none'} (or pass --presets all)")
    unknown = [p for p in names if p not in known]
    if unknown:
        raise FeatcacheError(f"unknown preset(s) {', '.join(unknown)}; {task} has {', '.join(known)}")
    repeated = sorted({p for p in names if names.count(p) > 1})
    if repeated:
        raise FeatcacheError(f"preset(s) {', '.join(repeated)} given twice")
    return names


def _check_evals(cache, evals: dict) -> dict[str, Path]:
    """Every eval cache exists, is finished, is of the training cache's kind and backbone, and its
    test split has rows, all labelled 0/1: checked before anything trains."""
    trained_on = backbone_identity(cache)
    out = {}
    for name, path in (evals or {}).items():
        where = f"--eval {name}={path}"
        if not name:
            raise FeatcacheError(f"{where}: the name is empty; pass NAME=CACHE, e.g. celebdf=caches/celebdf")
        if not Path(path).exists():
            raise FeatcacheError(f"{where}: the cache does not exist")
        try:
            other = open_cache(path)
            meta = other.meta(["label", "split"])
        except FeatcacheError as exc:
            raise FeatcacheError(f"{where}: {exc}") from None
        if other.kind != cache.kind:
            raise FeatcacheError(f"{where} is a {other.kind} cache; the training cache is {cache.kind}")
        check_same_backbone(trained_on, backbone_identity(other), f"the training cache {cache.path}", where)
        test = meta[meta["split"].astype(str) == "test"]
        if test.empty:
            have = ", ".join(sorted(set(meta["split"].astype(str)))) or "none"
            raise FeatcacheError(f"{where} has no rows in split 'test' (its splits: {have}); the runs are "
                                 "evaluated on an eval cache's test split")
        unknown = int((~test["label"].isin([0, 1])).sum())
        if unknown:
            raise FeatcacheError(f"{where}: {unknown} of its {len(test)} test rows have no label (0 real / 1 fake); "
                                 "an evaluation needs every test row labelled")
        out[name] = Path(path)
    return out


def fairness_unavailable(evals: dict[str, Path]) -> dict[str, str]:
    """Eval cache name -> why its fairness metrics are not available (no test row with a known
    subgroup: gender or race unknown for every row, as in Celeb-DF or DFDC)."""
    out = {}
    for name, path in evals.items():
        meta = open_cache(path).meta(["split", "subgroup"]) if _has_meta(path, "subgroup") else None
        if meta is None:
            out[name] = "the cache has no subgroup column (no demographics)"
            continue
        known = meta.loc[meta["split"].astype(str) == "test", "subgroup"].astype(int) >= 0
        if not known.any():
            out[name] = f"its test split has no demographics (gender or race unknown for all {len(known)} rows)"
    return out


def _has_meta(path, column: str) -> bool:
    return (Path(path) / "meta" / column).is_dir()


def _comparable(cfg: dict) -> dict:
    """A config as saved and reloaded, without the device (a finished run is the same run on any device)."""
    return without_keys(cfg, ["training.device"])


#: ``--protocol``: the standard one (train and test on the cache's splits) and leave-one-manipulation-out.
PROTOCOLS = ("standard", "lomo")


def lomo_methods(cache) -> list[str]:
    """The manipulation methods of a cache's fakes (its ``method`` column), each a fold of
    ``--protocol lomo``: at least two, each with test fakes, and fakes of two or more methods in
    train and in val (a fold holding one out keeps fakes to learn and select on)."""
    if not _has_meta(cache.path, "method"):
        raise FeatcacheError(f"--protocol lomo: {cache.path} has no method column; its manifest must name each "
                             "fake's manipulation method")
    meta = cache.meta(["label", "split", "method"])
    fakes = meta[meta["label"] == 1]
    methods = sorted({str(m) for m in fakes["method"] if str(m)})
    if len(methods) < 2:
        raise FeatcacheError(f"--protocol lomo needs fakes of at least two manipulation methods; {cache.path} has "
                             f"{', '.join(methods) or 'none'} in its method column")
    for split in ("train", "val", "test"):
        have = set(fakes.loc[fakes["split"].astype(str) == split, "method"].astype(str))
        lacking = [m for m in methods if m not in have]
        if split == "test" and lacking:
            raise FeatcacheError(f"--protocol lomo: {cache.path} has no test fakes of {', '.join(lacking)}, "
                                 "so those folds could not be tested")
        if len(have) < 2 and split != "test":
            raise FeatcacheError(f"--protocol lomo: the {split} split of {cache.path} has fakes of "
                                 f"{', '.join(sorted(have)) or 'no method'} only; a fold holding it out has none")
    return methods


def fold_name(method: str) -> str:
    """The folder of a held-out method's runs: ``without-<method>`` (characters unsafe in a path as _)."""
    return "without-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", method)


def plan(task: str, source_path, out, *, presets="all", seeds=(0, 1, 2), sets=(), options: dict | None = None,
         evals: dict | None = None, protocol: str = "standard") -> tuple[list[PlannedRun], dict[str, Path]]:
    """The runs of the ablation (preset-major, then held-out method with ``protocol="lomo"``, then
    seed) and the checked eval caches; raises on bad input. ``source_path``: the task's data (a
    cache; a manifest for the tasks that read images, which take no ``--eval`` and no ``lomo``)."""
    if protocol not in PROTOCOLS:
        raise FeatcacheError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    if task not in list_tasks():
        raise FeatcacheError(f"unknown task {task!r}; tasks: {', '.join(list_tasks())}")
    cls = get_task(task)
    names = _presets(task, presets)
    seeds = _check_seeds(seeds)
    source = cls.open_source(source_path)
    for option, needed in cls.requires_runs.items():
        path = (options or {}).get(option)
        if not path:
            raise FeatcacheError(f"{task} needs a finished {needed} run: pass --{option} RUN")
        check_run_dir(Path(path))
    if source.kind != "cache" and (evals or protocol != "standard"):
        raise FeatcacheError(f"--eval and --protocol lomo evaluate on feature caches; {task} reads a {source.kind}")
    checked = _check_evals(source.data, evals or {}) if source.kind == "cache" else {}
    folds: list[str | None] = [None]
    if protocol == "lomo":
        if not cls.detects:
            raise FeatcacheError(f"--protocol lomo applies to detectors; {task} is not one")
        if evals:
            raise FeatcacheError("--protocol lomo tests each fold on its held-out method; run --eval caches "
                                 "in a standard ablation")
        folds = lomo_methods(source.data)
    out = Path(out)
    runs = []
    for preset in names:
        for held in folds:
            for seed in seeds:
                cfg = _resolve(task, source_path, preset, None, [*sets, f"training.seed={seed}"], options)
                cfg[source.kind][source.key] = source.ident
                where = out / preset
                if held is not None:
                    cfg["protocol"] = {"name": "lomo", "held_out_method": held}
                    where = where / fold_name(held)
                cls.check_config(cfg)
                runs.append(PlannedRun(preset, seed, where / f"seed{seed}", cfg, held))
    return runs, checked


def finished(run: PlannedRun) -> bool:
    """True when the run directory holds a finished run of this config; a finished run of another
    config is refused (its numbers would be tabled as this ablation's)."""
    if not RunDir(run.out).summary.is_file():
        return False
    saved = RunDir(run.out).config
    diffs = run_config_differences(_comparable(load_config(saved)), _comparable(run.cfg)) if saved.is_file() else ["config"]
    if diffs:
        raise FeatcacheError(f"{run.out} holds a finished run with another config ({'; '.join(diffs[:3])}); "
                             "choose a new --out, or pass --overwrite to retrain it")
    return True


def group_runs(task: str, runs: list[PlannedRun]) -> tuple[list[list[PlannedRun]], list[str]]:
    """Runs with equal ``stack_key`` in one group (at most ``max_runs`` each), in plan order; and one
    line per group saying what it holds and, for a group apart from the first, why."""
    cls = get_task(task)
    keyed: dict[str, list[PlannedRun]] = {}
    for r in runs:
        keyed.setdefault(cls.stack_key(r.cfg), []).append(r)
    groups, lines = [], []
    first = None
    for key, members in keyed.items():
        chunks = [members[i:i + cls.max_runs] for i in range(0, len(members), cls.max_runs)]
        why = ""
        if first is None:
            first = key
        else:
            diffs = [d for d in config_differences(json.loads(first), json.loads(key))]
            why = f"; apart from the first group because {'; '.join(diffs[:3])}" if diffs else ""
        for j, chunk in enumerate(chunks):
            presets = list(dict.fromkeys(r.preset for r in chunk))
            seeds = list(dict.fromkeys(r.seed for r in chunk))
            held = list(dict.fromkeys(r.held_out for r in chunk if r.held_out is not None))
            if held:
                presets = [f"{p} without {', '.join(held)}" for p in presets]
            split = (f" (part {j + 1} of {len(chunks)}: {task} stacks at most {cls.max_runs} run(s) per job)"
                     if len(chunks) > 1 else "")
            lines.append(f"group {len(groups) + 1}: {', '.join(presets)} x seeds {', '.join(map(str, seeds))} "
                         f"= {len(chunk)} run(s) as one job{split}{why if j == 0 else ''}")
            groups.append(chunk)
    return groups, lines


def default_devices() -> list[str]:
    """Every visible GPU, else the CPU."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def assign(groups: list[list], devices: list[str]) -> list[tuple[str, list[list]]]:
    """Groups to device slots (a device named twice gets two processes), largest group first onto
    the least-loaded slot (load = runs); plan order kept per slot; slots without a group left out."""
    load = [0] * len(devices)
    slots: list[list[int]] = [[] for _ in devices]
    for i in sorted(range(len(groups)), key=lambda i: -len(groups[i])):
        k = min(range(len(devices)), key=lambda k: (load[k], k))
        slots[k].append(i)
        load[k] += len(groups[i])
    return [(devices[k], [groups[i] for i in sorted(ix)]) for k, ix in enumerate(slots) if ix]


# -- training ------------------------------------------------------------------------------
def disk_estimate(task: str, cache_path, groups: list[list[PlannedRun]], out: Path, keep_resume: bool) -> str:
    """One line: what the runs to train will take on disk (their weight files, from each group's
    module built once on the CPU: :func:`featcache.train.trainer.estimate_run_bytes`) and the free
    space where they go."""
    total, parts, resume_bytes = 0, [], 0
    for g in groups:
        size = estimate_run_bytes(task, cache_path, g[0].cfg)
        resume_bytes = max(resume_bytes, size["resume"])
        per_run = 2 * size["weights"] + (size["resume"] if keep_resume else 0)
        total += per_run * len(g)
        parts.append(f"{len(g)} x {_mb(per_run)}")
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    resume = ("resume points kept (--keep-resume)" if keep_resume else
              "each resume point is pruned when its run finishes; --keep-resume keeps it, "
              f"up to {_mb(resume_bytes)} a run")
    return (f"disk estimate: {' + '.join(parts)} of weights (best + last) = {_mb(total)} ({resume}; evaluation files "
            f"and plots add little); {_mb(free)} free on {where}")


def _mb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def train_group(task: str, cache_path, runs: list[PlannedRun], device: str, *, progress: bool, echo,
                keep_resume: bool = False) -> None:
    """Train one group as one job on ``device``; out of GPU memory, split it in two and retry each half."""
    cfgs = [with_setting(r.cfg, "training.device", device) for r in runs]
    try:
        results = train_runs(task, cache_path, [r.out for r in runs], cfgs=cfgs, overwrite=True, progress=progress,
                             echo=echo, keep_resume=keep_resume)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(runs) == 1:
            raise FeatcacheError(f"{runs[0].out}: out of GPU memory on {device} even as a single run; "
                                 "lower training.batch_size") from None
        half = len(runs) // 2
        echo(f"out of GPU memory training {len(runs)} runs at once on {device}: split into {half} + "
             f"{len(runs) - half} and retried")
        train_group(task, cache_path, runs[:half], device, progress=progress, echo=echo, keep_resume=keep_resume)
        train_group(task, cache_path, runs[half:], device, progress=progress, echo=echo, keep_resume=keep_resume)
        return
    keys = get_task(task).summary_keys
    for r, res in zip(runs, results):
        echo(f"{r.label}: test {metrics_line(res.test, keys) or '(no test metrics)'} ({res.seconds:.0f} s, "
             f"best epoch {res.best_epoch})")


def _device_worker(task, cache_path, groups, device, progress, messages, keep_resume=False) -> None:
    """A spawned process: train its groups on one device; every line and the outcome go to ``messages``."""
    try:
        for g in groups:
            train_group(task, cache_path, g, device, progress=progress, echo=lambda s: messages.put(("line", s)),
                        keep_resume=keep_resume)
        messages.put(("done", device))
    except Exception as exc:  # reported by the parent as one line
        messages.put(("error", f"{device}: {type(exc).__name__}: {exc}"))


def _train_on_devices(task, cache_path, by_device: list[tuple[str, list]], *, progress: bool, echo,
                      keep_resume: bool = False) -> None:
    if len(by_device) <= 1:
        for device, groups in by_device:
            for g in groups:
                train_group(task, cache_path, g, device, progress=progress, echo=echo, keep_resume=keep_resume)
        return
    ctx = torch.multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_device_worker, args=(task, str(cache_path), groups, device, False, messages,
                                                             keep_resume))
             for device, groups in by_device]
    for p in procs:
        p.start()
    errors, done = [], 0
    while done < len(procs):
        try:
            kind, text = messages.get(timeout=1.0)
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs) and messages.empty():
                break
            continue
        if kind == "line":
            echo(text)
        else:
            done += 1
            if kind == "error":
                errors.append(text)
    for p in procs:
        p.join()
    crashed = [f"exit code {p.exitcode}" for p in procs if p.exitcode not in (0, None)]
    if errors or crashed:
        raise FeatcacheError(f"training failed on {len(errors) + len(crashed)} device(s): "
                             f"{'; '.join(errors + crashed)}; finished runs are kept, rerun to resume")


# -- tables ----------------------------------------------------------------------------------
def in_domain_metrics(run_dir: Path, summary: dict) -> dict:
    """A run's test metrics on its own cache with their bootstrap intervals (RUN/eval/test/metrics.json;
    the summary's test metrics, without intervals, when that file is missing)."""
    f = RunDir(run_dir).eval("test") / RunDir.METRICS
    return json.loads(f.read_text()) if f.is_file() else dict(summary.get("test") or {})


def _lomo_tables(task, cache, out, df, lomo, runs, lines, trained, reused, missing) -> AblationResult:
    """A leave-one-manipulation-out ablation's files: ablation.csv/json (one row per run, with its
    held-out method) and the LOMO table lomo.{csv,md,png} (rows presets, columns held-out methods)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv_rounded(df, out / "ablation.csv").name]
    write_json(out / "ablation.json", df.to_dict(orient="records"))
    files.append("ablation.json")
    methods = list(dict.fromkeys(r.held_out for r in runs))
    markdown, _, written = write_protocol(
        pd.DataFrame(lomo), out, "lomo", {m: f"without {m}" for m in methods}, LOMO_METRICS,
        what="held-out manipulation method (test: its fakes and the test reals; trained and selected on "
             "the other methods)", title=f"{task} leave-one-manipulation-out: {Path(cache).name}")
    files += written
    if missing:
        markdown += f"\nmissing runs (not finished, left out of the tables): {', '.join(missing)}\n"
    write_atomic(out / "ablation.md", markdown)
    files.append("ablation.md")
    return AblationResult(task, out, df, markdown, lines, trained, reused, missing, None, files)


def run_row(run: PlannedRun, summary: dict) -> dict:
    """One table row from a run's summary.json: val/test metrics (and each fairness gap minus its
    no-disparity floor, ``<split>_<gap>_excess``, when the metrics carry ``fairness_null``; ECE minus
    ``ece_floor`` likewise), Stage 1's probes, timing."""
    row = {"preset": run.preset, "seed": run.seed, "best_epoch": summary.get("best_epoch"),
           "seconds": summary.get("seconds")}
    for split in ("val", "test"):
        metrics = summary.get(split) or {}
        row.update({f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float, bool)) or v is None})
        row.update({f"{split}_{k}": v for k, v in excess(metrics).items()})
    for attr, probe in (summary.get("probe") or {}).items():
        for k in ("raw", "debiased", "chance"):
            if k in probe:
                row[f"probe_{attr}_{k}"] = probe[k]
    return row


def _metric_sets(task: str, df: pd.DataFrame) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(split, metric names, compared metric names) of each table: a detector's ablation metrics,
    else the task's own.  A detector's presets are compared on each fairness gap minus its floor
    (the raw gap when no floor was recorded: no verdict) and on ECE minus its floor (else Brier and
    NLL when present, else the raw ECE: no verdict)."""
    cls = get_task(task)
    shown = ABLATION_METRICS if cls.detects else tuple(cls.summary_keys)
    sets = [("test", shown, _compared("test", shown, df) if cls.detects else shown)]
    probes = tuple(dict.fromkeys(c[len("probe_"):] for c in df.columns
                                 if c.startswith("probe_") and not c.endswith("_chance")))
    if probes:
        sets.append(("probe", probes, probes))
    return sets


def tables(task: str, df: pd.DataFrame, out: Path, *, evals=(), baselines=(), title: str = "") -> tuple[str, pd.DataFrame | None, list[str]]:
    """ablation.md's markdown, the paired differences, and the files written (csv, json, md, plot).

    The differences combine the seeds with the test-set noise from each run's
    ``<preset>/seed<k>/eval/<test or NAME_test>/predictions.csv`` under ``out``
    (:func:`featcache.metrics.compare.paired_differences`); a column whose runs lack it gets the
    interval over seeds alone, and the table says so."""
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv_rounded(df, out / "ablation.csv").name]
    write_json(out / "ablation.json", df.to_dict(orient="records"))
    files.append("ablation.json")
    parts, all_diffs = [], []
    for split, metrics, compared in _metric_sets(task, df):
        cols = [f"{split}_{m}" for m in compared if f"{split}_{m}" in df] + [f"{e}_auc" for e in evals if f"{e}_auc" in df]
        predictions = _run_predictions(out, df, ["test", *evals]) if split == "test" else None
        diffs = [paired_differences(df, cols, baseline=b, predictions=predictions)
                 for b in baselines if b in set(df["preset"])]
        heading = title if split == "test" else "leakage probes (val accuracy, raw vs debiased features)"
        parts.append(ablation_table(df, diffs[0] if diffs else None, evals=evals if split == "test" else (),
                                    metrics=metrics, split=split, title=heading))
        for d in diffs[1:]:  # a further baseline: its differences only
            text = ablation_table(df, d, evals=evals if split == "test" else (), metrics=metrics, split=split)
            start = text.find("\npaired difference")
            if start >= 0:
                parts.append(text[start:])
        all_diffs += [d.assign(split=split) for d in diffs]
    cls = get_task(task)
    if cls.ablation_notes:
        parts.append(cls.ablation_notes)
    markdown = "\n".join(parts)
    write_atomic(out / "ablation.md", markdown)
    files.append("ablation.md")
    diffs_df = pd.concat(all_diffs, ignore_index=True) if all_diffs else None
    if diffs_df is not None and len(diffs_df):
        small = diffs_df["v_test"].map(lambda v: f"{v:.4g}")  # a variance of AUC differences is ~1e-5: not rounded to 0
        write_csv_rounded(diffs_df.assign(v_test=small), out / "ablation_differences.csv")
        files.append("ablation_differences.csv")
    x, y = cls.ablation_axes
    if x in df and y in df and df[[x, y]].notna().any().all():
        name = f"ablation_{y.removeprefix('test_')}_vs_{x.removeprefix('test_')}.png"
        plot_ablation(without_degenerate(df), out / name, x=x, y=y, title=title)  # degenerate gaps say nothing
        files.append(name)
    return markdown, diffs_df, files


def ablate(task: str, cache, out, *, presets="all", seeds=(0, 1, 2), evals: dict | None = None, sets=(),
           options: dict | None = None, baseline: str | None = None, devices=None, shard=None,
           collect: bool = False, overwrite: bool = False, progress: bool = True, echo=print,
           protocol: str = "standard", keep_resume: bool = False) -> AblationResult:
    """Train every preset x seed into ``out/<preset>/seed<k>`` as stacked jobs and table them.

    ``cache`` is the task's data: a feature cache, or a manifest for the tasks that read images
    (``mnv4``, ``detr``; ``featcache ablate TASK --manifest M``).

    ``protocol="lomo"``: leave one manipulation method out: every preset x held-out method x seed
    into ``out/<preset>/without-<method>/seed<k>``, tabled in lomo.{csv,md,png}.

    See the module docstring.  ``devices``: torch devices to spread the groups over (None: every
    visible GPU, else the CPU; a config's explicit ``training.device`` when not ``auto``).
    ``shard``: ``(i, n)`` or ``"i/n"``: train only that share and write no tables (run with
    ``collect=True`` once every shard finished).  ``collect``: train nothing, table the finished
    runs.  ``overwrite``: retrain finished runs too.
    """
    out = Path(out)
    shard = parse_shard(shard) if shard is not None else None
    runs, eval_caches = plan(task, cache, out, presets=presets, seeds=seeds, sets=sets, options=options, evals=evals,
                             protocol=protocol)
    names = list(dict.fromkeys(r.preset for r in runs))
    if baseline is not None and baseline not in names:
        raise FeatcacheError(f"--baseline {baseline} is not among the presets ({', '.join(names)}); add it to --presets")
    # one writer at a time: the whole ablation folder for a full run or --collect; a shard (one of
    # several running at once by design) is protected run by run (train_runs locks each run folder)
    with writer_lock([out]) if shard is None or collect else nullcontext():
        return _ablate_locked(task, cache, out, runs, eval_caches, names, baseline, devices, shard, collect,
                              overwrite, progress, echo, keep_resume)


def _ablate_locked(task, cache, out, runs, eval_caches, names, baseline, devices, shard, collect, overwrite,
                   progress, echo, keep_resume) -> AblationResult:
    """:func:`ablate` once the plan is checked (and the ablation folder's writer lock held)."""
    mine = shard_runs(runs, shard)
    done = {id(r) for r in mine if not overwrite and finished(r)}
    if not collect and not overwrite:
        for r in runs:  # a finished run of another config anywhere in the ablation is refused before training
            finished(r)
    reused = [r.label for r in mine if id(r) in done]
    todo = [r for r in mine if id(r) not in done]
    trained: list[str] = []
    lines: list[str] = []
    if shard is not None:
        echo(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(runs)} runs ({', '.join(r.label for r in mine) or 'none'})")
    if reused:
        echo(f"{len(reused)} finished run(s) reused: {', '.join(reused)}")
    if todo and not collect:
        half = [r.label for r in todo if r.out.exists()]
        if half:
            echo(f"{len(half)} half-written run(s) redone from scratch: {', '.join(half)}")
        groups, lines = group_runs(task, todo)
        if devices is None:
            dev = str(Config.of(todo[0].cfg).training.device or "auto")
            devices = [dev] if dev not in ("auto", "") else default_devices()
        devices = [devices] if isinstance(devices, str) else list(devices)
        if not devices:
            raise FeatcacheError("--devices is empty; name devices like cuda:0,cuda:1 or cpu")
        by_device = assign(groups, devices)
        echo(f"{len(todo)} run(s) to train in {len(groups)} group(s) on "
             f"{', '.join(d for d, _ in by_device)}" + (" (one process each)" if len(by_device) > 1 else "") + ":")
        for line in lines:
            echo(f"  {line}")
        echo(disk_estimate(task, cache, groups, out, keep_resume))
        _train_on_devices(task, cache, by_device, progress=progress, echo=echo, keep_resume=keep_resume)
        trained = [r.label for r in todo]
    title = f"{task} ablation: {out}"
    if shard is not None and not collect:
        msg = (f"shard {shard[0]}/{shard[1]} done; when every shard has finished, run the same command with "
               "--collect (instead of --shard) to write the tables")
        echo(msg)
        return AblationResult(task, out, pd.DataFrame(), msg, lines, trained, reused, [], None, [])
    rows, missing, cross, lomo = _collect_rows(runs, eval_caches)
    if not rows:
        raise FeatcacheError(f"no finished run in {out} to table ({len(missing)} missing); train them first "
                             "(without --collect)")
    df = pd.DataFrame(rows)
    if lomo:
        return _lomo_tables(task, cache, out, df, lomo, runs, lines, trained, reused, missing)
    baselines = list(dict.fromkeys([b for b in ("none" if "none" in names else None, baseline) if b]))
    if not baselines and len(names) > 1:
        baselines = [names[0]]
    markdown, diffs, files = tables(task, df, out, evals=list(eval_caches), baselines=baselines, title=title)
    if cross:
        datasets = {"test": f"{Path(cache).name} (in-domain)", **{n: n for n in eval_caches}}
        text, _, written = write_protocol(
            pd.DataFrame(cross), out, "cross_dataset", datasets, CROSS_METRICS, what="test set",
            title=f"cross-dataset: trained on {Path(cache).name}, tested on {', '.join(datasets.values())}",
            unavailable=fairness_unavailable(eval_caches))
        markdown += "\n" + text
        write_atomic(out / "ablation.md", markdown)
        files += written
    if missing:
        note = f"\nmissing runs (not finished, left out of the tables): {', '.join(missing)}\n"
        markdown += note
        write_atomic(out / "ablation.md", markdown)
    return AblationResult(task, out, df, markdown, lines, trained, reused, missing, diffs, files)


def _collect_rows(runs, eval_caches: dict) -> tuple[list[dict], list[str], list[dict], list[dict]]:
    """The finished runs' table rows (each evaluated on every eval cache), the labels of the runs
    not finished, and the long rows of the cross-dataset and LOMO tables."""
    rows, missing, cross, lomo = [], [], [], []
    for r in runs:
        if not finished(r):
            missing.append(r.label)
            continue
        summary = json.loads(RunDir(r.out).summary.read_text())
        row = run_row(r, summary)
        if r.held_out is not None:
            row = {"preset": row.pop("preset"), "held_out": r.held_out, **row}
            lomo += long_rows(r.preset, r.seed, r.held_out, in_domain_metrics(r.out, summary), LOMO_METRICS)
        if eval_caches:
            cross += long_rows(r.preset, r.seed, "test", in_domain_metrics(r.out, summary), CROSS_METRICS)
        for name, other in eval_caches.items():
            metrics = evaluate_head(r.out, other, split="test", name=name).metrics
            row.update({f"{name}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
            cross += long_rows(r.preset, r.seed, name, metrics, CROSS_METRICS)
        rows.append(row)
    return rows, missing, cross, lomo


def _compared(split: str, metrics, df: pd.DataFrame) -> tuple[str, ...]:
    """The metrics a detector's presets are compared on (see :func:`_metric_sets`)."""
    out = []
    for m in metrics:
        if (m in FAIRNESS_KEYS or m == "ece") and f"{split}_{m}{EXCESS}" in df:
            out.append(f"{m}{EXCESS}")
        elif m == "ece" and any(f"{split}_{k}" in df for k in ("brier", "nll")):
            out += [k for k in ("brier", "nll") if f"{split}_{k}" in df]
        else:
            out.append(m)
    return tuple(out)


def _run_predictions(out: Path, df: pd.DataFrame, prefixes) -> dict[str, dict]:
    """``{prefix: {(preset, seed): predictions}}`` from each run's ``eval/<split>/predictions.csv``
    (prefix ``test``) or ``eval/<name>_test/predictions.csv`` (an eval cache's); runs without the file
    are left out (their columns then get intervals over seeds alone)."""
    wanted = {"sample_id", "label", "prob", "subgroup", "identity"}
    found: dict[str, dict] = {}
    for prefix in prefixes:
        tag = "test" if prefix == "test" else f"{prefix}_test"
        for preset, seed in df[["preset", "seed"]].itertuples(index=False):
            path = RunDir(out / str(preset) / f"seed{seed}").eval(tag) / RunDir.PREDICTIONS
            if path.is_file():
                table = pd.read_csv(path, usecols=lambda c: c in wanted, dtype={"identity": str, "sample_id": str})
                found.setdefault(prefix, {})[(preset, seed)] = table
    return found
