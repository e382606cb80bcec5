"""Detection fairness: synthetic set, adapters, DETR query cache, FAAP losses and head, COCO AP per gender."""

import hashlib
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ragged, run_cli


def _tree_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    from featcache.data.synth_detection import synth_detection

    root = tmp_path_factory.mktemp("det")
    synth_detection(root / "a", n=24, seed=3, progress=False)
    return root / "a"


@pytest.fixture(scope="module")
def det_cache(det_data, tmp_path_factory):
    from featcache.extract import extract

    out = tmp_path_factory.mktemp("detcache") / "c"
    extract("detr", det_data / "manifest.csv", out, model="tiny", batch_size=5, part_rows=8, num_workers=0,
            progress=False)
    return out


# -- synthetic data and adapters ---------------------------------------------------------------
def test_synth_detection_layout_and_same_seed_same_bytes(det_data, tmp_path):
    from featcache.data.synth_detection import synth_detection

    synth_detection(tmp_path / "b", n=24, seed=3, progress=False)
    assert _tree_hashes(det_data) == _tree_hashes(tmp_path / "b")
    synth_detection(tmp_path / "c", n=24, seed=4, progress=False)
    assert _tree_hashes(det_data) != _tree_hashes(tmp_path / "c")
    for g in ("women", "men"):
        for s in ("train", "val", "test"):
            data = json.loads((det_data / f"{g}_split" / f"gender_{g}_{s}.json").read_text())
            assert data["images"], (g, s)
            for im in data["images"]:
                assert (det_data / f"{g}_split" / s / im["file_name"]).is_file()
            # every image has exactly one person
            people = pd.Series([a["image_id"] for a in data["annotations"] if a["category_id"] == 1])
            assert sorted(people) == sorted(im["id"] for im in data["images"])
    man = pd.read_csv(det_data / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(man) == 24 and set(man["gender"]) == {"male", "female"}
    assert man["annotations"].str.match(r"^(women|men)_split/gender_(women|men)_(train|val|test)\.json$").all()
    assert ((man["gender"] == "female") == man["path"].str.startswith("women_split")).all()


def _coco_layout(root, n=4):
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, anns = [], []
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 40, 10, 10)).save(root / "val2017" / f"{i + 100:012d}.jpg")
        images.append({"id": i + 100, "file_name": f"{i + 100:012d}.jpg", "width": 40, "height": 30})
        anns.append({"id": i + 1, "image_id": i + 100, "category_id": 1, "bbox": [2, 3, 10, 20], "area": 200,
                     "iscrowd": 0})
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))


