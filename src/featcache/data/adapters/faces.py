"""Manifest adapters of face datasets: a generic real/fake folder, FaceForensics++, Celeb-DF v2,
FairFace, UTKFace, AI-Face, CausalFace, DFDC and DF40, in their official layouts and those DeepfakeBench,
SelfBlendedImages and the fairness benchmarks (PG-FDD, AI-Face-FairnessBench) produce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import ManifestError
from ..manifest import GENDERS, RACES, SPLITS, map_gender, map_race
from .common import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    ROW_COLUMNS,
    VIDEO_EXTENSIONS,
    Notes,
    assign_splits,
    list_files,
    list_images,
    listing,
    read_csv,
    register_adapter,
    seeded_split_source,
    split_by_identity,
    unread_files,
)
from .common import make_row as _row
from .common import rows_frame as _frame
from .common import subdirs as _subdirs

_listing = listing
_read_csv = read_csv


# --------------------------------------------------------------------------- folder

# crop_img: the processed FF++ crops shared with the fairness benchmarks' annotations keep the fakes
# in ff++/crop_img and the reals in ff++/real (robust_fairness_withNoisy_labels, dataset/ff++/*.csv)
_LABEL_DIRS = {"real": 0, "fake": 1, "bonafide": 0, "spoof": 1, "crop_img": 1}
#: A flat FF++ crop name: ``<n>_<Method>_<target>_<source>_<frame>.png`` (fake) or
#: ``<n>_youtube_<video>_<frame>.png`` (real), as in the fairness benchmarks' CSVs.
FLAT_FFPP_NAME = re.compile(r"^\d+_(?P<method>[A-Za-z0-9]+)_(?P<target>\d{3})(?:_(?P<source>\d{3}))?_(?P<frame>\d+)$")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


@register_adapter("folder")
def folder_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                   seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """A generic real/fake image folder, or a bonafide/spoof audio folder (.wav, .flac).

    Layouts (folder names case-insensitive; ``val`` may be spelled ``valid`` or ``validation``,
    ``train``/``test`` also ``training``/``testing``)::

        ROOT/real/**/*.png   ROOT/fake/**/*.png                  no split folders
        ROOT/train/real/**   ROOT/val/fake/** ...                split folders above
        ROOT/real/train/**   ROOT/fake/test/** ...               split folders below

        ROOT/real/0_youtube_546_131.png  ROOT/crop_img/0_Deepfakes_300_304_151.png
                                                                 the processed FF++ crops of the
                                                                 fairness benchmarks (crop_img = fake)

    Only images and audio inside ``real/`` and ``fake/`` (``bonafide/``, ``spoof/``, ``crop_img/``)
    folders are read; every other folder is counted in a note.
    ``identity`` is the image's immediate folder when it sits in a per-video (per-person)
    subfolder, else its file stem; a flat FF++ crop name gives the target video as identity
    and its method (``0_Deepfakes_300_304_151`` -> 300, Deepfakes).  Without split folders,
    identities are split with ``val_fraction``/``test_fraction``; with split folders but none
    for val, val is carved from train by identity with ``val_fraction`` (pass 0 to keep train
    whole); either fallback is a note.  ``dataset`` is ROOT's folder name; ``method`` is empty
    except for flat FF++ crop names.
    """
    sources, other = _folder_sources(root)
    rows, outside, unread = [], [], []
    for folder, label, split, below in sources:
        unread += unread_files(folder, IMAGE_EXTENSIONS + AUDIO_EXTENSIONS, root)
        for path in list_files(folder, IMAGE_EXTENSIONS + AUDIO_EXTENSIONS):
            rel = path.relative_to(folder).parts
            base = folder
            if below:
                if len(rel) < 2 or rel[0].lower() not in _SPLIT_ALIASES:
                    outside.append(str(path.relative_to(root)))
                    continue
                split, base = _SPLIT_ALIASES[rel[0].lower()], folder / rel[0]
            identity = path.parent.name if path.parent != base else path.stem
            method = ""
            flat = FLAT_FFPP_NAME.match(path.stem) if path.parent == base else None
            if flat:
                identity = flat["target"]
                method = "" if flat["method"] == "youtube" else flat["method"]
            rows.append(_row(path, root, root.name, label, identity=identity, split=split, method=method))
    if outside:
        raise ManifestError(
            f"{root}: {len(outside)} image(s) sit outside the split folders next to them: {_listing(outside)}; "
            "move them into train/, val/ or test/, or remove the split folders to split by identity"
        )
    if not rows:
        raise ManifestError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) or audio ({', '.join(AUDIO_EXTENSIONS)}) "
                            "under the real/ and fake/ folders")
    notes.skipped("folder(s)", other, "only real/ and fake/ (bonafide/, spoof/, crop_img/) folders are read")
    notes.skipped("file(s)", unread, "not images or audio, or hidden")
    return _folder_splits(_frame(rows), root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          notes=notes)


def _folder_sources(root: Path) -> tuple[list[tuple[Path, int, str, bool]], list[str]]:
    """The folder adapter's label folders: (folder, label, split or "", split folders below it?),
    and the other folders (counted in a note)."""
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
    other = [p.name + "/" for p in top if p not in label_dirs and p not in split_dirs]
    if split_dirs:
        for sdir in split_dirs:
            for ldir in _subdirs(sdir):
                if ldir.name.lower() in _LABEL_DIRS:
                    sources.append((ldir, _LABEL_DIRS[ldir.name.lower()], _SPLIT_ALIASES[sdir.name.lower()], False))
                else:
                    other.append(f"{sdir.name}/{ldir.name}/")
    else:
        for ldir in label_dirs:
            below = any(p.name.lower() in _SPLIT_ALIASES for p in _subdirs(ldir))
            sources.append((ldir, _LABEL_DIRS[ldir.name.lower()], "", below))
    if not sources:
        found = ", ".join(p.name for p in top) or "no folders"
        raise ManifestError(f"{root}: no real/ or fake/ folder found ({found}); {expected}")
    return sources, other


def _folder_splits(df: pd.DataFrame, root: Path, *, val_fraction: float, test_fraction: float, seed: int,
                   notes: Notes) -> pd.DataFrame:
    """The folder adapter's splits: the split folders, or identities split with the fractions
    (val carved from train when only val is missing); each fallback a note."""
    used = set(df["split"])
    notes.split_source = "the split folders"
    if used == {""}:
        split_by_identity(df, notes, "identities", val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          fallback="no split folders")
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
        notes.split_source = "the split folders; val " + seeded_split_source(
            "train identities", val_fraction=val_fraction, test_fraction=None, seed=seed)
        notes.add("no val folder: val carved from train by identity")
    return df


# --------------------------------------------------------------------------- FaceForensics++

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
_FRAME_FOLDERS = ("frames", "images")
#: The demographic code columns of the published FF++ annotation CSVs, in the default order:
#: robust_fairness_withNoisy_labels' ``Intersection`` (the cleaner label) before ``intersec_label``
#: (its noisy one; the only one in PG-FDD / Fairness-Generalization's CSVs).
FFPP_LABEL_COLUMNS = ("Intersection", "intersec_label")
#: Path columns of those CSVs: ``Image Path`` (robust_fairness_withNoisy_labels), ``img_path`` (PG-FDD).
_FFPP_PATH_COLUMNS = ("Image Path", "img_path", "path")
#: One-hot columns (PG-FDD's is*, or A-FF++'s attribute names): 1 yes, -1 no, 0 undefined.
_ONE_HOT = {"male": ("ismale", "male"), "asian": ("isasian", "asian"), "white": ("iswhite", "white"),
            "black": ("isblack", "black")}


def _ffpp_video_dirs(base: Path, skipped: list[str], root: Path) -> tuple[list[Path], list[Path]]:
    """(frame folders ``base/<comp>/{frames,images}/<video>/``, video files ``base/<comp>/videos/*``);
    other folders next to frames/ (masks, landmarks) go to ``skipped``."""
    frames, videos = [], []
    for comp in _subdirs(base):
        for kind in _subdirs(comp):
            if kind.name in _FRAME_FOLDERS:
                frames += _subdirs(kind)
            elif kind.name == "videos":
                videos += [p for p in sorted(kind.iterdir()) if p.suffix.lower() in VIDEO_EXTENSIONS]
            else:
                skipped.append(kind.relative_to(root).as_posix() + "/")
    return frames, videos


def _ffpp_split_files(root: Path) -> Path | None:
    """The folder holding the official train/val/test.json: ROOT itself (DeepfakeBench,
    SelfBlendedImages) or ROOT/splits; None when neither holds any of them."""
    for folder in (root, root / "splits"):
        if any((folder / f"{s}.json").is_file() for s in SPLITS):
            return folder
    return None


def _ffpp_official_splits(split_dir: Path) -> tuple[dict[str, str], dict[frozenset, str]]:
    id_split: dict[str, str] = {}
    pair_split: dict[frozenset, str] = {}
    for split in SPLITS:
        file = split_dir / f"{split}.json"
        if not file.is_file():
            raise ManifestError(
                f"{split_dir}: {file.name} is missing; the official FF++ splits are train.json, val.json and "
                "test.json (JSON lists of video id pairs such as [[\"953\", \"974\"], ...]); add it, or remove "
                "the other split files to split by identity"
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
    """1 -> True, -1 -> False, 0 or empty -> None (undefined, as A-FF++ and PG-FDD code it)."""
    value = str(value).strip()
    if value == "" or value.lower() == "nan":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ManifestError(f"not a 1 / -1 / 0 indicator: {value!r}") from None
    if number not in (1.0, -1.0, 0.0):
        raise ManifestError(f"not a 1 / -1 / 0 indicator: {value!r}")
    return None if number == 0 else number > 0


def _demographics_of(df: pd.DataFrame, source: Path, label_column: str | None,
                     undefined: list[str]) -> tuple[list[tuple[str, str]], str]:
    """((gender, race) per annotation row, the column(s) read), from a 0..7 code column or the
    one-hot columns.  Undefined values (empty, -1 codes, 0 indicators) give ("", "") and are
    appended to ``undefined``."""
    out, bad = [], []
    lower = {c.lower(): c for c in df.columns}
    if label_column is not None and label_column not in df.columns:
        raise ManifestError(f"{source}: has no column {label_column!r} (--label-column); found {', '.join(df.columns)}")
    column = label_column or next((c for c in FFPP_LABEL_COLUMNS if c in df.columns), None)
    one_hot = {k: next((lower[n] for n in names if n in lower), None) for k, names in _ONE_HOT.items()}
    if column is not None:
        for i, value in enumerate(df[column]):
            value = str(value).strip()
            try:
                code = int(float(value)) if value and value.lower() != "nan" else -1
            except ValueError:
                code = -2
            if code == -1:
                undefined.append(f"{source.name} line {i + 2}")
                out.append(("", ""))
            elif 0 <= code < 8 and float(value) == code:
                out.append((GENDERS[code // len(RACES)], RACES[code % len(RACES)]))
            else:
                bad.append(f"line {i + 2}: {value!r}")
                out.append(("", ""))
        what, used = f"a {column} outside 0..7", column
    elif all(one_hot.values()):
        what, used = "invalid one-hot demographics", "/".join(one_hot.values())
        for i, row in enumerate(df[list(one_hot.values())].itertuples(index=False)):
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
                    bad.append(f"line {i + 2}: more than one of asian/white/black set")
                    out.append(("", ""))
                    continue
                race = hot[0] if hot else "other"  # none of the three -> other (DESIGN.md)
            if gender == "" or race == "":
                undefined.append(f"{source.name} line {i + 2}")
            out.append((gender, race))
    else:
        raise ManifestError(
            f"{source}: needs a column {' or '.join(FFPP_LABEL_COLUMNS)} (0..7) or the one-hot columns ismale, isasian, "
            f"iswhite, isblack; found {', '.join(df.columns)}"
        )
    if bad:
        raise ManifestError(f"{source}: {len(bad)} row(s) with {what}: {_listing(bad)}")
    return out, used


_AMBIGUOUS = ("?", "?")
_SUFFIX = 4  # CSVs carry their authors' absolute paths: match on at least the last 4 components
_MIN_KEY = 2  # ... or on folder/name when the frame's own path under ROOT is that short (flat crops)


def _path_parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in str(path).strip().replace("\\", "/").split("/") if p not in ("", "."))


def _ffpp_annotations(annotations: Path, root: Path, frames: list[Path], notes: Notes,
                      label_column: str | None) -> list[tuple[str, str]]:
    """(gender, race) per frame from FF++ demographic annotation CSV(s) (a file, or a folder of them)."""
    files = sorted(annotations.glob("*.csv")) if annotations.is_dir() else [annotations]
    if not files:
        raise ManifestError(f"{annotations}: a folder with no .csv file; pass the demographic annotations CSV")
    index: dict[tuple[str, ...], tuple[str, str]] = {}
    example, n_rows, undefined, used = "", 0, [], set()
    for file in files:
        df = _read_csv(file)
        column = next((c for c in _FFPP_PATH_COLUMNS if c in df.columns), None)
        if column is None:
            raise ManifestError(f"{file}: needs a column naming each frame ({', '.join(_FFPP_PATH_COLUMNS)}); "
                                f"found {', '.join(df.columns)}")
        values, read_from = _demographics_of(df, file, label_column, undefined)
        used.add(f"{read_from} of {file.name}")
        for path, value in zip(df[column], values):
            parts = _path_parts(path)
            example = example or str(path)
            n_rows += 1
            for k in range(min(_MIN_KEY, len(parts)), len(parts) + 1):
                key = parts[-k:]
                if index.setdefault(key, value) != value:
                    index[key] = _AMBIGUOUS
    out, ambiguous, unmatched, matched = [], [], [], 0
    for frame in frames:
        parts = frame.relative_to(root).parts
        value = ("", "")
        # the longest match wins: the full path relative to ROOT, then ever shorter suffixes
        for k in range(len(parts), min(_SUFFIX, len(parts)) - 1, -1):
            found = index.get(parts[-k:])
            if found is not None:
                value, matched = found, matched + 1
                break
        else:
            unmatched.append(frame.relative_to(root).as_posix())
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
    notes.add(f"demographics from column {', '.join(sorted(used))} (--label-column picks Intersection, the "
              "publishers' cleaner label, or intersec_label, their noisy one)")
    notes.skipped("annotation value(s) as unknown", undefined, "undefined code: 0 in a 1/-1 column, or empty")
    notes.skipped("frame(s)' demographics", ambiguous, "they match annotation rows that disagree; left unknown")
    notes.skipped("frame(s)' demographics", unmatched, "no annotation row matches them; left unknown")
    return out


def _ffpp_flat_rows(root: Path, dataset: str, notes: Notes) -> list[dict]:
    """The processed crops of the fairness benchmarks: ROOT/real/0_youtube_546_131.png and
    ROOT/crop_img/0_Deepfakes_300_304_151.png (one flat folder each)."""
    rows, odd = [], []
    for folder, label in (("real", 0), ("crop_img", 1)):
        for path in list_images(root / folder):
            m = FLAT_FFPP_NAME.match(path.stem)
            if m is None or (label == 0) != (m["method"] == "youtube") or (label == 1 and m["source"] is None):
                odd.append(path.relative_to(root).as_posix())
                continue
            video = m["target"] if label == 0 else f"{m['target']}_{m['source']}"
            row = _row(path, root, dataset, label, identity=m["target"], method="" if label == 0 else m["method"])
            row["_video"] = video
            rows.append(row)
    notes.skipped("crop(s)", odd, "names are not <n>_youtube_<video>_<frame> in real/ or "
                  "<n>_<Method>_<target>_<source>_<frame> in crop_img/")
    return rows


@register_adapter("ffpp")
def ffpp_adapter(root: Path, *, annotations: Path | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, notes: Notes, label_column: str | None = None,
                 **_) -> pd.DataFrame:
    """FaceForensics++ as frames: the official tree (DeepfakeBench, SelfBlendedImages), or flat crops::

        ROOT/original_sequences/youtube/<comp>/frames/<video>/*.png            real, video "000"
        ROOT/manipulated_sequences/<Method>/<comp>/frames/<video>/*.png        fake, video "000_003"
        ROOT/{train,val,test}.json   or   ROOT/splits/{train,val,test}.json    official splits
        ROOT/real/0_youtube_546_131.png  ROOT/crop_img/0_Deepfakes_300_304_151.png   flat crops

    ``<comp>`` is any compression folder (c0, c23, c40, raw), all read; ``images`` is accepted
    for ``frames``; masks/, landmarks/ are counted in a note.  A tree of videos only is an error
    that points to ``featcache frames``.  Methods: :data:`FFPP_METHODS`; other folders
    (DeepFakeDetection, original_sequences/actors) are counted in a note.  ``identity`` is the
    video id for reals and the target id (the first) for fakes: "000_003" -> "000".

    Splits: the official JSONs (lists of id pairs) at ROOT (where DeepfakeBench and
    SelfBlendedImages keep them) or in ROOT/splits -- a video id is in its pair's split, a fake
    "a_b" in the split of pair (a, b); every video must be listed.  Without them, ids linked by
    a fake are kept together and split with ``val_fraction``/``test_fraction``, and a note says so.

    ``annotations``: the published FF++ demographic CSVs (a file or a folder of them):
    robust_fairness_withNoisy_labels' ``Image Path,...,Intersection,Target,intersec_label``,
    PG-FDD's ``img_path,label,ismale,isasian,iswhite,isblack,intersec_label``, or A-FF++-style
    one-hot columns (1 / -1, 0 = undefined -> unknown, never a group).  ``label_column`` picks
    the 0..7 code column: ``Intersection`` (default when present, the cleaner one) or
    ``intersec_label``; the choice is a note.  A row matches a frame by its path relative to
    ROOT, else by the longest common suffix of at least 4 path components (2 for flat crops).
    """
    dataset = "ffpp"
    skipped: list[str] = []
    frames, videos = _ffpp_video_dirs(root / "original_sequences" / "youtube", skipped, root)
    entries: list[tuple[Path, int, str]] = [(v, 0, "") for v in frames]
    other = [p.relative_to(root).as_posix() + "/" for p in _subdirs(root / "original_sequences")
             if p.name != "youtube"]
    for method_dir in _subdirs(root / "manipulated_sequences"):
        if method_dir.name in FFPP_METHODS:
            f, v = _ffpp_video_dirs(method_dir, skipped, root)
            entries += [(d, 1, method_dir.name) for d in f]
            videos += v
        else:
            other.append(method_dir.relative_to(root).as_posix() + "/")
    rows = []
    for video_dir, label, method in entries:
        identity = video_dir.name.split("_")[0]
        for p in list_images(video_dir):
            row = _row(p, root, dataset, label, identity=identity, method=method)
            row["_video"] = video_dir.name
            rows.append(row)
    if not entries and ((root / "real").is_dir() or (root / "crop_img").is_dir()):
        rows = _ffpp_flat_rows(root, dataset, notes)
    notes.skipped("folder(s)", other, f"the ffpp format reads original_sequences/youtube and {', '.join(FFPP_METHODS)}")
    notes.skipped("folder(s) beside frames/", sorted(set(skipped)), "not frames")
    if not rows:
        if videos:
            raise ManifestError(
                f"{root}: {len(videos)} FF++ video(s) but no frames (e.g. {videos[0].relative_to(root)}); extract "
                f"frames first: featcache frames {root} {root} --fps 1 (writes <comp>/frames/<video>/*.png)")
        raise ManifestError(
            f"{root}: no FF++ frames found; expected ROOT/original_sequences/youtube/<c23|c40|...>/frames/<video>/*.png "
            "and ROOT/manipulated_sequences/<Method>/<c23|c40|...>/frames/<video>/*.png (or images/ for frames), "
            "or flat crops in ROOT/real and ROOT/crop_img"
        )
    if entries and videos:
        notes.add(f"{len(videos)} video file(s) not read: frames/ folders are read instead")
    full = pd.DataFrame(rows).sort_values("path", kind="stable").reset_index(drop=True)
    video = full.pop("_video")
    df = full

    df["split"] = _ffpp_splits(root, video, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                               notes=notes)
    if annotations is not None:
        demo = _ffpp_annotations(annotations, root, [Path(p) for p in df["path"]], notes, label_column)
        df["gender"] = [g for g, _ in demo]
        df["race"] = [r for _, r in demo]
    elif label_column is not None:
        raise ManifestError("--label-column applies to --annotations; pass the demographic CSV(s) too")
    return df


def _ffpp_splits(root: Path, video: pd.Series, *, val_fraction: float, test_fraction: float, seed: int,
                 notes: Notes):
    """Each frame's split from its video's name: the official JSONs, or linked ids split by identity."""
    split_dir = _ffpp_split_files(root)
    if split_dir is not None:
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
                "fix the JSON files, or remove them to split by identity"
            )
        notes.split_source = f"the official FF++ split files {split_dir / 'train.json'}, val.json, test.json"
        return video.map(split_of)
    group = _ffpp_groups(sorted(set(video)))
    notes.split_source = seeded_split_source("linked video ids", val_fraction=val_fraction,
                                             test_fraction=test_fraction, seed=seed)
    notes.add(f"no official split files (train.json, val.json, test.json in {root} or {root / 'splits'}): "
              + notes.split_source)
    return assign_splits(video.map(lambda v: group[v.split("_")[0]]), val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed)


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


def _celebdf_test_videos(test_list: Path, present: set, root: Path, notes: Notes) -> set[tuple[str, str]]:
    """The (folder, video) pairs of Celeb-DF's official test list; listed videos not under ROOT are a note."""
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
        folder = next((f for f in CELEBDF_FOLDERS if f.lower() == folder.lower()), folder)
        listed.add((folder, Path(name).stem))
    absent = sorted(f"{f}/{v}" for f, v in listed - present)
    if len(absent) == len(listed):
        raise ManifestError(f"{test_list}: none of its {len(listed)} test videos is under {root} "
                            f"(e.g. {absent[0]}); is ROOT the Celeb-DF-v2 folder?")
    notes.skipped("listed test video(s)", absent, f"in {CELEBDF_TEST_LIST} but not under ROOT")
    return listed


@register_adapter("celebdf")
def celebdf_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """Celeb-DF v2, official or as DeepfakeBench's preprocessing leaves it::

        ROOT/Celeb-real/id0_0000/*.png        real   (or ROOT/Celeb-real/id0_0000.mp4)
        ROOT/Celeb-real/frames/id0_0000/*.png real   (DeepfakeBench: <folder>/frames/<video>/)
        ROOT/Celeb-real/videos/id0_0000.mp4   real   (SelfBlendedImages; it spells Youtube-real)
        ROOT/YouTube-real/00170/*.png         real
        ROOT/Celeb-synthesis/id0_id16_0000/   fake, method "celebdf-synthesis"
        ROOT/List_of_testing_videos.txt       "1 YouTube-real/00170.mp4" per line

    Each folder holds per-video frame folders or the video files themselves (then ``path`` is
    the video file); both may be mixed.  Where ``<folder>/frames/`` exists its frame folders are
    read and the video files beside it are counted in a note.  Other entries are counted in a
    note.  The videos listed in List_of_testing_videos.txt are split ``test`` (a frame folder
    matches the listed video's stem); the rest are split into train/val by identity with
    ``val_fraction`` (``test_fraction`` is ignored).  Without the list, identities are split
    with both fractions and a note says the official test split is not used.  Note the official
    test list shares identities with the rest (the same 59 celebrities), so identity-disjointness
    holds only between train and val.

    ``identity``: Celeb-real "id0_0000" -> "id0"; Celeb-synthesis "id0_id16_0000" -> "id0",
    the target (id0's video with id16's face swapped in); YouTube-real: the video stem.
    """
    dataset = "celebdf"
    rows, present, videos, not_read, other = [], set(), [], [], []
    folders = {p.name.lower(): p for p in _subdirs(root)}
    for folder, label in CELEBDF_FOLDERS.items():
        base = folders.get(folder.lower())  # SelfBlendedImages spells it Youtube-real
        if base is None:
            continue
        frames_dir, videos_dir = base / "frames", base / "videos"
        if frames_dir.is_dir():
            entries = sorted(frames_dir.iterdir())
            not_read += [p.relative_to(root).as_posix() for d in (base, videos_dir) if d.is_dir()
                         for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
            other += [p.relative_to(root).as_posix() + "/" for p in _subdirs(base) if p.name not in ("frames", "videos")]
        else:  # frame folders or videos in the folder itself, or videos in videos/ (SelfBlendedImages)
            entries = sorted([*(videos_dir.iterdir() if videos_dir.is_dir() else []),
                              *(p for p in base.iterdir() if p != videos_dir)])
        for entry in entries:
            is_video = entry.suffix.lower() in VIDEO_EXTENSIONS
            if entry.name.startswith("."):
                continue
            if not (entry.is_dir() or is_video):
                other.append(entry.relative_to(root).as_posix())
                continue
            # a frame folder may be named after its video ("00170.mp4/"): the key is the stem
            video = entry.stem if is_video else entry.name
            present.add((folder, video))
            method = "celebdf-synthesis" if label else ""
            identity = _celebdf_identity(folder, video)
            paths = list_images(entry) if entry.is_dir() else [entry]
            for p in paths:
                rows.append(_row(p, root, dataset, label, identity=identity, method=method))
                videos.append((folder, video))
    notes.skipped("video file(s)", not_read, "their frames/ folder is read instead")
    notes.skipped("entries", other, "neither a frame folder nor a video")
    if not rows:
        raise ManifestError(
            f"{root}: no Celeb-DF videos or frames found; expected ROOT/Celeb-real, ROOT/YouTube-real and "
            "ROOT/Celeb-synthesis holding per-video frame folders (id0_0000/*.png, or frames/id0_0000/*.png) "
            "or .mp4 files"
        )
    order = np.argsort([r["path"] for r in rows], kind="stable")
    df = _frame(rows)
    videos = [videos[i] for i in order]

    test_list = root / CELEBDF_TEST_LIST
    if test_list.is_file():
        listed = _celebdf_test_videos(test_list, present, root, notes)
        test = np.array([v in listed for v in videos], dtype=bool)
        df.loc[test, "split"] = "test"
        df.loc[~test, "split"] = assign_splits(df.loc[~test, "identity"], val_fraction=val_fraction,
                                               test_fraction=0.0, seed=seed)
        notes.split_source = (f"test: the official {CELEBDF_TEST_LIST}; train/val: "
                              + seeded_split_source("identities", val_fraction=val_fraction, test_fraction=None,
                                                    seed=seed))
    else:
        split_by_identity(df, notes, "identities", val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          fallback=f"no {CELEBDF_TEST_LIST} in {root}: the official test split is not used")
    return df


# --------------------------------------------------------------------------- FairFace

FAIRFACE_CSVS = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}


@register_adapter("fairface")
def fairface_adapter(root: Path, *, annotations: Path | None = None, val_fraction: float = 0.1,
                     test_fraction: float = 0.1, seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
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
    notes.split_source = ("test: the official fairface_label_val.csv; train/val: the official train rows, "
                          + seeded_split_source("them", val_fraction=val_fraction, test_fraction=None, seed=seed))
    if "val" not in found:
        notes.add(f"no {FAIRFACE_CSVS['val']}: no test rows")
    return df


# --------------------------------------------------------------------------- UTKFace

_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)")
UTKFACE_MAX_MALFORMED = 0.01
#: The 3 names of the public UTKFace release that lack the race field (name before the first dot).
UTKFACE_KNOWN_MALFORMED = frozenset({"39_1_20170116174525125", "61_1_20170109142408075", "61_1_20170109150557335"})


@register_adapter("utkface")
def utkface_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """UTKFace: images anywhere under ROOT named ``[age]_[gender]_[race]_[date&time].jpg``,
    often with ``.chip.jpg`` (ROOT/UTKFace/, ROOT/crop_part1/, ROOT/part1..3/, ...).

    gender 0 male, 1 female; race 0 white, 1 black, 2 asian, 3 indian -> other, 4 others ->
    other (the vocabularies in manifest.py).  All faces are real (label 0).  ``identity`` is
    the name before its first dot ("25_0_0_20170116174525125"), so the aligned crop and the
    in-the-wild copy of one photo share it; UTKFace has no person ids.  Identities are split
    with ``val_fraction``/``test_fraction``.

    Malformed names: the public release has 3 files whose names lack a field
    (:data:`UTKFACE_KNOWN_MALFORMED`, e.g. ``39_1_20170116174525125.jpg.chip.jpg``); they are
    skipped and counted in a note of their own.  Other names that do not parse are skipped with
    a note when they are fewer than 1 % of the images; more than that means ROOT is not (only)
    UTKFace, and a ManifestError lists the first few.
    """
    dataset = "utkface"
    rows, bad = [], []
    notes.skipped("file(s)", unread_files(root, IMAGE_EXTENSIONS, root), "not images, or hidden")
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
    known = [b for b in bad if Path(b).name.split(".")[0] in UTKFACE_KNOWN_MALFORMED]
    bad = [b for b in bad if b not in known]
    notes.skipped("image(s)", known, "UTKFace's known malformed names, without a race field")
    total = len(rows) + len(bad)
    if total == 0:
        raise ManifestError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found for the utkface format")
    if bad:
        why = "names not [age]_[gender 0|1]_[race 0-4]_[date&time].jpg"
        if len(bad) >= UTKFACE_MAX_MALFORMED * total:
            raise ManifestError(
                f"{len(bad)} of {total} image name(s) under {root} do not follow UTKFace's "
                f"[age]_[gender 0|1]_[race 0-4]_[date&time].jpg: {_listing(bad)}; fewer than "
                f"{UTKFACE_MAX_MALFORMED:.0%} would be skipped with a note -- is ROOT the UTKFace folder? Rename or "
                "remove these files"
            )
        notes.skipped("image(s)", bad, why)
    df = _frame(rows)
    return split_by_identity(df, notes, "photos (UTKFace has no split)", val_fraction=val_fraction,
                             test_fraction=test_fraction, seed=seed)


# --------------------------------------------------------------------------- AI-Face

AIFACE_CSVS = {"train": "train.csv", "test": "test.csv"}


def _aiface_code(value: str) -> tuple[str, str] | None:
    value = str(value).strip()
    try:
        code = int(float(value))
    except ValueError:
        return None
    if not 0 <= code < 8 or float(value) != code:
        return None
    return GENDERS[code // len(RACES)], RACES[code % len(RACES)]


@register_adapter("aiface")
def aiface_adapter(root: Path, *, annotations: Path | None = None, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """AI-Face (AI-Face-FairnessBench): generator folders of face images and two CSVs::

        ROOT/AttGAN/..., ROOT/Latent_Diffusion/..., ROOT/Palette/..., ...
        train.csv, test.csv   Image Path, Uncertainty Score Gender/Age/Race, Ground Truth Gender/Age/Race,
                              Intersection (0..7), Target (0 real, 1 fake)

    The CSVs are read from ``annotations`` when it is a folder, else from ROOT or ROOT/dataset.
    ``Image Path`` matches the image whose path under ROOT is its longest suffix (the CSVs carry
    their authors' paths).  label = Target; gender and race from Intersection (DESIGN.md's code
    order); ``method`` the top folder under ROOT (the generator, or the source video dataset);
    ``identity`` the file stem (AI-Face has no person ids).  Splits: test.csv -> test; train.csv
    rows split into train/val with ``val_fraction`` (seeded).  CSV rows without an image and
    images in no CSV are counted in notes.
    """
    dataset = "aiface"
    where = [annotations] if annotations is not None and annotations.is_dir() else [root, root / "dataset"]
    folder = next((w for w in where if any((w / n).is_file() for n in AIFACE_CSVS.values())), None)
    if folder is None:
        raise ManifestError(f"{', '.join(map(str, where))}: no AI-Face train.csv or test.csv; pass the folder "
                            "holding them as --annotations")
    images = {p.relative_to(root).as_posix(): p for p in list_images(root)}
    rows, unmatched, undefined, seen = [], [], [], set()
    for split, name in AIFACE_CSVS.items():
        csv = folder / name
        if not csv.is_file():
            notes.add(f"no AI-Face {name} in {folder}: no {split} rows")
            continue
        table = _read_csv(csv)
        missing = [c for c in ("Image Path", "Intersection", "Target") if c not in table.columns]
        if missing:
            raise ManifestError(f"{csv}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
        for n, (path, code, target) in enumerate(zip(table["Image Path"], table["Intersection"], table["Target"]),
                                                 start=2):
            if target.strip() not in ("0", "1"):
                raise ManifestError(f"{csv}: line {n}: Target {target!r} is neither 0 (real) nor 1 (fake)")
            parts = _path_parts(path)
            rel = next(("/".join(parts[-k:]) for k in range(len(parts), 0, -1) if "/".join(parts[-k:]) in images),
                       None)
            if rel is None:
                unmatched.append(f"{name} line {n}")
                continue
            demo = _aiface_code(code)
            if demo is None:
                undefined.append(f"{name} line {n}")
                demo = ("", "")
            seen.add(rel)
            p = images[rel]
            rows.append(_row(p, root, dataset, int(target), identity=Path(rel).stem, split=split,
                             method=Path(rel).parts[0] if len(Path(rel).parts) > 1 else "",
                             gender=demo[0], race=demo[1]))
    if not rows:
        raise ManifestError(f"{folder}: no CSV row names an image under {root} (matched by the longest path suffix)")
    notes.skipped("CSV row(s)", unmatched, "no image under ROOT has their Image Path")
    notes.skipped("Intersection value(s) as unknown", undefined, "not a code 0..7")
    notes.skipped("image(s)", sorted(set(images) - seen), "in neither train.csv nor test.csv")
    df = _frame(rows)
    train = df["split"] == "train"
    df.loc[train, "split"] = assign_splits(df.loc[train, "identity"], val_fraction=val_fraction, test_fraction=0.0,
                                           seed=seed)
    notes.split_source = ("test: the official test.csv; train/val: the official train.csv, "
                          + seeded_split_source("its images", val_fraction=val_fraction, test_fraction=None, seed=seed))
    return df


# --------------------------------------------------------------------------- CausalFace

def _loose_files(folder: Path, root: Path) -> list[str]:
    """Visible files directly in ``folder`` (not in its subfolders), relative to ``root``."""
    return [p.relative_to(root).as_posix() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def _no_annotations(annotations: Path | None, fmt: str) -> None:
    if annotations is not None:
        raise ManifestError(f"the {fmt} format reads no --annotations ({annotations}); leave it out")


#: A CausalFace image name: ``<race>_<gender>_<attribute abbreviation>_<value><suffix>.png``.
_CAUSALFACE_NAME = re.compile(r"^(?P<race>asian|black|white)_(?P<gender>female|male)_(?P<variation>.+)$")
_CAUSALFACE_SUBSET = "final_picked_"


@register_adapter("causalface")
def causalface_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                       seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """CausalFace (Liang, Perona, Balakrishnan, ICCV 2023): synthetic faces, each GAN seed rendered
    as six demographic prototypes (East Asian, Black, White x female, male), each prototype varied
    along one non-sensitive attribute (age, lighting, pose, smiling) with its identity kept::

        ROOT/final_picked_<attribute>/seed_<N>/<race>_<gender>_<abbr>_<value><suffix>.png
        e.g. final_picked_age/seed_47180/black_female_age_2.3_o2.png
             final_picked_pose/seed_47180/white_male_y_-1.5.png

    The authors publish the archive without a written layout; this is the layout a public
    loader of the release reads (folder per attribute, folder per seed, demographics in the
    file name).  ROOT may also be one ``final_picked_<attribute>`` folder.

    race asian -> asian (East Asian), black, white; gender female, male: the groups the
    generator was steered to, read from the file name.  The release's human annotations
    (perceived attributes, pairwise identity ratings) are not read.  ``identity`` is
    ``seed_<N>/<race>_<gender>`` (one prototype across its variations); splits keep a whole
    seed together (its six prototypes share pose, lighting and background), seeded with
    ``val_fraction``/``test_fraction`` (CausalFace has no split).  ``variation`` records
    ``<attribute>=<value name>`` (``age=2.3_o2``).  label is -1 (none): the faces are
    GAN-generated, so they are neither the real class nor a forgery of a detection task;
    Stage 1 reads only race and gender.  The background-removed copies (``*_rm_bg.png``) are
    the same faces again and are counted in a note, not read.
    """
    dataset = "causalface"
    _no_annotations(annotations, dataset)
    if root.name.startswith(_CAUSALFACE_SUBSET):
        subsets = [root]
        base = root.parent
    else:
        subsets = [p for p in _subdirs(root) if p.name.startswith(_CAUSALFACE_SUBSET)]
        base = root
        notes.skipped("folder(s)", [p.name + "/" for p in _subdirs(root) if p not in subsets],
                      f"only {_CAUSALFACE_SUBSET}<attribute>/ folders are read")
        notes.skipped("file(s) at ROOT", _loose_files(root, root), "only the images in the seed folders are read")
    if not subsets:
        found = ", ".join(p.name for p in _subdirs(root)) or "no folders"
        raise ManifestError(
            f"{root}: no {_CAUSALFACE_SUBSET}<attribute> folder ({found}); CausalFace's images sit in "
            f"ROOT/{_CAUSALFACE_SUBSET}age/seed_<N>/<race>_<gender>_age_<value>.png (likewise lighting, pose, smiling)"
        )
    rows, seeds, odd, no_bg, outside = [], [], [], [], []
    for subset in subsets:
        attribute = subset.name[len(_CAUSALFACE_SUBSET):]
        outside += unread_files(subset, IMAGE_EXTENSIONS, base)
        for path in list_images(subset):
            rel = path.relative_to(base).as_posix()
            if path.parent.parent != subset or not path.parent.name.startswith("seed_"):
                outside.append(rel)
                continue
            match = _CAUSALFACE_NAME.match(path.stem)
            if match is None:
                odd.append(rel)
                continue
            if path.stem.endswith("_rm_bg"):
                no_bg.append(rel)
                continue
            race = map_race(match["race"], "causalface", source=rel)
            gender = map_gender(match["gender"], "causalface", source=rel)
            variation = match["variation"]
            for abbr in (attribute, {"lighting": "l", "pose": "y"}.get(attribute, attribute)):
                if variation.startswith(abbr + "_"):
                    variation = variation[len(abbr) + 1:]
                    break
            row = _row(path, base, dataset, -1, identity=f"{path.parent.name}/{match['race']}_{match['gender']}",
                       gender=gender, race=race)
            row["variation"] = f"{attribute}={variation}"
            rows.append(row)
            seeds.append(path.parent.name)
    notes.skipped("background-removed copies", no_bg, "the same faces as the images beside them")
    notes.skipped("image(s)", odd, "names not <asian|black|white>_<female|male>_<attribute>_<value>.png")
    notes.skipped("file(s)", outside, "not an image in a seed_<N>/ folder")
    if not rows:
        raise ManifestError(f"{root}: no CausalFace images (seed_<N>/<race>_<gender>_<attribute>_<value>.png) under "
                            f"{', '.join(p.name for p in subsets)}")
    order = np.argsort([r["path"] for r in rows], kind="stable")
    df = _frame(rows, columns=[*ROW_COLUMNS, "variation"])
    seed_of = [seeds[i] for i in order]
    df["split"] = assign_splits(seed_of, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    notes.split_source = seeded_split_source("GAN seeds (CausalFace has no split; a seed's six prototypes stay "
                                             "together)", val_fraction=val_fraction, test_fraction=test_fraction,
                                             seed=seed)
    return df


# --------------------------------------------------------------------------- DFDC

DFDC_METADATA = "metadata.json"
DFDC_TEST_LABELS = "labels.csv"
_DFDC_LABELS = {"REAL": 0, "FAKE": 1}


def _dfdc_samples(folder: Path, root: Path, stems: dict[str, object], not_read: list[str],
                  absent: list[str]) -> list[tuple[Path, str]]:
    """(file, video stem) of the videos ``stems`` lists in ``folder``: the frames of
    ``folder/frames/<stem>/`` where that folder exists (DeepfakeBench), else the video file."""
    frames = folder / "frames"
    out = []
    for stem in sorted(stems):
        frame_dir = frames / stem
        video = next((folder / f"{stem}{ext}" for ext in VIDEO_EXTENSIONS if (folder / f"{stem}{ext}").is_file()),
                     None)
        if frames.is_dir():
            images = list_images(frame_dir) if frame_dir.is_dir() else []
            if images:
                out += [(p, stem) for p in images]
                if video is not None:
                    not_read.append(video.relative_to(root).as_posix())
                continue
        elif video is not None:
            out.append((video, stem))
            continue
        absent.append(f"{folder.relative_to(root).as_posix()}/{stem}")
    return out


@register_adapter("dfdc")
def dfdc_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """The DeepFake Detection Challenge (DFDC) full release, or as DeepfakeBench's preprocessing leaves it::

        ROOT/dfdc_train_part_0/metadata.json   {"aaqaifqrwn.mp4": {"label": "FAKE", "split": "train",
                                                 "original": "vudstovrck.mp4"}, ...}  (REAL: no original)
        ROOT/dfdc_train_part_0/aaqaifqrwn.mp4  the videos                     (path = the video file)
        ROOT/dfdc_train_part_0/frames/aaqaifqrwn/*.png  frames, DeepfakeBench (read instead of the video)
        ROOT/test/labels.csv                   filename,label  (0 real, 1 fake): the public test set
        ROOT/test/<name>.mp4 or ROOT/test/frames/<name>/*.png

    Train parts are found as any folder holding ``metadata.json`` at ROOT, one or two levels down
    (``ROOT/train/dfdc_train_part_0/``, DeepfakeBench's); the test set as a folder holding
    ``labels.csv``.  label FAKE -> 1, REAL -> 0; another label is an error.  ``identity``: the
    video the fake was made from (``original``), a real video's own name, so a fake and its source
    share a split; the test set has no originals, so its identity is the video name.  DFDC publishes
    no actor ids, manipulation method per video or demographics (``method`` stays empty).
    ``annotations``: per-frame demographic CSV(s) such as A-DFDC (DeepFakeAnnotations: a path
    column and one-hot Male/Asian/White/Black, 1 / -1, 0 undefined), read as ``ffpp --annotations``
    reads A-FF++ (rows matched by path suffix; unmatched frames stay unknown, counted in a note);
    without them ``gender`` and ``race`` are empty.  Splits: the train parts' videos are split into train/val by identity with
    ``val_fraction``; the test set is ``test`` (a labels.csv folder named val/validation is
    ``val``).  Without a test set, identities are split with both fractions and a note says so.
    Listed videos found neither as a video nor as frames, and videos in no list, are counted in notes.
    """
    dataset = "dfdc"
    candidates = [root, *_subdirs(root), *(d for top in _subdirs(root) for d in _subdirs(top))]
    parts = [d for d in candidates if (d / DFDC_METADATA).is_file()]
    tests = [d for d in candidates if (d / DFDC_TEST_LABELS).is_file()]
    if not parts and not tests:
        raise ManifestError(
            f"{root}: no DFDC {DFDC_METADATA} or test {DFDC_TEST_LABELS} (in ROOT or up to two levels below); "
            "expected ROOT/dfdc_train_part_<k>/metadata.json with the videos beside it, and ROOT/test/labels.csv"
        )
    rows, not_read, absent, unlisted, no_original = [], [], [], [], []
    for part in parts:
        try:
            meta = json.loads((part / DFDC_METADATA).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{part / DFDC_METADATA}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
            raise ManifestError(f"{part / DFDC_METADATA}: expected {{\"<video>.mp4\": {{\"label\": \"REAL|FAKE\", ...}}}}")
        info = {}
        for name, entry in meta.items():
            label = str(entry.get("label", "")).upper()
            if label not in _DFDC_LABELS:
                raise ManifestError(f"{part / DFDC_METADATA}: {name}: label {entry.get('label')!r} is neither REAL nor FAKE")
            original = entry.get("original") or ""
            if label == "FAKE" and not original:
                no_original.append(f"{part.name}/{name}")
            info[Path(name).stem] = (_DFDC_LABELS[label], Path(original).stem if label == "FAKE" and original
                                     else Path(name).stem)
        listed = set(info)
        unlisted += [p.relative_to(root).as_posix() for p in sorted(part.iterdir())
                     if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and p.stem not in listed]
        for path, stem in _dfdc_samples(part, root, info, not_read, absent):
            label, identity = info[stem]
            rows.append(_row(path, root, dataset, label, identity=identity, split="train"))
    for test in tests:
        table = _read_csv(test / DFDC_TEST_LABELS)
        missing = [c for c in ("filename", "label") if c not in table.columns]
        if missing:
            raise ManifestError(f"{test / DFDC_TEST_LABELS}: missing column(s) {', '.join(missing)}; "
                                f"found {', '.join(table.columns)} (DFDC's test labels are filename,label)")
        bad = [f"line {n}: {v!r}" for n, v in enumerate(table["label"], start=2) if v.strip() not in ("0", "1")]
        if bad:
            raise ManifestError(f"{test / DFDC_TEST_LABELS}: label must be 0 (real) or 1 (fake): {_listing(bad)}")
        info = {Path(f).stem: int(v) for f, v in zip(table["filename"], table["label"])}
        split = "val" if test.name.lower() in ("val", "valid", "validation") else "test"
        unlisted += [p.relative_to(root).as_posix() for p in sorted(test.iterdir())
                     if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and p.stem not in info]
        for path, stem in _dfdc_samples(test, root, info, not_read, absent):
            rows.append(_row(path, root, dataset, info[stem], identity=stem, split=split))
    notes.skipped("video file(s)", not_read, "their frames/ folder is read instead")
    notes.skipped("listed video(s)", absent, "neither the video nor its frames are under ROOT")
    notes.skipped("video file(s)", unlisted, f"in no {DFDC_METADATA} or {DFDC_TEST_LABELS}")
    if no_original:
        notes.add(f"{len(no_original)} FAKE video(s) without an 'original' use their own name as identity: "
                  + _listing(no_original))
    if not rows:
        raise ManifestError(f"{root}: the DFDC lists name {len(absent)} video(s) but none is under ROOT as a video "
                            f"or as frames/<video>/*.png (e.g. {absent[0] if absent else '-'})")
    df = _frame(rows)
    if annotations is not None:
        demo = _ffpp_annotations(annotations, root, [Path(p) for p in df["path"]], notes, None)
        df["gender"] = [g for g, _ in demo]
        df["race"] = [r for _, r in demo]
    train = df["split"] == "train"
    if tests:
        df.loc[train, "split"] = assign_splits(df.loc[train, "identity"], val_fraction=val_fraction,
                                               test_fraction=0.0, seed=seed)
        notes.split_source = (f"{', '.join(sorted(set(df.loc[~train, 'split'])))}: the official "
                              f"{', '.join(t.relative_to(root).as_posix() or '.' for t in tests)}/{DFDC_TEST_LABELS}; "
                              "train/val: the train parts, " + seeded_split_source(
                                  "source videos", val_fraction=val_fraction, test_fraction=None, seed=seed))
    else:
        split_by_identity(df, notes, "source videos", val_fraction=val_fraction, test_fraction=test_fraction,
                          seed=seed, fallback=f"no test {DFDC_TEST_LABELS} under {root}: the official test set is not used")
    return df


# --------------------------------------------------------------------------- DF40

#: DF40's source domains: fakes made from FF++ or from Celeb-DF identities (folder name -> value).
DF40_DOMAINS = {"ff": "ff", "ffpp": "ff", "ff++": "ff", "cdf": "cdf", "cdfv2": "cdf", "celeb-df": "cdf"}
_DF40_SPLITS = {"train": "train", "test": "test"}


@register_adapter("df40")
def df40_adapter(root: Path, *, annotations=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0, notes: Notes, **_) -> pd.DataFrame:
    """DF40 (Yan et al., NeurIPS 2024 datasets track): 40 generation methods, as its authors release
    the processed data (face crops) and as DeepfakeBench_DF40's preprocessing writes it::

        ROOT/train/<method>/<ff|cdf>/frames/<video>/*.png    fakes made from FF++ or Celeb-DF
        ROOT/test/<method>/<ff|cdf>/frames/<video>/*.png
        ROOT/test/<method>/<ff|cdf>/inversions/*.png          (e4e: one image per name)
        ROOT/test/<method>/fake/**  ROOT/test/<method>/real/**  the methods that ship their own reals
        ROOT/<method>/<ff|cdf>/frames/<video>/*.png           no train/ and test/: seeded split, with a note

    ``method`` is the folder under train/ or test/ (simswap, fsgan, heygen, MidJourney, ...).  label
    1, or 0 for images under a ``real/`` folder.  ``domain`` records ff or cdf (cdfv2, ffpp
    accepted) where the method folder has one.  ``identity`` is ``<domain>/<video>`` for a frame in
    a per-video folder (the same source video across methods shares it), else the file stem.  DF40's
    processed release holds the fakes only, except the methods with a ``real/`` folder: the reals
    (FF++, Celeb-DF) are their own datasets -- make their manifests (``manifest ffpp``, ``manifest
    celebdf``) and join them with ``featcache manifest merge``.  DF40 publishes no per-image
    demographics (its A-FF++ / A-Celeb-DF annotations describe the source videos).  Video files
    (heygen ships some methods as videos only) are counted in a note: extract their frames first
    (``featcache frames``).  Splits: the train/ and test/ folders; val is carved from train by
    identity with ``val_fraction`` (``test_fraction`` is ignored).  The release's folder tree is
    not documented in text; this reading follows its README, its preprocessing code and its
    issue tracker (see the README's table).
    """
    dataset = "df40"
    _no_annotations(annotations, dataset)
    top = _subdirs(root)
    split_dirs = [p for p in top if p.name.lower() in _DF40_SPLITS]
    if split_dirs:
        sources = [(m, _DF40_SPLITS[s.name.lower()]) for s in split_dirs for m in _subdirs(s)]
        other = [p.name + "/" for p in top if p not in split_dirs]
        notes.skipped("folder(s)", other, "with train/ or test/ at ROOT only those are read")
    else:
        sources = [(m, "") for m in top]
    loose = [f for d in [root, *split_dirs] for f in _loose_files(d, root)]
    notes.skipped("file(s) outside the method folders", loose, "only the images in <method>/ folders are read")
    # a DF40 method folder holds its source domain (ff/, cdf/) or fake/ and real/: anything else is another tree
    known = {*DF40_DOMAINS, "fake", "real"}
    odd = [(m, split) for m, split in sources if not any(p.name.lower() in known for p in _subdirs(m))]
    notes.skipped("folder(s)", [m.relative_to(root).as_posix() + "/" for m, _ in odd],
                  "not DF40 method folders: no ff/, cdf/, fake/ or real/ inside")
    sources = [(m, split) for m, split in sources if (m, split) not in odd]
    if not sources:
        raise ManifestError(f"{root}: no DF40 method folders (<method>/ holding ff/, cdf/, fake/ or real/); expected "
                            "ROOT/train/<method>/<ff|cdf>/frames/<video>/*.png and ROOT/test/<method>/... (or "
                            "ROOT/<method>/... without split folders)")
    rows, videos, unread = [], [], []
    for method_dir, split in sources:
        unread += [p for p in unread_files(method_dir, IMAGE_EXTENSIONS, root)]
        for path in list_images(method_dir):
            parts = path.relative_to(method_dir).parts
            domain = DF40_DOMAINS.get(parts[0].lower(), "") if len(parts) > 1 else ""
            label = 0 if any(p.lower() == "real" for p in parts[:-1]) else 1
            in_video = len(parts) >= 3 and parts[-3].lower() == "frames"
            identity = path.parent.name if in_video else path.stem
            row = _row(path, root, dataset, label, identity=f"{domain}/{identity}" if domain else identity,
                       split=split, method=method_dir.name)
            row["domain"] = domain
            rows.append(row)
    videos = [u for u in unread if u.lower().endswith(VIDEO_EXTENSIONS)]
    notes.skipped("video file(s)", videos, "videos are not read: extract frames with featcache frames, then rerun")
    notes.skipped("file(s)", [u for u in unread if u not in videos], "not images, or hidden")
    if not rows:
        raise ManifestError(f"{root}: no images under the DF40 method folders "
                            f"({', '.join(sorted({m.name for m, _ in sources})[:5])}); expected "
                            "<method>/<ff|cdf>/frames/<video>/*.png")
    df = _frame(rows, columns=[*ROW_COLUMNS, "domain"])
    if split_dirs:
        train = df["split"] == "train"
        if train.any():
            df.loc[train, "split"] = assign_splits(df.loc[train, "identity"], val_fraction=val_fraction,
                                                   test_fraction=0.0, seed=seed)
        notes.split_source = (f"the release's {' and '.join(sorted(p.name + '/' for p in split_dirs))} folders; val "
                              + seeded_split_source("train identities", val_fraction=val_fraction, test_fraction=None,
                                                    seed=seed))
    else:
        df["split"] = assign_splits(df["identity"], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        notes.split_source = seeded_split_source("identities", val_fraction=val_fraction, test_fraction=test_fraction,
                                                 seed=seed)
        notes.add("no train/ or test/ folder at ROOT: the release's split is not used; " + notes.split_source)
    if (df["label"] == 0).sum() == 0:
        notes.add("no real images (DF40's processed release holds fakes only): merge with the FF++ / Celeb-DF reals "
                  "(featcache manifest merge df40.csv ffpp.csv ... -o OUT)")
    return df
