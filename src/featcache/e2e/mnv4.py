"""The MobileNetV4 filter: a timm model with one output logit, its transforms and prediction.

Model: ``timm.create_model(MODEL, num_classes=1)``; default ``mobilenetv4_hybrid_medium``
with the ``ix_e550_r256_in1k`` ImageNet weights.  ``pretrained`` is a timm tag (downloaded
where there is network), a local weights file (safetensors, or a tensors-only torch file
read with ``weights_only=True``; its classifier is not used), or ``none`` (random
initialisation with the seed: tests and the demo use ``mobilenetv4_conv_small``).

Inputs (:func:`make_transform`): the model's own normalisation from timm (``resolve_data_config``:
mean, std, interpolation) at the configured ``image_size``, with the geometry of :data:`GEOMETRIES`:
``design`` (the default) feeds the image as the design does, resized to ``image_size`` square (a
256-px face at the default 256 passes unchanged: PIL's resize to the same size is a copy); ``timm``
is timm's evaluation geometry (resize the shorter side to ``image_size / crop_pct``, 269 for the
default model, centre crop ``image_size``), what runs written before issue 26 used and still use.
Training puts the design's augmentations on top
(:data:`AUGMENTATIONS`: flip, colour jitter, random affine, Gaussian blur) in a
``torchvision.transforms.v2`` pipeline that takes a PIL image or a uint8 tensor
(:func:`make_transform`, the reference on the CPU).

Training and prediction run the fast path: DataLoader workers decode and apply the geometry
to uint8 (:func:`geometry`, :func:`pixel_loader`); batches travel (pinned on CUDA) as uint8
(n, 3, H, W); on the device :func:`prepare_batch` applies the augmentations per sample (each
image its own random parameters from a seeded ``torch.Generator`` on the device:
:func:`sample_augmentations`, :func:`flip`, :func:`color_jitter`, :func:`affine`,
:func:`gaussian_blur`), then converts to float and normalises.
Score = the logit of fake; p = sigmoid(score / T) with the run's temperature T (1 when the
run is not calibrated).  Training defaults: configs/mnv4.yaml (:data:`DEFAULTS` is a flat view of it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ..config import Config, resolve_config
from ..data.images import ImageFiles, Uint8Images, collate_images, collate_uint8
from ..data.manifest import read_manifest
from ..errors import BackboneError, FeatcacheError, first_line
from ..extract.timm_backbone import classifier_names
from ..extract.weights import load_checkpoint, parse_weights
from ..metrics.detection import sigmoid
from ..progress import bar as tqdm
from ..runtime import RunDir, resolve_device

TASK = "mnv4"
DEFAULT_TAG = "ix_e550_r256_in1k"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _defaults() -> dict:
    """The filter's defaults as one flat dict, read from its one source, configs/mnv4.yaml (the
    ``train-e2e mnv4`` alias's options and the prediction helpers read them)."""
    conf = Config.of(resolve_config(TASK))
    m, t, e = conf.model, conf.training, conf.evaluation
    return {"model": m.name, "epochs": t.epochs, "patience": t.patience, "batch_size": t.batch_size,
            "lr": t.lr, "weight_decay": t.weight_decay, "image_size": m.image_size,
            "geometry": m.geometry, "amp_dtype": t.amp_dtype, "eval_batch_size": e.batch_size}


#: configs/mnv4.yaml's defaults, flat: epochs 50 (the design's length; the cosine T_max), patience 15,
#: batch 32, lr 1e-4, weight decay 1e-5, 256 px in the design geometry, fp16 when mixed precision is
#: on (off by default: fp32), evaluation batches of 256.
DEFAULTS = _defaults()
DEFAULT_MODEL = DEFAULTS["model"]

#: The filter's input geometry: ``design`` resizes the image to image_size square (the design's input;
#: an image_size face passes as it is); ``timm`` is timm's evaluation geometry (shorter side to
#: image_size / crop_pct, then a centre crop of image_size).
GEOMETRIES = ("design", "timm")