def test_coco_gender_adapter(tmp_path):
    from featcache.data.adapters import build_manifest
    from featcache.errors import ManifestError

    _coco_layout(tmp_path / "coco")
    pd.DataFrame({"image_id": [100, 101, 103], "gender": ["man", "Woman", "female"]}).to_csv(tmp_path / "g.csv", index=False)
    m = build_manifest("coco-gender", tmp_path / "coco", tmp_path / "m.csv", annotations=tmp_path / "g.csv")
    df = m.df
    assert df["image_id"].tolist() == ["100", "101", "103"]
    assert df["gender"].tolist() == ["male", "female", "female"]
    assert set(df["split"]) == {"val"}
    assert (df["annotations"] == "coco/annotations/instances_val2017.json").all()
    pd.DataFrame({"image_id": [100, 999], "gender": ["man", "man"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ManifestError, match="999"):
        build_manifest("coco-gender", tmp_path / "coco", tmp_path / "m2.csv", annotations=tmp_path / "bad.csv")
    proc = run_cli("manifest", "faap-coco", tmp_path / "coco", "-o", tmp_path / "m3.csv", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "FAAP layout" in proc.stderr


# -- the DETR query cache ----------------------------------------------------------------------
def test_detr_cache_rescoring_is_exact_and_ground_truth_matches(det_cache, det_data):
    from featcache.cache import open_cache, verify_cache
    from featcache.extract.detr import build_heads, read_heads, score_queries

    assert verify_cache(det_cache).ok
    c = open_cache(det_cache)
    assert c.kind == "queries" and c.dim == 64
    hidden = c.load_rows("hidden")
    assert hidden.dtype == np.float16 and hidden.shape == (24, 20, 64)
    cls, box = build_heads(read_heads(det_cache))
    # all 24 images at once, while extraction scored batches of 5: the same bits
    logits, boxes = score_queries(hidden, cls, box)
    assert np.array_equal(logits, c.load_rows("logits")) and np.array_equal(boxes, c.load_rows("boxes"))
    assert logits.shape == (24, 20, 92)
    # and one image alone
    lg1, bx1 = score_queries(hidden[7:8], cls, box)
    assert np.array_equal(lg1, c.load_rows("logits")[7:8]) and np.array_equal(bx1, c.load_rows("boxes")[7:8])
    # the cached heads are the model's own (a seeded rebuild of the tiny DETR)
    from featcache.extract.detr import load_detr

    net, _, _ = load_detr("tiny", seed=0)
    assert torch.equal(net.class_labels_classifier.weight, cls.weight)
    # ground truth: the COCO JSON's boxes, relative cx cy w h
    meta = c.meta()
    gt_boxes, gt_classes = ragged(c.path, "gt_boxes"), ragged(c.path, "gt_classes")
    sizes = c.load_rows("image_size")
    for i in (0, 13, 23):
        data = json.loads((det_data / meta["annotations"][i]).read_text())
        anns = [a for a in data["annotations"] if a["image_id"] == int(meta["image_id"][i])]
        assert gt_classes[i].tolist() == [a["category_id"] for a in anns]
        x, y, w, h = np.array([a["bbox"] for a in anns]).T
        want = np.stack([(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64], 1)
        np.testing.assert_allclose(gt_boxes[i], want, rtol=1e-6)
        assert sizes[i].tolist() == [64, 64]


def test_ground_truth_equals_pycocotools_annotations(det_cache, det_data):
    """Every cached image's boxes and classes equal pycocotools' annotations of it, converted here by hand."""
    from pycocotools.coco import COCO

    from featcache.cache import open_cache

    c = open_cache(det_cache)
    meta, sizes = c.meta(), c.load_rows("image_size")
    gt_boxes, gt_classes = ragged(c.path, "gt_boxes"), ragged(c.path, "gt_classes")
    cocos = {f: COCO(str(det_data / f)) for f in set(meta["annotations"])}
    for i in range(c.rows):
        coco = cocos[meta["annotations"][i]]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=int(meta["image_id"][i]))) if not a["iscrowd"]]
        h, w = sizes[i]
        want = np.array([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in
                         (a["bbox"] for a in anns)], dtype=np.float64).reshape(-1, 4)
        assert gt_classes[i].tolist() == [a["category_id"] for a in anns]
        np.testing.assert_allclose(gt_boxes[i], want, rtol=1e-6, atol=1e-7)


def test_padded_ground_truth_reads_the_ragged_arrays_in_one_pass(det_cache):
    from featcache.cache import open_cache
    from featcache.extract.detr import padded_ground_truth

    c = open_cache(det_cache)
    boxes, classes = padded_ground_truth(c)
    ragged_b, ragged_c = ragged(c.path, "gt_boxes"), ragged(c.path, "gt_classes")
    assert boxes.shape == (c.rows, max(len(x) for x in ragged_c), 4) and c.n_parts > 1
    for i in range(c.rows):
        n = len(ragged_c[i])
        assert np.array_equal(classes[i, :n], ragged_c[i]) and (classes[i, n:] == -1).all()
        assert np.array_equal(boxes[i, :n], ragged_b[i]) and not boxes[i, n:].any()


def test_detection_images_leave_crowds_out_and_scale_by_width_and_height(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    from featcache.data.detection_images import DetectionImages

    Image.new("RGB", (80, 40)).save(tmp_path / "a.png")  # width 80, height 40
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [8, 4, 16, 20], "area": 320, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 80, 40], "area": 3200, "iscrowd": 1},
            {"id": 3, "image_id": 8, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 37, "bbox": [40, 10, 40, 30], "area": 1200, "iscrowd": 0}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": 7, "width": 80, "height": 40}], "annotations": anns,
                                                   "categories": [{"id": k} for k in (1, 3, 37)]}))
    meta = pd.DataFrame({"path": ["a.png"], "annotations": ["ann.json"], "image_id": ["7"]})
    _, (_, size, boxes, classes), err = DetectionImages([str(tmp_path / "a.png")], meta)[0]
    assert err == "" and size.tolist() == [40, 80]
    coco = COCO(str(tmp_path / "ann.json"))
    kept = coco.loadAnns(coco.getAnnIds(imgIds=7, iscrowd=False))
    assert classes.tolist() == [a["category_id"] for a in kept] == [3, 37]
    np.testing.assert_allclose(boxes, [[16 / 80, 14 / 40, 16 / 80, 20 / 40], [60 / 80, 25 / 40, 40 / 80, 30 / 40]],
                               rtol=1e-6)


