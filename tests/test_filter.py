"""The MobileNetV4 filter's defaults, preprocessing and augmentations (issue 18 items 1-2, issue 13
item 7), calibration on a held-out part of train (issue 18 item 8), the cascade's manifest check
(issue 19 item 3) and the remarks on suspicious results (issue 19 item 14)."""

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.e2e import mnv4


def _pil(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


# -- defaults and preprocessing ----------------------------------------------------------------
def test_training_defaults_are_the_designs():
    assert mnv4.DEFAULTS["epochs"] == 50
    assert mnv4.DEFAULTS["patience"] == 15


def test_cli_train_e2e_defaults_read_the_one_place():
    from featcache.cli import cli

    opts = {p.name: p for p in cli.commands["train-e2e"].commands["mnv4"].params}
    for name in ("patience", "batch_size", "weight_decay", "image_size", "amp_dtype"):
        value = mnv4.DEFAULTS[name]
        assert opts[name].default() == value, name  # read from DEFAULTS when the command runs
        assert opts[name].show_default.split(",")[0] == str(value), name  # what --help shows
    assert opts["epochs"].help.startswith(f"[{mnv4.DEFAULTS['epochs']},")
    # --lr has no fixed default (with --resume it restarts from the last lr): its help shows DEFAULTS'
    assert float(opts["lr"].help[1:].split("]")[0]) == mnv4.DEFAULTS["lr"]
    # issue 26.4: fp32 as the design trains; --mixed-precision opts in (it acts on CUDA only)
    assert opts["mixed_precision"].default is False and opts["mixed_precision"].opts == ["--mixed-precision"]
    assert opts["geometry"].default() == mnv4.DEFAULTS["geometry"] == "design"
    import inspect

    from featcache.e2e.train import train_e2e

    params = inspect.signature(train_e2e).parameters
    assert params["mixed_precision"].default is False and params["geometry"].default == "design"


def test_training_augmentations_have_the_designs_parameters():
    from torchvision.transforms import v2

    t = mnv4.make_transform(32, train=True, model="mobilenetv4_conv_small")
    steps = {type(s): s for s in t.transforms}
    flip = steps[v2.RandomHorizontalFlip]
    assert flip.p == 0.5
    cj = steps[v2.ColorJitter]
    assert cj.brightness == pytest.approx((0.8, 1.2)) and cj.contrast == pytest.approx((0.8, 1.2))
    assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
    aff = steps[v2.RandomAffine]
    assert list(aff.degrees) == [-10.0, 10.0]
    assert tuple(aff.translate) == (0.1, 0.1) and tuple(aff.scale) == (0.9, 1.1)
    blur = steps[v2.GaussianBlur]  # applied to every image: not wrapped in RandomApply
    assert list(blur.kernel_size) == [3, 3] and list(blur.sigma) == [0.1, 2.0]
    assert v2.RandomApply not in steps
    norm = steps[v2.Normalize]
    assert tuple(norm.mean) == pytest.approx(mnv4.IMAGENET_MEAN) and tuple(norm.std) == pytest.approx(mnv4.IMAGENET_STD)
    # the same pipeline on a PIL image and on a uint8 tensor, always image_size square
    torch.manual_seed(0)
    assert t(_pil()).shape == (3, 32, 32) and t(_pil()).dtype == torch.float32
    x = torch.from_numpy(np.array(_pil())).permute(2, 0, 1).contiguous()
    assert t(x).shape == (3, 32, 32)


def test_eval_transform_is_timms_own():
    import timm
    from timm.data import create_transform, resolve_model_data_config

    for name, size in (("mobilenetv4_conv_small", 32), ("mobilenetv4_hybrid_medium", 64)):
        net = timm.create_model(name, pretrained=False, num_classes=1)
        cfg = {**resolve_model_data_config(net), "input_size": (3, size, size)}
        ref = create_transform(**cfg, is_training=False)
        img = _pil(1)
        timm_cfg = mnv4.data_config(name, size, geometry="timm")  # the option: timm's own geometry
        ours = mnv4.make_transform(size, train=False, config=timm_cfg)(img)
        assert torch.equal(ours, ref(img))
        assert torch.equal(mnv4.make_transform(size, train=False, config=mnv4.data_config(net, size, geometry="timm"))(img),
                           ref(img))
        # the training pipeline's geometry and normalisation are timm's: with the augmentations
        # at their identity the output matches the evaluation transform
        cfg_train = mnv4.make_transform(size, train=True, config=timm_cfg)
        kept = [s for s in cfg_train.transforms if type(s).__name__ in ("ToImage", "Resize", "CenterCrop",
                                                                       "ToDtype", "Normalize")]
        from torchvision.transforms import v2

        assert torch.allclose(v2.Compose(kept)(img), ref(img), atol=0.05)
    assert mnv4.data_config("mobilenetv4_conv_small", 32, geometry="timm")["crop_pct"] == 0.875
    assert mnv4.data_config("mobilenetv4_hybrid_medium", 256, geometry="timm")["crop_pct"] == 0.95
    assert mnv4.data_config("mobilenetv4_hybrid_medium", 256)["crop_pct"] == 1.0  # the design: no crop


def test_filter_input_is_the_256px_face_as_it_is_in_fp32(tmp_path):
    """Issue 26.4: by default the filter sees the 256-px face as it is (no resize to 269 and centre
    crop), as a float32 (n, 3, 256, 256) tensor normalised with the model's mean and std."""
    face = np.random.default_rng(3).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    Image.fromarray(face).save(tmp_path / "face.png")
    paths = [str(tmp_path / "face.png")]
    cfg = mnv4.data_config(mnv4.DEFAULT_MODEL, mnv4.DEFAULTS["image_size"])  # the defaults: design geometry, 256
    _, pixels, _ = next(iter(mnv4.pixel_loader(paths, 256, cfg, batch_size=1)))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 256, 256)
    assert torch.equal(pixels[0], torch.from_numpy(face).permute(2, 0, 1))  # every pixel as it is
    x = mnv4.prepare_batch(pixels, torch.device("cpu"), cfg)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 256, 256)
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    torch.testing.assert_close(x[0], (torch.from_numpy(face).permute(2, 0, 1) / 255.0 - mean) / std)
    # the timm option resizes the face to floor(256 / 0.95) = 269 and crops 256 back out: other pixels
    timm_cfg = mnv4.data_config(mnv4.DEFAULT_MODEL, 256, geometry="timm")
    _, cropped, _ = next(iter(mnv4.pixel_loader(paths, 256, timm_cfg, batch_size=1)))
    assert cropped.shape == (1, 3, 256, 256) and not torch.equal(cropped, pixels)
    assert int(256 / timm_cfg["crop_pct"]) == 269
    with pytest.raises(Exception, match="geometry must be design or timm"):
        mnv4.data_config(mnv4.DEFAULT_MODEL, 256, geometry="crop")


