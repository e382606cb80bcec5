"""Adapters on trees rebuilt from the datasets' public repositories and the layouts the field's tools
produce (issue 14), with the wrong results found there as regression tests.

Each fixture names its public source above it.  The facts (folder names, protocol columns, CSV
headers) are the sources'; the rows are made up and tiny.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from featcache.cli import main as cli_main
from featcache.data.adapters import build_manifest, list_adapters, manifest_summary
from featcache.data.manifest import SUBGROUP_NAMES
from featcache.errors import ManifestError

_PNG = io.BytesIO()
Image.new("RGB", (8, 8), (90, 40, 20)).save(_PNG, format="PNG")


def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_PNG.getvalue())
    return path


def flac(path, seconds=0.2):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * 16000), dtype=np.float32), 16000, format="FLAC")


def run(capsys, *args):
    """The CLI in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


# --------------------------------------------------------------------------- FF++, DeepfakeBench layout
# SCLBD/DeepfakeBench preprocessing/rearrange.py reads the official splits from
# <dataset_root>/FaceForensics++/{train,val,test}.json (lists of [id, id] pairs; a fake "a_b" and
# "b_a" take the pair's split) and frames from original_sequences/youtube/<c23|c40|raw>/frames/<video>/
# and manipulated_sequences/<Method>/<comp>/frames/<video>/, with masks/ beside frames/.
# SelfBlendedImages (mapooon/SelfBlendedImages) keeps the same {train,val,test}.json in data/FaceForensics++/.
DFB_SPLITS = {"train": [["071", "054"], ["087", "081"]], "val": [["720", "672"]], "test": [["953", "974"]]}
DFB_FAKES = {"Deepfakes": ["071_054", "054_071", "720_672"], "Face2Face": ["087_081", "953_974"],
             "NeuralTextures": ["974_953", "672_720"]}


def make_deepfakebench_ffpp(root):
    for pairs in DFB_SPLITS.values():
        for a, b in pairs:
            for vid in (a, b):
                for f in ("000.png", "010.png"):
                    png(root / "original_sequences/youtube/c23/frames" / vid / f)
    for method, videos in DFB_FAKES.items():
        for vid in videos:
            png(root / "manipulated_sequences" / method / "c23/frames" / vid / "000.png")
            png(root / "manipulated_sequences" / method / "c23/masks" / vid / "000.png")
    for split, pairs in DFB_SPLITS.items():
        (root / f"{split}.json").write_text(json.dumps(pairs))


def test_ffpp_official_split_files_at_the_root_are_used(tmp_path):
    # Regression: the JSONs at the dataset root were ignored and 96 of 120 rows got another split.
    root = tmp_path / "FaceForensics++"
    make_deepfakebench_ffpp(root)
    m = build_manifest("ffpp", root, tmp_path / "m.csv")
    official = {v: s for s, pairs in DFB_SPLITS.items() for p in pairs for v in p}
    video = m.df["path"].str.split("/").str[-2]
    expected = video.map(lambda v: official[v.split("_")[0]])
    assert (m.df["split"] == expected).all()
    assert m.df["split"].value_counts().to_dict() == {"train": 4 * 2 + 3, "val": 2 * 2 + 2, "test": 2 * 2 + 2}
    assert "official FF++ split files" in m.split_source and str(root / "train.json") in m.split_source
    # the masks beside frames/ are not samples, and say so
    assert any(n.startswith("skipped 3 folder(s) beside frames/") and "Deepfakes/c23/masks/" in n for n in m.notes)


def test_ffpp_videos_only_points_to_the_frames_command(tmp_path):
    # The FF++ download script's recommended c23 videos: original_sequences/youtube/c23/videos/000.mp4
    root = tmp_path / "FaceForensics++"
    (root / "original_sequences/youtube/c23/videos").mkdir(parents=True)
    (root / "original_sequences/youtube/c23/videos/000.mp4").write_bytes(b"\0")
    with pytest.raises(ManifestError, match="featcache frames"):
        build_manifest("ffpp", root, tmp_path / "m.csv")


# --------------------------------------------------------------------------- FF++ published demographics
# Purdue-M2/robust_fairness_withNoisy_labels, dataset/ff++/test_noise.csv and train_real.csv: header
# "Image Path,Ground Truth Gender,Ground Truth Age,Ground Truth Race,Intersection,Target,intersec_label",
# paths "fairness_dataset/deepfakes/ff++/crop_img/0_Deepfakes_300_304_151.png" (fakes) and
# ".../ff++/real/0_youtube_546_131.png" (reals); Intersection is the cleaner code, intersec_label the noisy
# one; codes 0..7 = male-asian, male-white, male-black, male-others, female-asian, ... (the PG-FDD README).
FLAT_ROWS = [  # name, folder, Intersection, intersec_label
    ("0_Deepfakes_300_304_151.png", "crop_img", 1, 3),
    ("0_NeuralTextures_037_072_191.png", "crop_img", 5, 5),
    ("0_FaceSwap_813_700_161.png", "crop_img", 7, 5),
    ("0_youtube_546_131.png", "real", 5, 5),
    ("0_youtube_023_81.png", "real", 0, 3),
]
FLAT_HEADER = ["Image Path", "Ground Truth Gender", "Ground Truth Age", "Ground Truth Race", "Intersection",
               "Target", "intersec_label"]


