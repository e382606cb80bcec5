"""Manifest adapters of the audio anti-spoofing datasets: ASVspoof 2019 LA, ASVspoof 2021, PartialSpoof.

Audio files are found anywhere under ROOT by utterance id (their file stem), ``.flac`` or ``.wav``;
a protocol row whose audio is missing is an error that lists the first few.  Labels: bonafide 0,
spoof 1; ``identity`` is the speaker, ``method`` the spoofing system (empty for bonafide).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ManifestError
from .adapters import AUDIO_EXTENSIONS, ROW_COLUMNS, _listing, list_files, register_adapter
from .audio import format_segments

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


def _rows_frame(rows: list[dict], audio: dict[str, Path], root: Path) -> pd.DataFrame:
    missing = [r["utt"] for r in rows if r["utt"] not in audio]
    if missing:
        raise ManifestError(f"{root}: {len(missing)} utterance(s) of the protocol have no .flac or .wav file under "
                            f"the folder: {_listing(missing)}")
    out = []
    for r in rows:
        path = audio[r.pop("utt")]
        out.append({"sample_id": f"{r['dataset']}/{path.relative_to(root).as_posix()}", "path": str(path),
                    "gender": "", "race": "", **r})
    return pd.DataFrame(out, columns=list(COLUMNS)).sort_values("path", kind="stable").reset_index(drop=True)


def _find(root: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    if not found:
        raise ManifestError(f"{root}: no {what} ({pattern}) found under the folder")
    return found


@register_adapter("asvspoof19")
def asvspoof19_adapter(root: Path, **_) -> pd.DataFrame:
    """ASVspoof 2019 LA: ``ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt`` (SPEAKER UTT - SYSTEM KEY).

    train -> train, dev -> val, eval -> test; audio ``ASVspoof2019_LA_*/flac/UTT.flac``.
    """
    audio = _audio_index(root)
    rows = []
    for proto in _find(root, "ASVspoof2019.LA.cm.*.txt", "LA protocol"):
        m = re.search(r"\.cm\.(train|dev|eval)\.", proto.name)
        if not m:
            continue
        for n, (spk, utt, _, system, key, *_rest) in _protocol_lines(proto, 5, "LA protocol"):
            label = _key_label(key, proto, n)
            rows.append({"utt": utt, "label": label, "split": _SPLIT_OF[m.group(1)], "dataset": "asvspoof19la",
                         "identity": spk, "method": "" if system == "-" else system, "segments": ""})
    return _rows_frame(rows, audio, root)


@register_adapter("asvspoof21")
def asvspoof21_adapter(root: Path, **_) -> pd.DataFrame:
    """ASVspoof 2021 LA / DF: ``keys/*/CM/trial_metadata.txt`` (SPEAKER UTT CODEC TRANSMISSION ATTACK KEY ...).

    Evaluation data: every row is split test; ``dataset`` is asvspoof21la or asvspoof21df by the
    utterance prefix; ``method`` the attack.
    """
    audio = _audio_index(root)
    rows = []
    for meta in _find(root, "trial_metadata.txt", "ASVspoof 2021 key file"):
        for n, cols in _protocol_lines(meta, 6, "trial_metadata"):
            spk, utt, attack, key = cols[0], cols[1], cols[4], cols[5]
            track = utt.split("_", 1)[0].lower()
            rows.append({"utt": utt, "label": _key_label(key, meta, n), "split": "test",
                         "dataset": f"asvspoof21{track}", "identity": spk,
                         "method": "" if attack in ("-", "bonafide") else attack, "segments": ""})
    return _rows_frame(rows, audio, root)


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
def partialspoof_adapter(root: Path, **_) -> pd.DataFrame:
    """PartialSpoof: protocols ``PartialSpoof.LA.cm.{train.trn,dev.trl,eval.trl}.txt`` and segment labels
    ``segment_labels/{train,dev,eval}_seglab_<resolution>.npy`` (the finest resolution found is used),
    converted to spoofed intervals in ``segments``.

    PartialSpoof marks a bonafide segment "1" and a spoofed one "0".  The polarity is checked on the
    bonafide utterances of the protocol (their segments must all be bonafide) and flipped if they
    say otherwise; which polarity was used is reported as a warning either way.
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
    warnings.warn(f"partialspoof: segment labels read as {'1 = bonafide, 0 = spoof' if spoof_value == '0' else '0 = bonafide, 1 = spoof'} "
                  f"({why})", stacklevel=2)
    for r in rows:
        bits, res, _ = labels[r["utt"]]
        if r["utt"] in audio:
            duration = sf.info(str(audio[r["utt"]])).duration
            r["segments"] = format_segments(_intervals(bits == spoof_value, res, duration))
    return _rows_frame(rows, audio, root)
