"""The demographic leakage audit: how much race, gender, subgroup and label the features carry.

Three views of the same question, each against its own chance level:

- **kNN purity@k** (leave-one-out on the train split): the mean fraction of a row's ``k`` nearest
  cosine neighbours that share its value.  Without leakage it is the chance that two random rows
  agree, ``purity_chance`` = Σ_c n_c (n_c − 1) / (n (n − 1)) over the train classes (about the
  base rate: 0.5 for a balanced binary attribute).
- **weighted kNN accuracy** train → val: each val row is predicted by its ``k`` nearest train rows,
  each voting with weight exp(cos / temperature) (the usual 0.07); chance is the val majority rate.
- **linear probe accuracy** train → val: a standardised logistic regression
  (:func:`featcache.heads.stage1.probe_accuracy`); chance is the val majority rate.

Unknown values (empty race or gender, subgroup or label -1) are left out: a row with an unknown
value is neither a query nor a neighbour for that attribute.  :func:`audit_features` builds each
attribute's index over the train rows whose value is known; :func:`knn_purity`, given an index
that holds rows of unknown value, does not count those neighbours (nor the ids -1 that pad a
short result) in a row's denominator, and leaves out of the mean a row none of whose neighbours
is known.  Every neighbour search goes through :func:`featcache.analyze.index.build_index`.

>>> result = audit_subgroups("caches/ffpp_clip", "reports/leakage", adapter_run="runs/stage1")
>>> result["before"], result["after"]          # one row per attribute, raw and debiased features
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import GENDERS, RACES
from ..errors import FeatcacheError, check_out, write_atomic, writing
from ..heads.stage1 import probe_accuracy
from ..heads.task import load_run
from ..progress import bar as tqdm
from ..report.plots import plot_leakage_audit
from ..report.tables import markdown_table
from ..runtime import to_json
from .index import NeighborIndex, build_index
from .neighbors import open_pooled

ATTRIBUTES = ("race", "gender", "subgroup", "label")
KNN_K = 20  # neighbours of the weighted kNN vote in the audit
TEMPERATURE = 0.07  # its temperature: weight exp(cos / T)
_BATCH = 16_384  # queries per FAISS search call: bounds the (batch, k) result arrays


# -- encodings --------------------------------------------------------------------------------
def encode_attribute(meta: pd.DataFrame, attribute: str) -> np.ndarray:
    """Integer codes of ``attribute`` for each row of ``meta``; -1 where unknown.

    race and gender strings map through :data:`RACES` / :data:`GENDERS` (empty or any other
    value is unknown); subgroup and label are used as stored (-1 unknown).
    """
    if attribute not in ATTRIBUTES:
        raise FeatcacheError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    values = meta[attribute]
    if attribute in ("race", "gender"):
        vocab = {v: i for i, v in enumerate(RACES if attribute == "race" else GENDERS)}
        return np.array([vocab.get(str(v), -1) for v in values], dtype=np.int64)
    codes = values.to_numpy().astype(np.int64)
    return np.where(codes >= 0, codes, -1)


def known_mask(labels: np.ndarray) -> np.ndarray:
    """Rows with a known label: >= 0 for numbers, non-empty for strings."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iuf":
        return labels >= 0
    if labels.dtype.kind == "b":
        return np.ones(len(labels), dtype=bool)
    return np.array([v is not None and str(v) != "" and str(v) != "nan" for v in labels], dtype=bool)