def make_flat_crops(tmp_path):
    root = tmp_path / "fairness_dataset/deepfakes/ff++"
    rows = []
    for name, folder, clean, noisy in FLAT_ROWS:
        png(root / folder / name)
        rows.append([f"fairness_dataset/deepfakes/ff++/{folder}/{name}", int(clean < 4), 0, clean % 4, clean,
                     int(folder == "crop_img"), noisy])
    csv = tmp_path / "test_noise.csv"
    pd.DataFrame(rows, columns=FLAT_HEADER).to_csv(csv, index=False)
    return root, csv


@pytest.mark.parametrize("column", [None, "Intersection", "intersec_label"])
def test_ffpp_published_csv_on_flat_crops_reads_the_chosen_column(tmp_path, column):
    root, csv = make_flat_crops(tmp_path)
    m = build_manifest("ffpp", root, tmp_path / "m.csv", annotations=csv, label_column=column)
    df = m.df.set_index(m.df["path"].str.split("/").str[-1])
    index = 3 if column == "intersec_label" else 2  # Intersection by default
    for row in FLAT_ROWS:
        assert SUBGROUP_NAMES[df.at[row[0], "subgroup"]] == SUBGROUP_NAMES[row[index]], row
    assert df.at["0_Deepfakes_300_304_151.png", "label"] == 1 and df.at["0_youtube_546_131.png", "label"] == 0
    assert df.at["0_Deepfakes_300_304_151.png", "identity"] == "300"
    assert df.at["0_Deepfakes_300_304_151.png", "method"] == "Deepfakes"
    assert df.at["0_youtube_023_81.png", "identity"] == "023"
    chosen = column or "Intersection"
    assert any(n.startswith(f"demographics from column {chosen} of test_noise.csv") for n in m.notes)


def test_ffpp_flat_crops_keep_swapped_pairs_in_one_split(tmp_path):
    root, _ = make_flat_crops(tmp_path)
    for name in ("0_Deepfakes_304_300_11.png", "0_youtube_304_1.png", "0_youtube_300_1.png"):
        png(root / ("real" if "youtube" in name else "crop_img") / name)
    m = build_manifest("ffpp", root, tmp_path / "m.csv", val_fraction=0.3, test_fraction=0.3)
    split_of = m.df.groupby("identity")["split"].agg(set)
    assert split_of["300"] == split_of["304"] and len(split_of["300"]) == 1


