"""Metrics against independent computations: sklearn, hand-computed cases, known parameters."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from featcache.metrics import (
    all_metrics,
    calibration_metrics,
    detection_metrics,
    eer,
    fairness_metrics,
    fit_temperature,
    group_rates,
    reliability_bins,
    sigmoid,
    subgroup_table,
    video_auc,
)

nan = math.nan


def _random(n=500, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, p


# --- detection ------------------------------------------------------------------------------

def test_detection_metrics_match_sklearn():
    y, p = _random()
    for threshold in (0.5, 0.3):
        m = detection_metrics(y, p, threshold)
        pred = (p >= threshold).astype(int)
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert m["ap"] == pytest.approx(skm.average_precision_score(y, p))
        assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
        assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
        assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
        assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (
            int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum()),
            int(((pred == 0) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum()))
        assert all(type(v) is int for k, v in m.items() if k in ("tp", "fp", "tn", "fn"))
        assert all(type(v) is float for k, v in m.items() if k not in ("tp", "fp", "tn", "fn"))


def test_detection_metrics_undefined_values_are_nan():
    m = detection_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and math.isnan(m["eer"])
    assert math.isnan(m["specificity"])
    assert m["recall"] == pytest.approx(2 / 3) and m["acc"] == pytest.approx(2 / 3)
    m = detection_metrics([0, 0, 1], [0.1, 0.2, 0.3])  # nothing predicted fake
    assert math.isnan(m["precision"]) and m["f1"] == 0.0 and m["recall"] == 0.0


def test_eer_known_cases():
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    # at threshold 0.7: one of four reals above (FPR 1/4), one of four fakes below (FNR 1/4)
    assert eer([0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9, 0.95]) == pytest.approx(0.25)
    # tie at 0.5 jumps from (FPR, FNR) = (0, 1/2) to (1/2, 0); interpolated crossing at 1/4
    assert eer([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.25)
    assert eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # inverted


def test_eer_close_to_brute_force_crossing():
    y, p = _random(2000, seed=1)
    thresholds = np.unique(p)
    fpr = np.array([(p[y == 0] >= t).mean() for t in thresholds])
    fnr = np.array([(p[y == 1] < t).mean() for t in thresholds])
    i = np.argmin(np.abs(fpr - fnr))
    tol = 1.0 / min((y == 0).sum(), (y == 1).sum())
    assert abs(eer(y, p) - (fpr[i] + fnr[i]) / 2) <= tol


def test_video_auc_hand_case():
    identity = ["a", "a", "b", "b", "c", "d", "d", "d", ""]
    y = [0, 0, 1, 1, 0, 1, 1, 1, 0]
    p = [0.1, 0.3, 0.6, 0.8, 0.55, 0.4, 0.6, 0.5, 0.99]
    # videos: a real 0.2, c real 0.55, b fake 0.7, d fake 0.5 -> 3 of 4 pairs ordered; "" ignored
    assert video_auc(y, p, identity) == pytest.approx(0.75)
    assert skm.roc_auc_score(y[:8], p[:8]) != pytest.approx(0.75)  # frame-level AUC differs
    with pytest.raises(ValueError, match="both real and fake"):
        video_auc([0, 1], [0.2, 0.8], ["a", "a"])


# --- fairness -------------------------------------------------------------------------------

# group 0: y 0 0 1 1, pred 0 1 1 0 -> FPR 1/2 TPR 1/2 PR 1/2 ACC 1/2, AUC 3/4
# group 1: y 0 0 0 1 1, pred 0 0 0 1 1 -> FPR 0 TPR 1 PR 2/5 ACC 1, AUC 1
# group 2: y 1 1 1 (no reals), pred 1 0 0 -> FPR nan TPR 1/3 PR 1/3 ACC 1/3, AUC nan
# group -1: two reals predicted fake, ignored
FAIR_Y = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
FAIR_P = [0.2, 0.6, 0.7, 0.4, 0.1, 0.2, 0.3, 0.8, 0.9, 0.9, 0.3, 0.2, 0.9, 0.9]
FAIR_G = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, -1, -1]


def test_group_rates_hand_case():
    r = group_rates(FAIR_Y, FAIR_P, FAIR_G)
    expected = pd.DataFrame(
        {
            "n": [4, 5, 3], "n_pos": [2, 2, 3], "n_neg": [2, 3, 0],
            "tpr": [1 / 2, 1, 1 / 3], "fpr": [1 / 2, 0, nan], "tnr": [1 / 2, 1, nan], "fnr": [1 / 2, 0, 2 / 3],
            "pr": [1 / 2, 2 / 5, 1 / 3], "nr": [1 / 2, 3 / 5, 2 / 3], "acc": [1 / 2, 1, 1 / 3], "auc": [3 / 4, 1, nan],
        },
        index=pd.Index([0, 1, 2], name="group"),
    )
    pd.testing.assert_frame_equal(r, expected, check_dtype=False)


def test_fairness_metrics_hand_case():
    m = fairness_metrics(FAIR_Y, FAIR_P, FAIR_G)
    fpr_all, tpr_all = 1 / 5, 4 / 7  # known-group rows: 1 FP of 5 reals, 4 TP of 7 fakes
    dev_fpr = abs(1 / 2 - fpr_all) + abs(0 - fpr_all)  # group 2 has no FPR: left out
    dev_tpr = abs(1 / 2 - tpr_all) + abs(1 - tpr_all) + abs(1 / 3 - tpr_all)
    assert m["f_fpr"] == pytest.approx(100 * dev_fpr) == pytest.approx(50.0)
    assert m["f_eo"] == pytest.approx(100 * (dev_fpr + dev_tpr))
    assert m["f_meo"] == pytest.approx(100 * max(1 / 2 - 0, 1 / 2 - 0, 1 - 1 / 2, 1 - 1 / 3))
    assert m["f_dp"] == pytest.approx(100 * max(1 / 2 - 1 / 3, 2 / 3 - 1 / 2))
    assert m["f_oae"] == pytest.approx(100 * (1 - 1 / 3))
    assert all(type(v) is float for v in m.values())


def test_fairness_needs_two_groups():
    y, p, g = [0, 1, 0, 1], [0.2, 0.7, 0.6, 0.9], [3, 3, -1, -1]
    m = fairness_metrics(y, p, g)
    assert all(math.isnan(v) for v in m.values())
    assert all(math.isnan(v) for v in fairness_metrics(y, p, [-1] * 4).values())  # no known group
    assert len(group_rates(y, p, [-1] * 4)) == 0
    m = fairness_metrics([0, 1, 1, 1], [0.6, 0.7, 0.2, 0.9], [0, 0, 1, 1])  # FPR only in group 0
    assert math.isnan(m["f_fpr"]) and math.isnan(m["f_eo"])
    assert m["f_meo"] == pytest.approx(100 * (1 - 1 / 2))  # TPR/FNR range still defined
    assert m["f_oae"] == pytest.approx(100 * (1 / 2 - 1 / 2))


def test_subgroup_table():
    t = subgroup_table(FAIR_Y, FAIR_P, FAIR_G)
    assert list(t.columns) == ["code", "subgroup", "n", "auc", "fpr", "tpr", "acc"]
    assert t["code"].tolist() == [0, 1, 2]
    assert t["subgroup"].tolist() == ["male-asian", "male-white", "male-black"]
    assert t["n"].tolist() == [4, 5, 3]
    assert t["auc"].iloc[0] == pytest.approx(0.75) and math.isnan(t["fpr"].iloc[2])
    assert subgroup_table([0, 1], [0.1, 0.9], [9, 9])["subgroup"].tolist() == ["9"]


# --- calibration ----------------------------------------------------------------------------

def test_calibration_hand_case():
    y = [0, 1, 1, 1, 1]
    p = [0.1, 0.1, 0.5, 0.5, 0.9]  # bins 1, 1, 7, 7, 13 of 15
    m = calibration_metrics(y, p)
    gaps = {1: abs(0.5 - 0.1), 7: abs(1 - 0.5), 13: abs(1 - 0.9)}
    assert m["ece"] == pytest.approx((2 * gaps[1] + 2 * gaps[7] + 1 * gaps[13]) / 5) == pytest.approx(0.38)
    assert m["mce"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx((0.01 + 0.81 + 0.25 + 0.25 + 0.01) / 5)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.5) + math.log(0.9)) / 5)
    bins = reliability_bins(y, p)
    assert len(bins) == 15 and bins["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0]
    assert bins.loc[1, "mean_p"] == pytest.approx(0.1) and bins.loc[1, "frac_pos"] == pytest.approx(0.5)
    assert math.isnan(bins.loc[0, "gap"])


def test_calibration_edges_and_clipping():
    bins = reliability_bins([0, 1], [0.0, 1.0])
    assert bins["count"].iloc[0] == 1 and bins["count"].iloc[-1] == 1
    m = calibration_metrics([1, 0], [0.0, 1.0])  # confidently wrong: p clipped to 1e-7
    assert m["nll"] == pytest.approx(-math.log(1e-7))
    assert m["ece"] == pytest.approx(1.0) and m["brier"] == pytest.approx(1.0)


def test_ece_zero_when_perfectly_calibrated():
    p = [0.25] * 4 + [0.5] * 2 + [0.75] * 4
    y = [1, 0, 0, 0] + [1, 0] + [1, 1, 1, 0]
    m = calibration_metrics(y, p)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["mce"] == pytest.approx(0.0, abs=1e-12)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 20000)
    y = (rng.random(z.size) < sigmoid(z)).astype(int)
    t_true = 2.5
    assert fit_temperature(z * t_true, y) == pytest.approx(t_true, abs=0.15)
    t_ece = fit_temperature(z * t_true, y, objective="ece")
    assert 0.1 <= t_ece <= 10 and t_ece == pytest.approx(t_true, abs=0.5)
    assert fit_temperature(z * 50.0, y) == pytest.approx(10.0)  # bounded above
    assert fit_temperature(z * 0.01, y) == pytest.approx(0.1)  # bounded below


# --- all_metrics and validation -------------------------------------------------------------

def test_all_metrics_flat_and_json():
    rng = np.random.default_rng(3)
    score = rng.normal(size=60)
    y = (score + rng.normal(size=60) > 0).astype(int)
    groups = rng.integers(-1, 3, 60)
    identity = [f"v{i // 3}" if y[i] else f"r{i // 3}" for i in range(60)]
    m = all_metrics(y, score, groups=groups, identity=identity)
    for key in ("auc", "ap", "eer", "acc", "f1", "f_fpr", "f_eo", "f_meo", "f_dp", "f_oae",
                "ece", "mce", "brier", "nll", "video_auc"):
        assert isinstance(m[key], float), key
    p = sigmoid(score)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["f_oae"] == pytest.approx(fairness_metrics(y, p, groups)["f_oae"])
    json.loads(json.dumps(m))
    plain = all_metrics(y, score)
    assert "f_fpr" not in plain and "video_auc" not in plain
    assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: detection_metrics([0, 1, 1], [0.1, 0.2]), "differ in length"),
        (lambda: detection_metrics([0, 2], [0.1, 0.2]), "labels must be 0 or 1"),
        (lambda: detection_metrics([0, 1], [0.1, 1.2]), r"in \[0, 1\]"),
        (lambda: detection_metrics([0, 1], [0.1, nan]), r"in \[0, 1\]"),
        (lambda: detection_metrics([], []), "empty"),
        (lambda: eer([[0, 1]], [[0.1, 0.2]]), "1-D"),
        (lambda: fairness_metrics([0, 1], [0.1, 0.2], [0]), "one code per sample"),
        (lambda: group_rates([0, 1], [0.1, 0.2], [0, 0.5]), "integer"),
        (lambda: calibration_metrics([0, 1], [0.1, 0.2], n_bins=0), "n_bins"),
        (lambda: fit_temperature([0.1, 0.2], [0, 1], objective="mse"), "objective"),
        (lambda: fit_temperature([0.1, nan], [0, 1]), "finite"),
        (lambda: fit_temperature([0.1], [0, 1]), "differ in length"),
        (lambda: all_metrics([0, 1], [0.1, np.inf]), "finite"),
        (lambda: video_auc([0, 1], [0.1, 0.2], ["a"]), "one entry per sample"),
    ],
)
def test_input_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- ASVspoof EER, degenerate detectors, remarks (issues 15 and 19) ------------------------------

def _asvspoof_brute_force(y, p):
    """The nearest-point rule by explicit loops: reject the k lowest bona fide scores (-p),
    bona fide first among ties; mean of FRR and FAR at the first k nearest to FRR = FAR."""
    rows = sorted(range(len(y)), key=lambda i: (-p[i], y[i]))
    n_real, n_fake = sum(1 for v in y if v == 0), sum(1 for v in y if v == 1)
    best, best_gap = None, None
    for k in range(len(y) + 1):
        rejected = rows[:k]
        frr = sum(1 for i in rejected if y[i] == 0) / n_real
        far = sum(1 for i in range(len(y)) if y[i] == 1 and i not in rejected) / n_fake
        if best_gap is None or abs(frr - far) < best_gap:
            best, best_gap = (frr + far) / 2, abs(frr - far)
    return best


def test_eer_asvspoof_known_answers():
    from featcache.metrics import eer_asvspoof

    assert eer_asvspoof([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert eer_asvspoof([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # inverted
    # 3 reals, 2 fakes, one real above a fake: k=0 (0, 1); k=1 flags 0.9 fake (0, 1/2); k=2 flags the
    # 0.6 real (1/3, 1/2); k=3 flags the 0.5 fake (1/3, 0) -> nearest |FRR - FAR| = 1/6 at k=2: EER 5/12
    assert eer_asvspoof([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9]) == pytest.approx(5 / 12)
    # the interpolated EER of the same case lies between the two points of the crossing
    assert eer([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9]) == pytest.approx(1 / 3)
    # a tie of one real and one fake at 0.5: after the 0.9 fake (0, 1/2) the tied real is rejected first
    # -> (1/2, 1/2): EER 1/2, where the interpolated EER crosses at 1/4 (test_eer_known_cases)
    assert eer_asvspoof([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.5)
    # a constant score: the tied real is rejected first -> (1, 1): ASVspoof says 1, the interpolation 1/2
    assert eer_asvspoof([0, 1], [0.5, 0.5]) == 1.0 and eer([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(eer_asvspoof([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(6))
def test_eer_asvspoof_matches_brute_force(seed):
    from featcache.metrics import eer_asvspoof

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.round(rng.random(n), 1 if seed % 2 else 6)  # odd seeds: many ties
    assert eer_asvspoof(y, p) == pytest.approx(_asvspoof_brute_force(y.tolist(), p.tolist()), abs=1e-12)
    # ASVspoof's nearest point and the interpolated crossing differ by at most 1/4 of a step without ties
    if seed % 2 == 0:
        assert abs(eer_asvspoof(y, p) - eer(y, p)) <= 0.25 / min((y == 0).sum(), (y == 1).sum()) + 1e-12


def test_degenerate_detector_is_flagged_not_fair():
    from featcache.metrics import is_degenerate

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 80)
    groups = rng.integers(0, 4, 80)
    score = rng.normal(3.0, 0.5, 80)  # every p > 0.5: "fake" for every sample
    m = all_metrics(y, score, groups=groups)
    assert m["degenerate"] is True and is_degenerate(sigmoid(score))
    assert m["f_fpr"] == 0.0 and m["f_dp"] == 0.0  # "perfectly fair" by construction ...
    assert any("degenerate" in r and "predicted fake" in r and "f_fpr" in r for r in m["remarks"])  # ... said so
    m = all_metrics(y, -score, groups=groups)
    assert m["degenerate"] is True and any("predicted real" in r for r in m["remarks"])
    ok = all_metrics(y, rng.normal(size=80) + 2 * y, groups=groups)
    assert ok["degenerate"] is False and ok["one_sided"] is False and ok["remarks"] == []
    json.loads(json.dumps(m))


@pytest.mark.parametrize("seed", range(6))
def test_one_sided_detector_is_flagged_as_a_brute_force_count_says(seed):
    """Scores shrunk below the threshold (what CVaR did to the demo's Stage 2: AUC 0.85, acc 0.52):
    flagged when fewer than 1/4 of the fakes' share is predicted fake (or the same for real)."""
    from featcache.metrics import is_one_sided

    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 200))
    y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    y[:2] = [0, 1]
    score = rng.normal(size=n) + 1.5 * y + rng.uniform(-4.0, 4.0)  # a shift moves the decisions to one side
    predicted = sum(1 for s in score if 1 / (1 + math.exp(-s)) >= 0.5)
    fakes = int(y.sum())
    want = 0 < predicted < n and (predicted < 0.25 * fakes or (n - predicted) < 0.25 * (n - fakes))
    m = all_metrics(y, score, groups=rng.integers(0, 4, n))
    assert m["one_sided"] is want and is_one_sided(y, sigmoid(score)) is want
    assert any(r.startswith("one-sided detector") and f"{predicted} of {n} samples" in r and "f_fpr" in r
               for r in m["remarks"]) is want


