"""The one evaluation writer: ``RUN/eval/<name>_<split>/{predictions.csv, metrics.json, report.md, plots/}``.

Every task's run (:func:`evaluate_head`: the heads on a cache, the filter and the DETR fine-tune
on a manifest; the end of training goes through the same :func:`write_task_evaluation`) and any
detector's predictions CSV (``featcache score``, :mod:`featcache.train.score` reads it) all end
here: the same files, the same subgroup table and ROC for detectors, and the task's own markdown
(:meth:`Task.report`) and plots (:meth:`Task.write_plots`). The returned :class:`Evaluation` carries its one-line summary (the task's
``summary_keys``, each with its 95 % interval), its remarks and its markdown; nothing is read back
from disk.

Intervals: when the predictions have ``label`` and ``prob`` (P(fake)), metrics.json holds
``ci95`` ({metric: [lo, hi]} for the AUC, EER, ACC and fairness metrics it reports) and
``ci95_info`` from :func:`featcache.metrics.bootstrap.with_intervals`: 1,000 seeded resamples
(seed 0), whole identities resampled when the predictions have an ``identity`` column,
stratified by label.

Test sets without demographics (Celeb-DF, DFDC: every ``subgroup`` unknown) get every detection
metric with its interval; the fairness metrics stay NaN and ``fairness_coverage`` says why
(``unavailable``: "no demographics in this test set"); the printed line and report.md say
"not available". The bootstrap then resamples without the subgroup column.

Provenance (every metrics.json): ``provenance`` = {``run`` (path), ``cache`` ({path,
fingerprint}), ``manifest`` ({path, sha256}: the tasks that read images) or ``predictions``
({path, sha256}) for ``featcache score``, ``split``,
``featcache`` (version), ``command`` (the command line, from the CLI)}.

Operating points: ``acc`` and every F_* are at P(fake) >= 0.5; ``threshold`` = {rule, value, ...}
records the run's ``evaluation.threshold`` rule (:mod:`featcache.metrics.threshold`: ``0.5``,
``val_eer`` or ``val_fpr=<x>``) and the threshold it chose on the run's own validation
predictions (``RUN/eval/val/predictions.csv``); ``at_val_threshold`` holds acc, fpr, tpr and the
fairness metrics at that threshold.

Where: :func:`evaluate_head` writes ``RUN/eval/<split>/`` for the run's own data (the same cache
fingerprint, or manifest sha256, as config.yaml records) and ``RUN/eval/<name>_<split>/`` for
other data, ``name`` defaulting to the cache's folder (the manifest's file) name. An evaluation is replaced only by the same evaluation (same
cache fingerprint and split) unless ``overwrite``; files are written to a hidden folder beside it and
moved into place at the end, so a failure leaves the previous evaluation (or nothing), never a
half-written folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..config import SOURCE_IDENTITY, Config, load_config
from ..data.manifest import SUBGROUP_NAMES
from ..errors import CacheError, FeatcacheError
from ..heads.task import Source, Task, load_run, recorded_cache
from ..metrics import subgroup_table
from ..metrics.bootstrap import with_intervals
from ..metrics.fairness import FAIRNESS_KEYS
from ..metrics.threshold import HEADLINE, choose_threshold, operating_point, parse_rule, rule_name
from ..report.plots import plot_roc, plot_subgroup_rates
from ..report.tables import (
    METRIC_MEANINGS,
    decision_marks,
    format_metric,
    markdown_table,
    metric_legend,
    metrics_line,
    write_csv_rounded,
)
from ..runtime import RunDir, read_json, write_eval

#: ``fairness_coverage["unavailable"]`` of a test set whose every row lacks gender or race.
NO_DEMOGRAPHICS = "no demographics in this test set"


@dataclass
class Evaluation:
    """One evaluated split of one run (or one predictions CSV), and where its files are."""

    run_dir: Path | None
    split: str
    out: Path
    metrics: dict
    summary_keys: tuple[str, ...]
    markdown: str
    files: list[str] = field(default_factory=list)
    subgroups: pd.DataFrame | None = None  # n, AUC, FPR, TPR, ACC per subgroup (detectors with demographics)

    def short(self) -> str:
        """The task's summary metrics on one line, each with its 95 % interval when it has one; the
        fairness metrics of a test set without demographics as "not available (why)"."""
        unavailable = fairness_unavailable(self.metrics)
        keys = [k for k in self.summary_keys if isinstance(self.metrics.get(k), (int, float))
                and not (unavailable and k in FAIRNESS_KEYS)]
        line = metrics_line(self.metrics, keys)
        if unavailable and any(k in FAIRNESS_KEYS for k in self.summary_keys):
            line += f"; fairness not available ({unavailable})"
        return line

    def details(self) -> list[str]:
        """Lines printed under :meth:`short`: the fairness coverage when partial, and the metrics at
        the threshold chosen on val."""
        out = []
        coverage = coverage_sentence(self.metrics)
        if coverage:
            out.append(coverage)
        at = self.metrics.get("at_val_threshold")
        if at:
            t = self.metrics["threshold"]
            keys = [k for k in ("acc", "fpr", "tpr", *FAIRNESS_KEYS) if k in at
                    and not (fairness_unavailable(self.metrics) and k in FAIRNESS_KEYS)]
            out.append(f"at the val threshold ({t['rule']}: P(fake) >= {t['value']:.4g}): "
                       + ", ".join(f"{k} {format_metric(k, at[k])}" for k in keys))
        elif isinstance(self.metrics.get("threshold"), dict) and self.metrics["threshold"].get("unavailable"):
            out.append(f"no val threshold: {self.metrics['threshold']['unavailable']}")
        return out

    @property
    def remarks(self) -> list[str]:
        """Why a figure is suspicious or NaN (a degenerate detector, one class, no subgroups)."""
        return list(self.metrics.get("remarks") or [])

    def legend(self) -> str:
        """The meaning of every metric of :meth:`short` (and of the interval), one bullet each."""
        keys = [k for k in self.summary_keys if k in METRIC_MEANINGS and isinstance(self.metrics.get(k), (int, float))]
        return metric_legend([*keys, *(["ci95"] if self.metrics.get("ci95") else [])])


def fairness_unavailable(metrics: dict) -> str | None:
    """Why a metrics dict has no fairness metrics (``fairness_coverage["unavailable"]``), or None."""
    coverage = metrics.get("fairness_coverage")
    return coverage.get("unavailable") if isinstance(coverage, dict) else None


def coverage_sentence(metrics: dict) -> str | None:
    """``fairness on 160 of 192 rows (4 of 8 subgroups); rows with unknown gender or race left out``
    when the fairness metrics cover part of the test set; None when they cover all or none of it."""
    c = metrics.get("fairness_coverage")
    if not isinstance(c, dict) or c.get("unavailable") or "rows" not in c or c["rows"] >= c.get("of_rows", 0):
        return None
    groups = f" ({c['subgroups']} of {c['of_subgroups']} subgroups)" if "subgroups" in c else ""
    return (f"fairness on {c['rows']} of {c['of_rows']} rows{groups}; rows with unknown gender or race "
            "are left out")


#: Bootstrap resamples behind each evaluation's ``ci95`` (seeded: the same predictions, the same intervals).
N_BOOT = 1000


def add_intervals(metrics: dict, predictions: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """``metrics`` plus ``ci95`` and ``ci95_info`` when ``predictions`` has ``label`` and ``prob``;
    ``ci95`` keeps the metrics that ``metrics`` reports (an XAI run has no ACC to bound)."""
    if not {"label", "prob"} <= set(predictions.columns) or len(predictions) == 0:
        return metrics
    try:
        out = with_intervals(metrics, predictions, n_boot=n_boot, seed=seed)
    except FeatcacheError as exc:  # e.g. rows without a 0/1 label: no interval, and the reason kept
        return {**metrics, "ci95": {}, "ci95_info": {"notes": [f"no intervals: {exc}"]}}
    out["ci95"] = {k: v for k, v in out["ci95"].items() if k in metrics}
    return out


def _known_subgroups(predictions: pd.DataFrame) -> np.ndarray | None:
    """The subgroup codes of the rows whose gender and race are known; None without the column."""
    if "subgroup" not in predictions:
        return None
    g = pd.to_numeric(predictions["subgroup"], errors="coerce").fillna(-1).to_numpy()
    return g[g >= 0]


def _without_demographics(metrics: dict, predictions: pd.DataFrame) -> tuple[dict, pd.DataFrame, dict | None]:
    """A test set whose every subgroup is unknown: the metrics with the remark that fairness is not
    available, the predictions the bootstrap sees (without their all-unknown subgroup column) and
    ``fairness_coverage``; otherwise the inputs unchanged and None."""
    known = _known_subgroups(predictions)
    if known is None or len(known):
        return metrics, predictions, None
    metrics = dict(metrics)
    coverage = {"rows": 0, "of_rows": int(len(predictions)), "subgroups": 0, "of_subgroups": len(SUBGROUP_NAMES),
                "unavailable": NO_DEMOGRAPHICS}
    remarks = [r for r in metrics.get("remarks") or [] if not r.startswith("fairness metrics are nan")]
    metrics["remarks"] = [*remarks, f"fairness metrics not available: {NO_DEMOGRAPHICS} (no row has a known "
                                    "gender and race); the detection metrics cover every row"]
    return metrics, predictions.drop(columns="subgroup"), coverage


# -- operating points ----------------------------------------------------------------------------
def _run_rule(run_dir: Path | None):
    """The run's ``evaluation.threshold`` (None: the default rule)."""
    if run_dir is None or not RunDir(run_dir).config.is_file():
        return None
    return Config.of(load_config(RunDir(run_dir).config)).evaluation.threshold


