"""Stacked runs (issue 16): R runs in one module give what R separate one-run instances give."""

import numpy as np
import pandas as pd
import pytest
import torch

from featcache.config import presets_of, resolve_config
from featcache.data.manifest import GENDERS, RACES
from featcache.heads.stage1 import Stage1Task
from featcache.heads.stage2 import Stage2Task
from featcache.heads.task import SplitData, StepState

SMALL1 = ["model.adapter_hidden=16", "model.adversary_hidden=8", "training.epochs=3"]
SMALL2 = ["model.adapter_hidden=16", "model.classifier_hidden=[16,8]", "model.ca_heads=2", "training.epochs=3",
          "fairness.warmup_start=1", "fairness.warmup_end=2", "selection.min_epoch=2"]


def faces_split(n=64, dim=16, seed=0) -> SplitData:
    """Random features with every (gender, race) subgroup and both labels."""
    g = np.random.default_rng(seed)
    gender = g.integers(0, 2, n)
    race = g.integers(0, 4, n)
    label = g.integers(0, 2, n)
    sub = gender * 4 + race
    x = (g.normal(size=(n, dim)) + 0.5 * sub[:, None] / 8 + label[:, None] * 0.3).astype(np.float32)
    meta = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": label, "split": "train",
                         "gender": [GENDERS[i] for i in gender], "race": [RACES[i] for i in race],
                         "subgroup": sub, "identity": [f"id{i % 10}" for i in range(n)], "dataset": "x",
                         "method": "m"})
    return SplitData({"x": torch.from_numpy(x), "race": torch.from_numpy(race), "gender": torch.from_numpy(gender),
                      "subgroup": torch.from_numpy(sub), "label": torch.from_numpy(label)}, meta)


def make(cls, cfgs, data, inputs=None):
    task = cls(cfgs, torch.device("cpu"))
    if isinstance(data, tuple):  # XAI: (flat frames, split data)
        task.flat, data = data
    task.data = {"train": data, "val": data}
    task.inputs = dict(inputs or {})
    task.spec = task.make_spec()
    task.module = task.build(task.spec)
    return task


def batches(data, runs, b=32, seed=0):
    """An (R, B) index per run, each from the run's own generator, and the gathered batch."""
    idx = torch.stack([torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + r))[:b]
                       for r in range(runs)])
    return {k: v[idx] for k, v in data.tensors.items()}


def assert_stack_equals_singles(cls, cfgs, data, inputs=None, state=None, steps=2):
    """Forward, loss and backward of the R-run task equal R one-run tasks (same seeds, same batches)."""
    state = state or StepState(3, 3)
    stacked = make(cls, cfgs, data, inputs)
    singles = [make(cls, [c], data, inputs) for c in cfgs]
    opt = torch.optim.AdamW([p for p in stacked.module.parameters() if p.requires_grad], lr=1e-2)
    opts = [torch.optim.AdamW([p for p in s.module.parameters() if p.requires_grad], lr=1e-2) for s in singles]
    for step in range(steps):  # a second step checks that one optimizer step equals R separate ones
        batch = batches(data[1] if isinstance(data, tuple) else data, len(cfgs), seed=10 * step)
        stacked.module.train()
        loss, terms = stacked.batch_loss(batch, state)
        assert loss.shape == (len(cfgs),) and all(v.shape == (len(cfgs),) for v in terms.values())
        opt.zero_grad()
        loss.sum().backward()
        for r, s in enumerate(singles):
            s.module.train()
            one, _ = s.batch_loss({k: v[r:r + 1] for k, v in batch.items()}, state)
            opts[r].zero_grad()
            one.sum().backward()
            torch.testing.assert_close(one[0], loss[r], atol=1e-5, rtol=1e-5)
            for (name, p), (_, q) in zip(stacked.module.named_parameters(), s.module.named_parameters()):
                assert p.shape[0] == len(cfgs) and q.shape[0] == 1, name
                assert (p.grad is None) == (q.grad is None), name
                if q.grad is None:
                    continue
                torch.testing.assert_close(p.grad[r], q.grad[0], atol=1e-5, rtol=1e-4, msg=name)
            opts[r].step()
        opt.step()
    for r, s in enumerate(singles):
        for (name, p), (_, q) in zip(stacked.module.named_parameters(), s.module.named_parameters()):
            if name == "cross_attention.k.bias":
                # its true gradient is 0 (the softmax ignores a shift shared by every key): AdamW turns
                # the ~1e-10 float noise into steps of ~lr/100 that differ between the two orders
                continue
            torch.testing.assert_close(p.data[r], q.data[0], atol=1e-5, rtol=1e-4, msg=name)
    return stacked, singles