# -- FAAP losses against brute force --------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(2, 0), (3, 0), (4, 2), (5, 2), (6, 2), (7, 2), (10, 4), (11, 4), (64, 25)])
def test_ranking_split_sizes(n, k):
    from featcache.losses.faap import ranking_split

    scores = torch.randperm(n).float()
    pos, anc = ranking_split(scores, 0.4, 2)
    assert len(pos) == len(anc) == k
    if k:
        assert set(pos.tolist()).isdisjoint(anc.tolist())
        assert scores[pos].min() > scores[anc].max()
        assert sorted(scores[pos].tolist()) == sorted(scores.tolist())[-k:]


def test_score_contrastive_matches_brute_force():
    from featcache.losses.faap import score_contrastive

    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    pos, anc, tau = torch.tensor([4, 1, 7]), torch.tensor([0, 8, 2]), 0.1
    members = [4, 1, 7, 0, 8, 2]

    def nce(i, p):
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in members if j != i)
        return -math.log(math.exp(float(z[i] @ z[p]) / tau) / denom)

    one_way = np.mean([nce(a, p) for a in anc.tolist() for p in pos.tolist()])
    assert float(score_contrastive(z, pos, anc, tau)) == pytest.approx(one_way, rel=1e-10)
    both = one_way + 0.3 * np.mean([nce(p, q) for p in pos.tolist() for q in pos.tolist() if p != q])
    assert float(score_contrastive(z, pos, anc, tau, 0.3)) == pytest.approx(both, rel=1e-10)


def test_wasserstein_matches_scipy_and_brute_force():
    from scipy.stats import wasserstein_distance

    from featcache.losses.faap import one_way_wasserstein, wasserstein_1d

    rng = np.random.default_rng(1)
    for n, m in ((5, 5), (4, 7), (9, 6)):
        f, ma = rng.uniform(0, 0.8, n), rng.uniform(0.2, 1.0, m)
        assert float(wasserstein_1d(torch.tensor(f), torch.tensor(ma))) == pytest.approx(wasserstein_distance(f, ma), rel=1e-9)
        # one way: integral over t of max(0, Q_male(t) - Q_female(t)), integrated on a fine grid of steps
        t = (np.arange(n * m * 50) + 0.5) / (n * m * 50)
        qm = np.sort(ma)[np.minimum((t * m).astype(int), m - 1)]
        qf = np.sort(f)[np.minimum((t * n).astype(int), n - 1)]
        brute = np.maximum(qm - qf, 0).mean()
        ff = torch.tensor(f, requires_grad=True)
        loss = one_way_wasserstein(ff, torch.tensor(ma))
        assert float(loss.detach()) == pytest.approx(brute, rel=1e-9)
        loss.backward()
        assert (ff.grad <= 0).all()  # raising a female score never increases the loss


