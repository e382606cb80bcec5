"""``featcache evaluate`` across datasets (no or partial demographics), where it writes, what it
records (provenance, the fingerprint check), the threshold chosen on val, and ``featcache score``
on any detector's predictions (issue 23 items 3 and 7, issue 24 items 1 and 3)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_cli

from featcache import __version__
from featcache.errors import FeatcacheError
from featcache.metrics import fairness_metrics
from featcache.metrics.threshold import choose_threshold, parse_rule
from featcache.train.evaluate import at_threshold, evaluate_head, val_threshold, write_evaluation
from featcache.train.score import read_predictions


@pytest.fixture(scope="module")
def other_caches(face_caches, tmp_path_factory):
    """The faces' test rows extracted by the run's backbone into other caches: ``celeb df/`` with no
    demographics (a Celeb-DF), ``partial/`` with every third row's gender and race unknown."""
    from featcache.extract import extract

    root = tmp_path_factory.mktemp("other")
    df = pd.read_csv(face_caches / "data" / "manifest.csv", dtype=str, keep_default_na=False)
    df = df[df["split"] == "test"].iloc[::2].copy()  # 48 rows: enough, and quick to extract
    df["path"] = [str(face_caches / "data" / p) for p in df["path"]]
    unknown = np.arange(len(df)) % 3 == 0
    partial = df.copy()
    partial.loc[unknown, ["gender", "race"]] = ""
    df.assign(gender="", race="").to_csv(root / "nodemo.csv", index=False)
    partial.to_csv(root / "partial.csv", index=False)
    kw = dict(model="tiny", part_rows=128, num_workers=0, progress=False)
    extract("clip", root / "nodemo.csv", root / "celeb df", **kw)
    extract("clip", root / "partial.csv", root / "partial", **kw)
    return root


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_a_test_set_without_demographics_gets_detection_metrics_and_fairness_not_available(stage2_run, other_caches):
    """The README's cross-dataset example ended in a `zero-size array` traceback and an empty folder."""
    in_domain = (stage2_run / "eval" / "test" / "metrics.json").read_bytes()
    (stage2_run / "eval" / "celeb-df_test" / "plots").mkdir(parents=True)  # what the crash left behind
    proc = run_cli("evaluate", stage2_run, "--cache", other_caches / "celeb df", check=False)
    assert proc.returncode == 0, proc.stderr
    out = stage2_run / "eval" / "celeb-df_test"  # named after the cache's folder, made safe
    m = _metrics(out)
    for key in ("auc", "eer", "acc"):
        lo, hi = m["ci95"][key]
        assert lo <= m[key] <= hi, key
    assert m["fairness_coverage"]["unavailable"] == "no demographics in this test set"
    assert m["fairness_coverage"]["rows"] == 0 and m["fairness_coverage"]["of_rows"] == m["n"] == 48
    assert "fairness not available (no demographics in this test set)" in proc.stdout
    assert "f_fpr" not in proc.stdout.splitlines()[0] and not (out / "subgroups.csv").exists()
    assert "not available (no demographics in this test set)" in (out / "report.md").read_text()
    # the in-domain evaluation is untouched, and nothing half-written is left beside it
    assert (stage2_run / "eval" / "test" / "metrics.json").read_bytes() == in_domain
    assert not [p for p in (stage2_run / "eval").iterdir() if p.name.startswith(".")]
    # provenance: what was evaluated, and how
    prov = m["provenance"]
    assert prov["cache"]["path"] == str((other_caches / "celeb df").resolve())
    from featcache.cache import open_cache

    assert prov["cache"]["fingerprint"] == open_cache(other_caches / "celeb df").fingerprint
    assert prov["run"] == str(stage2_run.resolve()) and prov["split"] == "test" and prov["featcache"] == __version__
    assert prov["command"].startswith("featcache evaluate ") and "--cache" in prov["command"]
    assert m["threshold"]["rule"] == "val_eer" and 0 < m["threshold"]["value"] < 1


