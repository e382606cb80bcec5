"""Configs, the trainer and run directory, Stage 1 and Stage 2, evaluate, end to end (ablate: tests/test_ablate.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import S2FAST, run_cli
from PIL import Image
from safetensors.torch import load_file

from featcache.cache import open_cache
from featcache.config import Config, ConfigError, resolve_config, selection_score
from featcache.e2e.evaluate import evaluate_run
from featcache.errors import FeatcacheError
from featcache.heads.task import StepState, load_run
from featcache.train import train_head


@pytest.fixture(scope="session")
def faces(face_caches):
    """conftest's session faces with their `tiny` CLIP caches ``det`` and ``s1`` (stage1_run and
    stage2_run, also conftest's, are trained on them)."""
    return face_caches


# -- configs ---------------------------------------------------------------------------------
def test_config_precedence_yaml_preset_file_set(tmp_path):
    base = resolve_config("stage2")
    assert base["preset"] == "full" and base["loss"]["use_cvar"] and base["training"]["epochs"] == 50
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("training: {epochs: 7, lr: 0.01}\nloss: {use_ldam: true}\n")
    cfg = resolve_config("stage2", "minimal", cfg_file, ["training.epochs=9"])
    assert cfg["loss"]["use_cvar"] is False          # from the preset
    assert cfg["loss"]["use_ldam"] is True           # the file overrides the preset
    assert cfg["training"]["lr"] == 0.01             # the file
    assert cfg["training"]["epochs"] == 9            # --set overrides the file


def test_config_errors_name_the_nearest_key():
    with pytest.raises(ConfigError, match="did you mean loss.lambda_ldam"):
        resolve_config("stage2", sets=["loss.lambda_ldm=0.3"])
    with pytest.raises(ConfigError, match="must be true or false"):
        resolve_config("stage2", sets=["loss.use_cvar=maybe"])
    with pytest.raises(ConfigError, match="presets: full, cvar, ldam, minimal, none"):
        resolve_config("stage2", "fullest")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        resolve_config("stage2", sets=["epochs"])


def test_selection_formula():
    assert selection_score("auc - 0.001 * f_fpr - 0.001 * f_meo", {"auc": 0.9, "f_fpr": 50, "f_meo": 20}) == \
        pytest.approx(0.83)
    assert np.isnan(selection_score("auc", {"auc": float("nan")}))
    with pytest.raises(ConfigError, match="only metric names"):
        selection_score("__import__('os')", {})
    with pytest.raises(ConfigError, match="names 'acu'"):
        selection_score("acu", {"auc": 1.0})


