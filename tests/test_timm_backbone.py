"""The timm backbone: pooled penultimate features of any timm model, or of a train-e2e filter run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

ARCH = "mobilenetv4_conv_small"
SMALL = "test_efficientnet"  # timm's own 0.1 M-parameter test model: fast on the CPU


def _pil(manifest, rows):
    import pandas as pd

    df = pd.read_csv(manifest)
    return [Image.open(manifest.parent / df["path"][r]).convert("RGB") for r in rows]


def _direct(net, x):
    with torch.no_grad():
        return net.forward_head(net.forward_features(x), pre_logits=True).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An ImageNet-style timm checkpoint (1000-class head) wrapped as DataParallel would save it."""
    import timm

    torch.manual_seed(11)
    net = timm.create_model(SMALL, pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "weights.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net, path


def test_cached_features_equal_a_direct_timm_call(images, checkpoint, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    from featcache.cache import open_cache
    from featcache.extract import extract

    net, path = checkpoint
    extract("timm", images, tmp_path / "c", model=SMALL, pretrained=str(path), batch_size=16, num_workers=0,
            device="cpu", progress=False)
    cache = open_cache(tmp_path / "c")
    assert cache.kind == "pooled" and cache.dim == 256
    bb = cache.backbone
    assert (bb["name"], bb["model"], bb["pretrained"], bb["pooling"]) == ("timm", SMALL, str(path.resolve()), "avg+pre_logits")
    assert bb["input_size"] == [3, 160, 160] and cache.attrs["preprocess"]["crop_pct"] == 0.95
    # the same weights, classifier removed, called directly on timm's own eval transform of the same images
    direct = timm.create_model(SMALL, pretrained=False, num_classes=0).eval()
    direct.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("classifier.")})
    tf = create_transform(**resolve_data_config({}, model=direct), is_training=False)
    rows = [0, 1, 7, 39]
    want = _direct(direct, torch.stack([tf(im) for im in _pil(images, rows)]))
    got = cache.load_rows("features", dtype=np.float32)[rows]
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not cache.load_rows("ok")[[5, 22]].any()  # the broken files are recorded, not featurised


def test_a_filter_run_folder_is_a_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file
    from torchvision import transforms as T

    from featcache.extract import get_backbone

    fps = []
    for i, (weights_name, seed) in enumerate([("best.safetensors", 1), ("best_model.safetensors", 1),
                                              ("best.safetensors", 2)]):
        torch.manual_seed(seed)
        net = timm.create_model(ARCH, pretrained=False, num_classes=1).eval()
        run = tmp_path / f"run{i}"
        run.mkdir()
        save_file(net.state_dict(), str(run / weights_name))
        (run / "model.json").write_text(json.dumps({"task": "mnv4", "spec": {"model": ARCH, "image_size": 32}}))
        bb = get_backbone("timm", str(run), seed=99)
        assert bb.model_name == str(run.resolve()) and bb.pretrained == str((run / weights_name).resolve())
        assert bb.load_report["ignored"] == 2 and bb.load_report["missing"] == bb.load_report["unexpected"] == 0
        # the filter's own evaluation preprocessing: the image resized to image_size square, ImageNet statistics
        tf = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 37, 3), dtype=np.uint8))
        x = tf(img)[None]
        np.testing.assert_allclose(bb.transform(img)[None].numpy(), x.numpy(), atol=1e-6)
        got = bb.forward(x, torch.device("cpu"))["features"]
        np.testing.assert_allclose(got, _direct(net, x), rtol=1e-5, atol=1e-5)
        assert got.shape == (1, 1280) and bb.preprocess_spec()["input_size"] == [3, 32, 32]
        fps.append(bb.fingerprint())
    # the same weights give the same weights hash in either layout; other weights another one
    assert fps[0]["weights_sha256"] == fps[1]["weights_sha256"] != fps[2]["weights_sha256"]
    # with --pretrained none the run's architecture is rebuilt with random weights from the seed
    none = get_backbone("timm", str(tmp_path / "run0"), "none", seed=0)
    assert none.pretrained == "none" and none.fingerprint()["weights_sha256"] != fps[0]["weights_sha256"]


def test_random_weights_come_from_the_seed():
    import timm

    from featcache.extract import get_backbone
    from featcache.extract.registry import weights_sha256

    a, b, c = (get_backbone("timm", "test_vit", "none", seed=s) for s in (0, 0, 1))
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["weights_sha256"] != c.fingerprint()["weights_sha256"]
    torch.manual_seed(0)
    assert weights_sha256(timm.create_model("test_vit", pretrained=False, num_classes=0)) == a.fingerprint()["weights_sha256"]


@pytest.mark.parametrize("model,pretrained,match", [
    ("test_vit", None, r"--pretrained none"),                      # a tag needs the hub
    ("test_vit", "in21k", r"test_vit\.in21k.*--pretrained PATH"),
    ("./runs/nope", None, r"no such folder \./runs/nope"),
    ("mobilenetv4_conv_smal", "none", r"did you mean mobilenetv4_conv_small"),
    ("test_vit", "missing.safetensors", r"weights file missing.safetensors does not exist"),
])
def test_errors_say_how_to_fix(model, pretrained, match):
    from featcache.errors import BackboneError
    from featcache.extract import get_backbone

    with pytest.raises(BackboneError, match=match):
        get_backbone("timm", model, pretrained)


def test_a_run_folder_that_is_not_a_timm_run(tmp_path):
    from featcache.errors import BackboneError
    from featcache.extract import get_backbone

    (tmp_path / "model.json").write_text(json.dumps({"task": "stage1", "spec": {"dim": 8}}))
    with pytest.raises(BackboneError, match="best.safetensors is missing"):
        get_backbone("timm", str(tmp_path))
    (tmp_path / "best.safetensors").write_bytes(b"")
    with pytest.raises(BackboneError, match="is not a timm model"):
        get_backbone("timm", str(tmp_path))
