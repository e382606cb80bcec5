"""Stage 2: the fair detector (fairness through awareness), from frozen features.

The frozen Stage-1 adapter gives the fair feature f; a trainable residual adapter gives the
detection feature d.  AdaIN modulates d with statistics projected from f, cross-attention lets
d query V views projected from f, a gate fuses the two, and a classifier gives two logits
(score = logit_fake - logit_real, so p = sigmoid(score)).  A cosine head over the 8
subgroups carries the LDAM loss.

L = (1 - w) CE + w CVaR + w lambda_ldam LDAM + w lambda_sinkhorn Sinkhorn_per_class
    + lambda_contrastive cos(f, d)^2,   w: 0 until warmup_start, linearly to 1 at warmup_end.
A term a preset switches off leaves its weight to CE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FeatcacheError
from ..losses.cvar import bilevel_cvar
from ..losses.disentangle import cosine_disentanglement
from ..losses.ldam import LDAMLoss
from ..losses.sinkhorn import GroupSinkhorn, feature_scale
from ..metrics import all_metrics
from ..metrics.detection import sigmoid
from .blocks import AdaIN, BinaryClassifier, CosineClassifier, GatedFusion, MultiViewCrossAttention, ResidualAdapter
from .task import SplitData, StepState, Task, register_task

META = ["sample_id", "label", "split", "dataset", "gender", "race", "subgroup", "identity", "method"]
N_SUBGROUPS = 8


class Stage2Model(nn.Module):
    def __init__(self, dim: int, stage1_hidden: int, adapter_hidden: int, num_ca_views: int, ca_heads: int,
                 classifier_hidden: list[int], dropout: float):
        super().__init__()
        self.fair = ResidualAdapter(dim, stage1_hidden)
        self.fair.requires_grad_(False)
        self.detect = ResidualAdapter(dim, adapter_hidden, dropout=dropout)
        self.adain = AdaIN(dim, dim)
        self.num_ca_views = num_ca_views
        if num_ca_views > 0:
            self.cross_attention = MultiViewCrossAttention(dim, dim, n_views=num_ca_views, heads=ca_heads)
            self.fusion = GatedFusion(dim)
        self.classifier = BinaryClassifier(dim, hidden=tuple(classifier_hidden), dropout=dropout)
        self.subgroup_head = CosineClassifier(dim, N_SUBGROUPS)

    def train(self, mode: bool = True):
        super().train(mode)
        self.fair.eval()  # frozen: no dropout, no statistics updates
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            f = self.fair(x)
        d = self.detect(x)
        fused = self.adain(d, f)
        out = {"fair": f, "detect": d}
        if self.num_ca_views > 0:
            ca, attn = self.cross_attention(d, f)
            fused, gate = self.fusion(fused, ca)
            out.update(attention=attn, gate=gate)
        out["fused"] = fused
        out["logits"] = self.classifier(fused)
        out["subgroup_logits"] = self.subgroup_head(fused)
        return out


@register_task("stage2")
class Stage2Task(Task):
    meta_columns = META
    requires_runs = {"stage1": "stage1"}

    def tensors(self, data) -> SplitData:
        meta = data.meta
        labels = meta["label"].to_numpy().astype(np.int64)
        if (labels < 0).any():
            raise FeatcacheError("the cache has rows without a label; Stage 2 needs labels")
        return SplitData({
            "x": torch.from_numpy(np.array(data.features)),
            "label": torch.from_numpy(labels),
            "subgroup": torch.from_numpy(meta["subgroup"].to_numpy().astype(np.int64)),
        }, meta)

    def make_spec(self) -> dict:
        m, loss = self.cfg["model"], self.cfg["loss"]
        x = self.data["train"].tensors["x"]
        s1 = self.inputs["stage1"]
        if s1.spec["dim"] != x.shape[1]:
            raise FeatcacheError(f"the Stage-1 run works on {s1.spec['dim']}-d features, this cache has {x.shape[1]}")
        trained_on = s1.spec.get("backbone")
        if trained_on and self.backbone and trained_on.get("weights_sha256") != self.backbone.get("weights_sha256"):
            raise FeatcacheError("the Stage-1 run was trained on features of another backbone than this cache; "
                                 "extract both with the same backbone and weights")
        groups = self.data["train"].tensors["subgroup"].cpu().numpy()
        counts = np.bincount(groups[groups >= 0], minlength=N_SUBGROUPS)  # LDAM margins
        blur = loss["sinkhorn_blur"]
        return {
            "dim": int(x.shape[1]), "stage1_hidden": int(s1.spec["adapter_hidden"]),
            "stage1_run": str(self.cfg["options"]["stage1"]),
            "adapter_hidden": int(m["adapter_hidden"]), "num_ca_views": int(m["num_ca_views"]),
            "ca_heads": int(m["ca_heads"]), "classifier_hidden": [int(h) for h in m["classifier_hidden"]],
            "dropout": float(m["dropout"]), "subgroup_counts": counts.tolist(),
            "sinkhorn_blur": float(feature_scale(x)) if blur == "auto" else float(blur),
            "backbone": self.backbone,
        }

    def build(self, spec: dict) -> nn.Module:
        loss = self.cfg["loss"]
        model = Stage2Model(spec["dim"], spec["stage1_hidden"], spec["adapter_hidden"], spec["num_ca_views"],
                            spec["ca_heads"], spec["classifier_hidden"], spec["dropout"])
        if "stage1" in self.inputs:
            model.fair.load_state_dict(self.inputs["stage1"].module.adapter.state_dict())
        self.ldam = LDAMLoss(spec["subgroup_counts"], max_margin=float(loss["ldam_max_margin"]),
                             s=float(loss["ldam_scale"])).to(self.device)
        self.sinkhorn = GroupSinkhorn(blur=spec["sinkhorn_blur"], scaling=float(loss["sinkhorn_scaling"]))
        return model

    def fairness_weight(self, state: StepState) -> float:
        f = self.cfg["fairness"]
        start, end = float(f["warmup_start"]), float(f["warmup_end"])
        if end <= start:
            return float(state.epoch >= start)
        return float(min(1.0, max(0.0, (state.epoch - start) / (end - start))))

    def epoch_values(self, state: StepState) -> dict:
        return {"fairness_weight": self.fairness_weight(state)}

    def batch_loss(self, batch, state):
        c = self.cfg["loss"]
        w = self.fairness_weight(state)
        batch = {k: v[0] for k, v in batch.items()}  # R = 1
        y, g = batch["label"], batch["subgroup"]
        out = self.module(batch["x"])
        per_sample = F.cross_entropy(out["logits"], y, reduction="none")
        terms = {"ce": per_sample.mean()}
        loss = (1.0 - (w if c["use_cvar"] else 0.0)) * terms["ce"]
        if c["use_cvar"]:
            terms["cvar"] = bilevel_cvar(per_sample, g, y, c["inner_worst_fraction"], c["outer_worst_fraction"])
            loss = loss + w * terms["cvar"]
        if c["use_ldam"]:
            known = g >= 0
            terms["ldam"] = self.ldam(out["subgroup_logits"][known], g[known])
            loss = loss + w * c["lambda_ldam"] * terms["ldam"]
        if c["use_sinkhorn"]:
            terms["sinkhorn"] = self.sinkhorn.per_class(out["fused"], g, y)
            loss = loss + w * c["lambda_sinkhorn"] * terms["sinkhorn"]
        if c["lambda_contrastive"] > 0:
            terms["disentangle"] = cosine_disentanglement(out["fair"], out["detect"])
            loss = loss + c["lambda_contrastive"] * terms["disentangle"]
        return loss.reshape(1), {k: v.detach().reshape(1) for k, v in terms.items()}

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, batch: int = 8192) -> dict[str, torch.Tensor]:
        outs = [self.module(x[i:i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @torch.no_grad()
    def evaluate(self, split: str):
        d = self.data[split]
        out = self.forward_all(d.tensors["x"])
        logits = out["logits"].float()
        score = (logits[:, 1] - logits[:, 0]).cpu().numpy()
        y = d.tensors["label"].cpu().numpy()
        groups = d.tensors["subgroup"].cpu().numpy()
        metrics = all_metrics(y, score, groups=groups, identity=video_keys(d.meta))
        if "gate" in out:
            gate = out["gate"].float()
            metrics.update(gate_mean=float(gate.mean()), gate_std=float(gate.std()),
                           gate_min=float(gate.min()), gate_max=float(gate.max()))
            for v, value in enumerate(out["attention"].float().mean(0).tolist()):
                metrics[f"attention_view{v}"] = value
        preds = d.meta[["sample_id", "label", "subgroup", "identity", "dataset", "method"]].copy()
        preds.insert(2, "score", score)
        preds.insert(3, "prob", sigmoid(score))
        return [(metrics, preds)]


def video_keys(meta) -> np.ndarray | None:
    """The video of each frame: frames sharing identity, label and method (a person's real video
    and the forgeries made from it share the identity). None when identities are missing."""
    identity = meta["identity"].astype(str)
    if (identity == "").any():
        return None
    return (identity + "|" + meta["label"].astype(str) + "|" + meta["method"].astype(str)).to_numpy()