def test_detection_criterion_matches_brute_force_assignment():
    from torchvision.ops import generalized_box_iou

    from featcache.losses.faap import DetectionCriterion

    g = torch.Generator().manual_seed(2)
    q, c = 5, 4  # 5 queries, classes 0..3 plus no-object 4
    logits = torch.randn(1, q, c + 1, generator=g, dtype=torch.float64)
    boxes = torch.rand(1, q, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.rand(1, q, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1], -1)
    tgt_boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.25, 0.2], [0.5, 0.5, 0.1, 0.1]], dtype=torch.float64)
    tgt_cls = torch.tensor([1, 3, 1])
    crit = DetectionCriterion(num_classes=c).double()
    total, terms = crit(logits, boxes, [{"class_labels": tgt_cls, "boxes": tgt_boxes}])

    def xyxy(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)

    prob = logits[0].softmax(-1)
    giou = generalized_box_iou(xyxy(boxes[0]), xyxy(tgt_boxes))
    cost = lambda qi, ti: (5 * (boxes[0, qi] - tgt_boxes[ti]).abs().sum() - prob[qi, tgt_cls[ti]]  # noqa: E731
                           - 2 * giou[qi, ti])
    best = min(itertools.permutations(range(q), 3), key=lambda perm: sum(float(cost(p, t)) for t, p in enumerate(perm)))
    target = torch.full((q,), c)
    for t, p in enumerate(best):
        target[p] = tgt_cls[t]
    weight = torch.ones(c + 1, dtype=torch.float64)
    weight[-1] = 0.1
    ce = torch.nn.functional.cross_entropy(logits[0], target, weight)
    l1 = sum((boxes[0, p] - tgt_boxes[t]).abs().sum() for t, p in enumerate(best)) / 3
    lg = sum(1 - giou[p, t] for t, p in enumerate(best)) / 3
    assert float(terms["loss_ce"]) == pytest.approx(float(ce), rel=1e-9)
    assert float(terms["loss_bbox"]) == pytest.approx(float(l1), rel=1e-9)
    assert float(terms["loss_giou"]) == pytest.approx(float(lg), rel=1e-9)
    assert float(total) == pytest.approx(float(ce + 5 * l1 + 2 * lg), rel=1e-9)


