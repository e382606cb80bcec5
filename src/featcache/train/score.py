"""``featcache score PREDICTIONS.csv --out DIR``: featcache's evaluation of any detector's predictions.

A detector that never touched a cache (DeepfakeBench's, PG-FDD's, your own) gets the same
metrics.json, report.md, subgroups.csv and plots as ``featcache evaluate``, through the same
writer (:func:`featcache.train.evaluate.write_evaluation`), from a CSV with one row per test sample:

- ``label``: 0 (real) or 1 (fake) (``real``/``fake`` are read too);
- ``prob``: P(fake) in [0, 1] (apply the sigmoid or softmax to logits first);
- optional ``identity``: the person (or video) a row belongs to: the bootstrap resamples whole
  identities; optional ``video``: the video of a frame, for ``video_auc``;
- optional demographics: ``subgroup`` (featcache's codes 0..7, negative or empty = unknown; PG-FDD's
  ``intersec_label`` uses the same codes and is read as such), or ``race`` and ``gender`` in
  featcache's words (male/female; asian/white/black/other) or FairFace's (Male, East Asian, Indian,
  ...), mapped as the manifests map them (:data:`featcache.data.manifest.RACE_VOCABULARIES`);
  empty = unknown. Without any, the fairness metrics are "not available".

``--val VAL.csv`` (the same columns, the detector's validation predictions) gives the threshold
chosen on val (``--threshold``: ``val_eer`` by default, ``val_fpr=<x>``) and the metrics at it,
as a run's ``evaluation.threshold`` does. Every other column is kept in the written
predictions.csv. A malformed CSV is one error naming the column and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..data.manifest import (
    GENDER_VOCABULARIES,
    GENDERS,
    LABEL_VALUES,
    RACE_VOCABULARIES,
    RACES,
    subgroup_code,
)
from ..errors import FeatcacheError
from ..heads.task import Task
from ..metrics import prob_metrics
from ..metrics.threshold import DEFAULT_RULE
from .evaluate import Evaluation, check_target, sha256_file, write_evaluation

#: Columns read as the subgroup code, in order of preference (PG-FDD's ``intersec_label`` has featcache's codes).
SUBGROUP_COLUMNS = ("subgroup", "intersec_label")


def _vocabulary(vocabularies: dict[str, dict[str, str]]) -> dict[str, str]:
    """Every known spelling (any case) -> featcache's word."""
    out = {}
    for vocab in vocabularies.values():
        for k, v in vocab.items():
            out[k.lower()] = v
    return out


def _bad_rows(mask: np.ndarray, values: pd.Series) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(f"line {i + 2}: {values.iloc[i]!r}" for i in rows[:3])
    return f"{len(rows)} row(s) ({shown}{', ...' if len(rows) > 3 else ''})"


