"""Markdown tables and the output conventions of every printed metric (issue 19, item 14).

- :data:`METRIC_MEANINGS`: what each metric means, printed once beside a table
  (:func:`metric_legend`); fairness metrics are in percentage points, F_FPR and F_EO are sums
  over the subgroups.
- :func:`format_metric`: one precision per kind of metric (rates 3 decimals, percentage points
  1), ``n/a`` for nan, the 95 % interval when given, and a mark on the fairness metrics of a
  degenerate detector (one decision for every sample: 0 by construction, not "perfectly fair").
- :func:`write_csv_rounded`: CSVs rounded for reading (rates 4 decimals, percentage points 2);
  JSON files keep full precision.
- :func:`ablation_table`: mean ± sd over seeds per preset, and the paired differences to a
  baseline with their intervals (from :func:`featcache.metrics.bootstrap.paired_differences`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import write_atomic

#: What each metric means; the keys are metric names without a split prefix (``test_``, ``val_``).
METRIC_MEANINGS = {
    "auc": "AUC: area under the ROC curve (0.5 chance, 1 perfect)",
    "ap": "AP: average precision, area under the precision-recall curve",
    "eer": "EER: equal error rate, where FPR = FNR, interpolated on the ROC curve (lower is better)",
    "eer_asvspoof": "EER (ASVspoof): mean of FPR and FNR at the operating point nearest to FPR = FNR",
    "acc": "ACC: accuracy at threshold 0.5 on P(fake)",
    "f1": "F1 of the fake class at threshold 0.5",
    "precision": "precision of the fake class at threshold 0.5",
    "recall": "recall (TPR) of the fake class at threshold 0.5",
    "specificity": "specificity (TNR) at threshold 0.5",
    "video_auc": "video AUC: AUC over videos scored by their frames' mean P(fake)",
    "f_fpr": "F_FPR: sum over subgroups of |FPR_g - FPR_all|, in percentage points (grows with the "
             "number of subgroups; 0 = equal FPRs)",
    "f_eo": "F_EO: sum over subgroups of |FPR_g - FPR_all| + |TPR_g - TPR_all|, in percentage points",
    "f_meo": "F_MEO: the largest range across subgroups of FPR, FNR, TNR or TPR, in percentage points",
    "f_dp": "F_DP: the range across subgroups of the predicted-fake rate, in percentage points",
    "f_oae": "F_OAE: the range across subgroups of the accuracy, in percentage points",
    "ece": "ECE: expected calibration error, 15 equal bins [lo, hi) on P(fake)",
    "mce": "MCE: the largest calibration gap of a bin",
    "brier": "Brier score: mean (P(fake) - label)^2",
    "nll": "NLL: binary cross-entropy of P(fake)",
    "n": "n: number of rows evaluated, or of runs (seeds) in an ablation",
    "±": "±: sample standard deviation over seeds (n - 1 in the denominator)",
    "ci95": "[lo, hi]: 95 % bootstrap interval (identities resampled when known, stratified by label)",
    "Δ": "Δ: paired difference to the baseline over shared seeds, mean [95 % t interval]; "
         "* = the interval excludes 0 (beyond the seed-to-seed noise); (every seed) = the same "
         "difference on every seed, a coarse metric: no interval, no verdict",
    "degenerate": "degenerate: every sample got one decision (all fake or all real); the fairness "
                  "metrics of such a run are 0 by construction and say nothing about fairness",
    "one_sided": "one-sided: nearly every sample got one decision (predicted fakes under a quarter of the "
                 "fakes' share, or the same for real); its acc and fairness metrics mostly measure the threshold",
}

#: Counts, printed as integers.
COUNTS = {"n", "tp", "fp", "tn", "fn", "runs", "seed", "best_epoch"}

#: Metrics that say nothing when the detector is degenerate.
FAIRNESS = ("f_fpr", "f_eo", "f_meo", "f_dp", "f_oae")

#: The ablation table's metrics, when present.
ABLATION_METRICS = ("auc", "acc", "eer", "f_fpr", "f_meo", "f_eo", "f_dp", "f_oae", "ece")


def base_name(column: str) -> str:
    """``test_f_fpr`` -> ``f_fpr``; ``ffpp_auc`` -> ``auc``; a name without a known prefix is kept."""
    if column in METRIC_MEANINGS or column in COUNTS:
        return column
    head, _, rest = column.partition("_")
    return base_name(rest) if rest and head else column


def decimals(name: str, csv: bool = False) -> int:
    """Printed decimals of a metric: percentage points 1 (CSV 2), rates and the rest 3 (CSV 4)."""
    pp = base_name(name).startswith("f_")
    return (2 if pp else 4) if csv else (1 if pp else 3)


def fmt(value, spec: str = ".3f") -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else format(value, spec)
    return str(value)


def format_metric(name: str, value, *, ci=None, degenerate: bool = False, one_sided: bool = False) -> str:
    """``value`` of metric ``name`` at its precision; ``ci=[lo, hi]`` appended as `` [lo, hi]``;
    a fairness metric of a degenerate detector marked `` (degenerate)``, of a one-sided one
    `` (one-sided)``."""
    base = base_name(name)
    if value is None:
        return "n/a"
    if base in COUNTS or isinstance(value, (bool, np.bool_)):
        return str(int(value)) if not isinstance(value, (bool, np.bool_)) else str(bool(value)).lower()
    if isinstance(value, (int, np.integer)) and base not in METRIC_MEANINGS:
        return str(value)
    spec = f".{decimals(name)}f"
    out = fmt(float(value), spec)
    if ci is not None and len(ci) == 2 and not any(v is None or math.isnan(v) for v in ci):
        out += f" [{ci[0]:{spec}}, {ci[1]:{spec}}]"
    if degenerate and base in FAIRNESS:
        out += " (degenerate)"
    elif one_sided and base in FAIRNESS:
        out += " (one-sided)"
    return out


def decision_marks(metrics: dict) -> dict[str, bool]:
    """:func:`format_metric`'s ``degenerate`` and ``one_sided`` flags, from a metrics dict's own."""
    return {"degenerate": bool(metrics.get("degenerate")), "one_sided": bool(metrics.get("one_sided"))}


def metrics_line(metrics: dict, keys, *, ci: dict | None = None) -> str:
    """``auc 0.912 [0.897, 0.925], f_fpr 12.3 [8.1, 17.0]`` for the ``keys`` present in ``metrics``
    (intervals from ``ci`` or ``metrics["ci95"]``; the marks from ``metrics["degenerate"]`` and
    ``metrics["one_sided"]``)."""
    ci = ci if ci is not None else metrics.get("ci95") or {}
    marks = decision_marks(metrics)
    return ", ".join(f"{k} {format_metric(k, metrics[k], ci=ci.get(k), **marks)}" for k in keys if k in metrics)


def metric_legend(names) -> str:
    """Markdown bullets: the meaning of each name (metric, ``±``, ``ci95``, ``Δ``) once, in order."""
    seen, lines = set(), []
    for name in names:
        key = base_name(name)
        if key in METRIC_MEANINGS and key not in seen:
            seen.add(key)
            lines.append(f"- {METRIC_MEANINGS[key]}")
    return "\n".join(lines) + ("\n" if lines else "")


def round_for_csv(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with each float column rounded to its CSV precision (:func:`decimals`)."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].round(decimals(str(col), csv=True))
    return out


def write_csv_rounded(df: pd.DataFrame, path, **to_csv) -> Path:
    """Write ``df`` rounded for reading (rates 4 decimals, percentage points 2); returns the path.
    Full precision belongs in the JSON files."""
    return write_atomic(path, round_for_csv(df).to_csv(index=to_csv.pop("index", False), **to_csv))


def markdown_table(df: pd.DataFrame, spec: str | None = None) -> str:
    """A markdown table of ``df``; floats at each column's precision (:func:`decimals`) unless ``spec``."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    specs = [spec or f".{decimals(str(c))}f" for c in df.columns]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, s) for v, s in zip(row, specs)) + " |")
    return "\n".join(lines) + "\n"