def test_a_ffpp_undefined_code_zero_is_unknown_never_a_group(tmp_path):
    # pterhoer/DeepFakeAnnotations (A-FF++): "A positive attribute label refers to 1, a negative attribute
    # label refers to -1, and a undefined attribute annotation is marked as 0."  Regression: 0 became
    # female / other for 50 of 50 undefined frames.
    root = tmp_path / "FaceForensics++"
    rows = []
    for i in range(50):
        rel = f"original_sequences/youtube/c23/frames/{i:03d}/0000.png"
        png(root / rel)
        rows.append({"img_path": f"/data/FaceForensics++/{rel}", "Male": 0, "Asian": 0, "White": 0, "Black": 0})
    rel = "original_sequences/youtube/c23/frames/050/0000.png"
    png(root / rel)
    rows.append({"img_path": f"/data/FaceForensics++/{rel}", "Male": -1, "Asian": -1, "White": -1, "Black": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "a_ffpp.csv", index=False)
    m = build_manifest("ffpp", root, tmp_path / "m.csv", annotations=tmp_path / "a_ffpp.csv")
    known = m.df[m.df["subgroup"] >= 0]
    assert len(known) == 1 and SUBGROUP_NAMES[known["subgroup"].iloc[0]] == "female-black"
    assert (m.df["gender"] == "").sum() == 50
    assert any(n.startswith("skipped 50 annotation value(s) as unknown") for n in m.notes)


# --------------------------------------------------------------------------- folder
def test_folder_counts_the_folders_it_does_not_read_and_reads_the_processed_crops(tmp_path):
    # Regression: ff++/real + ff++/crop_img became a manifest of reals only, without a word.
    root, _ = make_flat_crops(tmp_path)
    png(root / "masks/0_Deepfakes_300_304_151.png")
    (root / "real/Thumbs.db").write_bytes(b"\0")
    png(root / "crop_img/._0_Deepfakes_300_304_151.png")  # a macOS resource fork
    m = build_manifest("folder", root, tmp_path / "m.csv")
    assert m.df["label"].value_counts().to_dict() == {1: 3, 0: 2}
    assert m.notes[0] == "skipped 1 folder(s) (only real/ and fake/ (bonafide/, spoof/, crop_img/) folders are read): masks/"
    assert m.notes[1] == ("skipped 2 file(s) (not images or audio, or hidden): "
                          "crop_img/._0_Deepfakes_300_304_151.png, real/Thumbs.db")
    assert "seeded split of identities" in m.split_source


# --------------------------------------------------------------------------- Celeb-DF, DeepfakeBench layout
# SCLBD/DeepfakeBench preprocessing/rearrange.py: Celeb-DF-v2/<Celeb-real|YouTube-real|Celeb-synthesis>/
# frames/<video>/*.png, and List_of_testing_videos.txt at the dataset root, lines "1 YouTube-real/00170.mp4"
# (the flag is 1 for real, 0 for fake).
CELEB_VIDEOS = {"Celeb-real": ["id0_0000", "id0_0001", "id1_0000", "id2_0003"], "YouTube-real": ["00170", "00208"],
                "Celeb-synthesis": ["id0_id1_0000", "id1_id0_0000", "id2_id0_0003", "id0_id2_0001"]}
CELEB_TEST = ["1 YouTube-real/00170.mp4", "1 Celeb-real/id0_0001.mp4", "0 Celeb-synthesis/id2_id0_0003.mp4"]


def make_deepfakebench_celebdf(root, test_list=True):
    for folder, videos in CELEB_VIDEOS.items():
        for v in videos:
            png(root / folder / "frames" / v / "000.png")
            png(root / folder / "frames" / v / "030.png")
            (root / folder / f"{v}.mp4").write_bytes(b"\0")
    if test_list:
        (root / "List_of_testing_videos.txt").write_text("\n".join(CELEB_TEST) + "\n")


def test_celebdf_deepfakebench_frames_give_video_identities_and_the_official_test(tmp_path):
    # Regression: every row had identity "frames", all in train, nothing in test.
    root = tmp_path / "Celeb-DF-v2"
    make_deepfakebench_celebdf(root)
    m = build_manifest("celebdf", root, tmp_path / "m.csv", val_fraction=0.3)
    df = m.df
    video = df["path"].str.split("/").str[-2]
    listed = {line.split()[1].split("/")[1][:-4] for line in CELEB_TEST}
    assert set(video[df["split"] == "test"]) == listed
    assert "frames" not in set(df["identity"])
    assert df.set_index(video)["identity"].to_dict()["id2_id0_0003"] == "id2"
    assert len(df) == 2 * sum(len(v) for v in CELEB_VIDEOS.values())
    assert "official List_of_testing_videos.txt" in m.split_source
    assert any(n.startswith("skipped 10 video file(s) (their frames/ folder is read instead)") for n in m.notes)


def test_celebdf_without_the_test_list_says_so(tmp_path):
    root = tmp_path / "Celeb-DF-v2"
    make_deepfakebench_celebdf(root, test_list=False)
    m = build_manifest("celebdf", root, tmp_path / "m.csv")
    assert any("no List_of_testing_videos.txt" in n and "official test split is not used" in n for n in m.notes)
    assert m.split_source.startswith("seeded split of identities")


# --------------------------------------------------------------------------- ASVspoof 2021
# asvspoof-challenge/2021 eval-package/README.md: LA-keys-full.tar.gz unpacks to keys/LA/CM/trial_metadata.txt
# ("CM protocol with keys and meta-labels") and keys/LA/ASV/trial_metadata.txt (ASV protocol); likewise DF, PA.
# CM line: "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval"; DF CM line:
# "LA_0043 DF_E_2000026 mp3m4a asvspoof A09 spoof notrim eval traditional_vocoder - - - -"; ASV line:
# "LA_0007-alaw-ita_tx LA_E_5013670-alaw-ita_tx alaw ita_tx bonafide nontarget notrim eval".  The subset
# column (eval, progress, hidden) selects the official eval trials (main.py --subset eval).
def make_asv21(root):
    cm = {"LA_E_9332881": "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval",
          "LA_E_5849185": "LA_0020 LA_E_5849185 none - bonafide bonafide notrim eval",
          "LA_E_1000001": "LA_0021 LA_E_1000001 ulaw sin_tx A13 spoof notrim progress",
          "LA_E_1000002": "LA_0022 LA_E_1000002 gsm pstn_tx A11 spoof notrim hidden_track"}
    (root / "keys/LA/CM").mkdir(parents=True)
    (root / "keys/LA/CM/trial_metadata.txt").write_text("\n".join(cm.values()) + "\n")
    (root / "keys/LA/ASV").mkdir(parents=True)
    (root / "keys/LA/ASV/trial_metadata.txt").write_text(
        "LA_0007-alaw-ita_tx LA_E_5013670-alaw-ita_tx alaw ita_tx bonafide nontarget notrim eval\n")
    (root / "keys/PA/CM").mkdir(parents=True)
    (root / "keys/PA/CM/trial_metadata.txt").write_text("PA_0001 PA_E_1000001 aaa A01 Ba Bb spoof notrim eval\n")
    for utt in cm:
        flac(root / "ASVspoof2021_LA_eval/flac" / f"{utt}.flac")
    flac(root / "ASVspoof2021_LA_eval/flac/LA_E_9999999.flac")  # in no key file


def test_asvspoof21_key_package_reads_cm_keys_only_and_selects_the_eval_subset(tmp_path):
    # Regression: the ASV file was read and stopped with "key 'nontarget' is neither bonafide nor spoof".
    root = tmp_path / "asv21"
    make_asv21(root)
    m = build_manifest("asvspoof21", root, tmp_path / "all.csv")
    assert m.df["subset"].value_counts().to_dict() == {"eval": 2, "progress": 1, "hidden_track": 1}
    assert m.notes[0] == ("skipped 2 key file(s) (ASV and PA keys carry no LA/DF countermeasure labels): "
                          "keys/LA/ASV/trial_metadata.txt, keys/PA/CM/trial_metadata.txt")
    assert m.notes[1] == ("skipped 1 audio file(s) (in no protocol or key file): "
                          "ASVspoof2021_LA_eval/flac/LA_E_9999999.flac")
    ev = build_manifest("asvspoof21", root, tmp_path / "eval.csv", subset="eval")
    assert sorted(ev.df["sample_id"].str.split("/").str[-1]) == ["LA_E_5849185.flac", "LA_E_9332881.flac"]
    assert ev.df["label"].tolist() == [0, 1] or ev.df["label"].tolist() == [1, 0]
    assert any("left out 2 trial(s) of other subsets (hidden_track 1, progress 1)" in n for n in ev.notes)
    with pytest.raises(ManifestError, match="eval, hidden_track, progress"):
        build_manifest("asvspoof21", root, tmp_path / "x.csv", subset="evaluation")
    summary = manifest_summary(ev)
    assert "split x label x attack" in summary and "A07" in summary


# --------------------------------------------------------------------------- COCO gender
# princetonvisualai/imagecaptioning-bias: the COCO gender CSV with columns id, bb_gender (Male/Female/Unsure).
# COCO 2017's annotations folder holds instances_*.json, captions_*.json and person_keypoints_*.json.
def make_coco(root):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in (139, 285, 632, 724)]
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (ann / "instances_val2017.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    (ann / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": []}))
    (ann / "person_keypoints_val2017.json").write_text(json.dumps({"images": images, "annotations": []}))
    for im in images:
        png(root / "val2017" / im["file_name"])
    pd.DataFrame({"id": [139, 285, 632], "bb_gender": ["Male", "Female", "Unsure"]}).to_csv(
        root.parent / "coco_gender.csv", index=False)
    return root.parent / "coco_gender.csv"


