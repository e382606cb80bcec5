"""A synthetic face-forgery dataset in real file formats (``featcache synth faces``).

Procedural PNG faces drawn with PIL and numpy (no network, no model), in the eight
intersectional subgroups of DESIGN.md, imbalanced like FF++, with face-swap forgeries whose
artifacts are weaker for some subgroups (the ``bias`` knob), plus a FairFace-style balanced
set of real faces for Stage 1.

What is drawn
-------------
* Group-dependent appearance: a skin-tone range per race group, face shape (square jaw /
  pointed chin, face width), hair length and brow thickness per gender, hair and eye colours
  drawn from race-dependent palettes.
* Per-identity traits: exact skin tone within the range, eye spacing, size and colour, brow
  tilt, nose and mouth shapes, hair colour and hairline, face width and height, clothing and
  background colours, so identities are distinguishable.
* Per-image variation: rotation (±7°), scale (±6 %), shift (±4 % of the image), background
  jitter, a lighting gradient in a random direction, overall brightness and Gaussian sensor
  noise, so the images of one identity differ.

Forgeries
---------
A fake is made from one real frame of its *target* identity (the real image of that frame is
in the dataset too, as in FF++, where every fake video has a real source video) and a *donor*,
another identity of the same subgroup and split.  The donor's inner face (skin, brows, eyes,
nose, mouth) is drawn warped onto the target's face shape and pose, with a slight
misalignment, optionally generated at a lower resolution and up-sampled, colour-corrected
only partly towards the target, and blended into the target frame through a soft elliptic
mask over the eyes-nose-mouth region (:func:`inner_face_ellipse` gives its nominal place).
Outside the blurred mask a fake is identical to its real source frame.  Its ``identity`` is
the target's; ``method`` is ``swap-blend`` (bilinear up-sampling, full seam) or
``swap-lowres`` (stronger down-sampling, nearest-neighbour up-sampling: blockiness).

Bias mapping
------------
Every subgroup ``g`` has a hardness ``h_g`` (:data:`HARDNESS`, by subgroup code)::

    0 male-asian 0.70   1 male-white 0.00   2 male-black 0.90   3 male-other 0.35
    4 female-asian 0.80 5 female-white 0.10 6 female-black 1.00 7 female-other 0.45

and the artifact strength of its fakes is ``s_g = 1 - bias * h_g`` (:func:`artifact_strength`):
equal (1) for all groups at ``bias=0``; at ``bias=1`` white faces keep (nearly) full artifacts
while black and asian faces, the minority groups of FF++, become the hardest to detect.
For a fake of strength ``s`` at image size ``S`` (pixels):

* up-sampling factor ``u = 1 + s`` (swap-blend) or ``u = 1 + 2 s`` (swap-lowres): the
  donor is drawn, box-downsampled to ``round(S / u)`` pixels and up-sampled back (no
  resampling when ``u < 1.05``), which blurs it and removes its sensor noise;
* seam: the mask is feathered with a Gaussian of ``sigma = S * (0.008 + 0.07 (1 - s))``
  pixels (a visible edge at ``s = 1``, smooth at ``s = 0``), its axes shrunk by ``sigma``;
  the donor is misaligned by ``0.03 S s`` pixels in a random direction and scaled by
  ``1 ± 0.04 s``;
* colour mismatch: the donor's mean colour inside the mask is moved towards the target's by
  ``1 - 0.7 s`` of the difference (full correction at ``s = 0``), then shifted by a random
  colour cast of up to ``8 s`` grey levels per channel;
* noise: blending two noisy images lowers the noise where the mask is fractional; noise of
  standard deviation ``(1 - s) sigma_n sqrt(2 a (1 - a))`` is added back (``a`` the mask,
  ``sigma_n`` the frame's sensor noise), so at ``s = 0`` the paste leaves no noise trace.

Layout
------
``OUT/images/<split>/<real|fake>/<sample_id>.png`` and ``OUT/manifest.csv`` (dataset
``synthfaces``); ``OUT/stage1/<split>/<sample_id>.png`` and ``OUT/stage1_manifest.csv``
(dataset ``synthfairface``, real faces of new identities, balanced across subgroups).
Splits are by identity (about 70/15/15), every subgroup in every split.  The same arguments
give byte-identical files: every image's randomness comes from a numpy ``SeedSequence`` of
(seed, stream, index), independent of the order images are made in, and PNGs are written
with fixed options and no metadata.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from ..errors import FeatcacheError
from ..progress import bar as tqdm
from .manifest import FFPP_SUBGROUP_COUNTS, GENDERS, RACES, SPLITS, SUBGROUP_NAMES, write_manifest

DATASET = "synthfaces"
STAGE1_DATASET = "synthfairface"
METHODS = ("swap-blend", "swap-lowres")
#: Detection hardness per subgroup code 0..7 at bias 1 (module docstring, "Bias mapping").
HARDNESS = (0.70, 0.00, 0.90, 0.35, 0.80, 0.10, 1.00, 0.45)
#: Identities every subgroup needs in each split of the main set (a donor must exist too).
MIN_IDENTITIES_PER_SPLIT = 3
#: Identities every subgroup needs in each split of the Stage-1 set.
MIN_STAGE1_IDENTITIES_PER_SPLIT = 1
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  # train gets the rest

# Random streams of the SeedSequence keys (seed, stream, ...): one per kind of draw.
_S_IDENTITY, _S_FRAME, _S_FAKE, _S_S1_IDENTITY, _S_S1_FRAME = 1, 2, 3, 4, 5

# Face geometry, as fractions of the image side (the drawing canvas is 2x supersampled).
_FACE_CX, _FACE_CY = 0.5, 0.47
# Inner-face (pasted) ellipse relative to the face's half-width w and half-height h.
_INNER_DY, _INNER_AX, _INNER_AY = 0.19, 0.78, 0.53
_MEAN_W, _MEAN_H = 0.226, 0.305

_SKIN = {  # light and dark end of each race group's skin-tone range (RGB)
    "white": ((238, 210, 188), (206, 160, 130)),
    "asian": ((240, 207, 168), (196, 146, 106)),
    "black": ((150, 101, 72), (70, 45, 31)),
    "other": ((214, 162, 122), (152, 103, 70)),
}
_HAIR = {  # (colour, weight)
    "white": (((224, 192, 120), 3), ((150, 104, 60), 3), ((92, 60, 36), 3), ((36, 28, 24), 2),
              ((158, 72, 38), 1), ((168, 166, 160), 1)),
    "asian": (((24, 21, 21), 4), ((52, 37, 28), 2)),
    "black": (((20, 18, 18), 4), ((44, 32, 25), 2)),
    "other": (((26, 22, 20), 3), ((60, 40, 28), 3), ((92, 62, 36), 1)),
}
_IRIS = {
    "white": (((66, 108, 160), 3), ((82, 122, 82), 2), ((100, 64, 40), 3), ((122, 96, 52), 2)),
    "default": (((70, 45, 30), 3), ((100, 66, 40), 2), ((40, 30, 25), 2)),
}
_CLOTHES = ((40, 60, 110), (150, 30, 40), (30, 110, 70), (200, 200, 200), (40, 40, 45),
            (180, 140, 60), (90, 60, 120), (220, 120, 40), (70, 130, 160), (120, 120, 120))


def artifact_strength(subgroup: int, bias: float) -> float:
    """Artifact strength ``s = 1 - bias * HARDNESS[subgroup]`` of a subgroup's fakes."""
    return 1.0 - float(bias) * HARDNESS[int(subgroup)]


