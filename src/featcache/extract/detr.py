"""DETR, frozen: decoder queries, their class logits and boxes, and the ground truth (``kind = queries``).

``--model`` is a Hugging Face name (default ``facebook/detr-resnet-50``, downloaded where there
is network), a local folder holding ``config.json`` and weights (e.g. one written by
:func:`featcache.e2e.detr_finetune.finetune_detr`), or an offline preset, randomly initialised with
``--seed`` the way the original DETR initialises (:func:`detr_init`); nothing is downloaded:

- ``tiny``: a small DETR (d_model 64, one encoder and two decoder layers, 20 queries, COCO's 91
  label ids) on a small ResNet built from its config (``use_pretrained_backbone=False``), 128 px;
- ``tiny-det``: the same transformer with **2 queries** on a two-stage ResNet (16, 32 channels;
  an 8 x 8 feature map) at 64 px, no-object weight 0.5: the detector the demo fits to the
  synthetic people in well under a minute on one CPU thread (:func:`tiny_det_config` says why).

``--pretrained none`` gives any
``--model``'s architecture random weights; ``--pretrained FILE`` loads a state dict of that
architecture (e.g. a fine-tune's ``best.safetensors``) with the one loader (:mod:`.weights`). A
``--model`` that looks like a path but is no folder is an error ("no such folder"), not a
Hugging Face lookup.

The images and their COCO ground truth come from :class:`featcache.data.detection_images.DetectionImages`
(pycocotools' ``COCO`` index, torchvision's ``box_convert``).

Per image the cache holds (DESIGN.md, cache kind ``queries``)::

    hidden (n, Q, d) float16        the decoder's last hidden state
    logits (n, Q, C+1) float32      the frozen class head on the stored (fp16) hidden state
    boxes (n, Q, 4) float32         the frozen box head (sigmoid; cx, cy, w, h relative to the image)
    image_size (n, 2) int64         original height, width
    offsets (n+1,) int64, gt_boxes (G, 4) float32, gt_classes (G,) int64
                                     ground truth per image (relative cx, cy, w, h; COCO category ids)

and ``heads.safetensors`` the frozen ``class_labels_classifier`` and ``bbox_predictor``.
``logits`` and ``boxes`` are computed by :func:`score_queries` from the hidden state *as
stored* (rounded to fp16), in float64, then rounded to float32: re-scoring the cached hidden
states with the saved heads reproduces them exactly, whatever the batch, which a head that
perturbs the hidden state relies on for its unperturbed baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.detection_images import DetectionImages
from ..errors import BackboneError, FeatcacheError
from .registry import Backbone, register_backbone
from .weights import load_checkpoint, local_folder, parse_weights

PRESETS = ("tiny", "tiny-det")
TINY_SIZE = 128
TINY_DET_SIZE = 64
HEAD_PREFIXES = ("class_labels_classifier.", "bbox_predictor.")


def tiny_config():
    """The offline preset's configuration (no download, no timm)."""
    from transformers import DetrConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage3"])
    return DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, backbone=None,
                      d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=20,
                      num_labels=91, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def tiny_det_config():
    """The ``tiny-det`` preset: ``tiny``'s transformer with 2 queries on a two-stage ResNet at 64 px.

    Measured on the synthetic people (one person per image, ``synth detection --others 0``; one
    thread, load 6-7; README "Detection fairness"): Hungarian matching among many queries is what
    keeps a small DETR from localising within a CPU budget. With 8 queries every backbone tried
    (ResNet 16-32 or deeper, a ViT with absolute positions) stalled at the mean-box plateau (test
    person AP 0.02-0.03 after 25 epochs); with 4 or 3 queries 0.02-0.16; with 2 queries (the person
    and one no-object slot) test AP 0.40 after 20 epochs of 180 images, 54 s.
    """
    from transformers import DetrConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    return DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, backbone=None,
                      d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=2,
                      num_labels=91, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, eos_coefficient=0.5)


def detr_init(net) -> None:
    """The original DETR's initialisation of a random model (from the global torch seed).

    transformers initialises every Linear and Embedding with N(0, 0.02), which suits loading
    weights but not training from scratch: the object queries come out nearly identical, the
    attention nearly uniform, and the 20 queries predict the same box for hundreds of steps
    (measured: box spread across queries 1e-8 at the start, 1e-5 after 135 steps). DETR's own
    recipe (nn.Embedding's N(0, 1) query embeddings, Xavier-uniform transformer and head
    weights) lets a small DETR fit the synthetic set within minutes on a CPU.
    """
    torch.nn.init.normal_(net.model.query_position_embeddings.weight)
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("model.encoder", "model.decoder",
                                                                "class_labels_classifier", "bbox_predictor")):
            torch.nn.init.xavier_uniform_(m.weight)


