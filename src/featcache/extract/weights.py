"""Weights: the one checkpoint loader, the one ``--pretrained`` parser, local paths and run folders.

Every backbone and model that loads a checkpoint *file* (CLIP, XLS-R detector checkpoints,
DETR, timm, the MobileNetV4 filter) goes through :func:`load_checkpoint`:

- :func:`read_checkpoint` reads safetensors, or a torch file with ``torch.load(weights_only=True)``
  (tensors and plain containers only: no code runs), and unwraps the usual containers
  (``state_dict``, ``model_state_dict``, ``model``, ``module``, ``net``, ``ema``, ...);
- :func:`strip_prefixes` removes wrapper prefixes (``module.`` of DataParallel/DDP, ``_orig_mod.``
  of ``torch.compile``, ``model.`` of Lightning) when every key carries one and removing it
  matches more of the module's own names;
- :func:`load_state` loads with torch's own ``load_state_dict(strict=False)`` and returns a
  :class:`LoadReport`: missing and unexpected keys counted with their first examples, keys left
  out on purpose (a classifier a feature extractor does not use) counted apart. A shape mismatch,
  or missing/unexpected keys where the caller does not accept them, is a :class:`BackboneError`.

Hugging Face folders and hub names load with their library's own ``from_pretrained`` (sharding,
legacy key conversions), timm and open_clip *tags* with their library's download; this module
decides which of those a ``--pretrained`` value is (:func:`parse_weights`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BackboneError, first_line
from ..runtime import RunDir

#: File endings that make a ``--pretrained`` value a file even without a path separator.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: Containers a training script commonly wraps its state dict in, tried in this order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "state_dict_ema",
                  "model_ema", "ema")
#: Wrapper prefixes: DataParallel/DDP, torch.compile, Lightning (``self.model``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
#: How many key names an error or report shows.
SHOWN = 4
#: Weights files of a run folder, newest layout first (RUN/best.safetensors, then train-e2e's older name).
RUN_WEIGHTS = (RunDir.BEST, "best_model.safetensors")


# -- where the weights come from --------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """A parsed ``--pretrained``: ``kind`` is ``none`` (random init), ``file`` or ``tag``; ``value`` the
    tag or the absolute file path (``none`` for random weights)."""

    kind: str
    value: str


def looks_like_path(text: str) -> bool:
    """True for what can only be a local path: it starts with ``.``, ``~`` or a separator, or has more
    than one ``/`` (a Hugging Face id is ``org/name``), or contains the platform's separator."""
    s = str(text)
    return (s.startswith((".", "~", "/", os.path.sep)) or s.count("/") > 1
            or (os.path.sep != "/" and os.path.sep in s))


def parse_weights(pretrained: str | None, default: str) -> Weights:
    """``--pretrained`` as ``none``, a file (must exist) or a tag; ``default`` when not given."""
    value = default if pretrained in (None, "") else str(pretrained)
    if value == "none":
        return Weights("none", "none")
    if "/" in value or looks_like_path(value) or value.endswith(WEIGHT_SUFFIXES):
        path = Path(value).expanduser()
        if not path.is_file():
            what = "is a folder, not a weights file" if path.is_dir() else "does not exist"
            raise BackboneError(f"weights file {value} {what}; check the path (or pass --pretrained none for "
                                "random weights)")
        return Weights("file", str(path.resolve()))
    return Weights("tag", value)


def local_folder(name: str, what: str) -> Path | None:
    """The folder ``name`` names, resolved; None when ``name`` can only be a hub id (``org/name``).

    A name that looks like a path (:func:`looks_like_path`) but is no folder is a
    :class:`BackboneError` ("no such folder"), instead of a Hugging Face network message.
    """
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise BackboneError(f"{what} {name} is a file, not a folder; pass the folder that holds config.json")
    if looks_like_path(name):
        raise BackboneError(f"no such folder {name} (--model of {what}); check the path")
    return None


def run_weights(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """(model.json's ``spec``, the run's best weights file) of a finished run folder.

    Reads the run layout (``RUN/model.json`` and ``RUN/best.safetensors``) and train-e2e's older
    name ``best_model.safetensors``.
    """
    run = Path(run_dir)
    spec_file = RunDir(run).model
    if not spec_file.is_file():
        raise BackboneError(f"{run} is not a run folder: model.json is missing")
    try:
        info = json.loads(spec_file.read_text())
    except ValueError as exc:
        raise BackboneError(f"{spec_file} is not valid JSON ({exc})") from None
    spec = info.get("spec") if isinstance(info, dict) else None
    if not isinstance(spec, dict):
        raise BackboneError(f"{spec_file} has no model spec")
    for name in RUN_WEIGHTS:
        if (run / name).is_file():
            return spec, (run / name).resolve()
    raise BackboneError(f"{run} is not a finished run: {RUN_WEIGHTS[0]} is missing")


# -- reading and loading ------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or torch with ``weights_only=True``), unwrapped.

    A container dict (``{"state_dict": {...}, "epoch": 3}``) is opened at the first of
    :data:`CONTAINER_KEYS` that holds tensors; non-tensor entries are left out.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        how = "safetensors" if path.endswith(".safetensors") else "torch.load(weights_only=True)"
        raise BackboneError(f"cannot read checkpoint {path} with {how} ({first_line(exc)}); pass a state dict "
                            "saved as safetensors or with torch.save") from exc
    state = _unwrap(obj)
    if not state:
        raise BackboneError(f"{path} holds no tensors (is it a state dict?)")
    return state


def _tensors(obj) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, Mapping) else {}