#: The training augmentations, at the design's values (issue 18): flip p 0.5; ColorJitter
#: brightness/contrast/saturation 0.2 and hue 0.1; RandomAffine rotation 10 degrees, translate
#: 0.1, scale 0.9-1.1; Gaussian blur on every image, kernel 3, sigma 0.1-2.0.
AUGMENTATIONS = {
    "flip_p": 0.5,
    "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1,
    "degrees": 10.0, "translate": (0.1, 0.1), "scale": (0.9, 1.1),
    "blur_kernel": 3, "blur_sigma": (0.1, 2.0),
}
#: Columns carried from the manifest into predictions tables.
META = ["sample_id", "label", "split", "subgroup", "identity", "dataset", "method", "gender", "race"]


def default_pretrained(model: str) -> str:
    """The weights used when ``--pretrained`` is not given."""
    return DEFAULT_TAG if model == DEFAULT_MODEL else "default"


def create_model(model: str = DEFAULT_MODEL, pretrained: str | None = None, *, seed: int = 0) -> torch.nn.Module:
    """A timm MobileNetV4 (any timm model name works) with one output logit."""
    import timm

    if not timm.is_model(model):
        close = [m for m in timm.list_models("mobilenetv4*")]
        raise BackboneError(f"unknown timm model {model!r}; MobileNetV4 models: {', '.join(close)}")
    weights = parse_weights(pretrained, default_pretrained(model))
    pretrained = weights.value
    torch.manual_seed(seed)  # the new classifier (and everything, with pretrained none)
    if weights.kind != "tag":
        net = timm.create_model(model, pretrained=False, num_classes=1)
        if weights.kind == "file":  # the one loader; the file's classifier is not used
            load_checkpoint(net, weights.value, ignore=classifier_names(net))
        return _zero_head(net)
    name = model if pretrained == "default" else f"{model}.{pretrained}"
    try:
        return _zero_head(timm.create_model(name, pretrained=True, num_classes=1))
    except Exception as exc:  # no network, unknown tag, ...
        raise BackboneError(
            f"cannot load the {model} weights {pretrained!r} ({first_line(exc)}); without network, download "
            f"them elsewhere (timm model {name}) and pass the file with --pretrained PATH, or --pretrained none "
            "for random weights") from exc


def _zero_head(net: torch.nn.Module) -> torch.nn.Module:
    """Start the new one-logit classifier at zero: every image begins at p = 0.5 (a randomly
    initialised head on 1280 unnormalised features starts with logits in the tens)."""
    head = net.get_classifier()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return net


def data_config(model=DEFAULT_MODEL, image_size: int | None = None, pretrained: str | None = None,
                geometry: str = DEFAULTS["geometry"]) -> dict:
    """The filter's preprocessing of ``model`` (a timm name, or a created timm module) at ``image_size``.

    ``{input_size, interpolation, mean, std, crop_pct, crop_mode}`` from
    ``timm.data.resolve_model_data_config`` (a module) or ``resolve_data_config`` on the
    pretrained config of the timm name ``model.pretrained`` (a tag that is ``none``, ``default`` or a
    file means the architecture's default tag).  ``input_size`` is set to ``image_size`` square.
    ``geometry`` ``design`` sets ``crop_pct`` 1 and ``crop_mode`` ``squash`` (a resize to the square,
    no crop); ``timm`` keeps timm's (see :data:`GEOMETRIES`).
    """
    if geometry not in GEOMETRIES:
        raise FeatcacheError(f"the filter's geometry must be {' or '.join(GEOMETRIES)}, got {geometry!r}")
    import timm
    from timm.data import resolve_data_config, resolve_model_data_config

    if isinstance(model, torch.nn.Module):
        cfg = resolve_model_data_config(model)
    else:
        is_tag = pretrained and pretrained not in ("none", "default") and not _is_file_spec(pretrained)
        name = f"{model}.{pretrained}" if is_tag else model
        pcfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(model)
        cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    cfg = dict(cfg)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    if geometry == "design":
        cfg.update(crop_pct=1.0, crop_mode="squash")
    return cfg