def tiny_processor(size: int = TINY_SIZE):
    from transformers import DetrImageProcessor

    return DetrImageProcessor(size={"height": size, "width": size}, do_pad=True)


def preset(name: str):
    """(config, processor) of an offline preset."""
    if name == "tiny-det":
        return tiny_det_config(), tiny_processor(TINY_DET_SIZE)
    return tiny_config(), tiny_processor()


def load_detr(model: str | None, *, seed: int = 0, pretrained: str | None = None):
    """(DetrForObjectDetection, image processor, weights) for a name, a folder or a preset (``tiny``, ``tiny-det``).

    ``pretrained``: ``None``/``hf``/``local`` take the weights of ``model`` (random for a preset);
    ``none`` builds ``model``'s architecture with random weights (DETR's own initialisation, from
    ``seed``); a file is a state dict of that architecture, read by the one loader. The third
    value is what the cache records: ``none``, ``local``, ``hf`` or the file's absolute path.
    """
    name = model or DetrBackbone.default_model
    if pretrained not in (None, "hf", "local") and parse_weights(pretrained, "none").kind == "tag":
        raise BackboneError("detr takes its weights from --model (a Hugging Face name or a local folder); "
                            f"--pretrained takes none or a weights file, not {pretrained!r}")
    weights = parse_weights(None if pretrained in ("hf", "local") else pretrained, "none" if name in PRESETS else "hf")
    folder = None if name in PRESETS else local_folder(name, "detr")  # a mistyped path: "no such folder"
    source = str(folder) if folder is not None else name
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    try:
        if name in PRESETS:
            config, processor = preset(name)
        else:
            # every weight, the backbone's included, is in the checkpoint: no separate timm download
            config = DetrConfig.from_pretrained(source, local_files_only=folder is not None)
            config.use_pretrained_backbone = False
            processor = DetrImageProcessor.from_pretrained(source, local_files_only=folder is not None)
        if weights.kind == "tag":
            net = DetrForObjectDetection.from_pretrained(source, config=config, local_files_only=folder is not None)
    except Exception as exc:  # network, missing files, timm backbone not installed ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BackboneError(
            f"cannot load DETR {name!r} ({first}); without network, download it elsewhere and pass the local "
            "folder with --model PATH, or use --model tiny (random weights, offline)"
        ) from exc
    if weights.kind != "tag":
        torch.manual_seed(seed)
        net = DetrForObjectDetection(config)
        detr_init(net)
        if weights.kind == "file":
            load_checkpoint(net, weights.value)
    tag = weights.value if weights.kind != "tag" else "local" if folder is not None else "hf"
    return net.eval(), processor, tag


@torch.no_grad()
def score_queries(hidden, class_head: torch.nn.Module, box_head: torch.nn.Module):
    """Logits and boxes (float32 numpy) of hidden states (..., d), in float64 then rounded.

    Float64 makes the result independent of how the matrix products are blocked, so the
    same stored hidden states give bit-identical outputs in any batch shape.
    """
    h = torch.as_tensor(np.asarray(hidden, dtype=np.float64))
    cls = _double(class_head)
    box = _double(box_head)
    logits = cls(h).to(torch.float32).numpy()
    boxes = box(h).sigmoid().to(torch.float32).numpy()
    return logits, boxes


def _double(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to("cpu", torch.float64).eval()


def heads_state(net) -> dict[str, torch.Tensor]:
    """The frozen class and box heads' weights, named as in DetrForObjectDetection."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items() if k.startswith(HEAD_PREFIXES)}


def build_heads(state: dict[str, torch.Tensor]):
    """(class head, box head) modules from ``heads.safetensors``' tensors, in eval mode, frozen."""
    from transformers.models.detr.modeling_detr import DetrMLPPredictionHead

    w = state["class_labels_classifier.weight"]
    cls = torch.nn.Linear(w.shape[1], w.shape[0])
    n_layers = len({k.split(".")[2] for k in state if k.startswith("bbox_predictor.layers.")})
    d = state["bbox_predictor.layers.0.weight"].shape[1]
    hid = state["bbox_predictor.layers.0.weight"].shape[0]
    box = DetrMLPPredictionHead(input_dim=d, hidden_dim=hid, output_dim=4, num_layers=n_layers)
    cls.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("class_labels_classifier.")})
    box.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("bbox_predictor.")})
    for m in (cls, box):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return cls, box


