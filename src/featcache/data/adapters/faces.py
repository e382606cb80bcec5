"""Dataset adapters: a dataset folder in its public layout -> manifest rows.

Each adapter is registered by name with :func:`register_adapter` and run by
:func:`build_manifest`, which validates and writes its rows with
:func:`featcache.data.manifest.write_manifest` (nothing is written on error).

An adapter returns a :class:`pandas.DataFrame` with the columns :data:`ROW_COLUMNS`, one row
per sample, sorted by ``path``: an absolute ``path``, ``label`` 0 (real) or 1 (fake), ``split``,
``dataset``, ``gender`` and ``race`` already mapped to the canonical vocabularies (or empty),
``identity``, ``method``, and a portable ``sample_id`` = ``<dataset>/<path relative to ROOT>``
(the same on every machine, whatever folder the manifest is written to).

Where a dataset has no official split, :func:`assign_splits` puts whole identities (never part
of one) into train/val/test with a seeded NumPy generator: the same files and seed give the
same manifest, byte for byte.  :func:`list_images` is the one way adapters find image files.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ManifestError
from ..registry import Registry
from .manifest import (
    GENDERS,
    RACES,
    SPLITS,
    Manifest,
    map_gender,
    map_race,
    write_manifest,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
AUDIO_EXTENSIONS = (".wav", ".flac")
#: The columns every adapter returns, in this order.
ROW_COLUMNS = ("sample_id", "path", "label", "split", "dataset", "gender", "race", "identity", "method")

Adapter = Callable[..., pd.DataFrame]
#: Adapter name -> adapter; filled by :func:`register_adapter`.
ADAPTERS = Registry("manifest format", ("featcache.data.audio_adapters",), error=ManifestError)

_MAX_LISTED = 5


# --------------------------------------------------------------------------- registry

#: Register ``fn(root, *, annotations, val_fraction, test_fraction, seed) -> DataFrame``.
register_adapter = ADAPTERS.register
#: Names of the registered dataset formats, sorted.
list_adapters = ADAPTERS.names


def build_manifest(
    fmt: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    check_files: bool = True,
) -> Manifest:
    """Build the manifest of the dataset at ``root`` in format ``fmt`` and write it to ``out``.

    ``val_fraction`` and ``test_fraction`` are fractions of identities, used only where the
    dataset has no official split (each adapter's docstring says where).  ``annotations`` is
    an extra file or folder some adapters read (FF++ demographics, FairFace label CSVs).
    Returns the written :class:`~featcache.data.manifest.Manifest`; raises
    :class:`~featcache.errors.ManifestError` (and writes nothing) on a problem with the input.
    """
    adapter = ADAPTERS.get(fmt)
    root_path = Path(root)
    if not root_path.is_dir():
        what = "is not a directory" if root_path.exists() else "does not exist"
        raise ManifestError(f"dataset folder {root} {what}; pass the folder that holds the {fmt} dataset")
    ann = None
    if annotations is not None:
        ann = Path(annotations)
        if not ann.exists():
            raise ManifestError(f"annotations {annotations} do not exist; pass an existing file or folder")
        ann = ann.resolve()
    check_fractions(val_fraction, test_fraction)
    rows = adapter(
        root_path.resolve(), annotations=ann, val_fraction=float(val_fraction),
        test_fraction=float(test_fraction), seed=int(seed),
    )
    return write_manifest(rows, out, source=f"{fmt} adapter on {root}", check_files=check_files)


# --------------------------------------------------------------------------- shared helpers

def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise unless both fractions are in [0, 1) and leave something for training."""
    ok = all(isinstance(f, numbers.Real) and 0 <= f < 1 for f in (val_fraction, test_fraction))
    if not ok or val_fraction + test_fraction >= 1:
        raise ManifestError(
            f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r}: each must be in "
            "[0, 1) and their sum below 1 (e.g. 0.1 and 0.1)"
        )