def _is_file_spec(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def make_transform(image_size: int, train: bool, *, model=DEFAULT_MODEL, pretrained: str | None = None,
                   config: dict | None = None):
    """The filter's input pipeline at ``image_size`` (see :func:`data_config` for ``model``).

    Evaluation (``train`` False): ``timm.data.create_transform(**config, is_training=False)``,
    timm's own transform.  Training: the same resize and centre crop, then the design's
    augmentations (:data:`AUGMENTATIONS`), uint8 to float and the config's normalisation, as a
    ``torchvision.transforms.v2.Compose`` that accepts a PIL image or a uint8 tensor (C, H, W)."""
    from timm.data import create_transform
    from torchvision.transforms import v2

    cfg = dict(config) if config is not None else data_config(model, image_size, pretrained)
    cfg["input_size"] = (3, int(image_size), int(image_size))
    if not train:
        return create_transform(**cfg, is_training=False)
    interp = v2.InterpolationMode(cfg["interpolation"])
    scale = math.floor(image_size / cfg["crop_pct"])
    if cfg.get("crop_mode", "center") not in ("center", "squash"):
        raise FeatcacheError(f"the filter's training pipeline supports timm crop modes center and squash, not "
                             f"{cfg['crop_mode']!r}")
    a = AUGMENTATIONS
    return v2.Compose([
        # the config's geometry: the shorter side (both sides when squashing) to size / crop_pct
        v2.Resize(scale if cfg.get("crop_mode", "center") == "center" else [scale, scale], interpolation=interp,
                  antialias=True),
        v2.CenterCrop(image_size),
        v2.RandomHorizontalFlip(p=a["flip_p"]),
        v2.ColorJitter(brightness=a["brightness"], contrast=a["contrast"], saturation=a["saturation"], hue=a["hue"]),
        v2.RandomAffine(degrees=a["degrees"], translate=a["translate"], scale=a["scale"]),
        v2.GaussianBlur(kernel_size=a["blur_kernel"], sigma=a["blur_sigma"]),  # every image (the design)
        # a PIL image is augmented with PIL's kernels (faster on the CPU than the tensor ones) and
        # becomes a uint8 tensor here; a uint8 tensor input took the tensor kernels and passes through
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
    ])


def load_split(manifest, split: str) -> tuple[pd.DataFrame, list[str]]:
    """The labelled rows of ``split`` of a manifest (path or :class:`Manifest`), and their file paths."""
    m = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    df = m.df
    rows = df[df["split"] == split]
    if len(rows) == 0:
        raise FeatcacheError(f"{m.source}: no rows in split {split!r} (splits present: "
                             f"{', '.join(sorted(df['split'].unique()))})")
    if (rows["label"] < 0).any():
        raise FeatcacheError(f"{m.source}: split {split} has rows without a label; the filter needs labels")
    rows = rows.reset_index(drop=True)
    paths = [p if os.path.isabs(p) else str(m.root / p) for p in rows["path"]]
    return rows, paths


def image_loader(paths: list[str], image_size: int, *, train: bool, batch_size: int, num_workers: int = 0,
                 generator: torch.Generator | None = None, augment: bool = True, model=DEFAULT_MODEL,
                 pretrained: str | None = None, config: dict | None = None) -> torch.utils.data.DataLoader:
    """Batches ``(rows, images, errors)`` of decoded images (unreadable ones: error set, zeros).

    ``train``: shuffled, and augmented unless ``augment`` is False.  ``model``/``pretrained``
    (or an explicit timm data ``config``) choose the preprocessing (:func:`make_transform`)."""
    ds = ImageFiles(paths, make_transform(image_size, train and augment, model=model, pretrained=pretrained,
                                          config=config), (3, image_size, image_size))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=train, num_workers=num_workers, collate_fn=collate_images,
        generator=generator, drop_last=False)  # workers read PNG files only (no Zarr): the default fork is safe