@register_backbone("detr")
class DetrBackbone(Backbone):
    kind = "queries"
    default_model = "facebook/detr-resnet-50"
    default_pretrained = "hf"
    presets = PRESETS
    store_dtypes = {"hidden": "float16", "logits": "float32", "boxes": "float32", "image_size": "int64"}

    def __init__(self, model: str | None = None, pretrained: str | None = None, layer: str | None = None,
                 seed: int = 0):
        if layer not in (None, "final"):
            raise BackboneError(f"detr caches the decoder's last hidden state (--layer final); --layer {layer!r} "
                                "is not supported by this version")
        self.net, self.processor, self.pretrained = load_detr(model, seed=seed, pretrained=pretrained)
        folder = None if not model or model in PRESETS else local_folder(model, "detr")
        self.model_name = str(folder) if folder is not None else (model or self.default_model)
        self.module = self.net
        self.class_head, self.box_head = build_heads(heads_state(self.net))

    def preprocess_spec(self) -> dict:
        p = self.processor
        return {"size": dict(p.size), "mean": list(p.image_mean), "std": list(p.image_std),
                "pad": bool(getattr(p, "do_pad", True)), "processor": type(p).__name__}

    def dataset(self, paths, meta=None):
        return DetectionImages(paths, meta)

    def collate(self, batch):
        rows = np.array([b[0] for b in batch], dtype=np.int64)
        errors = [b[2] for b in batch]
        enc = self.processor(images=[b[1][0] for b in batch], return_tensors="pt")
        extra = [b[1][1:] for b in batch]
        return rows, (enc["pixel_values"], enc.get("pixel_mask"), extra), errors

    @torch.inference_mode()
    def forward(self, inputs, device: torch.device):
        pixels, mask, extra = inputs
        out = self.net(pixel_values=pixels.to(device), pixel_mask=None if mask is None else mask.to(device))
        hidden16 = out.last_hidden_state.float().cpu().numpy().astype(np.float16)
        logits, boxes = score_queries(hidden16, self.class_head, self.box_head)
        return {"hidden": hidden16, "logits": logits, "boxes": boxes,
                "image_size": np.stack([e[0] for e in extra]),
                "gt_boxes": [e[1] for e in extra], "gt_classes": [e[2] for e in extra]}

    def pack(self, samples, ok):
        gt = {k: [s.pop(k) if ok[i] else None for i, s in enumerate(samples)] for k in ("gt_boxes", "gt_classes")}
        out = super().pack(samples, ok)
        counts = [0 if b is None else len(b) for b in gt["gt_boxes"]]
        out["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out["gt_boxes"] = np.concatenate([b for b in gt["gt_boxes"] if b is not None] + [np.zeros((0, 4))]).astype(np.float32)
        out["gt_classes"] = np.concatenate([c for c in gt["gt_classes"] if c is not None] + [np.zeros(0)]).astype(np.int64)
        return out

    def cache_files(self) -> dict[str, bytes]:
        from safetensors.torch import save

        return {"heads.safetensors": save(heads_state(self.net), metadata={"config": json.dumps(self.head_config())})}

    def head_config(self) -> dict:
        cfg = self.net.config
        return {"d_model": int(cfg.d_model), "num_queries": int(cfg.num_queries), "num_labels": int(cfg.num_labels)}


def read_heads(cache_path) -> dict[str, torch.Tensor]:
    """The weights of DETR's frozen class and box heads saved with a ``queries`` cache."""
    from safetensors.torch import load_file

    f = Path(cache_path) / "heads.safetensors"
    if not f.is_file():
        raise FeatcacheError(f"{cache_path} has no heads.safetensors (DETR's frozen heads); "
                             "re-extract it with --backbone detr")
    return load_file(str(f))


def padded_ground_truth(cache) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ground truth of a ``queries`` cache, padded: boxes (n, G, 4) float32 (relative cx, cy,
    w, h) and classes (n, G) int64 with -1 where there is no box; G = the most boxes of a row (at least 1).

    One pass over the parts reads ``offsets``, ``gt_boxes`` and ``gt_classes`` together: a task reads
    its ground truth once for all splits, and cuts the splits from these arrays.
    """
    parts = [cache.read_part(i, ["offsets", "gt_boxes", "gt_classes"]) for i in range(cache.n_parts)]
    counts = np.concatenate([np.diff(p["offsets"]) for p in parts]) if parts else np.zeros(0, np.int64)
    g = max(1, int(counts.max(initial=0)))
    boxes = np.zeros((len(counts), g, 4), np.float32)
    classes = np.full((len(counts), g), -1, np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    boxes[rows, slots] = np.concatenate([p["gt_boxes"] for p in parts]) if parts else np.zeros((0, 4))
    classes[rows, slots] = np.concatenate([p["gt_classes"] for p in parts]) if parts else np.zeros(0)
    return boxes, classes
