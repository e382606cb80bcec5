"""The canonical manifest: one CSV row per sample (see DESIGN.md, "Manifest").

In memory a manifest is a :class:`pandas.DataFrame` whose columns are strings except
``label`` (int8; -1 where unknown) and ``subgroup`` (int8; -1 where gender or race is
unknown).  :func:`normalize_manifest` turns raw rows from any source into that form and
validates them; it is the one gate every manifest passes, whether read from a CSV or built
by a dataset adapter.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ManifestError, write_atomic, writing

#: Canonical column order; columns a source adds beyond these are kept after them.
COLUMNS = (
    "sample_id", "path", "label", "split", "dataset", "gender", "race", "subgroup",
    "identity", "method", "segments", "image_id", "annotations",
)
SPLITS = ("train", "val", "test")
GENDERS = ("male", "female")
RACES = ("asian", "white", "black", "other")
#: Intersectional subgroup names in code order 0..7 (gender-major, as in the fairness literature).
SUBGROUP_NAMES = tuple(f"{g}-{r}" for g in GENDERS for r in RACES)
#: FF++ training subgroup counts published with its demographic annotations, codes 0..7.
FFPP_SUBGROUP_COUNTS = (2475, 25443, 1468, 4163, 8013, 31281, 1111, 2185)

LABEL_VALUES = {
    "0": 0, "real": 0, "bonafide": 0, "bona-fide": 0, "genuine": 0,
    "1": 1, "fake": 1, "spoof": 1, "manipulated": 1,
}

#: Race vocabularies of public datasets mapped onto the four groups (DESIGN.md).
RACE_VOCABULARIES: dict[str, dict[str, str]] = {
    "canonical": {r: r for r in RACES},
    "fairface": {
        "East Asian": "asian", "Southeast Asian": "asian", "White": "white", "Black": "black",
        "Indian": "other", "Latino_Hispanic": "other", "Middle Eastern": "other",
    },
    "utkface": {"0": "white", "1": "black", "2": "asian", "3": "other", "4": "other"},
    # CausalFace's file names: its three groups, "asian" being East Asian (the authors' page)
    "causalface": {"asian": "asian", "black": "black", "white": "white"},
}
GENDER_VOCABULARIES: dict[str, dict[str, str]] = {
    "canonical": {"male": "male", "female": "female"},
    "fairface": {"Male": "male", "Female": "female"},
    "utkface": {"0": "male", "1": "female"},
    "causalface": {"male": "male", "female": "female"},
}

_MAX_LISTED = 5


def map_vocabulary(value: str, vocabulary: dict[str, str], what: str, source: str) -> str:
    """Map one attribute value through a dataset's vocabulary; empty stays empty.

    An unmapped value is an error, never a silent ``other``.
    """
    value = "" if value is None else str(value).strip()
    if value == "" or value.lower() == "nan":
        return ""
    try:
        return vocabulary[value]
    except KeyError:
        raise ManifestError(
            f"{source}: unknown {what} value {value!r}; known values are "
            f"{', '.join(repr(k) for k in vocabulary)}. Pass an explicit mapping for other vocabularies."
        ) from None


def map_race(value: str, vocabulary: str | dict[str, str] = "canonical", source: str = "manifest") -> str:
    """Map a race value of a named vocabulary (``fairface``, ``utkface``, ...) to the four groups."""
    vocab = RACE_VOCABULARIES[vocabulary] if isinstance(vocabulary, str) else vocabulary
    return map_vocabulary(value, vocab, "race", source)


def map_gender(value: str, vocabulary: str | dict[str, str] = "canonical", source: str = "manifest") -> str:
    vocab = GENDER_VOCABULARIES[vocabulary] if isinstance(vocabulary, str) else vocabulary
    return map_vocabulary(value, vocab, "gender", source)


def subgroup_code(gender: str, race: str) -> int:
    """Intersectional subgroup code 0..7 (DESIGN.md), -1 when either attribute is unknown."""
    if gender not in GENDERS or race not in RACES:
        return -1
    return GENDERS.index(gender) * len(RACES) + RACES.index(race)


@dataclass
class Manifest:
    """A validated manifest and where it came from."""

    df: pd.DataFrame
    root: Path  # the folder relative paths are resolved against
    source: str  # the CSV's path, or the adapter that built it
    sha256: str  # sha256 of the CSV's bytes (of the canonical CSV for an in-memory manifest)
    notes: list[str] = field(default_factory=list)  # what a dataset adapter skipped or fell back on
    split_source: str = ""  # where a dataset adapter took the splits from

    def __len__(self) -> int:
        return len(self.df)

    def absolute_paths(self) -> list[str]:
        return [p if os.path.isabs(p) else str(self.root / p) for p in self.df["path"]]


class _Problems:
    """Collects offending rows per kind of problem and raises one error listing the first few."""

    def __init__(self, source: str):
        self.source = source
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, rows: pd.DataFrame | pd.Index, describe) -> None:
        index = rows.index if isinstance(rows, pd.DataFrame) else rows
        if len(index):
            self.kinds[kind] = [describe(i) for i in index]

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        parts = []
        for kind, rows in self.kinds.items():
            shown = "; ".join(rows[:_MAX_LISTED])
            more = f" (and {len(rows) - _MAX_LISTED} more)" if len(rows) > _MAX_LISTED else ""
            parts.append(f"{len(rows)} row(s) {kind}: {shown}{more}")
        raise ManifestError(f"{self.source}: " + " | ".join(parts))


def _row_name(df: pd.DataFrame, i) -> str:
    # CSV line numbers: the header is line 1, so row i (0-based) is line i + 2.
    sid = df.at[i, "sample_id"] if "sample_id" in df.columns else ""
    return f"line {int(i) + 2} ({sid})" if sid else f"line {int(i) + 2}"


def normalize_manifest(
    rows: pd.DataFrame,
    root: str | os.PathLike,
    *,
    source: str = "manifest",
    check_files: bool = True,
    require_label: bool = False,
) -> pd.DataFrame:
    """Validate raw manifest rows and return them in canonical form.

    ``rows`` may hold any subset of :data:`COLUMNS` as strings (``path`` and ``split`` are
    required).  ``sample_id`` is derived from ``path`` when absent, ``label`` accepts 0/1 and
    the words real/fake/bonafide/spoof, ``subgroup`` is derived from gender and race.  Every
    problem found is reported at once, with the first offending rows of each kind.
    """
    root = Path(root)
    df = rows.copy().reset_index(drop=True)
    for col in df.columns:
        if col not in ("label", "subgroup"):
            df[col] = df[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())

    missing = [c for c in ("path", "split") if c not in df.columns]
    if require_label and "label" not in df.columns:
        missing.append("label")
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s) {', '.join(missing)}; "
            f"the columns present are {', '.join(df.columns) or '(none)'}"
        )
    if len(df) == 0:
        raise ManifestError(f"{source}: the manifest has no rows")

    if "sample_id" not in df.columns:
        df.insert(0, "sample_id", df["path"])
    else:
        empty = df["sample_id"] == ""
        df.loc[empty, "sample_id"] = df.loc[empty, "path"]

    problems = _Problems(source)
    problems.add("with an empty path", df[df["path"] == ""], lambda i: _row_name(df, i))
    dup = df[df["sample_id"].duplicated(keep=False) & (df["sample_id"] != "")]
    problems.add("with a duplicate sample_id", dup, lambda i: _row_name(df, i))

    labels = df["label"].astype(str).str.strip().str.lower() if "label" in df.columns else pd.Series("", index=df.index)
    labels = labels.replace({"nan": "", "-1": ""})
    known = labels.isin(list(LABEL_VALUES)) | (labels == "")
    problems.add(
        "with an unknown label (use 0 = real, 1 = fake)",
        df[~known], lambda i: f"{_row_name(df, i)}: {labels[i]!r}",
    )
    if require_label:
        problems.add("without a label", df[labels == ""], lambda i: _row_name(df, i))

    problems.add(
        f"with an unknown split (use {', '.join(SPLITS)})",
        df[~df["split"].isin(SPLITS)], lambda i: f"{_row_name(df, i)}: {df.at[i, 'split']!r}",
    )
    for col, allowed in (("gender", GENDERS), ("race", RACES)):
        if col in df.columns:
            bad = df[~df[col].isin(allowed) & (df[col] != "")]
            problems.add(
                f"with an unknown {col} (use {', '.join(allowed)} or leave empty; "
                "dataset adapters map other vocabularies)",
                bad, lambda i, c=col: f"{_row_name(df, i)}: {df.at[i, c]!r}",
            )
    if check_files:
        exists = df["path"].map(lambda p: p != "" and (Path(p) if os.path.isabs(p) else root / p).is_file())
        problems.add("whose file does not exist", df[~exists], lambda i: f"{_row_name(df, i)}: {df.at[i, 'path']}")
    problems.raise_if_any()

    df["label"] = labels.map(lambda v: LABEL_VALUES.get(v, -1)).astype(np.int8)
    for col in COLUMNS:
        if col not in df.columns and col not in ("label", "subgroup"):
            df[col] = ""
    df["subgroup"] = [subgroup_code(g, r) for g, r in zip(df["gender"], df["race"])]
    df["subgroup"] = df["subgroup"].astype(np.int8)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


def _canonical_csv_bytes(df: pd.DataFrame) -> bytes:
    out = df.copy()
    out["label"] = out["label"].map(lambda v: "" if int(v) < 0 else str(int(v)))
    return out.to_csv(index=False, lineterminator="\n").encode("utf-8")


def read_manifest(path: str | os.PathLike, *, check_files: bool = True, require_label: bool = False) -> Manifest:
    """Read and validate a manifest CSV; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    data = path.read_bytes()
    try:
        import io

        raw = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
    df = normalize_manifest(raw, path.parent, source=str(path), check_files=check_files, require_label=require_label)
    return Manifest(df=df, root=path.parent.resolve(), source=str(path), sha256=hashlib.sha256(data).hexdigest())


