"""The runtime room: devices, seeds, deterministic mode and the run directory.

Everything that trains or evaluates (heads, the MobileNetV4 filter, the DETR fine-tune,
``featcache evaluate``, analysis) takes these from here; nothing above re-implements them.

Deterministic mode (:func:`set_deterministic`, ``--deterministic``; on in the tests) sets
``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic algorithms without
benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, so a resumed CUDA run repeats an
uninterrupted one bit for bit. CUDA has no deterministic kernel for a few ops; with
``warn_only=True`` torch warns instead of failing on them. Those featcache reaches are the
backward of ``index_add_``/``scatter_add_`` on floating CUDA tensors (used by
``torch.bincount`` with weights and by geomloss's Sinkhorn reductions) and
``torch.nn.functional.interpolate``'s bilinear backward (timm's MobileNetV4 hybrid models); a
run that hits one of them is reproducible to float rounding only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .errors import FeatcacheError, option, write_atomic, writing


class RunDir:
    """The one place that spells a run directory's file names (ARCHITECTURE.md, "Run directory").

    ``RunDir(path).best`` is ``path/best.safetensors``, ``.eval("test")`` is ``path/eval/test/``,
    ``.eval("test", "celebdf")`` is ``path/eval/celebdf_test/``; the class attributes are the names.
    """

    CONFIG = "config.yaml"
    MODEL = "model.json"
    LOG = "log.jsonl"
    LOG_CSV = "training_log.csv"
    BEST = "best.safetensors"
    LAST = "last.safetensors"
    RESUME = "resume.pt"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    PLOTS = "plots"
    CURVES = "training_curves.png"
    EVAL = "eval"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions.csv"
    REPORT = "report.md"
    SUBGROUPS = "subgroups.csv"
    TENSORBOARD = "tensorboard"
    TEMPERATURE = "calibration_temp.json"  # the filter's fitted temperature (featcache calibrate)
    CALIBRATION = "calibration_metrics.json"
    CALIBRATED = "calibrated_predictions.csv"
    HF_CONFIG = "config.json"  # a DETR fine-tune's Hugging Face folder (save_pretrained), what extract reads

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, other) -> Path:
        return self.path / other

    config = property(lambda self: self.path / self.CONFIG)
    model = property(lambda self: self.path / self.MODEL)
    log = property(lambda self: self.path / self.LOG)
    log_csv = property(lambda self: self.path / self.LOG_CSV)
    best = property(lambda self: self.path / self.BEST)
    last = property(lambda self: self.path / self.LAST)
    resume = property(lambda self: self.path / self.RESUME)
    summary = property(lambda self: self.path / self.SUMMARY)
    plots = property(lambda self: self.path / self.PLOTS)
    curves = property(lambda self: self.path / self.PLOTS / self.CURVES)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    temperature = property(lambda self: self.path / self.TEMPERATURE)
    calibration = property(lambda self: self.path / self.CALIBRATION)
    calibrated = property(lambda self: self.path / self.CALIBRATED)
    hf_config = property(lambda self: self.path / self.HF_CONFIG)

    def weights(self, which: str = "best") -> Path:
        """``best`` or ``last`` weights (safetensors)."""
        return self.path / f"{which}.safetensors"

    def checkpoint(self, epoch: int) -> Path:
        return self.path / self.CHECKPOINTS / f"epoch_{epoch:04d}.safetensors"

    def eval(self, split: str, name: str | None = None) -> Path:
        """``RUN/eval/<name>_<split>/`` (or ``RUN/eval/<split>/``); not created."""
        return self.path / self.EVAL / (f"{name}_{split}" if name else split)

    def evaluations(self) -> list[str]:
        """The evaluation folders that hold a metrics.json, by name."""
        root = self.path / self.EVAL
        return sorted(d.name for d in root.iterdir() if (d / self.METRICS).is_file()) if root.is_dir() else []


#: Files that mark a folder as a run directory (any layout featcache ever wrote).
RUN_MARKERS = (RunDir.CONFIG, RunDir.LOG, RunDir.SUMMARY, RunDir.MODEL)


# -- devices, seeds, determinism ------------------------------------------------------------------
def resolve_device(device: str | None, *, what: str = "--device") -> torch.device:
    """``None``/``auto`` -> CUDA when present, else the CPU; otherwise the named torch device.

    ``what`` names the option or config key the value came from, for the error message.
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"{what} {device!r} is not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"{what}={device} asks for CUDA, but torch sees no CUDA device; use cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool = True) -> None:
    """Deterministic kernels on (or off); see the module docstring for the ops CUDA cannot repeat."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def rng_state() -> dict[str, torch.Tensor]:
    """The global generators' states as tensors (readable with ``torch.load(weights_only=True)``)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
             "python": torch.from_numpy(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_state = json.loads(bytes(state["numpy"].cpu().numpy()).decode())
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = json.loads(bytes(state["python"].cpu().numpy()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"].cpu()))


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _py_state():
    s = random.getstate()
    return [s[0], list(s[1]), s[2]]


# -- JSON ----------------------------------------------------------------------------------------
def json_default(o):
    """JSON for NumPy scalars and arrays, tensors and paths (the one ``default=`` of featcache)."""
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if torch.is_tensor(o):
        return o.detach().cpu().tolist()
    return str(o)


def to_json(obj, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=json_default, allow_nan=True)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON, atomically (a kill never leaves half a file)."""
    write_atomic(path, to_json(obj))



def read_json(path: Path):
    """A JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())

# -- the run directory -----------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def prepare_run_dir(out: Path, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Make ``out`` an empty run directory (``plots/`` inside); replace a run only with ``overwrite``.

    ``keep``: names left in place when the run is replaced (the writer's lock file: removing it
    would let a second writer in)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"{out} exists and is not a directory")
    children = [c for c in out.iterdir() if c.name not in keep] if out.is_dir() else []
    if children:
        if not is_run_dir(out):
            raise FeatcacheError(f"{out} is not empty and is not a run directory; choose a new {option('out', python='out')}")
        if not overwrite:
            raise FeatcacheError(f"{out} already holds a run; pass {option('overwrite')} to replace it, "
                                 f"or choose a new {option('out', python='out')}")
        for child in children:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)  # plots/ is made by what draws (none with logging.plots: false)