# -- Stage 1 -----------------------------------------------------------------------------------
def test_stage1_run_directory_and_probes(stage1_run):
    files = {p.name for p in stage1_run.iterdir()}
    assert {"config.yaml", "log.jsonl", "training_log.csv", "best.safetensors", "last.safetensors", "model.json",
            "summary.json", "eval", "plots"} <= files
    assert "resume.pt" not in files  # pruned when the run finished (--keep-resume keeps it)
    for split in ("val", "test"):
        assert {"predictions.csv", "metrics.json", "report.md"} <= {p.name for p in (stage1_run / "eval" / split).iterdir()}
    log = [json.loads(line) for line in (stage1_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for key in ("train_race_ce", "train_gender_ce", "train_similarity", "train_sinkhorn_global",
                "train_sinkhorn_pairwise", "val_race_acc", "val_gender_acc", "val_cos", "grl_lambda"):
        assert key in log[0], key
    # the GRL schedule, logged per epoch, follows the DANN formula with p = (epoch - 1) / epochs
    assert [r["grl_lambda"] for r in log] == pytest.approx([2 / (1 + np.exp(-10 * e / 3)) - 1 for e in (0, 1, 2)])
    summary = json.loads((stage1_run / "summary.json").read_text())
    # model selection: the best epoch maximises the validation score, recomputed from the log (the design's
    # weights on a fresh probe's balanced accuracy, issue 26.9)
    scores = [r["val_cos"] - 0.3 * r["val_probe_race_bacc"] - 0.2 * r["val_probe_gender_bacc"] for r in log]
    assert summary["best_epoch"] == 1 + int(np.argmax(scores))
    probe = summary["probe"]
    assert set(probe) == {"race", "gender"} and probe["race"]["chance"] == 0.25
    assert 0 <= probe["race"]["raw"] <= 1 and 0 <= probe["race"]["debiased"] <= 1
    png = stage1_run / "plots" / "training_curves.png"
    assert Image.open(png).format == "PNG"


def test_stage1_probe_matches_an_independent_fit(stage1_run, faces):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cache = open_cache(faces / "s1")
    tr, va = cache.load("train"), cache.load("val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    clf.fit(tr.features, tr.meta["race"])
    raw = clf.score(va.features, va.meta["race"])
    summary = json.loads((stage1_run / "summary.json").read_text())
    assert summary["probe"]["race"]["raw"] == pytest.approx(raw)


# -- Stage 2 -----------------------------------------------------------------------------------
def test_stage2_frozen_stage1_adapter_gets_no_gradient(faces, stage1_run, tmp_path):
    run = train_head("stage2", faces / "det", tmp_path / "s2", preset="full", sets=S2FAST, progress=False, options={"stage1": stage1_run})
    s1 = load_file(str(stage1_run / "best.safetensors"))
    s2 = load_file(str(run.run_dir / "best.safetensors"))
    for k, v in s1.items():
        if k.startswith("adapter."):
            assert torch.equal(s2["fair." + k[len("adapter."):]], v), k  # unchanged by training
    task = load_run(run.run_dir, "cpu")
    task.load(open_cache(faces / "det"), splits=("train",))  # the data lands on the module's device
    batch = {k: v[None, :64] for k, v in task.data["train"].tensors.items()}
    task.module.train()
    loss, terms = task.batch_loss(batch, StepState(3, 3))
    loss.backward()
    assert all(p.grad is None for p in task.module.fair.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.module.detect.parameters())
    assert {"ce", "cvar", "ldam", "sinkhorn", "disentangle"} <= set(terms)

    # CE's weight is 1 - w with CVaR on (w = 1 here), 1 without (the default rule, cvar: nothing else trains the
    # real/fake logits); loss.ce_weight_rule=design is the design's 1 - w whenever any fairness term is on
    with torch.no_grad():
        task.module.eval()  # no dropout: every preset sees the same outputs
        design = ["loss.ce_weight_rule=design"]
        for preset, sets, ce_weight in (("full", [], 0.0), ("minimal", [], 1.0), ("ldam", [], 1.0), ("none", [], 1.0),
                                        ("ldam", design, 0.0), ("minimal", design, 0.0), ("none", design, 1.0),
                                        ("full", design, 0.0)):
            task.cfgs = [resolve_config("stage2", preset, sets=S2FAST + sets)]
            task.cfg, task._coefficients = task.cfgs[0], None
            task.confs = [Config.of(task.cfg)]  # the typed settings are built once, in Task.__init__
            task.conf = task.confs[0]
            loss, t = task.batch_loss(batch, StepState(3, 3))
            lc = task.cfg["loss"]
            expected = ce_weight * t["ce"] + lc["lambda_contrastive"] * t["disentangle"] if "disentangle" in t else \
                ce_weight * t["ce"]
            for key, coef in (("cvar", float(lc["use_cvar"])), ("ldam", lc["use_ldam"] * lc["lambda_ldam"]),
                              ("sinkhorn", lc["use_sinkhorn"] * lc["lambda_sinkhorn"])):
                if key in t:
                    expected = expected + coef * t[key]
            assert float(loss.detach()[0]) == pytest.approx(float(expected[0]), rel=1e-5), (preset, sets)

    log = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    # warm-up 1 -> 2 in the design's epochs from 0: epochs 1, 2, 3 (from 1) weigh 0, 0, 1
    assert [r["fairness_weight"] for r in log] == [0.0, 0.0, 1.0]
    for key in ("val_auc", "val_acc", "val_eer", "val_f_fpr", "val_f_meo", "val_f_dp", "val_f_oae", "val_f_eo",
                "val_gate_mean", "val_gate_std", "val_gate_min", "val_gate_max", "val_attention_view0",
                "val_attention_view3", "train_cvar", "train_ldam", "train_sinkhorn"):
        assert key in log[-1], key


def test_stage2_predictions_and_metrics_agree(stage2_run):
    from featcache.metrics import all_metrics

    run_dir = stage2_run  # preset none, S2FAST
    preds = pd.read_csv(run_dir / "eval" / "test" / "predictions.csv")
    assert list(preds.columns[:4]) == ["sample_id", "label", "score", "prob"]
    np.testing.assert_allclose(preds["prob"], 1 / (1 + np.exp(-preds["score"])), rtol=1e-6)
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    recomputed = all_metrics(preds["label"].to_numpy(), preds["score"].to_numpy(), groups=preds["subgroup"].to_numpy())
    for k in ("auc", "acc", "f_fpr", "f_meo", "ece"):
        assert metrics[k] == pytest.approx(recomputed[k], nan_ok=True), k
    # evaluate() rebuilds the run from its directory and reproduces the test predictions
    again = evaluate_run(run_dir, name="again")
    assert again.metrics["auc"] == pytest.approx(metrics["auc"])
    ev = run_dir / "eval" / "again_test"
    np.testing.assert_allclose(pd.read_csv(ev / "predictions.csv")["score"], preds["score"], rtol=1e-5, atol=1e-6)
    assert Image.open(ev / "plots" / "roc.png").format == "PNG"
    assert Image.open(ev / "plots" / "subgroup_rates.png").format == "PNG"
    table = pd.read_csv(ev / "subgroups.csv")
    assert set(table.columns) >= {"subgroup", "n", "auc", "fpr", "tpr", "acc"}
    assert table["n"].sum() == int((preds["subgroup"] >= 0).sum())


def test_adain_only_ablation_switch(faces, stage1_run, tmp_path):
    run = train_head("stage2", faces / "det", tmp_path / "s2", preset="minimal",
                     sets=S2FAST + ["model.num_ca_views=0"], progress=False, options={"stage1": stage1_run})
    state = load_file(str(run.run_dir / "best.safetensors"))
    assert not any(k.startswith(("cross_attention.", "fusion.")) for k in state)
    assert "val_gate_mean" not in json.loads((run.run_dir / "log.jsonl").read_text().splitlines()[0])


def test_stage2_needs_stage1_and_a_matching_backbone(faces, stage1_run, tmp_path):
    with pytest.raises(FeatcacheError, match="--stage1"):
        train_head("stage2", faces / "det", tmp_path / "a", sets=S2FAST, progress=False)
    from featcache.extract import extract

    # the backbone checks come before any training: 8 rows of each split are enough
    df = pd.read_csv(faces / "data" / "manifest.csv", dtype=str, keep_default_na=False)
    df["path"] = [str(faces / "data" / p) for p in df["path"]]
    df.groupby("split", group_keys=False).head(8).to_csv(tmp_path / "few.csv", index=False)
    extract("clip", tmp_path / "few.csv", tmp_path / "other", model="tiny", seed=1, part_rows=128,
            num_workers=0, progress=False)
    with pytest.raises(FeatcacheError, match="another backbone"):
        train_head("stage2", tmp_path / "other", tmp_path / "b", sets=S2FAST, progress=False,
                   options={"stage1": stage1_run})
    with pytest.raises(FeatcacheError, match="another backbone"):
        evaluate_run(stage1_run, tmp_path / "other", name="other")


def test_run_directory_is_not_overwritten_silently(faces, stage1_run):
    proc = run_cli("train-head", "stage1", "--cache", faces / "s1", "--out", stage1_run, "--set",
                   "training.epochs=1", check=False)
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr


def test_synthetic_feature_cache_bias_hurts_the_hard_subgroups(tmp_path):
    """The controlled test bed: the fake shift shrinks for hard subgroups as bias grows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from featcache.cache import verify_cache
    from featcache.cache.synth import synth_feature_cache
    from featcache.data.synth_faces import HARDNESS

    gaps = {}
    for bias in (0.0, 1.0):
        info = synth_feature_cache(tmp_path / f"b{bias}", rows=4000, dim=64, bias=bias)
        assert info["strength"] == pytest.approx([2.0 * (1 - bias * h) for h in HARDNESS])
        assert verify_cache(tmp_path / f"b{bias}").ok
        cache = open_cache(tmp_path / f"b{bias}")
        tr, te = cache.load("train"), cache.load("test")
        assert not set(tr.meta["identity"]) & set(te.meta["identity"])
        p = LogisticRegression(max_iter=2000).fit(tr.features, tr.meta["label"]).predict_proba(te.features)[:, 1]
        y, g = te.meta["label"].to_numpy(), te.meta["subgroup"].to_numpy()
        easy, hard = (g == 1) | (g == 5), (g == 2) | (g == 6)  # white vs black, hardness 0-0.1 vs 0.9-1
        gaps[bias] = roc_auc_score(y[easy], p[easy]) - roc_auc_score(y[hard], p[hard])
    assert gaps[1.0] > 0.2 and abs(gaps[0.0]) < 0.1


def test_selection_only_from_min_epoch(faces, tmp_path):
    run = train_head("stage1", faces / "s1", tmp_path / "s1", sets=["training.epochs=4", "selection.min_epoch=3"],
                     progress=False)
    log = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    eligible = [r for r in log if r["epoch"] >= 3]
    assert run.best_epoch == max(eligible, key=lambda r: r["score"])["epoch"]
    # Stage 2 selects once the fairness weight is 1 (epoch 11 counted from 1); a shorter run is refused
    # (test_stage2_config_checks)
    assert resolve_config("stage2")["selection"]["min_epoch"] == resolve_config("stage2")["fairness"]["warmup_end"] + 1


# -- schedules, design defaults and config checks (issues 18, 19) -----------------------------------
def test_grl_lambda_is_zero_at_the_first_epoch():
    """Issue 18.4: the design's p = epoch / total counts epochs from 0, so lambda = 0 at the start."""
    from featcache.heads.stage1 import Stage1Task

    task = Stage1Task(resolve_config("stage1"), "cpu")
    assert StepState(1, 20).progress == 0.0
    assert task.grl_lambda(StepState(1, 20)) == 0.0
    assert task.grl_lambda(StepState(2, 20)) == pytest.approx(2 / (1 + np.exp(-10 * 1 / 20)) - 1)  # 0.245
    assert task.grl_lambda(StepState(20, 20)) == pytest.approx(2 / (1 + np.exp(-10 * 19 / 20)) - 1)


def test_stage2_warmup_and_faap_schedules_keep_the_design_values():
    from featcache.heads.faap import FaapTask
    from featcache.heads.stage2 import Stage2Task

    s2 = Stage2Task(resolve_config("stage2"), "cpu")
    # issue 26.3: the design's 0 up to epoch 5, 1 at epoch 10 counts epochs from 0; featcache counts from 1:
    # 0 through epoch 6, then (e - 1 - 5) / 5, 1.0 from epoch 11
    weights = [s2.fairness_weight(StepState(e, 50)) for e in range(1, 14)]
    assert weights == pytest.approx([0, 0, 0, 0, 0, 0, .2, .4, .6, .8, 1, 1, 1])
    assert s2.fairness_weight(StepState(50, 50)) == 1.0
    faap = FaapTask(resolve_config("faap"), "cpu")  # design: eps 0.05 -> 0.10 over 8 epochs, hold 6, -> 0.09 over 16
    sched = {e: faap.schedule(StepState(e, 30)) for e in (1, 4, 8, 14, 15, 22, 30)}
    assert [sched[e]["epsilon"] for e in (1, 4, 8, 14, 15, 22, 30)] == pytest.approx(
        [0.05, 0.05 + 0.05 * 3 / 7, 0.10, 0.10, 0.10 - 0.01 / 16, 0.10 - 0.01 * 8 / 16, 0.09])
    assert [sched[e]["beta"] for e in (1, 15, 30)] == pytest.approx([0.5, 0.5 + 0.1 * 14 / 29, 0.6])  # beta 0.5 -> 0.6


def test_faap_config_has_the_design_values():
    cfg = resolve_config("faap")
    assert cfg["training"]["batch_size"] == 7  # issue 18.3
    assert cfg["training"]["save_every"] == 1 and cfg["selection"]["rule"] == "last"  # issue 18.7
    for task in ("stage1", "stage2", "xai"):
        c = resolve_config(task)
        assert c["training"]["save_every"] == 0 and c["selection"]["rule"] == "best"


def test_stage2_config_checks():
    """Issue 19.1: a fairness run shorter than the warm-up, or selecting after its last epoch, is refused."""
    from featcache.heads.stage2 import Stage2Task

    with pytest.raises(FeatcacheError, match=r"training.epochs=3 ends before the fairness warm-up.*warmup_end=10"):
        Stage2Task(resolve_config("stage2", "full", sets=["training.epochs=3"]), "cpu")
    # the weight reaches 1 at epoch warmup_end + 1: 10 epochs are one too few
    with pytest.raises(FeatcacheError, match=r"reaches 1 at epoch 11.*train at least 11 epochs"):
        Stage2Task(resolve_config("stage2", "full", sets=["training.epochs=10", "selection.min_epoch=10"]), "cpu")
    Stage2Task(resolve_config("stage2", "full", sets=["training.epochs=11"]), "cpu")
    with pytest.raises(FeatcacheError, match=r"selection.min_epoch=11 is after the last epoch.*min_epoch=3"):
        Stage2Task(resolve_config("stage2", "none", sets=["training.epochs=3"]), "cpu")
    Stage2Task(resolve_config("stage2", "none", sets=["training.epochs=3", "selection.min_epoch=3"]), "cpu")
    Stage2Task(resolve_config("stage2", "full", sets=S2FAST), "cpu")
    with pytest.raises(FeatcacheError, match=r"loss.ldam_margin_rule must be one of literal, normalized; got 'paper'"):
        resolve_config("stage2", sets=["loss.ldam_margin_rule=paper"])  # a declared constraint of stage2.yaml
    assert resolve_config("stage2")["loss"]["ldam_margin_rule"] == "literal"
    with pytest.raises(FeatcacheError, match="ce_weight_rule must be one of design, cvar; got 'always'"):
        resolve_config("stage2", sets=["loss.ce_weight_rule=always"])


def _split_without_demographics(n=12, dim=8):
    from featcache.heads.task import SplitData

    meta = pd.DataFrame({"sample_id": [str(i) for i in range(n)], "label": np.arange(n) % 2, "split": "train",
                         "gender": "", "race": "", "subgroup": -1, "identity": "", "dataset": "d", "method": "m"})
    t = {"x": torch.randn(n, dim), "label": torch.tensor(meta["label"].to_numpy()),
         "subgroup": torch.full((n,), -1), "race": torch.full((n,), -1), "gender": torch.full((n,), -1)}
    return SplitData(t, meta)


def test_heads_refuse_a_cache_without_demographics():
    """Issue 19.4: fairness heads name the missing columns; a baseline runs with a warning."""
    from featcache.heads.stage1 import Stage1Task
    from featcache.heads.stage2 import Stage2Task

    for task in (Stage1Task(resolve_config("stage1"), "cpu"), Stage2Task(resolve_config("stage2", "full"), "cpu")):
        task.data = {"train": _split_without_demographics()}
        with pytest.raises(FeatcacheError, match=r"has no gender, race \(every subgroup is -1\)"):
            task.make_spec()
    base = Stage2Task(resolve_config("stage2", "linear"), "cpu")
    base.data = {"train": _split_without_demographics()}
    assert base.make_spec()["architecture"] == "linear"
    assert base.notes == ["warning: the cache has no gender, race; the fairness metrics will be NaN"]


def test_stage2_on_a_cache_where_every_row_failed(tmp_path):
    """Issue 19.11: one clear error, not a ValueError in feature_scale."""
    from featcache.heads.stage2 import Stage2Task

    task = Stage2Task(resolve_config("stage2", "full"), "cpu")
    empty = _split_without_demographics()
    task.data = {"train": type(empty)({k: v[:0] for k, v in empty.tensors.items()}, empty.meta.iloc[:0])}
    with pytest.raises(FeatcacheError, match="no readable rows in its train split"):
        task.make_spec()


def test_stage1_that_raises_leakage_gets_a_remark():
    from featcache.heads.stage1 import leakage_remarks

    probe = {"race": {"raw": 0.812, "debiased": 0.875, "chance": 0.25},
             "gender": {"raw": 0.9, "debiased": 0.6, "chance": 0.5}}
    remarks = leakage_remarks(probe)
    assert len(remarks) == 1 and remarks[0].startswith("remark: the race probe") and "0.875" in remarks[0]
    assert leakage_remarks({"race": {"raw": 0.5, "debiased": float("nan")}}) == []
    # with the val rows known, a rise within two standard errors of the difference is noise: the demo's
    # 0.625 -> 0.641 on 64 rows is one row; the same rise of 0.063 on 2,000 rows is not
    for n, rise in ((64, 0.641), (64, 0.875), (2000, 0.688)):
        se = math.sqrt(0.625 * 0.375 / n + rise * (1 - rise) / n)
        got = leakage_remarks({"race": {"raw": 0.625, "debiased": rise, "n": n}})
        assert bool(got) == (rise - 0.625 > 2 * se), (n, rise)
        assert not got or f"beyond the noise of {n} val rows (±{2 * se:.3f})" in got[0]
    assert not leakage_remarks({"race": {"raw": 0.625, "debiased": 0.641, "n": 64}})
    assert leakage_remarks({"race": {"raw": 0.625, "debiased": 0.875, "n": 64}})