def test_partial_demographics_fairness_covers_the_known_rows(stage2_run, other_caches):
    e = evaluate_head(stage2_run, other_caches / "partial", name="partial")
    assert e.out.name == "partial_test"
    preds = pd.read_csv(e.out / "predictions.csv")
    known = preds["subgroup"].to_numpy() >= 0
    assert 0 < known.sum() < len(preds)
    # the fairness metrics are those of the known rows alone (an independent computation on them)
    ref = fairness_metrics(preds["label"][known], preds["prob"][known], preds["subgroup"][known])
    for key in ("f_fpr", "f_meo", "f_dp", "f_oae"):
        assert e.metrics[key] == pytest.approx(ref[key], nan_ok=True), key
    table = pd.read_csv(e.out / "subgroups.csv")
    assert table["n"].sum() == known.sum()
    coverage = e.metrics.get("fairness_coverage")
    if coverage is not None:  # computed by the bootstrap's with_intervals (issue 23, item 5)
        assert coverage["rows"] == known.sum() and coverage["of_rows"] == len(preds)


def test_no_plots_writes_the_same_evaluation_without_its_pngs(stage2_run, other_caches):
    """``--no-plots`` (a run's ``logging.plots: false``): the same files but the PNGs, the same metrics."""
    drawn = evaluate_head(stage2_run, other_caches / "partial", name="drawn")
    proc = run_cli("-q", "evaluate", stage2_run, "--cache", other_caches / "partial", "--name", "bare", "--no-plots")
    bare = stage2_run / "eval" / "bare_test"
    assert "plots/" not in proc.stdout and not (bare / "plots").exists()
    assert _metrics(bare)["provenance"]["command"].endswith("--name bare --no-plots")  # recorded as typed
    assert {f for f in drawn.files if not f.startswith("plots/")} == {p.name for p in bare.iterdir()}
    assert {"plots/roc.png", "plots/subgroup_rates.png"} <= set(drawn.files)
    strip = ("provenance",)  # the command line and the folder differ, nothing else
    assert ({k: v for k, v in _metrics(bare).items() if k not in strip}
            == {k: v for k, v in _metrics(drawn.out).items() if k not in strip})


