"""One registry of backbones: ``get_backbone(name, model, pretrained)`` builds any of them.

A backbone is a frozen feature extractor with what the cache needs to know about it:
its output ``kind`` (``pooled`` | ``frames`` | ``queries``), its preprocessing (recorded in the
cache and its fingerprint), a decoder that turns manifest rows into model inputs, and
``fingerprint()``: the facts that determine its outputs.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np
import pandas as pd
import torch

from ..errors import BackboneError
from ..registry import Registry

BACKBONES = Registry("backbone", ("featcache.extract.clip", "featcache.extract.xlsr", "featcache.extract.detr",
                                  "featcache.extract.timm_backbone"), error=BackboneError)


class Backbone(ABC):
    """Base class of the frozen backbones (one module each in ``featcache.extract``)."""

    name: str = ""
    kind: str = ""  # pooled | frames | queries
    default_model: str = ""
    default_pretrained: str = "none"
    #: Offline presets: model names that need no download and are randomly initialised.
    presets: tuple[str, ...] = ()

    module: torch.nn.Module
    model_name: str
    pretrained: str

    # -- what the cache records ----------------------------------------------------------
    @abstractmethod
    def preprocess_spec(self) -> dict:
        """The preprocessing that determines the inputs (size, mean, std, sample rate, ...)."""

    def layer(self) -> str:
        return "final"

    def pooling(self) -> str:
        return "none"

    def fingerprint(self) -> dict:
        """Name, model, weights and the sha256 of the weights actually loaded."""
        return {
            "name": self.name,
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_sha256": weights_sha256(self.module),
            "layer": self.layer(),
            "pooling": self.pooling(),
        }

    # -- running ---------------------------------------------------------------------------
    @abstractmethod
    def dataset(self, paths: list[str], meta: pd.DataFrame | None = None) -> torch.utils.data.Dataset:
        """A dataset yielding ``(row, input, error)`` for each path; ``error`` is '' when read.

        ``meta`` is the manifest (one row per path) for backbones whose inputs need more than
        the file (audio segments, detection ground truth).
        """

    @abstractmethod
    def collate(self, batch) -> tuple[np.ndarray, object, list[str]]:
        """Stack dataset items into ``(rows, model_input, errors)``."""

    @abstractmethod
    def forward(self, inputs, device: torch.device) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Run the frozen model on one batch.

        Returns, per cache array, either one array whose first axis is the batch or a list of
        one array per sample (variable-length outputs such as frames).
        """

    # -- optional hooks: each has a no-op default here, so the runner never probes a backbone ---
    #: The ``--decode`` modes this backbone takes: ``cpu`` (decoded in the DataLoader workers)
    #: always; an image backbone may add ``gpu`` (JPEGs decoded on the device in :meth:`prepare`).
    decodes: tuple[str, ...] = ("cpu",)
    decode: str = "cpu"

    def set_decode(self, mode: str) -> None:
        """Where the inputs are decoded (``--decode``); one of :attr:`decodes`."""
        if mode not in self.decodes:
            others = "" if self.decodes == ("cpu",) else f" ({self.name} takes {', '.join(self.decodes)})"
            raise BackboneError(f"--decode {mode} is for image backbones that take it (clip); "
                                f"{self.name} decodes on the CPU{others}")
        self.decode = mode

    def batch_sampler(self, parts: list[int], rows: int, part_rows: int, batch_size: int, dataset):
        """The batches of rows for the parts ``parts`` (never across parts), or None: the runner's
        consecutive rows. XLS-R groups utterances of similar length."""
        return None

    def prepare(self, inputs, device: torch.device) -> tuple[object, dict[int, str]]:
        """The collated batch made ready on ``device`` in the main thread, and the errors found
        there (by index in the batch). The default leaves the batch as collated."""
        return inputs, {}

    def forward_async(self, inputs, device: torch.device) -> tuple[dict, object]:
        """``(outputs, context)``: outputs may stay on the device, not waited for (the runner copies
        them to the host in order and :meth:`finish` runs in the writer thread). The default runs
        :meth:`forward`: host arrays, already final."""
        return self.forward(inputs, device), None

    def finish(self, arrays: dict[str, np.ndarray], context) -> dict:
        """The host copies of :meth:`forward_async`'s outputs turned into what :meth:`pack` takes
        (XLS-R cuts the padded frames per utterance). The default keeps them."""
        return arrays

    #: dtype in which each output array is stored (default float16).
    store_dtypes: dict[str, str] = {}

    def pack(self, samples: list[dict[str, np.ndarray]], ok: np.ndarray) -> dict[str, np.ndarray]:
        """Assemble one part's arrays from its samples' outputs, in row order.

        Every row has an output (a failed sample's input is a placeholder); ``ok`` marks the
        rows that were read. The default stacks fixed-shape outputs, zeros where not ``ok``,
        in :attr:`store_dtypes` (float16 unless named). Backbones with variable-length outputs
        (``frames``) override this.
        """
        out = {}
        for name, first in samples[0].items():
            dtype = np.dtype(self.store_dtypes.get(name, "float16"))
            arr = np.zeros((len(samples), *np.shape(first)), dtype=dtype)
            for i, s in enumerate(samples):
                if ok[i]:
                    arr[i] = s[name]
            out[name] = arr
        return out

    def cache_files(self) -> dict[str, bytes]:
        """Files written into the cache when it is complete (DETR: ``heads.safetensors``)."""
        return {}

    def to(self, device: torch.device) -> Backbone:
        self.module.to(device)
        return self

    def freeze(self) -> None:
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (BatchNorm counters)
    return h.hexdigest()


register_backbone = BACKBONES.register
list_backbones = BACKBONES.names


def get_backbone(name: str, model: str | None = None, pretrained: str | None = None, *,
                 layer: str | None = None, seed: int = 0, **options) -> Backbone:
    """Build a frozen backbone by registry name (``clip``, ...), model name and weights.

    ``pretrained`` is a tag (downloaded where there is network), a local file, or ``none``
    (random initialisation with ``seed``; the default for the offline presets).  ``options`` are
    backbone-specific settings that are not None (``max_seconds`` for audio).
    """
    options = {k: v for k, v in options.items() if v is not None}
    try:
        backbone = BACKBONES.get(name)(model=model, pretrained=pretrained, layer=layer, seed=seed, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise BackboneError(f"backbone {name} does not take {', '.join('--' + k.replace('_', '-') for k in options)}") from None
        raise
    backbone.freeze()
    return backbone
