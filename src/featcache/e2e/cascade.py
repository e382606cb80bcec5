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

Before anything runs, the manifest is checked against the cache (:func:`match_manifest`): the
cache's own manifest (same sha256 and row count), or a manifest whose val/test rows are all
cache rows with the same sample_id, path, split and label; any other manifest is refused.  The
report's ``messages`` say how the rows matched and how many were used, and carry a
``remark: ...`` when the recommended threshold stops nothing (:func:`threshold_remarks`).

DIR/ cascade_report.json  cascade_thresholds.csv  cascade_tradeoff.png  cascade_predictions_test.csv
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import open_cache
from ..data.manifest import read_manifest
from ..errors import FeatcacheError, write_atomic
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


#: The manifest fields that identify a row when the manifest is not the cache's own.
ROW_IDENTITY = ("sample_id", "path")


def match_manifest(cache, manifest, splits=SPLITS) -> dict:
    """Check that ``manifest``'s rows of ``splits`` are rows of ``cache``; how they matched.

    ``by`` is ``fingerprint`` when the manifest is the one the cache was extracted from (its
    sha256 and row count are in the cache's attributes); otherwise ``row identity``: every
    manifest row of ``splits`` must be a cache row with the same sample_id and path (and the
    same split and label), else a :class:`FeatcacheError` says how many are not and shows one.
    Returns ``{"by", "rows": {split: n}, "manifest_sha256", "cache_manifest_sha256"}``.
    """
    m = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    recorded = cache.attrs["manifest"]
    df = m.df[m.df["split"].isin(splits)]
    counts = {s: int((df["split"] == s).sum()) for s in splits}
    info = {"rows": counts, "manifest_sha256": m.sha256, "cache_manifest_sha256": recorded["sha256"]}
    if m.sha256 == recorded["sha256"] and len(m) == int(recorded["rows"]):
        return {"by": "fingerprint", **info}
    meta = cache.meta([*ROW_IDENTITY, "split", "label"])
    meta["label"] = meta["label"].astype(np.int64)
    ours = df[[*ROW_IDENTITY, "split", "label"]].astype({"label": np.int64})
    joined = ours.merge(meta, on="sample_id", how="left", suffixes=("", "_cache"), indicator=True)
    absent = joined["_merge"] != "both"
    differs = {c: ~absent & (joined[c].astype(str) != joined[f"{c}_cache"].astype(str))
               for c in ("path", "split", "label")}
    bad = absent | differs["path"] | differs["split"] | differs["label"]
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        row = joined.iloc[i]
        why = ("not in the cache" if absent.iloc[i] else
               "; ".join(f"{c} {row[c]!r} here, {row[c + '_cache']!r} in the cache"
                         for c in ("path", "split", "label") if differs[c].iloc[i]))
        raise FeatcacheError(
            f"--manifest {m.source} is not the manifest the cache {cache.path} was extracted from (sha256 "
            f"{m.sha256[:12]} vs {recorded['sha256'][:12]}, {len(m)} vs {recorded['rows']} rows), and {int(bad.sum())} "
            f"of its {len(df)} {'/'.join(splits)} rows do not match a cache row by sample_id and path "
            f"(e.g. {row['sample_id']}: {why}); pass the cache's own manifest or extract a cache from this one")
    return {"by": "row identity", **info}


def match_message(match: dict) -> str:
    """One line: how the manifest matched the cache and how many rows of each split it holds."""
    rows = ", ".join(f"{s} {n}" for s, n in match["rows"].items())
    if match["by"] == "fingerprint":
        return f"manifest: the cache's own (sha256 {match['manifest_sha256'][:12]}); rows matched: {rows}"
    return (f"manifest: not the cache's own (sha256 {match['manifest_sha256'][:12]}, the cache's "
            f"{match['cache_manifest_sha256'][:12]}); every row matched a cache row by sample_id and path: {rows}")


