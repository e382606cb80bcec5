"""Every evaluation carries its 95 % bootstrap intervals (metrics.json and the printed lines),
`synth features` exposes the controlled cache, and runs log to TensorBoard on request (issue 15,
items 2, 3 and 6; issue 19 item 14)."""

import json

import numpy as np
import pandas as pd
import pytest

from featcache.cli import main
from featcache.data.synth_faces import HARDNESS
from featcache.metrics.bootstrap import bootstrap_ci


def _cli(*args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """The controlled cache made by `synth features`, a 1-epoch Stage 1 and a 3-epoch Stage 2 on it."""
    root = tmp_path_factory.mktemp("intervals")
    cache, s1, s2 = root / "cache", root / "s1", root / "s2"
    main_args = [["synth", "features", cache, "--rows", 480, "--dim", 16, "--bias", 0.6, "--seed", 1],
                 ["-q", "train-head", "stage1", "--cache", cache, "--out", s1, "--set", "training.epochs=1",
                  "--set", "training.device=cpu"],
                 ["-q", "train-head", "stage2", "--cache", cache, "--stage1", s1, "--out", s2, "--preset", "none",
                  "--set", "training.epochs=3", "--set", "fairness.warmup_start=1", "--set", "fairness.warmup_end=2",
                  "--set", "selection.min_epoch=2", "--set", "training.device=cpu"]]
    outputs = []
    for args in main_args:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        assert exc.value.code == 0
    return {"cache": cache, "stage1": s1, "stage2": s2, "outputs": outputs}


def test_synth_features_writes_the_controlled_cache_and_refuses_a_non_empty_folder(heads, tmp_path, capsys):
    from featcache.cache import open_cache

    c = open_cache(heads["cache"])
    assert (c.rows, c.dim) == (480, 16)
    taken = tmp_path / "taken"
    assert _cli("synth", "features", taken, "--rows", 80, "--dim", 4, capsys=capsys)[0] == 0
    code, _, err = _cli("synth", "features", taken, "--rows", 80, "--dim", 4, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    code, out, _ = _cli("synth", "features", taken, "--rows", 80, "--dim", 4, "--bias", 0.5, "--overwrite",
                        capsys=capsys)
    assert code == 0
    strength = json.loads(out)["strength"]  # d' per subgroup: signal * (1 - bias * hardness)
    assert np.allclose(strength, [2.0 * (1 - 0.5 * h) for h in HARDNESS])
    code, _, err = _cli("synth", "features", tmp_path / "x", "--bias", 1.5, capsys=capsys)
    assert code == 2 and "--bias must be in [0, 1]" in err


def test_every_metrics_json_carries_intervals_that_hold_the_point(heads, capsys):
    run = heads["stage2"]
    for split in ("val", "test"):
        m = json.loads((run / "eval" / split / "metrics.json").read_text())
        for key in ("auc", "eer", "acc"):
            lo, hi = m["ci95"][key]
            assert lo <= m[key] <= hi, (split, key, m[key], lo, hi)
        # a fairness metric (a sum or range of absolute gaps) has no confidence interval but a
        # no-disparity floor and p-value; its resampled spread is kept apart (issue 23)
        assert "f_fpr" not in m["ci95"] and m["spread95"]["f_fpr"][0] <= m["spread95"]["f_fpr"][1]
        assert 0 < m["fairness_null"]["f_fpr"]["p"] <= 1 and m["fairness_coverage"]["unavailable"] is None
        assert m["ci95_info"]["cluster"] == "identity" and m["ci95_info"]["n_boot"] == 1000
        # the interval is the bootstrap of the predictions written beside it (seeded: the same numbers)
        preds = pd.read_csv(run / "eval" / split / "predictions.csv")
        assert np.allclose(bootstrap_ci(preds)["auc"], m["ci95"]["auc"])
    code, out, _ = _cli("-q", "evaluate", run, "--name", "again", capsys=capsys)
    assert code == 0
    again = json.loads((run / "eval" / "again_test" / "metrics.json").read_text())
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert again["ci95"] == test["ci95"]
    lo, hi = again["ci95"]["auc"]
    assert f"auc {again['auc']:.3f} [{lo:.3f}, {hi:.3f}]" in out  # printed with its interval
    assert out.count("- AUC: area under the ROC curve") == 1 and "95 % bootstrap interval" in out
    report = (run / "eval" / "again_test" / "report.md").read_text()
    assert f"{again['auc']:.3f} [{lo:.3f}, {hi:.3f}]" in report


def test_tensorboard_logs_every_epoch_scalar(heads, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "s1-tb"
    code, _, err = _cli("-q", "train-head", "stage1", "--cache", heads["cache"], "--out", run, "--tensorboard",
                        "--set", "training.epochs=2", "--set", "training.device=cpu", capsys=capsys)
    assert code == 0, err
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert np.allclose([e.value for e in loss], [row["train_loss"] for row in log], rtol=1e-6)
    assert [e.step for e in acc.Scalars("lr")] == [1, 2]


def test_tensorboard_without_the_package_is_one_error_line(heads, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were absent
    code, _, err = _cli("-q", "train-head", "stage1", "--cache", heads["cache"], "--out", tmp_path / "r",
                        "--tensorboard", "--set", "training.epochs=1", "--set", "training.device=cpu", capsys=capsys)
    assert code == 2 and "featcache[tensorboard]" in err and err.count("\n") == 1


def test_xai_reports_the_asvspoof_eer_beside_eer_and_bounds_both():
    """The audio evaluation reports `eer_asvspoof` (the ASVspoof convention) beside `eer`; its
    metrics.json intervals cover the utterance AUC and EER it reports (and no ACC it does not)."""
    from test_stacked import speech_frames

    from featcache.config import resolve_config
    from featcache.heads.xai import XaiTask
    from featcache.metrics import eer, eer_asvspoof
    from featcache.train.evaluate import add_intervals

    flat, data = speech_frames(n=16, dim=12, seed=1)
    task = XaiTask(resolve_config("xai", sets=["model.hidden=8", "model.kernel=3"]), "cpu")
    task.flat, task.data = flat, {"train": data, "val": data}
    task.spec = task.make_spec()
    task.module = task.build(task.spec)
    (metrics, preds), = task.evaluate("val")
    y, p = preds["label"].to_numpy(), preds["prob"].to_numpy()
    assert metrics["eer_asvspoof"] == eer_asvspoof(y, p) and metrics["eer"] == eer(y, p)
    ci = add_intervals(metrics, preds)["ci95"]
    assert set(ci) == {"auc", "eer"} and ci["auc"][0] <= metrics["auc"] <= ci["auc"][1]
