"""The synthetic face-forgery dataset: deterministic, valid, FF++-imbalanced, real forgeries,
and a bias knob that measurably makes some subgroups' fakes harder to detect."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featcache.data.manifest import FFPP_SUBGROUP_COUNTS, SPLITS, SUBGROUP_NAMES, read_manifest
from featcache.data.synth_faces import (
    HARDNESS,
    METHODS,
    _allocate,
    artifact_strength,
    inner_face_ellipse,
    minimum_n,
    synth_faces,
)
from featcache.errors import FeatcacheError

SIZE = 32
N_SMALL = minimum_n(4)  # 288: the smallest dataset with 3 identities per subgroup and split
N_BIAS = 2 * N_SMALL


def _tree_hash(root: Path) -> tuple[str, dict[str, str]]:
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    total = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return total, files


def _load(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = synth_faces(out, n=N_SMALL, seed=0, bias=0.6, size=SIZE, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def by_bias(tmp_path_factory):
    base = tmp_path_factory.mktemp("bias")
    return {b: synth_faces(base / f"b{b}", n=N_BIAS, seed=1, bias=b, size=SIZE, progress=False)
            for b in (0.0, 1.0)}


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    synth_faces(again, n=N_SMALL, seed=0, bias=0.6, size=SIZE, progress=False)
    h1, files1 = _tree_hash(out)
    h2, files2 = _tree_hash(again)
    assert files1 == files2 and h1 == h2
    assert any(k.endswith(".png") for k in files1) and "manifest.csv" in files1 and "stage1_manifest.csv" in files1

    other = tmp_path / "other"
    synth_faces(other, n=N_SMALL, seed=1, bias=0.6, size=SIZE, progress=False)
    h3, files3 = _tree_hash(other)
    assert h3 != h1
    pngs = [k for k in files1 if k.endswith(".png")]
    assert sorted(pngs) == sorted(k for k in files3 if k.endswith(".png"))  # same layout ...
    assert sum(files1[k] != files3[k] for k in pngs) == len(pngs)  # ... other pictures


def test_two_workers_write_the_same_bytes_as_one(small, tmp_path):
    # issue 17, item 5: synth faces in parallel processes, same bytes per seed as one process
    out, _ = small
    parallel = tmp_path / "parallel"
    synth_faces(parallel, n=N_SMALL, seed=0, bias=0.6, size=SIZE, progress=False, workers=2)
    assert _tree_hash(parallel) == _tree_hash(out)


def test_manifests_valid_split_by_identity_and_balanced(small):
    out, summary = small
    man = read_manifest(summary["manifest"], require_label=True)
    df = man.df
    assert len(df) == N_SMALL == summary["n_images"]
    assert set(df["dataset"]) == {"synthfaces"}
    assert summary["n_fake"] == (df["label"] == 1).sum() == N_SMALL // 2
    assert summary["n_real"] == (df["label"] == 0).sum()
    assert set(df.loc[df["label"] == 1, "method"]) == set(METHODS)
    assert set(df.loc[df["label"] == 0, "method"]) == {""}
    for _, r in df.iterrows():
        assert r["path"] == f"images/{r['split']}/{'fake' if r['label'] else 'real'}/{r['sample_id']}.png"
    # every subgroup in every split, with reals and fakes in about equal numbers
    for code in range(8):
        for split in SPLITS:
            cell = df[(df["subgroup"] == code) & (df["split"] == split)]
            assert cell["identity"].nunique() >= 3, (code, split)
            assert 0.4 <= cell["label"].mean() <= 0.6, (code, split)
            assert summary["counts"][SUBGROUP_NAMES[code]][split] == len(cell)
    # no identity in two splits, every identity of one subgroup
    assert (df.groupby("identity")["split"].nunique() == 1).all()
    assert (df.groupby("identity")["subgroup"].nunique() == 1).all()
    # splits about 70/15/15 by identity
    ids = df.drop_duplicates("identity")["split"].value_counts(normalize=True)
    assert ids["train"] > 0.3 and ids["val"] >= 0.15 and ids["test"] >= 0.15

    s1 = read_manifest(summary["stage1_manifest"], require_label=True).df
    assert len(s1) == N_SMALL // 2 == summary["n_stage1"]
    assert set(s1["dataset"]) == {"synthfairface"} and set(s1["label"]) == {0}
    assert all(p.startswith("stage1/") for p in s1["path"])
    assert (s1.groupby("identity")["split"].nunique() == 1).all()
    assert set(s1["identity"]).isdisjoint(df["identity"])  # new people
    per_group = s1["subgroup"].value_counts()
    assert set(per_group.index) == set(range(8)) and per_group.max() - per_group.min() <= 4  # balanced
    for code in range(8):
        assert set(s1.loc[s1["subgroup"] == code, "split"]) == set(SPLITS)


def test_subgroup_counts_follow_ffpp(by_bias):
    df = read_manifest(by_bias[0.0]["manifest"]).df
    counts = df["subgroup"].value_counts().reindex(range(8)).to_numpy()
    assert counts.sum() == N_BIAS
    assert counts.argmax() == 5 and counts[5] > counts[1] > counts[4]  # female-white, male-white, female-asian
    assert counts[6] == counts.min()  # female-black the smallest (with the floor groups)
    ffpp = np.array(FFPP_SUBGROUP_COUNTS)
    for a in range(8):
        for b in range(8):
            if ffpp[a] > ffpp[b]:
                assert counts[a] >= counts[b], (a, b, counts)
    # each group has the floor of 9 identities x 4 images, the big ones are proportional
    assert counts.min() == 9 * 4
    assert counts[5] / counts[1] == pytest.approx(ffpp[5] / ffpp[1], rel=0.15)
    # with enough identities the allocation reproduces the published counts exactly
    assert _allocate(sum(FFPP_SUBGROUP_COUNTS), FFPP_SUBGROUP_COUNTS, 9) == list(FFPP_SUBGROUP_COUNTS)
    assert _allocate(1000, FFPP_SUBGROUP_COUNTS, 9)[6] == 15  # 1000 * 1111 / 76139 = 14.6


def test_fakes_change_the_face_region_of_their_real_source(small):
    out, summary = small
    df = read_manifest(summary["manifest"]).df
    cx, cy, ax, ay = inner_face_ellipse(SIZE)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    inside, outside = r < 0.7, r > 1.6
    ins, outs, unchanged = [], [], []
    for _, group in df.groupby("identity"):
        reals = [_load(out, p) for p in group.loc[group["label"] == 0, "path"]]
        for p in group.loc[group["label"] == 1, "path"]:
            fake = _load(out, p)
            # the fake's source frame: the real image of the same identity closest overall
            twin = min(reals, key=lambda x: np.abs(x - fake).sum())
            diff = np.abs(fake - twin).mean(axis=2)
            ins.append(diff[inside].mean())
            outs.append(diff[outside].mean())
            unchanged.append((diff[outside] == 0).mean())
            # the source frame is unambiguous: other reals of the identity differ everywhere
            others = [np.abs(x - fake).mean(axis=2)[outside].mean() for x in reals if x is not twin]
            assert all(o > 1.0 for o in others)
    ins, outs = np.array(ins), np.array(outs)
    assert len(ins) == N_SMALL // 2
    assert np.median(outs) < 0.2 and np.median(unchanged) > 0.95  # outside the face: the source frame
    assert np.median(ins) > 5.0  # inside: another person's features
    assert (ins > 5 * outs + 1).mean() > 0.95


def _artifact_features(img: np.ndarray) -> list[float]:
    """Noise level, high-frequency energy and blockiness inside the pasted region, each
    relative to the top band of the image (background and hair, never pasted)."""
    gray = img.mean(axis=2)
    n = gray.shape[0]
    cx, cy, ax, ay = inner_face_ellipse(n)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 0.5
    top = yy < 0.12 * n
    lap = np.abs(ndimage.laplace(gray))
    noise = np.log(np.median(lap[inside]) + 0.5) - np.log(np.median(lap[top]) + 0.5)
    energy = np.log(lap[inside].mean() + 0.5) - np.log(lap[top].mean() + 0.5)
    flat = np.zeros_like(gray)  # neighbours with identical pixels: nearest-neighbour up-sampling
    flat[:, 1:] += np.abs(np.diff(img, axis=1)).max(axis=2) == 0
    flat[1:, :] += np.abs(np.diff(img, axis=0)).max(axis=2) == 0
    return [noise, energy, flat[inside].mean() - flat[top].mean()]


def _detector_auc_by_race(summary) -> dict[str, float]:
    """A plain detector: logistic regression on the artifact features, scored out of fold
    (5 folds grouped by identity), its AUC within each race group."""
    out = Path(summary["out"])
    df = read_manifest(summary["manifest"]).df
    x = np.array([_artifact_features(_load(out, p)) for p in df["path"]])
    y = df["label"].to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression())
    score = cross_val_predict(model, x, y, groups=df["identity"], cv=GroupKFold(5), method="decision_function")
    return {race: roc_auc_score(y[(df["race"] == race).to_numpy()], score[(df["race"] == race).to_numpy()])
            for race in ("white", "black", "asian")}


def test_bias_makes_minority_fakes_harder_to_detect(by_bias):
    # the documented mapping
    assert artifact_strength(1, 0.0) == artifact_strength(6, 0.0) == 1.0
    assert artifact_strength(1, 1.0) == 1.0 and artifact_strength(6, 1.0) == 0.0
    assert min(HARDNESS[c] for c in (0, 2, 4, 6)) > max(HARDNESS[c] for c in (1, 5))  # black, asian hardest
    # measured independently: a plain artifact detector, its AUC per race group
    auc0, auc1 = _detector_auc_by_race(by_bias[0.0]), _detector_auc_by_race(by_bias[1.0])
    assert min(auc0.values()) > 0.95  # bias 0: the artifacts are alike for all groups
    assert max(auc0.values()) - min(auc0.values()) < 0.05
    assert auc1["white"] > 0.95  # bias 1: white faces keep their artifacts ...
    assert auc1["black"] < 0.8 and auc1["asian"] < 0.8  # ... black and asian fakes are nearly clean
    assert (auc1["white"] - auc1["black"]) > (auc0["white"] - auc0["black"]) + 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 100}, r"n=100 is too small.*n >= 288"),
    ({"n": 288, "images_per_identity": 8}, r"x 8 images per identity = 576 images; pass n >= 576"),
    ({"bias": 1.5}, r"bias=1\.5 is outside \[0, 1\]"),
    ({"bias": float("nan")}, r"outside \[0, 1\]"),
    ({"size": 16}, r"size=16 is too small; it must be at least 32"),
    ({"images_per_identity": 0}, r"images_per_identity=0 is too small"),
    ({"n_stage1": 10}, r"n_stage1=10 is too small.*n_stage1 >= 96"),
    ({"n": "800"}, r"n must be an integer"),
    ({"seed": -1}, r"seed=-1 is too small"),
])
def test_bad_arguments_raise_a_helpful_error(tmp_path, kwargs, message):
    with pytest.raises(FeatcacheError, match=message):
        synth_faces(tmp_path / "x", **{"progress": False, **kwargs})
    assert not (tmp_path / "x").exists()  # nothing written
