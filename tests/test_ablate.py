"""`featcache ablate` (issue 16; issue 19 items 4 and 12): runs grouped by stack_key and trained as
one job each, equal to sequential `train_head` runs; reuse and redo; validation before training;
shards, collect, devices, out-of-memory splitting; each task's own table."""

import hashlib
import importlib
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import S2TINY, TINY

from featcache.cache.synth import synth_feature_cache
from featcache.errors import FeatcacheError
from featcache.train import ablate, train_head
from featcache.train.ablate import PlannedRun, assign, group_runs, parse_shard, plan, shard_runs, train_group

AB = importlib.import_module("featcache.train.ablate")  # the module (featcache.train.ablate is the function)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """A small controlled cache, another-backbone cache, and a 1-epoch Stage-1 run on the first."""
    root = tmp_path_factory.mktemp("ablate")
    synth_feature_cache(root / "c", rows=240, dim=16, seed=0, part_rows=256)
    synth_feature_cache(root / "other", rows=64, dim=16, seed=1, part_rows=64)  # another "backbone" (weights)
    train_head("stage1", root / "c", root / "s1", sets=[*TINY, "training.epochs=1"], progress=False)
    return root


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_batched_ablation_equals_sequential_train_head_runs_then_reuses_and_redoes(bed, tmp_path):
    kw = dict(presets=["none", "full", "cvar"], seeds=[0, 1], sets=S2TINY, options={"stage1": bed / "s1"},
              progress=False, devices=["cpu"], keep_resume=True)
    lines = []
    res = ablate("stage2", bed / "c", tmp_path / "abl", echo=lines.append, **kw)
    # one group, one job: the three presets differ only in loss coefficients
    assert res.groups == ["group 1: none, full, cvar x seeds 0, 1 = 6 run(s) as one job"]
    assert len(res.table) == 6 and not res.missing
    # runs against their own single runs (two of the six: both seeds, a preset with every fairness term off
    # and one with all on; cvar differs from full only by its coefficients, the same stacked code path)
    for preset, seed in (("none", 1), ("full", 0)):
        single = train_head("stage2", bed / "c", tmp_path / "seq" / preset / str(seed), preset=preset,
                            sets=[*S2TINY, f"training.seed={seed}"], options={"stage1": bed / "s1"}, progress=False)
        got = json.loads((tmp_path / "abl" / preset / f"seed{seed}" / "summary.json").read_text())
        assert got["best_epoch"] == single.best_epoch
        for split in ("val", "test"):
            want = _numbers(getattr(single, split))
            assert want and _numbers(got[split]).keys() == want.keys()
            for k, v in want.items():
                assert got[split][k] == pytest.approx(v, abs=1e-4, nan_ok=True), (preset, seed, split, k)
    # each run's resume point holds its own slice of the stacked tensors, not all six runs' storage
    # (torch.save writes a view's whole storage: the demo's six 1280-d runs wrote 722 MB each)
    saved = torch.load(tmp_path / "abl" / "none" / "seed0" / "resume.pt", weights_only=True)
    tensors = [*saved["weights"].values(),
               *(v for s in saved["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v))]
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)
    assert all(t.shape[0] == 1 for t in saved["weights"].values())
    # the presets really differ (the comparison above is not trivially true)
    t = res.table.set_index(["preset", "seed"])
    assert t.loc[("full", 0), "test_auc"] != t.loc[("none", 0), "test_auc"]
    md = res.markdown
    assert "| preset | n | auc |" in md and "paired difference to `none`" in md and "| full | 2 |" in md
    assert {"ablation.csv", "ablation.json", "ablation.md"} <= set(res.files)
    assert any(f.endswith(".png") for f in res.files)
    # the differences hold the seeds and the test set (each run's eval/test/predictions.csv, resampled);
    # two seeds: intervals, and no verdict
    d = res.diffs.set_index(["preset", "metric"])
    assert d.loc[("full", "test_auc"), "basis"] == "seeds + test set" and d.loc[("full", "test_auc"), "v_test"] > 0
    assert not res.diffs["differs"].any() and "too few seeds for a verdict" in md
    # presets are compared on each gap minus its no-disparity floor, recorded by each run's evaluation
    m = json.loads((tmp_path / "abl" / "full" / "seed0" / "eval" / "test" / "metrics.json").read_text())
    assert t.loc[("full", 0), "test_f_fpr_excess"] == pytest.approx(
        m["f_fpr"] - m["fairness_null"]["f_fpr"]["floor"], abs=1e-3)
    assert ("full", "test_f_fpr_excess") in d.index and ("full", "test_f_fpr") not in d.index
    # rerun: every run reused, nothing rewritten
    mtime = (tmp_path / "abl" / "full" / "seed1" / "summary.json").stat().st_mtime_ns
    lines.clear()
    again = ablate("stage2", bed / "c", tmp_path / "abl", echo=lines.append, **kw)
    assert len(again.reused) == 6 and not again.trained
    assert (tmp_path / "abl" / "full" / "seed1" / "summary.json").stat().st_mtime_ns == mtime
    # a half-written run (no summary.json) is redone from scratch, never reused
    (tmp_path / "abl" / "cvar" / "seed0" / "summary.json").unlink()
    (tmp_path / "abl" / "cvar" / "seed0" / "stale.txt").write_text("x")
    lines.clear()
    third = ablate("stage2", bed / "c", tmp_path / "abl", echo=lines.append, **kw)
    assert third.trained == ["cvar seed 0"] and len(third.reused) == 5
    assert any("half-written" in ln and "cvar seed 0" in ln for ln in lines)
    assert not (tmp_path / "abl" / "cvar" / "seed0" / "stale.txt").exists()
    redone = json.loads((tmp_path / "abl" / "cvar" / "seed0" / "summary.json").read_text())
    assert redone["test"]["auc"] == pytest.approx(t.loc[("cvar", 0), "test_auc"], abs=1e-4)
    # --collect with an eval cache: here the training cache itself, so its test AUC is the in-domain one
    col = ablate("stage2", bed / "c", tmp_path / "abl", echo=lines.append, collect=True,
                 evals={"again": bed / "c"}, **kw)
    assert not col.trained and not col.missing and "again_auc" in col.markdown
    np.testing.assert_allclose(col.table["again_auc"], col.table["test_auc"], rtol=1e-6)
    again_d = col.diffs.set_index(["preset", "metric"]).loc[("full", "again_auc")]  # eval/again_test/predictions.csv
    assert again_d["basis"] == "seeds + test set" and again_d["v_test"] > 0


def test_runs_of_another_architecture_are_grouped_apart_and_say_why(bed, tmp_path):
    runs, _ = plan("stage2", bed / "c", tmp_path, presets=["full", "linear", "none"], seeds=[0, 1, 2], sets=S2TINY,
                   options={"stage1": bed / "s1"})
    groups, lines = group_runs("stage2", runs)
    assert [[(r.preset, r.seed) for r in g] for g in groups] == [
        [("full", 0), ("full", 1), ("full", 2), ("none", 0), ("none", 1), ("none", 2)],
        [("linear", 0), ("linear", 1), ("linear", 2)]]
    assert "apart" in lines[1] and "model.architecture: 'fair' -> 'linear'" in lines[1]


def test_validation_refuses_before_any_training(bed, tmp_path):
    base = dict(sets=S2TINY, options={"stage1": bed / "s1"}, progress=False, echo=lambda *_: None)
    out = tmp_path / "never"
    cases = [
        (dict(seeds=[0, 0]), "given twice"),
        (dict(seeds=[]), "no seeds"),
        (dict(presets=["full", "fullest"]), "unknown preset"),
        (dict(evals={"gone": tmp_path / "missing"}), "does not exist"),
        (dict(evals={"other": bed / "other"}), "another backbone"),
        (dict(baseline="ldam", presets=["none", "full"]), "--baseline ldam"),
        (dict(sets=TINY + ["training.epochs=3"], presets=["full"]), "warm-up"),
    ]
    for extra, message in cases:
        with pytest.raises(FeatcacheError, match=message):
            ablate("stage2", bed / "c", out, **{**base, **extra})
    with pytest.raises(FeatcacheError, match="needs a finished stage1 run"):
        ablate("stage2", bed / "c", out, **{**base, "options": {}})
    assert not out.exists()  # nothing trained, nothing written


def test_cli_bad_shard_and_repeated_seeds_are_one_error_line(bed, tmp_path, capsys):
    from featcache.cli import main

    for shard in ("3/2", "0/0", "a/b", "1"):
        with pytest.raises(SystemExit) as exc:
            main(["ablate", "stage1", "--cache", str(bed / "c"), "--out", str(tmp_path / "x"), "--shard", shard])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: --shard") and err.count("\n") == 1, (shard, err)
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "stage1", "--cache", str(bed / "c"), "--out", str(tmp_path / "x"), "--seeds", "0,0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "seed(s) 0 given twice" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_shards_partition_the_run_list_and_devices_balance_the_groups():
    assert parse_shard("2/4") == (2, 4) and parse_shard((0, 1)) == (0, 1)
    runs = list(range(17))
    for n in (1, 2, 3, 5, 17, 20):
        parts = [shard_runs(runs, (i, n)) for i in range(n)]
        assert sorted(x for p in parts for x in p) == runs  # each run in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [shard_runs(runs, (i, n)) for i in range(n)]  # deterministic
    g15, g3, g5 = ["a"] * 15, ["b"] * 3, ["c"] * 5
    assert assign([g15, g3], ["cuda:0", "cuda:1"]) == [("cuda:0", [g15]), ("cuda:1", [g3])]
    assert assign([g3, g5, g5], ["cuda:0", "cuda:1"]) == [("cuda:0", [g3, g5]), ("cuda:1", [g5])]  # 8 vs 5 runs
    assert assign([g3, g5], ["cpu"]) == [("cpu", [g3, g5])]
    assert assign([g3], ["cuda:0", "cuda:1"]) == [("cuda:0", [g3])]  # an idle device gets no process


def test_out_of_gpu_memory_splits_the_group_in_two_and_retries(monkeypatch, tmp_path):
    jobs = []

    def fake_train_runs(task, cache, outs, *, cfgs, **kw):
        if len(outs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        jobs.append([o.name for o in outs])
        return [type("R", (), {"test": {"auc": 0.5}, "seconds": 0.0, "best_epoch": 1})() for _ in outs]

    monkeypatch.setattr(AB, "train_runs", fake_train_runs)
    cfg = {"training": {"device": "auto", "seed": 0}}
    runs = [PlannedRun("p", s, tmp_path / f"r{s}", cfg) for s in range(5)]
    lines = []
    train_group("stage2", tmp_path, runs, "cuda:0", progress=False, echo=lines.append)
    assert jobs == [["r0", "r1"], ["r2"], ["r3", "r4"]]  # 5 -> 2 + 3, 3 -> 1 + 2; every run trained once
    splits = [ln for ln in lines if "out of GPU memory" in ln]
    assert splits == ["out of GPU memory training 5 runs at once on cuda:0: split into 2 + 3 and retried",
                      "out of GPU memory training 3 runs at once on cuda:0: split into 1 + 2 and retried"]

    def always_oom(task, cache, outs, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(AB, "train_runs", always_oom)
    with pytest.raises(FeatcacheError, match="even as a single run; lower training.batch_size"):
        train_group("stage2", tmp_path, runs[:2], "cuda:0", progress=False, echo=lines.append)


def test_stage1_ablation_tables_its_own_metrics_with_shards_and_collect(bed, tmp_path):
    kw = dict(presets="all", seeds=[0, 1], sets=[*TINY, "training.epochs=1"], progress=False, echo=lambda *_: None)
    out = tmp_path / "s1abl"
    first = ablate("stage1", bed / "c", out, shard=(0, 2), **kw)  # default x 2 seeds
    assert first.trained == ["default seed 0", "default seed 1"] and first.table.empty
    assert not (out / "ablation.md").exists()  # a shard writes no tables
    partial = ablate("stage1", bed / "c", out, collect=True, **kw)
    assert partial.missing == ["grl_only seed 0", "grl_only seed 1"] and not partial.trained
    assert "missing runs" in partial.markdown and "grl_only seed 1" in partial.markdown
    full = ablate("stage1", bed / "c", out, **kw)
    assert full.trained == ["grl_only seed 0", "grl_only seed 1"] and len(full.reused) == 2 and not full.missing
    md = full.markdown
    assert "| preset | n | cos | race_acc | gender_acc |" in md
    assert "race_raw" in md and "race_debiased" in md and "paired difference to `default`" in md
    assert "auc" not in md and "nan" not in md.lower()
    t = full.table.set_index(["preset", "seed"])
    s = json.loads((out / "grl_only" / "seed1" / "summary.json").read_text())
    assert t.loc[("grl_only", 1), "test_cos"] == pytest.approx(s["test"]["cos"])
    assert t.loc[("grl_only", 1), "probe_race_debiased"] == pytest.approx(s["probe"]["race"]["debiased"])
    mean = np.mean([t.loc[("default", k), "test_cos"] for k in (0, 1)])
    assert f"{mean:.3f} ±" in md


# -- one writer at a time (issue 24 item 4) --------------------------------------------------
HOLD = ("import sys, time; from featcache.cache import CacheLock; CacheLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)")


@contextmanager
def lock_held_by_another_process(folder):
    """A child process holds ``folder``'s writer lock until the block ends (then it is killed:
    the kernel releases its flock)."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def file_hashes(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_second_ablate_or_train_head_is_refused_while_the_first_holds_the_folder(bed, tmp_path):
    from featcache.errors import RunLockedError
    from tests.conftest import run_cli

    kw = dict(presets=["default"], seeds=[0], sets=[*TINY, "training.epochs=1"], progress=False, echo=lambda *_: None)
    out = tmp_path / "abl"
    lone = ablate("stage1", bed / "c", out, **kw)
    before = file_hashes(out)
    with lock_held_by_another_process(out) as pid:
        with pytest.raises(RunLockedError, match=f"being written by another process .*\"pid\": {pid}"):
            ablate("stage1", bed / "c", out, overwrite=True, **kw)
        with pytest.raises(RunLockedError, match="being written by another process"):
            ablate("stage1", bed / "c", out, collect=True, **kw)
        proc = run_cli("ablate", "stage1", "--cache", bed / "c", "--out", out, "--presets", "default", "--seeds", "0",
                       "--overwrite", "--set", "training.epochs=1", *[a for s in TINY for a in ("--set", s)], check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        assert f'"pid": {pid}' in proc.stderr and "command" in proc.stderr
    assert file_hashes(out) == before  # the holder's results untouched: nothing deleted, nothing retrained
    again = ablate("stage1", bed / "c", out, **kw)  # the killed holder's lock was released by the kernel
    assert again.reused == ["default seed 0"] and not again.trained
    assert again.table.equals(lone.table)

    # train-head into a run folder another writer holds: refused, the run unchanged
    run = out / "default" / "seed0"
    with lock_held_by_another_process(run):
        with pytest.raises(RunLockedError, match="being written by another process"):
            train_head("stage1", bed / "c", run, sets=[*TINY, "training.epochs=1"], overwrite=True, progress=False)
        proc = run_cli("train-head", "stage1", "--cache", bed / "c", "--out", run, "--overwrite",
                       "--set", "training.epochs=1", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "another process" in proc.stderr
        # a shard (no ablation-wide lock) meets the run's own lock
        with pytest.raises(RunLockedError, match="being written by another process"):
            ablate("stage1", bed / "c", out, overwrite=True, shard=(0, 1), **kw)
    assert file_hashes(out) == before
    # a writer that fails before writing leaves no empty folder behind
    with pytest.raises(FeatcacheError):
        train_head("stage2", bed / "c", tmp_path / "new", sets=TINY, options={"stage1": tmp_path / "gone"},
                   progress=False)
    assert not (tmp_path / "new").exists()


# -- disk (issue 24 item 7) ------------------------------------------------------------------
def _safetensors_data_bytes(path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte header length and the header."""
    raw = Path(path).read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def test_finished_runs_prune_their_resume_point_and_the_printed_estimate_is_their_weights(bed, tmp_path):
    kw = dict(presets=["default"], seeds=[0, 1], sets=[*TINY, "training.epochs=1"], progress=False)
    lines = []
    ablate("stage1", bed / "c", tmp_path / "pruned", echo=lines.append, **kw)
    estimate = [ln for ln in lines if ln.startswith("disk estimate:")]
    assert len(estimate) == 1 and lines.index(estimate[0]) < len(lines) - 1  # printed before the runs' lines
    for seed in (0, 1):
        run = tmp_path / "pruned" / "default" / f"seed{seed}"
        assert not (run / "resume.pt").exists() and (run / "summary.json").is_file()
        notes = json.loads((run / "summary.json").read_text())["notes"]
        assert any("resume point pruned" in n and "--keep-resume" in n for n in notes)
    # the estimate is exact for the weight files: 2 runs x (best + last)
    from featcache.train.trainer import _resolve, estimate_run_bytes
    cfg = _resolve("stage1", bed / "c", None, None, [*TINY, "training.epochs=1"], {})
    size = estimate_run_bytes("stage1", bed / "c", cfg)
    run = tmp_path / "pruned" / "default" / "seed0"
    assert _safetensors_data_bytes(run / "best.safetensors") == size["weights"]
    assert _safetensors_data_bytes(run / "last.safetensors") == size["weights"]
    assert f"2 x {size['weights'] * 2 / 2**20:.1f} MB of weights" in estimate[0]
    # --keep-resume keeps it; its tensors are the weights and AdamW's two moments, as estimated
    lines = []
    ablate("stage1", bed / "c", tmp_path / "kept", echo=lines.append, keep_resume=True, **{**kw, "seeds": [0]})
    assert "resume points kept" in [ln for ln in lines if ln.startswith("disk estimate:")][0]
    saved = torch.load(tmp_path / "kept" / "default" / "seed0" / "resume.pt", weights_only=True)
    tensors = [*saved["weights"].values(),
               *(v for st in saved["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v) and v.dim())]
    assert sum(t.numel() * t.element_size() for t in tensors) == size["resume"]


# -- relocatable results (issue 24 item 5) ---------------------------------------------------
def test_a_moved_ablation_collects_and_extends_without_retraining(bed, tmp_path):
    import shutil

    from featcache.config import load_config
    from featcache.heads.task import recorded_cache

    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(bed / "c", old / "cache")
    shutil.copytree(bed / "s1", old / "s1")
    synth_feature_cache(old / "far", rows=64, dim=16, seed=0, bias=0.9, part_rows=64)  # same backbone, another set
    kw = dict(presets=["none"], sets=S2TINY, progress=False, echo=lambda *_: None)
    first = ablate("stage2", old / "cache", old / "abl", seeds=[0], options={"stage1": old / "s1"},
                   evals={"far": old / "far"}, **kw)
    new = tmp_path / "elsewhere"
    shutil.move(old, new)  # the ablation with its cache, Stage-1 run and eval cache: the old paths are gone
    args = dict(options={"stage1": new / "s1"}, evals={"far": new / "far"}, **kw)
    col = ablate("stage2", new / "cache", new / "abl", seeds=[0], collect=True, **args)
    assert not col.trained and not col.missing
    cols = ["test_auc", "test_eer", "far_auc", "far_eer"]
    np.testing.assert_allclose(col.table[cols].to_numpy(float), first.table[cols].to_numpy(float), rtol=1e-6)
    ext = ablate("stage2", new / "cache", new / "abl", seeds=[0, 1], **args)  # extended by a seed
    assert ext.trained == ["none seed 1"] and ext.reused == ["none seed 0"]
    run = new / "abl" / "none" / "seed0"
    assert recorded_cache(run, load_config(run / "config.yaml")) == (new / "cache").resolve()  # by its relative path
    # another dataset where the cache was is not the same ablation: refused by fingerprint
    with pytest.raises(FeatcacheError, match="another config.*cache.fingerprint"):
        ablate("stage2", new / "far", new / "abl", seeds=[0], collect=True, options={"stage1": new / "s1"}, **kw)
