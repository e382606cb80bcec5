"""The leakage audit (kNN purity, weighted kNN, probe) and the embedding map, against known answers."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featcache.analyze.index import build_index
from featcache.analyze.maps import COLOR_BY, embedding_map, umap_available
from featcache.analyze.subgroups import (
    ATTRIBUTES,
    audit_features,
    audit_subgroups,
    encode_attribute,
    knn_purity,
    weighted_knn_accuracy,
)
from featcache.cache import open_cache
from featcache.data.manifest import GENDERS, RACES
from featcache.errors import FeatcacheError


def brute_force_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Row ids of each row's k most cosine-similar other rows, by numpy."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u.astype(np.float64) @ u.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def race_clusters(n: int, seed: int, dim: int = 16):
    """4 well-separated race clusters; gender drawn independently of the features."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(4, dim)) * 8.0
    race = rng.integers(0, 4, size=n)
    gender = rng.integers(0, 2, size=n)
    x = (centers[race] + rng.normal(size=(n, dim))).astype(np.float32)
    meta = pd.DataFrame({
        "race": np.array(RACES)[race], "gender": np.array(GENDERS)[gender],
        "subgroup": (gender * 4 + race).astype(np.int8), "label": np.full(n, -1, np.int8),
    })
    return x, meta


# -- the measures against brute force ------------------------------------------------------------
def test_knn_purity_matches_brute_force_cosine_neighbours_with_unknown_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    labels = rng.integers(-1, 3, size=60)  # about a quarter unknown (-1)
    index = build_index(x)
    got = knn_purity(index, labels, ks=(3, 7))
    for k in (3, 7):
        nb = brute_force_neighbours(x, k)
        fractions = []
        for i in np.flatnonzero(labels >= 0):
            known = labels[nb[i]][labels[nb[i]] >= 0]  # unknown neighbours leave the denominator
            if len(known):
                fractions.append(np.mean(known == labels[i]))
        assert got[k] == pytest.approx(np.mean(fractions), abs=1e-12)
    # string labels, "" unknown, give the same answer
    names = np.array(["", "a", "b", "c"], dtype=object)[labels + 1]
    assert knn_purity(index, names, ks=(3, 7)) == pytest.approx(got, abs=1e-12)


def test_knn_purity_k_beyond_the_index_uses_every_other_row():
    x = np.eye(4, dtype=np.float32) + 0.01
    labels = np.array([0, 0, 1, 1])
    # each row: 1 of its 3 other rows shares its label
    assert knn_purity(build_index(x), labels, ks=(10,)) == {10: pytest.approx(1 / 3)}


def test_weighted_knn_accuracy_matches_brute_force_vote():
    rng = np.random.default_rng(2)
    xtr, ytr = rng.normal(size=(80, 6)).astype(np.float32), rng.integers(0, 3, size=80)
    xq, yq = rng.normal(size=(30, 6)).astype(np.float32), rng.integers(0, 3, size=30)
    k, t = 9, 0.2
    utr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    uq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    sims = uq.astype(np.float64) @ utr.T.astype(np.float64)
    pred = []
    for s in sims:
        nb = np.argsort(-s)[:k]
        votes = np.bincount(ytr[nb], weights=np.exp(s[nb] / t), minlength=3)
        pred.append(votes.argmax())
    expected = float(np.mean(np.array(pred) == yq))
    assert weighted_knn_accuracy(build_index(xtr), ytr, xq, yq, k=k, temperature=t) == pytest.approx(expected)
    # a tiny temperature is the 1-NN rule
    one_nn = float(np.mean(ytr[sims.argmax(1)] == yq))
    assert weighted_knn_accuracy(build_index(xtr), ytr, xq, yq, k=k, temperature=1e-4) == pytest.approx(one_nn)
    with pytest.raises(FeatcacheError, match="temperature"):
        weighted_knn_accuracy(build_index(xtr), ytr, xq, yq, temperature=0)


def test_encode_attribute_maps_vocabularies_and_unknowns():
    meta = pd.DataFrame({"race": ["white", "", "other"], "gender": ["female", "male", ""],
                         "subgroup": np.array([5, -1, -1], np.int8), "label": np.array([1, 0, -1], np.int8)})
    assert encode_attribute(meta, "race").tolist() == [1, -1, 3]
    assert encode_attribute(meta, "gender").tolist() == [1, 0, -1]
    assert encode_attribute(meta, "subgroup").tolist() == [5, -1, -1]
    assert encode_attribute(meta, "label").tolist() == [1, 0, -1]


