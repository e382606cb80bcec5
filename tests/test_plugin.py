"""A method of your own, outside featcache: one module, one YAML and one entry point.

The test writes a small installed package (its ``*.dist-info`` with an ``entry_points.txt`` in the
``featcache.tasks`` group, as ``pip install`` leaves it) and trains, evaluates and ablates its task
through featcache's CLI, with no edit of featcache.
"""

import importlib
import json
import textwrap

import pandas as pd
from conftest import run_cli

from featcache import config
from featcache.cache.synth import synth_feature_cache
from featcache.heads.task import TASKS

PLUGIN = '''
"""A label-smoothed linear probe on cached features: a new method in one module."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featcache.heads.blocks import StackedLinear, run_generators
from featcache.heads.task import SplitData, Task, register_task
from featcache.metrics import all_metrics
from featcache.metrics.detection import sigmoid


@register_task("smooth_probe")
class SmoothProbe(Task):
    config_file = Path(__file__).with_name("smooth_probe.yaml")
    max_runs = 8
    coefficient_keys = ("smoothing",)  # presets differ by it: their runs stack
    cli_options = {"smoothing": ("loss.smoothing", "label smoothing")}  # train-head/ablate --smoothing X

    def tensors(self, data):
        meta = data.meta
        return SplitData({"x": torch.from_numpy(np.array(data.features)),
                          "label": torch.from_numpy(meta["label"].to_numpy().astype(np.int64)),
                          "subgroup": torch.from_numpy(meta["subgroup"].to_numpy().astype(np.int64))}, meta)

    def make_spec(self):
        return {"dim": int(self.data["train"].tensors["x"].shape[1])}

    def build(self, spec):
        return StackedLinear(self.runs, spec["dim"], 2, run_generators(self.seeds()))

    def batch_loss(self, batch, state):
        logits, y = self.module(batch["x"]), batch["label"]
        eps = self.coefficients()["smoothing"].view(-1, 1)
        nll = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none").reshape(y.shape)
        uniform = -F.log_softmax(logits, -1).mean(-1)
        loss = ((1 - eps) * nll + eps * uniform).mean(-1)
        return loss, {"loss": loss.detach()}

    def evaluate(self, split):
        self.module.eval()
        d = self.data[split]
        with torch.no_grad():
            logits = self.module(d.tensors["x"].unsqueeze(0).expand(self.runs, -1, -1))
        y, groups = d.tensors["label"].numpy(), d.tensors["subgroup"].numpy()
        out = []
        for r in range(self.runs):
            score = (logits[r, :, 1] - logits[r, :, 0]).numpy()
            preds = d.meta[["sample_id", "label", "subgroup", "identity"]].copy()
            preds.insert(2, "score", score)
            preds.insert(3, "prob", sigmoid(score))
            out.append((all_metrics(y, score, groups=groups), preds))
        return out
'''

CONFIG = '''
model: {}
loss:
  smoothing: 0.0
training: {epochs: 3, lr: 0.05, batch_size: 64, weight_decay: 0.0, seed: 0, device: cpu, save_every: 0}
selection: {score: auc, min_epoch: 1, rule: best}
evaluation: {threshold: "0.5"}
logging: {tensorboard: false}
constraints:
  loss.smoothing: float in [0, 1)
presets:
  plain: {loss: {smoothing: 0.0}}
  smooth: {loss: {smoothing: 0.2}}
default_preset: plain
'''


def _install(root):
    """What `pip install` of a package `smooth-probe` leaves on a path: the module and its metadata."""
    pkg = root / "smooth_probe_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "smooth_probe.yaml").write_text(textwrap.dedent(CONFIG))
    meta = root / "smooth_probe-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: smooth-probe\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[featcache.tasks]\nsmooth_probe = smooth_probe_plugin:SmoothProbe\n")
    return root


def test_a_task_from_another_package_trains_evaluates_and_ablates_through_the_cli(tmp_path, monkeypatch):
    site = _install(tmp_path / "site")
    cache = tmp_path / "cache"
    synth_feature_cache(cache, rows=400, dim=16, seed=0, part_rows=512)
    # the package on the path, as after `pip install`; featcache's registry and config lookups see it
    # (restored afterwards, so that no other test sees the plugin)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    TASKS.names()  # featcache's own tasks registered first: a copy taken before they import would lose them
    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))
    monkeypatch.setattr(TASKS, "_plugins_loaded", False)
    monkeypatch.setattr(config, "PLUGIN_CONFIGS", dict(config.PLUGIN_CONFIGS))

    def cli(*args, check=True):
        return run_cli(*args, check=check)

    helped = " ".join(cli("train-head", "--help").stdout.split())
    assert "smooth_probe" in helped  # the help lists it beside featcache's own, with its own option
    assert "--smoothing VALUE smooth_probe: label smoothing (sets loss.smoothing)." in helped
    run = tmp_path / "run"
    cli("-q", "train-head", "smooth_probe", "--cache", cache, "--out", run, "--preset", "smooth",
        "--set", "logging.plots=false")  # no PNGs: none is looked at here
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "smooth_probe" and summary["preset"] == "smooth" and summary["test"]["auc"] > 0.6
    again = cli("-q", "evaluate", run)
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text())["auc"] == summary["test"]["auc"]
    assert "auc" in again.stdout
    # its declared constraint is checked like featcache's own, in the same message
    bad = cli("-q", "train-head", "smooth_probe", "--cache", cache, "--out", tmp_path / "bad",
              "--set", "loss.smoothing=1", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --set loss.smoothing=1: loss.smoothing must be a number >= 0 and < 1; got 1.0"
    bad = cli("-q", "ablate", "smooth_probe", "--cache", cache, "--out", tmp_path / "bad", "--smoothing", "1", check=False)
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "error: --smoothing 1: loss.smoothing must be a number >= 0 and < 1; got 1.0")  # named as typed
    # an ablation over its presets and two seeds, stacked as one job
    out = tmp_path / "ablation"
    cli("-q", "ablate", "smooth_probe", "--cache", cache, "--presets", "all", "--seeds", "0,1", "--out", out,
        "--set", "logging.plots=false")
    table = pd.read_csv(out / "ablation.csv")
    assert sorted(zip(table["preset"], table["seed"])) == [("plain", 0), ("plain", 1), ("smooth", 0), ("smooth", 1)]
    assert (table["test_auc"] > 0.6).all() and (out / "ablation.md").is_file()
    # the logging settings are no part of what a run is: the same ablation with its plots on reuses every run
    again = cli("-q", "ablate", "smooth_probe", "--cache", cache, "--presets", "all", "--seeds", "0,1", "--out", out)
    assert "4 finished run(s) reused" in again.stdout, again.stdout
    assert pd.read_csv(out / "ablation.csv").equals(table) and not (out / "plain" / "seed0" / "plots").exists()
