"""Imbalance (issue 24 item 6): ``training.class_balance: none | weight | sampler`` in the one loop."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from featcache.config import resolve_config
from featcache.errors import FeatcacheError
from featcache.heads.stage1 import Stage1Task
from featcache.heads.task import SplitData, Task
from featcache.train.loop import LoopSettings, balanced_order, fit


class ToyTask(Task):
    """A linear detector whose CE goes through ``class_weighted_mean``; it records each batch's labels."""

    name = "toy"
    class_weighted = True

    def tensors(self, data):
        raise AssertionError("the toy task reads no cache: the test sets its data")

    def make_spec(self):
        return {}

    def build(self, spec):
        torch.manual_seed(0)
        return torch.nn.Linear(2, 2)

    def batch_loss(self, batch, state):
        self.seen.append(batch["label"][0].clone())
        per_sample = F.cross_entropy(self.module(batch["x"][0]), batch["label"][0], reduction="none")
        loss = self.class_weighted_mean(per_sample, batch["label"][0])
        return loss.reshape(1), {}

    def evaluate(self, split):
        return [({"auc": 0.5}, pd.DataFrame())]


def toy(balance: str, n_real=20, n_fake=80, seed=0):
    cfg = {"training": {"epochs": 1, "batch_size": 16, "lr": 0.01, "seed": seed, "class_balance": balance},
           "selection": {"score": "auc"}}
    task = ToyTask(cfg, "cpu")
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * n_real + [1] * n_fake)
    x = torch.randn(len(y), 2, generator=g) + y[:, None]
    task.data["train"] = SplitData({"x": x, "label": y}, pd.DataFrame({"label": y.numpy()}))
    task.module = task.build({})
    task.seen = []
    return task, cfg


def test_weight_is_sklearns_balanced_class_weighted_cross_entropy():
    task, _ = toy("weight")
    y = task.data["train"].tensors["label"]
    want = compute_class_weight("balanced", classes=np.array([0, 1]), y=y.numpy())  # n / (2 n_c): 2.5, 0.625
    np.testing.assert_allclose(task.class_weights().numpy(), want, rtol=1e-6)
    logits = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(2))
    per_sample = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(task.class_weighted_mean(per_sample, y),
                               F.cross_entropy(logits, y, weight=torch.tensor(want, dtype=torch.float32)))
    # by hand: sum_i w_{y_i} l_i / sum_i w_{y_i}; the real class now weighs as much as the fake class
    w = want[y.numpy()]
    assert float(task.class_weighted_mean(per_sample, y)) == pytest.approx(float((w * per_sample.numpy()).sum() / w.sum()), rel=1e-5)
    assert w[y.numpy() == 0].sum() == pytest.approx(w[y.numpy() == 1].sum())
    plain, _ = toy("none")
    torch.testing.assert_close(plain.class_weighted_mean(per_sample, y), per_sample.mean())


def test_sampler_draws_the_classes_one_to_one_with_exact_seeded_counts(tmp_path):
    y = torch.tensor([0] * 20 + [1] * 80)
    order = balanced_order(y, torch.Generator().manual_seed(0))
    assert len(order) == 100 and (y[order] == 0).sum() == 50 and (y[order] == 1).sum() == 50
    real_draws = np.bincount(order[y[order] == 0].numpy(), minlength=20)[:20]
    assert sorted(set(real_draws)) == [2, 3] and (real_draws == 3).sum() == 10  # 50 draws of 20 rows: as even as can be
    assert len(set(order[y[order] == 1].tolist())) == 50  # majority rows drawn at most once
    assert torch.equal(order, balanced_order(y, torch.Generator().manual_seed(0)))  # seeded
    assert not torch.equal(order, balanced_order(y, torch.Generator().manual_seed(1)))
    # through the one loop: the epoch's batches hold the classes 1:1, exactly (100 rows: 6 x 16 + 4)
    for balance, reals in (("sampler", 50), ("none", 20)):
        task, cfg = toy(balance)
        run = tmp_path / balance
        (run / "plots").mkdir(parents=True)
        fit(task, [run], LoopSettings.from_config([cfg]), progress=False)
        seen = torch.cat(task.seen)
        assert len(seen) == 100 and int((seen == 0).sum()) == reals


def test_class_balance_is_checked():
    with pytest.raises(FeatcacheError, match="LoopSettings: training.class_balance must be one of none, weight, sampler; got .oversample."):
        LoopSettings(epochs=1, batch_size=2, lr=1.0, seeds=[0], class_balance="oversample")
    cfg = resolve_config("stage2", sets=["training.class_balance=sampler"])
    assert LoopSettings.from_config([cfg]).class_balance == "sampler"
    assert LoopSettings.from_config([resolve_config("stage2")]).class_balance == "none"  # the design's default
    s1 = resolve_config("stage1")
    s1["training"]["class_balance"] = "sampler"
    with pytest.raises(FeatcacheError, match="applies to detectors"):
        Stage1Task.check_config(s1)
