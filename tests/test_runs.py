"""The one loop and the one run layout: stacked runs, resume after a kill, selection rules,
checkpoints, and the errors a user meets at the CLI (issue 13, issue 19 items 11-12)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import NO_PLOTS
from safetensors.torch import load_file

from featcache.cache.synth import synth_feature_cache
from featcache.config import load_config
from featcache.errors import FeatcacheError
from featcache.heads.task import TASKS, SplitData, Task, register_task
from featcache.train import train_runs


class ToyStack(Task):
    """Logistic regression per run, stacked: weight (R, D), bias (R,); an L2 weight per run."""

    max_runs = 4
    coefficient_keys = ("l2",)  # the per-run loss weight: runs that differ only in it stack
    meta_columns = ["sample_id", "label", "split", "subgroup"]
    summary_keys = ("auc", "acc")

    def tensors(self, data):
        return SplitData({"x": torch.from_numpy(np.array(data.features)),
                          "y": torch.from_numpy(data.meta["label"].to_numpy().astype(np.float32))}, data.meta)

    def make_spec(self):
        return {"dim": int(self.data["train"].tensors["x"].shape[1])}

    def build(self, spec):
        ws, bs = [], []
        for cfg in self.cfgs:  # run r's initialisation depends only on its seed
            g = torch.Generator().manual_seed(int(cfg["training"]["seed"]))
            ws.append(torch.randn(1, spec["dim"], generator=g) * 0.1)
            bs.append(torch.zeros(1))
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(torch.cat(ws))
        m.bias = torch.nn.Parameter(torch.cat(bs))
        return m

    def coefficients(self):
        return {"l2": torch.tensor([float(c["loss"]["l2"]) for c in self.cfgs], device=self.device)}

    def batch_loss(self, batch, state):
        logits = torch.einsum("rbd,rd->rb", batch["x"], self.module.weight) + self.module.bias[:, None]
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"], reduction="none").mean(1)
        l2 = self.module.weight.pow(2).sum(1)
        return ce + self.coefficients()["l2"] * l2, {"ce": ce.detach(), "l2": l2.detach()}

    def evaluate(self, split):
        from sklearn.metrics import roc_auc_score

        d = self.data[split]
        with torch.no_grad():
            logits = d.tensors["x"] @ self.module.weight.T + self.module.bias  # (N, R)
        y = d.tensors["y"].cpu().numpy()
        out = []
        for r in range(self.runs):
            s = logits[:, r].cpu().numpy()
            p = 1 / (1 + np.exp(-s))
            preds = d.meta[["sample_id", "label", "subgroup"]].assign(score=s, prob=p)
            out.append(({"auc": float(roc_auc_score(y, s)), "acc": float(((p >= 0.5) == y).mean())}, preds))
        return out


@pytest.fixture(autouse=True, scope="module")
def _toy_task_registered():
    """The toy task is registered while this module's tests run, and removed after: the help
    lists of other tests enumerate every registered task, and a toy has no YAML config."""
    register_task("toy_stack")(ToyStack)
    yield
    TASKS._items.pop("toy_stack", None)


def toy_cfg(seed: int, l2: float, epochs: int = 4, plots: bool = False, **training):
    return {"training": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "weight_decay": 0.01, "grad_clip": 0.5,
                         "seed": seed, "device": "cpu", "patience": 0, "save_every": 0, **training},
            "selection": {"score": "auc - acc * 0", "min_epoch": 1, "rule": "best"},
            "loss": {"l2": l2}, "cache": {"path": "x"}, "logging": {"plots": plots}, "preset": None}


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """The controlled synthetic feature cache (data with a known subgroup structure), small."""
    out = tmp_path_factory.mktemp("controlled") / "c"
    synth_feature_cache(out, rows=1200, dim=16, seed=0, part_rows=512)
    return out


def _weights(run):
    return load_file(run / "best.safetensors")


def test_two_stacked_runs_equal_two_single_runs(controlled, tmp_path):
    cfgs = [toy_cfg(0, 0.0), toy_cfg(1, 0.1)]
    both = train_runs("toy_stack", controlled, [tmp_path / "a0", tmp_path / "a1"], cfgs=[dict(c) for c in cfgs],
                      progress=False)
    single = [train_runs("toy_stack", controlled, [tmp_path / f"b{r}"], cfgs=[cfgs[r]], progress=False)[0]
              for r in range(2)]
    for r in range(2):
        assert both[r].best_epoch == single[r].best_epoch
        for split in ("val", "test"):
            got, want = getattr(both[r], split), getattr(single[r], split)
            numbers = {k for k, v in want.items() if isinstance(v, (int, float))}  # the metrics (not intervals, notes)
            assert numbers and {k: got[k] for k in numbers} == pytest.approx({k: want[k] for k in numbers}, abs=1e-5)
        wa, wb = _weights(tmp_path / f"a{r}"), _weights(tmp_path / f"b{r}")
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa) and wa["weight"].shape[0] == 1
        la = pd.read_csv(tmp_path / f"a{r}" / "training_log.csv")
        lb = pd.read_csv(tmp_path / f"b{r}" / "training_log.csv")
        np.testing.assert_allclose(la["train_ce"], lb["train_ce"], rtol=1e-5)
    # the runs differ (seed and loss weight), so the comparison above is not trivially true
    assert not torch.allclose(_weights(tmp_path / "a0")["weight"], _weights(tmp_path / "a1")["weight"])


def test_a_killed_head_run_resumes_to_the_same_weights(controlled, tmp_path, monkeypatch):
    cfg = toy_cfg(3, 0.05, epochs=4)
    train_runs("toy_stack", controlled, [tmp_path / "whole"], cfgs=[json.loads(json.dumps(cfg))], progress=False)

    real = ToyStack.evaluate
    calls = {"n": 0}

    def dies_in_epoch_3(self, split):
        calls["n"] += 1
        if calls["n"] == 3:  # the val evaluation of epoch 3: the process dies before its resume point
            raise KeyboardInterrupt
        return real(self, split)

    monkeypatch.setattr(ToyStack, "evaluate", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_runs("toy_stack", controlled, [tmp_path / "cut"], cfgs=[json.loads(json.dumps(cfg))], progress=False)
    monkeypatch.setattr(ToyStack, "evaluate", real)
    assert torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)["loop"]["epoch"] == 2
    # another config is refused, naming the difference; the same one resumes
    other = json.loads(json.dumps(cfg))
    other["training"]["lr"] = 0.5
    with pytest.raises(FeatcacheError, match=r"training.lr: 0.05 -> 0.5"):
        train_runs("toy_stack", controlled, [tmp_path / "cut"], cfgs=[other], progress=False)
    # the logging settings are not: it resumes with its plots on, and its config.yaml records so
    said, drawn = [], toy_cfg(3, 0.05, epochs=4, plots=True)
    train_runs("toy_stack", controlled, [tmp_path / "cut"], cfgs=[drawn], progress=False, echo=said.append)
    assert any("resuming" in s for s in said)
    assert (tmp_path / "cut" / "plots" / "training_curves.png").is_file() and not (tmp_path / "whole" / "plots").exists()
    assert load_config(tmp_path / "cut" / "config.yaml")["logging"]["plots"] is True
    for f in ("best.safetensors", "last.safetensors"):
        a, b = load_file(tmp_path / "whole" / f), load_file(tmp_path / "cut" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    log = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    with pytest.raises(FeatcacheError, match="already holds a finished run"):
        train_runs("toy_stack", controlled, [tmp_path / "cut"], cfgs=[json.loads(json.dumps(cfg))], progress=False)


def test_rule_last_save_every_and_patience(controlled, tmp_path):
    last = train_runs("toy_stack", controlled, [tmp_path / "last"], progress=False,
                      cfgs=[{**toy_cfg(0, 0.0, epochs=3, save_every=1),
                             "selection": {"score": "auc", "min_epoch": 1, "rule": "last"}}])[0]
    assert last.best_epoch == 3
    snaps = sorted(p.name for p in (tmp_path / "last" / "checkpoints").iterdir())
    assert snaps == ["epoch_0001.safetensors", "epoch_0002.safetensors", "epoch_0003.safetensors"]
    a, b = _weights(tmp_path / "last"), load_file(tmp_path / "last" / "checkpoints" / "epoch_0003.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a score that never improves after epoch 1 stops after `patience` epochs
    stop = train_runs("toy_stack", controlled, [tmp_path / "stop"], progress=False,
                      cfgs=[{**toy_cfg(0, 0.0, epochs=10, patience=2),
                             "selection": {"score": "0 * auc", "min_epoch": 1, "rule": "best"}}])[0]
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert stop.best_epoch == 1 and summary["epochs_run"] == 3 and "early stopping" in summary["stopped"]


# -- the CLI's one line per mistake ----------------------------------------------------------------
def _cli(*args, capsys):
    from featcache.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def test_cli_errors_name_what_is_wrong(controlled, tmp_path, capsys):
    code, err = _cli("train-head", "stage2", "--cache", controlled, "--out", tmp_path / "x", "--stage1",
                     tmp_path / "no-such-run", capsys=capsys)
    assert code == 2 and "does not exist" in err and "config.yaml" not in err and err.count("\n") == 1
    code, err = _cli("evaluate", tmp_path / "no-such-run", capsys=capsys)
    assert code == 2 and "does not exist" in err
    code, err = _cli("train-head", "stage1", "--cache", controlled, "--out", tmp_path / "y", "--set",
                     "training.batch_size=0", capsys=capsys)
    assert code == 2 and "training.batch_size" in err and "training.epochs" not in err
    code, err = _cli("finetune-detr", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "d", "--epochs", "0",
                     capsys=capsys)
    assert code == 2 and err.startswith("error: --epochs 0: training.epochs must be") and err.count("\n") == 1
    if not torch.cuda.is_available():
        code, err = _cli("train-head", "stage1", "--cache", controlled, "--out", tmp_path / "z", "--set",
                         "training.device=cuda", capsys=capsys)
        assert code == 2 and "training.device" in err and "--device" not in err


def test_demo_bias_line_sets_each_race_auc_beside_its_planted_artifact_strength():
    import pandas as pd

    from featcache.demo import bias_line

    names = ["male-asian", "male-white", "male-black", "male-other",
             "female-asian", "female-white", "female-black", "female-other"]
    auc = [0.81, 1.0, 0.528, 0.972, 1.0, 0.992, 0.667, 0.917]
    line = bias_line(pd.DataFrame({"code": range(8), "subgroup": names, "auc": auc}), bias=0.6)
    # strength 1 - 0.6 * hardness, hardness (0.70, 0.00, 0.90, 0.35, 0.80, 0.10, 1.00, 0.45) by code
    assert line == ("AUC by race (artifact strength of its fakes): white 0.99-1.00 (0.94-1.00), "
                    "other 0.92-0.97 (0.73-0.79), asian 0.81-1.00 (0.52-0.58), black 0.53-0.67 (0.40-0.46)")


def test_demo_stage2_schedule_selects_only_epochs_at_the_whole_fairness_weight():
    """The demo's Stage-2 schedule: the fairness weight (counted as Stage 2 counts it) is 1 at every
    epoch from selection.min_epoch to the end and below 1 just before; the run is long enough."""
    from featcache.demo import _stage2_schedule
    from featcache.heads.stage2 import warmup_weight

    for epochs in (1, 2, 3, 6, 12, 15):
        sets = dict(s.split("=") for s in _stage2_schedule(epochs))
        start, end, first = (int(sets[k]) for k in ("fairness.warmup_start", "fairness.warmup_end", "selection.min_epoch"))
        assert int(sets["training.epochs"]) == epochs and first <= epochs
        assert all(warmup_weight(e, start, end) == 1.0 for e in range(first, epochs + 1))
        assert first == 1 or warmup_weight(first - 1, start, end) < 1.0
    assert dict(s.split("=") for s in _stage2_schedule(12))["selection.min_epoch"] == "9"  # warm-up 4 -> 8


def test_demo_runs_end_to_end_at_tiny_sizes(tmp_path):
    """`featcache demo`'s library function: the filter first, its features cached by the timm backbone
    and used by Stage 1 and the Stage-2 ablation; steps numbered [i/8] in order; figures returned."""
    from featcache.cache import open_cache
    from featcache.data.synth_faces import minimum_n
    from featcache.demo import DemoSizes, run_demo

    lines = []
    sizes = DemoSizes(faces=minimum_n(), filter_epochs=1, stage1_epochs=1, stage2_epochs=1, seeds=(0,),
                      presets=("full",), branches=("faces",))
    r = run_demo(tmp_path / "demo", sizes=sizes, progress=False, echo=lines.append)
    steps = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    assert steps == ["[1/8]", "[2/8]", "[3/8]", "[4/8]", "[5/8]"]
    cache = open_cache(tmp_path / "demo" / "caches" / "mnv4")
    assert cache.backbone["name"] == "timm" and cache.dim == 1280  # the filter's pooled features
    run = tmp_path / "demo" / "runs" / "mnv4-features" / "ablation" / "full" / "seed0"
    assert "| full | 1 |" in r["ablation"]
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    lo, hi = metrics["ci95"]["auc"]
    assert lo <= metrics["auc"] <= hi
    assert any("leakage probe race" in line for line in lines)
    assert any(line.startswith("      full, seed 0, test: auc ") and " [" in line for line in lines)
    assert sum("AUC: area under the ROC curve" in line for line in lines) == 1  # each meaning printed once
    # the test lines' "(floor f, p q)" and coverage are explained once, at the start
    assert sum("(floor, p) after a fairness gap" in line for line in lines) == 1
    assert sum("fairness over n a of b" in line for line in lines) == 1


def test_detr_finetune_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    from featcache.data.synth_detection import synth_detection
    from featcache.e2e import detr_finetune

    synth_detection(tmp_path / "d", n=12, seed=0, progress=False)
    kw = dict(epochs=2, batch_size=4, device="cpu", progress=False)
    detr_finetune.finetune_detr(tmp_path / "d" / "manifest.csv", tmp_path / "whole", **kw)
    real = detr_finetune.DetrTask.epoch_values

    def dies_in_epoch_2(self, state):
        if state.epoch == 2:
            raise KeyboardInterrupt
        return real(self, state)

    monkeypatch.setattr(detr_finetune.DetrTask, "epoch_values", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        detr_finetune.finetune_detr(tmp_path / "d" / "manifest.csv", tmp_path / "cut", **kw)
    monkeypatch.setattr(detr_finetune.DetrTask, "epoch_values", real)
    detr_finetune.finetune_detr(tmp_path / "d" / "manifest.csv", tmp_path / "cut", **kw)  # the same command resumes
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "config.json").is_file()  # the Hugging Face folder extract reads


def test_training_curves_show_every_logged_series(controlled, tmp_path, monkeypatch):
    """What a user sees: the train terms and the val metrics as lines, the best epoch marked, not blank."""
    from PIL import Image

    import featcache.report.plots as plots

    real_plt, figures = plots._plt(), []

    class Recording:
        def __getattr__(self, name):
            return getattr(real_plt, name)

        def close(self, fig=None):
            figures.append(fig)
            return real_plt.close(fig)

    monkeypatch.setattr(plots, "_plt", lambda: Recording())
    r = train_runs("toy_stack", controlled, [tmp_path / "r"], cfgs=[{**toy_cfg(0, 0.1, epochs=3, plots=True),
                                                                      "selection": {"score": "auc"}}], progress=False)[0]
    left, right = figures[0].axes
    series = [line for line in left.get_lines() if not line.get_label().startswith("_")]
    assert {line.get_label() for line in series} == {"loss", "ce", "l2"}
    assert {"auc", "acc", "selection score"} <= {line.get_label() for line in right.get_lines()}
    for line in series:
        assert list(line.get_xdata()) == [1, 2, 3]
    marks = [line for line in right.get_lines() if line.get_label().startswith("_")]  # the best-epoch rule
    assert any(list(m.get_xdata()) == [r.best_epoch] * 2 for m in marks)
    pixels = np.asarray(Image.open(tmp_path / "r" / "plots" / "training_curves.png").convert("L"))
    assert (pixels < 200).mean() > 0.02  # ink on the page, not a blank canvas


# `featcache ARGS` in a child whose loop holds (prints "held", then waits to be killed) once it has
# written epoch 2's resume point: the kill lands mid-run however fast the machine is.
_HELD_AFTER_EPOCH_2 = """
import sys, time
from featcache.train import loop
save = loop.save_state
def held(state, path):
    save(state, path)
    if state["loop"]["epoch"] >= 2:
        print("held", flush=True)
        time.sleep(3600)
loop.save_state = held
sys.argv = ["featcache", *sys.argv[1:]]
from featcache.cli import main
main()
"""


def test_train_head_killed_with_sigkill_resumes_with_the_same_command(controlled, tmp_path):
    """A real kill -9 of `featcache train-head` mid-run; the same command resumes to the same weights."""
    import os
    import signal
    import subprocess
    import sys

    from featcache.train import train_head

    sets = ["training.epochs=4", "training.device=cpu", *NO_PLOTS]
    args = [sys.executable, "-c", _HELD_AFTER_EPOCH_2, "-q", "train-head", "stage1", "--preset", "grl_only",
            "--cache", str(controlled), "--out", str(tmp_path / "cut")] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the child holds after epoch 2's resume point: no clock involved
    assert line.startswith("held"), proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "summary.json").exists()
    from conftest import run_cli

    run_cli(*args[3:])  # the same command line resumes (through the CLI's entry point, in this process)
    train_head("stage1", controlled, tmp_path / "whole", preset="grl_only", sets=sets, progress=False)
    for f in ("best.safetensors", "last.safetensors"):
        a, b = load_file(tmp_path / "whole" / f), load_file(tmp_path / "cut" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    log = tmp_path / "cut" / "log.jsonl"
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(1, 5))