def _run_val_predictions(run_dir: Path, metrics: dict) -> tuple[pd.DataFrame | None, str | None]:
    """``RUN/eval/val/predictions.csv`` (the run's selected weights on its own val split), or why not."""
    folder = RunDir(run_dir).eval("val")
    if not (folder / RunDir.PREDICTIONS).is_file():
        return None, (f"{folder}/{RunDir.PREDICTIONS} is missing; run featcache evaluate {run_dir} --split val, "
                      "then this evaluation again")
    if (folder / RunDir.METRICS).is_file():
        val = read_json(folder / RunDir.METRICS)
        if val.get("temperature") != metrics.get("temperature"):
            return None, (f"{folder} was written with another temperature (calibration); run featcache evaluate "
                          f"{run_dir} --split val, then this evaluation again")
    return pd.read_csv(folder / RunDir.PREDICTIONS), None


def val_threshold(rule, val_predictions: pd.DataFrame | None, why_not: str | None = None) -> dict:
    """metrics.json's ``threshold``: {rule, value} (and ``chosen_on``, ``n_val``), or {rule, value
    None, unavailable: why}."""
    name = rule_name(rule)
    kind, _ = parse_rule(rule)
    if kind == "0.5":
        return {"rule": name, "value": HEADLINE}
    if val_predictions is None:
        return {"rule": name, "value": None, "unavailable": why_not or "no val predictions"}
    try:
        t = choose_threshold(val_predictions["label"].to_numpy(), val_predictions["prob"].to_numpy(), rule)
    except (ValueError, KeyError) as exc:
        return {"rule": name, "value": None, "unavailable": f"val predictions: {exc}"}
    return {"rule": name, "value": t, "chosen_on": "val", "n_val": int(len(val_predictions))}