# -- the device-side pipeline (issue 17 item 3): uint8 from the workers, per-image augmentation ---------
def _batch(n=6, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g), mnv4.sample_augmentations(n, h, w, g)


def test_per_image_colour_and_blur_ops_are_torchvisions_with_each_images_own_factor():
    from torchvision.transforms.v2 import functional as F

    x, p = _batch()
    for name, ours, ref in (("brightness", mnv4.adjust_brightness, F.adjust_brightness),
                            ("contrast", mnv4.adjust_contrast, F.adjust_contrast),
                            ("saturation", mnv4.adjust_saturation, F.adjust_saturation),
                            ("hue", mnv4.adjust_hue, F.adjust_hue)):
        want = torch.stack([ref(x[i], float(p[name][i])) for i in range(len(x))])
        assert torch.allclose(ours(x, p[name]), want, atol=1e-5), name
    want = torch.stack([F.gaussian_blur(x[i], [3, 3], [float(p["sigma"][i])] * 2) for i in range(len(x))])
    assert torch.allclose(mnv4.gaussian_blur(x, p["sigma"]), want, atol=1e-5)
    # identities: no flip, zero jitter (factors 1, hue 0) in any order, identity affine
    n = len(x)
    assert torch.equal(mnv4.flip(x, torch.ones(n, dtype=torch.bool)), torch.flip(x, dims=[-1]))
    assert torch.equal(mnv4.flip(x, torch.zeros(n, dtype=torch.bool)), x)
    ident = {**p, "brightness": torch.ones(n), "contrast": torch.ones(n), "saturation": torch.ones(n),
             "hue": torch.zeros(n)}
    assert torch.allclose(mnv4.color_jitter(x, ident), x, atol=1e-6)
    assert torch.allclose(mnv4.color_jitter(x, ident, sync_free=True), x, atol=1e-6)
    z = torch.zeros(n)
    assert torch.equal(mnv4.affine(x, z, z, z, torch.ones(n)), x)


