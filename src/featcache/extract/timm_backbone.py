"""Any timm image model, frozen: its pooled penultimate features (``kind = pooled``).

``--model`` is a timm model name (``timm.list_models()``, optionally ``name.tag``; ``hf-hub:org/repo``
where there is network) or a run folder of ``featcache train-e2e`` (the fine-tuned filter): its
``model.json`` spec names the timm model and the image size, its ``best.safetensors`` (or the older
``best_model.safetensors``) holds the weights. ``--pretrained`` is a timm tag (downloaded where
there is network; ``default`` is timm's default tag), a checkpoint file (read by the one loader,
:mod:`.weights`), or ``none`` (random initialisation from ``--seed``, offline).

Features: ``forward_head(forward_features(x), pre_logits=True)`` of the model built with
``num_classes=0``: the pooled features the classifier would see (1280-d for MobileNetV4). A
checkpoint's classifier is not used (and counted as such in the load report).

Preprocessing: timm's own data config (``timm.data.resolve_data_config`` on the model) and
``timm.data.create_transform`` for evaluation. A run folder resizes to its ``image_size`` square,
as the filter saw its images (``crop_pct`` 1, ``squash``), unless its spec holds a ``data_config``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import torch

from ..data.images import ImageFiles, collate_images
from ..errors import BackboneError, first_line
from .registry import Backbone, register_backbone
from .weights import load_checkpoint, looks_like_path, parse_weights, run_weights

#: ``--pretrained`` when it is not given for a timm name: timm's default tag for the model.
DEFAULT_TAG = "default"
#: Keys of timm's data config that preprocessing depends on (recorded in the cache).
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
OFFLINE_HINT = ("without network, download the weights elsewhere and pass the file with --pretrained PATH, "
                "or use random weights offline with --pretrained none (e.g. --model mobilenetv4_conv_small "
                "--pretrained none), or pass a train-e2e run folder as --model")


def _timm():
    import timm

    return timm


def classifier_names(net: torch.nn.Module) -> tuple[str, ...]:
    """The classifier module name(s) timm records for the model (``head.fc``, ``classifier``, ...)."""
    names = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


@register_backbone("timm")
class TimmBackbone(Backbone):
    kind = "pooled"
    default_model = ""
    default_pretrained = DEFAULT_TAG

    def __init__(self, model: str | None = None, pretrained: str | None = None, layer: str | None = None,
                 seed: int = 0):
        timm = _timm()
        if not model:
            raise BackboneError("the timm backbone needs --model: a timm model name (e.g. mobilenetv4_conv_small, "
                                "see timm.list_models()) or a train-e2e run folder")
        if layer not in (None, "final"):
            raise BackboneError(f"timm extracts the pooled penultimate features; --layer {layer!r} is not supported")
        overrides: dict = {}
        folder = Path(str(model)).expanduser()
        self.run_dir: str | None = None
        if folder.is_dir():
            spec, best = run_weights(folder)
            arch = spec.get("model")
            if not isinstance(arch, str) or not timm.is_model(arch):
                raise BackboneError(f"{folder}/model.json: spec.model {arch!r} is not a timm model; pass a "
                                    "train-e2e run folder or a timm model name")
            if isinstance(spec.get("data_config"), dict):
                overrides = dict(spec["data_config"])
            elif spec.get("image_size"):
                s = int(spec["image_size"])
                overrides = {"input_size": (3, s, s), "crop_pct": 1.0, "crop_mode": "squash"}
            self.run_dir = str(folder.resolve())
            self.model_name = self.run_dir
            default = str(best)
        elif folder.exists():
            raise BackboneError(f"{model} is a file; --model takes a timm model name or a run folder (pass a "
                                "weights file with --pretrained)")
        elif looks_like_path(str(model)):
            raise BackboneError(f"no such folder {model} (--model of timm: a train-e2e run folder or a timm "
                                "model name)")
        else:
            arch = str(model)
            if not arch.startswith("hf-hub:") and not timm.is_model(arch):
                close = difflib.get_close_matches(arch, timm.list_models(), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise BackboneError(f"unknown timm model {arch!r}{hint}; see timm.list_models()")
            self.model_name = arch
            default = DEFAULT_TAG
        weights = parse_weights(pretrained, default)
        self.arch = arch
        self.load_report: dict = {}
        torch.manual_seed(seed)  # random weights (--pretrained none) come from the seed
        if weights.kind == "tag":
            name = arch if weights.value == DEFAULT_TAG else f"{arch.split('.', 1)[0]}.{weights.value}"
            try:
                net = timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as exc:  # no network, unknown tag, ...
                what = f"{name} (timm's default tag)" if weights.value == DEFAULT_TAG else name
                raise BackboneError(f"cannot load the timm weights {what} ({first_line(exc)}); {OFFLINE_HINT}") from exc
        else:
            try:
                net = timm.create_model(arch, pretrained=False, num_classes=0)
            except Exception as exc:  # an hf-hub: name without network
                raise BackboneError(f"cannot build the timm model {arch} ({first_line(exc)}); {OFFLINE_HINT}") from exc
            if weights.kind == "file":
                self.load_report = load_checkpoint(net, weights.value, ignore=classifier_names(net)).as_dict()
        self.pretrained = weights.value
        self.module = net
        self.dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        from timm.data import create_transform, resolve_data_config

        cfg = resolve_data_config(overrides, model=net)
        self.data_config = {k: cfg[k] for k in DATA_KEYS if k in cfg}
        self.transform = create_transform(**self.data_config, is_training=False)

    # -- what the cache records ----------------------------------------------------------
    def preprocess_spec(self) -> dict:
        c = self.data_config
        return {"size": list(c["input_size"][1:]), "input_size": list(c["input_size"]),
                "interpolation": c.get("interpolation"), "mean": list(c["mean"]), "std": list(c["std"]),
                "crop_pct": c.get("crop_pct"), "crop_mode": c.get("crop_mode"), "mode": "RGB",
                "transform": "timm.data.create_transform"}

    def pooling(self) -> str:
        pool = getattr(self.module, "global_pool", None)
        name = pool if isinstance(pool, str) else getattr(pool, "pool_type", None) or "model"
        return f"{name}+pre_logits"

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "timm_model": self.arch, "input_size": list(self.data_config["input_size"])}

    # -- running ---------------------------------------------------------------------------
    def dataset(self, paths, meta=None):
        return ImageFiles(paths, self.transform, tuple(self.data_config["input_size"]))

    def collate(self, batch):
        return collate_images(batch)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
        x = inputs.to(device, non_blocking=True)
        net = self.module
        return {"features": net.forward_head(net.forward_features(x), pre_logits=True).float().cpu().numpy()}