def inner_face_ellipse(size: int) -> tuple[float, float, float, float]:
    """Nominal pasted region of a fake: centre x, centre y, semi-axes x and y in pixels.

    For an average face in a frontal, unshifted pose; an image's own pose moves it by up to
    a few pixels (shift ±4 %, rotation ±7°, scale ±6 %), and the mask is feathered around it.
    """
    return (_FACE_CX * size, (_FACE_CY + _INNER_DY * _MEAN_H) * size,
            _INNER_AX * _MEAN_W * size, _INNER_AY * _MEAN_H * size)


def minimum_n(images_per_identity: int = 4) -> int:
    """The smallest ``n`` that gives every subgroup 3 identities in each of train/val/test."""
    return len(SUBGROUP_NAMES) * len(SPLITS) * MIN_IDENTITIES_PER_SPLIT * images_per_identity


def synth_faces(out, *, n: int = 800, seed: int = 0, bias: float = 0.6, size: int = 64,
                images_per_identity: int = 4, n_stage1: int | None = None, progress: bool = True,
                workers: int = 1) -> dict:
    """Write the synthetic face-forgery dataset and its Stage-1 set under ``out``.

    ``n`` images (rounded down to a multiple of ``images_per_identity``) of ``size`` x ``size``
    pixels; subgroup sizes follow FF++ (:data:`FFPP_SUBGROUP_COUNTS`, water-filled so that
    every subgroup gets at least 3 identities per split); half of each identity's images are
    fakes (see the module docstring for how they are made and how ``bias`` in [0, 1] weakens
    their artifacts for the minority groups).  ``n_stage1`` (default ``n // 2``) real images
    of new identities, balanced across subgroups, form the Stage-1 set.

    Returns a summary: ``manifest`` and ``stage1_manifest`` (paths), ``n_images``, ``n_real``,
    ``n_fake``, ``n_identities``, ``counts`` (subgroup name -> split -> images),
    ``fake_counts`` (the same for fakes), ``n_stage1``, ``stage1_counts``, and the arguments.
    Files of the same names under ``out`` are overwritten; other files there are left alone.
    ``workers`` > 1 draws the images in that many processes; every image depends only on the
    seed and its own keys, so the files are byte-identical to ``workers=1``.
    Arguments are checked before anything is written (:class:`FeatcacheError` says what is
    wrong; :func:`minimum_n` gives the smallest valid ``n``).
    """
    k = _check_int("images_per_identity", images_per_identity, 1)
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 32)
    if size > 1024:
        raise FeatcacheError(f"size={size} is larger than this generator supports (1024); use 32..1024")
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1)
    if isinstance(bias, bool) or not isinstance(bias, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(bias)) or not 0.0 <= float(bias) <= 1.0:
        raise FeatcacheError(
            f"bias={bias!r} is outside [0, 1]: 0 gives every subgroup the same artifact strength, "
            "1 the largest gap between subgroups")
    bias = float(bias)
    need = minimum_n(k)
    if n < need:
        raise FeatcacheError(
            f"n={n} is too small: each of the {len(SUBGROUP_NAMES)} subgroups needs at least "
            f"{MIN_IDENTITIES_PER_SPLIT} identities in each of train/val/test "
            f"({len(SUBGROUP_NAMES) * len(SPLITS) * MIN_IDENTITIES_PER_SPLIT} identities) x "
            f"{k} images per identity = {need} images; pass n >= {need} or fewer images_per_identity")
    n_stage1 = n // 2 if n_stage1 is None else _check_int("n_stage1", n_stage1, 0)
    need1 = len(SUBGROUP_NAMES) * len(SPLITS) * MIN_STAGE1_IDENTITIES_PER_SPLIT * k
    if n_stage1 < need1:
        raise FeatcacheError(
            f"n_stage1={n_stage1} is too small: the Stage-1 set needs every subgroup in each of "
            f"train/val/test, {len(SUBGROUP_NAMES) * len(SPLITS)} identities x {k} images per "
            f"identity = {need1} images; pass n_stage1 >= {need1}")

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"{out} exists and is not a folder")

    main = _plan_main(n // k, k)
    stage1 = _plan_stage1(n_stage1 // k, k)
    bar = tqdm(total=len(main) + len(stage1), desc="synth faces", unit="img", disable=not progress)
    try:
        rows = _write_parallel(_write_main, out, main, workers, bar, seed=seed, bias=bias, size=size)
        rows1 = _write_parallel(_write_stage1, out, stage1, workers, bar, seed=seed, size=size)
    finally:
        bar.close()

    man = write_manifest(pd.DataFrame(rows), out / "manifest.csv", check_files=False)
    man1 = write_manifest(pd.DataFrame(rows1), out / "stage1_manifest.csv", check_files=False)
    df, df1 = man.df, man1.df
    return {
        "out": str(out),
        "manifest": str(out / "manifest.csv"),
        "stage1_manifest": str(out / "stage1_manifest.csv"),
        "n_images": len(df),
        "n_real": int((df["label"] == 0).sum()),
        "n_fake": int((df["label"] == 1).sum()),
        "n_identities": int(df["identity"].nunique()),
        "counts": _counts(df),
        "fake_counts": _counts(df[df["label"] == 1]),
        "n_stage1": len(df1),
        "stage1_counts": _counts(df1),
        "seed": seed, "bias": bias, "size": size, "images_per_identity": k,
    }


# ----------------------------------------------------------------------------------------------
# Arguments and plans


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FeatcacheError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        extra = " (images are drawn with PIL; smaller faces are unrecognisable)" if name == "size" else ""
        raise FeatcacheError(f"{name}={value} is too small; it must be at least {minimum}{extra}")
    return int(value)


def _counts(df: pd.DataFrame) -> dict:
    return {name: {sp: int(((df["subgroup"] == code) & (df["split"] == sp)).sum()) for sp in SPLITS}
            for code, name in enumerate(SUBGROUP_NAMES)}


def _allocate(total: int, weights, floor: int) -> list[int]:
    """Integers summing to ``total``, proportional to ``weights``, each at least ``floor``.

    Water-filling: groups whose share falls below the floor get the floor, the rest share
    what is left in proportion, and leftover units go by largest remainder (ties to the
    heavier group), so a heavier group never gets fewer than a lighter one.
    """
    w = np.asarray(weights, dtype=float)
    fixed = np.zeros(len(w), dtype=bool)
    while True:
        rest = total - floor * int(fixed.sum())
        share = np.where(fixed, float(floor), rest * w / w[~fixed].sum())
        newly = ~fixed & (share < floor)
        if not newly.any():
            break
        fixed |= newly
    counts = np.where(fixed, floor, np.floor(share)).astype(int)
    remainder = np.where(fixed, -1.0, share - np.floor(share))
    order = sorted(range(len(w)), key=lambda i: (-round(remainder[i], 9), -w[i], i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def _split_sizes(m: int, minimum: int) -> dict[str, int]:
    sizes = {sp: max(minimum, int(math.floor(f * m + 0.5))) for sp, f in SPLIT_FRACTIONS.items()}
    return {"train": m - sum(sizes.values()), **sizes}


def _identities(per_group: list[int], minimum: int, prefix: str) -> list[dict]:
    ids = []
    for code, m in enumerate(per_group):
        sizes = _split_sizes(m, minimum)
        splits = [sp for sp in SPLITS for _ in range(sizes[sp])]
        for sp in splits:
            gid = len(ids)
            ids.append({"gid": gid, "code": code, "split": sp, "name": f"{prefix}{gid:04d}",
                        "gender": GENDERS[code // len(RACES)], "race": RACES[code % len(RACES)]})
    return ids


def _plan_main(n_ids: int, k: int) -> list[dict]:
    per_group = _allocate(n_ids, FFPP_SUBGROUP_COUNTS, MIN_IDENTITIES_PER_SPLIT * len(SPLITS))
    ids = _identities(per_group, MIN_IDENTITIES_PER_SPLIT, "sf-id")
    pool: dict[tuple[int, str], list[int]] = {}
    for ident in ids:
        pool.setdefault((ident["code"], ident["split"]), []).append(ident["gid"])
    samples = []
    for ident in ids:
        n_real = (k + ident["gid"] % 2) // 2  # odd k: alternate which identities get the extra real
        for j in range(k):
            i = len(samples)
            fake = j >= n_real
            samples.append({
                "index": i, "ident": ident, "fake": fake,
                "frame": (j - n_real) % max(n_real, 1) if fake else j,
                "donors": [g for g in pool[(ident["code"], ident["split"])] if g != ident["gid"]],
                "sample_id": f"sf{i:05d}",
            })
    by_gid = {ident["gid"]: ident for ident in ids}
    for s in samples:
        s["by_gid"] = by_gid
    return samples


def _plan_stage1(n_ids: int, k: int) -> list[dict]:
    per_group = _allocate(n_ids, [1] * len(SUBGROUP_NAMES), MIN_STAGE1_IDENTITIES_PER_SPLIT * len(SPLITS))
    ids = _identities(per_group, MIN_STAGE1_IDENTITIES_PER_SPLIT, "sff-id")
    samples = []
    for ident in ids:
        for j in range(k):
            i = len(samples)
            samples.append({"index": i, "ident": ident, "fake": False, "frame": j, "sample_id": f"sff{i:05d}"})
    return samples


# ----------------------------------------------------------------------------------------------
# Writing


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _write_parallel(write, out: Path, samples: list[dict], workers: int, bar, **kwargs) -> list[dict]:
    """``write(out, samples, bar=..., **kwargs)`` over chunks of ``samples`` in ``workers`` processes
    (in this process when 1); the rows come back in the samples' order."""
    if workers <= 1 or len(samples) < 2:
        return write(out, samples, bar=bar, **kwargs)
    from concurrent.futures import ProcessPoolExecutor

    step = max(1, math.ceil(len(samples) / (4 * workers)))
    chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(write, out, chunk, bar=_NoBar(), **kwargs) for chunk in chunks]
        for future, chunk in zip(futures, chunks):
            rows += future.result()
            bar.update(len(chunk))
    return rows


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr, "RGB").save(tmp, format="PNG", optimize=False, compress_level=6)
    os.replace(tmp, path)


def _write_main(out: Path, samples: list[dict], *, seed: int, bias: float, size: int, bar) -> list[dict]:
    rows = []
    traits_cache: dict[int, dict] = {}

    def traits(gid: int, code: int) -> dict:
        if gid not in traits_cache:
            traits_cache[gid] = _identity_traits(_rng(seed, _S_IDENTITY, gid), code)
        return traits_cache[gid]

    for s in samples:
        ident = s["ident"]
        t = traits(ident["gid"], ident["code"])
        frame = _frame_params(_rng(seed, _S_FRAME, ident["gid"], s["frame"]), size)
        real = _render(t, t, frame, size)
        method = ""
        if s["fake"]:
            rng = _rng(seed, _S_FAKE, s["index"])
            donor_gid = s["donors"][int(rng.integers(len(s["donors"])))]
            donor = traits(donor_gid, s["by_gid"][donor_gid]["code"])
            method = METHODS[int(rng.integers(len(METHODS)))]
            img = _forge(real, t, donor, frame, size, artifact_strength(ident["code"], bias), method, rng)
        else:
            img = real
        label = "fake" if s["fake"] else "real"
        rel = f"images/{ident['split']}/{label}/{s['sample_id']}.png"
        _save_png(img, out / rel)
        rows.append({"sample_id": s["sample_id"], "path": rel, "label": str(int(s["fake"])),
                     "split": ident["split"], "dataset": DATASET, "gender": ident["gender"],
                     "race": ident["race"], "identity": ident["name"], "method": method})
        bar.update(1)
    return rows


def _write_stage1(out: Path, samples: list[dict], *, seed: int, size: int, bar) -> list[dict]:
    rows = []
    traits_cache: dict[int, dict] = {}
    for s in samples:
        ident = s["ident"]
        gid = ident["gid"]
        if gid not in traits_cache:
            traits_cache[gid] = _identity_traits(_rng(seed, _S_S1_IDENTITY, gid), ident["code"])
        t = traits_cache[gid]
        frame = _frame_params(_rng(seed, _S_S1_FRAME, gid, s["frame"]), size)
        rel = f"stage1/{ident['split']}/{s['sample_id']}.png"
        _save_png(_render(t, t, frame, size), out / rel)
        rows.append({"sample_id": s["sample_id"], "path": rel, "label": "0", "split": ident["split"],
                     "dataset": STAGE1_DATASET, "gender": ident["gender"], "race": ident["race"],
                     "identity": ident["name"], "method": ""})
        bar.update(1)
    return rows


# ----------------------------------------------------------------------------------------------
# Random draws


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


def _pick(rng: np.random.Generator, palette) -> np.ndarray:
    colours = np.array([c for c, _ in palette], dtype=float)
    weights = np.array([w for _, w in palette], dtype=float)
    return colours[rng.choice(len(colours), p=weights / weights.sum())]


def _identity_traits(rng: np.random.Generator, code: int) -> dict:
    gender, race = GENDERS[code // len(RACES)], RACES[code % len(RACES)]
    male = gender == "male"
    light, dark = (np.array(c, dtype=float) for c in _SKIN[race])
    skin = light + rng.uniform(0, 1) * (dark - light) + rng.normal(0, 4, 3)
    hair = np.clip(_pick(rng, _HAIR[race]) + rng.normal(0, 6, 3), 5, 250)
    iris = _pick(rng, _IRIS.get(race, _IRIS["default"]))
    lips = skin + (np.array([172.0, 62, 72]) - skin) * rng.uniform(0.25, 0.45)
    if not male and rng.uniform() < 0.35:  # lipstick
        lips = np.array([175.0, 40, 60]) + rng.normal(0, 12, 3)
    bg_hue = rng.uniform(60, 215, 3)
    return {
        "male": male,
        # outer traits: face shape, hair, clothes, background (the target's in a fake)
        "w": rng.uniform(0.205, 0.235) + (0.012 if male else 0.0),
        "h": rng.uniform(0.29, 0.32),
        "hair": hair,
        "hair_len": rng.uniform(-0.1, 0.35) if male else rng.uniform(0.9, 1.7),
        "hairline": rng.uniform(0.45, 0.62),
        "hair_width": rng.uniform(1.04, 1.14),
        "part": rng.uniform(-0.35, 0.35),
        "clothes": np.array(_CLOTHES[int(rng.integers(len(_CLOTHES)))], dtype=float) + rng.normal(0, 10, 3),
        "bg": bg_hue,
        "ear": rng.uniform(0.11, 0.16),
        # inner traits: what a face swap transfers from the donor
        "skin": np.clip(skin, 20, 250),
        "iris": iris,
        "lips": np.clip(lips, 10, 250),
        "eye_y": rng.uniform(-0.10, 0.0),
        "eye_dx": rng.uniform(0.36, 0.44),
        "eye_w": rng.uniform(0.15, 0.19),
        "eye_h": rng.uniform(0.42, 0.62),
        "brow_w": rng.uniform(0.040, 0.055) if male else rng.uniform(0.022, 0.034),
        "brow_tilt": rng.uniform(-0.03, 0.05),
        "brow_gap": rng.uniform(0.07, 0.11),
        "brow_colour": np.clip(hair * rng.uniform(0.6, 0.9), 5, 250),
        "nose_len": rng.uniform(0.26, 0.36),
        "nose_w": rng.uniform(0.14, 0.24),
        "mouth_y": rng.uniform(0.50, 0.60),
        "mouth_w": rng.uniform(0.28, 0.40),
        "lip_t": rng.uniform(0.035, 0.07) * (0.9 if male else 1.15),
        "smile": rng.uniform(-0.01, 0.04),
    }


def _frame_params(rng: np.random.Generator, size: int) -> dict:
    return {
        "angle": rng.uniform(-7, 7),
        "scale": rng.uniform(0.94, 1.06),
        "shift": rng.uniform(-0.04, 0.04, 2),
        "bg_jitter": rng.normal(0, 5, 3),
        "light_dir": rng.uniform(0, 2 * math.pi),
        "light_amp": rng.uniform(0.05, 0.28),
        "brightness": rng.uniform(0.86, 1.02),
        "noise": rng.uniform(1.5, 3.5),
        "smile": rng.normal(0, 0.012),
        "blink": rng.uniform(0.8, 1.05),
        "noise_seed": int(rng.integers(2**63)),
    }


# ----------------------------------------------------------------------------------------------
# Drawing


def _rgb(c) -> tuple[int, int, int]:
    c = np.clip(np.asarray(c, dtype=float), 0, 255)
    return int(round(c[0])), int(round(c[1])), int(round(c[2]))


def _draw_face(outer: dict, inner: dict, frame: dict, canvas: int) -> Image.Image:
    """Draw one face at ``canvas`` pixels (2x the image), frontal and centred."""
    C = canvas
    img = Image.new("RGB", (C, C), _rgb(outer["bg"] + frame["bg_jitter"]))
    d = ImageDraw.Draw(img)
    cx, cy = _FACE_CX * C, _FACE_CY * C
    w, h = outer["w"] * C, outer["h"] * C
    skin = inner["skin"]
    hair = _rgb(outer["hair"])
    hw = outer["hair_width"] * w

    # hair behind the head (long hair falls to the shoulders)
    d.ellipse((cx - hw, cy - 1.14 * h, cx + hw, cy + 0.6 * h), fill=hair)
    if outer["hair_len"] > 0.5:
        d.rounded_rectangle((cx - hw * 1.06, cy - 0.3 * h, cx + hw * 1.06, cy + outer["hair_len"] * h),
                            radius=0.35 * w, fill=hair)
    # clothes and neck
    d.ellipse((cx - 2.3 * w, cy + 1.28 * h, cx + 2.3 * w, cy + 3.4 * h), fill=_rgb(outer["clothes"]))
    d.rectangle((cx - 0.42 * w, cy + 0.5 * h, cx + 0.42 * w, cy + 1.45 * h), fill=_rgb(skin * 0.82))
    d.chord((cx - 0.42 * w, cy + 1.2 * h, cx + 0.42 * w, cy + 1.6 * h), 0, 180, fill=_rgb(skin * 0.82))
    # ears
    er = outer["ear"] * w
    for sx in (-1, 1):
        ex = cx + sx * 0.97 * w
        d.ellipse((ex - er, cy - 0.12 * h, ex + er, cy + 0.22 * h), fill=_rgb(skin * 0.9))
    # face: upper ellipse and a jaw (square for men, pointed chin for women)
    d.ellipse((cx - w, cy - h, cx + w, cy + 0.9 * h), fill=_rgb(skin))
    if outer["male"]:
        jaw = [(cx - w * 0.99, cy), (cx - w * 0.93, cy + 0.55 * h), (cx - w * 0.6, cy + 0.93 * h),
               (cx - w * 0.3, cy + h), (cx + w * 0.3, cy + h), (cx + w * 0.6, cy + 0.93 * h),
               (cx + w * 0.93, cy + 0.55 * h), (cx + w * 0.99, cy)]
    else:
        jaw = [(cx - w * 0.99, cy), (cx - w * 0.86, cy + 0.55 * h), (cx - w * 0.45, cy + 0.9 * h),
               (cx - w * 0.12, cy + h), (cx + w * 0.12, cy + h), (cx + w * 0.45, cy + 0.9 * h),
               (cx + w * 0.86, cy + 0.55 * h), (cx + w * 0.99, cy)]
    d.polygon(jaw, fill=_rgb(skin))
    # hair on top: a cap down to the hairline, parted; long hair frames the face
    top = cy - 1.14 * h
    hl = cy - outer["hairline"] * h
    d.chord((cx - hw * 0.97, top, cx + hw * 0.97, 2 * hl - top), 180, 360, fill=hair)
    px = cx + outer["part"] * w
    d.polygon([(px - 0.5 * w, hl + 0.02 * h), (px, top + 0.12 * h), (px + 0.1 * w, hl - 0.05 * h)], fill=hair)
    if outer["hair_len"] > 0.5:
        for sx in (-1, 1):
            d.polygon([(cx + sx * hw * 1.04, cy - 0.35 * h), (cx + sx * 0.8 * w, hl),
                       (cx + sx * 0.86 * w, cy + 0.05 * h), (cx + sx * 1.0 * w, cy + 0.6 * h),
                       (cx + sx * hw * 1.06, cy + 0.8 * h)], fill=hair)

    _draw_inner_face(d, outer, inner, frame, cx, cy, w, h, C)
    return img


def _draw_inner_face(d: ImageDraw.ImageDraw, outer: dict, inner: dict, frame: dict, cx: float, cy: float,
                     w: float, h: float, C: int) -> None:
    """Brows, eyes, nose and mouth (the donor's in a fake) on the face drawn by :func:`_draw_face`."""
    skin = inner["skin"]
    line = max(1, round(C / 96))
    ey = cy + inner["eye_y"] * h
    ew, eh = inner["eye_w"] * w, inner["eye_w"] * w * inner["eye_h"] * frame["blink"]
    for sx in (-1, 1):
        ex = cx + sx * inner["eye_dx"] * w
        by = ey - eh - inner["brow_gap"] * h
        t = inner["brow_tilt"] * h
        d.line([(ex - sx * ew * 1.15, by + t), (ex, by - 0.3 * t - 0.01 * h), (ex + sx * ew * 1.2, by + 0.4 * t)],
               fill=_rgb(inner["brow_colour"]), width=max(1, round(inner["brow_w"] * h)), joint="curve")
        d.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), fill=(236, 234, 228))
        ir = min(0.62 * ew, 1.0 * eh)
        d.ellipse((ex - ir, ey - ir, ex + ir, ey + ir), fill=_rgb(inner["iris"]))
        pr = 0.45 * ir
        d.ellipse((ex - pr, ey - pr, ex + pr, ey + pr), fill=(15, 12, 12))
        d.ellipse((ex + 0.25 * ir - pr * 0.5, ey - 0.35 * ir - pr * 0.5, ex + 0.25 * ir + pr * 0.5,
                   ey - 0.35 * ir + pr * 0.5), fill=(250, 250, 250))
        # eyelids: skin above the eye hides the top of the iris, with a dark lash line
        d.chord((ex - ew * 1.05, ey - eh * 2.2, ex + ew * 1.05, ey - eh * 0.35), 0, 180, fill=_rgb(skin))
        d.arc((ex - ew, ey - eh, ex + ew, ey + eh), 190, 350, fill=_rgb(skin * 0.35),
              width=line + (0 if outer["male"] else 1))
    ny = ey + inner["nose_len"] * h * 1.4
    nw = inner["nose_w"] * w
    shade = _rgb(skin * 0.88)
    d.polygon([(cx - 0.05 * w, ey + 0.1 * h), (cx - nw, ny), (cx + nw, ny), (cx + 0.05 * w, ey + 0.1 * h)], fill=shade)
    d.ellipse((cx - nw * 0.75, ny - 0.06 * h, cx + nw * 0.75, ny + 0.05 * h), fill=_rgb(skin * 1.04))
    for sx in (-1, 1):
        nx = cx + sx * nw * 0.55
        d.ellipse((nx - 0.05 * w, ny - 0.015 * h, nx + 0.05 * w, ny + 0.03 * h), fill=_rgb(skin * 0.55))
    my = cy + inner["mouth_y"] * h
    mw, lt = inner["mouth_w"] * w, inner["lip_t"] * h
    smile = (inner["smile"] + frame["smile"]) * h
    lips = _rgb(inner["lips"])
    d.chord((cx - mw, my - lt, cx + mw, my + lt * 0.6), 180, 360, fill=lips)
    d.chord((cx - mw * 0.85, my - lt * 1.2 - smile, cx + mw * 0.85, my + lt * 1.3), 0, 180, fill=lips)
    d.line([(cx - mw, my - smile), (cx - 0.4 * mw, my), (cx + 0.4 * mw, my), (cx + mw, my - smile)],
           fill=_rgb(inner["lips"] * 0.45), width=line, joint="curve")


def _affine(frame: dict, canvas: int, extra_shift=(0.0, 0.0), extra_scale: float = 1.0) -> tuple:
    """Coefficients mapping output to input pixels for the frame's pose about the face centre."""
    cx, cy = _FACE_CX * canvas, _FACE_CY * canvas
    a = math.radians(frame["angle"])
    s = frame["scale"] * extra_scale
    tx = frame["shift"][0] * canvas + extra_shift[0]
    ty = frame["shift"][1] * canvas + extra_shift[1]
    cos, sin = math.cos(a) / s, math.sin(a) / s
    # input = c + R(-a) (output - c - t) / s
    return (cos, sin, cx - cos * (cx + tx) - sin * (cy + ty),
            -sin, cos, cy + sin * (cx + tx) - cos * (cy + ty))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (x + 0.5) / size - 0.5, (y + 0.5) / size - 0.5


def _render(outer: dict, inner: dict, frame: dict, size: int, *, extra_shift=(0.0, 0.0),
            extra_scale: float = 1.0, noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """One image (uint8, size x size x 3): drawn, posed, lit, with sensor noise."""
    C = 2 * size
    img = _draw_face(outer, inner, frame, C)
    bg = _rgb(outer["bg"] + frame["bg_jitter"])
    img = img.transform((C, C), Image.Transform.AFFINE, _affine(frame, C, extra_shift, extra_scale),
                        resample=Image.Resampling.BILINEAR, fillcolor=bg)
    img = img.reduce(2)
    arr = np.asarray(img, dtype=np.float32)
    gx, gy = _grid(size)
    light = frame["brightness"] * (1 + frame["light_amp"] * (gx * math.cos(frame["light_dir"])
                                                             + gy * math.sin(frame["light_dir"])))
    arr = arr * light[..., None]
    rng = noise_rng if noise_rng is not None else np.random.Generator(np.random.PCG64(frame["noise_seed"]))
    arr = arr + rng.normal(0, frame["noise"], arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _inner_mask(outer: dict, frame: dict, size: int, shrink: float, sigma: float) -> np.ndarray:
    """The feathered inner-face mask of a target pose, float32 in [0, 1] (size x size)."""
    C = 2 * size
    m = Image.new("L", (C, C), 0)
    cx, cy = _FACE_CX * C, _FACE_CY * C
    w, h = outer["w"] * C, outer["h"] * C
    ax = max(_INNER_AX * w - 2 * shrink, 0.3 * w)
    ay = max(_INNER_AY * h - 2 * shrink, 0.3 * h)
    my = cy + _INNER_DY * h
    ImageDraw.Draw(m).ellipse((cx - ax, my - ay, cx + ax, my + ay), fill=255)
    m = m.transform((C, C), Image.Transform.AFFINE, _affine(frame, C), resample=Image.Resampling.BILINEAR)
    m = m.reduce(2)
    if sigma > 0.3:
        m = m.filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(m, dtype=np.float32) / 255.0


def _forge(real: np.ndarray, target: dict, donor: dict, frame: dict, size: int, s: float, method: str,
           rng: np.random.Generator) -> np.ndarray:
    """Paste the donor's inner face onto the target frame with artifacts of strength ``s``."""
    lowres = method == "swap-lowres"
    # misalignment of the warped donor face
    ang = rng.uniform(0, 2 * math.pi)
    shift = 0.03 * size * s * 2  # canvas pixels (2x)
    scale = 1 + 0.04 * s * (1 if rng.uniform() < 0.5 else -1)
    face = _render(target, donor, frame, size, extra_shift=(shift * math.cos(ang), shift * math.sin(ang)),
                   extra_scale=scale, noise_rng=rng)
    # generated at a lower resolution, up-sampled
    u = 1 + (2.0 if lowres else 1.0) * s
    if u >= 1.05:
        low = max(4, int(round(size / u)))
        up = Image.Resampling.NEAREST if lowres else Image.Resampling.BILINEAR
        face = np.asarray(Image.fromarray(face).resize((low, low), Image.Resampling.BOX).resize((size, size), up))
    face = face.astype(np.float32)
    # soft mask, sharper (a visible seam) for strong artifacts
    sigma = size * (0.008 + 0.07 * (1 - s))
    alpha = _inner_mask(target, frame, size, shrink=sigma, sigma=sigma)
    # colour correction towards the target, left incomplete, plus a colour cast
    realf = real.astype(np.float32)
    core = alpha > 0.5
    if core.any():
        diff = realf[core].mean(axis=0) - face[core].mean(axis=0)
        face = face + (1 - 0.7 * s) * diff
    face = face + 8.0 * s * rng.uniform(-1, 1, 3).astype(np.float32)
    a = alpha[..., None]
    fake = a * face + (1 - a) * realf
    # a careful forger restores the sensor noise that blending two noisy images removes
    # (variance 1 - 2a(1 - a)); an imperfect one leaves the noise inconsistent
    if s < 1:
        comp = (1 - s) * frame["noise"] * np.sqrt(2 * a * (1 - a))
        fake = fake + comp * rng.normal(0, 1, fake.shape).astype(np.float32)
    return np.clip(np.rint(fake), 0, 255).astype(np.uint8)