def test_colour_jitter_follows_each_images_order():
    x, p = _batch()
    ops = [(k, f) for k, f in mnv4._JITTER]
    for sync_free in (False, True):  # the CPU's path (by subset) and CUDA's (whole batch, selected)
        got = mnv4.color_jitter(x, p, sync_free=sync_free)
        for i in range(len(x)):  # brute force: image i alone, its four ops in its own order
            y = x[i:i + 1]
            for o in p["order"][i].tolist():
                name, op = ops[o]
                y = op(y, p[name][i:i + 1])
            assert torch.allclose(got[i:i + 1], y, atol=1e-6), (sync_free, i)


def test_per_image_affine_is_torchvisions_random_affine_geometry():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x, p = _batch(seed=3)
    for mode, interp in (("nearest", InterpolationMode.NEAREST), ("bilinear", InterpolationMode.BILINEAR)):
        got = mnv4.affine(x, p["angle"], p["tx"], p["ty"], p["scale"], mode=mode)
        want = torch.stack([F.affine(x[i], angle=float(p["angle"][i]), translate=[int(p["tx"][i]), int(p["ty"][i])],
                                     scale=float(p["scale"][i]), shear=[0.0, 0.0], interpolation=interp)
                            for i in range(len(x))])
        assert torch.allclose(got, want, atol=1e-5), mode


def test_augmentation_parameters_are_drawn_per_image_in_the_designs_ranges():
    a = mnv4.AUGMENTATIONS
    n, h, w = 4000, 64, 48
    p = mnv4.sample_augmentations(n, h, w, torch.Generator().manual_seed(0))
    assert abs(p["flip"].float().mean().item() - a["flip_p"]) < 0.03
    for k in ("brightness", "contrast", "saturation"):
        assert p[k].min() >= 1 - a[k] and p[k].max() <= 1 + a[k] and p[k].std() > 0.1
    assert p["hue"].abs().max() <= a["hue"] and p["angle"].abs().max() <= a["degrees"]
    assert p["tx"].abs().max() <= round(a["translate"][0] * w) and p["ty"].abs().max() <= round(a["translate"][1] * h)
    assert torch.equal(p["tx"], p["tx"].round()) and p["tx"].unique().numel() == 2 * round(0.1 * w) + 1
    assert p["scale"].min() >= a["scale"][0] and p["scale"].max() <= a["scale"][1]
    assert p["sigma"].min() >= a["blur_sigma"][0] and p["sigma"].max() <= a["blur_sigma"][1]
    assert sorted(p["order"][0].tolist()) == [0, 1, 2, 3] and p["order"].unique(dim=0).shape[0] == 24
    # same image twice in a batch: different augmentations; the same seed: the same batch
    img = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    cfg = mnv4.data_config("mobilenetv4_conv_small", 32)
    two = mnv4.prepare_batch(img.repeat(2, 1, 1, 1), torch.device("cpu"), cfg, generator=torch.Generator().manual_seed(5))
    again = mnv4.prepare_batch(img.repeat(2, 1, 1, 1), torch.device("cpu"), cfg, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(two[0], two[1]) and torch.equal(two, again)


def test_uint8_path_without_augmentation_is_timms_eval_transform(tmp_path):
    from timm.data import create_transform

    paths = []
    for i, size in enumerate(((48, 40), (31, 57))):
        paths.append(str(tmp_path / f"{i}.png"))
        _pil(i, size).save(paths[-1])
    (tmp_path / "empty.png").write_bytes(b"")
    paths.append(str(tmp_path / "empty.png"))
    cfg = mnv4.data_config("mobilenetv4_conv_small", 32)
    rows, pixels, errs = next(iter(mnv4.pixel_loader(paths, 32, cfg, batch_size=3)))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 32, 32) and list(rows) == [0, 1, 2]
    assert errs[:2] == ["", ""] and errs[2] and not pixels[2].any()  # the empty file: an error, a zero image
    x = mnv4.prepare_batch(pixels, torch.device("cpu"), cfg)
    cl = mnv4.prepare_batch(pixels, torch.device("cpu"), cfg, channels_last=True)  # CUDA's layout, same values
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    ref = create_transform(**cfg, is_training=False)
    for i in range(2):
        with Image.open(paths[i]) as img:
            assert torch.allclose(x[i], ref(img.convert("RGB")), atol=1e-5)