# -- the fast path: uint8 from the workers, augmentation and normalisation on the device -----------
def geometry(image_size: int, config: dict):
    """The config's geometry as PIL operations ending in a uint8 ``image_size`` square: the shorter
    side (both sides with crop mode ``squash``) to ``floor(image_size / crop_pct)`` with the config's
    interpolation, then a centre crop (the steps of timm's eval transform before ToTensor).  In the
    ``design`` geometry (crop_pct 1, ``squash``) that is a resize to the square and no crop: an
    ``image_size`` square image passes unchanged."""
    from torchvision.transforms import v2

    mode = config.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise FeatcacheError(f"the filter's pipeline supports timm crop modes center and squash, not {mode!r}")
    scale = math.floor(image_size / config["crop_pct"])
    return v2.Compose([
        v2.Resize(scale if mode == "center" else [scale, scale], interpolation=v2.InterpolationMode(
            config["interpolation"]), antialias=True),
        v2.CenterCrop(image_size),
    ])


class EpochSampler(torch.utils.data.Sampler):
    """Indices ``0..n-1``, shuffled by epoch: a permutation from ``torch.Generator`` seeded with
    ``seed * 1_000_003 + epoch`` (:meth:`set_epoch` before each pass), so one DataLoader (and its
    persistent workers) serves every epoch and a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _collate_pixels(batch):
    rows, (pixels, _), errors = collate_uint8(batch)
    return rows, pixels, errors


def pixel_loader(paths: list[str], image_size: int, config: dict, *, batch_size: int, num_workers: int = 0,
                 sampler: torch.utils.data.Sampler | None = None, pin_memory: bool = False
                 ) -> torch.utils.data.DataLoader:
    """Batches ``(rows, pixels, errors)``: pixels uint8 (n, 3, image_size, image_size) after
    :func:`geometry`, decoded in ``num_workers`` persistent workers (0: in this process); an
    unreadable file gives a zero image and its error (the caller counts and drops it).
    ``sampler`` orders the rows (:class:`EpochSampler`; None: in order)."""
    ds = Uint8Images(paths, geometry(image_size, config), (image_size, image_size))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=_collate_pixels,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, drop_last=False,
        prefetch_factor=4 if num_workers > 0 else None)  # workers read image files only: fork is safe


_NORM: dict = {}


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Float images in [0, 1] (n, 3, h, w) -> ``(x - mean) / std`` per channel (float32); the
    mean and std tensors are made once per device (a copy from pageable memory would wait for
    the device's queue)."""
    key = (str(x.device), tuple(float(m) for m in mean), tuple(float(v) for v in std))
    if key not in _NORM:
        _NORM[key] = (torch.tensor(key[1], dtype=torch.float32).view(1, 3, 1, 1).to(x.device),
                      torch.tensor(key[2], dtype=torch.float32).view(1, 3, 1, 1).to(x.device))
    m, s = _NORM[key]
    return (x - m) / s


