"""Nearest samples, near-duplicates and leaky splits, on the FAISS index layer."""

import functools
import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_image_manifest

import featcache.analyze.duplicates as duplicates_module
from featcache.analyze.duplicates import find_duplicates
from featcache.analyze.index import build_index
from featcache.analyze.neighbors import RESULT_COLUMNS, nearest_samples
from featcache.cache import CacheSpec, CacheWriter
from featcache.cache.synth import synth_feature_cache
from featcache.errors import FeatcacheError
from featcache.extract import extract

SPLIT_PAIRS = ("train/val", "train/test", "val/test")


def write_cache(path, feats, split, identity, ok=None, part_rows=16):
    """A pooled cache of the given features (stored fp16, as extraction does) and meta."""
    n = len(feats)
    ok = np.ones(n, dtype=bool) if ok is None else np.asarray(ok)
    meta = pd.DataFrame({
        "sample_id": [f"id{i:03d}" for i in range(n)], "path": [f"img/{i}.png" for i in range(n)],
        "label": np.int8([i % 2 for i in range(n)]), "split": list(split),
        "dataset": "toy", "subgroup": np.int8([i % 8 for i in range(n)]), "identity": list(identity),
        "method": ["" if i % 2 == 0 else "swap" for i in range(n)],
    })
    spec = CacheSpec(kind="pooled", backbone={"name": "test", "model": "m"}, preprocess={},
                     manifest_sha256="0" * 64, rows=n, part_rows=part_rows)
    feats = np.asarray(feats, dtype=np.float16)
    with CacheWriter(path, spec, meta) as w:
        for i in w.missing_parts():
            s, e = w.part_bounds(i)
            w.write_part(i, {"features": feats[s:e]}, ok[s:e],
                         [{"sample_id": f"id{j:03d}", "path": "", "error": "x"} for j in range(s, e) if not ok[j]])
        w.finalize()
    return meta, feats.astype(np.float32)


def clean_set(n=60, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim))
    split = ["train"] * 40 + ["val"] * 10 + ["test"] * (n - 50)
    identity = [f"p{i}" for i in range(n)]
    return rng, feats, split, identity


def planted_set():
    """Clean random vectors with 5 planted near-duplicate pairs and 2 identities shared across splits."""
    rng, feats, split, identity = clean_set()
    noise = lambda: 1e-3 * rng.normal(size=feats.shape[1])  # noqa: E731
    feats[40] = feats[0] + noise()   # train/val
    feats[41] = feats[1] + noise()   # train/val
    feats[50] = feats[2]             # train/test, exact copy
    feats[51] = feats[45] + noise()  # val/test
    feats[11] = feats[10] + noise()  # train/train: a duplicate, not a leak
    identity[20] = identity[55] = "shared-A"  # train and test
    identity[42] = identity[56] = "shared-B"  # val and test
    identity[30] = identity[31] = identity[57] = ""  # unknown identities never count
    pairs = {("id000", "id040"), ("id001", "id041"), ("id002", "id050"), ("id045", "id051"), ("id010", "id011")}
    return feats, split, identity, pairs


def check_planted(res, out, pairs):
    assert res["near_duplicate_pairs"] == 5 and res["cross_split_pairs"] == 4
    assert res["within_split"] == {"train/train": 1, "val/val": 0, "test/test": 0}
    assert {p: v["near_duplicates"] for p, v in res["split_pairs"].items()} == {
        "train/val": 2, "train/test": 1, "val/test": 1}
    assert {p: v["shared_identities"] for p, v in res["split_pairs"].items()} == {
        "train/val": 0, "train/test": 1, "val/test": 1}
    assert res["shared_identity_examples"]["train/test"] == ["shared-A"]
    assert res["leaky"] is True
    csv = pd.read_csv(out / "duplicate_pairs.csv", keep_default_na=False)
    assert list(csv.columns) == ["a", "b", "similarity", "split_a", "split_b", "identity_a", "identity_b",
                                 "cross_split"]
    assert set(zip(csv["a"], csv["b"])) == pairs
    assert (csv["similarity"] > 0.999).all() and list(csv["similarity"]) == sorted(csv["similarity"], reverse=True)
    assert csv.set_index("a").loc["id010", "cross_split"] == False  # noqa: E712
    assert json.loads((out / "duplicates.json").read_text()) == res
    md = (out / "duplicates.md").read_text()
    assert "| train/val | 2 | 0 |" in md and "| val/test | 1 | 1 |" in md
    assert "id045" in md.split("Worst cross-split")[1] and "id010" not in md.split("Worst cross-split")[1]


def test_find_duplicates_finds_exactly_the_planted_pairs_and_shared_identities(tmp_path):
    feats, split, identity, pairs = planted_set()
    write_cache(tmp_path / "c", feats, split, identity)
    res = find_duplicates(tmp_path / "c", tmp_path / "out", threshold=0.95, k=5)
    assert res["n"] == 60 and res["index"]["kind"] == "exact" and res["index"]["recall_at_k"] is None
    check_planted(res, tmp_path / "out", pairs)


def test_find_duplicates_with_the_approximate_index(tmp_path, monkeypatch):
    feats, split, identity, pairs = planted_set()
    write_cache(tmp_path / "c", feats, split, identity)
    monkeypatch.setattr(duplicates_module, "build_index", functools.partial(build_index, exact_limit=10, nlist=2))
    res = find_duplicates(tmp_path / "c", tmp_path / "out", threshold=0.95, k=5)
    assert res["index"]["kind"] == "ivf" and 0 < res["index"]["recall_at_k"] <= 1
    check_planted(res, tmp_path / "out", pairs)


