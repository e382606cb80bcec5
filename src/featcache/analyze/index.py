"""The FAISS index layer: every neighbour question in featcache goes through :func:`build_index`.

Vectors are L2-normalised, so inner product is cosine similarity.  Up to ``exact_limit``
vectors (10^5 by default) the index is exact (``IndexFlatIP``); above, an inverted file
(``IndexIVFFlat`` with K ≈ 4·√N lists, trained on a seeded sample of the vectors) answers
approximately, and :meth:`NeighborIndex.recall_at_k` measures how approximately against exact
search on a sample of queries.  With faiss-gpu and a CUDA device the index lives on the GPU,
with fp16 storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FeatcacheError

EXACT_LIMIT = 100_000


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    """True when this faiss has GPU support and sees a CUDA device."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def as_unit_float32(x) -> np.ndarray:
    """A C-contiguous float32 copy of ``x`` with unit-norm rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or len(x) == 0:
        raise FeatcacheError(f"expected a non-empty (n, d) array of vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FeatcacheError("the vectors hold NaN or Inf; run `featcache cache verify` on the cache")
    _faiss().normalize_L2(x)
    return x


@dataclass
class NeighborIndex:
    """A built index over ``n`` unit vectors; ``kind`` is ``exact`` or ``ivf``."""

    index: object
    vectors: np.ndarray  # the unit vectors, kept for exact recall checks
    kind: str
    nlist: int = 0
    nprobe: int = 0
    device: str = "cpu"

    @property
    def n(self) -> int:
        return len(self.vectors)

    def search(self, queries, k: int, *, exclude_self: bool = False, normalize: bool = True):
        """Top-``k`` cosine similarities and row ids for each query (ids -1 where fewer exist).

        With ``exclude_self`` the queries are rows of the index in order (``queries`` is then an
        array of row ids or None for all rows), and each row's own id is left out of its result.
        """
        if exclude_self:
            rows = np.arange(self.n) if queries is None else np.asarray(queries, dtype=np.int64)
            q = self.vectors[rows]
            sims, ids = self.index.search(q, min(k + 1, self.n))
            return _drop_self(sims, ids, rows, k)
        q = as_unit_float32(queries) if normalize else np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, min(k, self.n))

    def recall_at_k(self, k: int = 10, n_queries: int = 1000, seed: int = 0) -> float:
        """Mean fraction of the exact top-``k`` (self excluded) that this index returns."""
        if self.kind == "exact":
            return 1.0
        rng = np.random.default_rng(seed)
        rows = rng.choice(self.n, size=min(n_queries, self.n), replace=False)
        _, approx = self.search(rows, k, exclude_self=True)
        faiss = _faiss()  # brute force without a second copy of the database
        sims, ids = faiss.knn(self.vectors[rows], self.vectors, min(k + 1, self.n), metric=faiss.METRIC_INNER_PRODUCT)
        _, truth = _drop_self(sims, ids, rows, k)
        hits = [len(set(a[a >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum())) for a, t in zip(approx, truth)]
        return float(np.mean(hits))


def _drop_self(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int):
    """Remove each row's own id from its results and keep ``k`` columns."""
    keep = ids != rows[:, None]
    # A row whose own id was not returned (ties, approximate search) loses its last result instead.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def build_index(x, *, exact_limit: int = EXACT_LIMIT, nlist: int | None = None, nprobe: int = 32,
                train_size: int | None = None, device: str = "auto", seed: int = 0) -> NeighborIndex:
    """Build the right index for ``x`` (n, d): exact up to ``exact_limit`` rows, IVF above.

    ``nlist`` defaults to 4·√n; the IVF is trained on ``train_size`` rows (default 64 per list,
    at least 10,000, at most n) drawn with ``seed``.  ``device``: ``auto`` (GPU when faiss-gpu
    and CUDA are present), ``cpu`` or ``gpu``.
    """
    faiss = _faiss()
    vecs = as_unit_float32(x)
    n, d = vecs.shape
    use_gpu = {"auto": gpu_available(), "cpu": False, "gpu": True}.get(device)
    if use_gpu is None:
        raise FeatcacheError(f"device must be auto, cpu or gpu, got {device!r}")
    if use_gpu and not gpu_available():
        raise FeatcacheError("device gpu asked for, but this faiss has no GPU support or sees no CUDA device "
                             "(pip install faiss-gpu on a CUDA machine)")
    if n <= exact_limit:
        index, kind, nlist_used, nprobe_used = faiss.IndexFlatIP(d), "exact", 0, 0
    else:
        # faiss wants at least 39 training points per list
        nlist_used = int(nlist or max(1, min(round(4 * math.sqrt(n)), n // 39)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist_used, faiss.METRIC_INNER_PRODUCT)
        size = min(n, train_size or max(10_000, 64 * nlist_used))
        sample = vecs[np.random.default_rng(seed).choice(n, size=size, replace=False)]
        index.train(sample)
        nprobe_used = min(nprobe, nlist_used)
        index.nprobe = nprobe_used
        kind = "ivf"
    if use_gpu:
        res = faiss.StandardGpuResources()
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = True
        index = faiss.index_cpu_to_gpu(res, 0, index, opts)
        index._featcache_resources = res  # keep the GPU resources alive with the index
    index.add(vecs)
    return NeighborIndex(index=index, vectors=vecs, kind=kind, nlist=nlist_used, nprobe=nprobe_used,
                         device="gpu" if use_gpu else "cpu")
