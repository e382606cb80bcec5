"""The fast filter: temperature scaling, calibration and cascade metrics, train-e2e (resume),
calibrate, evaluate and cascade end to end on tiny synthetic faces."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from scipy.optimize import minimize_scalar
from scipy.special import expit

from featcache.errors import FeatcacheError
from featcache.metrics import calibration_metrics, fit_temperature
from featcache.metrics.cascade import cascade_rates, recommend_threshold, threshold_analysis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--model", "mobilenetv4_conv_small", "--pretrained", "none", "--image-size", "32", "--batch-size", "12",
        "--lr", "2e-3"]


def assert_png(path):
    from PIL import Image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


# -- temperature scaling and calibration metrics ------------------------------------------------
@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_the_generating_temperature(true_t):
    rng = np.random.default_rng(0)
    score = rng.normal(0, 4, size=40_000)
    y = (rng.random(score.size) < expit(score / true_t)).astype(int)
    t = fit_temperature(score, y, objective="nll")
    assert t == pytest.approx(true_t, rel=0.05)
    # the same optimum as an independent bounded search of the NLL
    def nll(temp):
        p = np.clip(expit(score / temp), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    ref = minimize_scalar(nll, bounds=(0.1, 10), method="bounded", options={"xatol": 1e-6}).x
    assert t == pytest.approx(ref, rel=1e-3)
    t_ece = fit_temperature(score, y, objective="ece")
    assert t_ece == pytest.approx(true_t, rel=0.2)


def test_temperature_stays_in_bounds():
    score = np.array([-1.0, 1.0] * 50)
    y = np.array([1, 0] * 50)  # anti-correlated: the NLL wants T as large as allowed
    assert fit_temperature(score, y) == pytest.approx(10.0)


def test_calibration_metrics_on_a_hand_computed_case():
    # 15 bins of width 1/15: 0.1 -> bin 1, 0.25 -> bin 3, 0.70 and 0.72 -> bin 10, 0.9 -> bin 13
    p = np.array([0.1, 0.25, 0.70, 0.72, 0.9])
    y = np.array([0, 1, 1, 0, 1])
    m = calibration_metrics(y, p)
    gaps = {1: 0.1, 3: 0.75, 10: abs(0.5 - 0.71), 13: 0.1}
    assert m["ece"] == pytest.approx((0.1 + 0.75 + 2 * 0.21 + 0.1) / 5)
    assert m["mce"] == pytest.approx(max(gaps.values()))
    assert m["brier"] == pytest.approx((0.01 + 0.5625 + 0.09 + 0.5184 + 0.01) / 5)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.25) + math.log(0.7) + math.log(0.28)
                                       + math.log(0.9)) / 5)


# -- cascade rates ----------------------------------------------------------------------------------
def test_cascade_rates_on_a_hand_computed_case():
    y = [0, 0, 0, 1, 1, 0]
    p = [0.01, 0.03, 0.5, 0.015, 0.9, 0.2]
    r = cascade_rates(y, p, 0.95)  # stops where p <= 0.05: samples 0, 1, 3
    assert r["stopped"] == 3 and r["stopped_fakes"] == 1 and r["fakes"] == 2
    assert r["filtration"] == pytest.approx(3 / 6)
    assert r["leakage"] == pytest.approx(1 / 2)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["coverage"] == pytest.approx(1 - 3 / 6)
    r = cascade_rates(y, p, 0.98)  # p <= 0.02: samples 0 and 3
    assert (r["filtration"], r["leakage"], r["precision"]) == pytest.approx((2 / 6, 1 / 2, 1 / 2))
    r = cascade_rates(y, p, 0.995)  # nothing stops
    assert r["filtration"] == 0 and r["leakage"] == 0 and math.isnan(r["precision"]) and r["coverage"] == 1
    rows = threshold_analysis(y, p, [0.5, 0.75, 0.95, 0.995])
    # stopped: 0.5 -> samples 0, 1, 2, 3, 5; 0.75 -> 0, 1, 3, 5; each with one of the two fakes
    assert [r["stopped"] for r in rows] == [5, 4, 3, 0]
    assert recommend_threshold(rows, 0.0)["threshold"] == 0.995  # only a threshold that stops no fake
    assert recommend_threshold(rows, 0.5)["threshold"] == 0.5
    assert recommend_threshold(rows[1:], 0.5)["threshold"] == 0.75  # 4 stopped beats 3 at 0.95
    assert recommend_threshold(rows[:3], -1) is None


# -- train-e2e, calibrate, evaluate, cascade ------------------------------------------------------
def _subset(src, out, per_split: dict, by_label: bool):
    """A seeded sample of each split (half real, half fake when ``by_label``), paths made absolute."""
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df["path"] = [str(src.parent / p) for p in df["path"]]
    parts = []
    for split, k in per_split.items():
        rows = df[df["split"] == split]
        if by_label:
            parts += [rows[rows["label"] == lab].sample(k // 2, random_state=0) for lab in ("0", "1")]
        else:
            parts.append(rows.sample(k, random_state=0))
    pd.concat(parts).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Synthetic faces at 32 px; ``manifest.csv`` holds 48 of them (24 train, 12 val, 12 test)."""
    from featcache.data.synth_faces import minimum_n, synth_faces

    root = tmp_path_factory.mktemp("e2e")
    synth_faces(root / "data", n=minimum_n(), seed=0, size=32, progress=False)
    _subset(root / "data" / "manifest.csv", root / "manifest.csv", {"train": 24, "val": 12, "test": 12}, True)
    _subset(root / "data" / "stage1_manifest.csv", root / "stage1_manifest.csv",
            {"train": 32, "val": 16, "test": 16}, False)
    return root


