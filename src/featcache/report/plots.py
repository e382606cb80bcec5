"""Plots written by training, evaluation and ablation; matplotlib with the Agg backend.

Every function takes a ``title`` (callers put the run and preset in it: a PNG travels without
its folder), saves the figure to ``path`` and returns the closed :class:`matplotlib.figure.Figure`
(for tests and notebooks to inspect).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.audio import parse_segments
from ..errors import OutputError, write_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(log: pd.DataFrame, path: Path, best_epoch: int | None = None, title: str = ""):
    """Train loss terms (left) and validation metrics (right) per epoch; the best epoch marked."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for col in [c for c in log.columns if c.startswith("train_")]:
        ax1.plot(log["epoch"], log[col], label=col[6:])
    ax1.set(xlabel="epoch", ylabel="train loss terms", yscale="symlog")
    wanted = ["auc", "acc", "eer", "cos", "race_acc", "gender_acc"]
    for name in wanted:
        if f"val_{name}" in log:
            ax2.plot(log["epoch"], log[f"val_{name}"], label=name)
    ax2.plot(log["epoch"], log["score"], "k--", label="selection score")
    ax2.set(xlabel="epoch", ylabel="validation")
    return _save_epoch_plot(plt, fig, (ax1, ax2), best_epoch, path, title)


def _save_epoch_plot(plt, fig, axes, best_epoch: int | None, path: Path, title: str = ""):
    """Per-epoch panels: mark the best epoch, add legends and the title, save and close."""
    for ax in axes:
        if best_epoch:
            ax.axvline(best_epoch, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def image_format(path) -> str:
    """The image format of ``path`` from its suffix (``png`` without one); an
    :class:`~featcache.errors.OutputError` for a format matplotlib cannot write."""
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise OutputError(f"cannot write {path}: matplotlib writes no {fmt!r} images; use one of "
                          f"{', '.join(sorted(supported))} (.png is the default)")
    return fmt


def _save(plt, fig, path: Path):
    """Render the figure in memory, then write it whole (:func:`featcache.errors.write_atomic`):
    a full disk is one line naming the file and the space it needs, and leaves no half image."""
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format=image_format(path))
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
    return fig


def plot_roc(y: np.ndarray, p: np.ndarray, path: Path, title: str = ""):
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(plt, fig, path)


def plot_subgroup_rates(table: pd.DataFrame, path: Path, title: str = ""):
    """FPR and TPR per subgroup as bars, with the overall rates as lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["fpr"], 0.4, label="FPR")
    ax.bar(x + 0.2, table["tpr"], 0.4, label="TPR")
    ax.set_xticks(x, [f"{s}\n(n={n})" for s, n in zip(table["subgroup"], table["n"])], fontsize=7)
    ax.set(ylabel="rate", ylim=(0, 1), title=title)
    ax.legend()
    return _save(plt, fig, path)


def plot_ablation(df: pd.DataFrame, path: Path, x: str = "test_f_fpr", y: str = "test_auc", title: str = ""):
    """Each run as a faint point; each preset's mean over seeds as one marker with error bars of
    one sample standard deviation over seeds (ddof = 1; none with a single seed) on both axes.

    ``title``: the ablation (task, run folder); the legend names the presets and the seed count.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (preset, g) in enumerate(df.groupby("preset", sort=False)):
        color = f"C{i % 10}"
        gx, gy = g[x].astype(float), g[y].astype(float)
        ax.scatter(gx, gy, color=color, alpha=0.35, s=18)
        ax.errorbar(gx.mean(), gy.mean(), xerr=_sd(gx), yerr=_sd(gy), fmt="o", color=color, capsize=3,
                    label=f"{preset} (n={len(g)})")
    ax.set(xlabel=_metric_label(x), ylabel=_metric_label(y))
    ax.set_title((title + "\n" if title else "") + "mean ± sd over seeds; faint: single runs", fontsize=9)
    ax.legend(title="preset (runs)", fontsize=8)
    return _save(plt, fig, path)


def _sd(values: pd.Series) -> float:
    """Sample standard deviation over seeds (ddof = 1); 0 (no bar) with fewer than two values."""
    return float(values.std(ddof=1)) if values.notna().sum() > 1 else 0.0


