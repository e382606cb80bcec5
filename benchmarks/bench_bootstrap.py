"""The bootstrap intervals of ``featcache evaluate``, timed (issue 15's goal: 1,000 resamples of
10,000 predictions in at most 2 s on the 2-core CPU).

    python benchmarks/bench_bootstrap.py [--rows 10000] [--boot 1000] [--loop 30] [--repeat 3]

A seeded predictions table of ``--rows`` rows (labels, P(fake) rounded to 3 decimals so that
scores tie as a detector's do, 8 subgroups plus unknowns, ``--rows / 10`` identities) is given to
:func:`featcache.metrics.bootstrap.bootstrap_ci` with ``--boot`` resamples (AUC, EER, ACC and the
five fairness metrics, identity clusters, stratified by label); best of ``--repeat``.  The plain
loop it replaces (index the resampled rows, then sklearn's ``roc_auc_score``, featcache's ``eer``
and ``fairness_metrics``) is timed on ``--loop`` of the same resamples, per resample, and the
ratio is the loop's time per resample over the vectorised one's (above 1: the vectorised
bootstrap is faster).  The values of those resamples are checked to agree.

Not part of the tests: the figures go in the README's performance section, with the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from featcache.metrics import eer, fairness_metrics  # noqa: E402
from featcache.metrics.bootstrap import bootstrap, bootstrap_weights  # noqa: E402


def predictions(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows)
    p = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1), 3)
    return pd.DataFrame({"label": y, "prob": p, "subgroup": rng.integers(-1, 8, rows),
                         "identity": rng.integers(0, max(rows // 10, 1), rows).astype(str)})


def measure(rows: int, n_boot: int, loop: int, repeat: int) -> dict:
    from sklearn.metrics import roc_auc_score

    df = predictions(rows)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        b = bootstrap(df, n_boot=n_boot, seed=0)
        b.ci(0.95)
        times.append(time.perf_counter() - t)
    weights = bootstrap_weights(df, n_boot=n_boot, seed=0)[:loop]
    y, p, g = df["label"].to_numpy(), df["prob"].to_numpy(), df["subgroup"].to_numpy()
    t = time.perf_counter()
    worst = 0.0
    for i, w in enumerate(weights):
        idx = np.repeat(np.arange(rows), w)
        ref = {"auc": roc_auc_score(y[idx], p[idx]), "eer": eer(y[idx], p[idx]),
               "acc": float(((p[idx] >= 0.5) == y[idx]).mean()), **fairness_metrics(y[idx], p[idx], g[idx])}
        worst = max(worst, max(abs(b.values[k][i] - v) for k, v in ref.items()))
    loop_per = (time.perf_counter() - t) / max(loop, 1)
    best = min(times)
    return {"seconds": best, "per": best / n_boot, "loop_per": loop_per, "worst": worst,
            "clusters": b.n_clusters}


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py (CPU only: the bootstrap is numpy)."""
    rows, n_boot = 10_000, 1000
    m = measure(rows, n_boot, loop=10 if quick else 30, repeat=2 if quick else 3)
    return [{"measure": f"bootstrap_ci, {n_boot} resamples of {rows:,} predictions (AUC, EER, ACC, 5 fairness)",
             "ratio": m["loop_per"] / m["per"], "value": f"{m['seconds']:.2f} s (goal <= 2 s)",
             "note": f"ratio: plain loop (sklearn AUC, eer, fairness_metrics) per resample over the vectorised; "
                     f"{m['clusters']} identity clusters; values agree to {m['worst']:.1e}"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--loop", type=int, default=30, help="resamples timed with the plain loop")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    m = measure(args.rows, args.boot, args.loop, args.repeat)
    print(f"bootstrap_ci: {args.boot} resamples of {args.rows:,} predictions ({m['clusters']} identity clusters): "
          f"{m['seconds']:.2f} s (best of {args.repeat}), {1e3 * m['per']:.2f} ms per resample")
    print(f"plain loop: {1e3 * m['loop_per']:.1f} ms per resample (over {args.loop}); "
          f"ratio {m['loop_per'] / m['per']:.0f}x; largest difference {m['worst']:.1e}")


if __name__ == "__main__":
    main()
