"""The XLS-R speech encoder, frozen: frame embeddings every 20 ms (``kind = frames``).

``transformers.Wav2Vec2Model`` with the XLS-R 300M architecture (``facebook/wav2vec2-xls-r-300m``)
by default.  ``--model`` takes a Hugging Face id or a local Hugging Face folder, or the offline
preset ``tiny`` (a small config of the same architecture, randomly initialised with a seed).
``--pretrained`` takes ``none`` (random weights), or a detector checkpoint of SSL_Anti-spoofing or
XLSR-Conformer-TCM whose SSL front end is stored under fairseq parameter names below an
``ssl_model`` prefix; those are mapped onto the transformers model (:func:`map_fairseq_state`) and
the keys that did not match are reported.

``--layer``: ``final`` (default) is ``last_hidden_state``: in the stable-layer-norm variant that
XLS-R uses this is the output of the encoder's last LayerNorm, applied after the last layer, which
is what fairseq's ``extract_features`` (features_only) gives the detectors.  An integer ``i``
selects ``hidden_states[i]`` of transformers (0: the input of the first layer, i: the output of
layer i, before that final LayerNorm).
"""

from __future__ import annotations

import json
import re
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.audio import FRAME_WINDOW, SAMPLE_RATE, frame_labels, parse_segments, read_audio
from ..errors import BackboneError, first_line
from .registry import Backbone, register_backbone
from .weights import load_state, local_folder, parse_weights, read_checkpoint

DEFAULT_MODEL = "facebook/wav2vec2-xls-r-300m"
#: Architecture of facebook/wav2vec2-xls-r-300m (so that a detector checkpoint loads offline).
XLSR_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 hidden_act="gelu", conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                 conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True, feat_extract_norm="layer",
                 do_stable_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                 layer_norm_eps=1e-5, feat_proj_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