# -- COCO AP per gender ----------------------------------------------------------------------------
def test_per_gender_ap_equals_pycocotools(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from featcache.metrics.coco import coco_ground_truth, detr_detections, group_ap_ar

    sizes = np.array([[100, 200], [80, 80], [120, 60], [100, 100]])
    gt_boxes = [np.array([[0.5, 0.5, 0.2, 0.4]]), np.array([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
                np.array([[0.5, 0.4, 0.5, 0.5]]), np.array([[0.2, 0.2, 0.1, 0.1]])]
    gt_classes = [np.array([1]), np.array([1, 3]), np.array([1]), np.array([3])]
    gender = np.array([0, 1, 0, 1])
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (4, 6, 92))
    logits[:, :, 1] += rng.uniform(0, 4, (4, 6))
    boxes = np.clip(rng.normal(0.45, 0.15, (4, 6, 4)), 0.05, 0.9)
    for i, (b, cl) in enumerate(zip(gt_boxes, gt_classes)):  # a few good detections
        boxes[i, : len(b)] = b + rng.normal(0, 0.02, b.shape)
        logits[i, np.arange(len(b)), cl] += 6
    gt = coco_ground_truth(sizes, gt_boxes, gt_classes)
    dets = detr_detections(logits, boxes, sizes)
    ours = group_ap_ar(gt, dets, gender, {0: "male", 1: "female"})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        res = coco.loadRes(dets)
        for code, name in ((0, "male"), (1, "female")):
            ev = COCOeval(coco, res, "bbox")
            ev.params.imgIds = [i + 1 for i in np.flatnonzero(gender == code)]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ours[f"ap_{name}"] == pytest.approx(ev.stats[0], abs=1e-12)
            assert ours[f"ar_{name}"] == pytest.approx(ev.stats[8], abs=1e-12)
    assert 0 < ours["ap_male"] <= 1 and 0 < ours["ap_female"] <= 1
    person = group_ap_ar(gt, dets, gender, {0: "male", 1: "female"}, cat_ids=[1])
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, res, "bbox")
        ev.params.imgIds, ev.params.catIds = [2, 4], [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert person["ap_female"] == pytest.approx(ev.stats[0], abs=1e-12) and person["ap_female"] != ours["ap_female"]


def _random_detections(seed, n=12, q=3):
    """A small COCO problem: 0-2 boxes per image (person or car), DETR-like outputs near them."""
    from featcache.metrics.coco import coco_ground_truth, detr_detections

    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 120, (n, 2))
    gtb = [np.clip(rng.uniform(0.2, 0.8, (k, 4)) * [1, 1, 0.4, 0.4], 0.05, 0.9) for k in rng.integers(0, 3, n)]
    gtc = [np.where(rng.random(len(b)) < 0.7, 1, 3) for b in gtb]
    logits = rng.normal(0, 1, (n, q, 92))
    logits[:, :, 1] += rng.uniform(0, 3, (n, q))
    boxes = np.clip(rng.normal(0.45, 0.15, (n, q, 4)), 0.05, 0.9)
    for i, b in enumerate(gtb):
        k = min(len(b), q)
        boxes[i, :k] = b[:k] + rng.normal(0, 0.01, b[:k].shape)
        logits[i, np.arange(k), gtc[i][:k]] += rng.uniform(0, 6, k)
    return coco_ground_truth(sizes, gtb, gtc), detr_detections(logits, boxes, sizes), rng


def _repeated(gt, dets, counts):
    """The data set with image i repeated counts[i] times (new ids): what a bootstrap resample is."""
    images, anns, out = [], [], []
    for i, im in enumerate(gt["images"]):
        for _ in range(int(counts[i])):
            new = len(images) + 1
            images.append({**im, "id": new})
            anns += [{**a, "image_id": new, "id": len(anns) + j + 1}
                     for j, a in enumerate(a for a in gt["annotations"] if a["image_id"] == im["id"])]
            out += [{**d, "image_id": new} for d in dets if d["image_id"] == im["id"]]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


@pytest.mark.parametrize("cats", [None, [1]])
def test_weighted_ap_equals_pycocotools_on_the_resampled_images(cats):
    """A bootstrap resample's AP/AR from one matching equals pycocotools run on the images repeated as drawn."""
    from featcache.metrics.coco import coco_ap_ar, image_matches, weighted_ap_ar

    gt, dets, rng = _random_detections(0)
    m = image_matches(gt, dets, cats)
    ap, ar = weighted_ap_ar(m, np.ones(12))
    ref = coco_ap_ar(gt, dets, cat_ids=cats)
    assert ap[0] == pytest.approx(ref["ap"], abs=1e-12) and ar[0] == pytest.approx(ref["ar"], abs=1e-12)
    assert 0.1 < ref["ap"] < 0.9  # a case with hits and misses, not a trivial 0 or 1
    draws = rng.multinomial(12, np.full(12, 1 / 12), size=4)
    draws[3] = 0
    draws[3, :5] = 1  # a subset: the groups' AP is this with 0/1 weights
    ap, ar = weighted_ap_ar(m, draws)
    for b in range(4):
        ref = coco_ap_ar(*_repeated(gt, dets, draws[b]), cat_ids=cats)
        assert ap[b] == pytest.approx(ref["ap"], abs=1e-12) and ar[b] == pytest.approx(ref["ar"], abs=1e-12)
    sub = coco_ap_ar(gt, dets, image_ids=[1, 2, 3, 4, 5], cat_ids=cats)
    assert ap[3] == pytest.approx(sub["ap"], abs=1e-12)


def test_bootstrap_group_ap_without_detections_and_paired_resamples():
    from featcache.metrics.coco import bootstrap_group_ap_ar, image_matches, weighted_ap_ar

    gt, dets, _ = _random_detections(1)
    ap, ar = weighted_ap_ar(image_matches(gt, [], [1]), np.ones((2, 12)))
    assert ap.tolist() == [0.0, 0.0] and ar.tolist() == [0.0, 0.0]  # every box missed, as coco_ap_ar says
    groups = np.arange(12) % 2
    m = image_matches(gt, dets, [1])
    a = bootstrap_group_ap_ar(m, groups, {0: "male", 1: "female"}, n_boot=50, seed=3)
    b = bootstrap_group_ap_ar(m, groups, {0: "male", 1: "female"}, n_boot=50, seed=3)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a) and a["ap_male"].shape == (50,)
    # each group's resample draws only its own images, as many as it has: the same draws by hand
    rng = np.random.default_rng(3)
    w = np.zeros((50, 12))
    w[:, groups == 0] = rng.multinomial(6, np.full(6, 1 / 6), size=50)
    np.testing.assert_array_equal(weighted_ap_ar(m, w)[0], a["ap_male"])


