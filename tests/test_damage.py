"""Damage and full disks (issue 24.8): verify names every damage, a rerun repairs it, a full disk is one line."""

import errno
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import array_hashes, run_cli, write_image_manifest

import featcache.errors as errors_module
from featcache.cache import export_h5, open_cache, verify_cache
from featcache.errors import CacheError, DiskFullError, OutputError, human_bytes, write_atomic
from featcache.extract import extract

ROWS, PART = 12, 4  # three parts
KW = dict(model="tiny", batch_size=PART, part_rows=PART, num_workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean `tiny` CLIP extraction of 12 images (its manifest, its cache)."""
    root = tmp_path_factory.mktemp("damage")
    manifest = write_image_manifest(root / "data", ROWS)
    extract("clip", manifest, root / "clean", **KW)
    return manifest, root / "clean"


def _extract_cli(manifest, out, *extra):
    return run_cli("extract", "--backbone", "clip", "--model", "tiny", "--manifest", manifest, "--out", out,
                   "--part-rows", PART, "--batch-size", PART, "--num-workers", 0, "--device", "cpu", "-q", *extra,
                   check=False)


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    return lines[0]


def test_verify_names_every_damage_and_a_rerun_repairs_it(clean, tmp_path):
    manifest, cache = clean
    want = array_hashes(cache)
    out = tmp_path / "c"
    shutil.copytree(cache, out)
    _truncate(out / "parts" / "00000" / "features" / "c" / "0" / "0")  # plain bytes, cut in half
    (out / "parts" / "00001" / "features" / "c" / "0" / "0").unlink()  # a deleted features chunk
    _truncate(out / "parts" / "00002" / "ok" / "c" / "0")  # a zstd chunk: undecodable
    shutil.rmtree(out / "meta" / "gender")  # a deleted meta column
    _truncate(out / "meta" / "label" / "c" / "0")  # a damaged meta chunk

    report = verify_cache(out)
    text = "\n".join(report.problems)
    assert report.damaged_parts == [0, 1, 2], text
    assert sorted(report.damaged_meta) == ["gender", "label"], text
    assert "parts/00000/features: chunk 0 has" in text and "truncated" in text
    assert "parts/00001/features: 1 of 1 chunks missing: chunk 0" in text
    assert "parts/00002/ok: chunk 0 cannot be decoded" in text
    assert "meta/gender: the column is missing" in text
    assert "meta/label: chunk 0 cannot be decoded" in text
    assert "featcache extract" in report.repair and "no --overwrite" in report.repair

    shown = run_cli("cache", "verify", out, check=False)
    assert shown.returncode == 1 and "meta/gender: the column is missing" in shown.stdout
    assert shown.stdout.strip().splitlines()[-1].startswith("repair: rerun the `featcache extract`")

    rerun = _extract_cli(manifest, out)  # no --overwrite
    assert rerun.returncode == 0, rerun.stderr
    assert "3 found damaged and redone, meta columns gender, label written again" in rerun.stdout
    assert verify_cache(out).ok
    assert array_hashes(out) == want


def test_reading_or_training_on_a_damaged_cache_is_one_line(clean, tmp_path):
    manifest, cache = clean
    out = tmp_path / "c"
    shutil.copytree(cache, out)
    _truncate(out / "meta" / "gender" / "c" / "0")
    with pytest.raises(CacheError, match=r"meta/gender is damaged \(chunk 0 cannot be decoded"):
        open_cache(out).meta()
    line = _one_error_line(run_cli("train-head", "stage1", "--cache", out, "--out", tmp_path / "run",
                                   "--set", "training.epochs=1", "--set", "training.device=cpu", "-q", check=False))
    assert "meta/gender is damaged" in line and f"--out {out}; no --overwrite needed" in line

    shutil.copytree(cache, out, dirs_exist_ok=True)  # meta whole again; now a part's flags
    _truncate(out / "parts" / "00001" / "ok" / "c" / "0")
    with pytest.raises(CacheError, match=r"parts/00001/ok is damaged"):
        open_cache(out).load("train")
    line = _one_error_line(run_cli("cache", "info", out, check=False))
    assert "parts/00001/ok is damaged" in line and "featcache extract" in line


@pytest.fixture
def little_free(monkeypatch):
    """The disk has 100 bytes free, whatever it really has: messages are the same on any machine."""
    monkeypatch.setattr(errors_module, "free_bytes", lambda path: 100)


def test_a_full_disk_while_writing_a_part_is_one_line_and_the_rerun_finishes(clean, tmp_path, monkeypatch,
                                                                            little_free):
    import zarr.storage._local as local

    manifest, cache = clean
    out = tmp_path / "c"
    real = local._put

    def full(path, value, exclusive=False):
        if "00001.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full)
    line = _one_error_line(_extract_cli(manifest, out))
    need = open_cache(cache).read_part(1)["features"].nbytes + PART  # the part's features and ok flags
    assert f"no space left on the disk of {out / 'parts' / '00001'}" in line
    assert f"it needs about {human_bytes(need)}, 100 B free: free at least {human_bytes(need - 100)}" in line
    assert not list((out / "parts").glob("*.tmp")) and not (out / "parts" / "00001").exists()
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    monkeypatch.setattr(local, "_put", real)
    assert _extract_cli(manifest, out).returncode == 0
    assert array_hashes(out) == array_hashes(cache)


def test_a_full_disk_while_saving_weights_is_one_line(clean, tmp_path, monkeypatch, little_free):
    from safetensors import SafetensorError

    import featcache.runtime as runtime

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(runtime, "save_file", full)
    run = tmp_path / "run"
    line = _one_error_line(run_cli("train-head", "stage1", "--cache", clean[1], "--out", run,
                                   "--set", "training.epochs=1", "--set", "training.device=cpu", "-q", check=False))
    assert "no space left on the disk of" in line and ".safetensors (it needs about" in line
    assert "100 B free" in line
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.safetensors"))


def test_a_full_disk_for_tables_plots_and_exports_leaves_nothing_half_written(clean, tmp_path, monkeypatch,
                                                                              little_free):
    from featcache.report.plots import plot_roc
    from featcache.report.tables import write_csv_rounded

    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=r"ablation\.md \(it needs about 11 B, 100 B free: free some space\)"):
        write_atomic(tmp_path / "ablation.md", "# a table\n\n")
    df = pd.DataFrame({"preset": ["none"], "test_auc": [0.91234567]})
    with pytest.raises(DiskFullError, match=r"ablation\.csv \(it needs about"):
        write_csv_rounded(df, tmp_path / "ablation.csv")
    with pytest.raises(DiskFullError, match=r"roc\.png \(it needs about [0-9.]+ KiB, 100 B free"):
        plot_roc(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]), tmp_path / "roc.png")
    monkeypatch.setattr(Path, "write_bytes", real)
    assert not list(tmp_path.iterdir())  # no final file, no .tmp

    # HDF5 says it in an OSError without an errno; the existing export stays as it was
    import h5py

    import featcache.cache.export as export_module

    h5 = tmp_path / "x.h5"
    export_h5(clean[1], h5)
    before = h5.read_bytes()

    def h5_full(*a, **k):
        raise OSError("Can't write data (file write failed: time = Sun Dec  6, filename = 'x.h5.tmp', "
                      "file descriptor = 5, errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(export_module.h5py, "File", h5_full)
    line = _one_error_line(run_cli("cache", "export", clean[1], "--h5", h5, "--overwrite", check=False))
    assert f"no space left on the disk of {h5} (it needs about" in line
    monkeypatch.setattr(export_module.h5py, "File", h5py.File)
    assert h5.read_bytes() == before and not (tmp_path / "x.h5.tmp").exists()


def test_export_needs_overwrite_and_out_mistakes_are_one_line(clean, tmp_path):
    cache = clean[1]
    h5 = tmp_path / "x.h5"
    assert run_cli("cache", "export", cache, "--h5", h5).returncode == 0
    before = h5.stat().st_mtime_ns
    line = _one_error_line(run_cli("cache", "export", cache, "--h5", h5, check=False))
    assert line == f"error: {h5} already exists; pass --overwrite to replace it, or choose another --h5"
    assert h5.stat().st_mtime_ns == before
    assert run_cli("cache", "export", cache, "--h5", h5, "--overwrite").returncode == 0
    with pytest.raises(OutputError, match="already exists"):
        export_h5(cache, h5)

    png, dups = tmp_path / "m.png", tmp_path / "dups"
    for args, target in ((("analyze", "map", "--cache", cache, "--method", "pca", "--out", png), png),
                         (("analyze", "duplicates", "--cache", cache, "-k", 3, "--out", dups), dups / "duplicates.json")):
        run_cli(*args)
        before = target.stat().st_mtime_ns
        line = _one_error_line(run_cli(*args, check=False))
        assert "pass --overwrite to replace" in line and target.stat().st_mtime_ns == before
        run_cli(*args, "--overwrite")

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    wrong = [
        (("cache", "export", cache, "--h5", tmp_path), "is a folder; give a file name"),
        (("cache", "export", cache, "--h5", a_file / "x.h5"), "is a file, not a folder"),
        (("analyze", "map", "--cache", cache, "--method", "pca", "--out", tmp_path / "m.jpgx"),
         "matplotlib writes no 'jpgx' images"),
        (("analyze", "map", "--cache", cache, "--method", "pca", "--out", a_file / "m.png"), "is a file, not a folder"),
        (("analyze", "duplicates", "--cache", cache, "--out", a_file / "d"), "is a file, not a folder"),
        (("analyze", "subgroups", "--cache", cache, "--out", a_file / "s"), "is a file, not a folder"),
        (("extract", "--backbone", "clip", "--model", "tiny", "--manifest", clean[0], "--out", a_file / "c"),
         "cannot write"),
    ]
    for args, want in wrong:
        line = _one_error_line(run_cli(*args, check=False))
        assert want in line, (args, line)
