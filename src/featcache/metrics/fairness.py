"""Group fairness of a binary detector (DESIGN.md, "Metric definitions").

``groups`` holds integer subgroup codes (0..7, see ``SUBGROUP_NAMES``); rows whose code is
negative (gender or race unknown) are ignored here.  At threshold t, a sample is predicted fake
when ``p >= t``.  Per group g: TPR, FPR, TNR, FNR, PR (predicted-fake fraction), NR = 1 - PR,
ACC and AUC.  A rate whose denominator is zero in a group (FPR/TNR without reals, TPR/FNR
without fakes, AUC with one class) is nan for that group.

- F_FPR = 100 · Σ_g |FPR_g − FPR_all|
- F_EO  = 100 · Σ_g (|FPR_g − FPR_all| + |TPR_g − TPR_all|)
- F_MEO = 100 · max over r ∈ {FPR, FNR, TNR, TPR} of (max_g r_g − min_g r_g)
- F_DP  = 100 · max(range_g PR_g, range_g NR_g)
- F_OAE = 100 · (max_g ACC_g − min_g ACC_g)

Choices where the definitions leave room:

- "all" rates (FPR_all, TPR_all) are over all rows with a known group (code >= 0).
- A group whose rate is nan is left out of that rate's sum or range.
- A disparity needs two groups to compare: a rate defined in fewer than two groups gives no
  term.  F_FPR is nan without an FPR term; F_EO is nan unless both its FPR and TPR terms exist
  (half of it would silently understate it); F_MEO, F_DP and F_OAE take the largest range among
  the rates that have one, nan when none has.

Reading the numbers: every F_* is in percentage points.  F_FPR and F_EO are *sums* over the
subgroups, so they grow with the number of subgroups and can exceed 100 (F_FPR 212.5 on 8
subgroups: the subgroup FPRs lie on average 26.6 points from the overall FPR).  A detector that
gives every sample one decision has FPR = TPR in {0, 1} in every subgroup, so F_FPR, F_EO,
F_MEO and F_DP are 0 (and F_OAE only reflects each subgroup's class mix):
:func:`featcache.metrics.all_metrics` flags it (``degenerate``) instead of letting it look fair.

Conventions of the reference implementations (same names, other numbers):

- PG-FDD (Lin et al., CVPR 2024) drops a subgroup holding only one class from *every* fairness
  metric; featcache drops it only from the rates it leaves undefined (a group without reals
  still counts in TPR, PR and ACC), so F_OAE, F_DP and F_MEO can differ widely (F_OAE 34.6 vs
  5.9 on one reported case).
- FairnessDeepfake's results key ``F_FPR`` is the *mean* of the subgroup FPRs, not a disparity;
  featcache's ``f_fpr`` is the sum of absolute deviations from the overall FPR above.

One definition: the five formulas are written once, in :func:`fairness_from_counts`, on the
(subgroup, label, decision) cell counts (:func:`cell_counts`); :func:`fairness_metrics`, every
bootstrap resample and every permutation of the no-disparity floor go through it.  Beside the
gaps: :func:`fairness_coverage` (which rows and subgroups they cover, or why there is none) and
:func:`gap_ranges` (a simultaneous range of their true values).  A gap is never 0 on a finite
test set: read it against its permutation floor (:mod:`.permutation`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtri
from sklearn.metrics import roc_auc_score

from ..data.manifest import SUBGROUP_NAMES
from .detection import NAN, check_binary

#: The fairness metrics, in the order they are reported.
FAIRNESS_KEYS = ("f_fpr", "f_eo", "f_meo", "f_dp", "f_oae")
RATE_COLUMNS = ("n", "n_pos", "n_neg", "tpr", "fpr", "tnr", "fnr", "pr", "nr", "acc", "auc")


def _check_groups(y, p, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p = check_binary(y, p)
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != len(y):
        raise ValueError(f"groups must be 1-D with one code per sample; got shape {g.shape} for {len(y)} samples")
    try:
        gf = g.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"groups must be integer subgroup codes; got dtype {g.dtype}") from None
    if not np.isfinite(gf).all() or (gf != np.round(gf)).any():
        raise ValueError("groups must be integer subgroup codes (negative for unknown)")
    return y, p, gf.astype(np.int64)


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())

    def ratio(a: float, b: int) -> float:
        return a / b if b else NAN

    return {
        "n": n, "n_pos": n_pos, "n_neg": n_neg,
        "tpr": ratio(tp, n_pos), "fpr": ratio(fp, n_neg),
        "tnr": ratio(n_neg - fp, n_neg), "fnr": ratio(n_pos - tp, n_pos),
        "pr": ratio(tp + fp, n), "nr": ratio(n - tp - fp, n),
        "acc": ratio(tp + n_neg - fp, n),
        "auc": float(roc_auc_score(y, p)) if 0 < n_pos < n else NAN,
    }


def group_rates(y, p, groups, threshold: float = 0.5) -> pd.DataFrame:
    """Per-group rates (index: group code, sorted; columns :data:`RATE_COLUMNS`)."""
    y, p, g = _check_groups(y, p, groups)
    codes = np.unique(g[g >= 0])
    rows = [_rates(y[g == c], p[g == c], threshold) for c in codes]
    df = pd.DataFrame(rows, index=pd.Index(codes, name="group"), columns=list(RATE_COLUMNS))
    return df.astype({"n": "int64", "n_pos": "int64", "n_neg": "int64"})


def cell_counts(y, p, groups, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The group codes present (``codes``, sorted, >= 0) and the ``(4 · len(codes),)`` counts of
    the (group, label, decision) cells that every fairness metric is computed from: per group
    ``[real kept, real flagged, fake missed, fake flagged]`` (rows with a negative code left out)."""
    y, p, g = _check_groups(y, p, groups)
    known = g >= 0
    codes = np.unique(g[known])
    cell = np.searchsorted(codes, g[known]) * 4 + y[known] * 2 + (p[known] >= threshold)
    return codes, np.bincount(cell, minlength=4 * len(codes)).astype(np.float64)