def threshold_remarks(rec_val: dict | None, rec_test: dict | None, max_leakage: float) -> list[str]:
    """``remark: ...`` lines when the recommended threshold stops nothing (on val, or on test).

    ``rec_val``/``rec_test``: :func:`cascade_at` rows of the recommended threshold on the two
    splits (None when no threshold keeps val leakage within ``max_leakage``)."""
    if rec_val is None:
        return [f"remark: no threshold keeps val leakage within --max-leakage {max_leakage:g}: the filter stops "
                "fakes before any real; every sample goes to the detector"]
    t = rec_val["threshold"]
    if rec_val["filtration"] == 0:
        saved = rec_test.get("compute_saved") if rec_test else None
        cost = "" if saved is None else f" (compute saved {saved:.3f}: the filter only adds its own cost)"
        return [f"remark: the recommended threshold t = {t:g} stops no sample on val (filtration 0): within "
                f"--max-leakage {max_leakage:g} the filter cannot stop a real without stopping a fake, so the cascade "
                f"sends everything to the detector{cost}; raise --max-leakage or train the filter further"]
    if rec_test is not None and rec_test["filtration"] == 0:
        return [f"remark: the recommended threshold t = {t:g} stops {rec_val['filtration']:.3f} of val but no "
                "sample on test (filtration 0): the cascade saves nothing there; the val and test scores differ"]
    return []


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
    _, x, _ = next(iter(image_loader(paths[:k], filt.image_size, train=False, batch_size=k,
                                     config=filt.data_config)))
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
            task.module(feats[None])  # a 1-run stacked head: (R = 1, B, D)
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
    c = open_cache(cache)
    m = read_manifest(manifest)
    match = match_manifest(c, m)  # before any model is loaded: a wrong pairing fails at once
    messages = [match_message(match)]
    filt = FilterRun(filter_run, device)
    task = load_run(detector_run, filt.device)
    if not task.detects:
        raise FeatcacheError(f"--detector {detector_run} is a {task.name} run, which does not detect fakes")
    task.load(c, splits=SPLITS)  # one read of the cache for both splits (load checks kind and backbone)
    out.mkdir(parents=True, exist_ok=True)

    joined = {}
    for split in SPLITS:
        fp = filt.predict(m, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
        joined[split] = join_stages(fp, _detector_predictions(task, split))
        left = len(fp) - len(joined[split])
        if left:  # rows the extraction could not read have no detector score
            messages.append(f"note: {left} of {len(fp)} {split} rows failed extraction in the cache (ok = 0) and "
                            "are left out of the cascade")
    messages.append("rows used: " + ", ".join(f"{s} {len(joined[s])}" for s in SPLITS))
    latency = measure_latency(filt, task, c, m, split="test", samples=latency_samples)
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
    messages += threshold_remarks(rec, None if rec is None else report["recommended"]["test"], max_leakage)
    report["manifest_match"] = match
    report["messages"] = messages
    write_json(out / "cascade_report.json", report)
    write_atomic(out / "cascade_thresholds.csv",
                 pd.concat([t.assign(split=s) for s, t in tables.items()]).to_csv(index=False))
    if rec is not None:
        t = rec["threshold"]
        stop = stopped_mask(test["p_filter"].to_numpy(), t)
        write_atomic(out / "cascade_predictions_test.csv", test.assign(
            stopped=stop, p_cascade=np.where(stop, test["p_filter"], test["p_detector"])).to_csv(index=False))
    plot_cascade(tables["test"][["threshold", "filtration", "leakage", "auc", "compute_saved"]],
                 out / "cascade_tradeoff.png", recommended=None if rec is None else rec["threshold"],
                 max_leakage=max_leakage,
                 title=f"cascade on test (detector alone: AUC {alone['detector']['auc']:.3f}); "
                       f"filter {latency['filter_ms']:.2f} ms, detector {latency['detector_ms']:.2f} ms per sample")
    return report