def at_threshold(predictions: pd.DataFrame, threshold: float, *, fairness: bool) -> dict:
    """acc, fpr, tpr (and the fairness metrics on the known rows) of ``predictions`` at ``threshold``."""
    groups = predictions["subgroup"].to_numpy() if fairness and "subgroup" in predictions else None
    return operating_point(predictions["label"].to_numpy(), predictions["prob"].to_numpy(), threshold, groups)


# -- where and whether to write -------------------------------------------------------------------
def safe_name(text: str) -> str:
    """A folder name made safe for ``eval/<name>_<split>``: letters, digits, ``.``, ``_``, ``-``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip(".-_")
    return out or "other"


def eval_path(run_dir, split: str, name: str | None = None) -> Path:
    """``RUN/eval/<name>_<split>/`` (or ``RUN/eval/<split>/``)."""
    return RunDir(run_dir).eval(split, name)


#: What identifies an evaluation's input in its provenance: a cache's fingerprint, a predictions
#: CSV's or a manifest's sha256.
IDENTITIES = (("cache", "fingerprint"), ("predictions", "sha256"), ("manifest", "sha256"))


def resolve_target(run_dir, split: str, name: str | None, *, given, path, ident: str, recorded: dict,
                   kind: str = "cache") -> tuple[Path, bool]:
    """(the output folder, whether it is the run's in-domain ``eval/<split>/``) for an evaluation of
    ``path`` (identified by ``ident``: a cache's fingerprint, a manifest's sha256); ``given`` is what the
    user passed (None: the run's recorded input ``recorded`` = {path, fingerprint | sha256}).

    The recorded input must still be what the run was trained on; another input is named ``name``
    or after its folder (file) name."""
    if name is not None and safe_name(name) != name:
        raise FeatcacheError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (e.g. {safe_name(name)})")
    key = "fingerprint" if kind == "cache" else "sha256"
    rec_path, rec_id = recorded.get("path"), recorded.get(key)
    on_recorded = given is None or (rec_path is not None and _same_path(given, rec_path))
    if on_recorded and name is None and rec_id and ident != rec_id:
        option = "--cache" if kind == "cache" else "--manifest"
        raise CacheError(f"{path} is not the {kind} {run_dir} was trained on: its {key} is {ident[:12]}, "
                         f"config.yaml records {rec_id[:12]} (another dataset or extraction at that path); restore "
                         f"the run's {kind}, or evaluate this one as another dataset with {option} {path} --name NAME")
    own = ident == rec_id if rec_id else on_recorded
    p = Path(path).resolve()
    tag = name if name else (None if own else safe_name(p.stem if p.is_file() else p.name))
    return eval_path(run_dir, split, tag), own and tag is None


def _same_inputs(old: dict, new: dict) -> bool:
    """Two provenances of the same evaluation: the same cache fingerprint (or predictions sha256) and split."""
    for key, ident in IDENTITIES:
        a, b = (old.get(key) or {}).get(ident), (new.get(key) or {}).get(ident)
        if a is not None or b is not None:
            return a == b and old.get("split") == new.get("split")
    return False


def check_target(out: Path, provenance: dict, *, overwrite: bool, in_domain: bool = False) -> None:
    """Refuse to replace another evaluation in ``out`` (other inputs) unless ``overwrite``.

    The same evaluation (same cache fingerprint or predictions file, same split) is replaced; so is
    an in-domain ``eval/<split>/`` written before metrics.json recorded its inputs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"{out} exists and is not a folder; choose another --name or --out")
    if overwrite or not out.is_dir() or not any(p.is_file() for p in out.rglob("*")):
        return  # nothing there, or only empty folders (an older featcache's crashed evaluation left plots/)
    if not (out / RunDir.METRICS).is_file():
        if (out / RunDir.PREDICTIONS).is_file() or (out / RunDir.REPORT).is_file():
            raise FeatcacheError(f"{out} holds an evaluation without metrics.json; pass --overwrite to replace it")
        raise FeatcacheError(f"{out} is not empty and holds no evaluation; choose another --name or --out, "
                             "or pass --overwrite")
    try:
        old = read_json(out / RunDir.METRICS).get("provenance") or {}
    except ValueError:
        old = {}
    if not old and in_domain:
        return
    if not _same_inputs(old, provenance):
        what = next((old[k]["path"] for k, _ in IDENTITIES if isinstance(old.get(k), dict) and old[k].get("path")),
                    "other inputs")
        raise FeatcacheError(f"{out} already holds an evaluation of {what}" +
                             (f" (split {old['split']})" if old.get("split") else "") +
                             "; pass --overwrite to replace it, or choose another --name")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out`` (the previous ``out`` removed after)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_provenance(run_dir, split: str, command: str | None = None, source: Source | None = None) -> dict:
    """metrics.json's ``provenance`` of a run's evaluation: the data evaluated, ``cache`` = {path,
    fingerprint} or ``manifest`` = {path, sha256} (default: what config.yaml records)."""
    run_dir = Path(run_dir)
    prov: dict = {"run": str(run_dir.resolve()), "split": split}
    if source is not None:
        prov[source.kind] = source.record()
    elif RunDir(run_dir).config.is_file():
        conf = Config.of(load_config(RunDir(run_dir).config))
        for kind, key in SOURCE_IDENTITY.items():
            rec = getattr(conf, kind)  # config.RECORD_SECTIONS: cache, manifest
            if rec.path:
                prov[kind] = {"path": rec.path, key: getattr(rec, key)}
                break
    prov.update(featcache=__version__, command=command)
    return prov


# -- the writer --------------------------------------------------------------------------------------
_FROM_RUN = object()


def write_evaluation(run_dir, split: str, metrics: dict, predictions: pd.DataFrame, *, detects: bool,
                     summary_keys, title: str, name: str | None = None, task_md: str = "",
                     plots=None, draw: bool = True, out=None, provenance: dict | None = None,
                     threshold_rule=_FROM_RUN, val_predictions=_FROM_RUN, val_missing: str | None = None) -> Evaluation:
    """Write one evaluation into ``out`` (default ``RUN/eval/<name>_<split>/``); ``plots(out_plots_dir,
    tag)`` adds the caller's plots; ``draw=False``: no plots at all (a run's ``logging.plots: false``).

    ``provenance`` defaults to :func:`run_provenance` (the run's recorded cache); ``threshold_rule``
    to the run's ``evaluation.threshold``; ``val_predictions`` (the run's val predictions, for the
    val-chosen threshold; None: none, ``val_missing`` says why) to these predictions when ``split`` is the run's own val, else
    ``RUN/eval/val/predictions.csv``. Whether ``out`` may be replaced is the caller's to check
    (:func:`check_target`); the files appear there at once, when all are written.
    """
    run_dir = None if run_dir is None else Path(run_dir)
    out = Path(out) if out is not None else eval_path(run_dir, split, name)
    tag = out.name
    metrics, boot_preds, no_demographics = _without_demographics(dict(metrics), predictions)
    metrics = add_intervals(metrics, boot_preds)
    if no_demographics is not None:
        metrics["fairness_coverage"] = no_demographics
    metrics["provenance"] = provenance if provenance is not None else run_provenance(run_dir, split)
    detector = detects and {"label", "prob"} <= set(predictions.columns) and len(predictions) > 0
    if detector:
        rule = _run_rule(run_dir) if threshold_rule is _FROM_RUN else threshold_rule
        why_not = val_missing
        if val_predictions is _FROM_RUN:
            if split == "val" and name is None:
                val_predictions = predictions
            elif run_dir is not None:
                val_predictions, why_not = _run_val_predictions(run_dir, metrics)
            else:
                val_predictions = None
        metrics["threshold"] = val_threshold(rule, val_predictions, why_not)
        if metrics["threshold"]["value"] is not None and metrics["threshold"]["rule"] != "0.5":
            metrics["at_val_threshold"] = at_threshold(predictions, metrics["threshold"]["value"],
                                                       fairness=any(k in metrics for k in FAIRNESS_KEYS))
    lines = [f"# {title}: {tag}", "", f"n = {len(predictions)}", ""]
    unavailable = fairness_unavailable(metrics)
    keys = [k for k in summary_keys if k in metrics and not (unavailable and k in FAIRNESS_KEYS)]
    if keys:
        ci = metrics.get("ci95") or {}
        marks = decision_marks(metrics)
        cells = {k: format_metric(k, metrics[k], ci=ci.get(k), **marks) for k in keys}
        own = (metrics.get("ci95_info") or {}).get("method")  # a task's own interval (FAAP's) says how, in one text
        lines += [markdown_table(pd.DataFrame([cells])), "",
                  metric_legend([*(k for k in keys if k in METRIC_MEANINGS), *(["ci95"] if ci else []),
                                 *(k for k, on in marks.items() if on)],
                                {"ci95": f"[lo, hi]: 95 % {own}"} if isinstance(own, str) else None)]
    if unavailable and any(k in FAIRNESS_KEYS for k in summary_keys):
        lines += [f"Fairness metrics ({', '.join(FAIRNESS_KEYS)}): not available ({unavailable}).", ""]
    if coverage_sentence(metrics):
        lines += [f"Fairness coverage: {coverage_sentence(metrics)}.", ""]
    if metrics.get("remarks"):
        lines += [*(f"Remark: {r}" for r in metrics["remarks"]), ""]
    lines += _threshold_md(metrics)
    lines += _provenance_md(metrics["provenance"])
    files = [RunDir.PREDICTIONS, RunDir.METRICS, RunDir.REPORT]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / RunDir.PLOTS if draw else tmp).mkdir(parents=True)
    try:
        table = None
        if detector:
            metrics.setdefault("n", int(len(predictions)))
            table, more_lines, more_files = _detector_files(tmp, predictions, draw, f"{title}, {tag}")
            lines += more_lines
            files += more_files
        if task_md:
            lines += [task_md, ""]
        if plots is not None and draw:
            files += [f"{RunDir.PLOTS}/{f}" for f in plots(tmp / RunDir.PLOTS, tag)]
        markdown = "\n".join(lines)
        write_eval(tmp, metrics, predictions, markdown)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Evaluation(run_dir, tag, out, metrics, tuple(summary_keys), markdown, files, table)