# -- the FAAP head ---------------------------------------------------------------------------------
def test_perturbation_never_exceeds_epsilon():
    from featcache.config import Section
    from featcache.heads.faap import FaapModel, epsilon_at

    m = FaapModel(dim=16, num_logits=5, box_hidden=16, box_layers=3, generator_hidden=32)
    torch.manual_seed(0)
    for p in m.generator.parameters():
        torch.nn.init.normal_(p, std=5.0)  # saturate tanh
    m.scale.copy_(torch.rand(16) + 0.1)
    m.epsilon.fill_(0.07)
    h = torch.randn(8, 6, 16) * 50
    delta = m.perturbation(h)
    assert (delta.abs() <= 0.07 * m.scale).all()
    assert (delta.abs() / (0.07 * m.scale)).max() > 0.99  # the bound is reached, not just respected
    c = Section("loss", {"eps_start": 0.05, "eps_max": 0.10, "eps_end": 0.09, "eps_warmup": 8, "eps_hold": 6,
                         "eps_cool": 16})
    eps = [epsilon_at(e, c) for e in range(1, 31)]
    assert eps[0] == 0.05 and eps[7] == pytest.approx(0.10) and eps[13] == 0.10 and eps[29] == pytest.approx(0.09)
    assert all(a <= b for a, b in zip(eps[:8], eps[1:8])) and all(a >= b for a, b in zip(eps[14:], eps[15:]))