def _codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes 0..C-1 for known labels (-1 for unknown) and the classes in code order."""
    labels = np.asarray(labels)
    known = known_mask(labels)
    classes, inverse = np.unique(labels[known], return_inverse=True)
    codes = np.full(len(labels), -1, dtype=np.int64)
    codes[known] = inverse
    return codes, classes


def _check_ks(ks) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise FeatcacheError(f"ks must be positive neighbour counts such as 10,20,50; got {ks}")
    return ks


# -- the three measures -----------------------------------------------------------------------
def knn_purity(index: NeighborIndex, labels: np.ndarray, ks=(10, 20, 50)) -> dict[int, float]:
    """Leave-one-out kNN purity: {k: mean fraction of a row's k nearest neighbours sharing its label}.

    ``labels`` has one value per indexed row (ints with -1 unknown, or strings with "" unknown).
    Rows of unknown label are not queried; neighbours of unknown label (and padding ids -1) are
    not counted in the denominator; a row with no known neighbour is left out of the mean (NaN
    when no row is left).  All ``k`` come from one search of ``max(ks)`` neighbours.
    """
    ks = _check_ks(ks)
    codes, _ = _codes(labels)
    if len(codes) != index.n:
        raise FeatcacheError(f"knn_purity: {len(codes)} labels for an index of {index.n} rows")
    rows = np.flatnonzero(codes >= 0)
    kmax = max(ks)
    hits = {k: np.zeros(len(rows)) for k in ks}
    counted = {k: np.zeros(len(rows)) for k in ks}
    for start in range(0, len(rows), _BATCH):
        batch = rows[start:start + _BATCH]
        _, ids = index.search(batch, kmax, exclude_self=True)
        # a short index can hand back the row itself or padding ids; neither is a neighbour
        valid = (ids >= 0) & (ids != batch[:, None])
        nb = np.where(valid, codes[np.clip(ids, 0, None)], -1)
        known = nb >= 0
        same = known & (nb == codes[batch][:, None])
        for k in ks:
            hits[k][start:start + len(batch)] = same[:, :k].sum(1)
            counted[k][start:start + len(batch)] = known[:, :k].sum(1)
    out = {}
    for k in ks:
        keep = counted[k] > 0
        out[k] = float(np.mean(hits[k][keep] / counted[k][keep])) if keep.any() else float("nan")
    return out


def weighted_knn_accuracy(train_index: NeighborIndex, train_labels: np.ndarray, queries: np.ndarray,
                          query_labels: np.ndarray, k: int = 20, temperature: float = 0.07) -> float:
    """Accuracy of a weighted kNN vote: each query's k nearest train rows vote exp(cos / temperature).

    Train neighbours of unknown label do not vote; queries of unknown label are not scored; a
    query no known neighbour votes for counts as wrong.  Ties go to the first class in sorted
    order.  NaN when no query has a known label.
    """
    k = _check_ks([k])[0]
    if not temperature > 0:
        raise FeatcacheError(f"temperature must be positive (e.g. 0.07), got {temperature}")
    train_labels, query_labels = np.asarray(train_labels), np.asarray(query_labels)
    if len(train_labels) != train_index.n:
        raise FeatcacheError(f"weighted_knn_accuracy: {len(train_labels)} labels for an index of {train_index.n} rows")
    if len(query_labels) != len(queries):
        raise FeatcacheError(f"weighted_knn_accuracy: {len(query_labels)} labels for {len(queries)} queries")
    tcodes, classes = _codes(train_labels)
    qknown = known_mask(query_labels)
    if not qknown.any():
        return float("nan")
    # queries' labels in the train classes' codes; a class train never saw cannot be predicted
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    qcodes = np.array([lookup.get(v, -2) for v in np.asarray(query_labels)[qknown].tolist()], dtype=np.int64)
    q = np.asarray(queries)[qknown]
    correct = 0
    for start in range(0, len(q), _BATCH):
        sims, ids = train_index.search(q[start:start + _BATCH], k)
        nb = np.where(ids >= 0, tcodes[np.clip(ids, 0, None)], -1)
        # exp((cos - best cos) / T): the same argmax as exp(cos / T), without overflow or underflow
        s = np.where(nb >= 0, sims.astype(np.float64), -np.inf)
        top = np.max(s, axis=1, keepdims=True)
        w = np.where(nb >= 0, np.exp((s - np.where(np.isfinite(top), top, 0.0)) / temperature), 0.0)
        votes = np.zeros((len(nb), max(len(classes), 1)))
        np.add.at(votes, (np.repeat(np.arange(len(nb)), nb.shape[1]), np.clip(nb, 0, None).ravel()), w.ravel())
        pred = np.where(votes.sum(1) > 0, votes.argmax(1), -3)
        correct += int((pred == qcodes[start:start + _BATCH]).sum())
    return correct / len(q)


# -- the audit table --------------------------------------------------------------------------
def _pair_rate(codes: np.ndarray) -> float:
    """Chance that two distinct random rows share a class: Σ n_c (n_c − 1) / (n (n − 1))."""
    n_c = np.bincount(codes).astype(np.float64)
    n = n_c.sum()
    return float((n_c * (n_c - 1)).sum() / (n * (n - 1))) if n > 1 else float("nan")


def _index_info(index: NeighborIndex, ks: list[int], seed: int) -> dict:
    return {"rows": index.n, "kind": index.kind, "device": index.device, "nlist": index.nlist, "nprobe": index.nprobe,
            "recall_at_k": None if index.kind == "exact" else {k: index.recall_at_k(k, seed=seed) for k in ks}}


def _audit_one(attribute, train_x, train_meta, val_x, val_meta, ks, seed, knn_k, temperature, built, indexes):
    """The audit row of one attribute, or None when it has fewer than two known classes."""
    ytr, yva = encode_attribute(train_meta, attribute), encode_attribute(val_meta, attribute)
    ktr, kva = ytr >= 0, yva >= 0
    if len(np.unique(ytr[ktr])) < 2 or not kva.any() or ktr.sum() < 3:
        return None  # fewer than two known classes to tell apart: nothing to audit
    key = np.packbits(ktr).tobytes()
    if key not in built:  # one index per set of known rows (race, gender, subgroup often share it)
        index = build_index(train_x[ktr], seed=seed)
        built[key] = (index, {"attributes": [], **_index_info(index, ks, seed)})
        indexes.append(built[key][1])
    index, info = built[key]
    info["attributes"].append(attribute)
    purity = knn_purity(index, ytr[ktr], ks)
    classes = len(np.union1d(np.unique(ytr[ktr]), np.unique(yva[kva])))
    return {
        "attribute": attribute, "classes": int(classes), "n_train": int(ktr.sum()), "n_val": int(kva.sum()),
        "chance": float(pd.Series(yva[kva]).value_counts(normalize=True).iloc[0]),
        "uniform": 1.0 / classes, "purity_chance": _pair_rate(ytr[ktr]),
        **{f"purity@{k}": purity[k] for k in ks},
        "knn_acc": weighted_knn_accuracy(index, ytr[ktr], val_x[kva], yva[kva], k=knn_k, temperature=temperature),
        "probe_acc": probe_accuracy(train_x[ktr], ytr[ktr], val_x[kva], yva[kva], seed=seed),
    }


def _audit(train_x, train_meta, val_x, val_meta, ks, seed, knn_k, temperature, bar=None, name=""):
    """The audit table and what each index was (kind, rows, recall@k when approximate)."""
    ks = _check_ks(ks)
    train_x, val_x = np.asarray(train_x, dtype=np.float32), np.asarray(val_x, dtype=np.float32)
    if len(train_x) != len(train_meta) or len(val_x) != len(val_meta):
        raise FeatcacheError("audit_features: features and meta tables have different numbers of rows")
    rows, indexes, built = [], [], {}
    for attribute in ATTRIBUTES:
        if bar is not None:
            bar.set_postfix_str(f"{name} {attribute}".strip())
        row = None
        if attribute in train_meta and attribute in val_meta:
            row = _audit_one(attribute, train_x, train_meta, val_x, val_meta, ks, seed, knn_k, temperature,
                             built, indexes)
        if row is not None:
            rows.append(row)
        if bar is not None:
            bar.update(1)
    columns = ["attribute", "classes", "n_train", "n_val", "chance", "uniform", "purity_chance",
               *[f"purity@{k}" for k in ks], "knn_acc", "probe_acc"]
    return pd.DataFrame(rows, columns=columns), indexes


def audit_features(train_x, train_meta: pd.DataFrame, val_x, val_meta: pd.DataFrame, ks=(10, 20, 50),
                   seed: int = 0, *, knn_k: int = KNN_K, temperature: float = TEMPERATURE) -> pd.DataFrame:
    """One row per attribute of :data:`ATTRIBUTES` with at least two known classes on train.

    Columns: ``attribute``, ``classes`` (known classes in train ∪ val), ``n_train`` / ``n_val``
    (rows of known value), ``chance`` (val majority-class rate: the floor of ``knn_acc`` and
    ``probe_acc``), ``uniform`` (1 / classes), ``purity_chance`` (the purity of features that carry
    nothing of the attribute), ``purity@k`` for each k (train, leave-one-out), ``knn_acc``
    (weighted kNN train → val, ``knn_k`` neighbours) and ``probe_acc`` (logistic regression
    train → val).  ``seed`` seeds the probe and, above 10^5 rows, the IVF index.
    """
    return _audit(train_x, train_meta, val_x, val_meta, ks, seed, knn_k, temperature)[0]


def _change_table(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """after − before for each rate, per attribute present in both."""
    rates = [c for c in before.columns if c.startswith("purity@") or c in ("knn_acc", "probe_acc")]
    merged = before.merge(after, on="attribute", suffixes=("_before", "_after"))
    out = merged[["attribute"]].copy()
    for c in rates:
        out[c] = merged[f"{c}_after"] - merged[f"{c}_before"]
    return out


def _splits_of(cache) -> pd.Series:
    return cache.meta(["split"])["split"].value_counts()


def _check_split(cache, split: str, counts: pd.Series, role: str) -> None:
    if counts.get(split, 0) == 0:
        have = ", ".join(f"{s} ({n})" for s, n in counts.items()) or "none"
        raise FeatcacheError(f"{cache.path} has no rows in split {split!r} (the {role} split); "
                             f"pass one of its splits: {have}")


def audit_subgroups(cache_path, out_dir, *, adapter_run=None, split_train: str = "train", split_val: str = "val",
                    ks=(10, 20, 50), progress: bool = True, seed: int = 0, device=None, overwrite: bool = False) -> dict:
    """The leakage audit of a cache, before and (with a Stage-1 ``adapter_run``) after debiasing.

    Writes ``out_dir/subgroups.json`` (the tables, each index's kind, rows and — for an approximate
    index — recall@k, the cache's fingerprint), ``subgroups.md`` (before / after / change tables)
    and ``subgroups.png`` (per attribute: purity@k, kNN and probe accuracy against their chance
    levels; raw beside debiased).  Returns the dict written to the JSON.  An earlier audit in
    ``out_dir`` is replaced only with ``overwrite``.
    """
    ks = _check_ks(ks)
    # a wrong --out, or an earlier audit there without overwrite, is one line before the audit
    check_out(out_dir, overwrite=overwrite, files=("subgroups.json", "subgroups.md", "subgroups.png"))
    cache = open_pooled(cache_path, "analyze subgroups")
    counts = _splits_of(cache)
    _check_split(cache, split_train, counts, "train")
    _check_split(cache, split_val, counts, "val")
    task = None
    if adapter_run is not None:
        task = load_run(adapter_run, device)
        if task.name != "stage1":
            raise FeatcacheError(f"{adapter_run} is a {task.name} run, not a stage1 run; pass a Stage-1 run "
                                 "(featcache train-head stage1) as the adapter")
        task.check_cache(cache)

    # one read of the cache for both splits (each load reads every part)
    data = cache.load(sorted({split_train, split_val}))
    is_train = (data.meta["split"] == split_train).to_numpy()
    is_val = (data.meta["split"] == split_val).to_numpy()
    train = _Split(data.features[is_train], data.meta[is_train].reset_index(drop=True))
    val = _Split(data.features[is_val], data.meta[is_val].reset_index(drop=True))
    if not len(train) or not len(val):
        raise FeatcacheError(f"{cache.path}: every row of split {split_train!r} or {split_val!r} failed to read; "
                             "see its errors.jsonl and re-extract")
    feature_sets = {"before": (train.features, val.features)}
    if task is not None:
        import torch

        feature_sets["after"] = tuple(task.transform(torch.from_numpy(np.array(d.features))).float().cpu().numpy()
                                      for d in (train, val))
    result = {
        "cache": {"path": str(Path(cache_path).resolve()), "fingerprint": cache.fingerprint, "kind": cache.kind,
                  "backbone": {k: cache.backbone.get(k) for k in ("name", "model", "pretrained", "layer")},
                  "dim": int(train.features.shape[1])},
        "splits": {"train": split_train, "val": split_val, "n_train": len(train), "n_val": len(val)},
        "ks": ks, "knn": {"k": KNN_K, "temperature": TEMPERATURE},
        "adapter_run": str(Path(adapter_run).resolve()) if adapter_run is not None else None,
    }
    tables = {}
    with tqdm(total=len(ATTRIBUTES) * len(feature_sets), desc="leakage audit", unit="attr",
              disable=not progress) as bar:
        for name, (xtr, xva) in feature_sets.items():
            table, indexes = _audit(xtr, train.meta, xva, val.meta, ks, seed, KNN_K, TEMPERATURE, bar,
                                     "raw" if name == "before" else "debiased")
            tables[name] = table
            result[name] = table.to_dict(orient="records")
            result.setdefault("index", {})[name] = indexes
    if not len(tables["before"]):
        raise FeatcacheError(f"{cache.path} has no attribute with two known classes in {split_train!r} "
                             f"(race, gender, subgroup, label); fill them in the manifest and re-extract")
    if task is not None:
        change = _change_table(tables["before"], tables["after"])
        tables["change"] = change
        result["change"] = change.to_dict(orient="records")
    else:
        result["after"] = result["change"] = None

    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    result["files"] = {n: str(out_dir / f"subgroups.{n}") for n in ("json", "md", "png")}
    write_atomic(out_dir / "subgroups.json", to_json(result))
    result["markdown"] = _markdown(result, tables, markdown_table)
    write_atomic(out_dir / "subgroups.md", result["markdown"])
    plot_leakage_audit(tables["before"], tables.get("after"), out_dir / "subgroups.png", k=ks[0],
                       title=f"leakage audit: {Path(cache_path).name} ({split_train} -> {split_val})")
    return result


@dataclass
class _Split:
    features: np.ndarray
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)


def _markdown(result: dict, tables: dict, markdown_table) -> str:
    c, s = result["cache"], result["splits"]
    lines = [
        "# Demographic leakage audit", "",
        f"Cache `{c['path']}` ({c['backbone'].get('name')} {c['backbone'].get('model')}, fingerprint "
        f"`{c['fingerprint'][:12]}`); purity on `{s['train']}` ({s['n_train']} rows, leave-one-out), "
        f"kNN and probe accuracy `{s['train']}` → `{s['val']}` ({s['n_val']} rows).", "",
        "`chance` is the val majority rate (the floor of `knn_acc` and `probe_acc`); `purity_chance` is the "
        "purity of features that carry nothing of the attribute. Rows of unknown value are left out.", "",
    ]
    for name, idx in result["index"].items():
        for info in idx:
            recall = ("" if info["recall_at_k"] is None else
                      ", recall " + ", ".join(f"@{k} {r:.3f}" for k, r in info["recall_at_k"].items()))
            lines.append(f"- index ({name}, {', '.join(info['attributes'])}): {info['kind']} over "
                         f"{info['rows']} rows{recall}")
    lines.append("")
    titles = {"before": "Raw features" + (" (before the adapter)" if result["adapter_run"] else ""),
              "after": f"Debiased features (after the adapter `{result['adapter_run']}`)",
              "change": "Change (after − before; negative = leakage removed)"}
    for name in ("before", "after", "change"):
        if name in tables:
            lines += [f"## {titles[name]}", "", markdown_table(tables[name])]
    return "\n".join(lines)
