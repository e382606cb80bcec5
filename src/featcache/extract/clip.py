"""The open_clip image encoder, frozen: pooled image embeddings (``kind = pooled``).

Default ``ViT-L-14`` with the ``openai`` weights (768-d).  ``--model`` takes any open_clip
name (``open_clip.list_models()``), ``local-dir:/path`` or ``hf-hub:org/repo``; the offline
presets ``tiny`` and ``small`` are ViT configs registered here and randomly initialised
with a seed, for tests and the demo.  Preprocessing comes from the model's own config.

The extraction pipeline: DataLoader workers decode each file to RGB, then apply open_clip's own
resize and centre crop (its transform without ``ToTensor`` and ``Normalize``) on the uint8
image (:class:`~featcache.data.images.Uint8Images`); batches travel (pinned on CUDA) as uint8;
the cast and the normalisation run on the device (:meth:`ClipBackbone.normalise`). With
``decode="gpu"`` whole JPEGs travel as bytes and ``torchvision.io.decode_jpeg`` decodes them on
the GPU, where torchvision's bicubic antialiased resize and the crop follow.

Differences from open_clip's transform: a palette image is converted to RGB before it is
resized (open_clip resizes the palette indices first, i.e. with nearest neighbour); other
modes (grey, RGBA, CMYK, 16-bit) agree to rounding (a test checks cosine >= 0.9999). Attention:
open_clip's ViT blocks call ``nn.MultiheadAttention(need_weights=False)``, which PyTorch runs
through ``scaled_dot_product_attention`` (flash or memory-efficient kernels on CUDA in fp16/bf16).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..data.images import Uint8Images, collate_uint8
from ..errors import BackboneError, first_line
from .registry import Backbone, register_backbone
from .weights import LoadReport, Weights, load_state, parse_weights, read_checkpoint, strip_prefixes

PRESETS = {"tiny": "featcache-tiny", "small": "featcache-small"}
_CONFIGS_REGISTERED = False


def _open_clip():
    global _CONFIGS_REGISTERED
    import open_clip

    if not _CONFIGS_REGISTERED:
        open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")
        _CONFIGS_REGISTERED = True
    return open_clip


@register_backbone("clip")
class ClipBackbone(Backbone):
    kind = "pooled"
    default_model = "ViT-L-14"
    default_pretrained = "openai"
    presets = tuple(PRESETS)

    def __init__(self, model: str | None = None, pretrained: str | None = None, layer: str | None = None,
                 seed: int = 0):
        open_clip = _open_clip()
        self.model_name = model or self.default_model
        if layer not in (None, "final"):
            raise BackboneError(f"clip extracts the final image embedding; --layer {layer!r} is not supported")
        arch = PRESETS.get(self.model_name, self.model_name)
        is_preset = self.model_name in PRESETS
        schema = arch.split(":", 1)[0] if arch.startswith(("local-dir:", "hf-hub:")) else None
        # the folder or repo of a schema holds config and weights
        weights = (Weights("tag", arch) if schema else
                   parse_weights(pretrained, "none" if is_preset else self.default_pretrained))
        self.pretrained = pretrained = weights.value
        self.load_report: dict = {}

        if not schema and arch not in open_clip.list_models():
            raise BackboneError(
                f"unknown open_clip model {self.model_name!r}; use tiny or small (offline presets) or one of "
                f"open_clip.list_models(), e.g. ViT-B-32, ViT-B-16, ViT-L-14"
            )
        torch.manual_seed(seed)
        try:
            with _quiet_root_logger():  # open_clip logs errors before raising; ours is one line
                model = open_clip.create_model(
                    arch, pretrained=pretrained if weights.kind == "tag" and not schema else None, device="cpu",
                )
        except Exception as exc:  # network, missing tag ...
            raise BackboneError(
                f"cannot load open_clip weights {pretrained!r} for {self.model_name} ({first_line(exc)}); "
                "without network, download the weights elsewhere and pass the file with --pretrained PATH "
                "(or a local Hugging Face folder with --model local-dir:PATH), or --pretrained none for random "
                "weights, or use an offline preset: --model tiny|small --pretrained none"
            ) from exc
        if weights.kind == "file":
            self.load_report = load_visual(model, weights.value).as_dict()
        self.module = model.visual
        self.dim = int(model.visual.output_dim)
        self._preprocess = dict(model.visual.preprocess_cfg)
        self.transform = image_transform_v2(PreprocessCfg(**self._preprocess), is_train=False)
        del model  # the text tower is not needed

    def preprocess_spec(self) -> dict:
        size = self._preprocess["size"]
        return {
            "size": list(size) if isinstance(size, (tuple, list)) else [size, size],
            "crop": "center",
            "resize_mode": self._preprocess.get("resize_mode", "shortest"),
            "mean": list(self._preprocess["mean"]),
            "std": list(self._preprocess["std"]),
            "interpolation": self._preprocess.get("interpolation", "bicubic"),
            "mode": self._preprocess.get("mode", "RGB"),
        }

    def pooling(self) -> str:
        return str(getattr(self.module, "pool_type", "tok")) + "+proj"

    #: "cpu": PIL in the workers; "gpu": JPEGs decoded by torchvision on the device (:meth:`prepare`).
    decodes = ("cpu", "gpu")

    @functools.cached_property
    def geometry(self):
        """open_clip's eval transform up to its tensor conversion: resize and crop on a PIL image."""
        from torchvision.transforms import Compose, Normalize

        steps = list(self.transform.transforms)
        names = [type(t).__name__ for t in steps[-2:]]
        if len(steps) < 3 or names[0] not in ("MaybeToTensor", "ToTensor") or not isinstance(steps[-1], Normalize):
            raise BackboneError(f"unexpected open_clip transform {self.transform}; cannot split off its resize and crop")
        return Compose(steps[:-2])

    def _size(self) -> tuple[int, int]:
        h, w = self.preprocess_spec()["size"]
        return int(h), int(w)

    def dataset(self, paths, meta=None):
        return Uint8Images(paths, self.geometry, self._size(), jpeg_bytes=self.decode == "gpu")

    def collate(self, batch):
        return collate_uint8(batch)

    def prepare(self, inputs, device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
        """The uint8 batch on ``device``, JPEG bytes decoded there; errors by index in the batch."""
        pixels, jpegs = inputs
        h, w = self._size()
        if pixels.shape[-2:] != (h, w):  # every image of the batch still encoded
            pixels = torch.zeros((pixels.shape[0], 3, h, w), dtype=torch.uint8)
        x = pixels.to(device, non_blocking=True)
        errors: dict[int, str] = {}
        if jpegs:
            decoded = decode_jpegs_on(device, [data for _, data in jpegs], (h, w), self.preprocess_spec())
            for (i, _), (img, err) in zip(jpegs, decoded):
                if err:
                    errors[i] = err
                else:
                    x[i] = img
        return x, errors

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, h, w) on the device -> normalised, in the autocast dtype where autocast is on."""
        dev = x.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        key = (str(dev), dtype)
        cache = self.__dict__.setdefault("_norm", {})
        if key not in cache:
            mean = torch.tensor(self._preprocess["mean"], dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(self._preprocess["std"], dtype=torch.float64).view(1, 3, 1, 1)
            cache[key] = ((1.0 / (255.0 * std)).to(dev, dtype), (-mean / std).to(dev, dtype))
        scale, shift = cache[key]
        return torch.addcmul(shift, x.to(dtype), scale)

    @torch.inference_mode()
    def forward_async(self, inputs, device: torch.device) -> tuple[dict[str, torch.Tensor], None]:
        """Features on ``device``, not waited for: the runner copies them out asynchronously."""
        x = inputs if isinstance(inputs, torch.Tensor) else self.prepare(inputs, device)[0]
        f = self.module(self.normalise(x.to(device, non_blocking=True)))
        return {"features": f.float() if f.dtype == torch.bfloat16 else f}, None

    @torch.inference_mode()
    def forward(self, inputs, device: torch.device) -> dict[str, np.ndarray]:
        out, ctx = self.forward_async(inputs, device)
        return self.finish({k: v.float().cpu().numpy() for k, v in out.items()}, ctx)


def decode_jpegs_on(device: torch.device, datas: list[torch.Tensor], size: tuple[int, int],
                    spec: dict) -> list[tuple[torch.Tensor | None, str]]:
    """Decode JPEG bytes with ``torchvision.io.decode_jpeg`` on ``device``, resize the shortest
    side with bicubic antialiasing and centre-crop to ``size``: ``(image, '')`` or ``(None, error)``.

    The batch is decoded in one call; when that fails, each image alone, so that one corrupt
    file is recorded without losing the others.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    if spec.get("resize_mode", "shortest") != "shortest":
        raise BackboneError(f"--decode gpu supports resize_mode shortest, this model uses {spec.get('resize_mode')}")
    interp = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}.get(
        spec.get("interpolation", "bicubic"), F.InterpolationMode.BICUBIC)

    def geometry(img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        if size[0] == size[1]:  # torchvision's Resize(int): the shortest side to size, the other truncated
            s = size[0]
            new = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        else:
            scale = max(size[0] / h, size[1] / w)
            new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
        img = F.resize(img, list(new), interpolation=interp, antialias=True)
        return F.center_crop(img, list(size))

    try:
        imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        results = [(img, "") for img in imgs]
    except Exception:
        results = []
        for data in datas:
            try:
                results.append((decode_jpeg(data, mode=ImageReadMode.RGB, device=device), ""))
            except Exception as exc:
                results.append((None, f"{type(exc).__name__}: {first_line(exc)}"))
    return [(geometry(img), "") if img is not None else (None, err) for img, err in results]


def load_visual(model, path: str) -> LoadReport:
    """Load a CLIP checkpoint file's image tower into ``model.visual`` with the one loader.

    The file holds the whole CLIP model (``visual.*`` and the text tower, whose keys are counted
    as not used) or the image tower alone. A grid of position embeddings made for another image
    size is resized by open_clip's own ``resize_pos_embed``.
    """
    from open_clip.model import resize_pos_embed

    state, stripped = strip_prefixes(read_checkpoint(path), model.state_dict().keys())
    if not any(k.startswith("visual.") for k in state):
        return load_state(model.visual, state, source=path)
    resize_pos_embed(state, model)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    report = load_state(model.visual, visual, source=path)
    report.ignored = sorted(k for k in state if not k.startswith("visual."))
    report.stripped = stripped + report.stripped
    return report



@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)