def _detector_files(tmp: Path, predictions: pd.DataFrame, draw: bool, caption: str):
    """A detector's ROC curve and subgroup table (with its bar plot) written into ``tmp``, the plots only
    with ``draw``: (the table, None without subgroups; its report lines; the files written)."""
    y, p = predictions["label"].to_numpy(), predictions["prob"].to_numpy()
    files, lines = [], []
    if draw:
        plot_roc(y, p, tmp / RunDir.PLOTS / "roc.png", caption)
        files.append("plots/roc.png")
    known = _known_subgroups(predictions)
    table = subgroup_table(y, p, predictions["subgroup"].to_numpy()) if known is not None and len(known) else None
    if table is None or not len(table):
        return None, lines, files
    write_csv_rounded(table, tmp / RunDir.SUBGROUPS)
    lines += ["## Subgroups (P(fake) >= 0.5)", "", markdown_table(table), ""]
    files.append(RunDir.SUBGROUPS)
    if draw:
        plot_subgroup_rates(table, tmp / RunDir.PLOTS / "subgroup_rates.png", caption)
        files.append("plots/subgroup_rates.png")
    return table, lines, files


def _threshold_md(metrics: dict) -> list[str]:
    t = metrics.get("threshold")
    if not isinstance(t, dict):
        return []
    if t.get("unavailable"):
        return [f"Threshold chosen on val ({t['rule']}): not available ({t['unavailable']}).", ""]
    at = metrics.get("at_val_threshold")
    if not at:
        return ["Every threshold metric above is at P(fake) >= 0.5 (evaluation.threshold: 0.5).", ""]
    unavailable = fairness_unavailable(metrics)
    keys = [k for k in ("acc", "fpr", "tpr", *FAIRNESS_KEYS) if k in at and not (unavailable and k in FAIRNESS_KEYS)]
    head = {**{k: metrics.get(k, float("nan")) for k in keys},
            "fpr": _rate(metrics.get("fp"), metrics.get("tn")), "tpr": _rate(metrics.get("tp"), metrics.get("fn"))}
    rows = pd.DataFrame([{"operating point": "P(fake) >= 0.5", **{k: head[k] for k in keys}},
                         {"operating point": f"{t['rule']} (P(fake) >= {t['value']:.4g})", **{k: at[k] for k in keys}}])
    return [f"## Operating points (the second chosen on the run's val split by {t['rule']})", "",
            markdown_table(rows), "",
            "The fairness gaps at 0.5 also measure where the scores sit around 0.5; at a threshold chosen on "
            "val they compare detectors at a like operating point (a detector shifted by one logit gets the "
            "same decisions there).", ""]


