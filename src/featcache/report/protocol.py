"""The paper's protocol tables (issue 24): cross-dataset and leave-one-manipulation-out (LOMO).

Both tables have one row per preset and one column per test set x metric:

- **cross-dataset** (``ablate --eval NAME=CACHE``): the test sets are the training cache's own
  test split (in-domain) and every ``--eval`` cache's; the metrics AUC, EER and the fairness
  metrics where the test set has demographics (``n/a`` and a footnote saying why where it has none);
- **LOMO** (``ablate --protocol lomo``): the test sets are the held-out manipulation methods (each
  fold's test reals plus the fakes of the one method its training never saw); AUC and EER.

A cell is the mean ± sd over seeds and, in brackets, the 95 % t interval of that mean over seeds
(``mean ± t(0.975, n-1) sd / sqrt(n)``: the seed-to-seed noise); with one seed, the run's own 95 %
bootstrap interval (resampled test rows, from its metrics.json).  The files: ``<stem>.csv`` (one
row per preset x test set x metric: n, mean, sd, lo, hi, which interval), ``<stem>_runs.csv``
(one row per run x test set x metric), ``<stem>.md`` and ``<stem>.png`` (per metric, a bar per
preset and test set with sd error bars).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import write_atomic
from .plots import _plt, _save
from .tables import FAIRNESS, METRIC_MEANINGS, decimals, metric_legend, write_csv_rounded

#: The metrics of a cross-dataset table, in order, when present.
CROSS_METRICS = ("auc", "eer", "f_fpr", "f_meo")
#: The metrics of a LOMO table.
LOMO_METRICS = ("auc", "eer")

#: Columns of the long per-run table that :func:`summarise` reads.
RUN_COLUMNS = ("preset", "seed", "dataset", "metric", "value", "ci_lo", "ci_hi")


def long_rows(preset: str, seed: int, dataset: str, metrics: dict, keys) -> list[dict]:
    """One per-run row per metric of ``keys`` present in ``metrics`` (an evaluation's metrics.json),
    with the run's bootstrap interval from ``metrics["ci95"]`` when it has one."""
    ci = metrics.get("ci95") or {}
    out = []
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        pair = ci.get(k)
        lo, hi = (pair[0], pair[1]) if pair is not None and len(pair) == 2 else (None, None)
        out.append({"preset": preset, "seed": int(seed), "dataset": dataset, "metric": k, "value": float(v),
                    "ci_lo": np.nan if lo is None else float(lo), "ci_hi": np.nan if hi is None else float(hi)})
    return out


def summarise(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per preset x test set x metric: n (runs with a number), mean, sd (ddof 1), and the interval
    ``lo, hi``: the t interval of the mean over seeds with two or more seeds (``interval`` = ``t``;
    NaN when every seed gave the same number), else the one run's bootstrap interval
    (``bootstrap``)."""
    from scipy import stats

    rows = []
    for (preset, dataset, metric), g in runs.groupby(["preset", "dataset", "metric"], sort=False):
        v = g["value"].astype(float).dropna()
        n = len(v)
        mean = float(v.mean()) if n else math.nan
        sd = float(v.std(ddof=1)) if n > 1 else math.nan
        lo = hi = math.nan
        kind = ""
        if n > 1 and sd > 0:
            half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
            lo, hi, kind = mean - half, mean + half, "t"
        elif n == 1:
            lo, hi = float(g["ci_lo"].iloc[0]), float(g["ci_hi"].iloc[0])
            kind = "bootstrap" if not (math.isnan(lo) or math.isnan(hi)) else ""
        rows.append({"preset": preset, "dataset": dataset, "metric": metric, "n": n, "mean": mean, "sd": sd,
                     "lo": lo, "hi": hi, "interval": kind})
    return pd.DataFrame(rows, columns=["preset", "dataset", "metric", "n", "mean", "sd", "lo", "hi", "interval"])


def _cell(r, metric: str) -> str:
    d = decimals(metric)
    if r is None or r["n"] == 0 or math.isnan(r["mean"]):
        return "n/a"
    cell = f"{r['mean']:.{d}f}"
    if r["n"] > 1:
        cell += f" ± {r['sd']:.{d}f}"
    if not (math.isnan(r["lo"]) or math.isnan(r["hi"])):
        cell += f" [{r['lo']:.{d}f}, {r['hi']:.{d}f}]"
    return cell


def protocol_markdown(summary: pd.DataFrame, datasets: dict[str, str], metrics, *, title: str = "",
                      what: str = "test set", unavailable: dict[str, str] | None = None) -> str:
    """The table: one row per preset, one column per test set x metric (``datasets``: key in
    ``summary`` -> printed name, in order).  ``unavailable``: test set -> why its fairness metrics
    are not available (their cells read ``n/a``, with the reason below the table)."""
    unavailable = dict(unavailable or {})
    presets = list(dict.fromkeys(summary["preset"]))
    index = {(r["preset"], r["dataset"], r["metric"]): r for r in summary.to_dict("records")}
    cols = [(ds, m) for ds in datasets for m in metrics
            if any((p, ds, m) in index for p in presets) or (m in FAIRNESS and ds in unavailable)]
    header = ["preset", "n"] + [f"{datasets[ds]} {m}" for ds, m in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in presets:
        n = max((index[k]["n"] for k in index if k[0] == p), default=0)
        lines.append("| " + " | ".join([p, str(n)] + [_cell(index.get((p, ds, m)), m) for ds, m in cols]) + " |")
    intervals = set(summary["interval"]) - {""}
    out = [f"## {title}\n\n" if title else "",
           f"rows: presets; columns: {what} x metric; mean ± sd over seeds (n = runs) [95 % interval: "
           + ("t interval of the mean over seeds" if "t" in intervals else "")
           + (" / " if len(intervals) > 1 else "")
           + ("with one seed, the run's bootstrap interval" if "bootstrap" in intervals else "") + "]\n\n",
           "\n".join(lines) + "\n"]
    for ds, why in unavailable.items():
        if ds in datasets:
            out.append(f"\n{datasets[ds]}: fairness metrics n/a: {why}\n")
    legend = ["n", "±", *dict.fromkeys(m for _, m in cols if m in METRIC_MEANINGS)]
    out += ["\n", metric_legend(legend)]
    return "".join(out)


def plot_protocol(summary: pd.DataFrame, path: Path, datasets: dict[str, str], metrics, *, title: str = ""):
    """Per metric one panel: for each test set a bar per preset (mean over seeds, sd error bars)."""
    plt = _plt()
    metrics = [m for m in metrics if m in set(summary["metric"])]
    presets = list(dict.fromkeys(summary["preset"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 1.2 * len(datasets) + 2) * len(metrics), 4.2),
                             squeeze=False)
    width = 0.8 / max(1, len(presets))
    x = np.arange(len(datasets))
    index = summary.set_index(["preset", "dataset", "metric"])
    for ax, metric in zip(axes[0], metrics):
        for i, p in enumerate(presets):
            means = [index["mean"].get((p, ds, metric), np.nan) for ds in datasets]
            sds = [index["sd"].get((p, ds, metric), np.nan) for ds in datasets]
            ax.bar(x + (i - (len(presets) - 1) / 2) * width, means, width, yerr=np.nan_to_num(sds), capsize=3,
                   color=f"C{i % 10}", label=p)
        ax.set_xticks(x, list(datasets.values()), rotation=20, ha="right", fontsize=8)
        ax.set(ylabel=metric.upper() + (" (pp)" if metric.startswith("f_") else ""))
    axes[0][0].legend(title="preset", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + "mean ± sd over seeds; missing bar: n/a", fontsize=9)
    return _save(plt, fig, path)


def write_protocol(runs: pd.DataFrame, out: Path, stem: str, datasets: dict[str, str], metrics, *,
                   title: str = "", what: str = "test set", unavailable: dict[str, str] | None = None
                   ) -> tuple[str, pd.DataFrame, list[str]]:
    """``<stem>.csv``, ``<stem>_runs.csv``, ``<stem>.md`` and ``<stem>.png`` in ``out``; returns the
    markdown, the summary and the file names."""
    out = Path(out)
    runs = pd.DataFrame(runs, columns=list(RUN_COLUMNS))
    summary = summarise(runs)
    write_csv_rounded(summary, out / f"{stem}.csv")
    write_csv_rounded(runs, out / f"{stem}_runs.csv")
    markdown = protocol_markdown(summary, datasets, metrics, title=title, what=what, unavailable=unavailable)
    write_atomic(out / f"{stem}.md", markdown)
    files = [f"{stem}.csv", f"{stem}_runs.csv", f"{stem}.md"]
    if len(summary) and summary["mean"].notna().any():
        plot_protocol(summary, out / f"{stem}.png", datasets, metrics, title=title)
        files.append(f"{stem}.png")
    return markdown, summary, files
