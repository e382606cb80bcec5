"""The cache on its own: round trip, reader selection, damage detection, HDF5 export."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from featcache.cache import CacheSpec, CacheWriter, cache_info, export_h5, fingerprint, open_cache, verify_cache
from featcache.cache.store import describe_differences
from featcache.errors import CacheError


def make_cache(path, rows=23, dim=6, part_rows=5, failed=(3, 17), seed=0):
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame({
        "sample_id": [f"id{i}" for i in range(rows)],
        "path": [f"p/{i}.png" for i in range(rows)],
        "label": np.int8([i % 2 for i in range(rows)]),
        "split": [("train", "val", "test")[i % 3] for i in range(rows)],
        "subgroup": np.int8([i % 8 for i in range(rows)]),
        "identity": ["" if i % 4 == 0 else f"person{i // 4}" for i in range(rows)],
    })
    feats = rng.normal(size=(rows, dim)).astype(np.float16)
    ok = np.ones(rows, dtype=bool)
    ok[list(failed)] = False
    feats[~ok] = 0
    spec = CacheSpec(kind="pooled", backbone={"name": "test", "model": "m"}, preprocess={"size": [8, 8]},
                     manifest_sha256="0" * 64, rows=rows, part_rows=part_rows)
    with CacheWriter(path, spec, meta) as w:
        for i in w.missing_parts():
            s, e = w.part_bounds(i)
            errs = [{"sample_id": f"id{j}", "path": "", "error": "x"} for j in range(s, e) if not ok[j]]
            w.write_part(i, {"features": feats[s:e]}, ok[s:e], errs)
        w.finalize()
    return meta, feats, ok


def test_round_trip_and_selection(tmp_path):
    meta, feats, ok = make_cache(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    assert (cache.rows, cache.n_parts, cache.dim) == (23, 5, 6)
    np.testing.assert_array_equal(cache.load_rows("features"), feats)
    pd.testing.assert_frame_equal(cache.meta(list(meta.columns)), meta.astype({c: object for c in
                                  ("sample_id", "path", "split", "identity")}), check_dtype=False)
    val = cache.load(split="val")
    want = np.flatnonzero((meta["split"] == "val").to_numpy() & ok)
    np.testing.assert_array_equal(val.index, want)
    np.testing.assert_array_equal(val.features, feats[want].astype(np.float32))
    assert list(val.meta["sample_id"]) == [f"id{i}" for i in want]
    x, y = val.tensors("label")
    assert x.dtype.is_floating_point and y.tolist() == meta["label"].to_numpy()[want].tolist()
    both = cache.load(split=["train", "test"], ok_only=False)
    assert len(both) == int((meta["split"] != "val").sum())


def test_fingerprint_covers_what_determines_the_arrays(tmp_path):
    base = dict(kind="pooled", backbone={"name": "clip", "model": "a"}, preprocess={"size": [8, 8]},
                manifest_sha256="1" * 64, rows=10, part_rows=4)
    a = CacheSpec(**base).attrs()
    assert a["fingerprint"] == fingerprint(a)
    for change in ({"backbone": {"name": "clip", "model": "b"}}, {"preprocess": {"size": [9, 9]}},
                   {"manifest_sha256": "2" * 64}, {"part_rows": 5}, {"rows": 11}):
        b = CacheSpec(**{**base, **change}).attrs()
        assert b["fingerprint"] != a["fingerprint"]
        assert describe_differences(a, b)
    assert describe_differences(a, CacheSpec(**{**base, "backbone": {"name": "clip", "model": "b"}}).attrs()) == [
        "backbone.model: 'a' in the cache, 'b' now"]


def test_incomplete_cache_is_refused_by_the_reader(tmp_path):
    make_cache(tmp_path / "c")
    attrs = json.loads((tmp_path / "c" / "zarr.json").read_text())
    attrs["attributes"]["complete"] = False
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(attrs))
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path / "c")


def test_a_missing_chunk_is_an_error_never_zeros(tmp_path):
    make_cache(tmp_path / "c")
    chunk = tmp_path / "c" / "parts" / "00002" / "features" / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(CacheError, match="chunks missing"):
        open_cache(tmp_path / "c").load_rows("features")
    report = verify_cache(tmp_path / "c")
    assert not report.ok and any("00002" in p and "missing" in p for p in report.problems)


def test_an_all_false_ok_chunk_is_still_stored(tmp_path):
    make_cache(tmp_path / "c", rows=5, part_rows=5, failed=range(5))
    assert (tmp_path / "c" / "parts" / "00000" / "ok" / "c" / "0").is_file()
    assert verify_cache(tmp_path / "c").ok


def test_verify_finds_nan_missing_parts_edits_and_error_mismatch(tmp_path):
    make_cache(tmp_path / "c")
    assert verify_cache(tmp_path / "c").ok
    shutil.copytree(tmp_path / "c", tmp_path / "nan")
    import zarr

    arr = zarr.open_array(str(tmp_path / "nan" / "parts" / "00001" / "features"), mode="r+")
    arr[0, 0] = np.nan
    assert any("NaN" in p for p in verify_cache(tmp_path / "nan").problems)

    shutil.copytree(tmp_path / "c", tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone" / "parts" / "00004")
    assert any("part 4 is missing" in p for p in verify_cache(tmp_path / "gone").problems)

    shutil.copytree(tmp_path / "c", tmp_path / "edit")
    meta = json.loads((tmp_path / "edit" / "zarr.json").read_text())
    meta["attributes"]["backbone"]["model"] = "other"
    (tmp_path / "edit" / "zarr.json").write_text(json.dumps(meta))
    assert any("fingerprint does not match" in p for p in verify_cache(tmp_path / "edit").problems)

    shutil.copytree(tmp_path / "c", tmp_path / "errs")
    (tmp_path / "errs" / "errors.jsonl").write_text("")
    assert any("errors.jsonl" in p for p in verify_cache(tmp_path / "errs").problems)


def test_verify_cli_exits_1_with_the_reason(tmp_path):
    make_cache(tmp_path / "c")
    ok = run_cli("cache", "verify", tmp_path / "c")
    assert ok.stdout.startswith("ok:")
    (tmp_path / "c" / "parts" / "00000" / "features" / "c" / "0" / "0").unlink()
    bad = run_cli("cache", "verify", tmp_path / "c", check=False)
    assert bad.returncode == 1 and "chunks missing" in bad.stdout


def test_info_counts(tmp_path):
    make_cache(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert (info["rows"], info["ok_rows"], info["errors"], info["dim"]) == (23, 21, 2, 6)
    assert (info["parts_done"], info["n_parts"], info["complete"]) == (5, 5, True)
    assert info["splits"] == {"test": 7, "train": 8, "val": 8}
    assert info["size_bytes"] > 0


def test_export_h5_matches_the_cache(tmp_path):
    meta, feats, ok = make_cache(tmp_path / "c")
    export_h5(tmp_path / "c", tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5", "r") as h5:
        np.testing.assert_array_equal(h5["features"][...], feats)
        np.testing.assert_array_equal(h5["ok"][...], ok)
        assert [s.decode() for s in h5["meta/sample_id"][...]] == list(meta["sample_id"])
        np.testing.assert_array_equal(h5["meta/label"][...], meta["label"].to_numpy())
        assert json.loads(h5.attrs["featcache"])["fingerprint"] == open_cache(tmp_path / "c").fingerprint


def test_a_relative_path_reads_like_an_absolute_one(tmp_path, monkeypatch):
    # zarr 3.1 counts no stored chunks under a relative LocalStore root; the reader must not care.
    make_cache(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    cache = open_cache("c")
    assert cache.load_rows("features").shape == (23, 6)
    assert verify_cache("c").ok


def test_a_resumed_writer_writes_lost_meta_again(tmp_path):
    meta, feats, ok = make_cache(tmp_path / "c")
    want = open_cache(tmp_path / "c").meta()
    (tmp_path / "c" / "meta" / "zarr.json").unlink()
    shutil.rmtree(tmp_path / "c" / "meta" / "split")
    report = verify_cache(tmp_path / "c")
    assert report.damaged_meta == ["(group)", "split"] and report.repair
    with pytest.raises(CacheError, match=r"meta/split is damaged \(the column is missing\)"):
        open_cache(tmp_path / "c").meta()
    make_cache(tmp_path / "c")  # the same writer again: every part is there, the meta is written again
    assert verify_cache(tmp_path / "c").ok
    pd.testing.assert_frame_equal(open_cache(tmp_path / "c").meta(), want)