def _rate(a, b) -> float:
    if a is None or b is None or a + b == 0:
        return float("nan")
    return a / (a + b)


def _provenance_md(prov: dict) -> list[str]:
    parts = []
    if prov.get("run"):
        parts.append(f"run `{prov['run']}`")
    for key, ident in (("cache", "fingerprint"), ("predictions", "sha256"), ("manifest", None)):
        if isinstance(prov.get(key), dict):
            value = prov[key].get(ident) if ident else None
            parts.append(f"{key} `{prov[key].get('path')}`" + (f" ({ident} {str(value)[:12]})" if value else ""))
    if prov.get("split"):
        parts.append(f"split {prov['split']}")
    parts.append(f"featcache {prov.get('featcache')}")
    lines = ["Evaluated: " + ", ".join(parts) + ".", ""]
    if prov.get("command"):
        lines += [f"Command: `{prov['command']}`", ""]
    return lines


# -- a run of any task on its data ---------------------------------------------------------------------
def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def write_task_evaluation(task: Task, run_dir, split: str, metrics: dict, predictions: pd.DataFrame, *,
                          cfg: dict | None = None, r: int = 0, **kw) -> Evaluation:
    """One evaluation of run r of ``task``, with the task's markdown (:meth:`Task.report`) and plots
    (:meth:`Task.write_plots`), the plots left out with the run's ``logging.plots: false``: what
    training's end and ``featcache evaluate`` both write.  ``kw`` goes to :func:`write_evaluation`
    (``out``, ``provenance``, ``val_predictions``, ...)."""
    conf = task.confs[r] if cfg is None else Config.of(cfg)
    title = run_title(run_dir, task.name, conf.preset)
    return write_evaluation(run_dir, split, metrics, predictions, detects=task.detects,
                            summary_keys=task.summary_keys, title=title, task_md=task.report(metrics, predictions),
                            plots=lambda d, t: task.write_plots(d, split, f"{title}, {t}", r=r),
                            draw=conf.logging.plots, **kw)


