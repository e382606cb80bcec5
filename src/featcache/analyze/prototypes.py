"""`featcache analyze prototypes`: what the XAI head's prototypes stand for, with FAISS.

For each prototype (bonafide, spoof) of a trained ``xai`` run, the frames of a frames cache
nearest to it (cosine, through :func:`featcache.analyze.index.build_index`: exact inner product
on unit vectors, IVF for large N, GPU when present), with their utterance, time and label; the
neighbour label purity at k = 10, 50, 100 (the fraction of the k nearest frames whose class is
the prototype's class); and the distance between the prototypes.  A frame's class is its frame
label where known, else its utterance's label.  Writes ``prototypes.json``, ``prototypes.md``
and ``prototypes_map.png`` (PCA of frames coloured by class, prototypes marked).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import open_cache
from ..data.audio import FRAME_HOP, FRAME_WINDOW, SAMPLE_RATE
from ..errors import FeatcacheError, check_out, write_atomic, writing
from ..heads.task import load_run
from ..report.plots import plot_embedding_map
from ..report.tables import markdown_table
from .index import build_index

CLASSES = ("bonafide", "spoof")
KS = (10, 50, 100)


def prototype_purity(frames: np.ndarray, frame_class: np.ndarray, prototypes: np.ndarray, ks=KS,
                     device: str = "auto") -> tuple[dict, np.ndarray, np.ndarray, object]:
    """Purity@k of each prototype's nearest frames: {class name: {k: purity}}, plus sims and ids.

    Prototype c is judged against class c; k larger than the number of frames is capped.
    """
    index = build_index(frames, device=device)
    k_max = min(max(ks), index.n)
    sims, ids = index.search(prototypes, k_max)
    purity = {}
    for c, name in enumerate(CLASSES[: len(prototypes)]):
        row = {}
        for k in ks:
            kk = min(k, k_max)
            row[k] = float(np.mean(frame_class[ids[c, :kk]] == c))
        purity[name] = row
    return purity, sims, ids, index


def analyze_prototypes(run_dir, cache=None, out=None, *, split: str | None = None, top: int = 10,
                       max_map_points: int = 5000, device: str = "auto", seed: int = 0, overwrite: bool = False) -> dict:
    """Run the analysis of the module docstring; returns the JSON report (also written to ``out``,
    ``RUN/prototypes`` by default; an earlier report there is replaced only with ``overwrite``)."""
    import torch

    run_dir = Path(run_dir)
    check_out(out if out else run_dir / "prototypes", overwrite=overwrite,  # a wrong --out: one line, before any work
              files=("prototypes.json", "prototypes.md", "prototypes_map.png"))
    task = load_run(run_dir, "cpu")
    if task.name != "xai":
        raise FeatcacheError(f"{run_dir} is a {task.name} run; analyze prototypes reads an xai run")
    cache_path = cache or task.conf.cache.path
    if not cache_path:
        raise FeatcacheError(f"{run_dir} does not record its cache; pass --cache")
    c = open_cache(cache_path)
    task.check_cache(c)
    d = c.load_frames(split, columns=["sample_id", "label", "split"])
    frames, fl, off = d.arrays["frames"], d.arrays["frame_labels"].astype(np.int64), d.arrays["offsets"]
    if len(frames) == 0:
        raise FeatcacheError(f"{cache_path} has no frames{' in split ' + split if split else ''}")
    utt = np.repeat(np.arange(len(d.meta)), np.diff(off))
    utt_label = d.meta["label"].to_numpy().astype(np.int64)[utt]
    frame_class = np.where(fl >= 0, fl, utt_label)
    with torch.no_grad():
        # the run's head is a 1-run stacked module: prototypes (1, 2, D), embed (R, B, T, D)
        protos = task.module.unit_prototypes()[0].cpu().numpy().astype(np.float32)
        frames = task.module.embed(torch.from_numpy(frames)[None, None])[0, 0].numpy()  # centred, unit
    purity, sims, ids, index = prototype_purity(frames, frame_class, protos, KS, device=device)
    nearest = {}
    for ci, name in enumerate(CLASSES):
        rows = []
        for s, i in zip(sims[ci, :top], ids[ci, :top]):
            u = int(utt[i])
            rows.append({"sample_id": str(d.meta["sample_id"].iloc[u]), "split": str(d.meta["split"].iloc[u]),
                         "second": round(float(((i - off[u]) * FRAME_HOP + FRAME_WINDOW / 2) / SAMPLE_RATE), 3),
                         "frame_label": int(fl[i]), "utterance_label": int(utt_label[i]), "cosine": float(s)})
        nearest[name] = rows
    cos = float(protos[0] @ protos[1])
    report = {
        "run": str(run_dir), "cache": str(cache_path), "split": split or "all", "frames": int(len(frames)),
        "index": {"kind": index.kind, "device": index.device, "nlist": index.nlist, "nprobe": index.nprobe},
        "prototype_mode": task.spec.get("prototype_mode"),
        "prototype_cosine": cos, "prototype_distance": float(np.sqrt(max(0.0, 2 - 2 * cos))),
        "purity": purity, "class_fraction": {n: float(np.mean(frame_class == i)) for i, n in enumerate(CLASSES)},
        "nearest": nearest,
    }
    out = Path(out) if out else run_dir / "prototypes"
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "prototypes.json", json.dumps(report, indent=2))
    table = pd.DataFrame([{"prototype": n, **{f"purity@{k}": purity[n][k] for k in KS},
                           "class fraction": report["class_fraction"][n]} for n in CLASSES])
    md = [f"# Prototypes of {run_dir}", "",
          f"{len(frames)} frames of {cache_path} ({report['split']}), {index.kind} index; prototype cosine "
          f"{cos:.3f}, distance {report['prototype_distance']:.3f}.", "", markdown_table(table), ""]
    for name in CLASSES:
        md += [f"## Frames nearest the {name} prototype", "", markdown_table(pd.DataFrame(nearest[name]), ".3f"), ""]
    write_atomic(out / "prototypes.md", "\n".join(md))
    # the map: PCA of unit frames (a seeded sample) with the prototypes projected alike
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(frames), size=min(max_map_points, len(frames)), replace=False)
    unit = index.vectors[pick]
    pca = PCA(n_components=2, random_state=seed).fit(unit)
    names = np.array([CLASSES[v] + " frame" for v in frame_class[pick]], dtype=object)
    plot_embedding_map(pca.transform(unit), names, out / "prototypes_map.png",
                       title=f"frames (PCA) and prototypes of {run_dir.name}", legend_title="class",
                       marks={f"p_{n}": xy for n, xy in zip(CLASSES, pca.transform(protos))})
    return report
