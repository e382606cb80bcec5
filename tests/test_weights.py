"""The one checkpoint loader and the shared --pretrained parsing, against torch's own load_state_dict."""

import argparse
import warnings

import pytest
import torch
from safetensors.torch import save_file

from featcache.errors import BackboneError
from featcache.extract.weights import load_checkpoint, local_folder, parse_weights, read_checkpoint, strip_prefixes


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def _save(state, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"epoch": 7, "state_dict": state}, path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_loaded_weights_and_reported_keys_equal_torch_load_state_dict(tmp_path, fmt, prefix):
    src = _net(1).state_dict()
    plain = {k: v for k, v in src.items() if k != "2.bias"}  # one missing ...
    plain["extra.weight"] = torch.ones(2)  # ... and one unexpected key
    path = tmp_path / f"ckpt.{fmt}"
    _save({prefix + k: v for k, v in plain.items()}, path)

    ours, ref = _net(2), _net(2)
    with pytest.warns(UserWarning, match=r"1 missing from the checkpoint \(2\.bias\); 1 not in the model"):
        report = load_checkpoint(ours, path, missing_ok=True, unexpected_ok=True)
    result = ref.load_state_dict(plain, strict=False)  # torch's verdict on the unwrapped, unprefixed dict
    assert report.missing == sorted(result.missing_keys) == ["2.bias"]
    assert report.unexpected == sorted(result.unexpected_keys) == ["extra.weight"]
    assert report.stripped == [p + "." for p in prefix.split(".") if p]
    assert report.loaded == len(src) - 1
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    # strict by default: the same file is refused, with the counts and the first names
    with pytest.raises(BackboneError, match=r"1 missing from the checkpoint \(2\.bias\)"):
        load_checkpoint(_net(2), path)


def test_a_matching_checkpoint_loads_silently_and_ignored_keys_are_counted(tmp_path):
    src = _net(1)
    state = {**src.state_dict(), "head.weight": torch.zeros(5, 2), "head.bias": torch.zeros(5)}
    _save(state, tmp_path / "c.safetensors")
    dst = _net(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(dst, tmp_path / "c.safetensors", ignore=["head"])
    assert report.ignored == ["head.bias", "head.weight"] and not report.missing and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_shape_mismatch_and_unsafe_pickles_are_clear_errors(tmp_path):
    state = _net(1).state_dict()
    state["0.weight"] = torch.zeros(5, 4)
    _save(state, tmp_path / "bad.pt")
    before = _net(2).state_dict()["0.bias"].clone()
    dst = _net(2)
    with pytest.raises(BackboneError, match=r"0\.weight \(5, 4\) vs \(3, 4\)"):
        load_checkpoint(dst, tmp_path / "bad.pt")
    assert torch.equal(dst.state_dict()["0.bias"], before)  # nothing loaded
    torch.save({"args": argparse.Namespace(lr=1), "state_dict": _net(1).state_dict()}, tmp_path / "pickle.pt")
    with pytest.raises(BackboneError, match=r"weights_only=True"):
        read_checkpoint(tmp_path / "pickle.pt")


def test_a_model_whose_own_names_start_with_model_keeps_them():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    own = Wrapper().state_dict()
    assert strip_prefixes(own, own.keys()) == (dict(own), [])
    wrapped = {f"module.{k}": v for k, v in own.items()}
    assert strip_prefixes(wrapped, own.keys())[0].keys() == own.keys()


def test_parse_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert (parse_weights(None, "openai").kind, parse_weights(None, "openai").value) == ("tag", "openai")
    assert parse_weights("none", "openai").kind == "none"
    f = parse_weights("~/w.safetensors", "x")
    assert (f.kind, f.value) == ("file", str((tmp_path / "w.safetensors").resolve()))
    with pytest.raises(BackboneError, match="weights file nope.pth does not exist"):
        parse_weights("nope.pth", "x")
    with pytest.raises(BackboneError, match="is a folder"):
        parse_weights(str(tmp_path), "x")


def test_local_folder_tells_a_mistyped_path_from_a_hub_id(tmp_path):
    assert local_folder(str(tmp_path), "detr") == tmp_path.resolve()
    assert local_folder("facebook/detr-resnet-50", "detr") is None
    for name in ("./models/detr", "~/nope/x", "models/a/b", str(tmp_path / "missing")):
        with pytest.raises(BackboneError, match="no such folder"):
            local_folder(name, "detr")


@pytest.mark.parametrize("backbone,model", [("xlsr", "./models/xls-r"), ("detr", "./models/detr"),
                                            ("xlsr", "~/models/x/y")])
def test_mistyped_local_models_say_no_such_folder(backbone, model):
    from featcache.extract import get_backbone

    with pytest.raises(BackboneError, match=f"no such folder {model}"):
        get_backbone(backbone, model)


def test_clip_offline_error_names_the_offline_presets():
    from featcache.extract import get_backbone

    with pytest.raises(BackboneError, match=r"--model tiny\|small --pretrained none"):
        get_backbone("clip", "ViT-B-32", "openai")


def test_clip_file_loads_the_image_tower_only(tmp_path):
    import open_clip

    from featcache.extract import get_backbone
    from featcache.extract.clip import _open_clip

    _open_clip()
    torch.manual_seed(5)
    model = open_clip.create_model("featcache-tiny")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    bb = get_backbone("clip", "tiny", str(tmp_path / "c.pt"))
    text = [k for k in model.state_dict() if not k.startswith("visual.")]
    assert bb.load_report["ignored"] == len(text) > 0 and bb.load_report["loaded"] == len(model.visual.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(bb.module.state_dict().values(), model.visual.state_dict().values()))


def test_filter_weights_file_loads_the_body_and_starts_the_head_at_zero(tmp_path):
    import timm

    from featcache.e2e.mnv4 import create_model

    torch.manual_seed(3)
    src = timm.create_model("mobilenetv4_conv_small", pretrained=False)  # an ImageNet-shaped 1000-class head
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    net = create_model("mobilenetv4_conv_small", str(tmp_path / "w.safetensors"))
    own, theirs = net.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("classifier."))
    assert not net.classifier.weight.any() and net.classifier.weight.shape == (1, 1280)


def test_detr_weights_file_loads_with_the_one_loader(tmp_path):
    from featcache.extract import get_backbone
    from featcache.extract.detr import load_detr
    from featcache.extract.registry import weights_sha256

    src, _, _ = load_detr("tiny", seed=5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "best.safetensors"))
    bb = get_backbone("detr", "tiny", str(tmp_path / "best.safetensors"), seed=0)
    assert bb.pretrained == str((tmp_path / "best.safetensors").resolve())
    assert bb.fingerprint()["weights_sha256"] == weights_sha256(src) != get_backbone("detr", "tiny").fingerprint()["weights_sha256"]
    with pytest.raises(BackboneError, match="takes none or a weights file"):
        get_backbone("detr", "tiny", "coco")
