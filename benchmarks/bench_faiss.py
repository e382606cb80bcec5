"""The FAISS index layer at scale, as figures measured in one run.

    python benchmarks/bench_faiss.py [--rows 1000000] [--dim 768] [--device auto]

1. The subgroup-style audit on ``--rows`` x ``--dim`` clustered vectors (50 clusters, each of
   64 sub-clusters, plus isotropic noise; float16 like a cache, generated in chunks with a
   seeded generator): the time to build the index (IVF above 10^5 rows), the time of a k=50
   self-search over all rows (each row's own id left out), and recall@10 of the index against
   exact search on 1000 sampled queries (``NeighborIndex.recall_at_k``).
2. The same kNN question on 100,000 x ``--dim`` vectors (k=10 for 2000 queries, cosine):
   ``build_index`` (exact) against scikit-learn ``NearestNeighbors(algorithm="brute",
   metric="cosine")``, fit + query each (best of 3), as a ratio: sklearn's time over
   featcache's (above 1: featcache is faster); the neighbour sets are checked to agree.

Memory: the input (fp16, 1.5 GB at 10^6 x 768) is freed after the build; the index keeps a unit
float32 copy (3 GB) and the IVF its own (3 GB), and ``recall_at_k`` adds an exact flat index
(3 GB) while it runs.  The peak resident memory is printed.

Not part of the tests: the figures go in the README's performance section, with the machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import machine  # noqa: E402

from featcache.analyze.index import build_index  # noqa: E402

CHUNK = 65_536


def clustered(rows: int, dim: int, *, clusters: int = 50, subclusters: int = 64, seed: int = 0,
              dtype=np.float16) -> np.ndarray:
    """``rows`` vectors: a cluster centre + one of its sub-cluster offsets + noise, filled in chunks."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    subs = 0.5 * rng.standard_normal((clusters * subclusters, dim), dtype=np.float32)
    out = np.empty((rows, dim), dtype=dtype)
    for s in range(0, rows, CHUNK):
        e = min(s + CHUNK, rows)
        sub = rng.integers(0, clusters * subclusters, size=e - s)
        chunk = rng.standard_normal((e - s, dim), dtype=np.float32)
        chunk *= 0.25
        chunk += centers[sub // subclusters]
        chunk += subs[sub]
        out[s:e] = chunk
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def audit(rows: int, dim: int, device: str, seed: int) -> dict:
    x = clustered(rows, dim, seed=seed)
    t = time.perf_counter()
    index = build_index(x, device=device, seed=seed)
    t_build = time.perf_counter() - t
    del x
    t = time.perf_counter()
    for s in range(0, rows, CHUNK):
        index.search(np.arange(s, min(s + CHUNK, rows)), 50, exclude_self=True)
    t_search = time.perf_counter() - t
    t = time.perf_counter()
    recall = index.recall_at_k(k=10, n_queries=1000, seed=seed)
    t_recall = time.perf_counter() - t
    return {"index": index, "build": t_build, "search": t_search, "recall": recall, "recall_s": t_recall}


def compare(rows: int, dim: int, n_queries: int, device: str, seed: int, repeat: int = 3) -> dict:
    from sklearn.neighbors import NearestNeighbors

    x = clustered(rows, dim, seed=seed + 1, dtype=np.float32)
    rng = np.random.default_rng(seed + 2)  # queries: new samples near existing ones
    q = x[rng.choice(rows, size=n_queries, replace=False)]
    q += 0.1 * rng.standard_normal(q.shape, dtype=np.float32)

    def ours():
        index = build_index(x, device=device)
        assert index.kind == "exact"
        return index.search(q, 10)

    def theirs():
        nn = NearestNeighbors(n_neighbors=10, algorithm="brute", metric="cosine").fit(x)
        dist, ids = nn.kneighbors(q)
        return 1.0 - dist, ids

    times = {"ours": [], "theirs": []}
    for _ in range(repeat):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            if name == "ours":
                sims_a, ids_a = out
            else:
                sims_b, ids_b = out
    # Sanity: the same neighbour sets, except where a tie at the 10th place swaps members.
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_a, ids_b)])
    for i in np.flatnonzero([set(a) != set(b) for a, b in zip(ids_a, ids_b)]):
        extra = sims_b[i][~np.isin(ids_b[i], ids_a[i])]
        assert np.all(extra <= sims_a[i].min() + 1e-4), f"query {i}: sklearn finds closer neighbours than faiss"
    assert overlap >= 0.99, f"neighbour sets agree on only {overlap:.3f}"
    np.testing.assert_allclose(np.sort(sims_a, 1), np.sort(sims_b, 1), atol=1e-4)
    return {"ours": min(times["ours"]), "theirs": min(times["theirs"]), "overlap": overlap}