def test_coco_gender_reads_instances_only_and_the_public_csv_with_a_gender_map(tmp_path):
    # Regression: all three JSONs were read (duplicate sample_ids), the public CSV and Unsure were refused.
    root = tmp_path / "coco"
    csv = make_coco(root)
    with pytest.raises(ManifestError, match="--gender-map Unsure=unknown"):
        build_manifest("coco-gender", root, tmp_path / "m.csv", annotations=csv)
    m = build_manifest("coco-gender", root, tmp_path / "m.csv", annotations=csv, gender_map="Unsure=unknown")
    assert m.df.set_index("image_id")["gender"].to_dict() == {"139": "male", "285": "female", "632": ""}
    assert (m.df["annotations"] == "coco/annotations/instances_val2017.json").all()
    assert m.notes[0].startswith("1 image(s) kept with unknown gender")
    assert m.notes[1] == ("skipped 2 JSON file(s) (not instance annotations; only instances_*.json hold the boxes): "
                          "captions_val2017.json, person_keypoints_val2017.json")
    (tmp_path / "map.yaml").write_text("Unsure: unknown\n")
    again = build_manifest("coco-gender", root, tmp_path / "m2.csv", annotations=csv, gender_map=tmp_path / "map.yaml")
    assert again.df["gender"].tolist() == m.df["gender"].tolist()
    assert m.notes[2] == "skipped 1 COCO image(s) (no row in coco_gender.csv): instances_val2017.json:724"
    with pytest.raises(ManifestError, match="applies only to the coco-gender"):
        build_manifest("ffpp", root, tmp_path / "m3.csv", gender_map="Unsure=unknown")


# --------------------------------------------------------------------------- FAAP
# FAAP's faap_gan layout: ROOT/{women,men}_split/{train,val,test}/ with gender_{women,men}_{split}.json.
def make_faap(root, skip=()):
    for group in ("women", "men"):
        for split in ("train", "val", "test"):
            name = f"gender_{group}_{split}.json"
            if name in skip:
                continue
            image_id = hash((group, split)) % 10000
            png(root / f"{group}_split" / split / f"{image_id:012d}.jpg")
            (root / f"{group}_split" / name).write_text(json.dumps(
                {"images": [{"id": image_id, "file_name": f"{image_id:012d}.jpg"}], "annotations": []}))


def test_faap_coco_names_a_missing_file_and_a_root_one_level_too_deep(tmp_path):
    root = tmp_path / "faap"
    make_faap(root, skip={"gender_men_val.json"})
    m = build_manifest("faap-coco", root, tmp_path / "m.csv")
    assert m.notes == ["missing FAAP annotation file(s): men_split/gender_men_val.json (so val has women only)"]
    with pytest.raises(ManifestError, match=f"one level too deep; pass the folder that holds both: {root}"):
        build_manifest("faap-coco", root / "women_split", tmp_path / "m2.csv")


# --------------------------------------------------------------------------- CLI: help, summary, overwrite
def test_manifest_help_lists_every_registered_format(capsys):
    code, out, _ = run(capsys, "manifest", "--help")
    assert code == 0
    text = " ".join(out.split())
    for name in list_adapters():
        assert name in text
    assert {"faap-coco", "coco-gender"} <= set(list_adapters())


