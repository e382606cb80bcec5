"""Manifest adapters of gender-labelled COCO detection images: the FAAP layout and COCO + a gender CSV.

Rows carry ``image_id`` (the COCO id) and ``annotations`` (the COCO JSON it belongs to); labels
are empty (-1): these are detection images, not real/fake ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from ...errors import ManifestError
from ..manifest import SPLITS, map_gender
from .common import ROW_COLUMNS, Notes, listing, make_row, read_csv, register_adapter

#: Gender words of detection datasets (FAAP's folder names, COCO gender-annotation CSVs), lower case.
DETECTION_GENDERS = {"male": "male", "female": "female", "man": "male", "woman": "female",
                     "men": "male", "women": "female", "m": "male", "f": "female"}
FAAP_GROUPS = {"women": "female", "men": "male"}
#: What ``--gender-map`` may map a value to; ``unknown`` keeps the image with an empty gender.
GENDER_MAP_TARGETS = ("male", "female", "unknown")
#: Column pairs (image id, gender) of the gender CSVs read by coco-gender: featcache's own, and the
#: public COCO gender annotations of princetonvisualai/imagecaptioning-bias (``id``, ``bb_gender``).
GENDER_CSV_COLUMNS = (("image_id", "gender"), ("id", "bb_gender"))


def read_coco(path: Path) -> dict:
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
    row = make_row(path, root, dataset, -1, identity="", split=split, gender=gender)
    row.update(image_id=str(int(image_id)), annotations=str(ann))
    return row


def _check_unique_image_ids(df: pd.DataFrame) -> None:
    dup = df[df.duplicated(["annotations", "image_id"], keep=False)]
    if len(dup):
        raise ManifestError(f"image ids repeat within one annotation file: {listing(sorted(set(dup['image_id'])))}")


def _detection_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*ROW_COLUMNS, "image_id", "annotations"])
    _check_unique_image_ids(df)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


@register_adapter("faap-coco")
def faap_coco_adapter(root: Path, *, notes: Notes, **_) -> pd.DataFrame:
    """The FAAP reference layout of gender-labelled COCO person images::

        ROOT/women_split/{train,val,test}/<file_name>   ROOT/women_split/gender_women_{split}.json
        ROOT/men_split/{train,val,test}/<file_name>     ROOT/men_split/gender_men_{split}.json

    (the JSON files may also sit in ROOT itself).  Each JSON is a COCO annotation file; its
    images are ``<group>_split/<split>/<file_name>``.  gender: women -> female, men -> male.
    The splits are the files' own.  A JSON missing while its split exists for the other group
    (val with women only) is a note naming it; a ROOT that is one of the ``*_split`` folders
    (one level too deep) is an error naming its parent.
    """
    dataset = "faap-coco"
    if root.name in {f"{g}_split" for g in FAAP_GROUPS} or (
            any(root.glob("gender_*_*.json")) and not any((root / f"{g}_split").is_dir() for g in FAAP_GROUPS)):
        raise ManifestError(f"{root}: this looks like one of FAAP's women_split/ or men_split/ folders, one level "
                            f"too deep; pass the folder that holds both: {root.parent}")
    rows, found, missing = [], [], []
    for group, gender in FAAP_GROUPS.items():
        for split in SPLITS:
            name = f"gender_{group}_{split}.json"
            candidates = [root / f"{group}_split" / name, root / name]
            ann = next((c for c in candidates if c.is_file()), None)
            if ann is None:
                missing.append((group, split, name))
                continue
            found.append((group, split))
            folder = root / f"{group}_split" / split
            for im in read_coco(ann)["images"]:
                rows.append(_detection_row(folder / im["file_name"], root, dataset, split=split, gender=gender,
                                           image_id=im["id"], ann=ann))
    if not found:
        raise ManifestError(f"{root}: no gender_{{women,men}}_{{train,val,test}}.json under women_split/ or men_split/ "
                            "(the FAAP layout); for one COCO JSON and a gender CSV use the coco-gender format")
    if not rows:
        raise ManifestError(f"{root}: the FAAP annotation files list no images")
    present = {s for _, s in found}
    lopsided = [f"{g}_split/{n} (so {s} has {', '.join(o for o in FAAP_GROUPS if o != g)} only)"
                for g, s, n in missing if s in present]
    if lopsided:
        notes.add(f"missing FAAP annotation file(s): {listing(lopsided)}")
    notes.split_source = "the FAAP files gender_<group>_<split>.json"
    return _detection_frame(rows)


def parse_gender_map(spec: str | Path | dict | None) -> dict[str, str]:
    """``"Unsure=unknown,M=male"`` or a YAML file of ``value: male|female|unknown`` -> {value lower: target}."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        raw = spec
    elif Path(str(spec)).suffix.lower() in (".yaml", ".yml") or Path(str(spec)).is_file():
        try:
            raw = yaml.safe_load(Path(spec).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ManifestError(f"--gender-map {spec}: not a readable YAML file ({exc})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"--gender-map {spec}: expected a mapping such as 'Unsure: unknown'")
    else:
        raw = {}
        for part in str(spec).split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ManifestError(f"--gender-map {spec!r}: expected VALUE=male|female|unknown pairs separated by "
                                    "commas, e.g. Unsure=unknown, or a YAML file")
            raw[key] = value
    out = {}
    for key, value in raw.items():
        target = str(value).strip().lower()
        if target not in GENDER_MAP_TARGETS:
            raise ManifestError(f"--gender-map: {key!r} maps to {value!r}; map to one of {', '.join(GENDER_MAP_TARGETS)}")
        out[str(key).strip().lower()] = target
    return out


@register_adapter("coco-gender")
def coco_gender_adapter(root: Path, *, annotations: Path | None = None, notes: Notes,
                        gender_map: str | dict | None = None, **_) -> pd.DataFrame:
    """COCO in its own layout plus a CSV of image genders::

        ROOT/annotations/instances_<name>.json   (or ROOT/instances_*.json)   ROOT/<name>/<file_name>
        annotations = a CSV with columns image_id, gender (male/female, man/woman, men/women), or the
                      public COCO gender CSV of imagecaptioning-bias: id, bb_gender (Male/Female/Unsure)

    Only ``instances_*.json`` are read: COCO's annotations folder also holds ``captions_*`` and
    ``person_keypoints_*`` files over the same images; those are counted in a note.  ``<name>``
    is e.g. ``train2017`` or ``val2017``; its split is the first of train, val, test that it
    contains (COCO's val, the usual evaluation set, is therefore ``val``).  Only images listed
    in the CSV are kept; a CSV id found in no JSON is an error.  Values outside the gender words
    (``Unsure``) need ``gender_map`` (``"Unsure=unknown"`` or a YAML file): ``unknown`` keeps the
    image with an empty gender, counted in a note.
    """
    dataset = "coco-gender"
    if annotations is None or not annotations.is_file():
        raise ManifestError("coco-gender needs --annotations GENDERS.csv (columns image_id, gender; or the public "
                            "COCO gender CSV with id, bb_gender)")
    table = read_csv(annotations)
    pair = next(((i, g) for i, g in GENDER_CSV_COLUMNS if {i, g} <= set(table.columns)), None)
    if pair is None:
        raise ManifestError(f"{annotations}: needs columns image_id and gender (or id and bb_gender); "
                            f"found {', '.join(table.columns)}")
    extra = parse_gender_map(gender_map)
    vocabulary = {**DETECTION_GENDERS, **extra}
    genders, unknown_ids = {}, []
    for image_id, g in zip(table[pair[0]], table[pair[1]]):
        try:
            key = int(image_id)
        except ValueError:
            raise ManifestError(f"{annotations}: {pair[0]} {image_id!r} is not an integer") from None
        value = g.strip().lower()
        if value == "":
            genders[key] = ""
            continue
        if value not in vocabulary:
            hint = f"; pass --gender-map {g.strip()}=unknown (or =male/=female) to map it" if value else ""
            raise ManifestError(f"{annotations}: unknown gender value {g.strip()!r} for image {image_id}; known: "
                                f"{', '.join(sorted(vocabulary))}{hint}")
        target = vocabulary[value]
        if target == "unknown":
            unknown_ids.append(str(key))
            genders[key] = ""
        else:
            genders[key] = map_gender(target, DETECTION_GENDERS, source=str(annotations))
    if unknown_ids:
        notes.add(f"{len(unknown_ids)} image(s) kept with unknown gender (--gender-map): {listing(unknown_ids)}")
    folder = root / "annotations" if (root / "annotations").is_dir() else root
    all_jsons = sorted(folder.glob("*.json"))
    jsons = [j for j in all_jsons if j.name.startswith("instances_")]
    notes.skipped("JSON file(s)", [j.name for j in all_jsons if j not in jsons],
                  "not instance annotations; only instances_*.json hold the boxes")
    if not jsons:
        found = f" (found {listing([j.name for j in all_jsons])})" if all_jsons else ""
        raise ManifestError(f"{folder}: no COCO instances_*.json{found}; put COCO's instances_<split>.json in "
                            "ROOT/annotations/")
    rows, seen, ungendered = [], set(), []
    for ann in jsons:
        name = ann.stem.split("_", 1)[-1]
        split = next((s for s in SPLITS if s in name.lower()), None)
        if split is None:
            raise ManifestError(f"{ann}: its name contains none of {', '.join(SPLITS)}, so its split is unknown")
        images = root / name if (root / name).is_dir() else root
        for im in read_coco(ann)["images"]:
            if int(im["id"]) in genders:
                seen.add(int(im["id"]))
                rows.append(_detection_row(images / im["file_name"], root, dataset, split=split,
                                           gender=genders[int(im["id"])], image_id=im["id"], ann=ann))
            else:
                ungendered.append(f"{ann.name}:{im['id']}")
    unknown = sorted(set(genders) - seen)
    if unknown:
        raise ManifestError(f"{annotations}: {len(unknown)} image id(s) are in no COCO instances_*.json under "
                            f"{root}: {listing([str(u) for u in unknown])}")
    notes.skipped("COCO image(s)", ungendered, f"no row in {annotations.name}")
    notes.split_source = "the COCO file names (instances_<name>.json: train/val/test in <name>)"
    return _detection_frame(rows)
