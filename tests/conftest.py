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


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m featcache ARGS`` in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"featcache {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """A 40-image manifest with one garbage file and one truncated PNG."""
    return write_image_manifest(tmp_path_factory.mktemp("images"), 40, corrupt={5}, truncated={22})
