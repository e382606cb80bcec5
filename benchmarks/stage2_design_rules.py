"""What do the Stage-2 design's rules change against featcache's earlier ones? Measured on a controlled cache.

    python benchmarks/stage2_design_rules.py [--rows 4000] [--dim 128] [--seeds 0,1,2] [--out DIR]

Issue 26: the design's defaults (LDAM margins ``literal`` C / n_k^(1/4), CE weight 1 - w whenever a
fairness term is on: ``ce_weight_rule: design``) against the project's earlier rules, which stay options
(``loss.ldam_margin_rule=normalized``: the LDAM paper's normalised margins; ``loss.ce_weight_rule=cvar``:
CE hands its weight to CVaR only). One synthetic feature cache (``featcache.cache.synth``, bias 0.6), one
Stage 1, then per variant every preset x seed of Stage 2 with the config's defaults (50 epochs, warm-up
5 -> 10, selection from epoch 11); prints test AUC, accuracy, F_FPR and F_MEO (mean ± sd over seeds),
the runs one-sided on test, and each earlier rule minus the design's on the same preset and seed
(``featcache.metrics.compare.paired_differences``: mean ± sd of the per-seed differences, 95 % interval).
Not part of the tests: the table goes in the README.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from featcache.cache.synth import synth_feature_cache  # noqa: E402
from featcache.losses.ldam import ldam_margins  # noqa: E402
from featcache.metrics.compare import paired_differences  # noqa: E402
from featcache.train import ablate, train_head  # noqa: E402

#: (variant, presets, --set lines): the design's defaults first, then each earlier rule as its option
VARIANTS = [
    # every variant names both rules (the CE rule's default became cvar after this benchmark's measurement)
    ("design", "none,full,ldam,minimal", ["loss.ce_weight_rule=design"]),
    ("ldam normalized", "full,ldam", ["loss.ldam_margin_rule=normalized", "loss.ce_weight_rule=design"]),
    ("ce cvar", "ldam,minimal", ["loss.ce_weight_rule=cvar"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bias", type=float, default=0.6)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stage1-epochs", type=int, default=None, help="Stage 1's epochs [the config's]")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra KEY=VALUE for every Stage-2 run")
    ap.add_argument("--variants", default=",".join(v for v, _, _ in VARIANTS),
                    help="which of the variants to train (comma-separated); finished runs in --out are reused")
    ap.add_argument("--presets", default=None,
                    help="train only these of each variant's presets (comma-separated) [all of them]")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="featcache-design-rules-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    if not (out / "cache" / "zarr.json").is_file():
        synth_feature_cache(out / "cache", rows=args.rows, dim=args.dim, bias=args.bias)
    if not (out / "stage1" / "summary.json").is_file():
        train_head("stage1", out / "cache", out / "stage1", overwrite=True, progress=False,
                   sets=[] if args.stage1_epochs is None else [f"training.epochs={args.stage1_epochs}"])
    rows, tables = [], {}
    chosen = args.variants.split(",")
    only = None if args.presets is None else set(args.presets.split(","))
    for variant, presets, sets in [v for v in VARIANTS if v[0] in chosen]:
        presets = [p for p in presets.split(",") if only is None or p in only]
        if not presets:
            continue
        res = ablate("stage2", out / "cache", out / variant.replace(" ", "-"), presets=presets, seeds=seeds,
                     sets=list(args.sets) + sets, options={"stage1": out / "stage1"}, progress=False,
                     echo=lambda s: None)
        tables[variant] = res.table
        for preset, g in res.table.groupby("preset", sort=False):
            rows.append((variant, preset, len(g), *[(g[f"test_{k}"].mean(), g[f"test_{k}"].std())
                                                    for k in ("auc", "acc", "f_fpr", "f_meo")]))
    from featcache.cache import open_cache

    train = open_cache(out / "cache").load(split="train")
    counts = train.meta["subgroup"].value_counts().reindex(range(8), fill_value=0).tolist()
    lit, norm = ldam_margins(counts), ldam_margins(counts, rule="normalized")
    print(f"\ncontrolled cache {args.rows} x {args.dim}, bias {args.bias}; train subgroup counts {counts}")
    print(f"LDAM margins literal {[round(v, 3) for v in lit.tolist()]}, normalized "
          f"{[round(v, 3) for v in norm.tolist()]}\n")
    print("| variant | preset | runs | test AUC | acc | F_FPR | F_MEO |")
    print("|---|---|---|---|---|---|---|")
    for variant, preset, n, *stats in rows:
        cells = [f"{m:.3f} ± {s:.3f}" if i < 2 else f"{m:.1f} ± {s:.1f}" for i, (m, s) in enumerate(stats)]
        print(f"| {variant} | `{preset}` | {n} | " + " | ".join(cells) + " |")
    one_sided = [f"{v} `{r.preset}` seed {r.seed}" for v, t in tables.items() for r in t.itertuples()
                 if getattr(r, "test_one_sided", False)]
    print(f"\none-sided on test: {', '.join(one_sided) or 'none'}")
    print_paired(tables)
    print(f"\n{sum(r[2] for r in rows)} runs in {time.perf_counter() - t0:.0f} s; runs in {out}")


def print_paired(tables: dict) -> None:
    """Each earlier rule against the design's, same preset and seed: the per-seed difference
    (earlier minus design), mean ± sd over seeds and its 95 % interval over seeds."""
    if "design" not in tables or len(tables) < 2:
        return
    cols = ["test_auc", "test_acc", "test_f_fpr", "test_f_meo"]
    print("\npaired over seeds, earlier rule minus design (mean ± sd [95 % interval]):\n")
    print("| rule | preset | seeds | Δ test AUC | Δ acc | Δ F_FPR | Δ F_MEO |")
    print("|---|---|---|---|---|---|---|")
    design = tables["design"]
    for variant, t in tables.items():
        for preset in ([] if variant == "design" else [p for p in pd.unique(t["preset"]) if p in set(design["preset"])]):
            pair = pd.concat([design[design["preset"] == preset].assign(preset="design"),
                              t[t["preset"] == preset].assign(preset=variant)], ignore_index=True)
            d = paired_differences(pair, cols, baseline="design").set_index("metric")
            cells = [f"{d.at[c, 'mean']:+.3f} ± {d.at[c, 'sd']:.3f} [{d.at[c, 'lo']:+.3f}, {d.at[c, 'hi']:+.3f}]"
                     if i < 2 else f"{d.at[c, 'mean']:+.1f} ± {d.at[c, 'sd']:.1f} [{d.at[c, 'lo']:+.1f}, "
                                   f"{d.at[c, 'hi']:+.1f}]" for i, c in enumerate(cols)]
            print(f"| {variant} | `{preset}` | {int(d['n'].min())} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
