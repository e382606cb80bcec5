"""`featcache ablate`: every preset x seed of a task, evaluated in-domain and on other caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import presets_of
from ..errors import FeatcacheError
from ..report.plots import plot_ablation
from ..report.tables import markdown_table
from .evaluate import evaluate_head
from .trainer import train_head

#: The columns of ablation.md, when present.
REPORTED = ("auc", "acc", "eer", "f_fpr", "f_meo", "f_eo", "f_dp", "f_oae", "ece")


def ablate(task: str, cache, out, *, presets="all", seeds=(0, 1, 2), evals: dict | None = None, sets=(),
           options: dict | None = None, progress: bool = True, echo=print) -> pd.DataFrame:
    """Train every preset x seed into ``out/<preset>/seed<k>``; finished runs are reused.

    Writes ``ablation.csv`` (one row per run: val, test and each eval cache's test metrics),
    ``ablation.md`` (mean ± std per preset) and ``ablation_auc_vs_f_fpr.png``.
    """
    out = Path(out)
    names = presets_of(task) if presets in ("all", ["all"], ("all",)) else list(presets)
    if not names:
        raise FeatcacheError(f"task {task} has no presets to ablate")
    unknown = [p for p in names if p not in presets_of(task)]
    if unknown:
        raise FeatcacheError(f"unknown preset(s) {', '.join(unknown)}; {task} has {', '.join(presets_of(task))}")
    rows = []
    for preset in names:
        for seed in seeds:
            run = out / preset / f"seed{seed}"
            if (run / "summary.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
                echo(f"{preset} seed {seed}: done before, reused")
            else:
                res = train_head(task, cache, run, preset=preset, sets=[*sets, f"training.seed={seed}"],
                                 overwrite=True, progress=progress, options=options)
                summary = {"val": res.val, "test": res.test, "best_epoch": res.best_epoch, "seconds": res.seconds}
                echo(f"{preset} seed {seed}: test auc {res.test.get('auc', float('nan')):.3f}, "
                     f"f_fpr {res.test.get('f_fpr', float('nan')):.1f} ({res.seconds:.0f} s)")
            row = {"preset": preset, "seed": seed, "best_epoch": summary.get("best_epoch"),
                   "seconds": summary.get("seconds"),
                   **{f"val_{k}": v for k, v in summary["val"].items()},
                   **{f"test_{k}": v for k, v in summary["test"].items()}}
            for name, other in (evals or {}).items():
                metrics = evaluate_head(run, other, split="test", name=name).metrics
                row.update({f"{name}_{k}": v for k, v in metrics.items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "ablation.csv", index=False)
    (out / "ablation.md").write_text(summary_table(df, list(evals or {})))
    if "test_auc" in df and "test_f_fpr" in df:
        plot_ablation(df, out / "ablation_auc_vs_f_fpr.png")
    return df


def summary_table(df: pd.DataFrame, evals: list[str]) -> str:
    """Markdown: mean ± std over seeds per preset, test metrics then each eval cache's AUC."""
    cols = [f"test_{m}" for m in REPORTED if f"test_{m}" in df] + [f"{e}_auc" for e in evals if f"{e}_auc" in df]
    rows = []
    for preset, g in df.groupby("preset", sort=False):
        row = {"preset": preset, "runs": len(g)}
        for c in cols:
            v = g[c].astype(float)
            spec = ".1f" if c.split("_", 1)[1].startswith("f_") else ".3f"
            row[c.replace("test_", "")] = (f"{np.nanmean(v):{spec}} ± {np.nanstd(v):{spec}}"
                                           if v.notna().any() else "n/a")
        rows.append(row)
    return markdown_table(pd.DataFrame(rows))