def test_another_evaluation_is_never_written_over(stage2_run, other_caches, tmp_path):
    # a name already holding another cache's evaluation (here the run's own test evaluation) needs --overwrite
    shutil.copytree(stage2_run / "eval" / "test", stage2_run / "eval" / "xd_test")
    own = _metrics(stage2_run / "eval" / "test")["provenance"]["cache"]["path"]
    proc = run_cli("evaluate", stage2_run, "--cache", other_caches / "celeb df", "--name", "xd", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "--overwrite" in proc.stderr and own in proc.stderr
    assert _metrics(stage2_run / "eval" / "xd_test")["provenance"]["cache"]["path"] == own
    # the Python API: the same refusal, and --overwrite; a test set without demographics as from the CLI
    with pytest.raises(FeatcacheError, match="already holds an evaluation of"):
        evaluate_head(stage2_run, other_caches / "celeb df", name="xd")
    e = evaluate_head(stage2_run, other_caches / "celeb df", name="xd", overwrite=True)
    assert _metrics(e.out)["provenance"]["cache"]["path"].endswith("celeb df")
    assert e.metrics["fairness_coverage"]["unavailable"] == "no demographics in this test set"
    assert "fairness not available (no demographics in this test set)" in e.short()
    # a name that would leave eval/ is refused
    proc = run_cli("evaluate", stage2_run, "--cache", other_caches / "celeb df", "--name", "../up", check=False)
    assert proc.returncode == 2 and "--name '../up'" in proc.stderr and not (stage2_run / "up_test").exists()


def test_a_swapped_cache_folder_is_refused_in_one_line(stage2_run, other_caches, tmp_path):
    """The run's recorded cache folder now holds another dataset of the same backbone."""
    run = tmp_path / "run"
    shutil.copytree(stage2_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    swapped = tmp_path / "det"
    shutil.copytree(other_caches / "partial", swapped)
    cfg["cache"]["path"] = str(swapped)  # the folder the run records, holding other data
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = sorted(p.name for p in (run / "eval").iterdir())
    proc = run_cli("evaluate", run, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is not the cache" in proc.stderr and "fingerprint" in proc.stderr
    assert sorted(p.name for p in (run / "eval").iterdir()) == before


# -- the threshold chosen on val ----------------------------------------------------------------------
def _brute_threshold(y, p, rule):
    """The rule by a loop over every candidate threshold (the val probabilities, and above all)."""
    kind, x = parse_rule(rule)
    cands = [np.nextafter(p.max(), np.inf), *sorted(set(p.tolist()), reverse=True)]
    best, best_t = None, None
    for t in cands:  # descending: the first hit is the highest threshold
        fpr = np.mean(p[y == 0] >= t)
        fnr = np.mean(p[y == 1] < t)
        if kind == "val_eer":
            if best is None or abs(fnr - fpr) < best:
                best, best_t = abs(fnr - fpr), t
        elif fpr <= x:
            best_t = t
    return best_t


def _detector(rng, n, shift=0.0):
    """Scores with a subgroup disparity: subgroup g's fakes score lower the higher g."""
    g = rng.integers(0, 8, n)
    y = rng.integers(0, 2, n)
    score = (2.0 - 0.2 * g) * y - 0.8 + rng.normal(0, 1, n) + shift
    return pd.DataFrame({"label": y, "prob": 1 / (1 + np.exp(-score)), "subgroup": g, "score": score})


@pytest.mark.parametrize("rule", ["val_eer", "val_fpr=0.1"])
def test_val_threshold_matches_a_brute_force_loop_and_ignores_a_score_shift(rule):
    rng = np.random.default_rng(0)
    val, test = _detector(rng, 300), _detector(rng, 400)
    t = choose_threshold(val["label"], val["prob"], rule)
    assert t == _brute_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), rule)
    out = {}
    for shift in (0.0, -1.0):  # the same detector minus one logit
        v = val.assign(prob=1 / (1 + np.exp(-(val["score"] + shift))))
        s = test.assign(prob=1 / (1 + np.exp(-(test["score"] + shift))))
        chosen = val_threshold(rule, v)
        out[shift] = {"at_0.5": fairness_metrics(s["label"], s["prob"], s["subgroup"]), "threshold": chosen,
                      "at_val": at_threshold(s, chosen["value"], fairness=True)}
    a, b = out[0.0]["at_val"], out[-1.0]["at_val"]
    assert abs(out[0.0]["at_0.5"]["f_fpr"] - out[-1.0]["at_0.5"]["f_fpr"]) > 5  # at 0.5 the shift moves F_FPR
    for key in ("acc", "fpr", "tpr", "f_fpr", "f_eo", "f_meo", "f_dp", "f_oae"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key  # at the val threshold it does not
    # against an independent computation at the brute-force threshold
    assert out[0.0]["threshold"] == {"rule": rule, "value": t, "chosen_on": "val", "n_val": 300}
    ref = fairness_metrics(test["label"], test["prob"], test["subgroup"], threshold=t)
    for key, value in ref.items():
        assert a[key] == pytest.approx(value), key
    assert a["fpr"] == np.mean(test["prob"][test["label"] == 0] >= t)


def test_a_wrong_threshold_rule_is_refused_before_training(face_caches, stage1_run, tmp_path):
    proc = run_cli("train-head", "stage2", "--cache", face_caches / "det", "--stage1", stage1_run, "--out",
                   tmp_path / "r", "--set", "evaluation.threshold=val_fpr=2", check=False)
    assert proc.returncode == 2 and "evaluation.threshold must be 0.5, val_eer or val_fpr=<x>" in proc.stderr
    assert not (tmp_path / "r").exists()


# -- featcache score ----------------------------------------------------------------------------------
def test_score_of_a_runs_predictions_gives_the_numbers_of_its_evaluate(stage2_run, tmp_path):
    ev = stage2_run / "eval" / "test"
    proc = run_cli("score", ev / "predictions.csv", "--out", tmp_path / "scored", "--val",
                   stage2_run / "eval" / "val" / "predictions.csv")
    a, b = _metrics(ev), _metrics(tmp_path / "scored")
    for key in ("auc", "ap", "eer", "acc", "f1", "tp", "fp", "tn", "fn", "f_fpr", "f_eo", "f_meo", "f_dp", "f_oae",
                "ece", "mce", "brier", "nll", "degenerate", "one_sided", "ci95", "threshold", "at_val_threshold"):
        assert b[key] == a[key], key
    assert (tmp_path / "scored" / "subgroups.csv").read_text() == (ev / "subgroups.csv").read_text()
    assert b["provenance"]["predictions"]["path"] == str((ev / "predictions.csv").resolve())
    assert b["provenance"]["command"].startswith("featcache score ")
    assert f"auc {a['auc']:.3f}" in proc.stdout and "at the val threshold (val_eer" in proc.stdout
    for f in ("report.md", "predictions.csv", "plots/roc.png", "plots/subgroup_rates.png"):
        assert (tmp_path / "scored" / f).is_file(), f


def test_score_reads_race_and_gender_words_and_pgfdd_codes(tmp_path):
    df = pd.DataFrame({"label": [0, 1, 0, 1, 1, 0], "prob": [0.1, 0.9, 0.6, 0.4, 0.8, 0.2],
                       "gender": ["Male", "female", "", "Female", "male", "Male"],
                       "race": ["East Asian", "white", "black", "Indian", "Black", "White"]})
    df.to_csv(tmp_path / "words.csv", index=False)
    assert read_predictions(tmp_path / "words.csv")["subgroup"].tolist() == [0, 5, -1, 7, 2, 1]
    df.drop(columns=["gender", "race"]).assign(intersec_label=[0, 5, -1, 7, 2, 1]).to_csv(tmp_path / "pg.csv",
                                                                                          index=False)
    assert read_predictions(tmp_path / "pg.csv")["subgroup"].tolist() == [0, 5, -1, 7, 2, 1]


@pytest.mark.parametrize("change, words", [
    (lambda d: d.drop(columns="prob"), ["no 'prob' column", "Rename"]),
    (lambda d: d.assign(prob=[0.1, 1.7, 0.3, 0.5]), ["'prob' must hold P(fake) in [0, 1]", "line 3", "sigmoid"]),
    (lambda d: d.assign(label=[0, 2, 1, 0]), ["'label' must hold 0 (real) or 1 (fake)", "line 3"]),
    (lambda d: d.assign(subgroup=[0, 9, 1, 2]), ["'subgroup' must hold subgroup codes 0..7"]),
    (lambda d: d.assign(race=["asian"] * 4), ["'race' column but no 'gender'"]),
])
def test_a_bad_predictions_csv_is_one_error_line(change, words, tmp_path):
    d = change(pd.DataFrame({"label": [0, 1, 1, 0], "prob": [0.1, 0.7, 0.3, 0.5]}))
    d.to_csv(tmp_path / "p.csv", index=False)
    proc = run_cli("score", tmp_path / "p.csv", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for w in words:
        assert w in proc.stderr
    assert not (tmp_path / "o").exists()


def test_score_without_demographics_or_val(tmp_path):
    rng = np.random.default_rng(1)
    d = _detector(rng, 200).drop(columns=["subgroup", "score"])
    d.to_csv(tmp_path / "p.csv", index=False)
    proc = run_cli("score", tmp_path / "p.csv", "--out", tmp_path / "o")
    m = _metrics(tmp_path / "o")
    assert m["fairness_coverage"]["unavailable"] == "no demographics in this test set"
    assert m["threshold"]["value"] is None and "--val" in m["threshold"]["unavailable"]
    assert "fairness not available" in proc.stdout
    with pytest.raises(FeatcacheError, match="already holds an evaluation"):
        d.assign(prob=d["prob"] ** 2).to_csv(tmp_path / "q.csv", index=False)
        from featcache.train.score import score_predictions

        score_predictions(tmp_path / "q.csv", tmp_path / "o")


def test_an_all_unknown_subgroup_column_never_reaches_the_bootstrap(tmp_path):
    """The filter computes no fairness metrics without demographics, but its predictions keep their
    all-unknown subgroup column: that still ended in the `zero-size array` traceback."""
    d = _detector(np.random.default_rng(2), 120).assign(subgroup=-1)
    metrics = {"auc": 0.5, "acc": 0.5, "eer": 0.5}
    e = write_evaluation(None, "test", metrics, d, detects=True, summary_keys=("auc", "acc", "eer", "f_fpr"),
                         title="filter", out=tmp_path / "e", provenance={}, val_predictions=None)
    assert e.metrics["fairness_coverage"]["unavailable"] == "no demographics in this test set"
    assert set(e.metrics["ci95"]) == {"auc", "eer", "acc"} and "fairness not available" in e.short()