PRESETS = {
    # 128 conv channels: with 32, random conv features keep too little of the spectrum to tell
    # a resynthesised frame from a natural one (frame-level logistic-regression AUROC 0.66 vs 0.79)
    "tiny": dict(XLSR_300M, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 conv_dim=(128,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
}
#: fairseq parameters used only in pre-training (quantizer, targets): ignored, and said so.
PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat", "target_glu.")


def _config(values: dict):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**values)


@register_backbone("xlsr")
class XlsrBackbone(Backbone):
    kind = "frames"
    default_model = DEFAULT_MODEL
    default_pretrained = "hf"
    presets = tuple(PRESETS)

    def __init__(self, model: str | None = None, pretrained: str | None = None, layer: str | None = None,
                 seed: int = 0, max_seconds: float | None = None):
        from transformers import Wav2Vec2Model

        self.model_name = model or self.default_model
        self.max_seconds = float(max_seconds) if max_seconds else None
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise BackboneError(f"--max-seconds must be positive, got {max_seconds}")
        is_preset = self.model_name in PRESETS
        folder = None if is_preset else local_folder(self.model_name, "xlsr")  # a mistyped path: "no such folder"
        local = folder is not None
        if pretrained is None:
            pretrained = "none" if is_preset else "hf"
        self.load_report: dict = {}
        self.normalize = True  # the XLS-R feature extractor's do_normalize
        torch.manual_seed(seed)
        if pretrained == "hf":
            if is_preset:
                raise BackboneError(f"--model {self.model_name} is an offline preset with random weights; "
                                    "use --pretrained none or a checkpoint file")
            try:
                module = Wav2Vec2Model.from_pretrained(str(folder) if local else self.model_name,
                                                       local_files_only=local)
            except Exception as exc:  # network, missing files
                raise BackboneError(
                    f"cannot load {self.model_name} with transformers ({first_line(exc)}); without network, "
                    "download it elsewhere and pass the folder with --model PATH, or pass a detector "
                    "checkpoint with --pretrained FILE, or --model tiny for an offline random model") from exc
            self.pretrained = str(folder) if local else "hf"
            self.normalize = _do_normalize(str(folder)) if local else True
        else:
            config = self._architecture(is_preset, str(folder) if local else self.model_name)
            module = Wav2Vec2Model(config)
            weights = parse_weights(pretrained, "none")
            if weights.kind == "tag":
                raise BackboneError(f"--pretrained {pretrained!r} is neither hf, none nor a checkpoint file (pass a "
                                    "detector checkpoint, hf for the Hugging Face weights, or none for random weights)")
            if weights.kind == "file":
                self.load_report = load_fairseq_checkpoint(module, weights.value)
                self.normalize = False  # the detectors feed the raw waveform
            self.pretrained = weights.value
        self.module = module
        cfg = module.config
        self.dim = int(cfg.hidden_size)
        self.n_layers = int(cfg.num_hidden_layers)
        self._layer = self._parse_layer(layer)

    def _architecture(self, is_preset: bool, source: str):
        if is_preset:
            return _config(PRESETS[self.model_name])
        if self.model_name == DEFAULT_MODEL:
            return _config(XLSR_300M)
        try:
            from transformers import Wav2Vec2Config

            return Wav2Vec2Config.from_pretrained(source)
        except Exception as exc:
            raise BackboneError(f"cannot read the config of {self.model_name} ({first_line(exc)}); pass a local "
                                f"Hugging Face folder, {DEFAULT_MODEL}, or tiny") from exc

    def _parse_layer(self, layer) -> str:
        if layer in (None, "", "final"):
            return "final"
        try:
            i = int(layer)
        except (TypeError, ValueError):
            raise BackboneError(f"--layer must be final or a hidden-state index 0..{self.n_layers}, got {layer!r}") from None
        if not 0 <= i <= self.n_layers:
            raise BackboneError(f"--layer {i} is out of range: this model has hidden states 0..{self.n_layers}")
        return str(i)

    # -- what the cache records ----------------------------------------------------------
    def layer(self) -> str:
        return self._layer

    def preprocess_spec(self) -> dict:
        return {"sample_rate": SAMPLE_RATE, "mono": "mean", "resampler": "scipy.signal.resample_poly",
                "max_seconds": self.max_seconds, "normalize": "utterance" if self.normalize else "none",
                "frame_hop": 320, "frame_window": FRAME_WINDOW, "frame_label": "centre in a segment"}

    # -- running ---------------------------------------------------------------------------
    def dataset(self, paths, meta=None):
        if meta is not None and "segments" in meta:  # a malformed interval stops the run before it starts
            for sid, seg in zip(meta["sample_id"], meta["segments"]):
                parse_segments(seg, f"segments of {sid}")
        return AudioFiles(paths, meta, max_seconds=self.max_seconds, normalize=self.normalize)

    def collate(self, batch):
        return collate_audio(batch)

    def batch_sampler(self, parts, rows, part_rows, batch_size, dataset):
        """Batches of utterances of similar length within each part (less padding, no batch across parts)."""
        return LengthBuckets(parts, rows, part_rows, batch_size, dataset.length)

    @torch.inference_mode()
    def forward(self, inputs, device: torch.device) -> dict[str, list[np.ndarray]]:
        return self.frames(inputs, device)

    @torch.inference_mode()
    def forward_async(self, inputs, device: torch.device):
        """Padded hidden states on ``device``, not waited for; ``finish`` cuts them per utterance."""
        waves, mask, lengths, segs = inputs
        x = waves.to(device, non_blocking=True)
        want_hidden = self._layer != "final"
        out = self.module(x, attention_mask=mask.to(device, non_blocking=True), output_hidden_states=want_hidden)
        h = out.last_hidden_state if not want_hidden else out.hidden_states[int(self._layer)]
        counts = self.module._get_feat_extract_output_lengths(lengths).tolist()  # lengths live on the CPU
        return {"frames": h.float() if h.dtype == torch.bfloat16 else h}, (counts, segs)

    def finish(self, arrays: dict[str, np.ndarray], context) -> dict[str, list[np.ndarray]]:
        counts, segs = context
        h = arrays["frames"]
        frames = [h[i, :int(t)] for i, t in enumerate(counts)]
        labels = [frame_labels(int(t), s, lab) for t, (s, lab) in zip(counts, segs)]
        return {"frames": frames, "frame_labels": labels}

    def frames(self, inputs, device: torch.device) -> dict[str, list[np.ndarray]]:
        out, ctx = self.forward_async(inputs, device)
        return self.finish({k: v.float().cpu().numpy() for k, v in out.items()}, ctx)

    store_dtypes = {"frames": "float16", "frame_labels": "int8"}

    def pack(self, samples, ok):
        """Flat frames of the part's readable samples, in row order, and their offsets."""
        frames, labels, counts = [], [], []
        for s, good in zip(samples, ok):
            t = len(s["frames"]) if good else 0
            counts.append(t)
            if t:
                frames.append(s["frames"])
                labels.append(s["frame_labels"])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return {
            "frames": (np.concatenate(frames) if frames else np.zeros((0, self.dim))).astype(np.float16),
            "offsets": offsets,
            "frame_labels": (np.concatenate(labels) if labels else np.zeros(0)).astype(np.int8),
        }


class AudioFiles(torch.utils.data.Dataset):
    """``(row, (wave, segments, label), error)`` per manifest row; a placeholder wave where unreadable."""

    def __init__(self, paths, meta: pd.DataFrame | None, max_seconds=None, normalize=True):
        self.paths = list(paths)
        n = len(self.paths)
        self.segments = meta["segments"].tolist() if meta is not None and "segments" in meta else [""] * n
        self.labels = [int(v) for v in meta["label"]] if meta is not None and "label" in meta else [-1] * n
        self.max_seconds = max_seconds
        self.normalize = normalize

    def __len__(self):
        return len(self.paths)

    def length(self, i: int) -> int:
        """Samples at 16 kHz after resampling and the cut, from the file's header (0 if unreadable)."""
        import soundfile as sf

        try:
            info = sf.info(self.paths[i])
            n = int(info.frames * SAMPLE_RATE // max(1, int(info.samplerate)))
        except Exception:
            return 0
        return min(n, int(round(self.max_seconds * SAMPLE_RATE))) if self.max_seconds else n

    def __getitem__(self, i):
        try:
            x = read_audio(self.paths[i], SAMPLE_RATE, self.max_seconds)
            if len(x) < FRAME_WINDOW:
                raise ValueError(f"only {len(x)} samples at 16 kHz; at least {FRAME_WINDOW} (25 ms) are needed")
            if not np.isfinite(x).all():
                raise ValueError("the audio holds NaN or Inf")
            if self.normalize:
                x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
            err = ""
        except Exception as exc:  # unreadable file: recorded, the run goes on
            x, err = np.zeros(FRAME_WINDOW, dtype=np.float32), f"{type(exc).__name__}: {exc}".strip()
        return i, (x.astype(np.float32), self.segments[i], self.labels[i]), err


class LengthBuckets:
    """Batch sampler: each part's rows sorted by length, then cut into batches.

    Batches never span parts and the order within a part depends only on its files, so a
    resumed part is computed from the same batches as an uninterrupted one. Lengths come from
    the files' headers (``length(row)``), read as each part's batches are made.
    """

    def __init__(self, parts, rows: int, part_rows: int, batch_size: int, length):
        self.bounds = [(p * part_rows, min((p + 1) * part_rows, rows)) for p in parts]
        self.batch_size = batch_size
        self.length = length

    def __iter__(self):
        for start, stop in self.bounds:
            order = sorted(range(start, stop), key=lambda r: (self.length(r), r))
            for s in range(0, len(order), self.batch_size):
                yield order[s:s + self.batch_size]

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.bounds)


def collate_audio(batch):
    """Zero-padded waves, the attention mask, the lengths, and (segments, label) per sample."""
    rows = np.array([b[0] for b in batch], dtype=np.int64)
    lengths = torch.tensor([len(b[1][0]) for b in batch], dtype=torch.long)
    waves = torch.zeros(len(batch), int(lengths.max()))
    mask = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
    for i, b in enumerate(batch):
        waves[i, :len(b[1][0])] = torch.from_numpy(b[1][0])
        mask[i, :len(b[1][0])] = 1
    return rows, (waves, mask, lengths, [(b[1][1], b[1][2]) for b in batch]), [b[2] for b in batch]


# -- fairseq checkpoints ----------------------------------------------------------------------
#: fairseq -> transformers parameter names: a table, kept as data (package data beside this module)
_RULES = [(re.compile(a + "$"), b) for a, b in json.loads(
    (resources.files("featcache") / "extract" / "fairseq_wav2vec2_names.json").read_text())["rules"]]


def _ssl_state(obj, source: str) -> dict[str, torch.Tensor]:
    """The SSL front end's fairseq parameters of a detector checkpoint, prefix removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise BackboneError(f"{source} does not hold a state dict")
    out = {}
    for name, value in obj.items():
        if "ssl_model." not in name or not torch.is_tensor(value):
            continue
        rest = name.split("ssl_model.", 1)[1]
        out[rest[len("model."):] if rest.startswith("model.") else rest] = value
    if not out:
        raise BackboneError(f"{source} has no parameters under an ssl_model prefix; pass a checkpoint of "
                            "SSL_Anti-spoofing or XLSR-Conformer-TCM (or a Hugging Face folder with --model)")
    return out


def map_fairseq_state(fairseq: dict[str, torch.Tensor], target_keys) -> tuple[dict, list[str], list[str]]:
    """fairseq wav2vec2 names -> transformers Wav2Vec2Model names.

    Returns (mapped state, fairseq keys that matched no rule, fairseq keys used only in pre-training).
    """
    target_keys = set(target_keys)
    pos = ("encoder.pos_conv_embed.conv.parametrizations.weight.original0",
           "encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    if pos[0] not in target_keys:
        pos = ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v")
    mapped, unmatched, pretraining = {}, [], []
    for name, value in fairseq.items():
        for pattern, repl in _RULES:
            if pattern.match(name):
                new = pos[0] if repl == "POS_G" else pos[1] if repl == "POS_V" else pattern.sub(repl, name)
                mapped[new] = value
                break
        else:
            (pretraining if name.startswith(PRETRAINING_ONLY) else unmatched).append(name)
    return mapped, unmatched, pretraining


def load_fairseq_checkpoint(module: torch.nn.Module, path: str) -> dict:
    """Load a detector checkpoint's ``ssl_model`` weights into ``module``; return what matched.

    Read by the one loader (:func:`.weights.read_checkpoint`: safetensors or
    ``torch.load(weights_only=True)``), mapped from fairseq names, loaded with
    :func:`.weights.load_state`: every parameter of the transformers model must be found with
    the right shape (else :class:`BackboneError`, which says to pass the matching ``--model``);
    checkpoint keys that match no parameter are reported (a warning, and in the returned report).
    """
    own = module.state_dict()
    mapped, unmatched, pretraining = map_fairseq_state(_ssl_state(read_checkpoint(path), path), own.keys())
    unmatched += sorted(k for k in mapped if k not in own)
    mapped = {k: v for k, v in mapped.items() if k in own}
    try:
        loaded = load_state(module, mapped, source=path, strip=False)
    except BackboneError as exc:
        raise BackboneError(f"{exc} (pass the --model the detector was trained with)") from None
    report = {"matched": loaded.loaded, "unmatched": sorted(unmatched), "pretraining_only": sorted(pretraining)}
    if unmatched:
        warnings.warn(f"{path}: {len(unmatched)} ssl_model keys matched no parameter and were ignored: "
                      f"{', '.join(sorted(unmatched)[:6])}", stacklevel=2)
    return report


def _do_normalize(folder: str) -> bool:
    f = Path(folder) / "preprocessor_config.json"
    try:
        return bool(json.loads(f.read_text()).get("do_normalize", True))
    except (OSError, ValueError):
        return True