def assign_splits(groups: Iterable[str], *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """One split per element of ``groups``, keeping every group (identity) in a single split.

    The distinct groups are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut:
    the first ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)`` to
    val, the rest to train.  The fractions count groups, not rows.  A positive fraction gets at
    least one group as long as train keeps at least one.
    """
    check_fractions(val_fraction, test_fraction)
    keys = [str(g) for g in groups]
    distinct = sorted(set(keys))
    n = len(distinct)
    n_test = math.floor(test_fraction * n + 0.5)
    n_val = math.floor(val_fraction * n + 0.5)
    if test_fraction > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n > 0 and n_test + n_val >= n:
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(seed).permutation(n)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[distinct[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [split_of[k] for k in keys]


def list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (recursively, following links) whose names end in ``extensions``
    (case-insensitive), sorted.  Hidden files and folders (``.name``, e.g. macOS ``._x.jpg``)
    are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        found.extend(base / f for f in filenames if not f.startswith(".") and f.lower().endswith(extensions))
    return sorted(found)


def list_images(folder: Path) -> list[Path]:
    """Image files (:data:`IMAGE_EXTENSIONS`, any case) under ``folder``, recursively, sorted."""
    return list_files(folder, IMAGE_EXTENSIONS)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _row(path: Path, root: Path, dataset: str, label: int, *, identity: str, split: str = "",
         method: str = "", gender: str = "", race: str = "") -> dict:
    return {
        "sample_id": f"{dataset}/{path.relative_to(root).as_posix()}", "path": str(path), "label": label,
        "split": split, "dataset": dataset, "gender": gender, "race": race, "identity": identity,
        "method": method,
    }


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None


# --------------------------------------------------------------------------- folder

_LABEL_DIRS = {"real": 0, "fake": 1, "bonafide": 0, "spoof": 1}
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


@register_adapter("folder")
def folder_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                   seed: int = 0, **_) -> pd.DataFrame:
    """A generic real/fake image folder, or a bonafide/spoof audio folder (.wav, .flac).

    Layouts (folder names case-insensitive; ``val`` may be spelled ``valid`` or ``validation``,
    ``train``/``test`` also ``training``/``testing``)::

        ROOT/real/**/*.png   ROOT/fake/**/*.png                  no split folders
        ROOT/train/real/**   ROOT/val/fake/** ...                split folders above
        ROOT/real/train/**   ROOT/fake/test/** ...               split folders below

    Only images and audio inside ``real/`` and ``fake/`` (or ``bonafide/`` and ``spoof/``) folders
    are read; other folders are ignored.
    ``identity`` is the image's immediate folder when it sits in a per-video (per-person)
    subfolder, else its file stem.  Without split folders, identities are split with
    ``val_fraction``/``test_fraction``; with split folders but none for val, val is carved
    from train by identity with ``val_fraction`` (pass 0 to keep train whole).
    ``dataset`` is ROOT's folder name; ``method`` is empty.
    """
    dataset = root.name
    top = _subdirs(root)
    label_dirs = [p for p in top if p.name.lower() in _LABEL_DIRS]
    split_dirs = [p for p in top if p.name.lower() in _SPLIT_ALIASES]
    expected = ("the folder format expects ROOT/real and ROOT/fake, optionally with train/val/test "
                "folders above (ROOT/train/real) or below (ROOT/real/train)")
    if label_dirs and split_dirs:
        raise ManifestError(
            f"{root}: holds both label folders ({', '.join(p.name for p in label_dirs)}) and split folders "
            f"({', '.join(p.name for p in split_dirs)}); {expected}, not both at the top"
        )
    # (folder to scan, label, split or "" for none, whether split folders sit below it)
    sources: list[tuple[Path, int, str, bool]] = []
    if split_dirs:
        for sdir in split_dirs:
            for ldir in _subdirs(sdir):
                if ldir.name.lower() in _LABEL_DIRS:
                    sources.append((ldir, _LABEL_DIRS[ldir.name.lower()], _SPLIT_ALIASES[sdir.name.lower()], False))
    else:
        for ldir in label_dirs:
            below = any(p.name.lower() in _SPLIT_ALIASES for p in _subdirs(ldir))
            sources.append((ldir, _LABEL_DIRS[ldir.name.lower()], "", below))
    if not sources:
        found = ", ".join(p.name for p in top) or "no folders"
        raise ManifestError(f"{root}: no real/ or fake/ folder found ({found}); {expected}")

    rows, outside = [], []
    for folder, label, split, below in sources:
        for path in list_files(folder, IMAGE_EXTENSIONS + AUDIO_EXTENSIONS):
            rel = path.relative_to(folder).parts
            base = folder
            if below:
                if len(rel) < 2 or rel[0].lower() not in _SPLIT_ALIASES:
                    outside.append(str(path.relative_to(root)))
                    continue
                split, base = _SPLIT_ALIASES[rel[0].lower()], folder / rel[0]
            identity = path.parent.name if path.parent != base else path.stem
            rows.append(_row(path, root, dataset, label, identity=identity, split=split))
    if outside:
        raise ManifestError(
            f"{root}: {len(outside)} image(s) sit outside the split folders next to them: {_listing(outside)}; "
            "move them into train/, val/ or test/, or remove the split folders to split by identity"
        )
    if not rows:
        raise ManifestError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) or audio ({', '.join(AUDIO_EXTENSIONS)}) "
                            "under the real/ and fake/ folders")
    df = _frame(rows)
    used = set(df["split"])
    if used == {""}:
        df["split"] = assign_splits(df["identity"], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    elif "" in used:
        loose = sorted({str(Path(p).relative_to(root).parts[0]) for p in df.loc[df["split"] == "", "path"]})
        raise ManifestError(
            f"{root}: some label folders have split folders below them and others ({', '.join(loose)}) do not; "
            "use split folders in all of them or in none"
        )
    elif "val" not in used and val_fraction > 0:
        train = df["split"] == "train"
        df.loc[train, "split"] = assign_splits(df.loc[train, "identity"], val_fraction=val_fraction,
                                               test_fraction=0.0, seed=seed)
    return df


# --------------------------------------------------------------------------- FaceForensics++

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
_FRAME_FOLDERS = ("frames", "images")


def _ffpp_video_dirs(base: Path) -> list[Path]:
    """``base/<compression>/{frames,images}/<video>/`` for any compression (c0, c23, c40, raw)."""
    return [video for comp in _subdirs(base) for kind in _FRAME_FOLDERS for video in _subdirs(comp / kind)]


def _ffpp_official_splits(split_dir: Path) -> tuple[dict[str, str], dict[frozenset, str]]:
    id_split: dict[str, str] = {}
    pair_split: dict[frozenset, str] = {}
    for split in SPLITS:
        file = split_dir / f"{split}.json"
        if not file.is_file():
            raise ManifestError(
                f"{split_dir}: {file.name} is missing; the official FF++ splits are train.json, val.json and "
                "test.json (JSON lists of video id pairs such as [[\"953\", \"974\"], ...]); add it, or remove "
                "splits/ to split by identity"
            )
        try:
            pairs = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ManifestError(f"{file}: expected a JSON list of video id pairs such as [[\"953\", \"974\"], ...]")
        for a, b in pairs:
            a, b = str(a), str(b)
            for vid in (a, b):
                if id_split.setdefault(vid, split) != split:
                    raise ManifestError(
                        f"{split_dir}: video {vid} is in both {id_split[vid]}.json and {split}.json; "
                        "each video id must be in one split"
                    )
            pair_split[frozenset((a, b))] = split
    return id_split, pair_split


def _ffpp_groups(videos: list[str]) -> dict[str, str]:
    """Video id -> group key: ids joined by a fake ``a_b`` (target a, source b) share a group,
    so neither face of a swap lands in another split."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for video in videos:
        ids = video.split("_")
        for other in ids[1:]:
            ra, rb = find(ids[0]), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        find(ids[0])
    return {v: find(v) for v in parent}


def _indicator(value: str) -> bool | None:
    value = str(value).strip()
    if value == "" or value.lower() == "nan":
        return None
    try:
        return float(value) > 0  # DAW-FDD writes 1 / -1; others 1 / 0
    except ValueError:
        raise ManifestError(f"not a 0/1 (or 1/-1) indicator: {value!r}") from None


def _demographics_of(df: pd.DataFrame, source: Path) -> list[tuple[str, str]]:
    """(gender, race) per annotation row, from ``intersec_label`` or the one-hot columns."""
    out, bad = [], []
    if "intersec_label" in df.columns:
        for i, value in enumerate(df["intersec_label"]):
            value = str(value).strip()
            try:
                code = int(float(value)) if value and value.lower() != "nan" else -1
            except ValueError:
                code = -2
            if code == -1:
                out.append(("", ""))
            elif 0 <= code < 8 and float(value) == code:
                out.append((GENDERS[code // len(RACES)], RACES[code % len(RACES)]))
            else:
                bad.append(f"line {i + 2}: {value!r}")
                out.append(("", ""))
        what = "an intersec_label outside 0..7"
    elif {"ismale", "isasian", "iswhite", "isblack"} <= set(df.columns):
        what = "invalid one-hot demographics"
        for i, row in enumerate(df[["ismale", "isasian", "iswhite", "isblack"]].itertuples(index=False)):
            try:
                male, *races = (_indicator(v) for v in row)
            except ManifestError as exc:
                bad.append(f"line {i + 2}: {exc}")
                out.append(("", ""))
                continue
            gender = "" if male is None else "male" if male else "female"
            if any(r is None for r in races):
                race = ""
            else:
                hot = [name for name, flag in zip(("asian", "white", "black"), races) if flag]
                if len(hot) > 1:
                    bad.append(f"line {i + 2}: more than one of isasian/iswhite/isblack set")
                    out.append(("", ""))
                    continue
                race = hot[0] if hot else "other"  # none of the three -> other (DESIGN.md)
            out.append((gender, race))
    else:
        raise ManifestError(
            f"{source}: needs a column intersec_label (0..7) or the columns ismale, isasian, iswhite, isblack; "
            f"found {', '.join(df.columns)}"
        )
    if bad:
        raise ManifestError(f"{source}: {len(bad)} row(s) with {what}: {_listing(bad)}")
    return out


_AMBIGUOUS = ("?", "?")
_SUFFIX = 4  # CSVs carry their authors' absolute paths: match on at least the last 4 components


def _path_parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in str(path).strip().replace("\\", "/").split("/") if p not in ("", "."))


def _ffpp_annotations(annotations: Path, root: Path, frames: list[Path]) -> list[tuple[str, str]]:
    """(gender, race) per frame from FF++ demographic annotation CSV(s) (a file, or a folder of them)."""
    files = sorted(annotations.glob("*.csv")) if annotations.is_dir() else [annotations]
    if not files:
        raise ManifestError(f"{annotations}: a folder with no .csv file; pass the demographic annotations CSV")
    index: dict[tuple[str, ...], tuple[str, str]] = {}
    example, n_rows = "", 0
    for file in files:
        df = _read_csv(file)
        column = next((c for c in ("img_path", "path") if c in df.columns), None)
        if column is None:
            raise ManifestError(f"{file}: needs a column img_path (or path) naming each frame; found {', '.join(df.columns)}")
        for path, value in zip(df[column], _demographics_of(df, file)):
            parts = _path_parts(path)
            example = example or str(path)
            n_rows += 1
            for k in range(min(_SUFFIX, len(parts)), len(parts) + 1):
                key = parts[-k:]
                if index.setdefault(key, value) != value:
                    index[key] = _AMBIGUOUS
    out, ambiguous, matched = [], [], 0
    for frame in frames:
        parts = frame.relative_to(root).parts
        value = ("", "")
        # the longest match wins: the full path relative to ROOT, then ever shorter suffixes
        for k in range(len(parts), min(_SUFFIX, len(parts)) - 1, -1):
            found = index.get(parts[-k:])
            if found is not None:
                value, matched = found, matched + 1
                break
        if value == _AMBIGUOUS:
            ambiguous.append(frame.relative_to(root).as_posix())
            value = ("", "")
        out.append(value)
    if matched == 0:
        raise ManifestError(
            f"{annotations}: none of its {n_rows} rows matches a frame under {root}; rows match by the path "
            f"relative to ROOT or by their last {_SUFFIX} path components (e.g. {example!r} vs the frame "
            f"{frames[0].relative_to(root).as_posix()!r})"
        )
    if ambiguous:
        warnings.warn(
            f"{annotations}: {len(ambiguous)} frame(s) match annotation rows with different demographics "
            f"and are left unannotated: {_listing(ambiguous)}",
            stacklevel=4,
        )
    return out


@register_adapter("ffpp")
def ffpp_adapter(root: Path, *, annotations: Path | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, **_) -> pd.DataFrame:
    """FaceForensics++ with frames extracted into per-video folders::

        ROOT/original_sequences/youtube/<comp>/frames/<video>/*.png            real, video "000"
        ROOT/manipulated_sequences/<Method>/<comp>/frames/<video>/*.png        fake, video "000_003"
        ROOT/splits/train.json, val.json, test.json                            optional

    ``<comp>`` is any compression folder (c0, c23, c40, raw, ...), all read; ``images`` is
    accepted for ``frames``.  Methods: :data:`FFPP_METHODS`; other folders under
    manipulated_sequences (DeepFakeDetection, whose reals live in original_sequences/actors)
    are skipped with a warning.  ``identity`` is the video id for reals and the target id
    (the first) for fakes: "000_003" -> "000".  ``method`` is the Method folder.

    Splits: the official ``splits/*.json`` (lists of id pairs) when present -- a video id is in
    its pair's split, a fake "a_b" in the split of pair (a, b); every video must be listed.
    Without ``splits/``, ids linked by a fake (target and source) are kept together and split
    with ``val_fraction``/``test_fraction``.

    ``annotations``: FF++ demographic annotations as used by the fair deepfake detection
    benchmarks (DAW-FDD): a CSV, or a folder of CSVs, with ``img_path`` (or ``path``) and
    either ``intersec_label`` (0..7, DESIGN.md's code order) or ``ismale`` plus ``isasian``,
    ``iswhite``, ``isblack`` (1 / 0 or 1 / -1; none of the three -> other).  A row matches a
    frame by its path relative to ROOT, else by the longest common suffix of at least 4 path
    components (the CSVs carry their authors' absolute paths).  Frames without a row get empty
    gender and race; a CSV that matches no frame at all is an error.
    """
    dataset = "ffpp"
    videos: list[tuple[Path, int, str]] = [(v, 0, "") for v in _ffpp_video_dirs(root / "original_sequences" / "youtube")]
    manipulated = root / "manipulated_sequences"
    skipped = []
    for method_dir in _subdirs(manipulated):
        if method_dir.name in FFPP_METHODS:
            videos += [(v, 1, method_dir.name) for v in _ffpp_video_dirs(method_dir)]
        else:
            skipped.append(method_dir.name)
    if skipped:
        warnings.warn(
            f"{manipulated}: skipping folder(s) {', '.join(skipped)}; the ffpp adapter reads {', '.join(FFPP_METHODS)}",
            stacklevel=3,
        )
    rows = []
    for video_dir, label, method in videos:
        identity = video_dir.name.split("_")[0]
        rows += [_row(p, root, dataset, label, identity=identity, method=method) for p in list_images(video_dir)]
    if not rows:
        raise ManifestError(
            f"{root}: no FF++ frames found; expected ROOT/original_sequences/youtube/<c23|c40|...>/frames/<video>/*.png "
            "and ROOT/manipulated_sequences/<Method>/<c23|c40|...>/frames/<video>/*.png (or images/ for frames/)"
        )
    df = _frame(rows)
    video = df["path"].map(lambda p: Path(p).parent.name)

    split_dir = root / "splits"
    if split_dir.is_dir():
        id_split, pair_split = _ffpp_official_splits(split_dir)

        def official(name: str) -> str:
            ids = name.split("_")
            if len(ids) == 1:
                return id_split.get(name, "")
            if len(ids) != 2:
                return ""
            # the pair's split; failing that, the split both ids share
            both = {id_split.get(i, "") for i in ids}
            return pair_split.get(frozenset(ids), both.pop() if len(both) == 1 else "")

        split_of = {name: official(name) for name in sorted(set(video))}
        missing = [name for name, split in split_of.items() if not split]
        if missing:
            raise ManifestError(
                f"{split_dir}: {len(missing)} video(s) are in none of the official splits: {_listing(missing)}; "
                "fix the JSON files, or remove splits/ to split by identity"
            )
        df["split"] = video.map(split_of)
    else:
        group = _ffpp_groups(sorted(set(video)))
        df["split"] = assign_splits(video.map(lambda v: group[v.split("_")[0]]), val_fraction=val_fraction,
                                    test_fraction=test_fraction, seed=seed)

    if annotations is not None:
        demo = _ffpp_annotations(annotations, root, [Path(p) for p in df["path"]])
        df["gender"] = [g for g, _ in demo]
        df["race"] = [r for _, r in demo]
    return df


# --------------------------------------------------------------------------- Celeb-DF v2

CELEBDF_FOLDERS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}
CELEBDF_TEST_LIST = "List_of_testing_videos.txt"


def _celebdf_identity(folder: str, video: str) -> str:
    if folder == "YouTube-real":
        return video  # one unnamed subject per video: "00170"
    # Celeb-real "id0_0000" -> "id0".  Celeb-synthesis "id0_id16_0000" is Celeb-real video
    # id0_0000 (the target: scene, body, expression) with the face of id16 (the source)
    # swapped in; like FF++'s "000_003" -> "000", identity is the target, the first id.
    return video.split("_")[0]


@register_adapter("celebdf")
def celebdf_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0, **_) -> pd.DataFrame:
    """Celeb-DF v2::

        ROOT/Celeb-real/id0_0000/*.png        real   (or ROOT/Celeb-real/id0_0000.mp4)
        ROOT/YouTube-real/00170/*.png         real
        ROOT/Celeb-synthesis/id0_id16_0000/   fake, method "celebdf-synthesis"
        ROOT/List_of_testing_videos.txt       "1 YouTube-real/00170.mp4" per line

    Each folder holds per-video frame folders or the video files themselves (then ``path`` is
    the video file); both may be mixed.  The videos listed in List_of_testing_videos.txt are
    split ``test`` (a frame folder matches the listed video's stem); the rest are split into
    train/val by identity with ``val_fraction`` (``test_fraction`` is ignored).  Without the
    list, identities are split with both fractions.  Note the official test list shares
    identities with the rest (the same 59 celebrities), so identity-disjointness holds only
    between train and val.

    ``identity``: Celeb-real "id0_0000" -> "id0"; Celeb-synthesis "id0_id16_0000" -> "id0",
    the target (id0's video with id16's face swapped in); YouTube-real: the video stem.
    """
    dataset = "celebdf"
    rows, present = [], set()
    for folder, label in CELEBDF_FOLDERS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            is_video = entry.suffix.lower() in VIDEO_EXTENSIONS
            if entry.name.startswith(".") or not (entry.is_dir() or is_video):
                continue
            # a frame folder may be named after its video ("00170.mp4/"): the key is the stem
            video = entry.stem if is_video else entry.name
            present.add((folder, video))
            method = "celebdf-synthesis" if label else ""
            identity = _celebdf_identity(folder, video)
            paths = list_images(entry) if entry.is_dir() else [entry]
            rows += [_row(p, root, dataset, label, identity=identity, method=method) for p in paths]
    if not rows:
        raise ManifestError(
            f"{root}: no Celeb-DF videos or frames found; expected ROOT/Celeb-real, ROOT/YouTube-real and "
            "ROOT/Celeb-synthesis holding per-video frame folders (id0_0000/*.png) or .mp4 files"
        )
    df = _frame(rows)

    def video_key(path: str) -> tuple[str, str]:
        folder, entry = Path(path).relative_to(root).parts[:2]
        return folder, Path(entry).stem if Path(entry).suffix.lower() in VIDEO_EXTENSIONS else entry

    videos = [video_key(p) for p in df["path"]]

    test_list = root / CELEBDF_TEST_LIST
    if test_list.is_file():
        listed = set()
        for n, line in enumerate(test_list.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            # Each line is "<flag> <folder>/<video>.mp4".  In this file the flag is 1 for REAL and
            # 0 for fake (the opposite of the manifest's label); labels here come from the folder,
            # so the flag is only checked for shape, never used.
            if len(parts) != 2 or parts[0] not in ("0", "1") or "/" not in parts[1]:
                raise ManifestError(
                    f"{test_list}: line {n} is {line.strip()!r}; expected '<0|1> <folder>/<video>.mp4', "
                    "e.g. '1 YouTube-real/00170.mp4'"
                )
            folder, name = parts[1].replace("\\", "/").split("/")[-2:]
            listed.add((folder, Path(name).stem))
        absent = sorted(f"{f}/{v}" for f, v in listed - present)
        if absent:
            warnings.warn(
                f"{test_list}: {len(absent)} listed test video(s) are not under {root}: {_listing(absent)}",
                stacklevel=3,
            )
        test = np.array([v in listed for v in videos], dtype=bool)
        df.loc[test, "split"] = "test"
        df.loc[~test, "split"] = assign_splits(df.loc[~test, "identity"], val_fraction=val_fraction,
                                               test_fraction=0.0, seed=seed)
    else:
        df["split"] = assign_splits(df["identity"], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return df


# --------------------------------------------------------------------------- FairFace

FAIRFACE_CSVS = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}


@register_adapter("fairface")
def fairface_adapter(root: Path, *, annotations: Path | None = None, val_fraction: float = 0.1,
                     test_fraction: float = 0.1, seed: int = 0, **_) -> pd.DataFrame:
    """FairFace::

        ROOT/fairface_label_train.csv   file,age,gender,race,service_test   "train/1.jpg",...
        ROOT/fairface_label_val.csv
        ROOT/train/1.jpg ...  ROOT/val/1.jpg ...

    The CSVs are read from ``annotations`` when it is a folder (they are often kept next to
    the image folder), else from ROOT; at least one must exist.  ``path`` = ROOT/<file>.
    gender Male/Female and race through ``GENDER_VOCABULARIES``/``RACE_VOCABULARIES['fairface']``;
    an unknown value is an error.  All faces are real (label 0).  Splits: the official val
    file is ``test``; the official train rows are split into train/val with ``val_fraction``
    (seeded, one row per person; ``test_fraction`` is ignored).  ``identity`` is ``file``
    without its extension ("train/1"): the file stem alone repeats across train/ and val/.
    """
    dataset = "fairface"
    where = annotations if annotations is not None and annotations.is_dir() else root
    found = {split: where / name for split, name in FAIRFACE_CSVS.items() if (where / name).is_file()}
    if not found:
        raise ManifestError(
            f"{where}: neither {' nor '.join(FAIRFACE_CSVS.values())} is there; put FairFace's label CSVs in ROOT "
            "or pass the folder holding them as annotations"
        )
    rows = []
    for official, csv in found.items():
        table = _read_csv(csv)
        missing = [c for c in ("file", "gender", "race") if c not in table.columns]
        if missing:
            raise ManifestError(f"{csv}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
        gender = {v: map_gender(v, "fairface", source=str(csv)) for v in sorted(set(table["gender"]))}
        race = {v: map_race(v, "fairface", source=str(csv)) for v in sorted(set(table["race"]))}
        rows += [
            _row(root / file, root, dataset, 0, identity=Path(file).with_suffix("").as_posix(),
                 split="test" if official == "val" else "train", gender=gender[g], race=race[r])
            for file, g, r in zip(table["file"], table["gender"], table["race"])
        ]
    if not rows:
        raise ManifestError(f"{', '.join(map(str, found.values()))}: no rows")
    df = _frame(rows)
    train = df["split"] == "train"
    if train.any():
        df.loc[train, "split"] = assign_splits(df.loc[train, "identity"], val_fraction=val_fraction,
                                               test_fraction=0.0, seed=seed)
    return df


# --------------------------------------------------------------------------- UTKFace

_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)")
UTKFACE_MAX_MALFORMED = 0.01


@register_adapter("utkface")
def utkface_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0, **_) -> pd.DataFrame:
    """UTKFace: images anywhere under ROOT named ``[age]_[gender]_[race]_[date&time].jpg``,
    often with ``.chip.jpg`` (ROOT/UTKFace/, ROOT/crop_part1/, ROOT/part1..3/, ...).

    gender 0 male, 1 female; race 0 white, 1 black, 2 asian, 3 indian -> other, 4 others ->
    other (the vocabularies in manifest.py).  All faces are real (label 0).  ``identity`` is
    the name before its first dot ("25_0_0_20170116174525125"), so the aligned crop and the
    in-the-wild copy of one photo share it; UTKFace has no person ids.  Identities are split
    with ``val_fraction``/``test_fraction``.

    Malformed names: the public release has a handful of files whose names lack a field
    (e.g. ``39_1_20170116174525125.jpg.chip.jpg``).  When fewer than 1 % of the images have
    names that do not parse, they are skipped with a warning naming them; more than that
    means ROOT is not (only) UTKFace, and a ManifestError lists the first few.
    """
    dataset = "utkface"
    rows, bad = [], []
    for path in list_images(root):
        match = _UTK_NAME.match(path.name)
        try:
            if match is None:
                raise ManifestError("no match")
            gender = map_gender(str(int(match.group(2))), "utkface", source="utkface")
            race = map_race(str(int(match.group(3))), "utkface", source="utkface")
        except ManifestError:
            bad.append(path.relative_to(root).as_posix())
            continue
        rows.append(_row(path, root, dataset, 0, identity=path.name.split(".")[0], gender=gender, race=race))
    total = len(rows) + len(bad)
    if total == 0:
        raise ManifestError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found for the utkface format")
    if bad:
        message = (f"{len(bad)} of {total} image name(s) under {root} do not follow UTKFace's "
                   f"[age]_[gender 0|1]_[race 0-4]_[date&time].jpg: {_listing(bad)}")
        if len(bad) >= UTKFACE_MAX_MALFORMED * total:
            raise ManifestError(
                f"{message}; fewer than {UTKFACE_MAX_MALFORMED:.0%} would be skipped with a warning -- is ROOT the "
                "UTKFace folder? Rename or remove these files"
            )
        warnings.warn(f"skipping {message}", stacklevel=3)
    df = _frame(rows)
    df["split"] = assign_splits(df["identity"], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return df


# --------------------------------------------------------------------------- COCO detection with gender

#: Gender words of detection datasets (FAAP's folder names, COCO gender-annotation CSVs).
DETECTION_GENDERS = {"male": "male", "female": "female", "man": "male", "woman": "female",
                     "men": "male", "women": "female", "m": "male", "f": "female"}
FAAP_GROUPS = {"women": "female", "men": "male"}


def _read_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable COCO JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: not a COCO annotation file (no 'images' list)")
    for key in ("id", "file_name"):
        if any(key not in im for im in data["images"]):
            raise ManifestError(f"{path}: an entry of 'images' has no {key!r}")
    return data


def _detection_row(path: Path, root: Path, dataset: str, *, split: str, gender: str, image_id, ann: Path) -> dict:
    row = _row(path, root, dataset, -1, identity="", split=split, gender=gender)
    row.update(image_id=str(int(image_id)), annotations=str(ann))
    return row


@register_adapter("faap-coco")
def faap_coco_adapter(root: Path, *, annotations=None, **_) -> pd.DataFrame:
    """The FAAP reference layout of gender-labelled COCO person images::

        ROOT/women_split/{train,val,test}/<file_name>   ROOT/women_split/gender_women_{split}.json
        ROOT/men_split/{train,val,test}/<file_name>     ROOT/men_split/gender_men_{split}.json

    (the JSON files may also sit in ROOT itself).  Each JSON is a COCO annotation file; its
    images are ``<group>_split/<split>/<file_name>``.  gender: women -> female, men -> male.
    ``image_id`` is the COCO id and ``annotations`` the JSON it belongs to (written relative to
    the manifest's folder when under it).  Labels are empty: these are detection images.
    """
    dataset = "faap-coco"
    rows, found = [], []
    for group, gender in FAAP_GROUPS.items():
        for split in SPLITS:
            name = f"gender_{group}_{split}.json"
            candidates = [root / f"{group}_split" / name, root / name]
            ann = next((c for c in candidates if c.is_file()), None)
            if ann is None:
                continue
            found.append(ann)
            folder = root / f"{group}_split" / split
            for im in _read_coco(ann)["images"]:
                rows.append(_detection_row(folder / im["file_name"], root, dataset, split=split, gender=gender,
                                           image_id=im["id"], ann=ann))
    if not found:
        raise ManifestError(f"{root}: no gender_{{women,men}}_{{train,val,test}}.json under women_split/ or men_split/ "
                            "(the FAAP layout); for one COCO JSON and a gender CSV use the coco-gender format")
    if not rows:
        raise ManifestError(f"{root}: the FAAP annotation files list no images")
    df = pd.DataFrame(rows, columns=[*ROW_COLUMNS, "image_id", "annotations"])
    _check_unique_image_ids(df)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _check_unique_image_ids(df: pd.DataFrame) -> None:
    dup = df[df.duplicated(["annotations", "image_id"], keep=False)]
    if len(dup):
        raise ManifestError(f"image ids repeat within one annotation file: {_listing(sorted(set(dup['image_id'])))}")


@register_adapter("coco-gender")
def coco_gender_adapter(root: Path, *, annotations: Path | None = None, **_) -> pd.DataFrame:
    """COCO in its own layout plus a CSV of image genders::

        ROOT/annotations/instances_<name>.json   (or ROOT/*.json)   ROOT/<name>/<file_name>
        annotations = a CSV with columns image_id, gender (male/female, man/woman, men/women)

    ``<name>`` is e.g. ``train2017`` or ``val2017``; its split is the first of train, val, test
    that it contains (COCO's val, the usual evaluation set, is therefore ``val``; rename the
    JSON or edit the manifest to make it ``test``).  Only images listed in the CSV are kept;
    a CSV id found in no JSON is an error.
    """
    dataset = "coco-gender"
    if annotations is None or not annotations.is_file():
        raise ManifestError("coco-gender needs --annotations GENDERS.csv (columns image_id, gender)")
    table = _read_csv(annotations)
    missing = [c for c in ("image_id", "gender") if c not in table.columns]
    if missing:
        raise ManifestError(f"{annotations}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    genders = {}
    for image_id, g in zip(table["image_id"], table["gender"]):
        try:
            key = int(image_id)
        except ValueError:
            raise ManifestError(f"{annotations}: image_id {image_id!r} is not an integer") from None
        genders[key] = map_gender(g.strip().lower(), DETECTION_GENDERS, source=str(annotations)) if g.strip() else ""
    jsons = sorted((root / "annotations").glob("*.json")) or sorted(root.glob("*.json"))
    if not jsons:
        raise ManifestError(f"{root}: no COCO JSON in annotations/ or in ROOT")
    rows, seen = [], set()
    for ann in jsons:
        name = ann.stem.split("_", 1)[-1] if ann.stem.startswith("instances_") else ann.stem
        split = next((s for s in SPLITS if s in name.lower()), None)
        if split is None:
            raise ManifestError(f"{ann}: its name contains none of {', '.join(SPLITS)}, so its split is unknown")
        folder = root / name if (root / name).is_dir() else root
        for im in _read_coco(ann)["images"]:
            if int(im["id"]) in genders:
                seen.add(int(im["id"]))
                rows.append(_detection_row(folder / im["file_name"], root, dataset, split=split,
                                           gender=genders[int(im["id"])], image_id=im["id"], ann=ann))
    unknown = sorted(set(genders) - seen)
    if unknown:
        raise ManifestError(f"{annotations}: {len(unknown)} image id(s) are in no COCO JSON under {root}: "
                            f"{_listing([str(u) for u in unknown])}")
    df = pd.DataFrame(rows, columns=[*ROW_COLUMNS, "image_id", "annotations"])
    _check_unique_image_ids(df)
    return df.sort_values("path", kind="stable").reset_index(drop=True)
