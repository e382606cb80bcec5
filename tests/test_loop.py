"""The one loop's parts (issue 25 item 4): the declared job contract, the selection rule, the run
state in the resume point, the schedule, and resuming stacked runs of which one stopped early."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from featcache.errors import FeatcacheError
from featcache.heads.task import Job, SplitData
from featcache.runtime import load_state, save_state
from featcache.train.loop import LoopSettings, RunState, Schedule, Selection, fit


class Logistic(Job):
    """Logistic regression per run, stacked; only the two required hooks and the weights per run are
    written, every other hook is the contract's default. ``stop_at`` {r: epoch} stops run r there;
    ``die_at`` raises KeyboardInterrupt in that epoch's val evaluation (a kill before its resume point)."""

    max_runs = 4

    def __init__(self, seeds, stop_at=None, die_at=None):
        self.runs, self.device = len(seeds), torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(160, 6, generator=g)
        y = (x[:, 0] + 0.5 * torch.randn(160, generator=g) > 0).float()
        self.data = {s: SplitData({"x": x[i], "y": y[i]}, pd.DataFrame(index=range(80)))
                     for s, i in (("train", slice(0, 80)), ("val", slice(80, 160)))}
        self.module = torch.nn.Module()
        self.module.weight = torch.nn.Parameter(torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(s))
                                                             for s in seeds]) * 0.1)
        self.stop_at, self.die_at, self.evaluations = stop_at or {}, die_at, 0

    def run_state_dict(self, r):
        return {"weight": self.module.weight[r:r + 1]}

    def load_run_state_dict(self, r, sd):
        with torch.no_grad():
            self.module.weight[r:r + 1].copy_(sd["weight"])

    def batch_loss(self, batch, state):
        logits = torch.einsum("rbd,rd->rb", batch["x"], self.module.weight)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"], reduction="none").mean(1)
        return loss, {}

    def evaluate(self, split):
        self.evaluations += 1
        if self.evaluations == self.die_at:
            raise KeyboardInterrupt
        d = self.data[split]
        with torch.no_grad():
            p = torch.sigmoid(d.tensors["x"] @ self.module.weight.T)  # (N, R)
        acc = ((p >= 0.5).float() == d.tensors["y"][:, None]).float().mean(0)
        return [({"acc": float(a)}, pd.DataFrame()) for a in acc]

    def stop_reason(self, row, r):
        return "told to stop" if self.stop_at.get(r) == row["epoch"] else None


def _settings(runs, epochs=5, **kw):
    return LoopSettings(epochs=epochs, batch_size=16, lr=0.1, seeds=list(range(runs)), grad_clip=1.0,
                        selection="acc", **kw)


def _dirs(root, runs):
    out = [root / f"seed{r}" for r in range(runs)]
    for d in out:
        d.mkdir(parents=True)
    return out


def _train(root, stop_at=None, die_at=None, resume=False, epochs=5, schedule="cosine"):
    job = Logistic([0, 1], stop_at, die_at)
    dirs = [root / f"seed{r}" for r in range(2)] if resume else _dirs(root, 2)
    return fit(job, dirs, _settings(2, epochs, schedule=schedule), resume=resume, progress=False)


def test_a_job_with_only_the_required_hooks_trains_and_selects(tmp_path):
    job = Logistic([0])
    assert job.batches(1, [], 8) is None and job.amp_dtype is None and tuple(job.notes) == ()
    assert job.run_rng_state(0) == {} and job.set_run_rng_state(0, {}) is None and job.epoch_values(None) == {}
    with pytest.raises(TypeError, match="abstract"):
        Job()  # batch_loss and evaluate have no default
    r = fit(job, _dirs(tmp_path, 1), _settings(1, epochs=4), progress=False)[0]
    scores = [row["score"] for row in r.log]
    assert [row["epoch"] for row in r.log] == [1, 2, 3, 4] and r.best_epoch == 1 + scores.index(max(scores))
    assert r.score == max(scores) and all(isinstance(v, (int, float, str)) for v in r.log[0].values())


def _reference(scores, min_epoch, patience, epochs, rule="best"):
    """Brute force from the definitions: epoch w improves when it competes (w >= min_epoch), is a
    number and beats every earlier competing number; a run stops at the first e < epochs whose last
    ``patience`` epochs all compete and none improves; ``best`` selects the first highest competing
    number seen (0: none), ``last`` the last epoch seen and never stops."""
    def improves(w):
        s = scores[w - 1]
        prev = [x for i, x in enumerate(scores[:w - 1], 1) if i >= min_epoch and not math.isnan(x)]
        return w >= min_epoch and not math.isnan(s) and (not prev or s > max(prev))

    stop = None if rule == "last" or not patience else next(
        (e for e in range(1, len(scores) + 1) if e < epochs and e - patience + 1 >= min_epoch
         and not any(improves(w) for w in range(e - patience + 1, e + 1))), None)
    seen = scores[:stop] if stop else scores
    if rule == "last":
        return len(seen), stop
    ok = [(x, -i) for i, x in enumerate(seen, 1) if i >= min_epoch and not math.isnan(x)]
    return (-max(ok)[1] if ok else 0), stop