def test_manifest_prints_a_summary_and_refuses_to_overwrite(tmp_path, capsys):
    root = tmp_path / "Celeb-DF-v2"
    make_deepfakebench_celebdf(root)
    out = tmp_path / "m.csv"
    code, text, _ = run(capsys, "manifest", "celebdf", root, "-o", out)
    assert code == 0
    df = pd.read_csv(out, keep_default_na=False)
    # the summary's "all" row per split equals an independent count of the CSV
    for split, n in df["split"].value_counts().items():
        line = next(ln for ln in text.splitlines() if ln.split()[:2] == [split, "all"])
        assert int(line.split()[-1]) == n
    assert "split source: test: the official List_of_testing_videos.txt" in text
    assert "skipped 10 video file(s)" in text
    # Regression (issue 19, 7): -o onto an existing manifest replaced it without a word
    before = out.read_bytes()
    code, _, err = run(capsys, "manifest", "celebdf", root, "-o", out, "--seed", "5")
    assert code == 2 and err.startswith("error:") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    code, _, _ = run(capsys, "manifest", "celebdf", root, "-o", out, "--seed", "5", "--overwrite")
    assert code == 0


@pytest.mark.parametrize("kind", ["faces", "audio", "detection"])
def test_synth_into_a_non_empty_folder_needs_overwrite(tmp_path, capsys, kind):
    # Regression (issue 19, 8): synth faces into a folder holding the audio set replaced its manifest.
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.csv").write_text("sample_id,path,split\n")
    code, _, err = run(capsys, "synth", kind, out, "--n", "10", "-q")
    assert code == 2 and err.startswith("error:") and "--overwrite" in err
    assert (out / "manifest.csv").read_text() == "sample_id,path,split\n"


# --------------------------------------------------------------------------- AI-Face
# Purdue-M2/AI-Face-FairnessBench README: the dataset's train.csv and test.csv have the columns Image Path,
# Uncertainty Score Gender/Age/Race, Ground Truth Gender (1 male, 0 female), Ground Truth Age, Ground Truth
# Race (0 Asian, 1 White, 2 Black, 3 Others), Intersection (0-(Male,Asian) ... 7-(Female,Others)), Target
# (0 real, 1 fake); the images sit in generator folders "AI-Face Dataset/AttGAN", "Latent_Diffusion", ...
def test_aiface_csvs_give_labels_demographics_and_the_official_test(tmp_path):
    root = tmp_path / "AI-Face Dataset"
    header = ["Image Path", "Uncertainty Score Gender", "Uncertainty Score Age", "Uncertainty Score Race",
              "Ground Truth Gender", "Ground Truth Age", "Ground Truth Race", "Intersection", "Target"]
    files = {"train": [("AttGAN/img_001.png", 6, 1), ("ff++/real/0_youtube_546_131.png", 5, 0),
                       ("Palette/x/img_9.png", 1, 1), ("Latent_Diffusion/a.png", 3, 1)],
             "test": [("Latent_Diffusion/b.png", 4, 1), ("ff++/real/0_youtube_023_81.png", 9, 0)]}
    for split, rows in files.items():
        for rel, _, _ in rows:
            png(root / rel)
        pd.DataFrame([[f"/home/lin/data/AI-Face Dataset/{rel}", 0.1, 0.2, 0.3, int(code < 4), 1, code % 4, code, t]
                      for rel, code, t in rows], columns=header).to_csv(tmp_path / f"{split}.csv", index=False)
    png(root / "AttGAN/not_listed.png")
    m = build_manifest("aiface", root, tmp_path / "m.csv", annotations=tmp_path, val_fraction=0.25)
    df = m.df.set_index(m.df["path"].str.split("AI-Face Dataset/").str[-1])
    assert len(df) == 6
    assert SUBGROUP_NAMES[df.at["AttGAN/img_001.png", "subgroup"]] == "female-black"
    assert df.at["AttGAN/img_001.png", "method"] == "AttGAN" and df.at["AttGAN/img_001.png", "label"] == 1
    assert df.at["ff++/real/0_youtube_546_131.png", "label"] == 0
    assert df.at["ff++/real/0_youtube_023_81.png", "subgroup"] == -1  # 9 is no code: unknown, counted
    assert set(df.loc[["Latent_Diffusion/b.png", "ff++/real/0_youtube_023_81.png"], "split"]) == {"test"}
    assert df["split"].value_counts().to_dict() == {"train": 3, "test": 2, "val": 1}
    assert "skipped 1 Intersection value(s) as unknown (not a code 0..7): test.csv line 3" in m.notes
    assert "skipped 1 image(s) (in neither train.csv nor test.csv): AttGAN/not_listed.png" in m.notes


# mapooon/SelfBlendedImages data/datasets.md: Celeb-DF-v2/{Celeb-real,Celeb-synthesis,Youtube-real}/videos/*.mp4
# (it spells "Youtube-real") and List_of_testing_videos.txt beside them.
def test_celebdf_selfblendedimages_videos_folders(tmp_path):
    root = tmp_path / "Celeb-DF-v2"
    for rel in ("Celeb-real/videos/id0_0000.mp4", "Celeb-real/videos/id1_0002.mp4", "Youtube-real/videos/00170.mp4",
                "Celeb-synthesis/videos/id0_id1_0000.mp4", "Celeb-synthesis/videos/id1_id0_0002.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\0")
    (root / "List_of_testing_videos.txt").write_text("1 YouTube-real/00170.mp4\n0 Celeb-synthesis/id1_id0_0002.mp4\n")
    m = build_manifest("celebdf", root, tmp_path / "m.csv", check_files=True)
    df = m.df.set_index(m.df["path"].str.split("/").str[-1])
    assert len(df) == 5 and "videos" not in set(df["identity"])
    assert df.at["00170.mp4", "split"] == "test" and df.at["id1_id0_0002.mp4", "split"] == "test"
    assert df.at["id0_id1_0000.mp4", "identity"] == "id0" and df.at["id0_id1_0000.mp4", "label"] == 1
    assert (df.loc[["id0_0000.mp4", "id1_0002.mp4", "id0_id1_0000.mp4"], "split"] != "test").all()


