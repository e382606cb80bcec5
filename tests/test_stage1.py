"""Stage 1 (issue 26.7, 26.9): the GRL switch and schedule, the post-hoc probe, the erasure term, and
a selection that does not keep the untouched adapter."""

import json
import math

import numpy as np
import pytest
import torch

from featcache.config import resolve_config
from featcache.errors import FeatcacheError
from featcache.heads.task import StepState

#: README's erasure option: the subgroup-variance term, the adversaries as monitors (lambda 0)
ERASURE = ["loss.lambda_subgroup_variance=30", "loss.grl_max_lambda=0"]


def _design_lambda(epoch: int, epochs: int, initial: float = 0.0, max_lambda: float = 1.0) -> float:
    """The design's DANN schedule, written out: p = epoch / total with epochs counted from 0."""
    p = (epoch - 1) / epochs
    return initial + (max_lambda - initial) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def test_grl_schedule_table_follows_the_design():
    from featcache.heads.stage1 import Stage1Task

    cfg = resolve_config("stage1")
    assert cfg["loss"]["use_grl"] is True and cfg["loss"]["initial_lambda_grl"] == 0.0  # the design's values
    task = Stage1Task(cfg, "cpu")
    table = [task.grl_lambda(StepState(e, 20)) for e in range(1, 21)]
    assert table == pytest.approx([_design_lambda(e, 20) for e in range(1, 21)], abs=1e-12)
    # the published values of the first epochs: 0, 0.245, 0.462, 0.635 ... up to 0.9999
    assert table[:4] == pytest.approx([0.0, 0.2449, 0.4621, 0.6351], abs=1e-4)
    assert table[-1] == pytest.approx(0.99985, abs=1e-5)
    started = Stage1Task(resolve_config("stage1", sets=["loss.initial_lambda_grl=0.3"]), "cpu")
    assert [started.grl_lambda(StepState(e, 10)) for e in range(1, 11)] == pytest.approx(
        [_design_lambda(e, 10, initial=0.3) for e in range(1, 11)], abs=1e-12)
    assert started.grl_lambda(StepState(1, 10)) == pytest.approx(0.3)
    off = Stage1Task(resolve_config("stage1", sets=["loss.use_grl=false"]), "cpu")
    with pytest.raises(FeatcacheError, match="reads the per-epoch probe, which selection.probe_rows=0 turns off"):
        Stage1Task(resolve_config("stage1", sets=["selection.probe_rows=0"]), "cpu")
    assert off.grl_lambda(StepState(5, 10)) is None and math.isnan(off.epoch_values(StepState(5, 10))["grl_lambda"])


def test_use_grl_switch_reverses_the_adversaries_gradient_or_not():
    """With the GRL the adapter receives -lambda times the adversaries' gradient; without it, the gradient itself."""
    from featcache.heads.stage1 import Stage1Model

    torch.manual_seed(0)
    model = Stage1Model([0], 8, 6, 5, 0.0)
    x = torch.randn(1, 7, 8)
    grads = {}
    for name, lam in (("plain", None), ("grl", 0.4)):
        model.zero_grad()
        z, race, gender = model(x, lam)
        (race.pow(2).sum() + gender.pow(2).sum()).backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.adapter.parameters() if p.grad is not None])
    assert grads["plain"].abs().sum() > 0
    assert torch.allclose(grads["grl"], -0.4 * grads["plain"], atol=1e-6)


