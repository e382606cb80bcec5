"""Shared test set-up: everything offline, small and deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featcache.runtime import set_deterministic

# Deterministic kernels in every test (what `featcache --deterministic` does): a resumed run must
# repeat an uninterrupted one bit for bit on CUDA too, and a test's numbers must not vary by run.
set_deterministic(True)
os.environ.setdefault("FEATCACHE_DETERMINISTIC", "1")  # for the CLI subprocesses the tests start

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the two cores: one thread each
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses too
    torch.set_num_threads(1)


def write_image_manifest(root: Path, n: int, *, corrupt=(), truncated=(), seed: int = 0) -> Path:
    """n small PNGs with a manifest; rows in ``corrupt`` hold garbage, in ``truncated`` half a PNG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rel = f"img/{i:04d}.png"
        p = root / rel
        p.parent.mkdir(exist_ok=True)
        base = rng.integers(0, 255, size=3)
        pix = np.clip(base + rng.normal(0, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pix).save(p)
        if i in corrupt:
            p.write_bytes(b"this is not a png")
        if i in truncated:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        rows.append({"sample_id": f"s{i:04d}", "path": rel, "label": i % 2,
                     "split": ("train", "train", "val", "test")[i % 4],
                     "gender": ("male", "female")[i % 2], "race": ("asian", "white", "black", "other")[i % 4]})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def array_hashes(cache_path) -> dict[str, str]:
    """sha256 of every array of every part and of the meta arrays, by name."""
    from featcache.cache import open_cache

    cache = open_cache(cache_path)
    out = {}
    for i in range(cache.n_parts):
        for name, arr in cache.read_part(i).items():
            out[f"{i}/{name}"] = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    for col, values in cache.meta().items():
        out[f"meta/{col}"] = hashlib.sha256("\x00".join(map(str, values)).encode()).hexdigest()
    return out


def ragged(cache_path, name: str) -> list[np.ndarray]:
    """A flat array of a cache (``gt_boxes``, ``frames``, ...) cut per row by each part's
    ``offsets``, read with zarr directly: the tests' reference, independent of featcache's reader."""
    import zarr

    out = []
    for part in sorted(p for p in (Path(cache_path) / "parts").iterdir() if p.name.isdigit()):
        off = zarr.open_array(str(part / "offsets"), mode="r")[...]
        flat = zarr.open_array(str(part / name), mode="r")[...]
        out.extend(flat[off[j]:off[j + 1]] for j in range(len(off) - 1))
    return out


def run_cli(*args, check=True, subprocess_=False, env=None, **kw) -> subprocess.CompletedProcess:
    """Run ``featcache ARGS`` through the CLI's own entry point (``featcache.cli.main``): its parsing,
    its ``error: ...`` line and its exit status. In this process by default (no second interpreter
    importing torch: seconds saved per call); ``subprocess_=True`` starts ``python -m featcache`` as a
    user would, for the tests of the real entry point."""
    args = [str(a) for a in args]
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True,
                              env=env, **kw)
    else:
        if kw:
            raise TypeError(f"run_cli in this process takes no {sorted(kw)}; pass subprocess_=True")
        from click.testing import CliRunner

        from featcache.cli import main

        with CliRunner().isolation(env=None if env is None else dict(env)) as (out, err, _):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        proc = subprocess.CompletedProcess(["featcache", *args], code, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"featcache {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """A 40-image manifest with one garbage file and one truncated PNG."""
    return write_image_manifest(tmp_path_factory.mktemp("images"), 40, corrupt={5}, truncated={22})


# -- the synthetic faces and the runs trained on them, built once per session ------------------------
# No per-run PNGs where a test reads none (logging.plots=false: about a fifth of the suite's time was
# matplotlib drawing figures no test looked at); the session's runs (FAST) and the plots' tests keep them.
NO_PLOTS = ["logging.plots=false"]
FAST = ["training.epochs=3", "training.batch_size=64"]
# Stage 2 in 3 epochs: the warm-up and the first selectable epoch within them (a shorter run is refused)
S2FAST = FAST + ["fairness.warmup_start=1", "fairness.warmup_end=2", "selection.min_epoch=2"]
# The ablation and protocol tests' heads: tiny widths, Stage 2 in 3 epochs
TINY = ["training.batch_size=64", "training.device=cpu", "model.adapter_hidden=16", "model.dropout=0.1", *NO_PLOTS]
S2TINY = TINY + ["training.epochs=3", "fairness.warmup_start=1", "fairness.warmup_end=2", "selection.min_epoch=2",
                 "model.classifier_hidden=[16]", "model.num_ca_views=2", "model.ca_heads=2"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread for a module's tests (on the shared 2-core machine two
    threads made each small matmul ~50x slower, from contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def face_caches(tmp_path_factory) -> Path:
    """Synthetic faces with `tiny` CLIP caches: detection ``det`` (of ``data/manifest.csv``) and
    Stage 1 ``s1`` (of ``data/stage1_manifest.csv``)."""
    from featcache.data.synth_faces import synth_faces
    from featcache.extract import extract

    root = tmp_path_factory.mktemp("faces")
    synth_faces(root / "data", n=320, seed=0, size=32, progress=False)
    kw = dict(model="tiny", part_rows=128, num_workers=0, progress=False)
    extract("clip", root / "data" / "manifest.csv", root / "det", **kw)
    extract("clip", root / "data" / "stage1_manifest.csv", root / "s1", **kw)
    return root


@pytest.fixture(scope="session")
def stage1_run(face_caches, tmp_path_factory) -> Path:
    """A finished Stage-1 run on ``face_caches/s1`` (3 epochs, on the CPU)."""
    from featcache.train import train_head

    out = tmp_path_factory.mktemp("runs") / "stage1"
    train_head("stage1", face_caches / "s1", out, sets=[*FAST, "training.device=cpu"], progress=False)
    return out


@pytest.fixture(scope="session")
def stage2_run(face_caches, stage1_run, tmp_path_factory) -> Path:
    """A finished Stage-2 run (preset none) on ``face_caches/det`` over ``stage1_run`` (3 epochs, on the CPU).
    Tests may add evaluations under its ``eval/`` with their own names; they never retrain it."""
    from featcache.train import train_head

    out = tmp_path_factory.mktemp("runs") / "stage2"
    train_head("stage2", face_caches / "det", out, preset="none", sets=[*S2FAST, "training.device=cpu"], progress=False,
               options={"stage1": stage1_run})
    return out