# -- the audit on clusters with a known answer ---------------------------------------------------
def test_audit_features_separated_race_leaks_independent_gender_does_not():
    xtr, mtr = race_clusters(800, seed=0)
    xva, mva = race_clusters(400, seed=1)
    table = audit_features(xtr, mtr, xva, mva, ks=(10, 20)).set_index("attribute")
    assert list(table.index) == ["race", "gender", "subgroup"]  # label is all unknown: no row
    race, gender = table.loc["race"], table.loc["gender"]
    assert race["classes"] == 4 and gender["classes"] == 2 and race["uniform"] == 0.25
    # race: every neighbour of a cluster shares its race
    assert race["purity@10"] > 0.99 and race["purity@20"] > 0.99
    assert race["knn_acc"] > 0.99 and race["probe_acc"] > 0.99
    # gender: the features know nothing of it -> purity at the base rate, kNN and probe at chance
    assert gender["purity_chance"] == pytest.approx(0.5, abs=0.01)
    assert abs(gender["purity@10"] - gender["purity_chance"]) < 0.05
    assert abs(gender["purity@20"] - gender["purity_chance"]) < 0.05
    assert abs(gender["knn_acc"] - 0.5) < 0.08
    assert abs(gender["probe_acc"] - 0.5) < 0.08
    assert gender["chance"] == pytest.approx(mva["gender"].value_counts(normalize=True).iloc[0])
    # subgroup = race x gender: neighbours share the race, half of them the gender
    assert abs(table.loc["subgroup", "purity@10"] - 0.5) < 0.06
    # rows with an unknown value are left out, not counted as a class
    mtr2 = mtr.copy()
    mtr2.loc[:99, "race"] = ""
    t2 = audit_features(xtr, mtr2, xva, mva, ks=(10,)).set_index("attribute")
    assert t2.loc["race", "n_train"] == 700 and t2.loc["race", "classes"] == 4 and t2.loc["race", "purity@10"] > 0.99


# -- end to end on a synthetic cache ------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory):
    from featcache.cache.synth import synth_feature_cache

    path = tmp_path_factory.mktemp("synth") / "cache"
    synth_feature_cache(path, rows=1200, dim=32, bias=0.6, part_rows=512)
    return path