def test_a_clean_set_has_no_duplicates_and_no_leaks(tmp_path):
    _, feats, split, identity = clean_set(seed=1)
    write_cache(tmp_path / "c", feats, split, identity)
    res = find_duplicates(tmp_path / "c", tmp_path / "out", threshold=0.9, k=10)
    assert res["near_duplicate_pairs"] == 0 and res["cross_split_pairs"] == 0 and res["leaky"] is False
    assert all(v == {"near_duplicates": 0, "shared_identities": 0} for v in res["split_pairs"].values())
    assert len(pd.read_csv(tmp_path / "out" / "duplicate_pairs.csv")) == 0
    assert "None at this threshold" in (tmp_path / "out" / "duplicates.md").read_text()


def test_synthetic_feature_cache_identities_never_cross_splits(tmp_path):
    synth_feature_cache(tmp_path / "c", rows=400, dim=16, seed=0)
    res = find_duplicates(tmp_path / "c", tmp_path / "out", threshold=0.99)
    assert res["n"] == 400 and not any(v["shared_identities"] for v in res["split_pairs"].values())


@pytest.mark.parametrize("kw, match", [
    ({"threshold": 1.5}, "threshold"), ({"threshold": -1.0}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"k": 0}, "k must be"), ({"max_examples": -1}, "max_examples"),
])
def test_find_duplicates_rejects_bad_arguments(tmp_path, kw, match):
    _, feats, split, identity = clean_set()
    write_cache(tmp_path / "c", feats, split, identity)
    with pytest.raises(FeatcacheError, match=match):
        find_duplicates(tmp_path / "c", tmp_path / "out", **kw)


def brute_force(feats, q, candidates):
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = unit[candidates] @ unit[q]
    order = np.argsort(-sims, kind="stable")
    return candidates[order], sims[order]


def test_nearest_samples_by_id_equals_a_brute_force_cosine_ranking(tmp_path):
    rng = np.random.default_rng(3)
    n = 50
    ok = np.ones(n, dtype=bool)
    ok[[7, 33]] = False
    split = [("train", "val", "test")[i % 3] for i in range(n)]
    meta, feats = write_cache(tmp_path / "c", rng.normal(size=(n, 16)), split, [f"p{i}" for i in range(n)], ok=ok)

    got = nearest_samples(tmp_path / "c", query="id012", k=8)
    assert list(got.columns) == list(RESULT_COLUMNS)
    want_rows, want_sims = brute_force(feats, 12, np.flatnonzero(ok & (np.arange(n) != 12)))
    assert list(got["sample_id"]) == [f"id{i:03d}" for i in want_rows[:8]]
    np.testing.assert_allclose(got["similarity"], want_sims[:8], atol=1e-5)
    assert list(got["rank"]) == list(range(1, 9))
    assert list(got["split"]) == [split[i] for i in want_rows[:8]]
    assert list(got["path"]) == [f"img/{i}.png" for i in want_rows[:8]]

    val = nearest_samples(tmp_path / "c", query="id012", k=100, split="val")  # id012 is a train sample
    want_rows, _ = brute_force(feats, 12, np.flatnonzero(ok & (np.array(split) == "val")))
    assert list(val["sample_id"]) == [f"id{i:03d}" for i in want_rows] and set(val["split"]) == {"val"}

    with pytest.raises(FeatcacheError, match="could not be read"):
        nearest_samples(tmp_path / "c", query="id007")
    with pytest.raises(FeatcacheError, match="did you mean"):
        nearest_samples(tmp_path / "c", query="id0012")
    with pytest.raises(FeatcacheError, match="exactly one"):
        nearest_samples(tmp_path / "c")
    with pytest.raises(FeatcacheError, match="k must be"):
        nearest_samples(tmp_path / "c", query="id012", k=0)
    with pytest.raises(FeatcacheError, match="split 'dev'"):
        nearest_samples(tmp_path / "c", query="id012", split="dev")
    with pytest.raises(FeatcacheError, match="cannot be rebuilt"):  # a backbone the registry does not know
        nearest_samples(tmp_path / "c", image=__file__)


def test_nearest_samples_by_image_finds_the_same_image_and_refuses_other_weights(tmp_path):
    manifest = write_image_manifest(tmp_path / "data", 8)
    extract("clip", manifest, tmp_path / "c", model="tiny", num_workers=0, progress=False)
    image = tmp_path / "data" / "img" / "0005.png"
    got = nearest_samples(tmp_path / "c", image=str(image), k=3)
    assert got["sample_id"].iloc[0] == "s0005" and got["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-3)
    assert got["similarity"].iloc[1] < got["similarity"].iloc[0] and len(got) == 3

    extract("clip", manifest, tmp_path / "c1", model="tiny", num_workers=0, progress=False, seed=1)
    with pytest.raises(FeatcacheError, match=r"sha256.*seed") as err:
        nearest_samples(tmp_path / "c1", image=str(image))
    assert "\n" not in str(err.value)
    with pytest.raises(FeatcacheError, match="does not exist"):
        nearest_samples(tmp_path / "c", image=str(tmp_path / "missing.png"))
    with pytest.raises(FeatcacheError, match="cannot read image"):
        nearest_samples(tmp_path / "c", image=str(manifest))


def test_ivf_recall_on_clustered_data_just_above_the_exact_limit():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 64))
    x = centers[rng.integers(0, 20, size=3000)] + 0.5 * rng.normal(size=(3000, 64))
    index = build_index(x, exact_limit=2500)
    assert index.kind == "ivf" and index.n == 3000
    assert index.recall_at_k(k=10, n_queries=500) > 0.9
