"""The canonical manifest: vocabularies, subgroup codes, validation errors, and the CLI's error style."""

import pandas as pd
import pytest
from conftest import run_cli

from featcache.data.manifest import (
    SUBGROUP_NAMES,
    map_race,
    normalize_manifest,
    read_manifest,
    subgroup_code,
    write_manifest,
)
from featcache.errors import ManifestError


def test_subgroup_codes_follow_the_published_order():
    names = [f"{g}-{r}" for g in ("male", "female") for r in ("asian", "white", "black", "other")]
    assert list(SUBGROUP_NAMES) == names
    for code, name in enumerate(names):
        gender, race = name.split("-")
        assert subgroup_code(gender, race) == code
    assert subgroup_code("", "white") == -1 and subgroup_code("female", "") == -1


def test_race_vocabularies_map_to_four_groups():
    ff = {"East Asian": "asian", "Southeast Asian": "asian", "White": "white", "Black": "black",
          "Indian": "other", "Latino_Hispanic": "other", "Middle Eastern": "other"}
    for value, group in ff.items():
        assert map_race(value, "fairface") == group
    assert [map_race(str(i), "utkface") for i in range(5)] == ["white", "black", "asian", "other", "other"]
    with pytest.raises(ManifestError, match="unknown race value 'Martian'"):
        map_race("Martian", "fairface")


def test_normalize_derives_ids_labels_and_subgroups(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    raw = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["fake", ""], "split": ["train", "test"],
                        "gender": ["female", ""], "race": ["black", "white"]})
    df = normalize_manifest(raw, tmp_path)
    assert list(df["sample_id"]) == ["a.png", "b.png"]
    assert list(df["label"]) == [1, -1]
    assert list(df["subgroup"]) == [6, -1]


def test_every_problem_is_reported_with_its_rows_and_nothing_is_written(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    raw = pd.DataFrame({
        "sample_id": ["a", "a", "c", "d"],
        "path": ["ok.png", "ok.png", "ok.png", "missing.png"],
        "label": ["0", "1", "maybe", "1"],
        "split": ["train", "train", "dev", "test"],
        "race": ["white", "white", "white", "purple"],
    })
    out = tmp_path / "m.csv"
    with pytest.raises(ManifestError) as info:
        write_manifest(raw, out)
    msg = str(info.value)
    assert "2 row(s) with a duplicate sample_id: line 2 (a); line 3 (a)" in msg
    assert "unknown label" in msg and "line 4 (c): 'maybe'" in msg
    assert "unknown split" in msg and "'dev'" in msg
    assert "unknown race" in msg and "'purple'" in msg
    assert "does not exist: line 5 (d): missing.png" in msg
    assert not out.exists()


def test_missing_required_column(tmp_path):
    with pytest.raises(ManifestError, match="missing required column.*split"):
        normalize_manifest(pd.DataFrame({"path": ["x"]}), tmp_path, check_files=False)


def test_long_lists_are_cut_to_the_first_rows(tmp_path):
    raw = pd.DataFrame({"path": [f"{i}.png" for i in range(12)], "split": ["nope"] * 12})
    with pytest.raises(ManifestError, match=r"12 row\(s\) with an unknown split.*\(and 7 more\)"):
        normalize_manifest(raw, tmp_path, check_files=False)


def test_round_trip_preserves_rows(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    raw = pd.DataFrame({"path": [str(tmp_path / "x.png")], "label": [1], "split": ["val"], "gender": ["male"],
                        "race": ["asian"], "identity": ["p1"], "extra_col": ["kept"]})
    m = write_manifest(raw, tmp_path / "m.csv")
    again = read_manifest(tmp_path / "m.csv")
    assert again.sha256 == m.sha256
    assert again.df.loc[0, "path"] == "x.png"  # relative to the manifest's folder
    assert again.df.loc[0, "subgroup"] == 0 and again.df.loc[0, "extra_col"] == "kept"
    assert again.absolute_paths() == [str((tmp_path / "x.png").resolve())]


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    (tmp_path / "m.csv").write_text("path,split\nnope.png,train\n")
    proc = run_cli("extract", "--backbone", "clip", "--model", "tiny", "--manifest", tmp_path / "m.csv",
                   "--out", tmp_path / "c", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert not (tmp_path / "c").exists()
    # the real entry point, `python -m featcache`, in its own process
    proc = run_cli("manifest", "nosuchformat", tmp_path, "-o", tmp_path / "x.csv", check=False, subprocess_=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown manifest format")