def test_one_sided_cases_at_their_bounds():
    from featcache.metrics import is_one_sided

    y = np.array([0] * 50 + [1] * 50)
    p = np.zeros(100)
    p[:12] = 1.0  # 12 % predicted fake, 50 % are: under a quarter (12.5 %)
    assert is_one_sided(y, p) and not is_one_sided(y, p, ratio=0.2)
    p[12] = 1.0  # 13 %: over it
    assert not is_one_sided(y, p)
    assert not is_one_sided(y, np.zeros(100)) and not is_one_sided(y, np.ones(100))  # degenerate, not one-sided
    assert is_one_sided(y, 1.0 - np.r_[np.zeros(12), np.ones(88)])  # the same for real


def test_remarks_say_why_a_metric_is_nan():
    y = [0, 1, 0, 1, 0, 1]
    score = [-1.0, 1.0, 0.5, -0.5, -2.0, 2.0]
    m = all_metrics(y, score, groups=[-1] * 6)
    assert math.isnan(m["f_fpr"]) and any("0 subgroup(s) with known gender and race" in r for r in m["remarks"])
    m = all_metrics([1, 1, 1], [1.0, -1.0, 2.0])
    assert any("one class" in r for r in m["remarks"])


def test_coco_group_without_detections_is_zero_like_pycocotools():
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from featcache.metrics.coco import coco_ap_ar, coco_ground_truth

    sizes = np.array([[100, 100], [100, 100], [100, 100]])
    gt = coco_ground_truth(sizes, [np.array([[0.5, 0.5, 0.4, 0.4]])] * 3, [np.array([1])] * 3)
    dets = [{"image_id": 1, "category_id": 1, "bbox": [30.0, 30.0, 40.0, 40.0], "score": 0.9}]  # image 1 only
    ours = coco_ap_ar(gt, dets, image_ids=[2, 3])  # ground truth, no detection
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        ev.params.imgIds = [2, 3]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == 0.0 and ev.stats[8] == 0.0  # pycocotools: every box missed
    assert ours == {"ap": 0.0, "ap50": 0.0, "ar": 0.0}
    assert coco_ap_ar(gt, dets, image_ids=[1])["ap"] == pytest.approx(1.0)
    assert math.isnan(coco_ap_ar(gt, dets, image_ids=[2], cat_ids=[3])["ap"])  # no ground truth of category 3
    assert math.isnan(coco_ap_ar({**gt, "annotations": []}, dets)["ar"])
