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
    for name in ("patience", "batch_size", "lr", "weight_decay", "image_size", "amp_dtype"):
        value = mnv4.DEFAULTS[name]
        assert opts[name].default() == value, name  # read from DEFAULTS when the command runs
        assert opts[name].show_default.split(",")[0] == str(value), name  # what --help shows
    assert opts["epochs"].help.startswith(f"[{mnv4.DEFAULTS['epochs']},")


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
        ours = mnv4.make_transform(size, train=False, model=name)(img)
        assert torch.equal(ours, ref(img))
        assert torch.equal(mnv4.make_transform(size, train=False, model=net)(img), ref(img))
        # the training pipeline's geometry and normalisation are timm's: with the augmentations
        # at their identity the output matches the evaluation transform
        cfg_train = mnv4.make_transform(size, train=True, model=name)
        kept = [s for s in cfg_train.transforms if type(s).__name__ in ("ToImage", "Resize", "CenterCrop",
                                                                       "ToDtype", "Normalize")]
        from torchvision.transforms import v2

        assert torch.allclose(v2.Compose(kept)(img), ref(img), atol=0.05)
    assert mnv4.data_config("mobilenetv4_conv_small", 32)["crop_pct"] == 0.875
    assert mnv4.data_config("mobilenetv4_hybrid_medium", 256)["crop_pct"] == 0.95