# -- a filter run without training: random MobileNetV4 weights, labels made from its scores ----------
def _write_images(root, n):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, size=3)
        pix = np.clip(base + rng.normal(0, 50, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pix).save(root / "img" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def filter_run(tmp_path_factory):
    """A run directory of mobilenetv4_conv_small at 32 px with a random (non-zero) classifier, 60
    train images of 20 identities (3 each) and no val split; ``manifest.csv``'s labels are drawn
    from sigmoid of the filter's own standardised score (informative, not separable),
    ``anti.csv``'s are the opposite of the score's sign (a temperature search runs to its bound)."""
    import json

    import pandas as pd
    from scipy.special import expit

    from featcache.runtime import save_module

    root = tmp_path_factory.mktemp("filter")
    run = root / "run"
    run.mkdir()
    net = mnv4.create_model("mobilenetv4_conv_small", "none", seed=0)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in net.get_classifier().parameters():
            p.normal_(0, 0.05)
    save_module(net, run / "best.safetensors")
    (run / "model.json").write_text(json.dumps({"task": "mnv4", "spec": {
        "model": "mobilenetv4_conv_small", "pretrained": "none", "image_size": 32, "num_classes": 1}}))
    n = 60
    _write_images(root, n)
    df = pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(n)], "path": [f"img/{i:03d}.png" for i in range(n)],
                       "label": [i % 2 for i in range(n)], "split": "train",
                       "identity": [f"p{i // 3:02d}" for i in range(n)]})
    df.to_csv(root / "unlabelled.csv", index=False)
    rows, paths = mnv4.load_split(root / "unlabelled.csv", "train")
    score = mnv4.FilterRun(run, "cpu").predict_rows(rows, paths, "all")["score"].to_numpy()
    z = (score - np.median(score)) / score.std()
    rng = np.random.default_rng(0)
    df.assign(label=(rng.random(n) < expit(2 * z)).astype(int)).to_csv(root / "manifest.csv", index=False)
    df.assign(label=(z < 0).astype(int)).to_csv(root / "anti.csv", index=False)
    return run


def test_val_split_holds_out_whole_identities_seeded(filter_run):
    from featcache.e2e.calibrate import held_out_rows
    from featcache.errors import FeatcacheError

    manifest = filter_run.parent / "manifest.csv"
    rows, paths, info = held_out_rows(manifest, 0.2, seed=0)
    train, _ = mnv4.load_split(manifest, "train")
    held = set(rows["identity"])
    rest = set(train.loc[~train["sample_id"].isin(rows["sample_id"]), "identity"])
    assert len(held) == 4 and held.isdisjoint(rest) and len(held | rest) == 20  # 0.2 of 20 identities
    assert len(rows) == 12 and info["rows"] == 12 and info["identities"] == 4 and info["seed"] == 0
    assert [str(filter_run.parent / p) for p in rows["path"]] == paths
    again, _, _ = held_out_rows(manifest, 0.2, seed=0)
    other, _, _ = held_out_rows(manifest, 0.2, seed=1)
    assert list(again["sample_id"]) == list(rows["sample_id"])
    assert set(other["identity"]) != held
    with pytest.raises(FeatcacheError, match="--val-split"):
        held_out_rows(manifest, 1.5)


