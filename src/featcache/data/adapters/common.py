"""What every dataset adapter shares: the registry, :func:`build_manifest`, notes, split assignment,
file listing and the at-a-glance summary.

An adapter is ``fn(root, *, annotations, val_fraction, test_fraction, seed, notes, **options) ->
DataFrame`` registered with :func:`register_adapter`.  It returns the columns :data:`ROW_COLUMNS`
(plus extra ones such as ``segments``, ``image_id``), one row per sample: an absolute ``path``,
``label`` 0 (real) / 1 (fake) / -1 (none), ``split``, ``dataset``, ``gender`` and ``race`` already
mapped to the canonical vocabularies (or empty), ``identity``, ``method``, and a portable
``sample_id`` = ``<dataset>/<path relative to ROOT>``.

Nothing is dropped silently: every folder, file or row an adapter skips is counted in ONE line of
``notes`` with the first examples (:meth:`Notes.skipped`), every fallback is a note, and
``notes.split_source`` says where the splits came from.  :func:`build_manifest` returns them on
the :class:`~featcache.data.manifest.Manifest`, with :func:`manifest_summary` for the CLI to print.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import ManifestError
from ...registry import Registry
from ..manifest import SPLITS, SUBGROUP_NAMES, Manifest, write_manifest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
AUDIO_EXTENSIONS = (".wav", ".flac")
#: The columns every adapter returns, in this order.
ROW_COLUMNS = ("sample_id", "path", "label", "split", "dataset", "gender", "race", "identity", "method")

Adapter = Callable[..., pd.DataFrame]
#: Adapter name -> adapter; the modality modules register themselves when imported.
ADAPTERS = Registry(
    "manifest format",
    ("featcache.data.adapters.faces", "featcache.data.adapters.audio", "featcache.data.adapters.detection"),
    error=ManifestError,
)
#: Format-specific options of :func:`build_manifest` -> the formats that take them.
FORMAT_OPTIONS = {"label_column": ("ffpp",), "subset": ("asvspoof21",), "gender_map": ("coco-gender",)}

_MAX_LISTED = 5

#: Register ``fn(root, *, annotations, val_fraction, test_fraction, seed, notes, **options) -> DataFrame``.
register_adapter = ADAPTERS.register
#: Names of the registered dataset formats, sorted.
list_adapters = ADAPTERS.names


class Notes:
    """What an adapter tells the user: skipped items (counted, first examples) and fallbacks.

    ``split_source`` says where the splits came from (an official file, folders, or a seeded
    identity split, with the fractions).
    """

    def __init__(self):
        self.lines: list[str] = []
        self.split_source = ""

    def add(self, line: str) -> None:
        self.lines.append(line)

    def skipped(self, what: str, items: list[str], why: str) -> None:
        """One line: ``skipped N <what> (<why>): first, examples (and K more)``; nothing when empty."""
        if items:
            self.lines.append(f"skipped {len(items)} {what} ({why}): {listing(items)}")

    def __iter__(self):
        return iter(self.lines)


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
    overwrite: bool = True,
    **options,
) -> Manifest:
    """Build the manifest of the dataset at ``root`` in format ``fmt`` and write it to ``out``.

    ``val_fraction`` and ``test_fraction`` are fractions of identities, used only where the
    dataset has no official split (each adapter's docstring says where).  ``annotations`` is
    an extra file or folder some adapters read (FF++ demographics, FairFace label CSVs, the
    COCO gender CSV).  ``options``: ``label_column`` (ffpp), ``subset`` (asvspoof21),
    ``gender_map`` (coco-gender); ``None`` means the format's default.  With
    ``overwrite=False`` an existing ``out`` is refused (the CLI's default).

    Returns the written :class:`~featcache.data.manifest.Manifest` with ``notes`` and
    ``split_source`` filled; raises :class:`~featcache.errors.ManifestError` (and writes
    nothing) on a problem with the input.
    """
    adapter = ADAPTERS.get(fmt)
    options = {k: v for k, v in options.items() if v is not None}
    for key in options:
        if key not in FORMAT_OPTIONS:
            raise TypeError(f"build_manifest() got an unexpected option {key!r}")
        if fmt not in FORMAT_OPTIONS[key]:
            raise ManifestError(f"--{key.replace('_', '-')} applies only to the {', '.join(FORMAT_OPTIONS[key])} "
                                f"format(s), not {fmt}; leave it out")
    out_path = Path(out)
    if not overwrite and out_path.exists():
        raise ManifestError(f"{out} already exists (caches may have been built from it); pass --overwrite to "
                            "replace it, or choose another -o")
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
    notes = Notes()
    rows = adapter(
        root_path.resolve(), annotations=ann, val_fraction=float(val_fraction),
        test_fraction=float(test_fraction), seed=int(seed), notes=notes, **options,
    )
    m = write_manifest(rows, out_path, source=f"{fmt} adapter on {root}", check_files=check_files)
    m.notes = list(notes.lines)
    m.split_source = notes.split_source
    return m


# --------------------------------------------------------------------------- summary

def manifest_summary(m: Manifest) -> str:
    """Rows per split x label x subgroup (split x label x attack for audio), the split source and
    the notes: what a user checks at a glance before extracting."""
    df = m.df
    label = df["label"].map({0: "real", 1: "fake", -1: "unlabelled"}).astype(str)
    audio = len(df) > 0 and df["path"].str.lower().str.endswith(AUDIO_EXTENSIONS).all()
    if audio:
        label = df["label"].map({0: "bonafide", 1: "spoof", -1: "unlabelled"}).astype(str)
        column, name = df["method"].replace("", "-"), "attack"
    else:
        names = dict(enumerate(SUBGROUP_NAMES))
        column = df["subgroup"].map(lambda c: names.get(int(c), "unknown"))
        name = "subgroup"
    counts = pd.crosstab([df["split"], label.rename("label")], column.rename(name))
    counts["all"] = counts.sum(axis=1)
    blocks = []
    for split in [s for s in ("train", "val", "test") if s in counts.index.get_level_values(0)]:
        part = counts.loc[[split]]
        total = part.sum().to_frame().T
        total.index = pd.MultiIndex.from_tuples([(split, "all")], names=counts.index.names)
        blocks += [part, total]
    grand = counts.sum().to_frame().T
    grand.index = pd.MultiIndex.from_tuples([("all", "all")], names=counts.index.names)
    table = pd.concat([*blocks, grand])
    lines = [f"{len(df)} rows; rows per split x label x {name}:", table.to_string(sparsify=False)]
    if "source" in df.columns and (df["source"] != "").any():  # a merged manifest: its inputs at a glance
        by_source = pd.crosstab(df["source"], df["split"], margins=True, margins_name="all")
        by_source = by_source[[c for c in (*SPLITS, "all") if c in by_source.columns]]
        lines += [f"rows per source x split ({df['source'].nunique()} sources):", by_source.to_string()]
    lines.append(f"split source: {m.split_source or 'the rows themselves'}")
    notes = getattr(m, "notes", [])
    lines.append(f"notes ({len(notes)}):" if notes else "notes: none")
    lines += [f"  - {n}" for n in notes]
    return "\n".join(lines)


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


def seeded_split_source(what: str, *, val_fraction: float, test_fraction: float | None, seed: int) -> str:
    fractions = f"val {val_fraction:g}" + ("" if test_fraction is None else f", test {test_fraction:g}")
    return f"seeded split of {what} ({fractions}, seed {seed})"


def split_by_identity(df, notes, what: str, *, val_fraction: float, test_fraction: float, seed: int,
                      fallback: str | None = None):
    """Every row's split from its ``identity`` (:func:`assign_splits`), the split source recorded in
    ``notes``; ``fallback`` (why the official split is not used) becomes a note too. Returns ``df``."""
    df["split"] = assign_splits(df["identity"], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    notes.split_source = seeded_split_source(what, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if fallback:
        notes.add(f"{fallback}: {notes.split_source}")
    return df


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


def unread_files(folder: Path, extensions: tuple[str, ...], root: Path) -> list[str]:
    """Files under ``folder`` that :func:`list_files` does not return (other extensions, hidden
    files such as macOS ``._x.jpg``), relative to ``root``: what a note must count."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        base = Path(dirpath)
        found += [(base / f).relative_to(root).as_posix() for f in sorted(filenames)
                  if f.startswith(".") or not f.lower().endswith(extensions) or any(
                      part.startswith(".") for part in (base / f).relative_to(folder).parts[:-1])]
    return found


def list_images(folder: Path) -> list[Path]:
    """Image files (:data:`IMAGE_EXTENSIONS`, any case) under ``folder``, recursively, sorted."""
    return list_files(folder, IMAGE_EXTENSIONS)


def subdirs(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder``, sorted; none when it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def make_row(path: Path, root: Path, dataset: str, label: int, *, identity: str, split: str = "",
             method: str = "", gender: str = "", race: str = "") -> dict:
    return {
        "sample_id": f"{dataset}/{path.relative_to(root).as_posix()}", "path": str(path), "label": label,
        "split": split, "dataset": dataset, "gender": gender, "race": race, "identity": identity,
        "method": method,
    }


def rows_frame(rows: list[dict], columns=ROW_COLUMNS) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def listing(items: list[str]) -> str:
    """The first few items, comma-separated, with how many more there are."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
