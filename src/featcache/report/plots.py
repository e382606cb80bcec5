"""Plots written by training, evaluation and ablation; matplotlib with the Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(log: pd.DataFrame, path: Path, best_epoch: int | None = None) -> None:
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
    for ax in (ax1, ax2):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y: np.ndarray, p: np.ndarray, path: Path, title: str = "") -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_subgroup_rates(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """FPR and TPR per subgroup as bars, with the overall rates as lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["fpr"], 0.4, label="FPR")
    ax.bar(x + 0.2, table["tpr"], 0.4, label="TPR")
    ax.set_xticks(x, [f"{s}\n(n={n})" for s, n in zip(table["subgroup"], table["n"])], fontsize=7)
    ax.set(ylabel="rate", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(df: pd.DataFrame, path: Path, x: str = "test_f_fpr", y: str = "test_auc") -> None:
    """Each run as a point, each preset's mean with one-standard-deviation bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (preset, g) in enumerate(df.groupby("preset", sort=False)):
        color = f"C{i}"
        ax.scatter(g[x], g[y], color=color, alpha=0.35, s=18)
        ax.errorbar(g[x].mean(), g[y].mean(), xerr=g[x].std(ddof=0), yerr=g[y].std(ddof=0), fmt="o",
                    color=color, capsize=3, label=preset)
    ax.set(xlabel=_metric_label(x), ylabel=_metric_label(y))
    ax.legend(title="preset", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _metric_label(column: str) -> str:
    """``test_f_fpr`` -> ``test F_FPR``, ``val_auc`` -> ``val AUC``."""
    split, _, metric = column.partition("_")
    return f"{split} {metric.upper()}" if metric else column
