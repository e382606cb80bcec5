"""One contract for every task (issue 25 item 1): the heads, the MobileNetV4 filter and the DETR
fine-tune train through ``train_head``, write one run layout and one summary.json schema, record
their data (a cache by fingerprint, a manifest by sha256), and ``featcache evaluate RUN`` writes
what training's end wrote (one code path). Tiny data, one or two epochs each."""

import ast
import hashlib
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import NO_PLOTS, TINY, run_cli

import featcache.cli
from featcache.errors import FeatcacheError
from featcache.heads.task import get_task, list_tasks
from featcache.train import train_head
from featcache.train.trainer import SUMMARY_KEYS

#: Tiny models: one torch thread (two spin against each other on the shared cores).
pytestmark = pytest.mark.usefixtures("one_thread")

#: featcache's own tasks (a plugin registered by another test is not one of them).
OWN = ("stage1", "stage2", "xai", "faap", "mnv4", "detr")
#: The filter at toy sizes: random weights, 32 px, no augmentation.
MNV4_TINY = ["model.name=mobilenetv4_conv_small", "model.pretrained=none", "model.image_size=32",
             "training.batch_size=8", "training.device=cpu", "training.patience=0", "training.augment=false"]


def _subset(src, out, per_split: dict):
    """Half real, half fake of each split of a manifest, paths made absolute."""
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df["path"] = [str(src.parent / p) for p in df["path"]]
    parts = [df[(df["split"] == s) & (df["label"] == lab)].head(k // 2) for s, k in per_split.items()
             for lab in ("0", "1")]
    pd.concat(parts).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def data(face_caches, stage1_run, tmp_path_factory):
    """Each task's data and its tiny settings: (source path, sets, options)."""
    from featcache.data.synth_detection import synth_detection
    from featcache.extract import extract

    root = tmp_path_factory.mktemp("tasks")

    def audio():
        run_cli("-q", "synth", "audio", root / "audio", "--n", "45", "--seed", "1", "--min-seconds", "1.0",
                "--max-seconds", "1.5")
        extract("xlsr", root / "audio" / "manifest.csv", root / "xlsr", model="tiny", batch_size=8, num_workers=0,
                progress=False)
        return root / "xlsr"

    def detection(queries: bool):
        if not (root / "det").exists():
            synth_detection(root / "det", n=16, seed=2, progress=False)
        if not queries:
            return root / "det" / "manifest.csv"
        extract("detr", root / "det" / "manifest.csv", root / "queries", model="tiny", batch_size=8, num_workers=0,
                progress=False)
        return root / "queries"

    one = ["training.epochs=1", "training.device=cpu"]
    tiny = [s for s in TINY if s not in NO_PLOTS]  # the layout has its plots
    # each task's data is made when its test first asks (a worker of pytest-xdist makes only what it runs)
    return _Lazy({
        "stage1": lambda: (face_caches / "s1", [*tiny, "training.epochs=1"], {}),
        "stage2": lambda: (face_caches / "det", [*tiny, "training.epochs=2", "fairness.warmup_start=0",
                                                 "fairness.warmup_end=1", "selection.min_epoch=2",
                                                 "model.classifier_hidden=[16]", "model.num_ca_views=2",
                                                 "model.ca_heads=2"], {"stage1": stage1_run}),
        "xai": lambda: (audio(), [*one, "training.batch_size=8"], {}),
        "faap": lambda: (detection(True), [*one, "training.batch_size=8"], {}),
        "mnv4": lambda: (_subset(face_caches / "data" / "manifest.csv", root / "faces.csv",
                                 {"train": 16, "val": 8, "test": 8}), [*MNV4_TINY, "training.epochs=1"], {}),
        "detr": lambda: (detection(False), [*one, "training.batch_size=8"], {}),
    })


class _Lazy(dict):
    """A dict whose values are made on first access (and kept)."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if callable(value):
            value = value()
            self[key] = value
        return value


def test_the_registry_holds_every_own_task():
    assert set(OWN) <= set(list_tasks())
    assert {t: get_task(t).source for t in OWN} == {"stage1": "cache", "stage2": "cache", "xai": "cache",
                                                     "faap": "cache", "mnv4": "manifest", "detr": "manifest"}


def _same(a, b) -> bool:
    """Equal JSON values, NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("task", OWN)
def test_every_task_writes_one_layout_and_evaluate_repeats_its_evaluation(task, data, tmp_path):
    source, sets, options = data[task]
    cls = get_task(task)
    out = tmp_path / task
    r = train_head(task, source, out, sets=sets, options=options, progress=False)
    for f in ("config.yaml", "model.json", "log.jsonl", "training_log.csv", "best.safetensors", "last.safetensors",
              "summary.json", "plots/training_curves.png"):
        assert (out / f).is_file(), f
    assert not (out / "resume.pt").exists()  # pruned when the run finished (no --keep-resume)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)  # one schema, the task's extras after it
    assert summary["task"] == task and summary["epochs_run"] == r.epochs_run == len((out / "log.jsonl").read_text()
                                                                                      .splitlines())
    assert summary["evaluated"] == ["val", "test"]  # the detection manifest has a val split too
    # the config records the data the task read: a cache by its fingerprint, a manifest by its sha256
    from featcache.config import load_config

    cfg = load_config(out / "config.yaml")
    recorded = cfg[cls.source]
    if cls.source == "manifest":
        assert recorded["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    else:
        from featcache.cache import open_cache

        assert recorded["fingerprint"] == open_cache(source).fingerprint
    assert (out / recorded["relative"]).resolve() == source.resolve()
    for split in summary["evaluated"]:
        ev = out / "eval" / split
        for f in ("metrics.json", "predictions.csv", "report.md"):
            assert (ev / f).is_file(), (split, f)
        written = json.loads((ev / "metrics.json").read_text())
        assert _same(written, summary[split])  # summary.json holds each split's metrics as written
        assert len(pd.read_csv(ev / "predictions.csv")) > 0
    own_plot = {"xai": "importance.png", "mnv4": "cascade_analysis.png"}.get(task)  # a task's write_plots
    assert own_plot is None or (out / "eval" / "test" / "plots" / own_plot).is_file()
    # `featcache evaluate RUN`: the same code path, so the same numbers and files as training's end
    before = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    files = sorted(p.relative_to(out / "eval" / "test") for p in (out / "eval" / "test").rglob("*"))
    proc = run_cli("-q", "evaluate", out)
    assert "wrote" in proc.stdout
    after = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    strip = {"provenance"}
    assert _same({k: v for k, v in after.items() if k not in strip}, {k: v for k, v in before.items() if k not in strip})
    assert after["provenance"][cls.source] == {k: v for k, v in recorded.items() if k != "relative"}
    assert sorted(p.relative_to(out / "eval" / "test") for p in (out / "eval" / "test").rglob("*")) == files
    if task == "detr":
        _detr_checks(out, source, after, tmp_path)


def _detr_checks(out, source, m, tmp_path):
    """The DETR run's test metrics are COCO AP per gender with their gaps, and its folder is a Hugging
    Face model that extract reads."""
    from featcache.cache import open_cache
    from featcache.extract import extract

    assert {"ap", "ap50", "ar", "ap_male", "ap_female", "ar_male", "ar_female"} <= set(m)
    assert m["ap_gap"] == pytest.approx(m["ap_male"] - m["ap_female"], nan_ok=True)
    assert m["images"] == int((pd.read_csv(source)["split"] == "test").sum())
    extract("detr", source, tmp_path / "c", model=str(out), num_workers=0, progress=False)
    assert open_cache(tmp_path / "c").backbone["pretrained"] == "local"


def test_ablate_mnv4_tables_two_seeds(data, tmp_path):
    source, sets, _ = data["mnv4"]
    out = tmp_path / "abl"
    args = [a for s in sets for a in ("--set", s)]
    run_cli("-q", "ablate", "mnv4", "--manifest", source, "--presets", "design", "--seeds", "0,1", "--out", out, *args,
            "--set", "logging.plots=false")
    table = pd.read_csv(out / "ablation.csv")
    assert list(zip(table["preset"], table["seed"])) == [("design", 0), ("design", 1)]
    for seed, auc in zip(table["seed"], table["test_auc"]):
        run = json.loads((out / "design" / f"seed{seed}" / "eval" / "test" / "metrics.json").read_text())
        assert auc == pytest.approx(run["auc"], abs=5e-4)  # the table rounds
    assert "design" in (out / "ablation.md").read_text()
    proc = run_cli("ablate", "mnv4", "--cache", source, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "mnv4 trains from a manifest: pass --manifest MANIFEST, not --cache" in proc.stderr


def test_a_task_given_other_data_says_what_it_reads(data, tmp_path):
    faces = data["mnv4"][0]
    for args, said in ((["train-head", "stage1", "--manifest", faces], "stage1 trains from a cache: pass --cache CACHE, "
                                                                         "not --manifest"),
                       (["train-head", "mnv4"], "mnv4 trains from a manifest: pass --manifest MANIFEST"),
                       (["train-head", "detr", "--manifest", faces], "no row has both image_id and annotations")):
        proc = run_cli(*args, "--out", tmp_path / "x", check=False)
        assert proc.returncode == 2 and said in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "x").exists()


# -- a task carries its own command-line options (issue 25) ------------------------------------------------
def test_a_tasks_own_options_come_from_its_declarations():
    """``train-head`` and ``ablate`` offer each registered task's required runs (``requires_runs``) and
    setting shortcuts (``cli_options``), made from those declarations; the values given split into the
    task's runs and ``sets`` items (named as typed), and an option the task does not declare is one line."""
    from featcache.heads.task import task_option_values, task_options

    opts = {o.name: o for o in task_options()}
    declared = {}
    for name in list_tasks():
        cls = get_task(name)
        declared.update({opt: None for opt in cls.requires_runs})
        declared.update({opt: key for opt, (key, _) in cls.cli_options.items()})
        for opt in (*cls.requires_runs, *cls.cli_options):
            assert name in opts[opt].tasks
    assert {n: o.key for n, o in opts.items()} == declared
    assert opts["stage1"].tasks == ("stage2",) and opts["stage1"].key is None
    assert opts["prototype_mode"].tasks == ("xai",) and opts["prototype_mode"].choices == ("ema", "fixed", "learnable")
    from featcache.config import Shortcut

    assert task_option_values("xai", {"stage1": None, "prototype_mode": "fixed"}) == (
        {}, [Shortcut("model.prototype_mode", "fixed", "prototype_mode")])
    assert task_option_values("stage2", {"stage1": "runs/s1", "prototype_mode": None}) == ({"stage1": "runs/s1"}, [])
    with pytest.raises(FeatcacheError, match="^--prototype-mode is an option of xai, not of stage2; stage2 takes --stage1$"):
        task_option_values("stage2", {"prototype_mode": "ema"})


def test_train_head_and_ablate_offer_the_tasks_options_and_name_no_task(tmp_path):
    for command in ("train-head", "ablate"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert "--stage1 RUN stage2: a finished stage1 run (RUN folder)." in text
        assert "--prototype-mode [ema|fixed|learnable] xai: prototypes:" in text and "(sets model.prototype_mode)" in text
        assert "images: detr, mnv4" in text or "images (detr, mnv4)" in text  # the manifest tasks, from the registry
    wrong = run_cli("train-head", "stage1", "--stage1", tmp_path, "--cache", tmp_path, "--out", tmp_path / "r", check=False)
    assert (wrong.returncode, wrong.stderr.strip()) == (
        2, "error: --stage1 is an option of stage2, not of stage1; stage1 takes no task option")
    wrong = run_cli("ablate", "stage2", "--prototype-mode", "ema", "--cache", tmp_path, "--out", tmp_path / "a", check=False)
    assert (wrong.returncode, wrong.stderr.strip()) == (
        2, "error: --prototype-mode is an option of xai, not of stage2; stage2 takes --stage1")
    # the two commands' code (not their docstrings' examples) names no task: the options come from the tasks
    tree = ast.parse((Path(featcache.cli.__file__)).read_text())
    names = re.compile(r"\b(" + "|".join(map(re.escape, list_tasks())) + r")\b")
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("train_head_cmd", "ablate")):
        doc = fn.body[0].value if isinstance(fn.body[0], ast.Expr) else None
        named = [n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and n is not doc and names.search(n.value)]
        assert named == [], fn.name