def test_stage1_stacked_equals_single_runs():
    data = faces_split()
    cfgs = [resolve_config("stage1", preset, sets=SMALL1 + [f"training.seed={seed}"])
            for preset, seed in (("default", 0), ("grl_only", 1), ("default", 2))]
    stacked, _ = assert_stack_equals_singles(Stage1Task, cfgs, data, state=StepState(2, 3))
    coefs = stacked.coefficients()
    assert coefs["lambda_fairness"].tolist() == [0.5, 0.0, 0.5]
    # run r's initial weights depend only on its seed: the same seed alone gives the same values
    alone = make(Stage1Task, [cfgs[2]], data)
    again = make(Stage1Task, [cfgs[0], cfgs[2]], data)
    for (name, p), (_, q) in zip(alone.module.named_parameters(), again.module.named_parameters()):
        assert torch.equal(p[0], q[1]), name


@pytest.fixture(scope="module")
def stage1_input():
    return make(Stage1Task, [resolve_config("stage1", sets=SMALL1)], faces_split())


def test_stage2_every_preset_stacked_equals_single_runs(stage1_input):
    data = faces_split()
    presets = [p for p in presets_of("stage2") if p != "linear"]
    cfgs = [resolve_config("stage2", p, sets=SMALL2 + [f"training.seed={i}"]) for i, p in enumerate(presets)]
    stacked, _ = assert_stack_equals_singles(Stage2Task, cfgs, data, {"stage1": stage1_input})
    c = stacked.coefficients()
    assert c["cvar"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0] and c["contrastive"][-1] == 0
    assert len({Stage2Task.stack_key(cfg) for cfg in cfgs}) == 1
    # the frozen Stage-1 adapter is every run's fair adapter
    for k, v in stage1_input.module.adapter.state_dict().items():
        assert torch.equal(stacked.module.fair.state_dict()[k], v.expand_as(stacked.module.fair.state_dict()[k]))


def test_stage2_linear_preset_is_its_own_small_architecture(stage1_input):
    data = faces_split()
    cfgs = [resolve_config("stage2", "linear", sets=SMALL2 + [f"training.seed={i}"]) for i in range(2)]
    stacked, _ = assert_stack_equals_singles(Stage2Task, cfgs, data)  # needs no Stage-1 run
    assert [n for n, _ in stacked.module.named_parameters()] == ["classifier.weight", "classifier.bias"]
    assert stacked.module.classifier.weight.shape == (2, 16, 2)
    assert Stage2Task.stack_key(cfgs[0]) != Stage2Task.stack_key(resolve_config("stage2", "none", sets=SMALL2))
    assert "linear" in presets_of("stage2")  # `ablate --presets all` reads this list


def speech_frames(n=20, dim=12, seed=0):
    """Utterances of 4..11 frames; spoofed ones carry a shifted stretch."""
    from featcache.heads.xai import frame_table

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    label = torch.arange(n) % 2
    frames, flabels = [], []
    for i in range(n):
        f = torch.randn(int(lengths[i]), dim, generator=g)
        fl = torch.zeros(int(lengths[i]), dtype=torch.int8)
        if label[i]:
            f[1:3] += 2.0
            fl[1:3] = 1
        frames.append(f)
        flabels.append(fl)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    flat = {"frames": torch.cat(frames), "offsets": offsets, "frame_labels": torch.cat(flabels).numpy(),
            "table": frame_table(offsets)}
    meta = pd.DataFrame({"sample_id": [f"u{i}" for i in range(n)], "label": label.numpy(), "split": "train",
                         "segments": "", "identity": "", "method": ["A01" if i % 2 else "bonafide" for i in range(n)]})
    return flat, SplitData({"row": torch.arange(n), "label": label}, meta)


