"""Faults a user can cause around extraction and cache reading (issue 19: nothing silent)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import array_hashes, write_image_manifest

from featcache.cache import arrays as arrays_module
from featcache.cache import open_cache, verify_cache
from featcache.cache import store as store_module
from featcache.cli import main
from featcache.errors import CacheError, FeatcacheError
from featcache.extract import extract
from featcache.extract import runner as runner_module

KW = dict(model="tiny", batch_size=8, part_rows=16, num_workers=0, progress=False, device="cpu")


def cli(capsys, *args) -> tuple[int, str]:
    """The CLI in this process, as `featcache ARGS` runs it: (exit status, stdout + stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def clip_cache(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "clip"
    extract("clip", images, out, **KW)
    return out


def _audio_manifest(root):
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000) / 16000
    rows = []
    for i in range(3):
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), 16000)
        rows.append({"sample_id": f"a{i}", "path": f"a{i}.wav", "label": i % 2, "split": "train"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_a_backbone_given_the_other_modality_is_refused_before_any_cache(images, tmp_path, capsys):
    with pytest.raises(FeatcacheError, match=r"image files \(\.png\) and xlsr reads audio; use --backbone clip"):
        extract("xlsr", images, tmp_path / "x", **KW)
    assert not (tmp_path / "x").exists()
    audio = _audio_manifest(tmp_path / "audio")
    code, output = cli(capsys, *["extract", "--backbone", "clip", "--model", "tiny", "--manifest", str(audio),
                                   "--out", str(tmp_path / "c"), "--num-workers", "0", "-q"])
    assert code == 2, output
    assert output.count("\n") == 1 and "audio files (.wav) and clip reads image; use --backbone xlsr" in output
    assert not (tmp_path / "c").exists()


def test_an_extraction_where_every_sample_failed_is_refused(tmp_path, monkeypatch):
    manifest = write_image_manifest(tmp_path / "bad", 20, corrupt=set(range(20)))
    with pytest.raises(FeatcacheError, match="none of the first 8 samples could be read by clip"):
        extract("clip", manifest, tmp_path / "c", **KW)
    assert not (tmp_path / "c").exists()
    # Behind the probe (files that break after it): the run is refused, the cache left incomplete.
    monkeypatch.setattr(runner_module, "probe_inputs", lambda *a, **k: None)
    with pytest.raises(FeatcacheError, match="every one of the 20 samples failed to read"):
        extract("clip", manifest, tmp_path / "c", **KW)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path / "c")


def test_negative_num_workers_is_one_line_and_leaves_no_folder(images, tmp_path, capsys):
    code, output = cli(capsys, *["extract", "--backbone", "clip", "--model", "tiny", "--manifest", str(images),
                                   "--out", str(tmp_path / "c"), "--num-workers", "-1"])
    assert code == 2 and output.strip() == (
        "error: --num-workers must be 0 (decode in the main process) or more, got -1")
    assert not (tmp_path / "c").exists()


def test_decode_gpu_without_cuda_is_one_line(images, tmp_path, capsys):
    code, output = cli(capsys, *["extract", "--backbone", "clip", "--model", "tiny", "--manifest", str(images),
                                   "--out", str(tmp_path / "c"), "--decode", "gpu", "--device", "cpu"])
    assert code == 2 and output.startswith("error: --decode gpu decodes JPEGs with CUDA")
    assert output.count("\n") == 1 and not (tmp_path / "c").exists()


def test_rerun_redoes_a_part_with_a_deleted_chunk(images, clip_cache, tmp_path, capsys):
    out = tmp_path / "c"
    shutil.copytree(clip_cache, out)
    want = array_hashes(out)
    (out / "parts" / "00001" / "features" / "c" / "0" / "0").unlink()
    assert not verify_cache(out).ok
    code, output = cli(capsys, *["extract", "--backbone", "clip", "--model", "tiny", "--manifest", str(images),
                                   "--out", str(out), "--part-rows", "16", "--batch-size", "8", "--num-workers", "0",
                                   "--device", "cpu", "-q"])
    assert code == 0, output
    assert "(1 written, 2 already there, 1 found damaged and redone)" in output
    assert array_hashes(out) == want and verify_cache(out).ok


def test_cache_info_on_a_csv_says_it_is_not_a_cache(images, capsys):
    code, output = cli(capsys, *["cache", "info", str(images)])
    assert code == 2
    assert "is a file, not a featcache cache: it looks like a manifest" in output
    assert "does not exist" not in output


def test_open_cache_checks_the_kind(clip_cache):
    assert open_cache(clip_cache, "pooled").kind == "pooled"
    with pytest.raises(CacheError, match=r"is a pooled cache \(backbone clip\); this needs a frames cache "
                                         r"\(extract with --backbone xlsr\)"):
        open_cache(clip_cache, "frames")


def test_selected_rows_are_read_across_chunks_and_blocks(tmp_path, monkeypatch):
    # Small chunks and conversion blocks, so that parts span several chunk files and blocks.
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 7 * 12 * 2)
    monkeypatch.setattr(arrays_module, "BLOCK_BYTES", 3 * 12 * 2)
    from test_cache import make_cache

    meta, feats, ok = make_cache(tmp_path / "c", rows=53, dim=12, part_rows=17, failed=(3, 40))
    cache = open_cache(tmp_path / "c")
    assert cache.part(0)["features"].nchunks == 3  # 17 rows in chunks of 7
    rng = np.random.default_rng(0)
    for rows in (np.sort(rng.choice(53, 20, replace=False)), np.arange(53), np.array([16, 17, 52])):
        got = cache.load_rows("features", dtype=np.float32, rows=rows)
        np.testing.assert_array_equal(got, feats[rows].astype(np.float32))
        np.testing.assert_array_equal(cache.load_rows("features", rows=rows), feats[rows])
    for name, d in ((sp, cache.load(split=sp)) for sp in ("train", "test")):
        want = np.flatnonzero((meta["split"] == name).to_numpy() & ok)
        np.testing.assert_array_equal(d.index, want)
        np.testing.assert_array_equal(d.features, feats[want].astype(np.float32))
        assert list(d.meta["sample_id"]) == [f"id{i}" for i in want]
    (tmp_path / "c" / "parts" / "00001" / "features" / "c" / "1" / "0").unlink()
    with pytest.raises(CacheError, match="chunks missing"):
        open_cache(tmp_path / "c").load(split="val")
