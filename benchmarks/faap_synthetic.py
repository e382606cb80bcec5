"""FAAP's claim on the synthetic detection set, end to end, offline and seeded.

    python benchmarks/faap_synthetic.py [--n 400] [--gap 1.0] [--others 0] [--model tiny-det]
                                        [--detr-epochs 35] [--faap-epochs 30] [--device cpu] [--work DIR]

1. ``synth detection``: drawn people, women's figures fainter and smaller (``--gap``), one person
   per image and ``--others`` other objects at most.
2. ``finetune-detr``: fit the random offline DETR preset (``--model``: ``tiny-det``, 2 queries at
   64 px, the demo's; or ``tiny``) to the train split (a random DETR detects nothing, so without
   this step the claim would be empty); ``--detr-model DIR`` reuses a fitted one.
3. ``extract --backbone detr`` into a query cache; 4. ``train-head faap`` (the config's 30 epochs);
5. the test split: score gap and AP per gender, unperturbed vs perturbed, the AP gap with its 95 %
   bootstrap interval over the test images before and after, and the paired change of the gap.

Prints the FAAP table and whether the claim holds on test: the perturbation narrows the gender
score gap while overall AP moves by less than the gap it closes (both in [0, 1] units), with the
detector's own AP so that a detector that finds nothing cannot pass as a result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from featcache.data.synth_detection import synth_detection  # noqa: E402
from featcache.e2e.detr_finetune import finetune_detr  # noqa: E402
from featcache.e2e.evaluate import evaluate_run  # noqa: E402
from featcache.extract import extract  # noqa: E402
from featcache.train import train_head  # noqa: E402


def main() -> None:
    from bench_extract import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--gap", type=float, default=1.0)
    ap.add_argument("--others", type=int, default=0)
    ap.add_argument("--model", default="tiny-det", help="the offline DETR preset to fit: tiny-det or tiny")
    ap.add_argument("--detr-epochs", type=int, default=35)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--detr-model", default=None, help="a fitted DETR folder (skips the fine-tune)")
    ap.add_argument("--faap-epochs", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="featcache-faap-"))
    t0 = time.perf_counter()
    synth_detection(work / "data", n=args.n, gap=args.gap, others=args.others, progress=False)
    model = args.detr_model
    if model is None:
        model = str(work / "detr")
        r = finetune_detr(work / "data" / "manifest.csv", model, model=args.model, epochs=args.detr_epochs,
                          batch_size=args.batch_size, lr=args.lr, device=args.device, progress=True)
        print(f"fine-tuned {args.model} DETR: {r.epochs_run} epochs, test AP {r.test.get('ap', float('nan')):.3f}, "
              f"{r.seconds:.0f} s")
    extract("detr", work / "data" / "manifest.csv", work / "cache", model=model, device=args.device,
            num_workers=1, progress=False, overwrite=True)
    run = work / "faap"
    train_head("faap", work / "cache", run, sets=[f"training.epochs={args.faap_epochs}",
                                                   f"training.device={args.device}"], overwrite=True, progress=True)
    m = evaluate_run(run, work / "cache")
    print(f"machine: {machine()}; device {args.device}; {time.perf_counter() - t0:.0f} s in all; work {work}")
    print(m.markdown)
    m = m.metrics
    closed, moved = m["gap_closed"], abs(m["ap_change"])
    holds = m["base_ap"] > 0.05 and closed > 0 and moved < closed
    print(json.dumps({"base_ap": m["base_ap"], "ap": m["ap"], "base_gender_score_gap": m["base_gender_score_gap"],
                      "gender_score_gap": m["gender_score_gap"], "gap_closed": closed, "ap_moved": moved,
                      "base_ap_gap": m["base_ap_gap"], "ap_gap": m["ap_gap"], "ap_gap_change": m["ap_gap_change"],
                      "ci95": {k: m["ci95"][k] for k in ("base_ap_gap", "ap_gap", "ap_gap_change")},
                      "claim_holds": holds}, indent=1))
    if m["base_ap"] <= 0.05:
        print(f"the detector finds next to nothing (test AP {m['base_ap']:.3f}): no claim can be made from it; "
              "fit it longer (--detr-epochs) or pass a trained DETR (--detr-model)")


if __name__ == "__main__":
    main()