def read_predictions(path) -> pd.DataFrame:
    """The predictions CSV at ``path`` checked and normalized: ``label`` (int 0/1), ``prob`` (float),
    ``subgroup`` (int codes, -1 unknown; all -1 without demographics), ``identity`` (text) when given,
    and every other column as read."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"predictions file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"{path} is not a readable CSV ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    found = ", ".join(df.columns) or "none"
    for col, what in (("label", "0 (real) or 1 (fake) per row"), ("prob", "P(fake) per row, in [0, 1]")):
        if col not in df:
            raise FeatcacheError(f"{path} has no {col!r} column ({what}); found: {found}. Rename the detector's "
                                 f"column to {col}")
    if len(df) == 0:
        raise FeatcacheError(f"{path} has no rows")
    raw = df["label"].str.strip().str.lower()
    label = raw.map(lambda v: LABEL_VALUES.get(v, LABEL_VALUES.get(v[:-2]) if v.endswith(".0") else None))
    if label.isna().any():
        raise FeatcacheError(f"{path}: column 'label' must hold 0 (real) or 1 (fake); "
                             f"{_bad_rows(label.isna().to_numpy(), df['label'])} do not")
    prob = pd.to_numeric(df["prob"].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(prob) | (prob < 0) | (prob > 1)
    if bad.any():
        raise FeatcacheError(f"{path}: column 'prob' must hold P(fake) in [0, 1]; {_bad_rows(bad, df['prob'])} do not "
                             "(logits? apply the sigmoid, or the softmax's fake column, first)")
    out = df.copy()
    out["label"] = label.astype(np.int64).to_numpy()
    out["prob"] = prob
    out["subgroup"] = _subgroups(df, path)
    if "identity" in out:
        out["identity"] = out["identity"].str.strip()
    return out


def _subgroups(df: pd.DataFrame, path: Path) -> np.ndarray:
    column = next((c for c in SUBGROUP_COLUMNS if c in df), None)
    if column is not None:
        text = df[column].str.strip()
        codes = pd.to_numeric(text.where(text != "", "-1"), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(codes) | (codes != np.round(codes)) | (codes >= len(GENDERS) * len(RACES))
        if bad.any():
            raise FeatcacheError(f"{path}: column {column!r} must hold subgroup codes 0..7 (gender-major: "
                                 f"0 male-asian ... 7 female-other; -1 or empty unknown); "
                                 f"{_bad_rows(bad, df[column])} do not")
        return np.where(codes < 0, -1, codes).astype(np.int64)
    has = [c for c in ("race", "gender") if c in df]
    if len(has) == 1:
        missing = ({"race", "gender"} - set(has)).pop()
        raise FeatcacheError(f"{path} has a {has[0]!r} column but no {missing!r}: the subgroups need both "
                             "(or give a 'subgroup' column with codes 0..7)")
    if not has:
        return np.full(len(df), -1, dtype=np.int64)
    words = {}
    for col, vocabularies, allowed in (("gender", GENDER_VOCABULARIES, GENDERS), ("race", RACE_VOCABULARIES, RACES)):
        vocab = _vocabulary(vocabularies)
        text = df[col].str.strip()
        mapped = text.str.lower().map(lambda v, vocab=vocab: "" if v in ("", "nan", "unknown") else vocab.get(v))
        if mapped.isna().any():
            raise FeatcacheError(f"{path}: column {col!r} holds values featcache cannot map "
                                 f"({_bad_rows(mapped.isna().to_numpy(), df[col])}); use {', '.join(allowed)} "
                                 f"(or FairFace's words), empty for unknown")
        words[col] = mapped.to_numpy()
    return np.array([subgroup_code(g, r) for g, r in zip(words["gender"], words["race"])], dtype=np.int64)


def score_predictions(predictions, out, *, name: str | None = None, val=None, threshold=None,
                      overwrite: bool = False, command: str | None = None) -> Evaluation:
    """Evaluate a detector's predictions CSV into ``out`` (see the module docstring)."""
    predictions, out = Path(predictions), Path(out)
    preds = read_predictions(predictions)
    val_preds = read_predictions(val) if val is not None else None
    provenance = {"predictions": {"path": str(predictions.resolve()), "sha256": sha256_file(predictions)},
                  "val_predictions": ({"path": str(Path(val).resolve()), "sha256": sha256_file(val)}
                                      if val is not None else None),
                  "split": None, "featcache": __version__, "command": command}
    check_target(out, provenance, overwrite=overwrite)
    video = preds["video"].to_numpy() if "video" in preds else None
    metrics = prob_metrics(preds["label"].to_numpy(), preds["prob"].to_numpy(), groups=preds["subgroup"].to_numpy(),
                           identity=video)
    title = f"{name or predictions.stem} (scored predictions)"
    return write_evaluation(None, "test", metrics, preds, detects=True, summary_keys=Task.summary_keys, title=title,
                            out=out, provenance=provenance, threshold_rule=threshold or DEFAULT_RULE,
                            val_predictions=val_preds,
                            val_missing=None if val is not None else "no val predictions (pass --val VAL.csv)")


__all__ = ["read_predictions", "score_predictions"]
