"""The open_clip image encoder, frozen: pooled image embeddings (``kind = pooled``).

Default ``ViT-L-14`` with the ``openai`` weights (768-d).  ``--model`` takes any open_clip
name (``open_clip.list_models()``), ``local-dir:/path`` or ``hf-hub:org/repo``; the offline
presets ``tiny`` and ``small`` are ViT configs registered here and randomly initialised
with a seed, for tests and the demo.  Preprocessing comes from the model's own config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..data.images import ImageFiles, collate_images
from ..errors import BackboneError, first_line
from .registry import Backbone, register_backbone

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
        if pretrained is None:
            pretrained = "none" if (is_preset or schema) else self.default_pretrained
        if schema:
            pretrained = arch  # the folder or repo holds config and weights
        elif pretrained != "none" and (os.path.sep in pretrained or pretrained.endswith(
                (".pt", ".pth", ".bin", ".safetensors"))):
            if not os.path.isfile(pretrained):
                raise BackboneError(f"weights file {pretrained} does not exist")
            pretrained = str(Path(pretrained).resolve())
        self.pretrained = pretrained

        if not schema and arch not in open_clip.list_models():
            raise BackboneError(
                f"unknown open_clip model {self.model_name!r}; use tiny or small (offline presets) or one of "
                f"open_clip.list_models(), e.g. ViT-B-32, ViT-B-16, ViT-L-14"
            )
        torch.manual_seed(seed)
        try:
            with _quiet_root_logger():  # open_clip logs errors before raising; ours is one line
                model = open_clip.create_model(
                    arch, pretrained=None if (pretrained == "none" or schema) else pretrained, device="cpu",
                )
        except Exception as exc:  # network, missing tag, mismatched checkpoint ...
            raise BackboneError(
                f"cannot load open_clip weights {pretrained!r} for {self.model_name} ({first_line(exc)}); "
                "without network, download the weights elsewhere and pass the file with --pretrained PATH "
                "(or a local Hugging Face folder with --model local-dir:PATH), or --pretrained none for random weights"
            ) from exc
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

    def dataset(self, paths, meta=None):
        h, w = self.preprocess_spec()["size"]
        return ImageFiles(paths, self.transform, (3, h, w))

    def collate(self, batch):
        return collate_images(batch)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
        x = inputs.to(device, non_blocking=True)
        return {"features": self.module(x).float().cpu().numpy()}



@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)