def sample_augmentations(n: int, height: int, width: int, generator: torch.Generator,
                         aug: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-sample parameters of the design's augmentations (:data:`AUGMENTATIONS`), drawn on
    ``generator``'s device as torchvision v2 draws them for one image: ``flip`` (bool, p flip_p);
    colour jitter factors ``brightness``/``contrast``/``saturation`` uniform in [1 - v, 1 + v] and
    ``hue`` in [-v, v], applied in a random ``order`` (a permutation of 0..3 per sample); affine
    ``angle`` uniform in +-degrees, ``tx``/``ty`` whole pixels ``round(uniform(+-translate * size))``,
    ``scale`` uniform in the range; blur ``sigma`` uniform in the range (one per image, both axes)."""
    a = AUGMENTATIONS if aug is None else aug
    dev = generator.device

    def u(lo, hi):
        return torch.rand(n, generator=generator, device=dev) * (hi - lo) + lo

    p = {"flip": torch.rand(n, generator=generator, device=dev) < a["flip_p"]}
    for k in ("brightness", "contrast", "saturation"):
        p[k] = u(1 - a[k], 1 + a[k])
    p["hue"] = u(-a["hue"], a["hue"])
    p["order"] = torch.rand(n, 4, generator=generator, device=dev).argsort(dim=1)
    p["angle"] = u(-a["degrees"], a["degrees"])
    max_dx, max_dy = a["translate"][0] * width, a["translate"][1] * height
    p["tx"], p["ty"] = u(-max_dx, max_dx).round(), u(-max_dy, max_dy).round()
    p["scale"] = u(*a["scale"])
    p["sigma"] = u(*a["blur_sigma"])
    return p


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the images where ``mask`` (n,) is True."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def _per(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per(f)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x, f):
    """torchvision's ``adjust_brightness`` on float images in [0, 1], factor ``f`` (n,) per image."""
    return (x * _per(f)).clamp(0.0, 1.0)


def adjust_contrast(x, f):
    """torchvision's ``adjust_contrast``: blend with the mean of each image's grayscale."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    """torchvision's ``adjust_saturation``: blend with each image's grayscale."""
    return _blend(x, _gray(x), f)


def adjust_hue(x, f):
    """torchvision's ``adjust_hue``: shift the HSV hue of each image by ``f`` (n,) (turns)."""
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    r, g, b = x.unbind(1)
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + f.to(torch.float32).view(-1, 1, 1), 1.0)
    # HSV -> RGB: channel value v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1
    n_rgb = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=torch.float32)  # made on the device: no copy
    k = torch.remainder(n_rgb.view(1, 3, 1, 1) + 6.0 * h.unsqueeze(1), 6.0)
    return (maxc.unsqueeze(1) * (1.0 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))).clamp(0.0, 1.0)


_JITTER = (("brightness", adjust_brightness), ("contrast", adjust_contrast), ("saturation", adjust_saturation),
           ("hue", adjust_hue))