#: The ablation table's marks on the fairness cells of suspicious runs (the ``<split>_<kind>`` column).
RUN_MARKS = {"degenerate": "†", "one_sided": "‡"}


def ablation_table(df: pd.DataFrame, diffs: pd.DataFrame | None = None, *, evals=(), metrics=ABLATION_METRICS,
                   split: str = "test", title: str = "") -> str:
    """The ablation's markdown: per preset, each metric's mean ± sd over seeds and the number of
    runs; then the paired difference of each preset to the baseline (``diffs`` from
    :func:`featcache.metrics.bootstrap.paired_differences`), mean [95 % interval], ``*`` where the
    interval excludes 0; then the meaning of every column, once.

    ``df``: one row per run with ``preset``, ``seed`` and ``<split>_<metric>`` columns (and
    ``<eval>_auc`` for each cache in ``evals``; ``<split>_degenerate`` marks degenerate runs,
    whose fairness cells get a ``†``, ``<split>_one_sided`` one-sided runs, a ``‡``).
    """
    cols = [f"{split}_{m}" for m in metrics if f"{split}_{m}" in df] + [f"{e}_auc" for e in evals if f"{e}_auc" in df]
    rows, marked = [], set()
    for preset, g in df.groupby("preset", sort=False):
        row = {"preset": preset, "n": len(g)}
        counts = {mark: int(g[f"{split}_{kind}"].fillna(False).astype(bool).sum()) if f"{split}_{kind}" in g else 0
                  for kind, mark in RUN_MARKS.items()}
        for c in cols:
            v = g[c].astype(float).dropna()
            d = decimals(c)
            cell = "n/a" if v.empty else (f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f}" if len(v) > 1
                                          else f"{v.mean():.{d}f}")
            if base_name(c) in FAIRNESS and c.startswith(f"{split}_"):
                for mark, k in counts.items():
                    if k:
                        cell += f" {mark}{k}"
                        marked.add(mark)
            row[_label(c, split)] = cell
        rows.append(row)
    out = [f"## {title}\n" if title else "", f"{split} metrics per preset: mean ± sd over seeds; n = runs\n\n",
           _plain_table(pd.DataFrame(rows))]
    if "†" in marked:
        out.append(f"\n† k: k runs of the preset are degenerate (one decision for every {split} sample): "
                   "their fairness metrics are 0 by construction.\n")
    if "‡" in marked:
        out.append(f"\n‡ k: k runs of the preset are one-sided (nearly one decision for every {split} sample): "
                   "their acc and fairness metrics mostly measure the threshold; compare auc.\n")
    legend = ["n", "±", *cols]
    if diffs is not None and len(diffs):
        base = diffs["baseline"].iloc[0]
        wanted = [c for c in cols if c in set(diffs["metric"])]
        drows = []
        for preset, g in diffs.groupby("preset", sort=False):
            g = g.set_index("metric")
            row = {"preset": preset, "n": int(g["n"].max())}
            for c in wanted:
                r = g.loc[c]
                d = decimals(c)
                if math.isnan(r["mean"]):
                    cell = "n/a"
                elif math.isnan(r["lo"]):  # one seed, or the same difference on every seed: no interval
                    cell = f"{r['mean']:+.{d}f}" + (" (every seed)" if r["n"] >= 2 else "")
                else:
                    cell = f"{r['mean']:+.{d}f} [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]" + (" *" if r["differs"] else "")
                row[f"Δ {_label(c, split)}"] = cell
            drows.append(row)
        out += [f"\npaired difference to `{base}` over shared seeds (n): mean [95 % interval], "
                "* beyond the noise\n\n", _plain_table(pd.DataFrame(drows))]
        legend.append("Δ")
    legend += [kind for kind, mark in RUN_MARKS.items() if mark in marked]
    out += ["\n", metric_legend(legend)]
    return "".join(out)


def _label(column: str, split: str) -> str:
    return column[len(split) + 1:] if column.startswith(f"{split}_") else column


def _plain_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