def test_audit_subgroups_writes_json_md_png_and_finds_subgroup_leakage(synth_cache, tmp_path):
    out = tmp_path / "audit"
    result = audit_subgroups(synth_cache, out, progress=False)
    for name in ("subgroups.json", "subgroups.md", "subgroups.png"):
        assert (out / name).is_file()
    with Image.open(out / "subgroups.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    saved = json.loads((out / "subgroups.json").read_text())
    assert saved["after"] is None and saved["change"] is None
    assert saved["cache"]["fingerprint"] == result["cache"]["fingerprint"] and len(saved["cache"]["fingerprint"]) == 64
    assert saved["index"]["before"][0]["kind"] == "exact" and saved["index"]["before"][0]["recall_at_k"] is None
    rows = {r["attribute"]: r for r in saved["before"]}
    assert set(rows) == set(ATTRIBUTES)
    sub = rows["subgroup"]
    assert sub["classes"] == 8 and sub["n_train"] == saved["splits"]["n_train"]
    # the synthetic subgroups sit apart: far above chance by every measure
    assert sub["purity@10"] > sub["purity_chance"] + 0.4
    assert sub["knn_acc"] > sub["chance"] + 0.4
    assert sub["probe_acc"] > sub["chance"] + 0.4
    assert rows["race"]["knn_acc"] > rows["race"]["chance"] + 0.15
    md = (out / "subgroups.md").read_text()
    assert "| subgroup | 8 |" in md and "Debiased" not in md


def test_audit_subgroups_before_and_after_a_stage1_adapter(synth_cache, tmp_path):
    from featcache.cache.synth import synth_feature_cache
    from featcache.train import train_head

    run = tmp_path / "stage1"
    # a small adapter without the Sinkhorn terms (grl_only): 2 epochs take about a second
    train_head("stage1", synth_cache, run, preset="grl_only", progress=False,
               sets=["training.epochs=2", "training.batch_size=512", "model.adapter_hidden=64",
                     "model.adversary_hidden=32"])
    out = tmp_path / "audit"
    result = audit_subgroups(synth_cache, out, adapter_run=run, progress=False)
    saved = json.loads((out / "subgroups.json").read_text())
    assert saved["adapter_run"] == str(run.resolve())
    before = pd.DataFrame(saved["before"]).set_index("attribute")
    after = pd.DataFrame(saved["after"]).set_index("attribute")
    change = pd.DataFrame(saved["change"]).set_index("attribute")
    assert list(before.index) == list(after.index) == list(change.index)
    # the adapter moved the features, so the audit after differs, and the change is after - before
    assert not np.allclose(before["purity@10"], after["purity@10"])
    for col in ("purity@10", "purity@50", "knn_acc", "probe_acc"):
        np.testing.assert_allclose(change[col], after[col] - before[col], atol=1e-12)
    assert result["after"] == saved["after"]
    assert "Debiased features" in (out / "subgroups.md").read_text()
    with Image.open(out / "subgroups.png") as im:
        im.verify()
    # the adapter refuses a cache of another backbone (here: another feature size)
    other = tmp_path / "other"
    synth_feature_cache(other, rows=200, dim=16, part_rows=256)
    with pytest.raises(FeatcacheError, match="another backbone"):
        audit_subgroups(other, tmp_path / "x", adapter_run=run, progress=False)
    with pytest.raises(FeatcacheError, match="does not exist"):  # one true line (issue 19 item 12)
        audit_subgroups(synth_cache, tmp_path / "x", adapter_run=tmp_path / "nothing", progress=False)


def test_audit_subgroups_refuses_a_missing_split_and_a_frames_cache(synth_cache, tmp_path):
    with pytest.raises(FeatcacheError, match=r"no rows in split 'dev'.*train \(\d+\)"):
        audit_subgroups(synth_cache, tmp_path, split_val="dev", progress=False)
    frames = frames_cache(tmp_path / "frames")
    with pytest.raises(FeatcacheError, match="pooled cache"):
        audit_subgroups(frames, tmp_path / "x", progress=False)
    with pytest.raises(FeatcacheError, match="pooled cache"):
        embedding_map(frames, tmp_path / "m.png")


def frames_cache(path):
    """A 6-row frames cache (audio-like): not something a map or the audit reads."""
    from featcache.cache import CacheSpec, CacheWriter

    meta = pd.DataFrame({"sample_id": [f"a{i}" for i in range(6)], "path": "", "label": np.zeros(6, np.int8),
                         "split": ["train", "train", "val", "val", "test", "test"]})
    spec = CacheSpec(kind="frames", backbone={"name": "synthetic"}, preprocess={}, manifest_sha256="frames-6",
                     rows=6, part_rows=8)
    with CacheWriter(path, spec, meta, overwrite=True) as w:
        w.write_part(0, {"frames": np.zeros((12, 4), np.float16), "offsets": np.arange(0, 13, 2, dtype=np.int64),
                         "frame_labels": np.zeros(12, np.int8)}, np.ones(6, bool))
        w.finalize()
    return path


# -- the embedding map ----------------------------------------------------------------------------
def test_embedding_map_each_colouring_writes_a_png(synth_cache, tmp_path):
    for color_by in COLOR_BY:
        png = tmp_path / f"map_{color_by}.png"
        info = embedding_map(synth_cache, png, color_by=color_by, method="pca", max_points=500)
        with Image.open(png) as im:
            assert im.format == "PNG"
        assert info["method"] == "pca" and info["points"] == 500 and info["rows"] == 1200
        assert sum(info["groups"].values()) == 500
        ev = info["explained_variance"]
        assert len(ev) == 2 and ev[0] >= ev[1] > 0 and sum(ev) < 1
    assert set(embedding_map(synth_cache, tmp_path / "l.png", color_by="label", max_points=500)["groups"]) \
        == {"real", "fake"}
    n_val = int((open_cache(synth_cache).meta(["split"])["split"] == "val").sum())
    sub = embedding_map(synth_cache, tmp_path / "s.png", split="val", max_points=10_000)
    assert sub["points"] == sub["rows"] == n_val and set(sub["groups"]) <= {
        f"{g}-{r}" for g in GENDERS for r in RACES}
    # the subsample is seeded: the same seed gives the same projection
    a = embedding_map(synth_cache, tmp_path / "a.png", max_points=300, seed=3)
    b = embedding_map(synth_cache, tmp_path / "b.png", max_points=300, seed=3)
    assert a["explained_variance"] == b["explained_variance"] and a["groups"] == b["groups"]


def test_embedding_map_rejects_bad_inputs(synth_cache, tmp_path):
    with pytest.raises(FeatcacheError, match="cannot colour the map by 'race'; choose one of subgroup"):
        embedding_map(synth_cache, tmp_path / "m.png", color_by="race")
    with pytest.raises(FeatcacheError, match="no rows in split 'dev'"):
        embedding_map(synth_cache, tmp_path / "m.png", split="dev")
    with pytest.raises(FeatcacheError, match="unknown map method"):
        embedding_map(synth_cache, tmp_path / "m.png", method="tsne")
    if not umap_available():
        with pytest.raises(FeatcacheError, match="pip install umap-learn"):
            embedding_map(synth_cache, tmp_path / "m.png", method="umap")
        assert embedding_map(synth_cache, tmp_path / "m.png", method="auto", max_points=200)["method"] == "pca"
