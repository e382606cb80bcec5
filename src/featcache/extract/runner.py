"""The extraction runner: a frozen backbone over a manifest, into a cache, resumably.

Batches never span parts, so a part is computed from the same batches whether the run is
fresh or resumed; that is what makes a resumed cache identical to an uninterrupted one.

The pipeline: decoding runs in DataLoader workers (uint8 images for CLIP, resampled audio for
XLS-R), batches are pinned on CUDA; the main thread only launches work on the device. A
backbone with ``forward_async`` returns its outputs on the device; they are copied into pinned
host buffers with ``non_blocking=True`` and a CUDA event is recorded, and the batch goes to one
writer thread (a bounded queue), which waits for the event, converts the outputs
(``backbone.finish``), gathers each part and writes it when whole. So the main thread never
waits for the GPU, and each part still has exactly one writer. On the CPU the same thread
does the conversion and the writes.

A rerun checks every existing part before counting it done (:func:`..cache.store.part_damage`,
the check ``cache verify`` makes): a part with an array or a chunk missing, a truncated or
undecodable chunk, or a wrong row count is deleted and computed again, and each meta column
that is missing or damaged is written again from the manifest; the result says what was repaired.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, see :mod:`.distributed`), rank 0
takes the cache's lock, checks the fingerprint and writes the meta arrays; the other ranks then
join the same run; each rank computes every ``world_size``-th missing part on its own device;
after all ranks are done rank 0 marks the cache complete. Since a part is the unit of resume,
a run killed on any rank resumes with any number of processes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache.reader import open_cache
from ..cache.store import DEFAULT_PART_ROWS, CacheSpec, CacheWriter
from ..data.manifest import read_manifest
from ..errors import FeatcacheError, SampleError
from ..progress import bar as tqdm
from ..progress import library_bars
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
    parts_repaired: int = 0  # existing parts found damaged (an array or chunk missing or damaged) and computed again
    meta_repaired: list[str] = field(default_factory=list)  # meta columns found missing or damaged and written again


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
    """Collects one part's batches (host arrays) until it is whole."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.batches: list[tuple[np.ndarray, dict]] = []
        self.ok = np.zeros(stop - start, dtype=bool)
        self.errors: list[tuple[int, dict]] = []  # (row, record)
        self.filled = 0

    def add(self, rows: np.ndarray, out: dict, ok: np.ndarray) -> None:
        self.batches.append((rows, out))
        self.ok[rows - self.start] = ok
        self.filled += len(rows)

    @property
    def whole(self) -> bool:
        return self.filled == self.stop - self.start

    def samples(self) -> list[dict]:
        """One dict of outputs per row, in row order (the :meth:`Backbone.pack` interface)."""
        out: list[dict | None] = [None] * (self.stop - self.start)
        for rows, arrays in self.batches:
            for j, r in enumerate(rows.tolist()):
                out[r - self.start] = {name: value[j] for name, value in arrays.items()}
        return out


class _Writer:
    """The one writer thread: waits for each batch's copy, converts it, writes whole parts.

    The main thread :meth:`put`s batches; the queue is bounded (``depth`` batches in flight),
    which is the back-pressure when the disk is slower than the device. An error in this
    thread is raised in the main thread at its next :meth:`put` or at :meth:`close`.
    """

    def __init__(self, writer: CacheWriter, bb, part_rows: int, ids, paths, depth: int = 4):
        self.writer, self.bb, self.part_rows, self.ids, self.paths = writer, bb, part_rows, ids, paths
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.abort = False
        self.buffers: dict[int, _PartBuffer] = {}
        self.thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("the cache writer thread stopped") from self.error

    def _run(self) -> None:
        try:
            while not self.abort:
                try:
                    item = self.q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is None:
                    return
                self._handle(*item)
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc

    def _handle(self, rows, outputs, event, context, ok, errors) -> None:
        if event is not None:
            event.synchronize()  # the device-to-host copies of this batch are done
        arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()}
        arrays = self.bb.finish(arrays, context)
        part = int(rows[0]) // self.part_rows
        buf = self.buffers.get(part)
        if buf is None:
            buf = self.buffers[part] = _PartBuffer(*self.writer.part_bounds(part))
        buf.add(rows, arrays, ok)
        buf.errors.extend((r, {"sample_id": self.ids[r], "path": self.paths[r], "error": e})
                          for r, e in zip(rows.tolist(), errors) if e)
        if buf.whole:
            del self.buffers[part]
            errors = [rec for _, rec in sorted(buf.errors, key=lambda x: x[0])]  # row order, whatever the batching
            self.writer.write_part(part, self.bb.pack(buf.samples(), buf.ok), buf.ok, errors)

    def close(self, wait: bool = True) -> None:
        """Finish the queued batches (``wait``), or drop them (after an error or Ctrl-C)."""
        if wait and self.error is None:
            self.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
        else:
            self.abort = True
            self.thread.join()


