"""CLIP's uint8 pipeline (decode and resize in workers, normalise on the device) against open_clip's own.

The reference is open_clip's transform (PIL resize, crop, ToTensor, Normalize) and the same
frozen model, image by image; the pipeline under test is the extraction's dataset, collate and
forward. Inputs are non-square and of every PIL mode a user meets.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.data.images import Uint8Images, collate_uint8, jpeg_gpu_decodable
from featcache.extract import get_backbone
from featcache.extract.clip import decode_jpegs_on


def _photo(h, w, seed):
    """Smooth colour gradients with texture: what resizing filters meet in photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], -1) * 80 + 128
    return np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_inputs(root):
    root.mkdir(exist_ok=True)
    rgb = _photo(57, 91, 1)
    files = {}
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(_photo(120, 70, 2)).convert("L").save(root / "gray.png")
    Image.fromarray(_photo(66, 100, 3)).quantize(64).save(root / "palette.png")
    rgba = np.dstack([_photo(80, 47, 4), np.linspace(200, 255, 80 * 47).reshape(80, 47).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(_photo(73, 130, 5)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    sixteen = (_photo(45, 77, 6)[..., 0].astype(np.uint16))  # 16-bit PNG, values of an 8-bit range
    Image.fromarray(sixteen).save(root / "sixteen.png")
    Image.fromarray(_photo(90, 61, 7)).save(root / "rgb.jpg", quality=92)
    for name in ("rgb.png", "gray.png", "palette.png", "rgba.png", "cmyk.jpg", "sixteen.png", "rgb.jpg"):
        files[name] = str(root / name)
    return files


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_features_equal_open_clips_preprocessing_and_model(tmp_path, model):
    files = _write_inputs(tmp_path)
    modes = {n: Image.open(p).mode for n, p in files.items()}
    assert modes == {"rgb.png": "RGB", "gray.png": "L", "palette.png": "P", "rgba.png": "RGBA",
                     "cmyk.jpg": "CMYK", "sixteen.png": "I;16", "rgb.jpg": "RGB"}
    bb = get_backbone("clip", model)
    names = list(files)
    ds = bb.dataset([files[n] for n in names])
    rows, inputs, errors = bb.collate([ds[i] for i in range(len(names))])
    assert errors == [""] * len(names) and inputs[0].dtype == torch.uint8
    got = bb.forward(inputs, torch.device("cpu"))["features"]

    def reference(img):
        # open_clip's own order; a palette image is the documented exception: we convert it
        # to RGB before resizing, open_clip would resize its indices (nearest neighbour).
        return bb.transform(img.convert("RGB") if img.mode == "P" else img)

    with torch.no_grad():
        want = bb.module(torch.stack([reference(Image.open(files[n])) for n in names])).numpy()
    cos = _cos(got, want)
    assert cos.min() >= 0.9999, dict(zip(names, cos.round(6)))


def test_corrupt_truncated_and_empty_files_are_recorded_in_both_decode_paths(tmp_path):
    files = _write_inputs(tmp_path)
    data = open(files["rgb.jpg"], "rb").read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 200 + b"\xff\xd9")
    bad_table = bytearray(data)  # whole, with a valid frame header, but a broken Huffman table
    bad_table[bad_table.find(b"\xff\xc4") + 4] = 0x55
    (tmp_path / "badtable.jpg").write_bytes(bytes(bad_table))
    paths = [files["rgb.jpg"], str(tmp_path / "trunc.jpg"), str(tmp_path / "empty.jpg"), str(tmp_path / "garbage.jpg"),
             files["cmyk.jpg"], files["rgb.png"], str(tmp_path / "badtable.jpg")]
    assert [jpeg_gpu_decodable(open(p, "rb").read()) for p in paths] == [True, False, False, False, False, False, True]
    bb = get_backbone("clip", "tiny")
    for jpeg_bytes in (False, True):
        ds = Uint8Images(paths, bb.geometry, (32, 32), jpeg_bytes=jpeg_bytes)
        rows, (pixels, jpegs), errors = collate_uint8([ds[i] for i in range(len(paths))])
        assert [i for i, _ in jpegs] == ([0, 6] if jpeg_bytes else [])
        # the device side of --decode gpu, run here on the CPU with torchvision's decoder
        decoded = decode_jpegs_on(torch.device("cpu"), [d for _, d in jpegs], (32, 32), bb.preprocess_spec())
        for (i, _), (img, err) in zip(jpegs, decoded):
            errors[i] = err
            if img is not None:
                pixels[i] = img
        failed = [i for i, e in enumerate(errors) if e]
        assert failed == [1, 2, 3, 6], errors
        assert "truncated" in errors[1]
    # the GPU path's resize (torchvision on tensors) against PIL's on the same JPEG
    ref = Uint8Images([files["rgb.jpg"]], bb.geometry, (32, 32))[0][1]
    img, err = decode_jpegs_on(torch.device("cpu"), [torch.frombuffer(bytearray(data), dtype=torch.uint8)], (32, 32),
                               bb.preprocess_spec())[0]
    assert err == "" and img.shape == ref.shape
    assert (img.float() - ref.float()).abs().mean() < 2.0  # grey levels, out of 255
