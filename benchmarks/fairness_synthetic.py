"""Do the Stage-2 fairness presets lower F_FPR at little cost in AUC? Measured on a controlled cache.

    python benchmarks/fairness_synthetic.py [--rows 6000] [--dim 256] [--bias 0.6] [--presets none,cvar,full]

A synthetic feature cache (``featcache.cache.synth``) where fakes are harder to tell
apart for some subgroups, Stage 1 trained on it, then every preset x seed of Stage 2; prints
the ablation table (test split, mean ± std over seeds) and each preset's change against
``none``. Not part of the tests: the table goes in the README.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from featcache.cache.synth import synth_feature_cache  # noqa: E402
from featcache.train import ablate, train_head  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--bias", type=float, default=0.6)
    ap.add_argument("--presets", default="none,cvar,full")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra KEY=VALUE for Stage 2")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="featcache-fairness-"))
    t0 = time.perf_counter()
    info = synth_feature_cache(out / "cache", rows=args.rows, dim=args.dim, bias=args.bias)
    if not (out / "stage1" / "summary.json").is_file():
        train_head("stage1", out / "cache", out / "stage1", overwrite=True, progress=False)
    df = ablate("stage2", out / "cache", out / "ablation", presets=args.presets.split(","),
                seeds=[int(s) for s in args.seeds.split(",")], sets=args.sets, options={"stage1": out / "stage1"},
                progress=False)
    print(f"\nsynthetic features: {args.rows} x {args.dim}, bias {args.bias}, "
          f"fake shift per subgroup (d') {[round(s, 2) for s in info['strength']]}")
    print((out / "ablation" / "ablation.md").read_text())
    means = df.groupby("preset", sort=False)[["test_auc", "test_f_fpr", "test_f_meo"]].mean()
    if "none" in means.index:
        base = means.loc["none"]
        print("| preset | Δ test AUC vs none | Δ test F_FPR vs none | Δ test F_MEO vs none |")
        print("|---|---|---|---|")
        for preset, row in means.iterrows():
            if preset != "none":
                print(f"| {preset} | {row.test_auc - base.test_auc:+.3f} | {row.test_f_fpr - base.test_f_fpr:+.1f} "
                      f"| {row.test_f_meo - base.test_f_meo:+.1f} |")
    print(f"\n{len(df)} runs in {time.perf_counter() - t0:.0f} s; runs in {out}")


if __name__ == "__main__":
    main()