def color_jitter(x: torch.Tensor, p: dict, *, sync_free: bool | None = None) -> torch.Tensor:
    """ColorJitter per image: brightness, contrast, saturation and hue (ops 0..3, as in
    :data:`_JITTER`) with the factors of ``p``, in each image's own ``order`` (n, 4): step j
    applies op ``order[:, j]``.

    ``sync_free`` (default: on CUDA) computes every step on the whole batch without a host
    synchronisation: the three linear ops as one blend (with black, the grayscale mean or the
    grayscale image, by image) and the hue shift taken where chosen. Otherwise (the CPU) each
    op runs only on the images that take it at that step: a quarter of the work."""
    if not (x.is_cuda if sync_free is None else sync_free):
        for j in range(4):
            op, out = p["order"][:, j], torch.empty_like(x)
            for o, (name, fn) in enumerate(_JITTER):
                idx = (op == o).nonzero().view(-1)
                if idx.numel():
                    out[idx] = fn(x[idx], p[name][idx])
            x = out
        return x
    n = x.shape[0]
    factors = torch.stack([p["brightness"], p["contrast"], p["saturation"]], 1).to(torch.float32)
    for j in range(4):
        op = p["order"][:, j]
        gray = _gray(x)
        other = torch.where((op == 1).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
        other = other * (op != 0).to(x.dtype).view(-1, 1, 1, 1)  # brightness blends with black
        lin = _blend(x, other, factors.gather(1, op.clamp(max=2).view(n, 1)).view(n))
        x = torch.where((op == 3).view(-1, 1, 1, 1), adjust_hue(x, p["hue"]), lin)
    return x


def affine(x: torch.Tensor, angle, tx, ty, scale, *, mode: str = "nearest") -> torch.Tensor:
    """torchvision's ``affine`` per image (rotation ``angle`` degrees about the centre, translation
    ``tx``/``ty`` pixels, ``scale``; no shear; zero fill) as one ``affine_grid`` + ``grid_sample``:
    the inverse matrix in centred pixel coordinates, rescaled to the normalised grid."""
    n, _, h, w = x.shape
    rot = torch.deg2rad(angle.to(torch.float32))
    cos, sin = rot.cos() / scale, rot.sin() / scale
    m0, m1, m3, m4 = cos, sin, -sin, cos
    tx, ty = tx.to(torch.float32), ty.to(torch.float32)
    m2, m5 = -(m0 * tx + m1 * ty), -(m3 * tx + m4 * ty)
    theta = torch.stack([torch.stack([m0, m1 * h / w, m2 * 2.0 / w], 1),
                         torch.stack([m3 * w / h, m4, m5 * 2.0 / h], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` per image: a ``kernel``-tap Gaussian of ``sigma`` (n,) on
    both axes, reflect padding, as one grouped convolution (one kernel per image and channel)."""
    n, c, h, w = x.shape
    t = torch.arange(kernel, device=x.device, dtype=torch.float32) - (kernel - 1) / 2
    k1 = torch.softmax(-(t.view(1, -1) / sigma.to(torch.float32).view(-1, 1)) ** 2 / 2, dim=1)  # (n, k)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, dim=0).unsqueeze(1)  # (n c, 1, k, k)
    pad = kernel // 2
    xp = torch.nn.functional.pad(x.reshape(1, n * c, h, w), [pad] * 4, mode="reflect")
    return torch.nn.functional.conv2d(xp, k2, groups=n * c).view(n, c, h, w)


def augment(x: torch.Tensor, p: dict, aug: dict | None = None) -> torch.Tensor:
    """The design's training augmentations on float images in [0, 1], per image with the
    parameters ``p`` (:func:`sample_augmentations`), in the order of :func:`make_transform`:
    flip, colour jitter, affine (nearest, as RandomAffine), Gaussian blur."""
    a = AUGMENTATIONS if aug is None else aug
    x = flip(x, p["flip"])
    x = color_jitter(x, p)
    x = affine(x, p["angle"], p["tx"], p["ty"], p["scale"])
    return gaussian_blur(x, p["sigma"], a["blur_kernel"])


def prepare_batch(pixels: torch.Tensor, device: torch.device, config: dict, *,
                  generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> the model's float32 input on ``device``: copied there (non-blocking
    from pinned memory), augmented per image when ``generator`` is given (a generator on
    ``device``), scaled to [0, 1] and normalised with the config's mean and std."""
    x = pixels.to(device, non_blocking=True).to(torch.float32).div_(255.0)
    if generator is not None:
        x = augment(x, sample_augmentations(x.shape[0], x.shape[2], x.shape[3], generator))
    x = normalise(x, config["mean"], config["std"])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_scores(model: torch.nn.Module, paths: list[str], image_size: int, device: torch.device, *,
                   batch_size: int = DEFAULTS["eval_batch_size"], num_workers: int = 0,
                   amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "predict",
                   config: dict | None = None, loader: torch.utils.data.DataLoader | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Logits of every path (float64), a readable mask, and {row: error} for unreadable files.

    Preprocessing: the geometry and normalisation of ``config``, or of ``model``
    itself (``resolve_model_data_config``) when ``config`` is None: uint8 batches from
    :func:`pixel_loader` (or the given ``loader`` over ``paths``), normalised on ``device``;
    channels-last on CUDA."""
    model.eval()
    scores = np.zeros(len(paths), dtype=np.float64)
    ok = np.ones(len(paths), dtype=bool)
    errors = {}
    config = config if config is not None else data_config(model, image_size)
    if loader is None:
        loader = pixel_loader(paths, image_size, config, batch_size=batch_size, num_workers=num_workers,
                              pin_memory=device.type == "cuda")
    outs = []
    for rows, pixels, errs in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        x = prepare_batch(pixels, device, config, channels_last=device.type == "cuda")
        with autocast(device, amp_dtype):
            outs.append((rows, model(x).float().squeeze(1)))  # no host sync per batch
        for r, e in zip(rows, errs):
            if e:
                ok[r] = False
                errors[int(r)] = e
    for rows, out in outs:
        scores[rows] = out.cpu().numpy()
    return scores, ok, errors


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` in ``amp_dtype`` on CUDA; nothing (fp32) otherwise."""
    import contextlib

    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype)


def read_temperature(run_dir) -> float | None:
    """The temperature ``featcache calibrate`` fitted for a filter run (``calibration_temp.json``), or None."""
    f = RunDir(run_dir).temperature
    return float(json.loads(f.read_text())["temperature"]) if f.is_file() else None


class FilterRun:
    """A trained filter read back from its run directory (``model.json`` + weights + temperature)."""

    def __init__(self, run_dir, device=None, weights: str | None = None):
        self.run_dir = Path(run_dir)
        spec_file = RunDir(self.run_dir).model
        if not self.run_dir.exists():
            raise FeatcacheError(f"run {self.run_dir} does not exist")
        if not spec_file.is_file():
            raise FeatcacheError(f"{self.run_dir} is not a run directory: model.json is missing")
        spec = json.loads(spec_file.read_text())
        if spec.get("task") != TASK:
            raise FeatcacheError(f"{self.run_dir} is a {spec.get('task')!r} run, not a train-e2e {TASK} run")
        # ``weights`` None: the selected weights, best.safetensors (the one run layout) or
        # best_model.safetensors (the filter's earlier layout)
        names = [weights] if weights else ["best", "best_model"]
        wfile = next((self.run_dir / f"{n}.safetensors" for n in names
                      if (self.run_dir / f"{n}.safetensors").is_file()), self.run_dir / f"{names[0]}.safetensors")
        if not wfile.is_file():
            raise FeatcacheError(f"{self.run_dir} is not a finished run: {wfile.name} is missing")
        self.spec = spec["spec"]
        self.device = resolve_device(device)
        self.model = create_model(self.spec["model"], "none")
        self.model.load_state_dict(load_file(str(wfile)))
        self.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.temperature = read_temperature(self.run_dir)

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def data_config(self) -> dict:
        """The preprocessing of the run's model and weights at its image size, in the run's geometry
        (``timm`` for a run written before issue 26, whose spec has none)."""
        return data_config(self.spec["model"], self.image_size, self.spec.get("pretrained"),
                           self.spec.get("geometry", "timm"))

    def predict(self, manifest, split: str, *, batch_size: int = DEFAULTS["eval_batch_size"], num_workers: int = 0,
                progress: bool = False) -> pd.DataFrame:
        """Predictions table of ``split``: meta columns, ``score`` (logit) and ``prob`` = sigmoid(score / T).

        Unreadable images are an error naming them (a filter must see every sample it judges).
        """
        rows, paths = load_split(manifest, split)
        return self.predict_rows(rows, paths, f"split {split}", batch_size=batch_size, num_workers=num_workers,
                                 progress=progress)

    def predict_rows(self, rows: pd.DataFrame, paths: list[str], name: str, *,
                     batch_size: int = DEFAULTS["eval_batch_size"],
                     num_workers: int = 0, progress: bool = False) -> pd.DataFrame:
        """:meth:`predict` on given manifest ``rows`` (index 0..n-1) and their file ``paths``;
        ``name`` (the split, or what the rows are) labels the progress bar and messages."""
        scores, ok, errors = predict_scores(self.model, paths, self.image_size, self.device, batch_size=batch_size,
                                            num_workers=num_workers, progress=progress, desc=f"filter {name}",
                                            config=self.data_config)
        if errors:
            shown = "; ".join(f"{rows.at[r, 'sample_id']}: {e}" for r, e in list(errors.items())[:3])
            raise FeatcacheError(f"{len(errors)} image(s) of {name} cannot be read ({shown})")
        preds = rows[[c for c in META if c in rows.columns]].copy()
        t = self.temperature or 1.0
        preds.insert(2, "score", scores)
        preds.insert(3, "prob", sigmoid(scores / t))
        return preds
