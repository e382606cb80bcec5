"""The extraction runner: a frozen backbone over a manifest, into a cache, resumably.

Batches never span parts, so a part is computed from the same batches whether the run is
fresh or resumed; that is what makes a resumed cache identical to an uninterrupted one.
Decoding runs in DataLoader workers; each finished part is written by a background thread
while the backbone works on the next one.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache.reader import open_cache
from ..cache.store import DEFAULT_PART_ROWS, CacheSpec, CacheWriter
from ..data.manifest import read_manifest
from ..errors import FeatcacheError, SampleError
from .registry import get_backbone

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExtractResult:
    cache: str
    rows: int
    parts_total: int
    parts_written: int
    parts_resumed: int
    failed: int
    seconds: float
    samples_per_second: float
    fingerprint: str
    failures: list[dict] = field(default_factory=list)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device} asked for CUDA, but torch sees no CUDA device")
    return dev


def default_num_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _parts_batches(parts: list[int], rows: int, part_rows: int, batch_size: int) -> list[list[int]]:
    batches = []
    for p in parts:
        start, stop = p * part_rows, min((p + 1) * part_rows, rows)
        batches.extend(list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size))
    return batches


class _PartBuffer:
    """Collects one part's per-sample outputs until it is whole."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.samples: list[dict[str, np.ndarray] | None] = [None] * (stop - start)
        self.ok = np.zeros(stop - start, dtype=bool)
        self.errors: list[dict] = []
        self.filled = 0

    def add(self, rows: np.ndarray, out: dict, ok: np.ndarray) -> None:
        for j, r in enumerate(rows.tolist()):
            self.samples[r - self.start] = {name: value[j] for name, value in out.items()}
        self.ok[rows - self.start] = ok
        self.filled += len(rows)

    @property
    def whole(self) -> bool:
        return self.filled == self.stop - self.start


def _pack_and_write(writer: CacheWriter, bb, part: int, buf: _PartBuffer) -> None:
    writer.write_part(part, bb.pack(buf.samples, buf.ok), buf.ok, buf.errors)


def extract(
    backbone: str,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    part_rows: int = DEFAULT_PART_ROWS,
    on_error: str = "skip",
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> ExtractResult:
    """Run a frozen backbone over a manifest into a cache at ``out`` (created or resumed).

    Each sample that cannot be read is recorded in ``errors.jsonl`` with ``ok = False``
    (``on_error="skip"``), or stops the run with :class:`SampleError` (``on_error="raise"``);
    the parts written so far are kept and a rerun resumes after them.
    """
    from tqdm.auto import tqdm

    if precision not in PRECISIONS:
        raise FeatcacheError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if on_error not in ("skip", "raise"):
        raise FeatcacheError(f"--on-error must be skip or raise, got {on_error!r}")
    if batch_size < 1:
        raise FeatcacheError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    man = read_manifest(manifest)
    bb = get_backbone(backbone, model, pretrained, layer=layer, seed=seed).to(dev)
    dtype = PRECISIONS[precision]
    info = bb.fingerprint()
    info["dtype"] = precision
    spec = CacheSpec(kind=bb.kind, backbone=info, preprocess=bb.preprocess_spec(),
                     manifest_sha256=man.sha256, rows=len(man), part_rows=part_rows)
    paths = man.absolute_paths()
    ids = man.df["sample_id"].tolist()

    t0 = time.perf_counter()
    with CacheWriter(out, spec, man.df, overwrite=overwrite) as writer:
        todo = writer.missing_parts()
        resumed = spec.n_parts - len(todo)
        n_todo = sum(stop - start for start, stop in map(writer.part_bounds, todo))
        if todo:
            workers = default_num_workers() if num_workers is None else num_workers
            loader = torch.utils.data.DataLoader(
                bb.dataset(paths, man.df),
                batch_sampler=_parts_batches(todo, spec.rows, part_rows, batch_size),
                num_workers=workers,
                collate_fn=bb.collate,
                pin_memory=dev.type == "cuda",
                persistent_workers=False,
                prefetch_factor=4 if workers > 0 else None,
            )
            autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                        else torch.autocast(dev.type, enabled=False))
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-writer")
            pending: Future | None = None
            buffers: dict[int, _PartBuffer] = {}
            bar = tqdm(total=int(n_todo), desc=f"extract {bb.name}:{bb.model_name}", unit="img",
                       disable=not progress, smoothing=0.1)
            try:
                for rows, inputs, errors in loader:
                    ok = np.array([e == "" for e in errors])
                    if on_error == "raise" and not ok.all():
                        r, e = next((int(r), e) for r, e in zip(rows, errors) if e)
                        raise SampleError(f"cannot read sample {ids[r]!r} ({paths[r]}): {e}; "
                                          "pass --on-error skip to skip and record such samples")
                    with autocast:
                        out_arrays = bb.forward(inputs, dev)
                    part = int(rows[0]) // part_rows
                    if part not in buffers:
                        buffers[part] = _PartBuffer(*writer.part_bounds(part))
                    buf = buffers[part]
                    buf.add(rows, out_arrays, ok)
                    buf.errors.extend({"sample_id": ids[r], "path": paths[r], "error": e}
                                      for r, e in zip(rows.tolist(), errors) if e)
                    if buf.whole:
                        if pending is not None:
                            pending.result()  # at most one write in flight; surfaces its errors
                        del buffers[part]
                        pending = pool.submit(_pack_and_write, writer, bb, part, buf)
                    bar.update(len(rows))
                if pending is not None:
                    pending.result()
            finally:
                bar.close()
                pool.shutdown(wait=True)
        writer.finalize(bb.cache_files())
    failures = open_cache(out).errors()
    seconds = time.perf_counter() - t0
    return ExtractResult(
        cache=str(out), rows=spec.rows, parts_total=spec.n_parts, parts_written=len(todo),
        parts_resumed=resumed, failed=len(failures), seconds=seconds,
        samples_per_second=float(n_todo) / seconds if seconds > 0 and n_todo else 0.0,
        fingerprint=writer.attrs["fingerprint"], failures=failures,
    )