def _unwrap(obj) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping):
            return {}
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None or len(_tensors(obj)) > len(_tensors(inner)):
            break
        obj = inner
    return _tensors(obj)


def strip_prefixes(state: Mapping[str, torch.Tensor], target_keys: Iterable[str]) -> tuple[dict, list[str]]:
    """Remove wrapper prefixes (:data:`WRAPPER_PREFIXES`, nested too: ``module._orig_mod.``) that every key
    carries, as far as that matches the most of ``target_keys`` (no more: a model whose own names
    start with ``model.`` keeps them). Returns the new state and the prefixes removed."""
    target = set(target_keys)
    candidates = [(dict(state), [])]
    while candidates[-1][0]:
        cur, removed = candidates[-1]
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in cur)), None)
        if prefix is None:
            break
        candidates.append(({k[len(prefix):]: v for k, v in cur.items()}, removed + [prefix]))
    scores = [len(target.intersection(c)) for c, _ in candidates]
    return candidates[scores.index(max(scores))]


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (" ..." if len(keys) > SHOWN else "")


@dataclass
class LoadReport:
    """What a load did: counts of tensors loaded, keys missing from the checkpoint, keys of the checkpoint
    the module has not, keys left out on purpose (``ignored``), and the wrapper prefixes removed."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the checkpoint ({_shown(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} not in the model ({_shown(self.unexpected)})")
        if self.ignored:
            parts.append(f"{len(self.ignored)} not used ({_shown(self.ignored)})")
        if self.stripped:
            parts.append("prefix " + " + ".join(repr(p) for p in self.stripped) + " removed")
        return f"{self.source}: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "missing": len(self.missing),
                "unexpected": len(self.unexpected), "ignored": len(self.ignored), "stripped": list(self.stripped),
                "examples": {"missing": self.missing[:SHOWN], "unexpected": self.unexpected[:SHOWN],
                             "ignored": self.ignored[:SHOWN]}}


def load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state dict",
               ignore: Iterable[str] = (), missing_ok: bool = False, unexpected_ok: bool = False,
               strip: bool = True) -> LoadReport:
    """Load ``state`` into ``module`` with torch's ``load_state_dict``; report what did not match.

    ``ignore``: key prefixes (e.g. a classifier's ``"head."``) dropped from the checkpoint and
    from the missing keys, counted as ``ignored``. Missing (unexpected) keys are an error unless
    ``missing_ok`` (``unexpected_ok``), in which case they are warned about; a shape mismatch is
    always an error. Nothing is loaded when there is an error.
    """
    own = module.state_dict()
    removed: list[str] = []
    if strip:
        state, removed = strip_prefixes(state, own.keys())
    prefixes = tuple(p if p.endswith(".") else p + "." for p in ignore)
    ignored_names = {p[:-1] for p in prefixes}
    is_ignored = (lambda k: k.startswith(prefixes) or k in ignored_names) if prefixes else (lambda k: False)
    ignored = sorted(k for k in state if is_ignored(k))
    state = {k: v for k, v in state.items() if not is_ignored(k)}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise BackboneError(f"{source}: {len(bad)} tensor shapes differ from the model's ({_shown(bad)}); is it a "
                            "checkpoint of this architecture?")
    missing = sorted(k for k in own if k not in state and not is_ignored(k))
    unexpected = sorted(k for k in state if k not in own)
    report = LoadReport(source=str(source), loaded=len(state) - len(unexpected), missing=missing,
                        unexpected=unexpected, ignored=ignored, stripped=removed)
    errors = ([] if missing_ok or not missing else ["missing"]) + ([] if unexpected_ok or not unexpected
                                                                   else ["unexpected"])
    if errors:
        raise BackboneError(f"{report.summary()}; is it a checkpoint of this architecture?")
    if state and report.loaded == 0:
        raise BackboneError(f"{report.summary()}: no key of the checkpoint matches the model")
    result = module.load_state_dict(state, strict=False)
    # torch's own verdict, with the ignored keys left out, is the report's
    report.missing = sorted(k for k in result.missing_keys if not is_ignored(k))
    report.unexpected = sorted(result.unexpected_keys)
    if report.missing or report.unexpected:
        warnings.warn(report.summary(), stacklevel=2)
    return report


def load_checkpoint(module: torch.nn.Module, path: str | os.PathLike, **kw) -> LoadReport:
    """:func:`read_checkpoint` then :func:`load_state` (same keyword arguments)."""
    return load_state(module, read_checkpoint(path), source=str(path), **kw)

