"""Bootstrap intervals against a plain-loop bootstrap over the same resamples; paired bootstrap of two runs."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from featcache.errors import FeatcacheError
from featcache.metrics import eer, fairness_metrics
from featcache.metrics.bootstrap import (
    SPREAD95_MEANING,
    bca_levels,
    bootstrap,
    bootstrap_ci,
    bootstrap_weights,
    with_intervals,
)


def _predictions(n=400, seed=0, ties=True, identities=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    if ties:
        p = np.round(p, 2)
    return pd.DataFrame({"sample_id": np.arange(n), "label": y, "prob": p, "subgroup": rng.integers(-1, 5, n),
                         "identity": rng.integers(0, identities, n).astype(str)})


def _plain_loop(df, weights, threshold=0.5):
    """The metrics of each resample, as the table that repeats row i weights[b, i] times."""
    y, p, g = df["label"].to_numpy(), df["prob"].to_numpy(), df["subgroup"].to_numpy()
    out = {}
    for w in weights:
        idx = np.repeat(np.arange(len(df)), w)
        yb, pb = y[idx], p[idx]
        row = {"auc": roc_auc_score(yb, pb), "eer": eer(yb, pb), "acc": float(((pb >= threshold) == yb).mean()),
               **fairness_metrics(yb, pb, g[idx], threshold)}
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("cluster, ties", [("identity", True), (None, False)])
def test_vectorised_bootstrap_equals_plain_loop(cluster, ties):
    df = _predictions(ties=ties)
    b = bootstrap(df, n_boot=15, seed=3, cluster=cluster)
    loop = _plain_loop(df, bootstrap_weights(df, n_boot=15, seed=3, cluster=cluster))
    assert set(b.values) == set(loop) == {"auc", "eer", "acc", "f_fpr", "f_eo", "f_meo", "f_dp", "f_oae"}
    for k, v in loop.items():
        np.testing.assert_allclose(b.values[k], v, rtol=0, atol=1e-10, err_msg=k)
    # the interval is the percentile interval of those values (the AUC's: BCa, whose levels are
    # checked against scipy in test_statistics.py)
    ci = b.ci(0.9)
    for k, v in loop.items():
        levels = bca_levels(v, b.point[k], b.accel[k], 0.9) if k == "auc" else [0.05, 0.95]
        np.testing.assert_allclose(ci[k], np.quantile(v, levels), rtol=0, atol=1e-10, err_msg=k)
    assert b.point["auc"] == pytest.approx(roc_auc_score(df["label"], df["prob"]), abs=1e-12)
    assert b.methods()["auc"] == "BCa (cluster jackknife)" and b.methods()["eer"] == "percentile"


def test_resamples_are_stratified_clustered_and_seeded():
    df = _predictions()
    w = bootstrap_weights(df, n_boot=200, seed=1)
    assert w.shape == (200, len(df)) and w.dtype == np.int32
    # rows of one identity are drawn together: equal counts within an identity in every resample
    for _, rows in df.groupby("identity").groups.items():
        assert (w[:, rows] == w[:, rows[:1]]).all()
    # clusters drawn within their label stratum: as many clusters of each stratum as the table holds
    ident = df["identity"].to_numpy()
    kind = df.groupby("identity")["label"].agg(lambda s: 2 if s.nunique() == 2 else s.iloc[0])
    first = {k: np.flatnonzero(ident == k)[0] for k in kind.index}
    for s in set(kind):
        members = [first[k] for k in kind.index[kind == s]]
        assert (w[:, members].sum(1) == len(members)).all()
    # rows without clusters: exactly as many reals and fakes in every resample, per subgroup (S1)
    wr = bootstrap_weights(df, n_boot=50, seed=1, cluster=None)
    assert (wr @ df["label"].to_numpy() == df["label"].sum()).all() and (wr.sum(1) == len(df)).all()
    for (code, label), rows in df.groupby(["subgroup", "label"]).groups.items():
        assert (wr[:, rows].sum(1) == len(rows)).all(), (code, label)
    np.testing.assert_array_equal(w, bootstrap_weights(df, n_boot=200, seed=1))
    assert not np.array_equal(w, bootstrap_weights(df, n_boot=200, seed=2))


def test_bootstrap_ci_covers_and_narrows():
    big, small = _predictions(4000, seed=5, identities=4000), _predictions(200, seed=5, identities=200)
    ci_big, ci_small = bootstrap_ci(big, n_boot=300), bootstrap_ci(small, n_boot=300)
    auc = roc_auc_score(big["label"], big["prob"])
    assert ci_big["auc"][0] < auc < ci_big["auc"][1]
    # the width of an AUC interval shrinks like 1/sqrt(n): 20x the rows, about 1/4.5 the width
    ratio = (ci_small["auc"][1] - ci_small["auc"][0]) / (ci_big["auc"][1] - ci_big["auc"][0])
    assert 3 < ratio < 7
    # clustering on few identities widens the interval (correlated frames are not independent evidence)
    rng = np.random.default_rng(0)
    person = rng.integers(0, 20, 2000)
    effect = rng.normal(0, 0.15, 20)[person]
    y = rng.integers(0, 2, 2000)
    p = np.clip(0.5 + 0.1 * (2 * y - 1) + effect + rng.normal(0, 0.05, 2000), 0, 1)
    df = pd.DataFrame({"label": y, "prob": p, "identity": person})
    wide, narrow = bootstrap_ci(df, n_boot=300)["acc"], bootstrap_ci(df, n_boot=300, cluster=None)["acc"]
    assert (wide[1] - wide[0]) > 2 * (narrow[1] - narrow[0])


def test_strata_cross_label_set_and_subgroup():
    """S1: strata are (label set) x (subgroup); (a) each holds exactly its clusters in every
    resample, (b) with a cluster in every (subgroup, label) cell no gap is undefined in any
    resample, mixed/unknown-subgroup clusters go to one 'mixed' stratum per label set (noted)."""
    rng = np.random.default_rng(4)
    rows = []
    for person in range(90):
        code, label = person % 3, (person // 3) % 2  # every (subgroup, label) cell holds 15 identities
        for _ in range(rng.integers(1, 4)):
            rows.append({"identity": f"p{person}", "subgroup": code, "label": label})
    rows += [{"identity": "mixed", "subgroup": c, "label": 1} for c in (0, 1)]  # two codes: 'mixed'
    rows += [{"identity": "unknown", "subgroup": -1, "label": 0}] * 2
    df = pd.DataFrame(rows).assign(prob=lambda d: np.clip(0.3 + 0.4 * d["label"] + rng.normal(0, 0.2, len(d)), 0, 1))
    w = bootstrap_weights(df, n_boot=300, seed=2)
    first = df.drop_duplicates("identity")
    sets = df.groupby("identity")["label"].agg(lambda s: 2 if s.nunique() == 2 else s.iloc[0])
    subs = df.groupby("identity")["subgroup"].agg(lambda s: s.iloc[0] if s.nunique() == 1 and s.iloc[0] >= 0 else -1)
    strata = pd.DataFrame({"set": sets, "sub": subs}).loc[first["identity"]]
    for _, members in strata.groupby(["set", "sub"]).groups.items():
        cols = first.index[first["identity"].isin(members)]
        assert (w[:, cols].sum(1) == len(cols)).all()
    b = bootstrap(df, n_boot=300, seed=2)
    for k in ("f_fpr", "f_eo", "f_meo", "f_dp", "f_oae"):
        assert not np.isnan(b.values[k]).any(), k
    assert b.strata == "label set x subgroup"
    assert any("2 cluster(s) with an unknown subgroup or several" in n for n in b.notes)


def test_notes_and_metrics_json_fields():
    df = _predictions(100).drop(columns=["subgroup"])
    df.loc[:4, "identity"] = ""
    m = with_intervals({"auc": 0.7}, df, n_boot=50)
    assert set(m["ci95"]) == {"auc", "eer", "acc"}  # no subgroup column: no fairness intervals
    info = m["ci95_info"]
    assert info["cluster"] == "identity" and info["n_boot"] == 50 and info["level"] == 0.95
    assert info["method"] == {"auc": "BCa (cluster jackknife)", "eer": "percentile", "acc": "percentile"}
    assert info["n_clusters"] == len(set(df["identity"][5:])) + 5 and info["warnings"] == []
    assert any("5 row(s) without 'identity'" in n for n in info["notes"])
    assert m["fairness_null"] == {} and "spread95" not in m and "ece_floor" not in m
    assert m["fairness_coverage"]["unavailable"].startswith("the predictions have no subgroup column")
    # with demographics: the gaps leave ci95 for spread95 (with its legend), floors, coverage
    full = _predictions(300)
    m = with_intervals({"auc": 0.7, "ece": 0.1}, full, n_boot=50, n_perm=50, seed=3)
    assert set(m["ci95"]) == {"auc", "eer", "acc"}
    assert set(m["spread95"]) == set(m["fairness_null"]) == {"f_fpr", "f_eo", "f_meo", "f_dp", "f_oae"}
    assert m["ci95_info"]["spread95"] == SPREAD95_MEANING and "not a confidence interval" in SPREAD95_MEANING
    assert all(0 < v["p"] <= 1 and v["floor"] > 0 for v in m["fairness_null"].values())
    known = int((full["subgroup"] >= 0).sum())
    assert m["fairness_coverage"] == {"rows": known, "of_rows": 300, "subgroups": 5, "of_subgroups": 8,
                                      "with_both_labels": 5, "unavailable": None}
    assert 0 < m["ece_floor"] < 0.2
    # few clusters: the intervals say how many they rest on, and warn
    few = with_intervals({}, _predictions(200, identities=12), n_boot=30, n_perm=10)
    assert few["ci95_info"]["n_clusters"] == 12 and "rest on 12 'identity' clusters" in few["ci95_info"]["warnings"][0]


def test_no_known_subgroup_is_unavailable_not_an_error():
    """A test set without demographics (every subgroup -1, e.g. Celeb-DF): no exception, no floors,
    and the reason; the bootstrap resamples no gap and strata by label only."""
    df = _predictions(120).assign(subgroup=-1)
    m = with_intervals({"auc": 0.7}, df, n_boot=40, n_perm=20)
    assert m["fairness_null"] == {} and "spread95" not in m
    cov = m["fairness_coverage"]
    assert (cov["rows"], cov["of_rows"], cov["subgroups"]) == (0, 120, 0)
    assert cov["unavailable"] == "no row has a known subgroup (gender or race unknown for all 120 rows)"
    b = bootstrap(df, n_boot=20)
    assert "f_fpr" not in b.values and b.strata == "label set" and not any("subgroup" in n for n in b.notes)
    one = with_intervals({}, _predictions(60).assign(subgroup=2), n_boot=20, n_perm=20)["fairness_coverage"]
    assert one["subgroups"] == 1 and "a disparity needs two" in one["unavailable"]
    none = bootstrap(df.drop(columns=["identity"]), n_boot=20)
    assert none.cluster is None and any("no 'identity' column" in n for n in none.notes)
    # a metric undefined in some resamples is counted, not hidden; all undefined -> [nan, nan]
    g = pd.DataFrame({"label": [0, 1] * 10, "prob": np.linspace(0, 1, 20), "subgroup": [0] * 19 + [1]})
    b = bootstrap(g, n_boot=50, cluster=None)
    assert any(n.startswith("f_fpr: undefined in") for n in b.notes)
    assert all(math.isnan(v) for v in bootstrap_ci(g.assign(subgroup=0), n_boot=20)["f_oae"])
    with pytest.raises(FeatcacheError, match="subgroup column must hold integer codes"):
        bootstrap(g.assign(subgroup=0.5), n_boot=5)


def test_bad_input_is_one_clear_error():
    with pytest.raises(FeatcacheError, match="lacks column"):
        bootstrap_ci(pd.DataFrame({"label": [0, 1]}))
    with pytest.raises(FeatcacheError, match="n_boot"):
        bootstrap_ci(_predictions(20), n_boot=0)
    with pytest.raises(FeatcacheError, match="level"):
        bootstrap_ci(_predictions(20), level=95)
    with pytest.raises(FeatcacheError, match="prob"):
        bootstrap_ci(pd.DataFrame({"label": [0, 1], "prob": [0.2, 1.5]}))


def test_paired_bootstrap_of_two_runs_on_the_same_rows():
    from featcache.metrics.bootstrap import paired_bootstrap

    a = _predictions(300, seed=2)
    rng = np.random.default_rng(9)
    b = a.assign(prob=np.clip(a["prob"] + rng.normal(0, 0.1, len(a)), 0, 1)).sample(frac=1.0, random_state=1)
    d = paired_bootstrap(a, b, n_boot=12, seed=4)
    ra = bootstrap(a, n_boot=12, seed=4)
    w = bootstrap_weights(a, n_boot=12, seed=4)
    b_in_a_order = b.set_index("sample_id").loc[a["sample_id"]].reset_index()
    loop_b = _plain_loop(b_in_a_order, w)  # the same rows drawn for both runs
    for k in ("auc", "eer", "f_fpr"):
        np.testing.assert_allclose(d.values[k], ra.values[k] - loop_b[k], atol=1e-10, err_msg=k)
    lo, hi = d.ci()["auc"]
    point = roc_auc_score(a["label"], a["prob"]) - roc_auc_score(b["label"], b["prob"])
    assert lo < point < hi
    with pytest.raises(FeatcacheError, match="same test rows"):
        paired_bootstrap(a, b.iloc[1:])