@pytest.mark.parametrize("mode", ["ema", "learnable"])
def test_xai_stacked_equals_single_runs(mode):
    from featcache.heads.xai import XaiTask

    data = speech_frames()
    sets = ["model.hidden=8", "model.kernel=3", f"model.prototype_mode={mode}", "training.epochs=2"]
    cfgs = [resolve_config("xai", sets=sets + [f"training.seed={i}", f"loss.lambda_sparsity={0.01 * i}"])
            for i in range(3)]
    stacked, singles = assert_stack_equals_singles(XaiTask, cfgs, data)
    assert stacked.coefficients()["lambda_sparsity"].tolist() == pytest.approx([0.0, 0.01, 0.02])
    # the EMA prototypes (buffers) move per run as each run alone
    for r, s in enumerate(singles):
        torch.testing.assert_close(stacked.module.prototypes[r], s.module.prototypes[0], atol=1e-6, rtol=1e-5)
    (m, _), = singles[1].evaluate("val")
    assert m["auc"] == pytest.approx(stacked.evaluate("val")[1][0]["auc"])


def test_stacked_batch_loss_has_no_host_device_sync():
    """Issue 16.2: a Stage-2 step (every fairness term, masked Sinkhorn) and an XAI step on CUDA
    run without a host-device synchronisation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to check for host-device synchronisation")
    from featcache.heads.xai import XaiTask

    dev = torch.device("cuda")
    data = faces_split().to(dev)
    s1 = make(Stage1Task, [resolve_config("stage1", sets=SMALL1)], data)
    cfgs = [resolve_config("stage2", p, sets=SMALL2 + [f"training.seed={i}"]) for i, p in enumerate(("full", "none"))]
    s2 = Stage2Task(cfgs, dev)
    s2.data, s2.inputs = {"train": data}, {"stage1": s1}
    s2.spec = s2.make_spec()
    s2.module = s2.build(s2.spec).to(dev)
    flat, speech = speech_frames()
    xai = XaiTask([resolve_config("xai", sets=["model.hidden=8", "model.kernel=3", "training.epochs=2"])], dev)
    xai.flat = {**flat, "frames": flat["frames"].to(dev), "table": flat["table"].to(dev)}
    xai.data = {"train": speech.to(dev)}
    xai.spec = xai.make_spec()
    xai.module = xai.build(xai.spec).to(dev)
    for task, d in ((s2, data), (xai, speech.to(dev))):
        batch = batches(d, task.runs)
        task.module.train()
        task.batch_loss(batch, StepState(3, 3))  # first call: lazy set-up (generators, copies)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = task.batch_loss(batch, StepState(3, 3))
            loss.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_stage2_class_balance_weight_is_class_weighted_cross_entropy(stage1_input):
    data = faces_split()
    keep = np.r_[np.flatnonzero(data.tensors["label"].numpy() == 1), np.flatnonzero(data.tensors["label"].numpy() == 0)[:8]]
    data = SplitData({k: v[keep] for k, v in data.tensors.items()}, data.meta.iloc[keep].reset_index(drop=True))
    cfg = resolve_config("stage2", "none", sets=SMALL2 + ["training.class_balance=weight"])
    Stage2Task.check_config(cfg)  # accepted: Stage 2's CE goes through class_weighted_mean
    task = make(Stage2Task, [cfg], data, {"stage1": stage1_input})
    y = data.tensors["label"].numpy()
    from sklearn.utils.class_weight import compute_class_weight
    want = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    batch = batches(data, 1, b=len(y))
    task.module.eval()
    _, terms = task.batch_loss(batch, StepState(1, 3))
    logits = task.module(batch["x"])["logits"][0]
    ref = torch.nn.functional.cross_entropy(logits, batch["label"][0], weight=torch.tensor(want, dtype=torch.float32))
    torch.testing.assert_close(terms["ce"][0], ref, atol=1e-5, rtol=1e-5)