def test_probe_against_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.stage1 import fit_probe, probe_scores

    rng = np.random.default_rng(0)
    y = rng.choice(4, size=400, p=[0.6, 0.2, 0.15, 0.05])
    x = rng.normal(size=(400, 6)) + 0.8 * np.eye(4, 6)[y]
    y_missing = y.copy()
    y_missing[:30] = -1  # unknown labels take no part
    ytest = rng.choice(4, size=200, p=[0.6, 0.2, 0.15, 0.05])
    xtest = rng.normal(size=(200, 6)) + 0.8 * np.eye(4, 6)[ytest]
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)).fit(x[30:], y[30:])
    acc, bacc = probe_scores(fit_probe(x, y_missing), xtest, ytest)
    assert acc == pytest.approx(ref.score(xtest, ytest))
    assert bacc == pytest.approx(balanced_accuracy_score(ytest, ref.predict(xtest)))
    assert bacc < acc  # the rare classes are the misread ones: balanced accuracy does not hide it
    # at most max_rows rows, drawn with the seed
    rows = np.sort(np.random.default_rng(3).choice(np.arange(30, 400), size=100, replace=False))
    sub = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=3)).fit(x[rows], y[rows])
    assert probe_scores(fit_probe(x, y_missing, seed=3, max_rows=100), xtest, ytest)[0] == pytest.approx(
        sub.score(xtest, ytest))
    assert fit_probe(x, np.zeros(400, int)) is None and all(math.isnan(v) for v in probe_scores(None, xtest, ytest))


def test_subgroup_variance_against_a_loop():
    from featcache.heads.stage1 import subgroup_variance

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    groups = torch.randint(-1, 8, (3, 40), generator=g)
    got = subgroup_variance(z, groups)
    for r in range(3):
        known = groups[r] >= 0
        zr, gr = z[r][known], groups[r][known]
        mean = zr.mean(0)
        between = sum(int((gr == k).sum()) * float((zr[gr == k].mean(0) - mean).pow(2).sum()) for k in gr.unique())
        assert float(got[r]) == pytest.approx(between / float((zr - mean).pow(2).sum()))
    same = torch.randn(1, 16, 4, generator=g, dtype=torch.float64).repeat(1, 2, 1)  # two groups, equal clouds
    assert float(subgroup_variance(same, torch.tensor([[0] * 16 + [5] * 16]))) == pytest.approx(0.0, abs=1e-12)


def test_selection_does_not_keep_the_untouched_adapter(tmp_path):
    """On a small controlled cache the selected epoch is a later one that removed information: its
    fresh probe reads less race and gender than the raw features' probe."""
    from featcache.cache.synth import synth_feature_cache
    from featcache.train import train_head

    synth_feature_cache(tmp_path / "c", rows=800, dim=64, seed=0)
    fast = ["loss.lambda_fairness=0", "loss.lambda_pairwise=0"]  # the Sinkhorn terms cost seconds here
    run = train_head("stage1", tmp_path / "c", tmp_path / "s1",
                     sets=[*ERASURE, "training.epochs=8", "training.device=cpu", *fast], progress=False)
    log = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert run.best_epoch > 1 and run.val["cos"] < 0.999
    assert run.best_epoch == max(log, key=lambda r: r["score"])["epoch"]
    probe = run.extra["probe"]
    for attr in ("race", "gender"):
        assert probe[attr]["debiased_bacc"] < probe[attr]["raw_bacc"] - 0.1, (attr, probe[attr])


def test_grl_warm_epoch_is_where_lambda_reaches_half_its_rise():
    from featcache.heads.stage1 import grl_warm_epoch

    for epochs in (1, 3, 4, 10, 20, 40):
        for initial in (0.0, 0.4):
            cfg = resolve_config("stage1", sets=[f"training.epochs={epochs}", f"loss.initial_lambda_grl={initial}"])
            half = initial + 0.5 * (1.0 - initial)
            first = next((e for e in range(1, epochs + 1) if _design_lambda(e, epochs, initial) >= half), epochs)
            assert grl_warm_epoch(cfg) == first
    assert grl_warm_epoch(resolve_config("stage1")) == 4  # lambda 0.635 at epoch 4 of 20; 0.462 at epoch 3
    assert grl_warm_epoch(resolve_config("stage1", sets=ERASURE)) == 1  # no reversal to wait for
    assert grl_warm_epoch(resolve_config("stage1", sets=["loss.use_grl=false"])) == 1
