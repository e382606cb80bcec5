"""Manifest adapters of the audio anti-spoofing datasets: ASVspoof 2019 LA, ASVspoof 2021, PartialSpoof.

Audio files are found anywhere under ROOT by utterance id (their file stem), ``.flac`` or ``.wav``;
a protocol row whose audio is missing is an error that lists the first few.  Labels: bonafide 0,
spoof 1; ``identity`` is the speaker, ``method`` the spoofing system (empty for bonafide).
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import ManifestError
from ..audio import format_segments
from .common import AUDIO_EXTENSIONS, ROW_COLUMNS, Notes, list_files, register_adapter
from .common import listing as _listing

COLUMNS = (*ROW_COLUMNS, "segments")
_SPLIT_OF = {"train": "train", "dev": "val", "eval": "test"}


def _audio_index(root: Path) -> dict[str, Path]:
    """Utterance id -> audio file; where an id has several files, a regular file before a link,
    then the first in path order."""
    index: dict[str, Path] = {}
    for p in sorted(list_files(root, AUDIO_EXTENSIONS), key=lambda p: (p.is_symlink(), str(p))):
        index.setdefault(p.stem, p)
    return index


def _protocol_lines(path: Path, min_columns: int, what: str):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) < min_columns:
            raise ManifestError(f"{path}: line {n} has {len(cols)} columns, a {what} line has at least {min_columns}: {line!r}")
        yield n, cols


def _key_label(key: str, path: Path, n: int) -> int:
    if key not in ("bonafide", "spoof"):
        raise ManifestError(f"{path}: line {n}: key {key!r} is neither bonafide nor spoof")
    return int(key == "spoof")


def _note_unlisted(notes: Notes, audio: dict[str, Path], listed: set[str], root: Path) -> None:
    """Count the audio files under ROOT that no protocol line names."""
    unlisted = sorted(p.relative_to(root).as_posix() for utt, p in audio.items() if utt not in listed)
    notes.skipped("audio file(s)", unlisted, "in no protocol or key file")


def _rows_frame(rows: list[dict], audio: dict[str, Path], root: Path, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    missing = [r["utt"] for r in rows if r["utt"] not in audio]
    if missing:
        raise ManifestError(f"{root}: {len(missing)} utterance(s) of the protocol have no .flac or .wav file under "
                            f"the folder: {_listing(missing)}")
    out = []
    for r in rows:
        path = audio[r.pop("utt")]
        out.append({"sample_id": f"{r['dataset']}/{path.relative_to(root).as_posix()}", "path": str(path),
                    "gender": "", "race": "", **r})
    return pd.DataFrame(out, columns=[*COLUMNS, *extra]).sort_values("path", kind="stable").reset_index(drop=True)


def _find(root: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    if not found:
        raise ManifestError(f"{root}: no {what} ({pattern}) found under the folder")
    return found


@register_adapter("asvspoof19")
def asvspoof19_adapter(root: Path, *, notes: Notes, **_) -> pd.DataFrame:
    """ASVspoof 2019 LA: ``ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt`` (SPEAKER UTT - SYSTEM KEY).

    train -> train, dev -> val, eval -> test; audio ``ASVspoof2019_LA_*/flac/UTT.flac``.
    """
    audio = _audio_index(root)
    rows, other = [], []
    for proto in _find(root, "ASVspoof2019.LA.cm.*.txt", "LA protocol"):
        m = re.search(r"\.cm\.(train|dev|eval)\.", proto.name)
        if not m:
            other.append(proto.relative_to(root).as_posix())
            continue
        for n, (spk, utt, _, system, key, *_rest) in _protocol_lines(proto, 5, "LA protocol"):
            label = _key_label(key, proto, n)
            rows.append({"utt": utt, "label": label, "split": _SPLIT_OF[m.group(1)], "dataset": "asvspoof19la",
                         "identity": spk, "method": "" if system == "-" else system, "segments": ""})
    notes.skipped("protocol file(s)", other, "not train.trn, dev.trl or eval.trl")
    _note_unlisted(notes, audio, {r["utt"] for r in rows}, root)
    notes.split_source = "the official protocols: train -> train, dev -> val, eval -> test"
    return _rows_frame(rows, audio, root)


#: Folders of the ASVspoof 2021 key package (keys/<track>/<ASV|CM>/trial_metadata.txt) that hold no
#: CM labels a detector learns from: the ASV protocols (target/nontarget/spoof) and the PA track.
_ASV21_IGNORED = ("ASV", "PA")


@register_adapter("asvspoof21")
def asvspoof21_adapter(root: Path, *, notes: Notes, subset: str | None = None, **_) -> pd.DataFrame:
    """ASVspoof 2021 LA / DF CM keys as the official key package unpacks them::

        ROOT/keys/LA/CM/trial_metadata.txt   LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval
        ROOT/keys/DF/CM/trial_metadata.txt   LA_0043 DF_E_2000026 mp3m4a asvspoof A09 spoof notrim eval ...
        ROOT/**/LA_E_9332881.flac

    (SPEAKER TRIAL CODEC TRANSMISSION|SOURCE ATTACK KEY TRIM SUBSET ...).  Key files under an ASV/
    folder (target/nontarget labels) or the PA track are counted in a note and not read.  Every
    row is split test; ``dataset`` is asvspoof21la or asvspoof21df by the trial prefix; ``method``
    the attack; ``subset`` the eval/progress/hidden subset column.  ``subset="eval"`` keeps only
    the official eval trials (the others are counted in a note).
    """
    audio = _audio_index(root)
    rows, ignored, found = [], [], []
    for meta in _find(root, "trial_metadata.txt", "ASVspoof 2021 key file"):
        parts = meta.relative_to(root).parts[:-1]
        if any(p in _ASV21_IGNORED for p in parts):
            ignored.append(meta.relative_to(root).as_posix())
            continue
        found.append(meta)
        for n, cols in _protocol_lines(meta, 6, "trial_metadata"):
            spk, utt, attack, key = cols[0], cols[1], cols[4], cols[5]
            track = utt.split("_", 1)[0].lower()
            if track == "pa":
                ignored.append(meta.relative_to(root).as_posix())
                break
            rows.append({"utt": utt, "label": _key_label(key, meta, n), "split": "test",
                         "dataset": f"asvspoof21{track}", "identity": spk,
                         "method": "" if attack in ("-", "bonafide") else attack, "segments": "",
                         "subset": cols[7] if len(cols) > 7 else ""})
    notes.skipped("key file(s)", sorted(set(ignored)), "ASV and PA keys carry no LA/DF countermeasure labels")
    _note_unlisted(notes, audio, {r["utt"] for r in rows}, root)
    if not rows:
        raise ManifestError(f"{root}: no LA or DF CM key file (keys/LA/CM/trial_metadata.txt, keys/DF/CM/...) found; "
                            f"only {_listing(ignored)}")
    if subset is not None:
        values = sorted({r["subset"] for r in rows})
        if subset not in values:
            raise ManifestError(f"--subset {subset!r}: the keys' subset column holds {', '.join(values) or 'nothing'}; "
                                "pick one of those")
        left = [r for r in rows if r["subset"] != subset]
        counts = pd.Series([r["subset"] for r in left]).value_counts() if left else pd.Series(dtype=int)
        if left:
            notes.add(f"--subset {subset}: left out {len(left)} trial(s) of other subsets ("
                      + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
        rows = [r for r in rows if r["subset"] == subset]
    notes.split_source = (f"the CM keys ({', '.join(m.relative_to(root).as_posix() for m in found)}): every trial is "
                          "evaluation data, split test" + (f", subset {subset}" if subset else ""))
    df = _rows_frame(rows, audio, root, extra=("subset",))
    return df


class _SeglabUnpickler(pickle.Unpickler):
    """Unpickles only what a PartialSpoof seglab file holds: a dict of NumPy string arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a segment-label file")
        return super().find_class(module, name)


