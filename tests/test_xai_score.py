"""The XAI utterance score does not collapse when the importance saturates (issue 15)."""

import numpy as np
import pytest
import torch
from test_stacked import speech_frames

from featcache.config import resolve_config
from featcache.heads.task import StepState
from featcache.heads.xai import XaiTask
from featcache.metrics.detection import auc
from featcache.metrics.xai import importance_score


def test_utterance_score_survives_saturated_importance():
    """15 epochs on synthetic partial spoofs drive the importance logits far past float32's sigmoid
    range: the top frames of every utterance get w == 1.0 exactly, so a score read from float32 w is
    one constant (AUC 0.5), as in the demo. The score from the logits keeps ranking the utterances."""
    flat, data = speech_frames(n=16, dim=12, seed=1)
    cfg = resolve_config("xai", sets=["model.hidden=8", "model.kernel=3", "training.lr=0.03", "training.epochs=15"])
    task = XaiTask(cfg, "cpu")
    task.flat = flat
    task.data = {"train": data, "val": data}
    task.spec = task.make_spec()
    task.module = task.build(task.spec)
    opt = torch.optim.AdamW(task.module.parameters(), lr=0.03, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, 16):
        task.module.train()
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), 8):
            idx = order[start:start + 8]
            loss, _ = task.batch_loss({k: v[idx][None] for k, v in data.tensors.items()}, StepState(epoch, 15))
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
    logits = task.importance_logits("val")[0]
    labels = data.tensors["label"].numpy()
    float32_w = [torch.sigmoid(torch.from_numpy(lg).float()).numpy() for lg in logits]
    saturated = np.array([importance_score(w) for w in float32_w])
    assert (saturated == 1.0).sum() >= 2  # the collapse under way: utterances tie at exactly 1.0
    (metrics, preds), = task.evaluate("val")
    assert preds["score"].nunique() == len(preds)  # no ties: the score still ranks every utterance
    assert metrics["auc"] == auc(labels, preds["score"].to_numpy()) > auc(labels, saturated)
    assert np.all((preds["score"] > 0) & (preds["score"] < 1))


def test_design_preset_is_the_design_objective_by_brute_force():
    """Issue 26.5: preset `design` trains the design's sum_t w(t) l_t (no normalisation, no complement
    term) on uncentred unit frames; each preset's objective is what xai.yaml says. Checked against a loop."""
    from featcache.losses.prototype import frame_contrastive

    assert resolve_config("xai")["training"]["batch_size"] == 24  # the design's XAI batch
    flat, data = speech_frames(n=6, dim=5, seed=2)
    idx = torch.arange(6)
    expected_n = {"default": "frames", "bare": "importance", "design": "none"}
    for preset in ("default", "bare", "design"):
        cfg = resolve_config("xai", preset, sets=["model.hidden=4", "model.kernel=3", "model.dropout=0.0"])
        task = XaiTask(cfg, "cpu")
        task.flat, task.data = flat, {"train": data}
        task.spec = task.make_spec()
        task.module = task.build(task.spec)
        task.module.eval()
        assert cfg["loss"]["normalize"] == expected_n[preset]
        assert bool(cfg["model"]["center"]) == (preset != "design")
        with torch.no_grad():
            protos = task.module.unit_prototypes()[0].clone()  # before the step's EMA update
            loss, terms = task.batch_loss({k: v[idx][None] for k, v in data.tensors.items()}, StepState(1, 15))
            x = [flat["frames"][int(flat["offsets"][r]):int(flat["offsets"][r + 1])] for r in range(6)]
            centre = torch.cat(x).mean(0) if preset != "design" else torch.zeros(5)
            total, comp = 0.0, 0.0
            for r in range(6):
                h = torch.nn.functional.normalize(x[r] - centre, dim=-1)
                w = task.module.importance(x[r][None, None], torch.ones(1, 1, len(x[r])))[0, 0]
                nll = -torch.log_softmax(h @ protos.T / 0.07, dim=-1)
                y = int(data.tensors["label"][r])
                n = {"frames": len(x[r]), "importance": float(w.sum()), "none": 1.0}[cfg["loss"]["normalize"]]
                total += float((w * nll[:, y]).sum()) / n / 6
                comp += float(((1 - w) * nll[:, 0]).sum()) / n / 6
        assert float(terms["contrastive"][0]) == pytest.approx(total, rel=1e-4)
        if preset == "default":
            assert float(terms["complement"][0]) == pytest.approx(comp, rel=1e-4)
        else:
            assert "complement" not in terms and cfg["loss"]["lambda_complement"] == 0.0
    with pytest.raises(ValueError, match="none, importance or frames"):
        frame_contrastive(torch.zeros(1, 2, 3), torch.zeros(2, 3), torch.zeros(1, dtype=torch.long),
                          torch.zeros(1, 2), torch.ones(1, 2), normalize="sum")
