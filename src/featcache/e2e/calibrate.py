"""``featcache calibrate``: temperature scaling of the filter, fitted on a split (val).

p = sigmoid(score / T); T fitted by :func:`featcache.metrics.fit_temperature` (L-BFGS-B in
[0.1, 10], objective ``nll`` or ``ece``).  Where the manifest has no rows in ``split``,
``val_split`` (the design's ``--val-split``, e.g. 0.2) holds out that fraction of the train
split's identities (seeded, identity-disjoint: :func:`featcache.data.adapters.assign_splits`)
and calibrates on them.  Writes into the run:

- ``calibration_temp.json``: temperature, objective, split, n (and ``held_out`` when used);
- ``calibration_metrics.json``: ECE, MCE, Brier, NLL before (T = 1) and after;
- ``plots/reliability_diagram.png``: before and after;
- ``calibrated_predictions.csv``: sample_id, label, score, prob (T = 1), prob_calibrated, ...

The returned report carries ``messages``: a ``note: ...`` for the held-out choice, a
``remark: ...`` when the fitted T is at (within 1 % of) a bound of its search interval.
Later ``evaluate`` and ``cascade`` use the temperature.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..data.adapters import assign_splits
from ..data.manifest import read_manifest
from ..errors import FeatcacheError, write_atomic
from ..metrics import calibration_metrics, fit_temperature, reliability_bins
from ..metrics.calibration import T_BOUNDS
from ..metrics.detection import sigmoid
from ..report.plots import plot_reliability
from ..runtime import RunDir, write_json
from .mnv4 import FilterRun, load_split

OBJECTIVES = ("nll", "ece")
#: A fitted temperature within this relative distance of a bound of T_BOUNDS gets a remark.
BOUND_TOLERANCE = 0.01


def held_out_rows(manifest, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, list[str], dict]:
    """A seeded, identity-disjoint part of the train split: its rows, paths and a description.

    The train rows' identities (a row without one is its own group, keyed by sample_id) are
    cut by :func:`assign_splits` with ``val_fraction=fraction``; the fraction counts
    identities.  Returns ``(rows, paths, info)``, rows indexed 0..n-1.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise FeatcacheError(f"--val-split must be a fraction in (0, 1), e.g. 0.2; got {fraction!r}")
    rows, paths = load_split(manifest, "train")
    ident = rows["identity"].astype(str) if "identity" in rows.columns else pd.Series([""] * len(rows))
    missing = ident.str.len() == 0
    groups = ident.where(~missing, "sample_id:" + rows["sample_id"].astype(str))
    split = pd.Series(assign_splits(groups, val_fraction=float(fraction), test_fraction=0.0, seed=int(seed)))
    keep = (split == "val").to_numpy()
    if not keep.any():
        raise FeatcacheError(f"train has only {groups.nunique()} identities, too few to hold out {fraction:g} of them "
                             "and keep one for training; add a val split to the manifest")
    info = {"from": "train", "fraction": float(fraction), "seed": int(seed), "by": "identity",
            "identities": int(groups[keep].nunique()), "identities_in_train": int(groups.nunique()),
            "rows": int(keep.sum()), "rows_without_identity": int(missing.sum())}
    held = rows[keep].reset_index(drop=True)
    return held, [p for p, k in zip(paths, keep) if k], info


def temperature_remark(t: float, where: str, bounds=T_BOUNDS) -> str | None:
    """A ``remark: ...`` line when ``t`` is within :data:`BOUND_TOLERANCE` of a bound, else None."""
    lo, hi = bounds
    if t >= hi * (1 - BOUND_TOLERANCE):
        return (f"remark: the fitted temperature T = {t:.3f} is at the upper bound {hi:g} of its search: the filter's "
                f"scores on {where} carry little information (the NLL prefers probabilities near 0.5) and the true "
                "optimum may lie beyond; check the filter's AUC on this split before trusting its probabilities")
    if t <= lo * (1 + BOUND_TOLERANCE):
        return (f"remark: the fitted temperature T = {t:.3f} is at the lower bound {lo:g} of its search: the filter's "
                f"scores on {where} are far less confident than their accuracy allows, and the true optimum may lie "
                "below; check that the scores come from the trained run")
    return None


def calibrate_run(run_dir, manifest, *, split: str = "val", objective: str = "nll", val_split: float | None = None,
                  seed: int = 0, device=None, batch_size: int = 64, num_workers: int = 0,
                  progress: bool = True) -> dict:
    """Fit the run's temperature on ``split`` of ``manifest`` (or, where it has no rows and
    ``val_split`` is given, on a held-out part of train); write the files; return the report."""
    if objective not in OBJECTIVES:
        raise FeatcacheError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    run_dir = Path(run_dir)
    filt = FilterRun(run_dir, device)
    filt.temperature = None  # fit from the raw logits, whatever was fitted before
    m = read_manifest(manifest)
    messages = []
    held_out = None
    n_split = int((m.df["split"] == split).sum())
    if n_split == 0 and val_split is not None:
        rows, paths, held_out = held_out_rows(m, val_split, seed)
        where = f"held-out train ({held_out['identities']} of {held_out['identities_in_train']} identities)"
        preds = filt.predict_rows(rows, paths, where, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress)
        messages.append(f"note: the manifest has no {split} split; calibrated on {held_out['rows']} train rows of "
                        f"{held_out['identities']} identities held out by identity (--val-split {val_split:g}, "
                        f"seed {seed}); the filter was trained on these rows unless its training left them out")
        if held_out["rows_without_identity"]:
            messages.append(f"note: {held_out['rows_without_identity']} train row(s) have no identity; each was "
                            "held out or kept as its own group")
        used_split = f"train held-out {val_split:g}"
    else:
        if n_split == 0:
            raise FeatcacheError(f"{m.source}: no rows in split {split!r}; pass --val-split 0.2 to calibrate on a "
                                 "held-out part of train, identity-disjoint")
        if val_split is not None:
            messages.append(f"note: the manifest has a {split} split ({n_split} rows); calibrated on it, "
                            "--val-split not used")
        preds = filt.predict(m, split, batch_size=batch_size, num_workers=num_workers, progress=progress)
        where, used_split = f"split {split}", split
    y, score = preds["label"].to_numpy(), preds["score"].to_numpy()
    if len(set(y.tolist())) < 2:
        raise FeatcacheError(f"{where} holds only one class; calibration needs real and fake samples")
    t = fit_temperature(score, y, objective=objective)
    remark = temperature_remark(t, where)
    if remark:
        messages.append(remark)
    p0, p1 = sigmoid(score), sigmoid(score / t)
    before, after = calibration_metrics(y, p0), calibration_metrics(y, p1)
    record = {"temperature": t, "objective": objective, "split": used_split, "n": int(len(y)),
              "bounds": list(T_BOUNDS)}
    if held_out is not None:
        record["held_out"] = held_out
    rd = RunDir(run_dir)
    write_json(rd.temperature, record)
    report = {**record, "before": before, "after": after, "messages": messages}
    write_json(rd.calibration, report)
    rd.plots.mkdir(exist_ok=True)
    plot_reliability([("before (T = 1)", reliability_bins(y, p0), before),
                      (f"after (T = {t:.3f})", reliability_bins(y, p1), after)],
                     rd.plots / "reliability_diagram.png", title=f"calibration on {where} ({objective})")
    out = preds.copy()
    out["prob"] = p0
    out.insert(out.columns.get_loc("prob") + 1, "prob_calibrated", p1)
    write_atomic(rd.calibrated, out.to_csv(index=False))
    return report
