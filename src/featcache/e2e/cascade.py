"""``featcache cascade``: the MobileNetV4 filter in front of a Stage-2 detector.

A sample stops at stage 1 as "simple real" when the filter's (calibrated) ``1 - P(fake) >= t``
and keeps the filter's probability; every other sample takes the detector's probability,
computed by the detector's run from the cache (joined on ``sample_id``).  For each threshold
of a grid: the cascade rates (:mod:`featcache.metrics.cascade`), the overall AUC, accuracy and
fairness metrics of the combined probabilities, and the compute per sample relative to the
detector alone,

    cost(t) = L_filter + coverage(t) * L_detector,   compute_saved = 1 - cost(t) / L_detector,

from latencies measured here on the manifest's images: L_filter is the filter's forward pass,
L_detector the cache's backbone (rebuilt from the cache's record, with random weights of the
same architecture: the time does not depend on them) plus the detector head.  Image decoding
is left out of both.  The recommended threshold is chosen on the validation split (the highest
filtration whose leakage is within ``max_leakage``) and reported on the test split.

DIR/ cascade_report.json  cascade_thresholds.csv  cascade_tradeoff.png  cascade_predictions_test.csv
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import open_cache
from ..errors import FeatcacheError
from ..extract.registry import get_backbone
from ..heads.task import load_run
from ..metrics.cascade import cascade_rates, default_grid, recommend_threshold, stopped_mask
from ..metrics.detection import detection_metrics
from ..metrics.fairness import fairness_metrics
from ..report.plots import plot_cascade
from ..runtime import write_json
from .mnv4 import FilterRun, image_loader, load_split

SPLITS = ("val", "test")


def _detector_predictions(task, split: str) -> pd.DataFrame:
    _, preds = task.evaluate(split)[0]
    return preds[["sample_id", "label", "score", "prob"]]


def join_stages(filter_preds: pd.DataFrame, detector_preds: pd.DataFrame) -> pd.DataFrame:
    """One row per sample both stages scored: ``p_filter``, ``p_detector``, label, subgroup, ..."""
    f = filter_preds.rename(columns={"score": "score_filter", "prob": "p_filter"})
    d = detector_preds.rename(columns={"score": "score_detector", "prob": "p_detector", "label": "label_detector"})
    joined = f.merge(d, on="sample_id", how="inner", validate="one_to_one")
    if len(joined) == 0:
        raise FeatcacheError("no sample_id is shared by the manifest's split and the detector's cache; "
                             "the cache must be extracted from the same manifest")
    bad = joined[joined["label"].astype(int) != joined["label_detector"].astype(int)]
    if len(bad):
        raise FeatcacheError(f"{len(bad)} sample(s) have another label in the cache than in the manifest, "
                             f"e.g. {bad['sample_id'].iloc[0]}")
    return joined.drop(columns="label_detector")


def cascade_at(joined: pd.DataFrame, threshold: float, latency: dict | None = None) -> dict:
    """Rates, combined-probability metrics and compute at one threshold."""
    y = joined["label"].to_numpy().astype(np.int64)
    pf, pd_ = joined["p_filter"].to_numpy(), joined["p_detector"].to_numpy()
    p = np.where(stopped_mask(pf, threshold), pf, pd_)
    det = detection_metrics(y, p)
    row = {**cascade_rates(y, pf, threshold), "auc": det["auc"], "acc": det["acc"], "f1": det["f1"]}
    groups = joined["subgroup"].to_numpy().astype(np.int64)
    if (groups >= 0).any():
        row.update(fairness_metrics(y, p, groups))
    if latency:
        cost = latency["filter_ms"] + row["coverage"] * latency["detector_ms"]
        row["cost_ms"] = cost
        row["compute_saved"] = 1.0 - cost / latency["detector_ms"]
    return row


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(filt: FilterRun, task, cache, manifest, *, split: str = "test", samples: int = 16,
                    repeats: int = 3) -> dict:
    """Per-sample forward latency (ms) of the filter, the cache's backbone and the detector head,
    on one batch of ``samples`` images of ``split`` (median of ``repeats`` runs after a warm-up)."""
    rows, paths = load_split(manifest, split)
    k = min(samples, len(paths))
    dev = filt.device
    _, x, _ = next(iter(image_loader(paths[:k], filt.image_size, train=False, batch_size=k)))
    x = x.to(dev)

    def run_filter():
        with torch.no_grad():
            filt.model(x)
        _sync(dev)

    b = cache.backbone
    bb = get_backbone(b["name"], b.get("model"), "none", layer=b.get("layer"))
    bb.to(dev)
    ds = bb.dataset(paths[:k], rows.iloc[:k].reset_index(drop=True))
    _, inputs, _ = bb.collate([ds[i] for i in range(k)])

    def run_backbone():
        bb.forward(inputs, dev)
        _sync(dev)

    feats = task.data[split].tensors.get("x")
    if feats is None:
        raise FeatcacheError(f"cannot time the {task.name} head: it does not read pooled features 'x'")
    feats = feats[:k]

    def run_head():
        with torch.no_grad():
            task.module(feats)
        _sync(dev)

    filt_s = _median_seconds(run_filter, repeats)
    bb_s = _median_seconds(run_backbone, repeats)
    head_s = _median_seconds(run_head, repeats)
    out = {"filter_ms": 1e3 * filt_s / k, "backbone_ms": 1e3 * bb_s / k, "head_ms": 1e3 * head_s / k,
           "batch": k, "repeats": repeats, "device": str(dev), "threads": torch.get_num_threads(),
           "backbone": f"{b['name']} {b.get('model')}", "note": "model forward only; image decoding excluded"}
    out["detector_ms"] = out["backbone_ms"] + out["head_ms"]
    return out


def run_cascade(filter_run, detector_run, cache, manifest, out, *, max_leakage: float = 0.05, thresholds=(),
                device=None, latency_samples: int = 16, batch_size: int = 64, num_workers: int = 0,
                progress: bool = True) -> dict:
    """Combine the filter and the detector over the grid of thresholds; write DIR; return the report."""
    if not 0.0 <= max_leakage <= 1.0:
        raise FeatcacheError(f"--max-leakage must be in [0, 1]; got {max_leakage}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    filt = FilterRun(filter_run, device)
    task = load_run(detector_run, filt.device)
    if not task.detects:
        raise FeatcacheError(f"--detector {detector_run} is a {task.name} run, which does not detect fakes")
    c = open_cache(cache)
    task.load(c, splits=SPLITS)  # one read of the cache for both splits (load checks kind and backbone)

    joined = {}
    for split in SPLITS:
        fp = filt.predict(manifest, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
        joined[split] = join_stages(fp, _detector_predictions(task, split))
    latency = measure_latency(filt, task, c, manifest, split="test", samples=latency_samples)
    grid = default_grid(thresholds)
    tables = {s: pd.DataFrame([cascade_at(joined[s], t, latency) for t in grid]) for s in SPLITS}
    rec = recommend_threshold(tables["val"].to_dict(orient="records"), max_leakage)

    test = joined["test"]
    y = test["label"].to_numpy().astype(np.int64)
    alone = {"detector": detection_metrics(y, test["p_detector"].to_numpy()),
             "filter": detection_metrics(y, test["p_filter"].to_numpy())}
    groups = test["subgroup"].to_numpy().astype(np.int64)
    if (groups >= 0).any():
        for k in alone:
            alone[k].update(fairness_metrics(y, test[f"p_{k}"].to_numpy(), groups))
    report = {
        "filter": str(filter_run), "detector": str(detector_run), "cache": str(cache),
        "temperature": filt.temperature, "rule": "stop as real when 1 - P_filter(fake) >= t",
        "n": {s: int(len(joined[s])) for s in SPLITS}, "latency": latency, "max_leakage": max_leakage,
        "alone_test": alone,
        "recommended": None if rec is None else {
            "threshold": rec["threshold"], "chosen_on": "val", "val": rec,
            "test": cascade_at(test, rec["threshold"], latency)},
    }
    if rec is not None:
        r = report["recommended"]["test"]
        report["recommended"]["test_auc_minus_detector"] = r["auc"] - alone["detector"]["auc"]
    write_json(out / "cascade_report.json", report)
    pd.concat([t.assign(split=s) for s, t in tables.items()]).to_csv(out / "cascade_thresholds.csv", index=False)
    if rec is not None:
        t = rec["threshold"]
        stop = stopped_mask(test["p_filter"].to_numpy(), t)
        test.assign(stopped=stop, p_cascade=np.where(stop, test["p_filter"], test["p_detector"])).to_csv(
            out / "cascade_predictions_test.csv", index=False)
    plot_cascade(tables["test"][["threshold", "filtration", "leakage", "auc", "compute_saved"]],
                 out / "cascade_tradeoff.png", recommended=None if rec is None else rec["threshold"],
                 max_leakage=max_leakage,
                 title=f"cascade on test (detector alone: AUC {alone['detector']['auc']:.3f}); "
                       f"filter {latency['filter_ms']:.2f} ms, detector {latency['detector_ms']:.2f} ms per sample")
    return report
