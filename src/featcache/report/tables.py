"""Markdown tables and the output conventions of every printed metric (issues 19 and 23).

- :data:`METRIC_MEANINGS`: what each metric means, printed once beside a table
  (:func:`metric_legend`); fairness metrics are in percentage points, F_FPR and F_EO are sums
  over the subgroups; what an interval, a floor, a p-value, a ``*`` and Holm's adjustment mean.
- :func:`format_metric`: one precision per kind of metric (rates 3 decimals, percentage points
  1), ``n/a`` for nan, the 95 % interval when given, a fairness gap with its no-disparity floor
  and p-value (``48.4 (floor 52.1, p 0.61)``) or ``n/a (no demographics)``, and a mark on the
  fairness metrics of a degenerate detector (one decision for every sample: 0 by construction,
  not "perfectly fair").  :func:`metrics_line` adds which rows and subgroups the gaps cover when
  it is not all of them (``fairness over n 160 of 192, 4 of 8 subgroups``).
- :func:`write_csv_rounded`: CSVs rounded for reading (rates 4 decimals, percentage points 2);
  JSON files keep full precision.
- :func:`ablation_table`: mean ± sd over seeds per preset (the fairness gaps of degenerate runs
  left out and counted: ``n used/n runs``), and the paired differences to a baseline with their
  intervals and Holm-adjusted verdicts (from :func:`featcache.metrics.compare.paired_differences`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import write_atomic
from ..metrics.compare import EXCESS, without_degenerate

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
    "f_fpr_excess": "F_FPR − floor: F_FPR minus its no-disparity floor (about 0 when subgroup does not "
                    "matter, wherever the threshold sits; presets are compared on it, not on the raw gap)",
    "f_eo_excess": "F_EO − floor: F_EO minus its no-disparity floor",
    "f_meo_excess": "F_MEO − floor: F_MEO minus its no-disparity floor",
    "f_dp_excess": "F_DP − floor: F_DP minus its no-disparity floor",
    "f_oae_excess": "F_OAE − floor: F_OAE minus its no-disparity floor",
    "ece_floor": "ECE floor: the mean ECE of a perfectly calibrated detector with the same P(fake) (labels redrawn "
                 "from P(fake)): the binned ECE's upward bias at this n",
    "ece_excess": "ECE − floor: ECE minus the ECE a perfectly calibrated detector with the same P(fake) "
                  "scores at this n (the binned ECE is biased upward on small test sets)",
    "ci95": "[lo, hi]: 95 % bootstrap interval (identities resampled when known, stratified): it covers the "
            "detector's true value about 95 times in 100; a second test set's value falls inside it only about "
            "83 times in 100",
    "floor": "floor: the gap's mean when the subgroup codes are permuted (within real and within fake for F_FPR, "
             "F_EO, F_MEO; over all rows for F_DP, F_OAE): what the same decisions give when subgroup does not "
             "matter. The raw gap of a small test set is mostly this noise; compare the gap with its floor",
    "p": "p: the share of permutations whose gap is at least the observed one; below 0.05 = a disparity beyond "
         "chance. A large p is no proof of fairness: small subgroups leave the test little power",
    "fairness_coverage": "fairness over n a of b, g of h subgroups: the fairness gaps cover only the rows and "
                         "subgroups with known demographics; n/a (no demographics): the data have none",
    "Δ": "Δ: paired difference to the baseline over shared seeds, mean [95 % interval]; the interval holds the "
         "seed-to-seed noise and the test-set noise (the same resamples of the test rows for every run) and "
         "covers the true difference about 95 times in 100. * = beyond that noise after Holm's adjustment over "
         "the presets compared (at most a 5 % chance of any false * per metric; metrics are read one by one); "
         "given only with at least 3 seeds, never on a raw gap or raw ECE. (every seed) = the same difference "
         "on every seed and no test-set resamples: no interval, no verdict",
    "degenerate": "degenerate: every sample got one decision (all fake or all real); the fairness "
                  "metrics of such a run are 0 by construction and say nothing about fairness",
    "one_sided": "one-sided: nearly every sample got one decision (predicted fakes under a quarter of the "
                 "fakes' share, or the same for real); its acc and fairness metrics mostly measure the threshold",
}

# a gap's "(floor f, p q)", in the legend of a report whose metrics carry fairness_null
METRIC_MEANINGS["fairness_null"] = f"(floor, p) after a fairness gap: {METRIC_MEANINGS['floor']}; {METRIC_MEANINGS['p']}"

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


def format_metric(name: str, value, *, ci=None, degenerate: bool = False, one_sided: bool = False,
                  fairness_null: dict | None = None, fairness_coverage: dict | None = None) -> str:
    """``value`` of metric ``name`` at its precision; ``ci=[lo, hi]`` appended as `` [lo, hi]``.

    A fairness gap: with ``fairness_null`` (``{gap: {"floor": x, "p": y}}``, metrics.json's) as
    ``48.4 (floor 52.1, p 0.61)``; ``n/a (no demographics)`` when ``fairness_coverage["unavailable"]``
    is set; marked `` (degenerate)`` for a degenerate detector (no floor: 0 by construction), ``one-sided``
    for a one-sided one."""
    base = base_name(name)
    if base in FAIRNESS and (fairness_coverage or {}).get("unavailable"):
        return "n/a (no demographics)"
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
    if base not in FAIRNESS:
        return out
    if degenerate:
        return out + " (degenerate)"
    notes = []
    null = (fairness_null or {}).get(base) or {}
    if isinstance(null.get("floor"), (int, float)) and not math.isnan(null["floor"]):
        notes.append(f"floor {null['floor']:{spec}}")
    if isinstance(null.get("p"), (int, float)) and not math.isnan(null["p"]):
        notes.append(f"p {format_p(null['p'])}")
    if one_sided:
        notes = [", ".join(notes), "one-sided"] if notes else ["one-sided"]
        return out + f" ({'; '.join(notes)})"
    return out + (f" ({', '.join(notes)})" if notes else "")


def format_p(p: float) -> str:
    """A p-value: 2 decimals, 3 below 0.01 (``0.001``: the smallest of 1,000 permutations)."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.3f}"


def decision_marks(metrics: dict) -> dict:
    """:func:`format_metric`'s keyword arguments from a metrics dict's own: the ``degenerate`` and
    ``one_sided`` flags, ``fairness_null`` and ``fairness_coverage``."""
    return {"degenerate": bool(metrics.get("degenerate")), "one_sided": bool(metrics.get("one_sided")),
            "fairness_null": metrics.get("fairness_null") or None,
            "fairness_coverage": metrics.get("fairness_coverage") or None}


def coverage_text(metrics: dict) -> str:
    """``n 160 of 192, 4 of 8 subgroups`` when ``metrics["fairness_coverage"]`` (``rows``, ``of_rows``,
    ``subgroups``, ``of_subgroups``) says the gaps leave rows or subgroups out; else ``""``."""
    cov = metrics.get("fairness_coverage") or {}
    if cov.get("unavailable"):
        return ""
    parts = []
    rows, of_rows = cov.get("rows"), cov.get("of_rows")
    groups, of_groups = cov.get("subgroups"), cov.get("of_subgroups")
    partial_rows = isinstance(rows, int) and isinstance(of_rows, int) and rows < of_rows
    partial_groups = isinstance(groups, int) and isinstance(of_groups, int) and groups < of_groups
    if partial_rows or partial_groups:
        if isinstance(rows, int) and isinstance(of_rows, int):
            parts.append(f"n {rows} of {of_rows}")
        if isinstance(groups, int) and isinstance(of_groups, int):
            parts.append(f"{groups} of {of_groups} subgroups")
    return ", ".join(parts)


def metrics_line(metrics: dict, keys, *, ci: dict | None = None) -> str:
    """``auc 0.912 [0.897, 0.925], f_fpr 48.4 (floor 52.1, p 0.61)`` for the ``keys`` present in
    ``metrics`` (intervals from ``ci`` or ``metrics["ci95"]``; the marks, floors and p-values from
    ``metrics`` itself, :func:`decision_marks`); a fairness gap is ``n/a (no demographics)`` when the
    data have none, and the line ends with the rows and subgroups the gaps cover when not all
    (:func:`coverage_text`)."""
    ci = ci if ci is not None else metrics.get("ci95") or {}
    marks = decision_marks(metrics)
    unavailable = bool((marks["fairness_coverage"] or {}).get("unavailable"))
    shown = [k for k in keys if k in metrics or (unavailable and base_name(k) in FAIRNESS)]
    cells = [f"{k} {format_metric(k, metrics.get(k), ci=ci.get(k), **marks)}" for k in shown]
    coverage = coverage_text(metrics)
    if coverage and any(base_name(k) in FAIRNESS for k in shown):
        cells.append(f"fairness over {coverage}")
    return ", ".join(cells)


def metric_legend(names, meanings: dict[str, str] | None = None) -> str:
    """Markdown bullets: the meaning of each name (metric, ``±``, ``ci95``, ``Δ``) once, in order;
    ``meanings`` replace :data:`METRIC_MEANINGS`' (an interval made another way says how)."""
    meanings = {**METRIC_MEANINGS, **(meanings or {})}
    seen, lines = set(), []
    for name in names:
        key = base_name(name)
        if key in meanings and key not in seen:
            seen.add(key)
            lines.append(f"- {meanings[key]}")
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
    :func:`featcache.metrics.compare.paired_differences`, one column per metric it holds), mean
    [95 % interval], ``*`` for its Holm-adjusted verdict, and under it the family size and why a
    cell has no verdict; then the meaning of every column, once.

    ``df``: one row per run with ``preset``, ``seed`` and ``<split>_<metric>`` columns (and
    ``<split>_<gap>_excess``, the gap minus its floor, beside each gap that has one; ``<eval>_auc``
    for each cache in ``evals``).  ``<split>_degenerate`` marks degenerate runs: their fairness
    values are left out of the means (the cell says ``n used/n runs``) and their cells get a ``†``;
    ``<split>_one_sided`` marks one-sided runs, a ``‡``.
    """
    wanted = [f"{split}_{m}" for m in metrics]
    wanted = [c for m in wanted for c in (m, f"{m}{EXCESS}")]
    cols = [c for c in wanted if c in df] + [f"{e}_auc" for e in evals if f"{e}_auc" in df]
    used = without_degenerate(df)
    rows, marked = [], set()
    for preset, g in used.groupby("preset", sort=False):
        row = {"preset": preset, "n": len(g)}
        counts = {mark: int(g[f"{split}_{kind}"].fillna(False).astype(bool).sum()) if f"{split}_{kind}" in g else 0
                  for kind, mark in RUN_MARKS.items()}
        for c in cols:
            v = g[c].astype(float).dropna()
            d = decimals(c)
            cell = "n/a" if v.empty else (f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f}" if len(v) > 1
                                          else f"{v.mean():.{d}f}")
            fairness = base_name(c).removesuffix(EXCESS) in FAIRNESS and c.startswith(f"{split}_")
            if fairness:
                if counts["†"]:
                    cell += f" ({len(v)}/{len(g)})"
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
                   "their fairness metrics are 0 by construction, so they are left out of the fairness means "
                   "and differences; (u/r): u of the preset's r runs used.\n")
    if "‡" in marked:
        out.append(f"\n‡ k: k runs of the preset are one-sided (nearly one decision for every {split} sample): "
                   "their acc and fairness metrics mostly measure the threshold; compare auc.\n")
    legend = ["n", "±", *cols]
    if any(c.endswith(EXCESS) for c in cols):
        legend.append("floor")
    if diffs is not None and len(diffs):
        out += _difference_table(diffs, split)
        legend += [m for m in pd.unique(diffs["metric"]) if m not in legend] + ["Δ"]
    legend += [kind for kind, mark in RUN_MARKS.items() if mark in marked]
    out += ["\n", metric_legend(legend)]
    return "".join(out)


def _difference_table(diffs: pd.DataFrame, split: str) -> list[str]:
    """The Δ table's markdown and the lines under it (see :func:`ablation_table`)."""
    base = diffs["baseline"].iloc[0]
    metrics = list(pd.unique(diffs["metric"]))
    drows = []
    for preset, g in diffs.groupby("preset", sort=False):
        g = g.set_index("metric")
        row = {"preset": preset, "n": int(g["n_runs"].max())}
        for c in metrics:
            if c not in g.index:
                row[f"Δ {_label(c, split)}"] = ""
                continue
            row[f"Δ {_label(c, split)}"] = _difference_cell(g.loc[c], decimals(c))
        drows.append(row)
    out = [f"\npaired difference to `{base}` over shared seeds (n): mean [95 % interval], * beyond the noise\n\n",
           _plain_table(pd.DataFrame(drows)), "\n"]
    both = diffs[(diffs["basis"] == "seeds + test set") & diffs["lo"].notna()]
    if len(both):
        out.append(f"- {', '.join(dict.fromkeys(_label(c, split) for c in both['metric']))}: intervals from the seeds "
                   "and the test set together (the same resamples of the test rows for every run)\n")
    families = {_label(c, split): int(diffs.loc[diffs["metric"] == c, "m"].max()) for c in metrics}
    families = {k: m for k, m in families.items() if m > 0}
    if families:
        sizes = set(families.values())
        if len(sizes) == 1:
            m = sizes.pop()
            out.append(f"- `*`: Holm over {m} preset{'s' if m != 1 else ''} (per metric; metrics are read one by one)\n")
        else:
            out.append("- `*`: Holm over m presets per metric: "
                       + ", ".join(f"{k} {m}" for k, m in families.items()) + "\n")
    if (diffs["n"] == 2).any():
        out.append("- 2 seeds: too few seeds for a verdict (the interval is shown, no `*`)\n")
    raw = [c for c in metrics if diffs.loc[diffs["metric"] == c, "note"].str.startswith("raw").any()]
    gaps = [_label(c, split) for c in raw if base_name(c) in FAIRNESS]
    calibration = [_label(c, split) for c in raw if base_name(c) not in FAIRNESS]
    if gaps:
        out.append(f"- no `*` on {', '.join(gaps)}: a raw gap moves with the threshold (a preset whose scores sit "
                   "lower gets a smaller F_FPR with no change in fairness); verdicts are on the gap minus its floor\n")
    if calibration:
        out.append(f"- no `*` on {', '.join(calibration)}: the binned calibration error is biased upward on small "
                   "test sets; verdicts are on ece minus its floor, or Brier/NLL\n")
    seeds_only = diffs[(diffs["basis"] == "seeds only") & diffs["lo"].notna()]
    if len(seeds_only):
        why = sorted({n.removeprefix("seeds only: ") for n in seeds_only["note"] if n.startswith("seeds only")})
        cols = ", ".join(dict.fromkeys(_label(c, split) for c in seeds_only["metric"]))
        out.append(f"- {cols}: interval over seeds only, without the test-set noise"
                   + (f" ({'; '.join(why)})" if why else "") + "\n")
    if (diffs["n"] < diffs["n_runs"]).any():
        out.append("- (u/r): the difference rests on u of the r shared seeds (degenerate runs left out)\n")
    return out


def _difference_cell(r: pd.Series, d: int) -> str:
    used = f" ({int(r['n'])}/{int(r['n_runs'])})" if r["n"] < r["n_runs"] else ""
    if math.isnan(r["mean"]):
        return "n/a" + used
    if math.isnan(r["lo"]):  # one seed, or the same difference on every seed without resamples
        return f"{r['mean']:+.{d}f}" + (" (every seed)" if r["n"] >= 2 else "") + used
    return f"{r['mean']:+.{d}f} [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]" + used + (" *" if r["differs"] else "")


def _label(column: str, split: str) -> str:
    label = column[len(split) + 1:] if column.startswith(f"{split}_") else column
    return label.removesuffix(EXCESS) + "−floor" if label.endswith(EXCESS) else label


def _plain_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