def fairness_from_counts(c: np.ndarray) -> dict[str, np.ndarray]:
    """F_FPR, F_EO, F_MEO, F_DP, F_OAE (see the module docstring) of each row of ``c``, a
    ``(B, 4 · G)`` matrix of (possibly weighted) cell counts laid out as :func:`cell_counts`'.

    The one definition of the five formulas: :func:`fairness_metrics` calls it on one row of
    counts, the bootstrap (:mod:`.bootstrap`) on every resample's and the permutation floor
    (:mod:`.permutation`) on every permutation's.  A group with no row in a row of ``c`` has no
    rates there; with no group at all every metric is nan.
    """
    c = np.asarray(c, dtype=np.float64)
    c = c.reshape(len(c), -1, 4)  # (B, groups, [real kept, real flagged, fake missed, fake flagged])
    tn_, fp, fn_, tp = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    n_neg, n_pos = tn_ + fp, fn_ + tp
    n = n_neg + n_pos

    def ratio(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    rates = {"tpr": ratio(tp, n_pos), "fpr": ratio(fp, n_neg), "tnr": ratio(n_neg - fp, n_neg),
             "fnr": ratio(n_pos - tp, n_pos), "pr": ratio(tp + fp, n), "nr": ratio(n - tp - fp, n),
             "acc": ratio(tp + n_neg - fp, n)}
    fpr_all = ratio(fp.sum(1), n_neg.sum(1))
    tpr_all = ratio(tp.sum(1), n_pos.sum(1))

    def dev(r, overall):
        ok = ~np.isnan(r)
        s = np.where(ok, np.abs(r - overall[:, None]), 0.0).sum(1)
        return np.where((ok.sum(1) >= 2) & ~np.isnan(overall), s, np.nan)

    def spread(r):
        ok = ~np.isnan(r)
        hi = np.where(ok, r, -np.inf).max(1, initial=-np.inf)
        lo = np.where(ok, r, np.inf).min(1, initial=np.inf)
        with np.errstate(invalid="ignore"):
            return np.where(ok.sum(1) >= 2, hi - lo, np.nan)

    def nanmax(*vs):
        v = np.stack(vs)
        any_ok = ~np.isnan(v).all(0)
        return np.where(any_ok, np.where(np.isnan(v), -np.inf, v).max(0), np.nan)

    d_fpr, d_tpr = dev(rates["fpr"], fpr_all), dev(rates["tpr"], tpr_all)
    return {
        "f_fpr": 100 * d_fpr,
        "f_eo": 100 * (d_fpr + d_tpr),
        "f_meo": 100 * nanmax(*(spread(rates[r]) for r in ("fpr", "fnr", "tnr", "tpr"))),
        "f_dp": 100 * nanmax(spread(rates["pr"]), spread(rates["nr"])),
        "f_oae": 100 * spread(rates["acc"]),
    }


#: Above this many subgroups the upper bound of F_FPR/F_EO is not searched over the 2^G vertices
#: of the box but bounded by each rate's farthest distance from the box's range (looser).
MAX_VERTEX_GROUPS = 12


def wilson(x: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval ``[lo, hi]`` of ``x`` successes in ``n`` trials (``n`` may be an
    effective size) at normal quantile ``z``; nan where ``n`` is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = x / n
        mid = (r + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(r * (1 - r) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)


def gap_ranges(cells: np.ndarray, resampled: np.ndarray | None = None, alpha: float = 0.05) -> dict[str, list]:
    """``{f_key: [lo, hi]}``: a simultaneous range for each gap's true value, the Wilson–Bonferroni
    projection (the statistics review's S3c), times 100.

    Each rate a gap uses gets a Wilson interval per subgroup at level ``1 - alpha / J``, ``J`` the
    number of rates in its family (F_FPR: the G FPRs; F_EO and F_MEO: the G FPRs and G TPRs; F_DP:
    the G PRs; F_OAE: the G ACCs).  With probability at least ``1 - alpha`` every true rate lies in
    its box, so the gap lies between the smallest and largest value it takes over the box:

    - a range (F_MEO, F_DP, F_OAE): ``[max(0, max_g L_g - min_g U_g), max_g U_g - min_g L_g]``,
      F_MEO the larger of its FPR and TPR ranges (TNR and FNR have the same);
    - F_FPR (Σ_g |r_g - Σ_h w_h r_h|, ``w`` the subgroups' shares of reals): lower = the least
      Σ_g dist(c, [L_g, U_g]) over c in {L_g, U_g}; upper = the largest value over the 2^G vertices
      of the box (the function is convex) up to :data:`MAX_VERTEX_GROUPS` subgroups; F_EO the sum of
      the FPR and TPR versions.

    ``cells``: the ``(4 · G,)`` cell counts of :func:`cell_counts`.  ``resampled``: optional
    ``(B, 4 · G)`` bootstrap cell counts (clustered resamples): each rate's count is divided by its
    design effect, max(1, bootstrap variance / binomial variance), as clustered rows carry less
    information.  Conservative by construction (coverage 0.993-1.000, ``bench_stats.py``) and wide: at 160
    rows nearly the whole scale.  A range needs two subgroups with the rate: nan otherwise.
    """
    c = np.asarray(cells, dtype=np.float64).reshape(-1, 4)
    tn_, fp, fn_, tp = c.T
    counts = {"fpr": (fp, tn_ + fp), "tpr": (tp, fn_ + tp), "pr": (tp + fp, c.sum(1)), "acc": (tn_ + tp, c.sum(1))}
    deff = {k: np.ones(len(c)) for k in counts}
    if resampled is not None and len(resampled) > 1:
        b = np.asarray(resampled, dtype=np.float64).reshape(len(resampled), -1, 4)
        bt = {"fpr": (b[..., 1], b[..., 0] + b[..., 1]), "tpr": (b[..., 3], b[..., 2] + b[..., 3]),
              "pr": (b[..., 1] + b[..., 3], b.sum(2)), "acc": (b[..., 0] + b[..., 3], b.sum(2))}
        for k, (x, n) in counts.items():
            ok = bt[k][1] > 0  # resamples where the subgroup has the rate's denominator
            rb = np.where(ok, bt[k][0] / np.where(ok, bt[k][1], 1), 0.0)
            m = ok.sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = rb.sum(0) / m
                var = np.where(ok, (rb - mean) ** 2, 0.0).sum(0) / m
                r = x / n
                ratio = var / (r * (1 - r) / n)
            deff[k] = np.where(np.isfinite(ratio) & (m > 1), np.maximum(1.0, ratio), 1.0)

    defined = {k: int((n > 0).sum()) for k, (_, n) in counts.items()}

    def boxes(rate, family):  # Wilson boxes of one rate, Bonferroni over the J rates of the family
        x, n = counts[rate]
        ok = n > 0
        if ok.sum() < 2:
            return None
        z = float(ndtri(1 - alpha / (2 * sum(defined[k] for k in family))))
        lo, hi = wilson(x[ok] / deff[rate][ok], n[ok] / deff[rate][ok], z)  # the rate, on n_eff trials
        return lo, hi, n[ok] / n[ok].sum()

    def spread(box):
        if box is None:
            return [np.nan, np.nan]
        lo, hi, _ = box
        return [max(0.0, lo.max() - hi.min()), hi.max() - lo.min()]

    def deviation(box):
        if box is None:
            return [np.nan, np.nan]
        lo, hi, w = box
        edges = np.r_[lo, hi][:, None]  # the least total distance from one point to every box is at an edge
        low = float((np.maximum(0, lo - edges) + np.maximum(0, edges - hi)).sum(1).min())
        if len(lo) <= MAX_VERTEX_GROUPS:
            corner = (np.arange(2 ** len(lo))[:, None] >> np.arange(len(lo))) & 1  # (2^G, G) of 0/1
            v = lo + (hi - lo) * corner
            high = float(np.abs(v - (v @ w)[:, None]).sum(1).max())
        else:
            high = float(np.maximum(hi - lo.min(), hi.max() - lo).sum())
        return [low, high]

    fpr2, tpr2 = boxes("fpr", ("fpr", "tpr")), boxes("tpr", ("fpr", "tpr"))
    meo = [np.nan if np.isnan(a) and np.isnan(b) else np.nanmax([a, b]) for a, b in zip(spread(fpr2), spread(tpr2))]
    out = {"f_fpr": deviation(boxes("fpr", ("fpr",))),
           "f_eo": [a + b for a, b in zip(deviation(fpr2), deviation(tpr2))],
           "f_meo": meo, "f_dp": spread(boxes("pr", ("pr",))), "f_oae": spread(boxes("acc", ("acc",)))}
    return {k: [100 * float(v[0]), 100 * float(v[1])] for k, v in out.items()}


def fairness_metrics(y, p, groups, threshold: float = 0.5) -> dict:
    """``f_fpr``, ``f_eo``, ``f_meo``, ``f_dp``, ``f_oae`` (times 100; see module docstring)."""
    _, counts = cell_counts(y, p, groups, threshold)
    return {k: float(v[0]) for k, v in fairness_from_counts(counts[None]).items()}


def fairness_coverage(y, groups, names=SUBGROUP_NAMES) -> dict:
    """Which rows and subgroups the fairness metrics cover (``fairness_coverage`` in metrics.json).

    - ``rows`` of ``of_rows``: the rows with a known subgroup (code >= 0) of all rows;
    - ``subgroups`` of ``of_subgroups``: the subgroups with at least one known row, of the
      subgroups the codes name: ``names`` (featcache's 8, gender × race) when every code is below
      ``len(names)``, else codes ``0 .. max code`` (a table with its own coding);
    - ``with_both_labels``: the subgroups holding a real and a fake row (the only ones that enter
      every rate: a one-class subgroup has no FPR or no TPR);
    - ``unavailable``: ``None``, or why there is no fairness metric at all (no subgroup column,
      no row with a known subgroup, or one subgroup only: a disparity needs two).

    ``groups`` is None for a table without a subgroup column.
    """
    y = np.asarray(y)
    n = len(y)
    if groups is None:
        return {"rows": 0, "of_rows": n, "subgroups": 0, "of_subgroups": len(names), "with_both_labels": 0,
                "unavailable": "the predictions have no subgroup column (no demographics for this test set)"}
    _, _, g = _check_groups(y, np.zeros(n), groups)
    known = g >= 0
    codes = np.unique(g[known])
    both = sum(1 for c in codes if len(np.unique(y[g == c])) == 2)
    universe = len(names) if not len(codes) or codes.max() < len(names) else int(codes.max()) + 1
    if not known.any():
        why = f"no row has a known subgroup (gender or race unknown for all {n} rows)"
    elif len(codes) < 2:
        why = f"only one subgroup ({_name(codes[0], names)}) has rows with known demographics; a disparity needs two"
    else:
        why = None
    return {"rows": int(known.sum()), "of_rows": n, "subgroups": len(codes), "of_subgroups": universe,
            "with_both_labels": both, "unavailable": why}


def _name(code, names) -> str:
    return names[code] if 0 <= code < len(names) else str(code)


def subgroup_table(y, p, groups, threshold: float = 0.5, names=SUBGROUP_NAMES) -> pd.DataFrame:
    """One row per present group: ``code``, ``subgroup`` (name; the code as text past ``names``),
    ``n``, ``auc``, ``fpr``, ``tpr``, ``acc``."""
    rates = group_rates(y, p, groups, threshold)
    codes = rates.index.to_numpy()
    return pd.DataFrame({
        "code": codes,
        "subgroup": [_name(c, names) for c in codes],
        "n": rates["n"].to_numpy(),
        "auc": rates["auc"].to_numpy(),
        "fpr": rates["fpr"].to_numpy(),
        "tpr": rates["tpr"].to_numpy(),
        "acc": rates["acc"].to_numpy(),
    })