def _metric_label(column: str) -> str:
    """``test_f_fpr`` -> ``test F_FPR (pp, sum over subgroups)``, ``val_auc`` -> ``val AUC``."""
    split, _, metric = column.partition("_")
    if not metric:
        return column
    unit = {"f_fpr": " (pp, sum over subgroups)", "f_eo": " (pp, sum over subgroups)"}.get(
        metric, " (pp)" if metric.startswith("f_") else "")
    return f"{split} {metric.upper()}{unit}"


def plot_leakage_audit(before: pd.DataFrame, after: pd.DataFrame | None, path: Path, k: int = 10,
                       title: str = ""):
    """Per attribute: purity@k, kNN and probe accuracy as bars, each with its chance level as a tick.

    ``before`` / ``after`` are leakage-audit tables (:func:`featcache.analyze.subgroups.audit_features`);
    with ``after`` the debiased bars (hatched) stand beside the raw ones.  Purity's chance level
    is ``purity_chance``, the accuracies' the val majority rate ``chance``.
    """
    plt = _plt()
    measures = [(f"purity@{k}", "purity_chance", f"purity@{k}"), ("knn_acc", "chance", "kNN acc"),
                ("probe_acc", "chance", "probe acc")]
    sets = [("raw", before)] + ([("debiased", after)] if after is not None else [])
    attributes = list(before["attribute"])
    n_bars = len(measures) * len(sets)
    width = 0.8 / n_bars
    fig, ax = plt.subplots(figsize=(max(5.5, 1.9 * len(attributes) + 1.5) + 2.2, 4.2))
    x = np.arange(len(attributes))
    for m, (col, chance_col, label) in enumerate(measures):
        for s, (set_name, table) in enumerate(sets):
            t = table.set_index("attribute").reindex(attributes)
            pos = x - 0.4 + width * (m * len(sets) + s + 0.5)
            ax.bar(pos, t[col], width, color=f"C{m}", alpha=1.0 if s == 0 else 0.55, hatch="" if s == 0 else "//",
                   edgecolor="white" if s == 0 else f"C{m}",
                   label=f"{label} ({set_name})" if len(sets) > 1 else label)
            ax.hlines(t[chance_col], pos - width / 2, pos + width / 2, colors="black", lw=1.6,
                      label="chance" if m == 0 and s == 0 else None)
    ax.set_xticks(x, [f"{a}\n({c} classes)" for a, c in zip(before["attribute"], before["classes"])], fontsize=8)
    ax.set(ylabel="rate", ylim=(0, 1.05), title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(plt, fig, path)


def plot_embedding_map(xy: np.ndarray, groups, path: Path, title: str = "", legend_title: str = "",
                       order=None, marks: dict | None = None):
    """A 2-D scatter of points coloured by group (strings); the largest group is drawn first.

    ``order``: group names in colour order (e.g. the subgroup names in code order, so that a
    group keeps its colour from map to map); groups not in it follow, sorted.  ``marks``: named
    points (e.g. prototypes) drawn as black stars with their names.
    """
    plt = _plt()
    groups = np.asarray(groups, dtype=object)
    names, counts = np.unique(groups, return_counts=True)
    palette = [g for g in (order or []) if g in set(names)] + sorted(set(names) - set(order or []))
    color = {g: f"C{i % 10}" for i, g in enumerate(palette)}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    size = float(np.clip(3000 / max(len(xy), 1), 1.0, 20.0))
    handles = {}
    for name in names[np.argsort(-counts, kind="stable")]:
        sel = groups == name
        handles[name] = ax.scatter(xy[sel, 0], xy[sel, 1], s=size, alpha=0.6, lw=0, color=color[name],
                                   label=f"{name} ({int(sel.sum())})")
    for name, (mx, my) in (marks or {}).items():
        ax.scatter([mx], [my], marker="*", s=260, color="black", edgecolor="white", zorder=5)
        ax.annotate(name, (mx, my), xytext=(6, 6), textcoords="offset points", fontsize=9, weight="bold")
    ax.set(title=title, xticks=[], yticks=[])
    ax.title.set_fontsize(9)
    ax.legend([handles[g] for g in palette], [handles[g].get_label() for g in palette], title=legend_title or None,
              fontsize=7, markerscale=max(1.0, 5 / size ** 0.5), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    return _save(plt, fig, path)


def plot_reliability(panels: list[tuple[str, pd.DataFrame, dict]], path: Path, title: str = ""):
    """Reliability diagrams side by side: per panel (name, reliability bins, calibration metrics).

    Bars: the fraction of fakes per bin; hatched: the gap to the bin's mean probability; the
    diagonal is perfect calibration; the bins' shares of the samples are drawn faintly underneath.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4), squeeze=False)
    for ax, (name, bins, m) in zip(axes[0], panels):
        filled = bins[bins["count"] > 0]
        width = float(bins["hi"].iloc[0] - bins["lo"].iloc[0])
        ax.bar(filled["lo"], filled["frac_pos"], width=width, align="edge", edgecolor="black", lw=0.5,
               color="C0", label="fraction fake")
        ax.bar(filled["lo"], filled["gap"], bottom=np.minimum(filled["frac_pos"], filled["mean_p"]), width=width,
               align="edge", fill=False, hatch="///", edgecolor="C3", lw=0, label="gap to mean P(fake)")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        share = ax.twinx()
        share.bar(bins["lo"], bins["count"] / max(bins["count"].sum(), 1), width=width, align="edge", color="grey",
                  alpha=0.15)
        share.set(ylim=(0, 4), yticks=[])
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(fake)", ylabel="observed fraction fake",
               title=f"{name}: ECE {m['ece']:.3f}, MCE {m['mce']:.3f}")
        ax.title.set_fontsize(9)
        ax.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_confusion(tn: int, fp: int, fn: int, tp: int, path: Path, title: str = ""):
    """The 2 x 2 confusion matrix (rows: true real/fake; columns: predicted), counts and row shares."""
    plt = _plt()
    cm = np.array([[tn, fp], [fn, tp]], dtype=float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(cm[i, j])}\n({share[i, j]:.1%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks([0, 1], ["real", "fake"])
    ax.set_yticks([0, 1], ["real", "fake"])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(plt, fig, path)


def plot_cascade(rows: pd.DataFrame, path: Path, *, marks=(), recommended: float | None = None,
                 max_leakage: float | None = None, title: str = ""):
    """Cascade trade-off against the threshold: rates on the left axis (filtration, leakage,
    precision of what stops, and whichever of ``auc``, ``compute_saved`` the table holds).

    ``marks``: thresholds drawn as points; ``recommended``: a vertical line; ``max_leakage``:
    the leakage budget as a horizontal line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for col, label in (("filtration", "filtration (stopped)"), ("leakage", "leakage (fakes stopped)"),
                       ("precision", "precision of stopped"), ("auc", "cascade AUC"),
                       ("compute_saved", "compute saved")):
        if col in rows:
            ax.plot(rows["threshold"], rows[col], label=label)
            sel = rows[rows["threshold"].isin(list(marks))]
            ax.scatter(sel["threshold"], sel[col], s=14)
    if max_leakage is not None:
        ax.axhline(max_leakage, color="C1", ls="--", lw=0.8, label=f"leakage budget {max_leakage:g}")
    if recommended is not None:
        ax.axvline(recommended, color="grey", ls=":", label=f"recommended t = {recommended:g}")
    ax.set(xlabel="threshold t (stop when 1 - P(fake) >= t)", ylabel="rate", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(plt, fig, path)


def plot_importance(importances, segments, titles, path: Path, hop_seconds: float = 0.02,
                    centre_seconds: float = 0.0125, title: str = ""):
    """Frame importance w(t) over time, one panel per utterance, true spoofed intervals shaded."""
    plt = _plt()
    fig, axes = plt.subplots(len(importances), 1, figsize=(9, 1.6 * len(importances) + 0.4), squeeze=False)
    for ax, w, seg, title in zip(axes[:, 0], importances, segments, titles):
        t = np.arange(len(w)) * hop_seconds + centre_seconds
        for i, (a, b) in enumerate(parse_segments(seg)):
            ax.axvspan(a, b, color="C3", alpha=0.2, lw=0, label="spoofed" if i == 0 else None)
        ax.plot(t, w, color="C0", lw=1.2, label="importance w(t)")
        ax.set(ylim=(-0.02, 1.02), xlim=(0, max(t[-1] if len(t) else 0, 0.1)), ylabel="w")
        ax.set_title(title, fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("seconds")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