def evaluate_head(run_dir, source=None, *, split: str = "test", name: str | None = None, device=None,
                  overwrite: bool = False, command: str | None = None, options: dict | None = None) -> Evaluation:
    """Predict ``split`` of ``source`` (default: the run's own data: its cache, or its manifest for the
    tasks that read images) with a trained run of any task.

    The run's own data (the fingerprint or sha256 config.yaml records) goes to ``RUN/eval/<split>/``;
    other data to ``RUN/eval/<name>_<split>/``, ``name`` defaulting to its folder (file) name. The
    data at the run's recorded path must still be what it was trained on; another evaluation in the
    output folder is replaced only with ``overwrite``. ``options``: settings for this evaluation only
    (``{"evaluation.thresholds": [...]}``; each a setting of the task's config today), given to
    :func:`~featcache.heads.task.load_run`.
    """
    run_dir = Path(run_dir)
    task = load_run(run_dir, device, settings=options)
    kind = task.source
    recorded = task.cfg.get(kind) or {}
    path = source or recorded_cache(run_dir, task.cfg, kind)  # a run moved with its data: found relative
    src = task.open_source(path)
    out, in_domain = resolve_target(run_dir, split, name, given=source, path=path, ident=src.ident,
                                    recorded=recorded, kind=kind)
    own = in_domain or (recorded.get(src.key) is not None and src.ident == recorded.get(src.key))
    provenance = run_provenance(run_dir, split, command, source=src)
    check_target(out, provenance, overwrite=overwrite, in_domain=in_domain)
    val_preds, why_not = None, None
    if task.detects and not (split == "val" and own):
        val_preds, why_not = _run_val_predictions(run_dir, {})
    need_val = task.detects and val_preds is None and own and split != "val"
    extra = [*(["val"] if need_val else []), *(task.evaluation_inputs() if own else ())]
    task.load(src.data, splits=tuple(dict.fromkeys([split, *extra])))
    metrics, preds = task.evaluate(split)[0]
    if split == "val" and own:
        val_preds, why_not = preds, None
    elif need_val:
        val_preds, why_not = task.evaluate("val")[0][1], None
    if not task.detects:
        val_preds = None
    return write_task_evaluation(task, run_dir, split, metrics, preds, out=out, provenance=provenance,
                                 val_predictions=val_preds, val_missing=why_not,
                                 threshold_rule=task.conf.evaluation.threshold)


def run_title(run_dir, task: str, preset: str | None = None) -> str:
    """``full/seed0 (stage2, preset full)``: the run (with its parent when the name is a seed
    folder of an ablation), the task and the preset, for report and plot titles."""
    run_dir = Path(run_dir)
    name = f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed") else run_dir.name
    return f"{name} ({task}" + (f", preset {preset})" if preset else ")")


__all__ = ["Evaluation", "add_intervals", "check_target", "eval_path", "evaluate_head", "resolve_target", "run_provenance",
           "run_title", "safe_name", "sha256_file", "val_threshold", "write_evaluation",
           "write_task_evaluation"]