def ivf_vs_exact(rows: int, dim: int, n_queries: int, device: str, seed: int = 0) -> dict:
    """The IVF index against exact FAISS search on the same rows: k=10 self-search time and recall."""
    import faiss

    x = clustered(rows, dim, seed=seed)
    t = time.perf_counter()
    ivf = build_index(x, exact_limit=0, device=device, seed=seed)
    build = time.perf_counter() - t
    del x
    q = np.random.default_rng(seed).choice(rows, size=min(n_queries, rows), replace=False)

    def approx():
        return ivf.search(q, 10, exclude_self=True)

    def exact():  # brute force over the same unit vectors, as recall_at_k does
        return faiss.knn(ivf.vectors[q], ivf.vectors, 11, metric=faiss.METRIC_INNER_PRODUCT)

    t_ivf = min(_timed(approx) for _ in range(2))
    t_exact = min(_timed(exact) for _ in range(2))
    return {"build": build, "ivf": t_ivf, "exact": t_exact, "nlist": ivf.nlist, "nprobe": ivf.nprobe,
            "recall": ivf.recall_at_k(k=10, n_queries=min(1000, rows), seed=seed), "device": ivf.device}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def suite(quick: bool, device: str) -> list[dict]:
    """Rows for benchmarks/run.py: FAISS kNN against exact search and against scikit-learn."""
    fdev = "gpu" if str(device).startswith("cuda") else ("auto" if device in (None, "", "auto") else "cpu")
    try:
        from featcache.analyze.index import gpu_available

        if fdev == "gpu" and not gpu_available():
            fdev = "cpu"  # the faiss build here has no GPU support: say so in the row
    except ImportError:
        fdev = "cpu"
    rows, queries = (50_000, 1000) if quick else (1_000_000, 10_000)
    v = ivf_vs_exact(rows, 768, queries, fdev)
    out = [{"measure": f"FAISS IVF kNN / exact FAISS kNN, k=10 for {queries} queries over {rows:,} x 768",
            "ratio": v["exact"] / v["ivf"], "value": f"{v['ivf']:.2f} s vs {v['exact']:.2f} s",
            "note": f"recall@10 {v['recall']:.3f}; nlist {v['nlist']}, nprobe {v['nprobe']}; "
                    f"build {v['build']:.1f} s; faiss on {v['device']}"}]
    c_rows, c_queries = (20_000, 500) if quick else (100_000, 2000)
    c = compare(c_rows, 768, c_queries, fdev, 0, repeat=2 if quick else 3)
    out.append({"measure": f"scikit-learn brute cosine / FAISS exact, k=10 for {c_queries} queries over "
                           f"{c_rows:,} x 768, build + query",
                "ratio": c["theirs"] / c["ours"], "value": f"{c['ours']:.2f} s vs {c['theirs']:.2f} s",
                "note": f"neighbour sets agree on {c['overlap']:.4f}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the audit (IVF above 100,000)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--compare-rows", type=int, default=100_000, help="rows of the sklearn comparison (exact)")
    ap.add_argument("--queries", type=int, default=2000, help="queries of the sklearn comparison")
    ap.add_argument("--device", default="auto", help="faiss device: auto, cpu or gpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    a = audit(args.rows, args.dim, args.device, args.seed)
    peak_audit = peak_rss_gb()
    c = compare(args.compare_rows, args.dim, args.queries, args.device, args.seed)
    idx = a["index"]

    print(f"machine: {machine()}; faiss index on {idx.device}")
    print(f"rows used: {args.rows:,} x {args.dim} (audit), {args.compare_rows:,} x {args.dim} (comparison); "
          f"peak resident memory {peak_audit:.1f} GB")
    print("| measure | featcache | reference | ratio |")
    print("|---|---|---|---|")
    where = f"{idx.kind}, nlist {idx.nlist}, nprobe {idx.nprobe}" if idx.kind != "exact" else "exact"
    print(f"| build index, {args.rows:,} x {args.dim} clustered ({where}) | {a['build']:.1f} s | | |")
    print(f"| k=50 self-search over all {args.rows:,} rows (exclude_self) | {a['search']:.1f} s "
          f"({args.rows / a['search']:,.0f} queries/s) | | |")
    print(f"| recall@10 against exact, 1000 sampled queries | {a['recall']:.3f} | exact = 1 | |")
    print(f"| k=10 for {args.queries} queries over {args.compare_rows:,} x {args.dim}, build + query "
          f"| {c['ours']:.2f} s (build_index, exact) | {c['theirs']:.2f} s (sklearn brute cosine) "
          f"| {c['theirs'] / c['ours']:.2f} |")
    print(f"\nneighbour sets agree on {c['overlap']:.4f} of the top-10 (sanity check passed); "
          f"recall check took {a['recall_s']:.1f} s")


if __name__ == "__main__":
    main()