def _to_host(outputs: dict, device: torch.device):
    """Start copying device outputs to pinned host buffers; return (host outputs, event or None)."""
    if device.type != "cuda":
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()}, None
    host = {}
    for k, v in outputs.items():
        if isinstance(v, torch.Tensor):
            h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            h.copy_(v, non_blocking=True)
            host[k] = h
        else:
            host[k] = v
    event = torch.cuda.Event()
    event.record()
    return host, event


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
    decode: str = "cpu",
    compile: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Run a frozen backbone over a manifest into a cache at ``out`` (created or resumed).

    Each sample that cannot be read is recorded in ``errors.jsonl`` with ``ok = False``
    (``on_error="skip"``), or stops the run with :class:`SampleError` (``on_error="raise"``);
    the parts written so far are kept and a rerun resumes after them.  ``max_seconds`` cuts
    audio after that many seconds (audio backbones).  A manifest whose first rows the backbone
    cannot read at all (audio for an image backbone, images for XLS-R) is refused before a cache
    is created, and a run in which every sample failed is refused (the cache stays incomplete).

    ``decode="gpu"`` decodes JPEGs on the GPU (CLIP; needs CUDA); ``compile=True`` runs the
    model through ``torch.compile``.

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
    if num_workers is not None and num_workers < 0:
        raise FeatcacheError(f"--num-workers must be 0 (decode in the main process) or more, got {num_workers}")
    if part_rows < 1:
        raise FeatcacheError(f"--part-rows must be at least 1, got {part_rows}")
    if decode not in ("cpu", "gpu"):
        raise FeatcacheError(f"--decode must be cpu or gpu, got {decode!r}")
    dev = resolve_device(device)
    if decode == "gpu" and dev.type != "cuda":
        raise FeatcacheError("--decode gpu decodes JPEGs with CUDA, but the device is "
                             f"{dev} ({'no CUDA device is visible' if not torch.cuda.is_available() else 'pass --device cuda'}); "
                             "use --decode cpu")
    ctx = dist_context(dev)
    try:
        return _extract(ctx, backbone, manifest, out, model=model, pretrained=pretrained, layer=layer,
                        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                        part_rows=part_rows, on_error=on_error, overwrite=overwrite, seed=seed,
                        max_seconds=max_seconds, decode=decode, compile=compile, progress=progress)
    finally:
        ctx.close()


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FeatcacheError) else f"{type(exc).__name__}: {exc}"


#: File extensions by what they hold, for the probe's message.
_AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif"}
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PROBE_ROWS = 8


