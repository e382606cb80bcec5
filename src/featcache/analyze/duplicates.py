"""Near-duplicates and leaky splits of a cache.

Two samples are near-duplicates when one is among the other's ``k`` nearest neighbours
(self excluded) with cosine similarity at least ``threshold``; each unordered pair is counted
once.  A split leaks when a near-duplicate pair straddles two splits (train/val, train/test,
val/test), or when a person or video (``identity``, where not empty) has samples in both.

>>> find_duplicates("runs/ffpp_clip", "runs/ffpp_clip_dups", threshold=0.95)

Writes ``duplicates.json`` (the returned dict), ``duplicate_pairs.csv`` (every pair found,
most similar first) and ``duplicates.md`` (the per-split-pair table and the worst cross-split
examples).  The neighbour search is :func:`featcache.analyze.index.build_index`: exact up to
10^5 samples, IVF above (its measured recall@k is then in the JSON).  A sample with more than
``k`` near-duplicates has only its ``k`` nearest counted from its side: raise ``k`` for
heavily duplicated data.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import SPLITS
from ..errors import FeatcacheError, check_out, write_atomic, writing
from ..report.tables import markdown_table
from .index import build_index
from .neighbors import check_k, meta_column, open_pooled

PAIR_COLUMNS = ("a", "b", "similarity", "split_a", "split_b", "identity_a", "identity_b", "cross_split")
#: Rows searched per call: bounds the copy of the query vectors and the result arrays.
SEARCH_BATCH = 65_536


def _split_order(splits) -> list[str]:
    present = set(map(str, splits))
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def _pair_key(a: str, b: str, order: list[str]) -> str:
    a, b = sorted((a, b), key=order.index)
    return f"{a}/{b}"


def _neighbor_pairs(index, n: int, k: int, threshold: float):
    """Unordered pairs (i < j) with j among i's k nearest (or i among j's) and cosine >= threshold."""
    firsts, seconds, sims = [], [], []
    for start in range(0, n, SEARCH_BATCH):
        rows = np.arange(start, min(start + SEARCH_BATCH, n))
        s, ids = index.search(rows, k, exclude_self=True)
        hit = (ids >= 0) & (s >= threshold)
        i = np.broadcast_to(rows[:, None], ids.shape)[hit]
        j = ids[hit]
        firsts.append(np.minimum(i, j))
        seconds.append(np.maximum(i, j))
        sims.append(s[hit])
    a = np.concatenate(firsts).astype(np.int64)
    b = np.concatenate(seconds).astype(np.int64)
    sim = np.concatenate(sims).astype(np.float64)
    if len(a) == 0:
        return a, b, sim
    key = a * n + b
    uniq, inverse = np.unique(key, return_inverse=True)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inverse, sim)  # both directions found: the larger (they differ only under IVF)
    return uniq // n, uniq % n, best


#: The files find_duplicates writes into its folder (replaced only with ``overwrite``).
REPORT_FILES = ("duplicates.json", "duplicate_pairs.csv", "duplicates.md")


def find_duplicates(cache_path, out_dir, *, threshold: float = 0.95, k: int = 10, max_examples: int = 20,
                    overwrite: bool = False) -> dict:
    """Find near-duplicate pairs and leaky splits in a pooled cache; write the reports into ``out_dir``.

    Returns the dict written to ``duplicates.json``: ``n``, ``dim``, ``threshold``, ``k``,
    ``index`` (``kind``, ``nlist``, ``nprobe``, ``device``, ``recall_at_k``: measured on 1000
    sampled rows when the index is approximate, else null), ``near_duplicate_pairs`` (total),
    ``within_split`` (pairs per split, e.g. ``train/train``), ``cross_split_pairs`` (total),
    ``split_pairs``: per cross-split pair (``train/val``, ``train/test``, ``val/test``, ...)
    ``near_duplicates`` (pairs) and ``shared_identities`` (identities with samples in both
    splits), ``shared_identity_examples`` (a few identities per split pair) and ``files``.
    An earlier report in ``out_dir`` (:data:`REPORT_FILES`) is replaced only with ``overwrite``.
    """
    check_out(out_dir, overwrite=overwrite, files=REPORT_FILES)  # a wrong --out is one line, before any work
    threshold = _check_threshold(threshold)
    k = check_k(k)
    if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 0:
        raise FeatcacheError(f"max_examples must be an integer of at least 0, got {max_examples!r}")
    cache = open_pooled(cache_path)
    data = cache.load()
    meta = data.meta
    n, dim = data.features.shape
    if n < 2:
        raise FeatcacheError(f"{cache.path} has {n} readable sample(s); duplicates need at least 2")
    ids = meta["sample_id"].astype(str).to_numpy()
    split = meta_column(meta, "split").astype(str)
    identity = np.array(["" if v is None else str(v) for v in meta_column(meta, "identity")], dtype=object)

    index = build_index(data.features)
    del data  # build_index holds the unit copy; free the loaded features
    recall = index.recall_at_k(k=min(k, index.n - 1), n_queries=1000) if index.kind != "exact" else None
    a, b, sim = _neighbor_pairs(index, n, k, threshold)

    pairs = pd.DataFrame({
        "a": ids[a], "b": ids[b], "similarity": sim, "split_a": split[a], "split_b": split[b],
        "identity_a": identity[a], "identity_b": identity[b], "cross_split": split[a] != split[b],
    }, columns=list(PAIR_COLUMNS))
    pairs = pairs.sort_values(["similarity", "a", "b"], ascending=[False, True, True], kind="stable")
    pairs = pairs.reset_index(drop=True)

    order = _split_order(list(SPLITS) + split.tolist())
    keys = [_pair_key(x, y, order) for x, y in zip(pairs["split_a"], pairs["split_b"])]
    counts = pd.Series(keys, dtype=object).value_counts().to_dict() if keys else {}
    present = _split_order(split.tolist())
    within = {f"{s}/{s}": int(counts.get(f"{s}/{s}", 0)) for s in present}
    cross_names = [f"{x}/{y}" for x, y in itertools.combinations(order, 2)]

    shared, examples = _shared_identities(split, identity, order, max_examples)
    split_pairs = {name: {"near_duplicates": int(counts.get(name, 0)), "shared_identities": shared[name]}
                   for name in cross_names}

    out = Path(out_dir)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "duplicates.json"), "pairs": str(out / "duplicate_pairs.csv"),
             "markdown": str(out / "duplicates.md")}
    result = {
        "cache": str(cache.path), "fingerprint": cache.fingerprint, "n": int(n), "dim": int(dim),
        "threshold": threshold, "k": k,
        "index": {"kind": index.kind, "nlist": index.nlist, "nprobe": index.nprobe, "device": index.device,
                  "recall_at_k": recall, "recall_k": min(k, index.n - 1) if recall is not None else None},
        "near_duplicate_pairs": int(len(pairs)),
        "within_split": within,
        "cross_split_pairs": int(pairs["cross_split"].sum()),
        "split_pairs": split_pairs,
        "leaky": any(v["near_duplicates"] or v["shared_identities"] for v in split_pairs.values()),
        "shared_identity_examples": examples,
        "files": files,
    }
    write_atomic(files["pairs"], pairs.to_csv(index=False))
    write_atomic(files["json"], json.dumps(result, indent=2) + "\n")
    write_atomic(files["markdown"], _markdown(result, pairs, max_examples))
    return result


def _check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = math.nan
    if not -1.0 < t <= 1.0:  # NaN fails too
        raise FeatcacheError(f"threshold is a cosine similarity in (-1, 1], got {threshold!r}; e.g. 0.95")
    return t


def _shared_identities(split: np.ndarray, identity: np.ndarray, order: list[str], max_examples: int):
    """Per split pair: the number of (non-empty) identities with samples in both, and a few of them."""
    names = [f"{x}/{y}" for x, y in itertools.combinations(order, 2)]
    shared = dict.fromkeys(names, 0)
    examples = {name: [] for name in names}
    has = identity != ""
    if not has.any():
        return shared, examples
    table = pd.crosstab(pd.Series(identity[has], name="identity"), pd.Series(split[has], name="split")) > 0
    for x, y in itertools.combinations(order, 2):
        if x in table and y in table:
            both = table.index[(table[x] & table[y]).to_numpy()]
            shared[f"{x}/{y}"] = int(len(both))
            examples[f"{x}/{y}"] = sorted(map(str, both))[:max_examples]
    return shared, examples


def _markdown(result: dict, pairs: pd.DataFrame, max_examples: int) -> str:
    idx = result["index"]
    search = f"{idx['kind']} index"
    if idx["recall_at_k"] is not None:
        search += f" (nlist {idx['nlist']}, nprobe {idx['nprobe']}, recall@{idx['recall_k']} {idx['recall_at_k']:.3f})"
    lines = [
        "# Near-duplicates and leaky splits", "",
        f"Cache `{result['cache']}`: {result['n']} samples × {result['dim']}. A pair is a near-duplicate when one "
        f"sample is among the other's {result['k']} nearest neighbours with cosine ≥ {result['threshold']:g} "
        f"({search}).", "",
        f"Near-duplicate pairs: {result['near_duplicate_pairs']}, of which {result['cross_split_pairs']} cross "
        "splits; within splits: " + (", ".join(f"{k} {v}" for k, v in result["within_split"].items()) or "none")
        + ".", "",
        "## Per split pair", "",
    ]
    table = pd.DataFrame([{"splits": name, "near-duplicate pairs": v["near_duplicates"],
                           "shared identities": v["shared_identities"]}
                          for name, v in result["split_pairs"].items()])
    lines.append(markdown_table(table))
    cross = pairs[pairs["cross_split"]].head(max_examples)
    lines += ["## Worst cross-split near-duplicates", ""]
    if len(cross):
        lines.append(markdown_table(cross.drop(columns="cross_split").reset_index(drop=True), ".4f"))
    else:
        lines += ["None at this threshold.", ""]
    shown = {k: v for k, v in result["shared_identity_examples"].items() if v}
    if shown:
        lines += ["## Identities in two splits", ""]
        for name, ids in shown.items():
            more = result["split_pairs"][name]["shared_identities"] - len(ids)
            lines.append(f"- {name}: " + ", ".join(f"`{i}`" for i in ids) + (f" and {more} more" if more > 0 else ""))
        lines.append("")
    return "\n".join(lines)
