"""`featcache demo`: the main job on the embedded synthetic default, offline.

[1/8] Synthesize a face-forgery set (8 subgroups, FF++ imbalance, subgroup-dependent artifacts).
[2/8] The fast filter: a short MobileNetV4 run on the images (small, random-init), its
      temperature calibration and its evaluation (test AUC with its 95 % interval).
[3/8] The filter as a frozen backbone: its pooled features (``--backbone timm --model <run>``)
      into two caches (detection, Stage 1), verified.
[4/8] Stage 1 on the filter's features: the debiasing adapter, selected from the epoch where the GRL
      is half way up (:func:`featcache.heads.stage1.grl_warm_epoch`), with race and gender before
      and after from a fresh probe and from its adversaries; the leakage audit before and after
      it (FAISS kNN purity, weighted kNN, linear probes).
[5/8] The Stage-2 ablation (presets none, full, and linear as the reference, three seeds) on the
      filter's features (the result with signal): mean ± sd over seeds with each fairness gap minus
      its no-disparity floor, paired differences to ``none`` with their intervals and Holm-adjusted
      ``*`` verdicts, the test lines with each gap's floor and p-value, and the per-subgroup rates
      that show the bias the synthetic faces plant.
[6/8] The pipeline check: the offline CLIP ``small`` preset (random weights) through extraction,
      Stage 1 and one Stage-2 preset, and the cascade of the filter in front of that detector.
[7/8] Audio: synthetic partial spoofs, XLS-R frames (offline ``tiny``), the XAI importance head,
      and where its map points (localization AUROC, pointing game, prototype purity).
[8/8] Detection fairness: synthetic people with a gender gap (one person per image), the
      ``tiny-det`` DETR fitted to them (finetune-detr), its query cache, and a FAAP perturbation
      trained from it: per-gender COCO AP before and after, the gap with bootstrap intervals.

Every size is a field of :class:`DemoSizes` (the tests run the demo at tiny sizes); the defaults
fit the demo in 5 minutes on a shared 2-core CPU (measured figures in the README). Rerunning
resumes the caches and reuses finished runs; an interrupted run resumes. The CLIP presets have
random weights offline, so their features carry little of the forgery signal: step 6 checks the
pipeline, steps 3-5 show what the heads do with features that carry the signal. The library
returns every figure it prints: nothing is read back from disk.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .analyze.prototypes import analyze_prototypes
from .analyze.subgroups import audit_subgroups
from .cache import cache_info, format_info, verify_cache
from .config import resolve_config
from .data.synth_audio import synth_audio
from .data.synth_detection import synth_detection
from .data.synth_faces import artifact_strength, synth_faces
from .e2e import calibrate_run, run_cascade, train_e2e
from .e2e.detr_finetune import finetune_detr
from .e2e.evaluate import evaluate_filter, evaluate_run
from .errors import CacheError, FeatcacheError
from .extract import extract
from .heads.stage1 import grl_warm_epoch
from .report.tables import markdown_table, metric_legend, metrics_line
from .runtime import RunDir
from .train import ablate, evaluate_head, train_head

#: The synthetic faces' bias: the hardest subgroup's artifacts at 1 - 0.6 = 0.4 of the easiest's.
FACE_BIAS = 0.6
#: Small-data settings: the synthetic train split is a few hundred samples.
DEMO_SETS = ("training.batch_size=64",)
STEPS = 8
#: The metrics the demo prints for a detector, each once with its meaning.
DETECTOR_KEYS = ("auc", "eer", "acc", "f_fpr", "f_meo")
#: What the printed lines carry beside the metrics: intervals, each gap's (floor, p), its coverage.
LEGEND_KEYS = (*DETECTOR_KEYS, "ci95", "fairness_null", "fairness_coverage")


@dataclass(frozen=True)
class DemoSizes:
    """Every size of the demo; the defaults are the documented demo, the tests shrink them."""

    faces: int = 800
    # batch 16 leaves the chance plateau at about epoch 7, batch 32 after epoch 8: 15 epochs at batch 16 reached
    # test AUC 0.905, in half the time of 30 at batch 32 (0.958); 15 at batch 32 (lr 2e-3): 0.622; 12 at 16: 0.799
    filter_epochs: int = 15
    # the config's 20 took 24 s on one idle core (66 s under load 4); 10 select from epoch 3 (grl_warm_epoch)
    stage1_epochs: int | None = 10  # None: the config's
    # the filter's features give val AUC 0.96 from epoch 1; an epoch of the stacked 1280-d runs costs about 3 s
    # a run on one thread: 4 epochs (fairness weight 0, 0, 1, 1; epochs 3 and 4 compete)
    stage2_epochs: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)  # the Stage-2 ablation's seeds (three: the fewest for a verdict)
    # the Stage-2 presets of step 5: no fairness term and everything, stacked as one job of six runs with
    # three seeds, and `linear` (the features' own linear read-out, a reference that trains in a second or
    # two) ("all": every preset). `cvar` is left out for time: at 4 epochs it printed `full`'s test AUC,
    # accuracy, EER and gaps on every seed (AUC 0.830, 0.907, 0.907) and cost a third of the stacked job
    presets: tuple[str, ...] | str = ("none", "full", "linear")
    clip_model: str = "small"  # the offline CLIP preset of the pipeline check
    clip_stage1_epochs: int = 4
    clip_stage2_epochs: int = 4
    audio: int = 120
    xai_epochs: int | None = None
    # 400 images: 240 train, 80 test (40 per gender) for the per-gender AP and its intervals
    detection: int = 400
    # the tiny-det DETR fitted to the 240 train images (0: left random, as the tests do). At gap 1.0, 25 epochs
    # gave test person AP 0.269, 0.376, 0.378 for seeds 0, 1, 2; 35 epochs 0.364 for seed 0 (men 0.522, women
    # 0.253); at gap 0.7 the AP gap came and went with the seed (README "Detection fairness")
    detr_epochs: int = 35
    faap_epochs: int = 10
    branches: tuple[str, ...] = ("faces", "clip", "audio", "detection")


def _step(i: int, text: str) -> str:
    return f"[{i}/{STEPS}] {text}"


def _epochs(n: int | None) -> list[str]:
    return [] if n is None else [f"training.epochs={n}"]


def _stage2_schedule(epochs: int) -> list[str]:
    """Stage 2 in ``epochs``: the fairness warm-up scaled into the run (the config's 5 -> 10 of 50
    would be refused), and selection only among epochs trained with the whole objective: the weight
    is 1 from epoch ``warmup_end + 1`` (counted from 1; :func:`featcache.heads.stage2.warmup_weight`),
    so ``warmup_end`` stops one epoch before the run does and ``selection.min_epoch`` is that epoch."""
    if epochs < 1:
        raise FeatcacheError(f"demo: Stage 2 needs at least 1 epoch, got {epochs}")
    end = min((2 * epochs) // 3, epochs - 1)  # 12 epochs: warm-up 4 -> 8, whole weight from epoch 9
    start = min(epochs // 3, end)
    return [f"training.epochs={epochs}", f"fairness.warmup_start={start}", f"fairness.warmup_end={end}",
            f"selection.min_epoch={end + 1}"]


def _reuse(run: Path) -> bool:
    """A finished run is reused; an interrupted one resumes (train_head does it); else it starts."""
    return RunDir(run).summary.is_file()


def _extract_verified(backbone: str, manifest, cache_dir, echo, name: str, **kw):
    r = extract(backbone, manifest, cache_dir, batch_size=64, part_rows=256, num_workers=1, **kw)
    report = verify_cache(cache_dir)
    if not report.ok:
        raise CacheError(f"demo cache {cache_dir} failed verification: " + "; ".join(report.problems))
    echo(f"      {name}: {cache_dir}: {r.parts_written} parts written, {r.parts_resumed} resumed, "
         f"{r.failed} unreadable; verify ok")
    return r


def run_demo(out: str | Path = "featcache-demo", *, n: int | None = None, sizes: DemoSizes | None = None,
             progress: bool = True, echo=print) -> dict:
    """Run the demo's branches into ``out``; returns its figures (see the module docstring).

    Torch, BLAS and OpenMP (FAISS, scikit-learn) run one thread unless ``OMP_NUM_THREADS`` says
    otherwise (as the walkthrough does): two threads spin on a shared pair of cores (the filter's
    epoch took 30-40 s with two under load 4-5 on this project's 2-core machine, 13 s with one)."""
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    if os.environ.get("OMP_NUM_THREADS"):
        return _run_demo(out, n=n, sizes=sizes, progress=progress, echo=echo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _run_demo(out, n=n, sizes=sizes, progress=progress, echo=echo)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, *, n, sizes, progress, echo) -> dict:
    sizes = sizes or DemoSizes()
    if n is not None:
        sizes = replace(sizes, faces=int(n))
    n = sizes.faces
    out = Path(out)
    t0 = time.perf_counter()
    step_marks = tuple(f"[{i}/{STEPS}]" for i in range(1, STEPS + 1))
    plain_echo = echo

    def echo(line: str) -> None:  # each step's line says when it started
        plain_echo(f"{line}  ({time.perf_counter() - t0:.0f} s)" if line.startswith(step_marks) else line)

    data, runs = out / "data", out / "runs"
    manifests = {"detection": data / "manifest.csv", "stage1": data / "stage1_manifest.csv"}
    echo(_step(1, f"synthetic faces: {n} images in 8 subgroups -> {data}"))
    synth_faces(data, n=n, seed=0, bias=FACE_BIAS, size=64, progress=progress)
    echo("      legend of the printed metrics (each [lo, hi] is its 95 % bootstrap interval, each gap's "
         "(floor, p) its no-disparity floor and p-value):")
    echo("\n".join("      " + line for line in metric_legend(LEGEND_KEYS).splitlines()))

    filt = run_demo_filter(manifests["detection"], runs / "mnv4", epochs=sizes.filter_epochs, progress=progress,
                           echo=echo)
    figures = {"filter": filt}
    if "faces" in sizes.branches:
        figures.update(run_filter_features_demo(out, manifests, runs / "mnv4", sizes=sizes, progress=progress,
                                                echo=echo))
    if "clip" in sizes.branches:
        figures["pipeline_check"] = run_clip_check(out, manifests, runs / "mnv4", sizes=sizes, progress=progress,
                                                   echo=echo)
    if "audio" in sizes.branches:
        figures["audio"] = run_audio_demo(out, n=sizes.audio, epochs=sizes.xai_epochs, progress=progress, echo=echo)
    if "detection" in sizes.branches:
        figures["detection"] = run_detection_demo(out / "detection", sizes=sizes, progress=progress, echo=echo)
    seconds = time.perf_counter() - t0
    echo(f"demo done in {seconds:.0f} s ({len(sizes.branches) + 1} branches). Next: featcache evaluate "
         f"{runs / 'mnv4-features' / 'ablation' / 'full' / f'seed{sizes.seeds[0]}'}")
    return {**figures, "seconds": seconds}


#: The demo's filter: small and random-init (offline), at the synthetic images' 64 px, without
#: augmentations: trained from scratch on 496 images, with flips, jitter and blur it stayed near
#: chance (val AUC <= 0.51 in 10 epochs); without them it learns the blending artifacts.
DEMO_FILTER = {"model": "mobilenetv4_conv_small", "pretrained": "none", "image_size": 64, "epochs": 15,
               "batch_size": 16, "lr": 1e-3, "patience": 0, "augment": False}


def run_demo_filter(manifest, run, *, epochs: int | None = None, progress: bool = True, echo=print) -> dict:
    """Step 2: train, calibrate and evaluate the MobileNetV4 filter into ``run``."""
    run = Path(run)
    settings = {**DEMO_FILTER, **({} if epochs is None else {"epochs": int(epochs)})}
    echo(_step(2, f"fast filter: {settings['model']} ({settings['epochs']} epochs, random init, "
                  f"{settings['image_size']} px, no augmentation) -> {run}"))
    if _reuse(run):
        echo(f"      {run}: finished before, reused")
        before = evaluate_filter(run, manifest, split="test", progress=progress).metrics["ece"]
    else:
        resume = RunDir(run).resume.is_file()  # interrupted after an epoch: continue it
        r = train_e2e(manifest, run, resume=resume, overwrite=not resume, progress=progress, echo=echo,
                      **({} if resume else settings))
        echo(f"      best epoch {r.best_epoch}, {r.images_per_second:.0f} train images/s")
        before = r.test["ece"]
    cal = calibrate_run(run, manifest, split="val", progress=progress)
    ev = evaluate_filter(run, manifest, split="test", progress=progress)
    echo(f"      test: {ev.short()}")
    for remark in ev.remarks:
        echo(f"      remark: {remark}")
    for message in cal.get("messages", []):
        echo(f"      {message}")
    echo(f"      temperature {cal['temperature']:.3f} (fitted on val): test ECE {before:.3f} -> "
         f"{ev.metrics['ece']:.3f}")
    return {"run": str(run), "test": ev.metrics, "temperature": cal["temperature"]}


def run_filter_features_demo(out: Path, manifests: dict, filter_run: Path, *, sizes: DemoSizes,
                             progress: bool = True, echo=print) -> dict:
    """Steps 3-5: the filter's features cached, Stage 1 and its audit, the Stage-2 ablation."""
    runs = out / "runs" / "mnv4-features"
    caches = {"detection": out / "caches" / "mnv4", "stage1": out / "caches" / "mnv4-stage1"}
    echo(_step(3, f"the filter as a frozen backbone: extract --backbone timm --model {filter_run} "
                  "(its pooled 1280-d features)"))
    for name, cache_dir in caches.items():
        _extract_verified("timm", manifests[name], cache_dir, echo, name, model=str(filter_run), progress=progress)
    echo(format_info(cache_info(caches["detection"])))

    stage1 = runs / "stage1"
    echo(_step(4, f"Stage 1 debiasing adapter on the filter's features, and the leakage audit -> {stage1}"))
    stage1_result = _stage1(caches["stage1"], stage1, sizes.stage1_epochs, progress, echo)
    audit = runs / "audit"
    echo(f"      leakage audit before and after the adapter (FAISS kNN, probes) -> {audit}")
    echo(audit_subgroups(caches["stage1"], audit, adapter_run=stage1, progress=progress, overwrite=True)["markdown"])

    abl = runs / "ablation"
    seeds = tuple(sizes.seeds)
    names = "every preset" if sizes.presets in ("all", ("all",)) else "presets " + ", ".join(sizes.presets)
    echo(_step(5, f"Stage-2 ablation on the filter's features, {names}, seeds {', '.join(map(str, seeds))}, "
                  f"{sizes.stage2_epochs} epochs -> {abl}"))
    result = ablate("stage2", caches["detection"], abl, presets=sizes.presets, seeds=seeds,
                    sets=[*DEMO_SETS, *_stage2_schedule(sizes.stage2_epochs)], options={"stage1": stage1},
                    progress=progress, echo=lambda line: echo("      " + line))
    table = result.markdown
    # the table's own legend would repeat the meanings printed at the start: each is printed once
    legend = {line.strip() for line in metric_legend([*LEGEND_KEYS, "floor", "p"]).splitlines() if line.strip()}
    echo("\n".join(line for line in table.splitlines() if line.strip() not in legend))
    subgroups = {}
    for preset in [p for p in ("none", "full") if RunDir(abl / p / f"seed{seeds[0]}").summary.is_file()]:
        ev = evaluate_head(abl / preset / f"seed{seeds[0]}", split="test")
        subgroups[preset] = ev.subgroups
        echo(f"      {preset}, seed {seeds[0]}, test: {metrics_line(ev.metrics, DETECTOR_KEYS)}")
        for remark in ev.remarks:
            echo(f"      remark: {remark}")
        if ev.subgroups is not None:
            echo(f"      per subgroup ({preset}, P(fake) >= 0.5); {bias_line(ev.subgroups)}")
            echo(markdown_table(ev.subgroups))
    return {"caches": {k: str(v) for k, v in caches.items()}, "stage1": stage1_result, "ablation": table,
            "subgroups": subgroups}


def bias_line(subgroups, bias: float = FACE_BIAS) -> str:
    """The planted bias beside what the detector shows of it: each race's AUC range over its two
    subgroups, and the artifact strength the synthetic faces gave that race's fakes."""
    races: dict[str, list[tuple[float, float]]] = {}
    for code, name, auc in zip(subgroups["code"], subgroups["subgroup"], subgroups["auc"]):
        races.setdefault(str(name).split("-", 1)[1], []).append((float(auc), artifact_strength(int(code), bias)))

    def span(values) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"

    order = sorted(races, key=lambda r: -min(s for _, s in races[r]))  # strongest artifacts first
    return ("AUC by race (artifact strength of its fakes): "
            + ", ".join(f"{r} {span([a for a, _ in races[r]])} ({span([s for _, s in races[r]])})" for r in order))


def _stage1(cache, run: Path, epochs: int | None, progress: bool, echo) -> dict:
    """Stage 1 into ``run``; prints the selected epoch, the adversaries' and a fresh probe's race and
    gender accuracy before and after the adapter, and returns them (:func:`stage1_figures`)."""
    if _reuse(run):
        echo(f"      {run}: finished before, reused")
        return {}
    sets = [*DEMO_SETS, *_epochs(epochs)]
    # selection only once the GRL has reached half its strength (the adversaries have acted on the adapter)
    sets.append(f"selection.min_epoch={grl_warm_epoch(resolve_config('stage1', sets=sets))}")
    r = train_head("stage1", cache, run, sets=sets, progress=progress)
    figures = stage1_figures(r)
    echo(f"      selected epoch {r.best_epoch} of {len(_log_rows(run))} (val cos {r.val['cos']:.3f}); "
         "accuracy / balanced accuracy (chance: race 0.25, gender 0.50):")
    for line in stage1_lines(figures):
        echo(f"      {line}")
    for remark in r.extra.get("remarks", []):  # an adapter that raised the leakage it should remove
        echo(f"      {remark}")
    return figures


def _log_rows(run: Path) -> list[str]:
    return [ln for ln in RunDir(run).log.read_text().splitlines() if ln.strip()]


def stage1_figures(r) -> dict:
    """Race and gender, before and after a Stage-1 run ``r`` (a :class:`RunResult`): the adversaries'
    (the design's measure: before = after the first epoch, when they had trained with lambda 0; after =
    the selected epoch) and the fresh probe's, both on val and test, accuracy and balanced accuracy."""
    first = json.loads(_log_rows(r.run_dir)[0])
    out = {"best_epoch": r.best_epoch, "cos": r.val["cos"], "test_cos": r.test["cos"]}
    for attr in ("race", "gender"):
        p = r.extra["probe"][attr]
        out[attr] = {
            "adversary_first_epoch": (first[f"val_{attr}_acc"], first[f"val_{attr}_bacc"]),
            "adversary": (r.val[f"{attr}_acc"], r.val[f"{attr}_bacc"]),
            "adversary_test": (r.test[f"{attr}_acc"], r.test[f"{attr}_bacc"]),
            "probe_raw": (p["raw"], p["raw_bacc"]), "probe": (p["debiased"], p["debiased_bacc"]),
            "probe_raw_test": (p.get("raw_test"), p.get("raw_test_bacc")),
            "probe_test": (p.get("debiased_test"), p.get("debiased_test_bacc")),
        }
    return out


def stage1_lines(f: dict) -> list[str]:
    def pair(v) -> str:
        return "n/a" if v[0] is None else f"{v[0]:.3f}/{v[1]:.3f}"

    return [f"leakage probe {attr} (fresh, raw -> debiased): val {pair(f[attr]['probe_raw'])} -> {pair(f[attr]['probe'])}, "
            f"test {pair(f[attr]['probe_raw_test'])} -> {pair(f[attr]['probe_test'])}; adversary val "
            f"{pair(f[attr]['adversary_first_epoch'])} (epoch 1) -> {pair(f[attr]['adversary'])}, "
            f"test {pair(f[attr]['adversary_test'])}" for attr in ("race", "gender")]


def run_clip_check(out: Path, manifests: dict, filter_run: Path, *, sizes: DemoSizes, progress: bool = True,
                   echo=print) -> dict:
    """Step 6, the pipeline check: the offline CLIP preset through extraction, Stage 1 and one
    Stage-2 preset, then the cascade of the filter in front of that detector."""
    runs = out / "runs" / "clip-check"
    caches = {"detection": out / "caches" / "clip-small", "stage1": out / "caches" / "clip-small-stage1"}
    echo(_step(6, f"pipeline check: CLIP extraction (offline preset {sizes.clip_model!r}, random weights, seed 0), "
                  f"Stage 1, Stage 2 (full), the cascade -> {runs}"))
    for name, cache_dir in caches.items():
        _extract_verified("clip", manifests[name], cache_dir, echo, name, model=sizes.clip_model, progress=progress)
    stage1, detector = runs / "stage1", runs / "stage2-full"
    _stage1(caches["stage1"], stage1, sizes.clip_stage1_epochs, progress, echo)
    if _reuse(detector):
        echo(f"      {detector}: finished before, reused")
        test = evaluate_head(detector, split="test")
    else:
        r = train_head("stage2", caches["detection"], detector, preset="full", options={"stage1": stage1},
                       sets=[*DEMO_SETS, *_stage2_schedule(sizes.clip_stage2_epochs)], progress=progress)
        test = r.evaluations[-1]
    echo(f"      CLIP {sizes.clip_model} + Stage 2 full, test: {metrics_line(test.metrics, DETECTOR_KEYS)}")
    for remark in test.remarks:
        echo(f"      remark: {remark}")
    echo("      The offline preset's random weights map every face to nearly the same direction, so this\n"
         "      detector stays near chance: the branch checks the pipeline. With real CLIP weights (--pretrained\n"
         "      openai or a file) the same commands learn; step 5 shows the heads on features with signal.")
    cascade = out / "runs" / "cascade"
    rep = run_cascade(filter_run, detector, caches["detection"], manifests["detection"], cascade, max_leakage=0.05,
                      progress=progress)
    lat, rec = rep["latency"], rep["recommended"]
    echo(f"      cascade -> {cascade}: filter {lat['filter_ms']:.2f} ms, detector {lat['detector_ms']:.2f} ms per "
         f"sample; detector alone test auc {rep['alone_test']['detector']['auc']:.3f}")
    if rec is None:
        echo("      no threshold keeps the val leakage within 0.05")
    else:
        t = rec["test"]
        echo(f"      recommended t = {rec['threshold']:g}: test filtration {t['filtration']:.3f}, leakage "
             f"{t['leakage']:.3f}, auc {t['auc']:.3f}, compute saved {t['compute_saved']:.3f}")
    for line in rep.get("messages", []):
        echo(f"      {line}")
    return {"caches": {k: str(v) for k, v in caches.items()}, "detector": str(detector), "test": test.metrics,
            "cascade": rep}


def run_audio_demo(out: str | Path, *, n: int = 120, epochs: int | None = None, progress: bool = True,
                   echo=print) -> dict:
    """The audio branch: synthetic partial spoofs -> XLS-R frames (offline ``tiny``) -> XAI head.

    Prints where the importance map points: localization AUROC / AP, pointing game and
    relevance mass on the test split's spoofed utterances, and the prototypes' purity.
    """
    out = Path(out)
    data, cache_dir, run = out / "audio", out / "caches" / "xlsr-tiny", out / "runs" / "xai"
    echo(_step(7, f"audio: synthetic speech: {n} utterances (bonafide, vocoded, partially vocoded) -> {data}"))
    synth_audio(data, n=n, seed=0, progress=progress)
    echo("      XLS-R frame extraction (offline preset 'tiny', random weights, seed 0)")
    r = extract("xlsr", data / "manifest.csv", cache_dir, model="tiny", batch_size=8, part_rows=64, num_workers=1,
                progress=progress)
    report = verify_cache(cache_dir)
    if not report.ok:
        raise CacheError(f"demo cache {cache_dir} failed verification: " + "; ".join(report.problems))
    echo(f"      {cache_dir}: {r.parts_written} parts written, {r.parts_resumed} resumed; verify ok")
    echo(f"      XAI importance head with EMA prototypes -> {run}")
    if _reuse(run):
        echo(f"      {run}: finished before, reused")
        test = evaluate_run(run, split="test").metrics
    else:
        test = train_head("xai", cache_dir, run, sets=_epochs(epochs), progress=progress).evaluations[-1].metrics
    echo(f"      test split, {test['loc_utterances']} spoofed utterances ({test['loc_partial_utterances']} partial):")
    echo(f"      localization AUROC {test['loc_auroc']:.3f}, AP {test['loc_ap']:.3f} "
         f"(spoofed-frame fraction {test['loc_spoof_fraction']:.3f}), pointing game {test['pointing_game']:.3f}, "
         f"relevance mass {test['relevance_mass']:.3f}; utterance {metrics_line(test, ('auc', 'eer', 'eer_asvspoof'))}")
    protos = analyze_prototypes(run, cache_dir, overwrite=True)  # the demo's own folder: a rerun redoes it
    echo("      prototype purity@10/50/100: " + "; ".join(
        f"{name} " + "/".join(f"{v:.2f}" for v in p.values()) for name, p in protos["purity"].items()))
    echo(f"      plots: {run / 'eval' / 'test' / 'plots' / 'importance.png'}, {run / 'prototypes' / 'prototypes_map.png'}")
    return {"cache": str(cache_dir), "run": str(run), "test": test, "purity": protos["purity"]}


#: The synthetic people's planted difficulty for women (fainter, smaller figures; synth_detection's ``gap``).
DETECTION_GAP = 1.0
#: The DETR fine-tune of the detection branch (finetune_detr's arguments): the offline tiny-det preset.
DETR_RECIPE = {"model": "tiny-det", "batch_size": 8, "lr": 1e-3, "seed": 0}


def run_detection_demo(out: str | Path, *, sizes: DemoSizes | None = None, progress: bool = True,
                       echo=print) -> dict:
    """Detection fairness: synthetic people with a gender gap, a DETR fitted to them, its query cache, FAAP."""
    sizes = sizes or DemoSizes()
    out = Path(out)
    t0 = time.perf_counter()
    echo(_step(8, f"detection: synthetic people, one per image, women's figures fainter and smaller (gap "
                  f"{DETECTION_GAP}), {sizes.detection} images, FAAP layout -> {out / 'data'}"))
    synth_detection(out / "data", n=sizes.detection, seed=0, gap=DETECTION_GAP, others=0, progress=progress)
    model = DETR_RECIPE["model"]
    if sizes.detr_epochs > 0:
        model = str(out / "detr-tiny-det")
        if not RunDir(model).summary.is_file():
            echo(f"            fitting the {DETR_RECIPE['model']} DETR (2 queries, 64 px) to the train split, "
                 f"{sizes.detr_epochs} epochs -> {model}")
            finetune_detr(out / "data" / "manifest.csv", model, epochs=sizes.detr_epochs, progress=progress,
                          **DETR_RECIPE)
    cache = out / "caches" / "detr"
    echo(f"            DETR query cache ({model}) -> {cache}")
    extract("detr", out / "data" / "manifest.csv", cache, model=model, batch_size=32, part_rows=256, num_workers=1,
            progress=progress)
    run = out / "runs" / "faap"
    echo(f"            FAAP perturbation of the cached queries, {sizes.faap_epochs} epochs -> {run}")
    if not _reuse(run):
        train_head("faap", cache, run, sets=[f"training.epochs={sizes.faap_epochs}", "training.batch_size=32"],
                   progress=progress)
    ev = evaluate_run(run, cache)
    metrics = ev.metrics
    echo(ev.markdown)
    for line in faap_lines(metrics):
        echo(line)
    seconds = time.perf_counter() - t0
    echo(f"            detection branch: {seconds:.0f} s")
    return {"cache": str(cache), "run": str(run), "test": metrics, "seconds": seconds}


def faap_lines(m: dict) -> list[str]:
    """The detector's test AP, per gender, the men - women gap with its interval, before and after
    FAAP, and what FAAP did to the gap (the paired interval of its change decides the words)."""
    ci = m.get("ci95") or {}

    def iv(key: str) -> str:
        lo, hi = ci.get(key, (float("nan"), float("nan")))
        return f"[{lo:+.3f}, {hi:+.3f}]"

    lines = []
    for name, p in (("detector", "base_"), ("after FAAP", "")):
        lines.append(f"      {name:<10}: test person AP {m[p + 'ap']:.3f}; men {m[p + 'ap_male']:.3f}, women "
                     f"{m[p + 'ap_female']:.3f}; AP gap (men - women) {m[p + 'ap_gap']:+.3f} {iv(p + 'ap_gap')}; "
                     f"AR gap {m[p + 'ar_gap']:+.3f} {iv(p + 'ar_gap')}")
    lo, hi = ci.get("ap_gap_change", (float("nan"), float("nan")))
    change = m["ap_gap_change"]
    if not m["base_ap"] > 0.05:
        verdict = (f"the detector finds next to nothing (test AP {m['base_ap']:.3f}): these gaps are noise and the "
                   "branch shows the pipeline only")
    elif lo > 0:
        verdict = "FAAP widened the AP gap (the change's interval lies above 0)"
    elif hi < 0:
        verdict = "FAAP narrowed the AP gap (the change's interval lies below 0)"
    else:
        verdict = "FAAP did not measurably change the AP gap (the change's interval holds 0)"
    lines.append(f"      change of the AP gap {change:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired): {verdict}. "
                 f"[lo, hi]: 95 % bootstrap over the {sum((m.get('ci95_info') or {}).get('images', {}).values())} "
                 "test images")
    return lines