def read_seglab(path: Path) -> dict:
    """A PartialSpoof ``*_seglab_*.npy`` (a pickled dict in an .npy) read with a restricted unpickler."""
    from numpy.lib import format as npformat

    with open(path, "rb") as fh:
        try:
            version = npformat.read_magic(fh)
            read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            _, _, dtype = read_header(fh)
        except ValueError as exc:
            raise ManifestError(f"{path}: not an .npy file ({exc})") from None
        if dtype.hasobject:
            try:
                arr = _SeglabUnpickler(io.BytesIO(fh.read())).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
                raise ManifestError(f"{path}: not a PartialSpoof segment-label file ({exc})") from None
        else:
            raise ManifestError(f"{path}: holds a {dtype} array, not a dict of segment labels")
    obj = arr.item() if isinstance(arr, np.ndarray) and arr.shape == () else arr
    if not isinstance(obj, dict):
        raise ManifestError(f"{path}: holds {type(obj).__name__}, not a dict utterance -> segment labels")
    return obj


def _intervals(bits: np.ndarray, resolution: float, duration: float) -> list[tuple[float, float]]:
    out, start = [], None
    for i, spoof in enumerate(list(bits) + [False]):
        if spoof and start is None:
            start = i
        elif not spoof and start is not None:
            out.append((round(start * resolution, 4), round(min(i * resolution, duration), 4)))
            start = None
    return [(a, b) for a, b in out if b > a]