def test_calibrate_val_split_fits_the_nll_optimum_on_the_held_out_rows(filter_run):
    import json

    import pandas as pd
    from scipy.optimize import minimize_scalar
    from scipy.special import expit

    from featcache.e2e import calibrate_run
    from featcache.e2e.calibrate import held_out_rows

    manifest = filter_run.parent / "manifest.csv"
    r = calibrate_run(filter_run, manifest, val_split=0.4, seed=3, device="cpu", progress=False)
    held, _, _ = held_out_rows(manifest, 0.4, seed=3)
    preds = pd.read_csv(filter_run / "calibrated_predictions.csv")
    assert list(preds["sample_id"]) == list(held["sample_id"])  # exactly the held-out rows
    record = json.loads((filter_run / "calibration_temp.json").read_text())
    assert record["split"] == r["split"] == "train held-out 0.4"
    assert record["held_out"]["seed"] == 3 and record["held_out"]["identities"] == 8
    assert any(m.startswith("note: the manifest has no val split") for m in r["messages"])
    score, y = preds["score"].to_numpy(), preds["label"].to_numpy()

    def nll(t):
        p = np.clip(expit(score / t), 1e-15, 1 - 1e-15)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    ref = minimize_scalar(nll, bounds=(0.1, 10), method="bounded", options={"xatol": 1e-8}).x
    assert 0.2 < r["temperature"] < 9  # an interior optimum: no remark
    assert r["temperature"] == pytest.approx(ref, rel=1e-3)
    assert not [m for m in r["messages"] if m.startswith("remark:")]


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``featcache ARGS`` in this process (the CLI's own entry point): exit code, stdout, stderr."""
    from featcache.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_temperature_at_its_bound_gets_a_remark_that_the_cli_prints(filter_run, capsys):
    from featcache.e2e.calibrate import temperature_remark

    assert temperature_remark(9.95, "val").startswith("remark: the fitted temperature T = 9.950 is at the upper")
    assert temperature_remark(0.1005, "val").startswith("remark: the fitted temperature T = 0.101 is at the lower")
    assert temperature_remark(9.8, "val") is None and temperature_remark(1.0, "val") is None
    # labels opposite to the score's sign: the NLL wants T as large as allowed
    code, out, err = _cli(capsys, "calibrate", filter_run, "--manifest", filter_run.parent / "anti.csv",
                          "--val-split", "0.2", "--device", "cpu")
    assert code == 0, err
    assert "T = 10.0000 (fitted on train held-out 0.2" in out
    assert "remark: the fitted temperature T = 10.000 is at the upper bound 10" in out
    assert "note: the manifest has no val split; calibrated on 12 train rows of 4 identities" in out
    # without --val-split, a manifest without val is one error line naming the option
    code, out, err = _cli(capsys, "calibrate", filter_run, "--manifest", filter_run.parent / "anti.csv")
    assert code == 2 and err.count("\n") == 1 and "--val-split 0.2" in err


# -- the cascade: the manifest checked against the cache, remarks on the threshold ----------------------
@pytest.fixture(scope="module")
def cascade_cache(filter_run):
    """A tiny-CLIP cache of ``cascade.csv``: the 60 images, identities p00-p09 train, p10-p14 val,
    p15-p19 test."""
    import pandas as pd

    from featcache.extract import extract

    root = filter_run.parent
    df = pd.read_csv(root / "manifest.csv")
    k = df["identity"].str[1:].astype(int)
    df["split"] = np.where(k < 10, "train", np.where(k < 15, "val", "test"))
    df["label"] = np.arange(len(df)) % 2
    df.to_csv(root / "cascade.csv", index=False)
    extract("clip", root / "cascade.csv", root / "cache", model="tiny", part_rows=64, num_workers=0, progress=False)
    return root / "cache"


def test_cascade_manifest_must_be_the_caches_or_match_its_rows(cascade_cache, capsys):
    import pandas as pd

    from featcache.cache import open_cache
    from featcache.e2e.cascade import match_manifest, match_message
    from featcache.errors import FeatcacheError

    root = cascade_cache.parent
    cache = open_cache(cascade_cache)
    same = match_manifest(cache, root / "cascade.csv")
    assert same["by"] == "fingerprint" and same["rows"] == {"val": 15, "test": 15}
    assert match_message(same).startswith("manifest: the cache's own")
    df = pd.read_csv(root / "cascade.csv")
    # the val and test rows alone: another file, every row found by sample_id and path
    df[df["split"] != "train"].iloc[::-1].to_csv(root / "subset.csv", index=False)
    sub = match_manifest(cache, root / "subset.csv")
    assert sub["by"] == "row identity" and sub["rows"] == {"val": 15, "test": 15}
    assert "every row matched a cache row by sample_id and path: val 15, test 15" in match_message(sub)
    # the case: the same sample_ids naming other images
    other = df.assign(path=np.roll(df["path"].to_numpy(), 1))
    other.to_csv(root / "other.csv", index=False)
    with pytest.raises(FeatcacheError, match=r"30 of its 30 val/test rows do not match a cache row by sample_id and "
                                             r"path \(e.g. s\d+: path 'img/\d+.png' here, 'img/\d+.png' in the cache"):
        match_manifest(cache, root / "other.csv")
    # the same images in other splits, or another label: refused too, naming the field
    df.assign(split=np.where(df["split"] == "val", "test", df["split"])).to_csv(root / "resplit.csv", index=False)
    with pytest.raises(FeatcacheError, match="15 of its 30 val/test rows .* split 'test' here, 'val' in the cache"):
        match_manifest(cache, root / "resplit.csv")
    # the command refuses the other manifest with one line, before any model is loaded
    code, out, err = _cli(capsys, "cascade", "--filter", root / "nofilter", "--detector", root / "nodetector",
                          "--cache", cascade_cache, "--manifest", root / "other.csv", "--out", root / "cascade_out")
    assert code == 2 and err.startswith("error: --manifest") and err.count("\n") == 1
    assert not (root / "cascade_out").exists()


def test_a_recommended_threshold_that_stops_nothing_gets_a_remark():
    from featcache.e2e.cascade import threshold_remarks
    from featcache.metrics.cascade import cascade_rates, default_grid, recommend_threshold

    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.2, 0.3, 0.1, 0.005, 0.9, 0.8, 0.4, 0.7])  # the most confident "real" is a fake
    rows = [cascade_rates(y, p, t) for t in default_grid()]
    rec = recommend_threshold(rows, max_leakage=0.05)
    assert rec["filtration"] == 0  # every threshold that stops anything stops that fake first
    (remark,) = threshold_remarks(rec, {**rec, "compute_saved": -0.1}, 0.05)
    assert remark.startswith(f"remark: the recommended threshold t = {rec['threshold']:g} stops no sample on val "
                             "(filtration 0)")
    assert "compute saved -0.100" in remark
    good = recommend_threshold(rows, max_leakage=0.5)  # a budget of two fakes of four lets reals through
    assert good["filtration"] > 0 and threshold_remarks(good, good, 0.5) == []
    (on_test,) = threshold_remarks(good, {**good, "filtration": 0.0}, 0.5)
    assert "no sample on test (filtration 0)" in on_test
    (none,) = threshold_remarks(None, None, 0.0)
    assert none.startswith("remark: no threshold keeps val leakage within --max-leakage 0")