# --------------------------------------------------------------------------- CausalFace
# hliang2.github.io/BenchmarkingReco (the authors' page, ICCV 2023): "48,000 synthetic face image pairs (10,200
# unique synthetic faces)", prototypes "varying systematically race and gender (M=Male, F=Female, W=White,
# B=Black, A=East Asian)", each modified along pose, lighting, age, expression.  The archive's layout is not
# written there; a public loader of the release (datasets/causalface.py, class CausalFaceDataset) reads
# <basepath>/final_picked_<age|lighting|pose|smiling>/seed_<N>/<race>_<gender>_<abbr>_<value><suffix>.png with
# abbr age -> "age", lighting -> "l", pose -> "y", smiling -> "smiling", suffix "_o2" (age), "_o2_corrected"
# (smiling), and "_rm_bg" copies with the background removed.
CAUSALFACE = {"age": ("age", "_o2", [0.8, 2.3]), "pose": ("y", "", [-1.5, 0.0]), "smiling": ("smiling", "_o2_corrected", [0])}
CAUSALFACE_SEEDS = (47180, 57460, 1002, 1003, 1004)


def make_causalface(root):
    for attribute, (abbr, suffix, values) in CAUSALFACE.items():
        for seed in CAUSALFACE_SEEDS:
            for race in ("asian", "black", "white"):
                for gender in ("female", "male"):
                    for v in values:
                        png(root / f"final_picked_{attribute}/seed_{seed}/{race}_{gender}_{abbr}_{v}{suffix}.png")
    png(root / "final_picked_age/seed_47180/black_female_age_0.8_o2_rm_bg.png")
    (root / "final_picked_age/seed_47180/notes.txt").write_text("x")