@register_adapter("partialspoof")
def partialspoof_adapter(root: Path, *, notes: Notes, **_) -> pd.DataFrame:
    """PartialSpoof: protocols ``PartialSpoof.LA.cm.{train.trn,dev.trl,eval.trl}.txt`` and segment labels
    ``segment_labels/{train,dev,eval}_seglab_<resolution>.npy`` (the finest resolution found is used),
    converted to spoofed intervals in ``segments``.

    PartialSpoof marks a bonafide segment "1" and a spoofed one "0".  The polarity is checked on the
    bonafide utterances of the protocol (their segments must all be bonafide) and flipped if they
    say otherwise; which polarity was used is a note either way.
    """
    import soundfile as sf

    audio = _audio_index(root)
    seglabs: dict[str, tuple[float, Path]] = {}
    for p in root.rglob("*_seglab_*.npy"):
        m = re.match(r"(train|dev|eval)_seglab_([0-9.]+)\.npy$", p.name)
        if m and (m.group(1) not in seglabs or float(m.group(2)) < seglabs[m.group(1)][0]):
            seglabs[m.group(1)] = (float(m.group(2)), p)
    rows, labels = [], {}
    for proto in _find(root, "PartialSpoof.LA.cm.*.txt", "PartialSpoof protocol"):
        m = re.search(r"\.cm\.(train|dev|eval)\.", proto.name)
        if not m:
            continue
        split = m.group(1)
        if split not in seglabs:
            raise ManifestError(f"{root}: no segment labels {split}_seglab_<resolution>.npy for {proto.name}")
        res, seg_path = seglabs[split]
        table = read_seglab(seg_path)
        for n, (spk, utt, _, system, key, *_rest) in _protocol_lines(proto, 5, "PartialSpoof protocol"):
            if utt not in table:
                raise ManifestError(f"{seg_path}: no segment labels for {utt} (line {n} of {proto.name})")
            labels[utt] = (np.asarray(table[utt]).astype(str), res, _key_label(key, proto, n))
            rows.append({"utt": utt, "label": labels[utt][2], "split": _SPLIT_OF[split], "dataset": "partialspoof",
                         "identity": spk, "method": "" if system == "-" else system})
    bona = [v[0] for v in labels.values() if v[2] == 0]
    ones = float(np.mean(np.concatenate(bona) == "1")) if bona else float("nan")
    if bona and ones < 0.5:
        spoof_value, why = "1", f"the {len(bona)} bonafide utterances have {100 * (1 - ones):.1f} % segments '0'"
    else:
        spoof_value = "0"
        why = (f"the {len(bona)} bonafide utterances have {100 * ones:.1f} % segments '1'" if bona
               else "no bonafide utterance to check it on: PartialSpoof's convention assumed")
    notes.add(f"partialspoof: segment labels read as {'1 = bonafide, 0 = spoof' if spoof_value == '0' else '0 = bonafide, 1 = spoof'} "
              f"({why})")
    notes.split_source = "the official protocols: train -> train, dev -> val, eval -> test"
    _note_unlisted(notes, audio, set(labels), root)
    for r in rows:
        bits, res, _ = labels[r["utt"]]
        if r["utt"] in audio:
            duration = sf.info(str(audio[r["utt"]])).duration
            r["segments"] = format_segments(_intervals(bits == spoof_value, res, duration))
    return _rows_frame(rows, audio, root)