def probe_inputs(bb, dataset, paths: list[str], backbone: str, rows: int = PROBE_ROWS) -> None:
    """Decode the first ``rows`` samples; when none can be read, refuse the manifest in one line.

    Catches an audio manifest given to an image backbone (and the reverse) before any cache
    exists, naming what the files look like; a manifest with some unreadable files passes.
    """
    n = min(rows, len(dataset))
    errors = []
    for i in range(n):
        err = dataset[i][2]
        if not err:
            return
        errors.append(err)
    if not n:
        return
    exts = Counter(Path(p).suffix.lower() for p in paths[:n])
    ext = exts.most_common(1)[0][0] or "(no extension)"
    kind = "audio" if ext in _AUDIO_EXT else "image" if ext in _IMAGE_EXT else None
    wants = {"frames": "audio"}.get(bb.kind, "image")
    hint = (f"they are {kind} files ({ext}) and {backbone} reads {wants}; use "
            f"{'--backbone xlsr' if kind == 'audio' else '--backbone clip or detr'}"
            if kind and kind != wants else "check the manifest's paths and files")
    raise FeatcacheError(f"none of the first {n} samples could be read by {backbone} ({errors[0]}); {hint}")


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
        todo = writer.missing_parts()  # damaged parts were removed by open()
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
             precision, part_rows, on_error, overwrite, seed, max_seconds, decode, compile, progress) -> ExtractResult:
    dev = ctx.device(resolve_device(device))
    if dev.type == "cuda" and ctx.active:
        torch.cuda.set_device(dev)
    progress = progress and ctx.is_main
    man = read_manifest(manifest)
    with library_bars(progress):  # -q: transformers' own "Loading weights" bar too
        bb = get_backbone(backbone, model, pretrained, layer=layer, seed=seed, max_seconds=max_seconds).to(dev)
    bb.set_decode(decode)
    dtype = PRECISIONS[precision]
    info = bb.fingerprint()  # before torch.compile, which renames the parameters
    info["dtype"] = precision
    spec = CacheSpec(kind=bb.kind, backbone=info, preprocess=bb.preprocess_spec(),
                     manifest_sha256=man.sha256, rows=len(man), part_rows=part_rows)
    paths = man.absolute_paths()
    ids = man.df["sample_id"].tolist()
    # The dataset checks the manifest's backbone-specific columns (audio segments, detection
    # annotations), and the probe that the files are of the backbone's kind: a manifest they
    # refuse must not leave a cache behind.
    dataset = bb.dataset(paths, man.df)
    probe_inputs(bb, dataset, paths, backbone)  # every rank: the same files, the same verdict, no rank left waiting
    if compile:
        bb.module = torch.compile(bb.module)

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
        _finalize(ctx, writer, bb, spec, out)
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
        parts_repaired=len(writer.repaired), meta_repaired=list(writer.repaired_meta),
    )


def _finalize(ctx, writer: CacheWriter, bb, spec: CacheSpec, out) -> None:
    """Rank 0 marks the cache complete (refused when every sample failed); every rank hears how it went."""
    final_error = None
    if ctx.is_main:
        try:
            if writer.failed_rows() == spec.rows:
                first = writer.part_errors(0)[:1]
                raise FeatcacheError(
                    f"every one of the {spec.rows} samples failed to read"
                    + (f" (first: {first[0]['sample_id']}: {first[0]['error']})" if first else "")
                    + f"; {out} is left incomplete and no head can train on it: fix the manifest or "
                    "the files, then rerun with --overwrite")
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


def _run_parts(bb, dataset, writer: CacheWriter, todo: list[int], paths, ids, spec: CacheSpec, dev, dtype, batch_size,
               num_workers, on_error, part_rows, *, bar_desc: str, progress: bool, tqdm) -> None:
    """Compute and write the parts ``todo``: decoding in workers, the device never waited for,
    conversion and writes in one writer thread (module docstring)."""
    n_todo = sum(stop - start for start, stop in map(writer.part_bounds, todo))
    workers = default_num_workers() if num_workers is None else num_workers
    batches = (bb.batch_sampler(todo, spec.rows, part_rows, batch_size, dataset)
               or _PartBatches(todo, spec.rows, part_rows, batch_size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=bb.collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(dev.type, enabled=False))
    out = _Writer(writer, bb, part_rows, ids, paths)
    bar = tqdm(total=int(n_todo), desc=bar_desc, unit="img", disable=not progress, smoothing=0.1)
    done = False
    try:
        for rows, inputs, errors in loader:
            errors = list(errors)
            inputs, late = bb.prepare(inputs, dev)  # to the device (with --decode gpu, decoded there)
            for j, e in late.items():
                errors[j] = e
            ok = np.array([e == "" for e in errors])
            if on_error == "raise" and not ok.all():
                done = True  # the parts before this batch are still written
                r, e = next((int(r), e) for r, e in zip(rows, errors) if e)
                raise SampleError(f"cannot read sample {ids[r]!r} ({paths[r]}): {e}; "
                                  "pass --on-error skip to skip and record such samples")
            with autocast:
                outputs, context = bb.forward_async(inputs, dev)
                outputs, event = _to_host(outputs, dev)
            out.put((rows, outputs, event, context, ok, errors))
            bar.update(len(rows))
        done = True
    finally:
        bar.close()
        out.close(wait=done)
