"""The statistics of issue 23 measured by simulation with known truth, and their speed.

    python benchmarks/bench_stats.py [--part all|coverage|permutation|ranges|speed] [--reps 400] [--boot 1000]
                                     [--perm 1000]

- ``coverage``: the 95 % AUC interval's coverage on clustered binormal data (the statistics review
  S2(b), (c)): n = 200 rows in label-pure identities of 1-5 rows (about 65), ICC 0.3, AUC 0.9
  and 0.97, ``--reps`` datasets x ``--boot`` resamples.  Printed for the BCa interval
  (featcache's), the percentile interval of the same resamples, and the rows-only percentile
  interval (``cluster=None``).  The spec's band for BCa: [0.92, 0.98].
- ``permutation``: the no-disparity floor and p-value (S3b) on the review's 8-subgroup design:
  rejection at 0.05 on zero-disparity data at n = 160 (``--reps`` 300) and 1,000 (200), which
  must lie in [0.02, 0.08] for F_FPR and F_MEO and at most 0.08 for F_DP and F_OAE; detectors A
  and A - 1 logit (n = 1,000, 150 datasets): mean(F - floor) within [-2, 2] for both while the raw
  F_FPR differ; power on the moderate scenario (n = 1,000, 200 datasets), F_FPR at least 0.40.
- ``ranges``: the Wilson–Bonferroni ranges (S3c) in the review's 18 cells (zero, moderate, large;
  n = 160 and 1,000; F_FPR, F_MEO, F_DP, F_OAE), 300 test sets each: coverage at least 0.95, the
  point inside every range, the lower bound 0 in at least 95 % of zero-gap test sets.
- ``speed``: 1,000 permutations and 1,000 resamples of 10,000 predictions (issue 23's goal: at
  most 3 s together on the 2-core CPU); best of 3.

Not part of the tests (the suite runs a fast version of each check, ``tests/test_statistics.py``):
the figures go in the README and ARCHITECTURE.md.  Seeded: the same arguments print the same
coverages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from featcache.metrics.bootstrap import bootstrap  # noqa: E402
from featcache.metrics.fairness import cell_counts, fairness_metrics, gap_ranges  # noqa: E402
from featcache.metrics.permutation import fairness_floor, permutation_values  # noqa: E402
from featcache.metrics.simulate import LARGE, MODERATE, ZERO, clustered_binormal, subgroup_scores, true_gaps  # noqa: E402


def _half(c: float, reps: int) -> float:
    return 1.96 * np.sqrt(max(c * (1 - c), 1e-12) / reps)


def coverage(reps: int, n_boot: int) -> None:
    print(f"AUC coverage, clustered binormal (n = 200, label-pure identities of 1-5 rows, ICC 0.3), "
          f"{reps} datasets x {n_boot} resamples")
    for auc in (0.9, 0.97):
        hits = {"BCa (featcache)": 0, "percentile, same resamples": 0, "percentile, rows only": 0}
        low = {"BCa": 0, "percentile": 0}  # the truth below the interval: the skew the percentile misses
        clusters = []
        t = time.perf_counter()
        for r in range(reps):
            df = clustered_binormal(200, auc, np.random.default_rng(10_000 + r))
            b = bootstrap(df, n_boot=n_boot, seed=r)
            lo, hi = b.ci()["auc"]
            plo, phi = np.quantile(b.values["auc"], [0.025, 0.975])
            rlo, rhi = bootstrap(df, n_boot=n_boot, seed=r, cluster=None).ci()["auc"]
            hits["BCa (featcache)"] += lo <= auc <= hi
            hits["percentile, same resamples"] += plo <= auc <= phi
            hits["percentile, rows only"] += rlo <= auc <= rhi
            low["BCa"] += auc < lo
            low["percentile"] += auc < plo
            clusters.append(b.n_clusters)
        line = ", ".join(f"{k} {v / reps:.3f} ±{_half(v / reps, reps):.3f}" for k, v in hits.items())
        print(f"  AUC {auc}: {line}; truth below the interval: BCa {low['BCa'] / reps:.3f}, percentile "
              f"{low['percentile'] / reps:.3f} (mean {np.mean(clusters):.0f} identities; {time.perf_counter() - t:.0f} s)")


def permutation(reps: int, n_perm: int) -> None:
    keys = ("f_fpr", "f_meo", "f_dp", "f_oae")
    print(f"Permutation floor and p-value, 8 subgroups, rows without clusters, {n_perm} permutations")
    for n, k in ((160, reps), (1000, max(reps * 2 // 3, 1))):
        for name, mu in (("zero", ZERO), ("moderate", MODERATE)):
            rej = dict.fromkeys(keys, 0)
            est = dict.fromkeys(keys, 0.0)
            floor = dict.fromkeys(keys, 0.0)
            for r in range(k):
                df = subgroup_scores(n, np.random.default_rng(20_000 + r), mu)
                null = fairness_floor(df, n_perm=n_perm, seed=r)
                f = fairness_metrics(df["label"], df["prob"], df["subgroup"])
                for key in keys:
                    rej[key] += null[key]["p"] <= 0.05
                    est[key] += f[key] / k
                    floor[key] += null[key]["floor"] / k
            truth = true_gaps(n, mu)
            print(f"  n {n}, {name} ({k} datasets): " + "; ".join(
                f"{key} truth {truth[key]:.1f} est {est[key]:.1f} floor {floor[key]:.1f} "
                f"reject {rej[key] / k:.3f}" for key in keys))
    k = max(reps // 2, 1)
    print(f"  operating point, n 1000, zero disparity, {k} datasets (A; B = A - 1 logit):")
    for key in ("f_fpr", "f_meo"):
        raw, net = {"A": [], "B": []}, {"A": [], "B": []}
        for r in range(k):
            rng = np.random.default_rng(30_000 + r)
            a = subgroup_scores(1000, rng, ZERO)
            logit = np.log(a["prob"] / (1 - a["prob"]))
            for det, df in (("A", a), ("B", a.assign(prob=1 / (1 + np.exp(-(logit - 1)))))):
                observed, permuted = permutation_values(df, n_perm=n_perm, seed=r)
                raw[det].append(observed[key])
                net[det].append(observed[key] - np.nanmean(permuted[key]))
        print(f"    {key}: raw A {np.mean(raw['A']):.1f} B {np.mean(raw['B']):.1f}; "
              f"F - floor A {np.mean(net['A']):+.2f} B {np.mean(net['B']):+.2f} "
              f"(difference {np.mean(net['A']) - np.mean(net['B']):+.2f} ± "
              f"{1.96 * np.std(np.subtract(net['A'], net['B']), ddof=1) / np.sqrt(k):.2f})")


def ranges(reps: int) -> None:
    keys = ("f_fpr", "f_meo", "f_dp", "f_oae")
    print(f"Wilson-Bonferroni ranges (fairness_range95), 8 subgroups, rows without clusters, {reps} test sets per cell")
    for n in (160, 1000):
        for name, mu in (("zero", ZERO), ("moderate", MODERATE), ("large", LARGE)):
            truth = true_gaps(n, mu)
            cover, inside, width, zero_lo = (dict.fromkeys(keys, 0.0) for _ in range(4))
            for r in range(reps):
                df = subgroup_scores(n, np.random.default_rng(50_000 + r), mu)
                _, cells = cell_counts(df["label"], df["prob"], df["subgroup"])
                got = gap_ranges(cells)
                point = fairness_metrics(df["label"], df["prob"], df["subgroup"])
                for k in keys:
                    lo, hi = got[k]
                    cover[k] += (lo <= truth[k] <= hi) / reps
                    inside[k] += (lo <= point[k] <= hi) / reps
                    width[k] += (hi - lo) / reps
                    zero_lo[k] += (lo == 0) / reps
            print(f"  n {n}, {name}: " + "; ".join(
                f"{k} truth {truth[k]:.1f} coverage {cover[k]:.3f} point inside {inside[k]:.2f} width {width[k]:.0f}"
                + (f" lower 0 in {zero_lo[k]:.2f}" if name == "zero" else "") for k in keys))


def speed(n_boot: int, n_perm: int, repeat: int = 3) -> None:
    rng = np.random.default_rng(0)
    rows = 10_000
    y = rng.integers(0, 2, rows)
    p = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1), 3)
    df = pd.DataFrame({"label": y, "prob": p, "subgroup": rng.integers(-1, 8, rows),
                       "identity": rng.integers(0, rows // 10, rows).astype(str)})
    for name, d in (("identity clusters", df), ("rows", df.drop(columns=["identity"]))):
        best = {"bootstrap": [np.inf, np.inf], "permutation": [np.inf, np.inf]}  # [wall, cpu]
        for _ in range(repeat):
            for part, run in (("bootstrap", lambda d=d: bootstrap(d, n_boot=n_boot, seed=0).ci()),
                              ("permutation", lambda d=d: fairness_floor(d, n_perm=n_perm, seed=0))):
                t, c = time.perf_counter(), time.process_time()
                run()
                best[part] = [min(best[part][0], time.perf_counter() - t), min(best[part][1], time.process_time() - c)]
        wall, cpu = (sum(v[i] for v in best.values()) for i in (0, 1))
        print(f"speed, {rows} predictions ({name}): {n_boot} resamples (BCa AUC, EER, ACC, 5 gaps) "
              f"{best['bootstrap'][0]:.2f} s + {n_perm} permutations (5 floors) {best['permutation'][0]:.2f} s = "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU (best of {repeat}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=("all", "coverage", "permutation", "ranges", "speed"))
    ap.add_argument("--reps", type=int, default=400, help="datasets for coverage (permutation: 300 at n=160)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--perm", type=int, default=1000)
    a = ap.parse_args()
    if a.part in ("all", "speed"):
        speed(a.boot, a.perm)
    if a.part in ("all", "coverage"):
        coverage(a.reps, a.boot)
    if a.part in ("all", "permutation"):
        permutation(a.reps if a.part == "permutation" else 300, a.perm)
    if a.part in ("all", "ranges"):
        ranges(a.reps if a.part == "ranges" else 300)


if __name__ == "__main__":
    main()