def save_module(module: torch.nn.Module | dict, path: Path) -> None:
    """A module's (or a state dict's) tensors in safetensors, written atomically."""
    sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    with writing(path, need=sum(t.nbytes for t in tensors.values()), partial=[tmp]):  # a full disk: one line
        save_file(tensors, str(tmp))
        os.replace(tmp, path)


def load_weights(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"{path} does not exist")
    return load_file(str(path), device=str(device))


def _compact(obj):
    """``obj`` with every tensor that views a larger storage copied out: ``torch.save`` writes a
    view's whole storage, so one run's slice [r:r+1] of R stacked runs would be written as all R."""
    if torch.is_tensor(obj):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.nbytes else obj
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


def save_state(state: dict, path: Path) -> None:
    """Optimizer/scheduler/RNG state (tensors and numbers only), written atomically; a tensor that
    views part of a larger one is written as its own bytes only."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = _compact(state)
    with writing(path, need=_nbytes(state), partial=[tmp]):
        torch.save(state, tmp)
        os.replace(tmp, path)


def _nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists): what :func:`save_state` writes, about."""
    if torch.is_tensor(obj):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 16


def load_state(path: Path, device="cpu") -> dict:
    """Read :func:`save_state`'s file with ``torch.load(weights_only=True)``."""
    return torch.load(Path(path), map_location=device, weights_only=True)


def write_eval(out: Path, metrics: dict, predictions: pd.DataFrame, report_md: str) -> None:
    """One evaluation's files: predictions.csv, metrics.json, report.md (plots are the caller's)."""
    write_atomic(out / RunDir.PREDICTIONS, predictions.to_csv(index=False))
    write_json(out / RunDir.METRICS, metrics)
    write_atomic(out / RunDir.REPORT, report_md)