def test_faap_train_and_evaluate_cli(det_cache, tmp_path):
    run = tmp_path / "run"
    run_cli("train-head", "faap", "--cache", det_cache, "--out", run, "--set", "training.epochs=2",
            "--set", "training.batch_size=8", "-q")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for key in ("train_contrastive", "train_wasserstein", "train_detection", "train_n_pos", "train_n_anchor",
                "train_pos_anchor_gap", "train_score_male", "train_score_female", "train_delta_linf",
                "train_delta_l2", "epsilon", "beta", "val_ap_male", "val_gender_score_gap", "val_pos_anchor_gap"):
        assert key in log[0], key
    assert log[0]["epsilon"] == 0.05 and log[1]["epsilon"] == pytest.approx(0.05 + 0.05 / 7)
    proc = run_cli("evaluate", run, "--cache", det_cache)
    m = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert m["delta_linf_over_bound"] <= 1.0
    from featcache.heads.faap import faap_table

    table = faap_table(m).to_dict(orient="records")
    assert [r[""] for r in table] == ["baseline", "perturbed", "delta"]
    assert table[0]["Male AP"] == m["base_ap_male"] and table[1]["Female AR"] == m["ar_female"]
    assert "Male AP" in (run / "eval" / "test" / "report.md").read_text() and "gender_score_gap" in proc.stdout
    # issue 26: gender_score_gap is men's mean image score minus women's; pos_anchor_gap the design's
    # score gap, top 40 % minus bottom 40 % (at least 2 each) in batches of training.batch_size, by hand
    preds = pd.read_csv(run / "eval" / "test" / "predictions.csv", keep_default_na=False)
    for prefix, col in (("base_", "base_score"), ("", "score")):
        sc = preds[col].to_numpy()
        assert m[prefix + "gender_score_gap"] == pytest.approx(
            sc[preds["gender"] == "male"].mean() - sc[preds["gender"] == "female"].mean(), rel=1e-5, abs=1e-7)
        gaps = []
        for i in range(0, len(sc), 8):
            b = np.sort(sc[i:i + 8])[::-1]
            k = min(max(2, int(0.4 * len(b))), len(b) // 2)
            if k >= 2:
                gaps.append(b[:k].mean() - b[len(b) - k:].mean())
        assert m[prefix + "pos_anchor_gap"] == pytest.approx(np.mean(gaps), rel=1e-5, abs=1e-7)
    assert m["gap_closed"] == pytest.approx(m["base_gender_score_gap"] - m["gender_score_gap"])
    # the test split's per-gender AP/AR with 95 % bootstrap intervals, before (base_) and after, and the paired
    # change of the AP gap; val (evaluated every epoch) has none
    from featcache.heads.faap import CI_KEYS

    assert set(m["ci95"]) == {*CI_KEYS, *(f"base_{k}" for k in CI_KEYS), "ap_gap_change"}
    assert all(lo <= hi for lo, hi in m["ci95"].values() if np.isfinite(lo))
    assert m["ap_gap_change"] == pytest.approx(m["ap_gap"] - m["base_ap_gap"])
    assert m["ci95_info"]["n_boot"] == 200 and sum(m["ci95_info"]["images"].values()) == len(preds)
    assert "ci95" not in json.loads((run / "eval" / "val" / "metrics.json").read_text())
    report = (run / "eval" / "test" / "report.md").read_text()
    assert "Change of the AP gap" in report
    # the legend says how these intervals were made, not what the detectors' clustered BCa intervals are
    assert "- [lo, hi]: 95 % percentile bootstrap over images" in report and "identities resampled" not in report
    # the unperturbed baseline is the cache's own outputs: its mean image score matches them
    from featcache.cache import open_cache
    from featcache.losses.faap import image_scores

    c = open_cache(det_cache)
    test = (c.meta(["split"])["split"] == "test").to_numpy()
    want = image_scores(torch.from_numpy(c.load_rows("logits")[test])).mean()
    assert m["base_score"] == pytest.approx(float(want), rel=1e-5)


def test_finetune_detr_learns_and_its_folder_extracts(det_data, tmp_path):
    from featcache.cache import open_cache
    from featcache.e2e.detr_finetune import finetune_detr
    from featcache.extract import extract

    r = finetune_detr(det_data / "manifest.csv", tmp_path / "m", epochs=4, batch_size=8, progress=False)
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["train_loss"] < log[0]["train_loss"] and r.extra["images"] == 14  # train split only
    extract("detr", det_data / "manifest.csv", tmp_path / "c", model=str(tmp_path / "m"), num_workers=0,
            progress=False)
    c = open_cache(tmp_path / "c")
    assert c.backbone["pretrained"] == "local" and c.backbone["model"] == str((tmp_path / "m").resolve())
    assert c.load_rows("hidden").shape == (24, 20, 64)


def test_detr_cache_resumes_identically_records_bad_images_and_exports(det_data, det_cache, tmp_path):
    import shutil

    import h5py
    from conftest import array_hashes

    from featcache.cache import export_h5, open_cache
    from featcache.extract import extract

    # resume: a deleted part is recomputed into the same bytes
    resumed = tmp_path / "resumed"
    shutil.copytree(det_cache, resumed)
    shutil.rmtree(resumed / "parts" / "00001")
    r = extract("detr", det_data / "manifest.csv", resumed, model="tiny", batch_size=5, part_rows=8, num_workers=0,
                progress=False)
    assert r.parts_written == 1 and r.parts_resumed == 2
    assert array_hashes(resumed) == array_hashes(det_cache)
    assert (resumed / "heads.safetensors").read_bytes() == (det_cache / "heads.safetensors").read_bytes()
    # an unreadable image: ok False, recorded, no ground truth rows for it
    data = tmp_path / "data"
    shutil.copytree(det_data, data)
    man = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    (data / man["path"][3]).write_bytes(b"not a png")
    extract("detr", data / "manifest.csv", tmp_path / "bad", model="tiny", part_rows=8, num_workers=0, progress=False)
    c = open_cache(tmp_path / "bad")
    assert c.load_rows("ok").tolist() == [i != 3 for i in range(24)]
    assert [e["sample_id"] for e in c.errors()] == [man["sample_id"][3]]
    assert len(ragged(c.path, "gt_boxes")[3]) == 0 and len(ragged(c.path, "gt_boxes")[4]) > 0
    # export keeps the layout: flat ground truth with global offsets
    export_h5(det_cache, tmp_path / "c.h5", progress=False)
    src = open_cache(det_cache)
    with h5py.File(tmp_path / "c.h5") as h5:
        off = h5["offsets"][...]
        flat = h5["gt_boxes"][...]
        for i in (0, 9, 23):
            np.testing.assert_array_equal(flat[off[i]:off[i + 1]], ragged(src.path, "gt_boxes")[i])
        assert h5["hidden"].shape == (24, 20, 64)


def test_detr_without_network_says_how_to_pass_weights(det_data, tmp_path):
    proc = run_cli("extract", "--backbone", "detr", "--manifest", det_data / "manifest.csv", "--out", tmp_path / "c",
                   check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot load DETR 'facebook/detr-resnet-50'")
    assert "--model PATH" in proc.stderr and "--model tiny" in proc.stderr


def test_detr_refuses_a_manifest_without_ground_truth_and_writes_nothing(tmp_path):
    from conftest import write_image_manifest

    from featcache.errors import FeatcacheError
    from featcache.extract import extract

    manifest = write_image_manifest(tmp_path / "faces", 4)  # images, but no image_id / annotations
    with pytest.raises(FeatcacheError, match="no row of the manifest has both image_id and annotations"):
        extract("detr", manifest, tmp_path / "c", model="tiny", num_workers=0, progress=False)
    assert not (tmp_path / "c").exists()  # refused before the cache was created


def test_tiny_det_preset_and_one_person_images(tmp_path):
    """The demo's detector: `synth detection --others 0` draws exactly one person per image, and the offline
    tiny-det preset caches 2 queries per image from 64 px inputs."""
    from featcache.cache import open_cache
    from featcache.data.synth_detection import synth_detection
    from featcache.extract import extract
    from featcache.extract.detr import load_detr

    r = synth_detection(tmp_path / "d", n=12, seed=0, others=0, progress=False)
    anns = [a for p in (tmp_path / "d").glob("*_split/gender_*.json") for a in json.loads(p.read_text())["annotations"]]
    assert r["annotations"] == len(anns) == 12 and {a["category_id"] for a in anns} == {1}
    net, processor, tag = load_detr("tiny-det", seed=0)
    assert net.config.num_queries == 2 and processor.size == {"height": 64, "width": 64} and tag == "none"
    extract("detr", tmp_path / "d" / "manifest.csv", tmp_path / "c", model="tiny-det", num_workers=0, progress=False)
    c = open_cache(tmp_path / "c")
    assert c.load_rows("hidden").shape == (12, 2, 64) and c.backbone["model"] == "tiny-det"
    from featcache.errors import FeatcacheError

    with pytest.raises(FeatcacheError, match="--others"):
        synth_detection(tmp_path / "e", n=12, others=5, progress=False)


def test_demo_faap_lines_say_what_faap_did_to_the_gap():
    from featcache.demo import faap_lines

    m = {"base_ap": 0.40, "base_ap_male": 0.47, "base_ap_female": 0.32, "base_ap_gap": 0.15, "base_ar_gap": 0.1,
         "ap": 0.41, "ap_male": 0.46, "ap_female": 0.36, "ap_gap": 0.10, "ar_gap": 0.08, "ap_gap_change": -0.05,
         "ci95": {"base_ap_gap": [0.05, 0.25], "ap_gap": [0.0, 0.2], "base_ar_gap": [0.0, 0.2], "ar_gap": [0.0, 0.2],
                  "ap_gap_change": [-0.08, -0.02]},
         "ci95_info": {"images": {"male": 40, "female": 40}}}
    lines = faap_lines(m)
    assert "men 0.470, women 0.320; AP gap (men - women) +0.150 [+0.050, +0.250]" in lines[0]
    assert "AP gap (men - women) +0.100 [+0.000, +0.200]" in lines[1]
    assert "-0.050 [-0.080, -0.020] (paired): FAAP narrowed" in lines[2] and "80 test images" in lines[2]
    assert "widened" in faap_lines({**m, "ci95": {**m["ci95"], "ap_gap_change": [0.01, 0.02]}})[2]
    assert "did not measurably change" in faap_lines({**m, "ci95": {**m["ci95"], "ap_gap_change": [-0.1, 0.02]}})[2]
    assert "finds next to nothing" in faap_lines({**m, "base_ap": 0.01})[2]


def test_detection_demo_branch_end_to_end_at_tiny_sizes(tmp_path):
    """The demo's [8/8]: one-person images, the tiny-det DETR fitted (1 epoch), its cache, FAAP, the lines."""
    from featcache.cache import open_cache
    from featcache.demo import DemoSizes, run_detection_demo

    lines = []
    r = run_detection_demo(tmp_path, sizes=DemoSizes(detection=20, detr_epochs=1, faap_epochs=1), progress=False,
                           echo=lines.append)
    c = open_cache(r["cache"])
    assert c.load_rows("hidden").shape == (20, 2, 64) and c.backbone["pretrained"] == "local"
    assert json.loads((tmp_path / "detr-tiny-det" / "summary.json").read_text())["epochs_run"] == 1
    m = r["test"]
    assert lines[0].startswith("[8/8] detection") and any(line.startswith("      detector  : test person AP ")
                                                          for line in lines)
    assert any(line.startswith("      change of the AP gap ") for line in lines)
    assert m["ci95_info"]["images"] == {"male": 2, "female": 2}