@pytest.fixture(scope="module")
def mnv4_run(faces):
    out = faces / "mnv4"
    run_cli("-q", "train-e2e", "mnv4", "--manifest", faces / "manifest.csv", "--out", out, *TINY,
            "--epochs", "2", "--save-every", "1", "--patience", "0", "--mixed-precision", "--device", "cpu")
    return out


def test_train_e2e_run_directory(mnv4_run):
    for f in ("config.yaml", "model.json", "log.jsonl", "training_log.csv", "best.safetensors",
              "last.safetensors", "resume.pt", "summary.json",
              "checkpoints/epoch_0001.safetensors", "checkpoints/epoch_0002.safetensors",
              "eval/val/predictions.csv", "eval/test/predictions.csv", "eval/test/metrics.json", "eval/test/report.md"):
        assert (mnv4_run / f).is_file(), f
    assert_png(mnv4_run / "plots" / "training_curves.png")
    log = pd.read_csv(mnv4_run / "training_log.csv")
    assert list(log["epoch"]) == [1, 2]
    for col in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "val_f1"):
        assert log[col].notna().all(), col
    summary = json.loads((mnv4_run / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["mixed_precision"] == "off"  # --mixed-precision is for CUDA
    best = summary["best_epoch"]
    assert summary["score"] == pytest.approx(log["val_auc"].max())
    assert log.loc[log["epoch"] == best, "val_auc"].item() == pytest.approx(log["val_auc"].max())
    # best is the snapshot of the best epoch; last the last epoch's weights
    best_w, snap = load_file(mnv4_run / "best.safetensors"), load_file(
        mnv4_run / "checkpoints" / f"epoch_{best:04d}.safetensors")
    assert all(torch.equal(best_w[k], snap[k]) for k in best_w)
    final, last_snap = load_file(mnv4_run / "last.safetensors"), load_file(
        mnv4_run / "checkpoints" / "epoch_0002.safetensors")
    assert all(torch.equal(final[k], last_snap[k]) for k in final)
    # the test predictions are those of the best weights, and their metrics agree with sklearn
    from sklearn.metrics import roc_auc_score

    preds = pd.read_csv(mnv4_run / "eval" / "test" / "predictions.csv")
    metrics = json.loads((mnv4_run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(roc_auc_score(preds["label"], preds["score"]))
    assert np.allclose(preds["prob"], expit(preds["score"]))


def test_pretrained_from_a_file_and_offline_tags(mnv4_run):
    from featcache.e2e.mnv4 import create_model
    from featcache.errors import BackboneError

    weights = mnv4_run / "best.safetensors"
    net = create_model("mobilenetv4_conv_small", str(weights))
    ref, got = load_file(weights), net.state_dict()
    body = [k for k in ref if not k.startswith("classifier.")]
    assert len(body) > 100 and all(torch.equal(ref[k], got[k]) for k in body)
    assert not got["classifier.weight"].any() and not got["classifier.bias"].any()  # a new head starts at p = 0.5
    with pytest.raises(BackboneError, match="pass the file with --pretrained PATH"):
        create_model("mobilenetv4_conv_small", "e2400_r224_in1k")  # offline: no download
    with pytest.raises(BackboneError, match="does not exist"):
        create_model("mobilenetv4_conv_small", str(mnv4_run / "missing.safetensors"))


def _train(manifest, out, epochs, **kw):
    from featcache.e2e import train_e2e

    return train_e2e(manifest, out, model="mobilenetv4_conv_small", pretrained="none", image_size=32, batch_size=12,
                     epochs=epochs, patience=0, progress=False, device="cpu", **{"lr": 2e-3, **kw})


def test_resume_continues_from_the_saved_epoch_with_the_same_optimizer_state(faces, mnv4_run, tmp_path):
    manifest = faces / "manifest.csv"
    whole = mnv4_run  # the uninterrupted 2-epoch run: the CLI's train-e2e with the settings of _train

    def stop_after_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(manifest, tmp_path / "cut", 2, on_epoch_end=stop_after_1)
    saved = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert saved["loop"]["epoch"] == 1
    steps = {int(s["step"]) for s in saved["optimizer"]["state"].values()}

    r = _train(manifest, tmp_path / "cut", None, resume=True, lr=None)
    assert r.epochs_run == 2
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    # the resumed run ends exactly where the uninterrupted one does: weights and optimizer moments
    a, b = load_file(whole / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(whole / "resume.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # the resumed epoch took as many optimizer steps again as the first
    later = {int(s["step"]) for s in sb.values()}
    assert len(steps) == 1 and later == {2 * next(iter(steps))}

    # issue 19 item 2: --resume --epochs N on the finished run never trains at lr 0, and says which lr
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    said = []
    r = _train(manifest, tmp_path / "cut", 3, resume=True, lr=None, echo=said.append)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert r.epochs_run == 3 and [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[2]["lr"] == pytest.approx(log[1]["lr"]) and rows[2]["lr"] > 0  # the last lr used, not 0
    assert any("the last lr used" in line for line in said)
    said.clear()
    _train(manifest, tmp_path / "cut", 4, resume=True, lr=5e-4, echo=said.append)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert rows[3]["lr"] == pytest.approx(5e-4) and any("the given lr" in line for line in said)


def test_resume_refuses_another_manifest_and_a_missing_run(faces, tmp_path, mnv4_run):
    other = tmp_path / "other.csv"
    pd.read_csv(faces / "manifest.csv").iloc[:-1].to_csv(other, index=False)
    with pytest.raises(FeatcacheError, match="another manifest"):
        _train(other, mnv4_run, None, resume=True, lr=None)
    with pytest.raises(FeatcacheError, match="does not exist"):
        _train(other, tmp_path / "nothing", None, resume=True, lr=None)


def test_calibrate_evaluate_and_every_plot(faces, mnv4_run):
    manifest = faces / "manifest.csv"
    out = run_cli("-q", "calibrate", mnv4_run, "--manifest", manifest, "--objective", "nll").stdout
    assert "T = " in out
    temp = json.loads((mnv4_run / "calibration_temp.json").read_text())["temperature"]
    cal = json.loads((mnv4_run / "calibration_metrics.json").read_text())
    preds = pd.read_csv(mnv4_run / "calibrated_predictions.csv")
    assert len(preds) == (pd.read_csv(manifest)["split"] == "val").sum()
    y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
    assert temp == pytest.approx(fit_temperature(score, y))
    assert np.allclose(preds["prob_calibrated"], expit(score / temp))
    assert cal["after"] == pytest.approx(calibration_metrics(y, expit(score / temp)))
    assert cal["before"] == pytest.approx(calibration_metrics(y, expit(score)))
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-12  # T = 1 was a candidate
    assert_png(mnv4_run / "plots" / "reliability_diagram.png")

    run_cli("-q", "evaluate", mnv4_run, "--manifest", manifest, "--thresholds", "0.9,0.98")
    ev = mnv4_run / "eval" / "test"
    report = json.loads((ev / "metrics.json").read_text())
    test = pd.read_csv(ev / "predictions.csv")
    assert report["temperature"] == pytest.approx(temp) and report["n"] == len(test)
    assert np.allclose(test["prob"], expit(test["score"] / temp))
    assert report["ece"] == pytest.approx(calibration_metrics(test["label"], test["prob"])["ece"])
    assert "f_fpr" in report and len(pd.read_csv(ev / "subgroups.csv")) >= 2
    rows = report["threshold_analysis"]
    assert [r["threshold"] for r in rows] == [0.9, 0.98]
    assert rows[1] == pytest.approx(cascade_rates(test["label"], test["prob"], 0.98), nan_ok=True)
    for f in ("roc", "confusion_matrix", "reliability_diagram", "cascade_analysis", "subgroup_rates"):
        assert_png(ev / "plots" / f"{f}.png")
    assert "Cascade thresholds" in (ev / "report.md").read_text()


def test_evaluate_routes_by_run_kind(faces, mnv4_run):
    from featcache.e2e.evaluate import evaluate_run

    with pytest.raises(FeatcacheError, match="pass --manifest, not --cache"):
        evaluate_run(mnv4_run, faces)
    with pytest.raises(FeatcacheError, match="not a train-e2e mnv4 run"):
        from featcache.e2e import calibrate_run

        (faces / "head").mkdir(exist_ok=True)
        (faces / "head" / "model.json").write_text('{"task": "stage2", "spec": {}}')
        calibrate_run(faces / "head", faces / "manifest.csv")


def test_cascade_combines_the_filter_and_a_stage2_detector(face_caches, stage2_run, mnv4_run, tmp_path):
    # the session's faces (conftest): their tiny-CLIP detection cache and the Stage-2 run trained on it
    data, detector = face_caches / "data", stage2_run
    # 32 val and 32 test rows of the cache's manifest (half real, half fake), matched by row identity
    subset = data / f"cascade_{tmp_path.name}.csv"
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    df[df["split"].isin(["val", "test"])].groupby(["split", "label"], group_keys=False).head(16).to_csv(
        subset, index=False)
    out = tmp_path / "cascade"
    run_cli("-q", "cascade", "--filter", mnv4_run, "--detector", detector, "--cache", face_caches / "det",
            "--manifest", subset, "--out", out, "--max-leakage", "0.2")
    report = json.loads((out / "cascade_report.json").read_text())
    table = pd.read_csv(out / "cascade_thresholds.csv")
    lat = report["latency"]
    assert lat["filter_ms"] > 0 and lat["backbone_ms"] > 0 and lat["head_ms"] > 0
    assert lat["detector_ms"] == pytest.approx(lat["backbone_ms"] + lat["head_ms"])
    # recompute one threshold from the two stages' own predictions
    from featcache.e2e.mnv4 import FilterRun

    filt = FilterRun(mnv4_run).predict(subset, "test")  # with the run's temperature, if fitted
    det = pd.read_csv(detector / "eval" / "test" / "predictions.csv")
    # one evaluation layout for a head and for the filter: the head's files are all in the filter's
    ev_head = detector / "eval" / "test"
    head = {str(p.relative_to(ev_head)) for p in ev_head.rglob("*")}
    filt_files = {str(p.relative_to(mnv4_run / "eval" / "test")) for p in (mnv4_run / "eval" / "test").rglob("*")}
    assert {"predictions.csv", "metrics.json", "report.md", "plots", "plots/roc.png"} <= head <= filt_files
    j = filt.merge(det[["sample_id", "prob"]], on="sample_id", suffixes=("_f", "_d"))
    assert report["n"]["test"] == len(j)
    from sklearn.metrics import roc_auc_score

    for t in (0.9, 0.98):
        row = table[(table["split"] == "test") & np.isclose(table["threshold"], t)].iloc[0]
        stop = 1 - j["prob_f"] >= t
        p = np.where(stop, j["prob_f"], j["prob_d"])
        assert row["filtration"] == pytest.approx(stop.mean())
        assert row["auc"] == pytest.approx(roc_auc_score(j["label"], p))
        assert row["compute_saved"] == pytest.approx(
            1 - (lat["filter_ms"] + (1 - stop.mean()) * lat["detector_ms"]) / lat["detector_ms"])
    assert report["alone_test"]["detector"]["auc"] == pytest.approx(roc_auc_score(j["label"], j["prob_d"]))
    rec = report["recommended"]
    val = table[table["split"] == "val"]
    ok = val[val["leakage"].fillna(0) <= 0.2]
    assert rec["threshold"] == pytest.approx(ok.sort_values(["filtration", "threshold"]).iloc[-1]["threshold"])
    assert_png(out / "cascade_tradeoff.png")


def test_filter_batches_skip_and_count_unreadable_images_and_repeat_per_epoch(faces, tmp_path):
    """Issue 17: a zero-byte, a truncated and a non-image file in train are skipped and counted in
    the epoch's ``unreadable``; the rest arrive augmented on the device, the same for the same epoch."""
    from featcache.config import resolve_config
    from featcache.data.manifest import read_manifest
    from featcache.e2e.train import FilterTask

    df = pd.read_csv(faces / "manifest.csv", dtype=str, keep_default_na=False)
    train = df.index[df["split"] == "train"][:3]
    good = open(df.at[train[1], "path"], "rb").read()
    for i, data in zip(train, (b"", good[: len(good) // 2], b"not an image")):
        (tmp_path / f"bad{i}.png").write_bytes(data)
        df.at[i, "path"] = str(tmp_path / f"bad{i}.png")
    df.to_csv(tmp_path / "m.csv", index=False)
    cfg = resolve_config("mnv4", sets={"model.name": "mobilenetv4_conv_small", "model.pretrained": "none",
                                       "model.image_size": 32, "training.batch_size": 12,
                                       "training.mixed_precision": True, "training.device": "cpu"})
    job = FilterTask(cfg, "cpu")  # the filter task fed the manifest, without training
    job.load(read_manifest(tmp_path / "m.csv"), splits=("train",))
    job.spec, job.module = job.make_spec(), torch.nn.Identity()
    n_train = int((df["split"] == "train").sum())

    def epoch(e):
        out = list(job.batches(e, None, 12))
        return out, job.unreadable

    first, bad = epoch(1)
    assert bad == 3 and sum(k for _, k in first) == n_train - 3
    for b, k in first:
        assert b["x"].shape == (1, k, 3, 32, 32) and b["x"].dtype == torch.float32 and torch.isfinite(b["x"]).all()
    again, _ = epoch(1)
    assert all(torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) for (a, _), (b, _) in zip(first, again))
    other, bad2 = epoch(2)
    assert bad2 == 3 and not torch.equal(first[0][0]["x"], other[0][0]["x"])
