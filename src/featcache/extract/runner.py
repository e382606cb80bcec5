"""The extraction runner: a frozen backbone over a manifest, into a cache, resumably.

Batches never span parts, so a part is computed from the same batches whether the run is
fresh or resumed; that is what makes a resumed cache identical to an uninterrupted one.
Decoding runs in DataLoader workers; each finished part is written by a background thread
while the backbone works on the next one.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, see :mod:`.distributed`), rank 0
takes the cache's lock, checks the fingerprint and writes the meta arrays; the other ranks then
join the same run; each rank computes every ``world_size``-th missing part on its own device;
after all ranks are done rank 0 marks the cache complete. Since a part is the unit of resume,
a run killed on any rank resumes with any number of processes.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache.reader import open_cache
from ..cache.store import DEFAULT_PART_ROWS, CacheSpec, CacheWriter
from ..data.manifest import read_manifest
from ..errors import FeatcacheError, SampleError
from ..runtime import resolve_device
from .distributed import DistributedError
from .distributed import context as dist_context
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
    rank: int = 0
    world_size: int = 1


def default_num_workers() -> int:
    """Decoding workers per process: the cores this process may use, shared with the other ranks
    on its node (torchrun sets ``LOCAL_WORLD_SIZE``), less one for the process itself; at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))  # honours taskset and SLURM cpusets
    except AttributeError:
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(16, max(0, cores // local - 1))


class _PartBatches:
    """The batches of the given parts, made as the loader asks: memory does not grow with rows."""

    def __init__(self, parts: list[int], rows: int, part_rows: int, batch_size: int):
        self.bounds = [(p * part_rows, min((p + 1) * part_rows, rows)) for p in parts]
        self.batch_size = batch_size

    def __iter__(self):
        for start, stop in self.bounds:
            for s in range(start, stop, self.batch_size):
                yield list(range(s, min(s + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.bounds)


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
    max_seconds: float | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Run a frozen backbone over a manifest into a cache at ``out`` (created or resumed).

    Each sample that cannot be read is recorded in ``errors.jsonl`` with ``ok = False``
    (``on_error="skip"``), or stops the run with :class:`SampleError` (``on_error="raise"``);
    the parts written so far are kept and a rerun resumes after them.  ``max_seconds`` cuts
    audio after that many seconds (audio backbones).

    Started by torchrun (``WORLD_SIZE`` > 1), each process computes its share of the missing
    parts on ``cuda:LOCAL_RANK`` (or the CPU), as described in the module docstring; only
    rank 0 shows progress. Every process returns the same totals, with its own ``rank``.
    """
    if precision not in PRECISIONS:
        raise FeatcacheError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if on_error not in ("skip", "raise"):
        raise FeatcacheError(f"--on-error must be skip or raise, got {on_error!r}")
    if batch_size < 1:
        raise FeatcacheError(f"--batch-size must be at least 1, got {batch_size}")
    ctx = dist_context(resolve_device(device))
    try:
        return _extract(ctx, backbone, manifest, out, model=model, pretrained=pretrained, layer=layer,
                        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                        part_rows=part_rows, on_error=on_error, overwrite=overwrite, seed=seed,
                        max_seconds=max_seconds, progress=progress)
    finally:
        ctx.close()


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FeatcacheError) else f"{type(exc).__name__}: {exc}"


def _open_writer(ctx, out, spec: CacheSpec, df, overwrite: bool) -> tuple[CacheWriter, list[int]]:
    """Rank 0 creates or resumes the cache; then the other ranks join it. Returns the missing parts."""
    run = ctx.broadcast(uuid.uuid4().hex) if ctx.active else None
    writer = CacheWriter(out, spec, df, overwrite=overwrite, run=run,
                         member_of=None if ctx.is_main else run)
    if ctx.is_main:
        try:
            writer.open()
        except Exception as exc:
            ctx.broadcast((_error_text(exc), None))
            raise
        todo = writer.missing_parts()
        ctx.broadcast((None, todo))
    else:
        error, todo = ctx.broadcast(None)
        if error:
            raise DistributedError(f"rank 0 could not open the cache: {error}")
    error = None
    if not ctx.is_main:
        try:
            writer.open()
        except Exception as exc:
            error = _error_text(exc)
    try:
        ctx.raise_if_any(error, "joining the cache")
    except BaseException:
        writer.close()
        raise
    return writer, todo


def _extract(ctx, backbone, manifest, out, *, model, pretrained, layer, batch_size, num_workers, device,
             precision, part_rows, on_error, overwrite, seed, max_seconds, progress) -> ExtractResult:
    from tqdm.auto import tqdm

    dev = ctx.device(resolve_device(device))
    if dev.type == "cuda" and ctx.active:
        torch.cuda.set_device(dev)
    progress = progress and ctx.is_main
    man = read_manifest(manifest)
    bb = get_backbone(backbone, model, pretrained, layer=layer, seed=seed, max_seconds=max_seconds).to(dev)
    dtype = PRECISIONS[precision]
    info = bb.fingerprint()
    info["dtype"] = precision
    spec = CacheSpec(kind=bb.kind, backbone=info, preprocess=bb.preprocess_spec(),
                     manifest_sha256=man.sha256, rows=len(man), part_rows=part_rows)
    paths = man.absolute_paths()
    ids = man.df["sample_id"].tolist()
    # The dataset checks the manifest's backbone-specific columns (audio segments, detection
    # annotations): a manifest it refuses must not leave a cache behind.
    dataset = bb.dataset(paths, man.df)

    t0 = time.perf_counter()
    writer, todo_all = _open_writer(ctx, out, spec, man.df, overwrite)
    try:
        todo = todo_all[ctx.rank::ctx.world_size]  # every world_size-th missing part
        resumed = spec.n_parts - len(todo_all)
        n_todo = sum(stop - start for start, stop in map(writer.part_bounds, todo))
        failed_here: BaseException | None = None
        try:
            if todo:
                _run_parts(bb, dataset, writer, todo, paths, ids, spec, dev, dtype, batch_size, num_workers, on_error,
                           part_rows, bar_desc=f"extract {bb.name}:{bb.model_name}"
                           + (f" (rank 0 of {ctx.world_size})" if ctx.active else ""),
                           progress=progress, tqdm=tqdm)
        except Exception as exc:
            if not ctx.active:
                raise
            failed_here = exc
        if ctx.active:
            errors = ctx.gather(_error_text(failed_here) if failed_here else None)
            if failed_here is not None:
                raise failed_here
            bad = [(r, e) for r, e in enumerate(errors) if e]
            if bad:
                raise DistributedError(
                    f"extraction failed on rank {', '.join(str(r) for r, _ in bad)} of {ctx.world_size} "
                    f"({bad[0][1]}); the parts written so far are kept: rerun to resume")
        counts = ctx.gather(n_todo)
        final_error = None
        if ctx.is_main:
            try:
                writer.finalize(bb.cache_files())
            except Exception as exc:
                if not ctx.active:
                    raise
                final_error = exc
        error = ctx.broadcast(_error_text(final_error) if final_error else None)
        if final_error is not None:
            raise final_error
        if error:
            raise DistributedError(f"rank 0 could not finalize the cache: {error}")
    finally:
        writer.close()
    failures = open_cache(out).errors()
    seconds = time.perf_counter() - t0
    total = sum(counts)
    return ExtractResult(
        cache=str(out), rows=spec.rows, parts_total=spec.n_parts, parts_written=len(todo_all),
        parts_resumed=resumed, failed=len(failures), seconds=seconds,
        samples_per_second=float(total) / seconds if seconds > 0 and total else 0.0,
        fingerprint=writer.attrs["fingerprint"], failures=failures, rank=ctx.rank, world_size=ctx.world_size,
    )


def _run_parts(bb, dataset, writer: CacheWriter, todo: list[int], paths, ids, spec: CacheSpec, dev, dtype, batch_size,
               num_workers, on_error, part_rows, *, bar_desc: str, progress: bool, tqdm) -> None:
    """Compute and write the parts ``todo``: decoding in workers, writes in a background thread."""
    n_todo = sum(stop - start for start, stop in map(writer.part_bounds, todo))
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_PartBatches(todo, spec.rows, part_rows, batch_size),
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
    bar = tqdm(total=int(n_todo), desc=bar_desc, unit="img", disable=not progress, smoothing=0.1)
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
