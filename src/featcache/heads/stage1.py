"""Stage 1: a debiasing adapter on frozen features (fairness through ignorance).

x' = x + adapter(x).  Race (4-way) and gender (2-way) adversaries read x' through a gradient
reversal layer, so the adapter learns to remove what they use; a similarity term keeps x'
close to x, and Sinkhorn divergences pull the subgroups' distributions together.

An adversary under gradient reversal can look weak while the information is still there, so
after training a fresh logistic-regression probe, fitted on the frozen debiased train features,
reports race and gender accuracy on val, beside the same probe on the raw features
(``summary.json`` → ``probe``): that is the leakage figure to trust.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.manifest import GENDERS, RACES
from ..losses.sinkhorn import GroupSinkhorn, feature_scale
from .blocks import MLPHead, ResidualAdapter, dann_lambda, grad_reverse
from .task import SplitData, StepState, Task, meta_codes, register_task

META = ["sample_id", "label", "split", "gender", "race", "subgroup", "identity"]


class Stage1Model(nn.Module):
    def __init__(self, dim: int, adapter_hidden: int, adversary_hidden: int, dropout: float):
        super().__init__()
        self.adapter = ResidualAdapter(dim, adapter_hidden, dropout=dropout)
        self.race_head = MLPHead(dim, adversary_hidden, len(RACES), dropout=dropout)
        self.gender_head = MLPHead(dim, adversary_hidden, len(GENDERS), dropout=dropout)

    def forward(self, x: torch.Tensor, grl_lambda: float = 1.0):
        z = self.adapter(x)
        zr = grad_reverse(z, grl_lambda)
        return z, self.race_head(zr), self.gender_head(zr)


def masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows with a known target (>= 0); 0 when there is none."""
    known = target >= 0
    per = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


def masked_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    known = target >= 0
    if not bool(known.any()):
        return float("nan")
    return float((logits.argmax(1)[known] == target[known]).float().mean())


@register_task("stage1")
class Stage1Task(Task):
    detects = False
    meta_columns = META
    summary_keys = ("cos", "race_acc", "gender_acc")

    def tensors(self, data) -> SplitData:
        meta = data.meta
        return SplitData({
            "x": torch.from_numpy(np.array(data.features)),
            "race": torch.from_numpy(meta_codes(meta, "race", RACES)),
            "gender": torch.from_numpy(meta_codes(meta, "gender", GENDERS)),
            "subgroup": torch.from_numpy(meta["subgroup"].to_numpy().astype(np.int64)),
        }, meta)

    def make_spec(self) -> dict:
        m, loss = self.cfg["model"], self.cfg["loss"]
        x = self.data["train"].tensors["x"]
        blur = loss["sinkhorn_blur"]
        return {
            "dim": int(x.shape[1]), "adapter_hidden": int(m["adapter_hidden"]),
            "adversary_hidden": int(m["adversary_hidden"]), "dropout": float(m["dropout"]),
            "sinkhorn_blur": float(feature_scale(x)) if blur == "auto" else float(blur),
            "backbone": self.backbone,
        }

    def build(self, spec: dict) -> nn.Module:
        self.sinkhorn = GroupSinkhorn(blur=spec["sinkhorn_blur"], scaling=float(self.cfg["loss"]["sinkhorn_scaling"]))
        return Stage1Model(spec["dim"], spec["adapter_hidden"], spec["adversary_hidden"], spec["dropout"])

    def grl_lambda(self, state: StepState) -> float:
        loss = self.cfg["loss"]
        return dann_lambda(state.progress, float(loss["grl_max_lambda"]), float(loss["grl_gamma"]))

    def epoch_values(self, state: StepState) -> dict:
        return {"grl_lambda": self.grl_lambda(state)}

    def batch_loss(self, batch, state):
        c = self.cfg["loss"]
        batch = {k: v[0] for k, v in batch.items()}  # R = 1
        x = batch["x"]
        z, race_logits, gender_logits = self.module(x, self.grl_lambda(state))
        terms = {
            "race_ce": masked_ce(race_logits, batch["race"]),
            "gender_ce": masked_ce(gender_logits, batch["gender"]),
            "similarity": 1.0 - F.cosine_similarity(x, z, dim=1).mean(),
        }
        loss = (c["lambda_race"] * terms["race_ce"] + c["lambda_gender"] * terms["gender_ce"]
                + c["lambda_similarity"] * terms["similarity"])
        if c["lambda_fairness"] > 0:
            terms["sinkhorn_global"] = self.sinkhorn.global_(z, batch["subgroup"])
            loss = loss + c["lambda_fairness"] * terms["sinkhorn_global"]
        if c["lambda_pairwise"] > 0:
            terms["sinkhorn_pairwise"] = self.sinkhorn.pairwise(z, batch["subgroup"])
            loss = loss + c["lambda_pairwise"] * terms["sinkhorn_pairwise"]
        return loss.reshape(1), {k: v.detach().reshape(1) for k, v in terms.items()}

    @torch.no_grad()
    def transform(self, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """The debiased features x' of a (n, D) tensor."""
        self.module.eval()
        return torch.cat([self.module.adapter(x[i:i + batch].to(self.device)) for i in range(0, len(x), batch)])

    @torch.no_grad()
    def evaluate(self, split: str):
        d = self.data[split]
        x = d.tensors["x"]
        z = self.transform(x)
        race_logits, gender_logits = self.module.race_head(z), self.module.gender_head(z)
        cos = F.cosine_similarity(x, z, dim=1)
        metrics = {
            "cos": float(cos.mean()),
            "race_acc": masked_accuracy(race_logits, d.tensors["race"]),
            "gender_acc": masked_accuracy(gender_logits, d.tensors["gender"]),
            "race_ce": float(masked_ce(race_logits, d.tensors["race"])),
            "gender_ce": float(masked_ce(gender_logits, d.tensors["gender"])),
        }
        preds = d.meta[["sample_id", "gender", "race", "subgroup"]].copy()
        preds["race_pred"] = [RACES[i] for i in race_logits.argmax(1).tolist()]
        preds["gender_pred"] = [GENDERS[i] for i in gender_logits.argmax(1).tolist()]
        preds["cos"] = cos.cpu().numpy()
        return [(metrics, preds)]

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        """Leakage probes: logistic regression trained on train, scored on val, raw vs debiased."""
        train, val = self.data["train"], self.data["val"]
        feats = {
            "raw": (train.tensors["x"].cpu().numpy(), val.tensors["x"].cpu().numpy()),
            "debiased": (self.transform(train.tensors["x"]).cpu().numpy(), self.transform(val.tensors["x"]).cpu().numpy()),
        }
        probe = {}
        for attr, classes in (("race", RACES), ("gender", GENDERS)):
            ytr, yva = train.tensors[attr].cpu().numpy(), val.tensors[attr].cpu().numpy()
            row = {"chance": 1.0 / len(classes)}
            ktr, kva = ytr >= 0, yva >= 0
            if kva.any():
                row["majority"] = float(pd.Series(yva[kva]).value_counts(normalize=True).iloc[0])
            for name, (xtr, xva) in feats.items():
                row[name] = probe_accuracy(xtr[ktr], ytr[ktr], xva[kva], yva[kva])
            probe[attr] = row
        return {"probe": probe}


def probe_accuracy(xtr, ytr, xva, yva, seed: int = 0) -> float:
    """Accuracy on val of a standardised logistic regression fitted on train (NaN if impossible)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(xva) == 0 or len(np.unique(ytr)) < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(xtr, ytr)
    return float(clf.score(xva, yva))
