"""`featcache demo`: the main job on the embedded synthetic default, offline.

1. Synthesize a face-forgery set (8 subgroups, FF++ imbalance, subgroup-dependent artifacts).
2. Extract CLIP features with the offline ``small`` preset into two caches (detection, Stage 1)
   and verify them.
3. Train the Stage-1 debiasing adapter; audit the leakage before and after it (FAISS kNN purity,
   weighted kNN, linear probes).
4. A short Stage-2 ablation over every preset, and its table.
5. Audio: synthetic partial spoofs, XLS-R frames (offline ``tiny``), the XAI importance head,
   and where its map points (localization AUROC, pointing game, prototype purity).

Rerunning resumes the caches and reuses finished runs. The offline preset has random weights,
so its features carry little of the forgery signal: the demo shows the pipeline, not the
accuracy that real CLIP weights give.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .cache import cache_info, format_info, verify_cache
from .errors import CacheError

#: Small-data settings: the synthetic train split is a few hundred samples.
DEMO_SETS = ("training.batch_size=64",)
DEMO_STAGE2_EPOCHS = 15


def run_demo(out: str | Path = "featcache-demo", *, n: int = 800, progress: bool = True, echo=print) -> dict:
    from .analyze.subgroups import audit_subgroups
    from .data.synth_faces import synth_faces
    from .extract import extract
    from .train import ablate, train_head

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    echo(f"[1/4] synthetic faces: {n} images in 8 subgroups -> {data}")
    synth_faces(data, n=n, seed=0, bias=0.6, size=64, progress=progress)

    caches = {"detection": (data / "manifest.csv", out / "caches" / "clip-small"),
              "stage1": (data / "stage1_manifest.csv", out / "caches" / "clip-small-stage1")}
    echo("[2/4] CLIP extraction (offline preset 'small', random weights, seed 0)")
    for name, (manifest, cache_dir) in caches.items():
        r = extract("clip", manifest, cache_dir, model="small", batch_size=64, part_rows=256, num_workers=1,
                    progress=progress)
        report = verify_cache(cache_dir)
        if not report.ok:
            raise CacheError(f"demo cache {cache_dir} failed verification: " + "; ".join(report.problems))
        echo(f"      {name}: {cache_dir}: {r.parts_written} parts written, {r.parts_resumed} resumed, "
             f"{r.failed} unreadable; verify ok")
    info = cache_info(caches["detection"][1])
    echo(format_info(info))

    runs = out / "runs"
    stage1 = runs / "stage1"
    echo(f"[3/4] Stage 1 debiasing adapter and leakage audit -> {stage1}")
    if not (stage1 / "summary.json").is_file():
        train_head("stage1", caches["stage1"][1], stage1, sets=DEMO_SETS, overwrite=True, progress=progress)
    summary = json.loads((stage1 / "summary.json").read_text())
    for attr, row in summary["probe"].items():
        echo(f"      leakage probe {attr}: raw features {row['raw']:.3f}, debiased {row['debiased']:.3f} "
             f"(chance {row['chance']:.3f})")
    audit = runs / "audit"
    echo(f"      leakage audit before and after the adapter (FAISS kNN, probes) -> {audit}")
    audit_subgroups(caches["stage1"][1], audit, adapter_run=stage1, progress=progress)
    echo((audit / "subgroups.md").read_text())

    echo(f"[4/4] Stage-2 ablation, every preset, seed 0, {DEMO_STAGE2_EPOCHS} epochs -> {runs / 'ablation'}")
    ablate("stage2", caches["detection"][1], runs / "ablation", presets="all", seeds=(0,),
           sets=[*DEMO_SETS, f"training.epochs={DEMO_STAGE2_EPOCHS}"], options={"stage1": stage1},
           progress=progress, echo=lambda line: echo("      " + line))
    table = (runs / "ablation" / "ablation.md").read_text()
    echo(table)
    echo("      The offline preset's random weights map every face to nearly the same direction, so the\n"
         "      detector stays near chance here; with real CLIP weights (--pretrained openai or a file) the\n"
         "      same commands learn. benchmarks/fairness_synthetic.py compares the presets on a controlled cache.")
    run_audio_demo(out, progress=progress, echo=echo)
    seconds = time.perf_counter() - t0
    echo(f"demo done in {seconds:.0f} s. Next: featcache evaluate {runs / 'ablation' / 'full' / 'seed0'}")
    return {"cache": str(caches["detection"][1]), "info": info, "seconds": seconds, "ablation": table}


def run_audio_demo(out: str | Path, *, n: int = 120, progress: bool = True, echo=print) -> dict:
    """The audio branch: synthetic partial spoofs -> XLS-R frames (offline ``tiny``) -> XAI head.

    Prints where the importance map points: localization AUROC / AP, pointing game and
    relevance mass on the test split's spoofed utterances, and the prototypes' purity.
    """
    from .analyze.prototypes import analyze_prototypes
    from .data.synth_audio import synth_audio
    from .extract import extract
    from .train import train_head

    out = Path(out)
    data, cache_dir, run = out / "audio", out / "caches" / "xlsr-tiny", out / "runs" / "xai"
    echo(f"[audio 1/3] synthetic speech: {n} utterances (bonafide, vocoded, partially vocoded) -> {data}")
    synth_audio(data, n=n, seed=0, progress=progress)
    echo("[audio 2/3] XLS-R frame extraction (offline preset 'tiny', random weights, seed 0)")
    r = extract("xlsr", data / "manifest.csv", cache_dir, model="tiny", batch_size=8, part_rows=64, num_workers=1,
                progress=progress)
    report = verify_cache(cache_dir)
    if not report.ok:
        raise CacheError(f"demo cache {cache_dir} failed verification: " + "; ".join(report.problems))
    echo(f"      {cache_dir}: {r.parts_written} parts written, {r.parts_resumed} resumed; verify ok")
    echo(f"[audio 3/3] XAI importance head with EMA prototypes -> {run}")
    if not (run / "summary.json").is_file():
        train_head("xai", cache_dir, run, overwrite=True, progress=progress)
    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    echo(f"      test split, {test['loc_utterances']} spoofed utterances ({test['loc_partial_utterances']} partial):")
    echo(f"      localization AUROC {test['loc_auroc']:.3f}, AP {test['loc_ap']:.3f} "
         f"(spoofed-frame fraction {test['loc_spoof_fraction']:.3f}), pointing game {test['pointing_game']:.3f}, "
         f"relevance mass {test['relevance_mass']:.3f}; utterance AUC {test['auc']:.3f}, EER {test['eer']:.3f}")
    protos = analyze_prototypes(run, cache_dir)
    echo("      prototype purity@10/50/100: " + "; ".join(
        f"{name} " + "/".join(f"{v:.2f}" for v in p.values()) for name, p in protos["purity"].items()))
    echo(f"      plots: {run / 'plots' / 'importance_test.png'}, {run / 'prototypes' / 'prototypes_map.png'}")
    return {"cache": str(cache_dir), "run": str(run), "test": test, "purity": protos["purity"]}