def write_manifest(rows: pd.DataFrame, out: str | os.PathLike, *, source: str | None = None,
                   check_files: bool = True) -> Manifest:
    """Validate rows and write the canonical CSV to ``out``; nothing is written on error.

    Paths (``path``, ``annotations``) under the manifest's folder are written relative to it,
    others absolute.
    """
    out = Path(out)
    root = out.parent.resolve()
    rows = rows.copy()
    for col in ("path", "annotations"):  # portable: files under the manifest's folder are written relative
        if col in rows.columns:
            rows[col] = [_relative_if_under(str(p), root) for p in rows[col]]
    df = normalize_manifest(rows, root, source=source or str(out), check_files=check_files)
    data = _canonical_csv_bytes(df)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    return Manifest(df=df, root=root, source=str(out), sha256=hashlib.sha256(data).hexdigest())


def _relative_if_under(p: str, root: Path) -> str:
    if not p or not os.path.isabs(p):
        return p
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return p


def refuse_non_empty(out: str | os.PathLike, *, overwrite: bool, what: str = "folder") -> None:
    """Raise unless ``out`` is absent, an empty folder, or ``overwrite`` is set: a synthetic set
    written into a folder holding another one would replace its manifest without a word."""
    out = Path(out)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ManifestError(f"{out} exists and is not a folder; choose another {what}")
    if any(out.iterdir()):
        raise ManifestError(f"{out} is not empty (it may hold another dataset and its manifest); pass --overwrite "
                            f"to write into it anyway, or choose another {what}")