@pytest.mark.parametrize("seed", range(40))
def test_the_selection_rule_agrees_with_a_brute_force_reading_of_the_scores(seed):
    rng = np.random.default_rng(seed)
    epochs = int(rng.integers(3, 12))
    scores = [float(v) for v in rng.choice([0.1, 0.2, 0.3, 0.4, np.nan], size=epochs)]  # ties and NaNs
    min_epoch, patience = int(rng.integers(1, 4)), int(rng.integers(0, 4))
    rule = "last" if seed % 5 == 0 else "best"
    sel = Selection("acc", min(min_epoch, epochs), rule, patience, epochs)
    stop = None
    for e, s in enumerate(scores, 1):
        _, reason = sel.update(e, s)
        if reason:
            stop = e
            assert f"for {patience} epochs (early stopping)" in reason
            break
    best, want_stop = _reference(scores, min(min_epoch, epochs), patience, epochs, rule)
    assert (stop, sel.best_epoch) == (want_stop, best), (scores, min_epoch, patience, rule)


def test_the_cosine_schedule_is_torchs_cosine_annealing():
    sch = Schedule("cosine", 0.3, 4, 11)  # epochs 4..11, as after extending a run of 3 epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.0)
    for epoch in range(4, 12):
        assert sch.lr_at(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        torch_sched.step()
    assert Schedule("constant", 0.3, 1, 5).lr_at(5) == 0.3


def test_the_run_state_round_trips_through_a_weights_only_resume_point(tmp_path):
    st = RunState(Schedule("cosine", 0.1, 1, 5), Selection(patience=2, epochs=5))
    st.selection.update(1, float("nan"))
    assert st.selection.best_score == -math.inf
    st.epoch, st.log, st.stopped = 1, [{"epoch": 1, "score": float("nan"), "train_loss": 0.5}], None
    save_state({"loop": st.state_dict()}, tmp_path / "r.pt")
    back = RunState(Schedule("constant", 1.0, 1, 1), Selection(patience=2, epochs=5))
    back.load_state_dict(load_state(tmp_path / "r.pt")["loop"])
    assert back.state_dict().keys() == st.state_dict().keys()
    assert back.schedule == st.schedule and back.selection == st.selection and back.epoch == 1
    assert math.isnan(back.log[0]["score"]) and back.log[0]["train_loss"] == 0.5


def test_a_killed_stack_resumes_to_the_same_weights_from_old_and_new_resume_points(tmp_path):
    whole = _train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", die_at=3)  # dies in epoch 3, after epoch 2's resume points
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "old", die_at=3)
    for r in range(2):  # the resume point as featcache wrote it before run states: the loop's fields as JSON
        f = tmp_path / "old" / f"seed{r}" / "resume.pt"
        saved = load_state(f)
        sd = saved["loop"]
        sd = {**sd, "best_score": None if sd["best_score"] == -math.inf else sd["best_score"]}
        saved["loop"] = {"epoch": sd["epoch"], "json": json.dumps(sd)}
        save_state(saved, f)
    for name in ("cut", "old"):
        got = _train(tmp_path / name, resume=True)
        for r in range(2):
            a = load_file(tmp_path / "whole" / f"seed{r}" / "last.safetensors")
            b = load_file(tmp_path / name / f"seed{r}" / "last.safetensors")
            assert torch.equal(a["weight"], b["weight"]), (name, r)
            assert got[r].best_epoch == whole[r].best_epoch and [x["epoch"] for x in got[r].log] == [1, 2, 3, 4, 5]


def test_a_stack_with_a_run_stopped_early_resumes_after_a_kill(tmp_path):
    """Run 0 stops at epoch 2 (its resume point stays at 2); the stack is killed in epoch 4; resuming
    continues run 1 from epoch 3 to the same weights as an uninterrupted stack (it used to be refused:
    'stacked runs resumed from different epochs')."""
    whole = _train(tmp_path / "whole", stop_at={0: 2})
    assert whole[0].epochs_run == 2 and whole[0].stopped == "told to stop" and whole[1].epochs_run == 5
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", stop_at={0: 2}, die_at=4)
    assert load_state(tmp_path / "cut" / "seed0" / "resume.pt")["loop"]["epoch"] == 2
    assert load_state(tmp_path / "cut" / "seed1" / "resume.pt")["loop"]["epoch"] == 3
    got = _train(tmp_path / "cut", stop_at={0: 2}, resume=True)
    for r in range(2):
        for f in ("best.safetensors", "last.safetensors"):
            a, b = (load_file(tmp_path / w / f"seed{r}" / f) for w in ("whole", "cut"))
            assert torch.equal(a["weight"], b["weight"]), (r, f)
        assert got[r].epochs_run == whole[r].epochs_run and got[r].stopped == whole[r].stopped
    # extending such a stack would restart its runs at different epochs: refused with one line
    with pytest.raises(FeatcacheError, match="stopped at different epochs: extend them one by one"):
        _train(tmp_path / "cut", resume=True, epochs=7)
