"""Audio dataset adapters on small trees in the datasets' real layouts."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from featcache.data.adapters import build_manifest, list_adapters
from featcache.errors import ManifestError


def _flac(path, seconds=0.5, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.float32), rate, format=path.suffix[1:].upper())


def _by_utt(df):
    return df.assign(utt=df["sample_id"].str.rsplit("/", n=1).str[-1].str.split(".").str[0]).set_index("utt")


def test_audio_adapters_are_registered():
    assert {"asvspoof19", "asvspoof21", "partialspoof", "folder"} <= set(list_adapters())


def test_asvspoof19_la_protocols(tmp_path):
    root = tmp_path / "LA"
    proto = root / "ASVspoof2019_LA_cm_protocols"
    proto.mkdir(parents=True)
    (proto / "ASVspoof2019.LA.cm.train.trn.txt").write_text(
        "LA_0079 LA_T_1138215 - - bonafide\nLA_0079 LA_T_1271820 - A01 spoof\n")
    (proto / "ASVspoof2019.LA.cm.dev.trl.txt").write_text("LA_0069 LA_D_1047731 - - bonafide\n")
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text("LA_0039 LA_E_2834763 - A11 spoof\n")
    for split, utts in {"train": ["LA_T_1138215", "LA_T_1271820"], "dev": ["LA_D_1047731"], "eval": ["LA_E_2834763"]}.items():
        for u in utts:
            _flac(root / f"ASVspoof2019_LA_{split}" / "flac" / f"{u}.flac")
    df = _by_utt(build_manifest("asvspoof19", root, tmp_path / "m.csv").df)
    assert df.loc["LA_T_1271820", ["label", "split", "identity", "method"]].tolist() == [1, "train", "LA_0079", "A01"]
    assert df.loc["LA_T_1138215", ["label", "method"]].tolist() == [0, ""]
    assert df.loc["LA_D_1047731", "split"] == "val" and df.loc["LA_E_2834763", "split"] == "test"
    assert df.loc["LA_E_2834763", "path"] == "LA/ASVspoof2019_LA_eval/flac/LA_E_2834763.flac"
    (root / "ASVspoof2019_LA_eval" / "flac" / "LA_E_2834763.flac").unlink()
    with pytest.raises(ManifestError, match="LA_E_2834763"):
        build_manifest("asvspoof19", root, tmp_path / "m2.csv")
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text("LA_0039 LA_T_1138215 - A11 fake\n")
    with pytest.raises(ManifestError, match="neither bonafide nor spoof"):
        build_manifest("asvspoof19", root, tmp_path / "m3.csv")


def test_asvspoof21_trial_metadata(tmp_path):
    root = tmp_path / "asv21"
    (root / "keys/LA/CM").mkdir(parents=True)
    (root / "keys/LA/CM/trial_metadata.txt").write_text(
        "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval\nLA_0020 LA_E_5849185 none - bonafide bonafide notrim progress\n")
    (root / "keys/DF/CM").mkdir(parents=True)
    (root / "keys/DF/CM/trial_metadata.txt").write_text(
        "LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof notrim progress traditional_vocoder - - - -\n")
    for u in ("LA_E_9332881", "LA_E_5849185"):
        _flac(root / "ASVspoof2021_LA_eval/flac" / f"{u}.flac")
    _flac(root / "ASVspoof2021_DF_eval/flac/DF_E_2000011.flac")
    df = _by_utt(build_manifest("asvspoof21", root, tmp_path / "m.csv").df)
    assert set(df["split"]) == {"test"}
    assert df.loc["LA_E_9332881", ["label", "dataset", "method", "identity"]].tolist() == [1, "asvspoof21la", "A07", "LA_0009"]
    assert df.loc["LA_E_5849185", ["label", "method"]].tolist() == [0, ""]
    assert df.loc["DF_E_2000011", ["label", "dataset", "method"]].tolist() == [1, "asvspoof21df", "A14"]


def _partialspoof(root, bona_value: str):
    spoof_value = "0" if bona_value == "1" else "1"
    db = root / "database"
    proto = root / "protocols/PartialSpoof_LA_cm_protocols"
    proto.mkdir(parents=True)
    (proto / "PartialSpoof.LA.cm.train.trn.txt").write_text(
        "LA_0079 CON_T_0000001 - - bonafide\nLA_0080 CON_T_0000002 - A05 spoof\n")
    _flac(db / "train/con_wav/CON_T_0000001.wav", 0.64)
    _flac(db / "train/con_wav/CON_T_0000002.wav", 0.60)  # the last 0.16 s segment is cut at 0.60 s
    (db / "segment_labels").mkdir(parents=True)
    b, s = bona_value, spoof_value
    np.save(db / "segment_labels/train_seglab_0.16.npy", {
        "CON_T_0000001": np.array([b, b, b, b]), "CON_T_0000002": np.array([b, s, s, b])}, allow_pickle=True)
    np.save(db / "segment_labels/train_seglab_0.32.npy", {  # coarser: not used
        "CON_T_0000001": np.array([b, b]), "CON_T_0000002": np.array([s, s])}, allow_pickle=True)


@pytest.mark.parametrize("bona_value", ["1", "0"])
def test_partialspoof_segments_and_polarity(tmp_path, bona_value):
    root = tmp_path / "PartialSpoof"
    _partialspoof(root, bona_value)
    expected = "1 = bonafide, 0 = spoof" if bona_value == "1" else "0 = bonafide, 1 = spoof"
    m = build_manifest("partialspoof", root, tmp_path / "m.csv")
    assert any(expected in n for n in m.notes)
    df = _by_utt(m.df)
    assert df.loc["CON_T_0000002", "segments"] == "0.16-0.48"
    assert df.loc["CON_T_0000001", "segments"] == "" and df.loc["CON_T_0000001", "label"] == 0
    assert df.loc["CON_T_0000002", ["label", "method", "split"]].tolist() == [1, "A05", "train"]


def test_partialspoof_refuses_pickled_code(tmp_path):
    root = tmp_path / "PartialSpoof"
    _partialspoof(root, "1")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    arr = np.empty((), dtype=object)
    arr[()] = {"CON_T_0000001": Evil()}
    with open(root / "database/segment_labels/train_seglab_0.16.npy", "wb") as fh:
        np.lib.format.write_array(fh, arr, allow_pickle=True)
    with pytest.raises(ManifestError, match="not allowed"):
        build_manifest("partialspoof", root, tmp_path / "m.csv")


def test_folder_adapter_reads_audio(tmp_path):
    root = tmp_path / "voices"
    for split in ("train", "test"):
        _flac(root / split / "bonafide" / "spk1" / "a.wav")
        _flac(root / split / "spoof" / "spk2" / "b.flac")
    df = _by_utt(build_manifest("folder", root, tmp_path / "m.csv", val_fraction=0).df)
    assert len(df) == 4 and sorted(df["label"].tolist()) == [0, 0, 1, 1]
    assert set(df.loc[df["path"].str.contains("/spoof/"), "label"]) == {1}
