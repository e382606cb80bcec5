"""The canonical manifest: vocabularies, subgroup codes, validation errors, and the CLI's error style."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from featcache.data.manifest import (
    SUBGROUP_NAMES,
    map_race,
    merge_manifests,
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
    # CausalFace's file names carry its three groups ("asian" is its East Asian group)
    assert [map_race(r, "causalface") for r in ("asian", "black", "white")] == ["asian", "black", "white"]
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


# --------------------------------------------------------------------------- merge
def _manifest(folder, name, rows, **columns):
    """A manifest CSV at folder/name whose files (relative paths) exist under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in rows["path"]:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / p).write_bytes(b"x")
    pd.DataFrame({**rows, **columns}).to_csv(folder / name, index=False)
    return folder / name


def _two_inputs(tmp_path):
    a = _manifest(tmp_path / "fairface", "fairface.csv",
                  {"sample_id": ["s1", "s2", "s3"], "path": ["train/1.jpg", "train/2.jpg", "val/1.jpg"],
                   "split": ["train", "val", "test"], "label": ["0", "0", "0"], "gender": ["male", "female", ""],
                   "race": ["asian", "black", "white"], "identity": ["p1", "p2", "p3"]})
    b = _manifest(tmp_path / "deep/causalface", "causalface.csv",
                  {"sample_id": ["s1", "c2"], "path": ["seed_1/a.png", "seed_1/b.png"], "split": ["train", "test"],
                   "gender": ["female", "male"], "race": ["black", "white"], "identity": ["p1", "p1"]},
                  variation=["pose=-1.5", "age=2.3"])
    return a, b


@pytest.mark.parametrize("where", ["apart", "above"])
def test_merge_aligns_columns_counts_sources_and_paths_still_resolve(tmp_path, where):
    a, b = _two_inputs(tmp_path)
    out = tmp_path / ("out/stage1.csv" if where == "apart" else "stage1.csv")
    m = merge_manifests([a, b], out)
    ins = [read_manifest(a), read_manifest(b)]
    df = read_manifest(out).df  # the written CSV, read back: every path exists (read_manifest checks)
    assert df["source"].value_counts().to_dict() == {"fairface": 3, "causalface": 2}
    # each merged row points at the file its input pointed at
    want = [str(Path(p).resolve()) for i in ins for p in i.absolute_paths()]
    assert [str(Path(p).resolve()) for p in read_manifest(out).absolute_paths()] == want
    assert all(not p.startswith("/") for p in df["path"]) == (where == "above")
    # columns: the union; what an input lacks is unknown (empty, label -1)
    assert df.loc[df["source"] == "fairface", "variation"].tolist() == ["", "", ""]
    assert df.loc[df["source"] == "causalface", "label"].tolist() == [-1, -1]
    assert df["subgroup"].tolist() == [subgroup_code(g, r) for g, r in zip(df["gender"], df["race"])]
    assert df["dataset"].tolist() == ["fairface"] * 3 + ["causalface"] * 2  # empty dataset -> the source
    assert m.sha256 == read_manifest(out).sha256


def test_merge_keeps_identities_apart_and_makes_shared_sample_ids_distinct(tmp_path):
    a, b = _two_inputs(tmp_path)
    df = merge_manifests([a, b], tmp_path / "m.csv").df
    # "p1" in both inputs is two people: no identity spans two sources
    assert (df.groupby("identity")["source"].nunique() == 1).all()
    assert set(df["identity"]) == {"fairface/p1", "fairface/p2", "fairface/p3", "causalface/p1"}
    # s1 was in both inputs: each copy carries its source; ids found once are kept as they were
    assert df["sample_id"].tolist() == ["fairface:s1", "s2", "s3", "causalface:s1", "c2"]
    assert df["sample_id"].is_unique


def test_merge_cli_refuses_bad_input_with_one_error_line_and_writes_nothing(tmp_path):
    a, b = _two_inputs(tmp_path)
    audio = _manifest(tmp_path / "asv", "asv.csv", {"path": ["x.flac"], "split": ["train"], "label": ["1"]})
    again = _manifest(tmp_path / "again", "fairface2.csv", {"path": ["../fairface/train/1.jpg"], "split": ["train"]})
    same_stem = _manifest(tmp_path / "other", "fairface.csv", {"path": ["z.jpg"], "split": ["train"]})
    out = tmp_path / "m.csv"
    cases = [
        ([a, audio], "cannot merge manifests of different kinds"),
        ([a, again], "1 file(s) are in more than one input"),
        ([a, same_stem], "would both be source 'fairface'"),
        ([a], "needs at least two manifests"),
        ([a, a], "is given twice"),
        ([a, b, "-o", a], "is one of the inputs"),
    ]
    for args, message in cases:
        tail = [] if "-o" in args else ["-o", out]
        proc = run_cli("manifest", "merge", *args, *tail, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (message, proc.stderr)
        assert message in lines[0]
        assert not out.exists()
    (tmp_path / "fairface/train/2.jpg").unlink()  # a missing file names the input it is in
    proc = run_cli("manifest", "merge", a, b, "-o", out, check=False)
    assert proc.returncode == 2 and "fairface.csv" in proc.stderr and "whose file does not exist" in proc.stderr
    out.write_text("keep")
    (tmp_path / "fairface/train/2.jpg").write_bytes(b"x")
    proc = run_cli("manifest", "merge", a, b, "-o", out, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and out.read_text() == "keep"
    assert run_cli("manifest", "merge", a, b, "-o", out, "--overwrite").returncode == 0