def test_causalface_reads_race_gender_from_names_and_keeps_a_seed_in_one_split(tmp_path):
    root = tmp_path / "causalface"
    make_causalface(root)
    m = build_manifest("causalface", root, tmp_path / "m.csv", val_fraction=0.2, test_fraction=0.2)
    df = m.df
    per_seed = sum(len(v) for _, _, v in CAUSALFACE.values()) * 6
    assert len(df) == per_seed * len(CAUSALFACE_SEEDS)
    # every (race, gender) pair is 1/6 of the rows; "asian" is CausalFace's East Asian group
    counts = df.groupby(["race", "gender"]).size()
    assert set(counts) == {per_seed * len(CAUSALFACE_SEEDS) // 6} and set(df["race"]) == {"asian", "black", "white"}
    row = df[df["path"].str.endswith("seed_47180/black_female_y_-1.5.png")].iloc[0]
    assert (row["identity"], row["variation"], row["label"]) == ("seed_47180/black_female", "pose=-1.5", -1)
    assert SUBGROUP_NAMES[row["subgroup"]] == "female-black"
    seed_of = df["path"].str.extract(r"(seed_\d+)")[0]
    assert (df.groupby(seed_of)["split"].nunique() == 1).all() and set(df["split"]) == {"train", "val", "test"}
    assert "skipped 1 background-removed copies (the same faces as the images beside them)" in m.notes[0]
    assert any("final_picked_age/seed_47180/notes.txt" in n for n in m.notes)
    with pytest.raises(ManifestError, match="no final_picked_<attribute> folder"):
        build_manifest("causalface", root / "final_picked_age" / "seed_1002", tmp_path / "x.csv")


# --------------------------------------------------------------------------- DFDC
# Kaggle deepfake-detection-challenge data page: metadata.json columns "filename", "label" (REAL or FAKE),
# "original" ("in the case that a train set video is FAKE, the original video is listed here"), "split"
# ("always equal to train"); the full set comes as 50 parts dfdc_train_part_0..49.  SCLBD/DeepfakeBench
# preprocessing/rearrange.py (DFDC): DFDC/train/dfdc_train_part_*/metadata.json with frames in
# dfdc_train_part_*/frames/<video>/, and DFDC/test/labels.csv (columns filename, label; 0 real, 1 fake) with
# test/frames/<video>/.
DFDC_META = {"aaqaifqrwn.mp4": {"label": "FAKE", "split": "train", "original": "vudstovrck.mp4"},
             "abarnvbtwb.mp4": {"label": "FAKE", "split": "train", "original": "vudstovrck.mp4"},
             "vudstovrck.mp4": {"label": "REAL", "split": "train", "original": None},
             "bqkdbnqhxa.mp4": {"label": "REAL", "split": "train"},
             "gone_video.mp4": {"label": "FAKE", "split": "train", "original": "bqkdbnqhxa.mp4"}}


def make_dfdc(root, frames=True):
    part = root / "train/dfdc_train_part_0"
    part.mkdir(parents=True)
    (part / "metadata.json").write_text(json.dumps(DFDC_META))
    for name in [n for n in DFDC_META if n != "gone_video.mp4"] + ["extra_video.mp4"]:
        (part / name).write_bytes(b"\0")
        if frames and name != "extra_video.mp4":
            for f in ("0.png", "1.png"):
                png(part / "frames" / name[:-4] / f)
    test = root / "test"
    test.mkdir()
    (test / "labels.csv").write_text("filename,label\naalscayrfi.mp4,1\naapnvogymq.mp4,0\n")
    for name in ("aalscayrfi", "aapnvogymq"):
        (test / f"{name}.mp4").write_bytes(b"\0")
        if frames:
            png(test / "frames" / name / "0.png")


def test_dfdc_metadata_labels_originals_and_the_test_labels(tmp_path):
    root = tmp_path / "DFDC"
    make_dfdc(root)
    m = build_manifest("dfdc", root, tmp_path / "m.csv", val_fraction=0.5)
    df = m.df.set_index(m.df["path"].str.split("/").str[-2])
    assert len(df) == 4 * 2 + 2  # the frames of 4 train videos and 2 test videos
    assert df.loc["aaqaifqrwn", "label"].tolist() == [1, 1] and df.loc["vudstovrck", "label"].tolist() == [0, 0]
    # a fake takes its original's identity, so both fakes of vudstovrck share its split
    assert set(df.loc[["aaqaifqrwn", "abarnvbtwb", "vudstovrck"], "identity"]) == {"vudstovrck"}
    assert df.loc[["aaqaifqrwn", "abarnvbtwb", "vudstovrck"], "split"].nunique() == 1
    assert df.loc["aalscayrfi", "label"] == 1 and df.loc["aapnvogymq", "label"] == 0
    assert set(df.loc[["aalscayrfi", "aapnvogymq"], "split"]) == {"test"}
    assert set(df.loc[df["split"] != "test", "split"]) == {"train", "val"}
    assert "test: the official test/labels.csv" in m.split_source
    assert "skipped 1 listed video(s) (neither the video nor its frames are under ROOT): " \
           "train/dfdc_train_part_0/gone_video" in m.notes
    assert "skipped 1 video file(s) (in no metadata.json or labels.csv): " \
           "train/dfdc_train_part_0/extra_video.mp4" in m.notes
    assert any(n.startswith("skipped 6 video file(s) (their frames/ folder is read instead)") for n in m.notes)


def test_dfdc_reads_a_dfdc_style_demographics(tmp_path):
    # pterhoer/DeepFakeAnnotations README: annotations for Celeb-DF, DFD, FF++, DF-1.0 and DFDC (A-DFDC); "A positive
    # attribute label refers to 1, a negative attribute label refers to -1, and a undefined attribute annotation is
    # marked as 0."  The rows carry their authors' paths; they match frames by the last path components.
    root = tmp_path / "DFDC"
    make_dfdc(root)
    frames = "/home/a/DFDC/train/dfdc_train_part_0/frames"
    pd.DataFrame([(f"{frames}/aaqaifqrwn/0.png", 1, -1, -1, 1), (f"{frames}/aaqaifqrwn/1.png", 1, -1, -1, 1),
                  (f"{frames}/vudstovrck/0.png", -1, 1, -1, -1), (f"{frames}/vudstovrck/1.png", 0, 0, 0, 0)],
                 columns=["img_path", "Male", "Asian", "White", "Black"]).to_csv(tmp_path / "a_dfdc.csv", index=False)
    m = build_manifest("dfdc", root, tmp_path / "m.csv", annotations=tmp_path / "a_dfdc.csv")
    df = m.df.set_index(m.df["path"].str.split("/").str[-2:].str.join("/"))
    assert SUBGROUP_NAMES[df.at["aaqaifqrwn/1.png", "subgroup"]] == "male-black"
    assert SUBGROUP_NAMES[df.at["vudstovrck/0.png", "subgroup"]] == "female-asian"
    assert df.at["vudstovrck/1.png", "subgroup"] == -1 and (df["subgroup"] >= 0).sum() == 3
    assert any(n.startswith("skipped 1 annotation value(s) as unknown") for n in m.notes)


def test_dfdc_videos_without_frames_and_a_bad_label(tmp_path):
    root = tmp_path / "DFDC"
    make_dfdc(root, frames=False)
    m = build_manifest("dfdc", root, tmp_path / "m.csv")
    assert sorted(m.df["path"].str.split("/").str[-1]) == sorted(
        [n for n in DFDC_META if n != "gone_video.mp4"] + ["aalscayrfi.mp4", "aapnvogymq.mp4"])
    meta = dict(DFDC_META, **{"vudstovrck.mp4": {"label": "ORIGINAL"}})
    (root / "train/dfdc_train_part_0/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ManifestError, match="label 'ORIGINAL' is neither REAL nor FAKE"):
        build_manifest("dfdc", root, tmp_path / "m2.csv")


# --------------------------------------------------------------------------- DF40
# YZY-stack/DF40 README: 40 methods (10 face-swapping, 13 reenactment, 12 entire face synthesis, 5 editing) made
# from FF++ and Celeb-DF; the processed training and testing data hold "fake images only"; "For 'unknown' 9
# methods: The real data is already included within the folder".  DF40 issue #33: the download "came with two
# directories named train and test".  DeepfakeBench_DF40/preprocessing/preprocess.py: DF40/<method>/<ff|cdf>/
# (videos, then frames/<video>/ beside them); rearrange.py: <method>/cdfv2/frames/<video>/, e4e/ff/inversions/<img>.
# Issue #29: heygen ships "only videos in the fake folder", CollabDiff has fake/ and real/ folders.
DF40_TREE = ["train/simswap/ff/frames/000_003/000.png", "train/simswap/ff/frames/000_003/010.png",
             "train/simswap/ff/frames/001_870/000.png", "train/simswap/ff/frames/002_006/000.png",
             "train/fsgan/ff/frames/000_003/000.png", "train/fsgan/ff/frames/004_982/000.png",
             "test/simswap/cdf/frames/id0_id1_0000/000.png", "test/e4e/ff/inversions/183.png",
             "test/CollabDiff/fake/00001.png", "test/CollabDiff/real/00001.png"]


def test_df40_methods_domains_reals_and_the_release_split(tmp_path):
    root = tmp_path / "DF40"
    for rel in DF40_TREE:
        png(root / rel)
    (root / "train/dataset.json").write_text("{}")
    (root / "test/heygen/fake").mkdir(parents=True)
    (root / "test/heygen/fake/clip_01.mp4").write_bytes(b"\0")
    m = build_manifest("df40", root, tmp_path / "m.csv", val_fraction=0.3)
    df = m.df.set_index(m.df["path"].str.split("DF40/").str[-1])
    assert len(df) == len(DF40_TREE)
    assert df.at["train/simswap/ff/frames/000_003/000.png", "method"] == "simswap"
    assert df.at["train/simswap/ff/frames/000_003/000.png", "identity"] == "ff/000_003"
    assert df.at["test/simswap/cdf/frames/id0_id1_0000/000.png", "domain"] == "cdf"
    assert df.at["test/e4e/ff/inversions/183.png", "identity"] == "ff/183"
    assert df.at["test/CollabDiff/real/00001.png", "label"] == 0 and df["label"].sum() == len(DF40_TREE) - 1
    assert (df.loc[[r for r in DF40_TREE if r.startswith("test/")], "split"] == "test").all()
    train = df[df.index.str.startswith("train/")]
    assert set(train["split"]) == {"train", "val"} and (train.groupby("identity")["split"].nunique() == 1).all()
    # the same FF++ pair across two methods is one identity, so one split
    assert train.loc[train["identity"] == "ff/000_003", "method"].nunique() == 2
    assert "skipped 1 video file(s) (videos are not read" in m.notes[1] and "heygen/fake/clip_01.mp4" in m.notes[1]
    assert "the release's test/ and train/ folders" in m.split_source
    assert "skipped 1 file(s) outside the method folders (only the images in <method>/ folders are read): " \
           "train/dataset.json" in m.notes
    # another dataset's tree is not read as DF40 methods (FF++'s original_sequences/ is no method folder)
    ffpp = tmp_path / "FaceForensics++"
    make_deepfakebench_ffpp(ffpp)
    with pytest.raises(ManifestError, match="no DF40 method folders"):
        build_manifest("df40", ffpp, tmp_path / "m3.csv")
    with pytest.raises(ManifestError, match="the df40 format reads no --annotations"):
        build_manifest("df40", root, tmp_path / "m2.csv", annotations=tmp_path / "m.csv")


# --------------------------------------------------------------------------- the Stage-1 union, from the CLI
def test_manifest_merge_cli_makes_the_stage1_union(tmp_path, capsys):
    # FairFace (joojs/fairface README: fairface_label_{train,val}.csv with file,age,gender,race,service_test) and
    # CausalFace (above), each from its own folder, merged as the design's Stage-1 union.
    ff = tmp_path / "fairface"
    rows = [("train/1.jpg", "Male", "East Asian"), ("train/2.jpg", "Female", "Black"), ("val/1.jpg", "Female", "White")]
    for file, _, _ in rows:
        png(ff / file)
    pd.DataFrame([(f, "20-29", g, r, "True") for f, g, r in rows],
                 columns=["file", "age", "gender", "race", "service_test"]).to_csv(ff / "fairface_label_train.csv",
                                                                                   index=False)
    make_causalface(tmp_path / "causalface")
    assert run(capsys, "manifest", "fairface", ff, "-o", tmp_path / "m/fairface.csv")[0] == 0
    assert run(capsys, "manifest", "causalface", tmp_path / "causalface", "-o", tmp_path / "m/causalface.csv")[0] == 0
    out = tmp_path / "stage1/stage1.csv"
    code, text, _ = run(capsys, "manifest", "merge", tmp_path / "m/fairface.csv", tmp_path / "m/causalface.csv",
                        "-o", out)
    assert code == 0
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    n_causal = len(pd.read_csv(tmp_path / "m/causalface.csv"))
    assert df["source"].value_counts().to_dict() == {"causalface": n_causal, "fairface": 3}
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["causalface"])
    assert int(line.split()[-1]) == n_causal  # the summary's per-source total
    assert set(df.loc[df["source"] == "fairface", "identity"]) == {"fairface/train/1", "fairface/train/2",
                                                                   "fairface/val/1"}
    assert (df["path"].map(lambda p: (out.parent / p).resolve().is_file())).all()
    assert set(df.columns) >= {"variation", "source"} and (df.loc[df["source"] == "fairface", "variation"] == "").all()