# --------------------------------------------------------------------------- merge

#: Columns holding file paths, resolved against each input manifest's folder when merging.
PATH_COLUMNS = ("path", "annotations")
_AUDIO_SUFFIXES = (".wav", ".flac")


def _manifest_kind(m: Manifest) -> str:
    """``audio``, ``detection`` (COCO annotations) or ``images`` (images or videos): what one cache
    can hold.  Manifests of different kinds cannot share a backbone, so they are not merged."""
    df = m.df
    if (df["annotations"] != "").any():
        return "detection"
    if df["path"].str.lower().str.endswith(_AUDIO_SUFFIXES).all():
        return "audio"
    return "images"


def merge_manifests(inputs, out: str | os.PathLike, *, overwrite: bool = False,
                    check_files: bool = True) -> Manifest:
    """Merge manifest CSVs into one (the Stage-1 union FairFace ∪ UTKFace ∪ CausalFace, a DF40
    fake set with the FF++ and Celeb-DF reals it was made from, ...) and write it to ``out``.

    - ``source``: a column naming each row's input, the input's file name without ``.csv``
      (``fairface.csv`` -> ``fairface``); two inputs with one name are refused.  An empty
      ``dataset`` is filled with the source.
    - Columns are aligned: the union of the inputs' columns; a column an input lacks is empty
      (unknown) for its rows, ``label`` -1.
    - ``identity`` is prefixed with the source (``fairface/train/1``): identities of different
      datasets never merge into one person (splits, video-level scores and leak checks group by it).
    - ``sample_id``: ids found in more than one input are made distinct by prefixing their source
      (``utkface:<id>``); the others are kept, so caches of one input still match by id.
    - Paths: each input's relative paths are resolved against its own folder, then written relative
      to ``out``'s folder when under it (absolute otherwise), so every merged path still resolves.

    Refused (one :class:`~featcache.errors.ManifestError`, nothing written): fewer than two inputs,
    an input given twice or equal to ``out``, inputs of different kinds (images, audio, detection:
    one cache holds one kind), one file listed by two inputs (it would count twice), and an
    existing ``out`` without ``overwrite``.  Splits are kept as each input has them.

    Returns the written :class:`Manifest` with ``notes``: the rows per input and what was renamed.
    """
    paths = [Path(p) for p in inputs]
    out = Path(out)
    if len(paths) < 2:
        raise ManifestError(f"manifest merge needs at least two manifests, got {len(paths)}; "
                            "e.g. featcache manifest merge fairface.csv utkface.csv -o stage1.csv")
    resolved = [p.resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise ManifestError(f"{paths[i]} is given twice; pass each manifest once")
        if r == out.resolve():
            raise ManifestError(f"-o {out} is one of the inputs; write the merged manifest to another file")
    if not overwrite and out.exists():
        raise ManifestError(f"{out} already exists (caches may have been built from it); pass --overwrite to "
                            "replace it, or choose another -o")
    sources = [p.name[:-4] if p.name.lower().endswith(".csv") else p.name for p in paths]
    for i, s in enumerate(sources):
        if s in sources[:i]:
            first = paths[sources.index(s)]
            raise ManifestError(f"{first} and {paths[i]} would both be source {s!r} (the file name without .csv "
                                "names each input's rows); rename one of them")
    manifests = [read_manifest(p, check_files=check_files) for p in paths]

    kinds = [_manifest_kind(m) for m in manifests]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{p} ({k})" for p, k in zip(paths, kinds))
        raise ManifestError(f"cannot merge manifests of different kinds: {listed}; one cache holds images, "
                            "audio or detection images, so merge manifests of one kind")

    frames, notes = [], []
    for path, source, m in zip(paths, sources, manifests):
        df = m.df.copy()
        for col in PATH_COLUMNS:  # absolute, so the merged CSV resolves them wherever it is written
            df[col] = [p if p == "" or os.path.isabs(p) else str(m.root / p) for p in df[col]]
        df["source"] = source
        df["dataset"] = df["dataset"].where(df["dataset"] != "", source)
        df["identity"] = [f"{source}/{i}" if i else "" for i in df["identity"]]
        frames.append(df)
        notes.append(f"{path}: {len(df)} rows, source {source!r}")

    owner: dict[str, str] = {}
    clashes = []
    for source, df in zip(sources, frames):
        for p in df["path"]:
            key = os.path.normpath(p)
            if key in owner:
                clashes.append(f"{p} ({owner[key]} and {source})")
            else:
                owner[key] = source
    if clashes:
        shown = "; ".join(clashes[:_MAX_LISTED]) + (f" (and {len(clashes) - _MAX_LISTED} more)"
                                                    if len(clashes) > _MAX_LISTED else "")
        raise ManifestError(f"{len(clashes)} file(s) are in more than one input, so they would count twice: {shown}; "
                            "remove them from one of the manifests")

    counts = pd.concat([df["sample_id"].drop_duplicates() for df in frames]).value_counts()
    shared = set(counts.index[counts > 1])
    if shared:
        for source, df in zip(sources, frames):
            clash = df["sample_id"].isin(shared)
            df.loc[clash, "sample_id"] = source + ":" + df.loc[clash, "sample_id"]
        notes.append(f"{len(shared)} sample_id(s) were in more than one input; each copy now starts with its source "
                     f"(e.g. {sources[0]}:{sorted(shared)[0]})")
    notes.append("identities are prefixed with their source (e.g. " +
                 next((f"{i!r}" for df in frames for i in df["identity"] if i), "none set") + ")")

    merged = pd.concat(frames, ignore_index=True, sort=False)
    merged["label"] = merged["label"].map(lambda v: "" if pd.isna(v) or int(v) < 0 else str(int(v)))
    merged = merged.drop(columns=["subgroup"]).fillna("")
    columns = [c for c in COLUMNS if c in merged.columns] + ["source"]
    columns += [c for c in merged.columns if c not in columns]
    m = write_manifest(merged[columns], out, source=f"manifest merge -> {out}", check_files=check_files)
    m.notes = notes
    m.split_source = "each input's own splits (kept as they were)"
    return m
