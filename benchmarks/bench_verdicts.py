"""The ablation's verdicts with known truth (issue 23; the statistics review's operating-point, seed and S4 simulations): the heavy
versions of ``tests/test_compare.py``'s simulations.

    python benchmarks/bench_verdicts.py [--reps 300] [--ablations 200] [--holm 2000] [--boot 300] [--only a,b,c]

(a) **Coverage** of :func:`featcache.metrics.compare.paired_differences`' interval on the spec's §3
    model 2 (two presets, 400 balanced test rows, AUC about 0.9, a preset x sample interaction of
    variance 0.15 shared by the preset's seeds; ``--reps`` datasets, ``--boot`` resamples), at k = 3
    and 5 seeds, against the t interval over seeds alone.  Truth: the population AUC difference
    averaged over the seed effect (Gauss-Hermite, 60 nodes).
(b) **Holm**: 5 presets equal to the baseline plus noise, 3 seeds, ``--holm`` ablations: the rate
    of ablations with any ``*`` on a metric, with and without the adjustment.
(c) **Operating point**: §2.4, n = 1,000 rows in 8 subgroups with no disparity; preset B is A
    minus one logit; each seed adds N(0, 0.3²) to every row's logit; k = 5; ``--ablations`` test sets.
    The floor of each run is a permutation loop written here (200 permutations of the subgroup codes
    within each label), independent of featcache.  Reported: the ``*`` rate on Δ(F̂ − floor), how
    often the interval of the raw Δ F̂ excludes 0 (the old verdict), and the sd over test sets of
    A's F̂ and of its floor (the floor barely moves: why ``V`` of F̂ − floor is taken from F̂).

Not part of the tests; the figures go in the README / the report with the machine and the date.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from featcache.metrics.compare import paired_differences  # noqa: E402
from featcache.metrics.simulate import seed_ablation, seed_ablation_truth, subgroup_design  # noqa: E402


def coverage(reps: int, boot: int) -> list[dict]:
    truth = seed_ablation_truth()
    out = []
    for k in (3, 5):
        rng = np.random.default_rng(100 + k)
        hit = hit_t = 0
        width = []
        t0 = time.perf_counter()
        for _ in range(reps):
            df, tables = seed_ablation(rng, k)
            r = paired_differences(df, ["test_auc"], predictions={"test": tables}, n_boot=boot).iloc[0]
            t = paired_differences(df, ["test_auc"]).iloc[0]
            hit += r["lo"] <= truth <= r["hi"]
            hit_t += t["lo"] <= truth <= t["hi"]
            width.append(r["hi"] - r["lo"])
        c, ct = hit / reps, hit_t / reps
        out.append({"measure": f"model 2, k = {k}: coverage, seeds + test set", "value": f"{c:.3f} ± {1.96 * math.sqrt(c * (1 - c) / reps):.3f}",
                    "note": f"{reps} datasets, B = {boot}, truth Δ = {truth:+.4f}, mean width {np.mean(width):.4f}, "
                            f"{time.perf_counter() - t0:.0f} s"})
        out.append({"measure": f"model 2, k = {k}: coverage, t over seeds only", "value": f"{ct:.3f} ± {1.96 * math.sqrt(ct * (1 - ct) / reps):.3f}",
                    "note": "the interval the ablation printed before issue 23"})
    return out


def holm_rate(ablations: int) -> list[dict]:
    rng = np.random.default_rng(5)
    metrics = [f"test_m{j}" for j in range(4)]
    fam = star = raw = 0
    for _ in range(ablations):
        rows = [{"preset": p, "seed": s, **{m: rng.normal() for m in metrics}}
                for p in ("none", "a", "b", "c", "d", "e") for s in range(3)]
        for _, g in paired_differences(pd.DataFrame(rows), metrics).groupby("metric"):
            fam += 1
            star += g["differs"].any()
            raw += ((g["lo"] > 0) | (g["hi"] < 0)).any()
    return [{"measure": "null, 5 presets x 3 seeds: families with any `*` (Holm)", "value": f"{star / fam:.3f}",
             "note": f"{fam} (metric, ablation) families; at most 0.05 by Holm's guarantee"},
            {"measure": "the same without Holm (any interval excluding 0)", "value": f"{raw / fam:.3f}", "note": ""}]


def f_fpr(decision, codes, y):
    """100 · Σ_g |FPR_g − FPR_all| for each row of a (P, n) matrix of subgroup codes."""
    reals = y == 0
    codes = np.atleast_2d(codes)[:, reals]
    cells = (codes + 8 * np.arange(len(codes))[:, None]).ravel()
    fp = np.bincount(cells, weights=np.tile(decision[reals], len(codes)), minlength=8 * len(codes)).reshape(-1, 8)
    fpr = fp / np.bincount(cells, minlength=8 * len(codes)).reshape(-1, 8)
    return 100 * np.abs(fpr - decision[reals].mean()).sum(1)


def floor(decision, g, y, rng, perms=200):
    permuted = np.tile(g, (perms, 1))
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        permuted[:, idx] = rng.permuted(permuted[:, idx], axis=1)
    return f_fpr(decision, permuted, y).mean()


def operating_point(ablations: int, boot: int, k: int = 5) -> list[dict]:
    g, y = subgroup_design(1000)
    n = len(y)
    rng = np.random.default_rng(9)
    star = raw_star = 0
    excess_a, excess_b, f_a, floor_a, delta_raw = [], [], [], [], []
    t0 = time.perf_counter()
    for _ in range(ablations):
        logit = np.where(y == 1, rng.normal(1, 1, n), rng.normal(-1, 1, n))
        rows, tables = [], {}
        for s in range(k):
            for preset, shift in (("A", 0.0), ("B", -1.0)):
                p = 1 / (1 + np.exp(-(logit + shift + rng.normal(0, 0.3, n))))
                decision = (p >= 0.5).astype(float)
                f, fl = f_fpr(decision, g, y)[0], floor(decision, g, y, rng)
                rows.append({"preset": preset, "seed": s, "test_f_fpr": f, "test_f_fpr_excess": f - fl})
                tables[(preset, s)] = pd.DataFrame({"sample_id": np.arange(n), "label": y, "prob": p, "subgroup": g})
                if s == 0:
                    (excess_a if preset == "A" else excess_b).append(f - fl)
                    if preset == "A":
                        f_a.append(f)
                        floor_a.append(fl)
        d = paired_differences(pd.DataFrame(rows), ["test_f_fpr", "test_f_fpr_excess"], baseline="A",
                               predictions={"test": tables}, n_boot=boot).set_index("metric")
        star += d.loc["test_f_fpr_excess", "differs"]
        raw_star += bool(d.loc["test_f_fpr", "hi"] < 0 or d.loc["test_f_fpr", "lo"] > 0)
        delta_raw.append(d.loc["test_f_fpr", "mean"])
    secs = time.perf_counter() - t0
    return [{"measure": f"operating point, k = {k}: `*` on Δ(F_FPR − floor)", "value": f"{star / ablations:.3f}",
             "note": f"{ablations} test sets, B = {boot}, {secs:.0f} s"},
            {"measure": "the raw Δ F_FPR's interval excluding 0 (the old `*`)", "value": f"{raw_star / ablations:.3f}",
             "note": f"mean raw Δ F_FPR {np.mean(delta_raw):+.1f} (truth 0)"},
            {"measure": "mean F_FPR − floor, A and B (seed 0)", "value": f"{np.mean(excess_a):+.2f} / {np.mean(excess_b):+.2f}",
             "note": "spec: -0.9 / -0.1"},
            {"measure": "sd over test sets of A's F_FPR and of its floor", "value": f"{np.std(f_a, ddof=1):.2f} / "
             f"{np.std(floor_a, ddof=1):.2f}", "note": "the floor barely moves: V of F − floor taken from F"}]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--ablations", type=int, default=200)
    ap.add_argument("--holm", type=int, default=2000)
    ap.add_argument("--boot", type=int, default=300)
    ap.add_argument("--only", default="a,b,c")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    rows = []
    if "a" in only:
        rows += coverage(args.reps, args.boot)
    if "b" in only:
        rows += holm_rate(args.holm)
    if "c" in only:
        rows += operating_point(args.ablations, args.boot)
    print("| measure | value | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['value']} | {r['note']} |", flush=True)


if __name__ == "__main__":
    main()
