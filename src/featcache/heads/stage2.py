"""Stage 2: the fair detector (fairness through awareness), from frozen features.

The frozen Stage-1 adapter gives the fair feature f; a trainable residual adapter gives the
detection feature d.  AdaIN modulates d with statistics projected from f, cross-attention lets
d query V views projected from f, a gate fuses the two, and a classifier gives two logits
(score = logit_fake - logit_real, so p = sigmoid(score)).  A cosine head over the 8
subgroups carries the LDAM loss.

L = (1 - w a) CE + w c_cvar CVaR + w c_ldam LDAM + w c_sinkhorn Sinkhorn_per_class
    + c_contrastive cos(f, d)^2,
w: the fairness weight, with the design's epochs counted from 0 (e = epoch - 1): 0 up to e = warmup_start,
linearly to 1 at e = warmup_end (defaults 5, 10: 0 through epoch 6 counted from 1, 1 from epoch 11).
a, CE's hand-off (``loss.ce_weight_rule``): ``cvar`` (the default) a = c_cvar: CE hands its weight only
to CVaR, the one term that replaces it as a detection loss (without CVaR, in ``ldam``, ``minimal`` and
``none``, nothing else trains the real/fake logits after the warm-up; measured in the README).
``design`` a = 1 whenever a fairness term (CVaR, LDAM, Sinkhorn) is on, the design's literal (1 - w) CE;
a = 0 when every one is off (preset ``none``).
The presets differ only in the per-run coefficients c (``coefficients()``): ``none`` is the same graph
with every fairness coefficient 0, so runs of every preset stack into one module.

``model.architecture: linear`` (the ``linear`` preset, the design's "CLIP + Linear + CE" baseline) is
another, smaller architecture: the cached features, one linear layer, cross-entropy; it stacks only
with other ``linear`` runs (its ``stack_key`` differs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import FeatcacheError
from ..losses.cvar import bilevel_cvar
from ..losses.disentangle import cosine_disentanglement
from ..losses.ldam import LDAMLoss
from ..losses.sinkhorn import StackedSinkhorn, bounding_diameter, feature_scale
from ..metrics import all_metrics
from ..metrics.detection import sigmoid
from .blocks import (
    RunRNG,
    StackedAdaIN,
    StackedAdapter,
    StackedCosineClassifier,
    StackedCrossAttention,
    StackedGate,
    StackedLinear,
    StackedMLP,
    run_generators,
)
from .stage1 import Stage1Task, check_demographics
from .task import SplitData, StepState, Task, register_task

META = ["sample_id", "label", "split", "dataset", "gender", "race", "subgroup", "identity", "method"]
N_SUBGROUPS = 8

FAIRNESS_KEYS = ("cvar", "ldam", "sinkhorn")


class Stage2Model(nn.Module):
    """R stacked Stage-2 models (inputs (R, B, D)); ``fair`` is the frozen Stage-1 adapter, one copy per run."""

    def __init__(self, seeds: list[int], dim: int, stage1_hidden: int, adapter_hidden: int, num_ca_views: int,
                 ca_heads: int, classifier_hidden: list[int], dropout: float):
        super().__init__()
        runs, gens, self.rng = len(seeds), run_generators(seeds), RunRNG(seeds)
        self.fair = StackedAdapter(runs, dim, stage1_hidden, run_generators(seeds, offset=7))
        self.fair.requires_grad_(False)
        self.detect = StackedAdapter(runs, dim, adapter_hidden, gens, dropout=dropout, rng=self.rng)
        self.adain = StackedAdaIN(runs, dim, dim, gens)
        self.num_ca_views = num_ca_views
        if num_ca_views > 0:
            self.cross_attention = StackedCrossAttention(runs, dim, dim, num_ca_views, ca_heads, gens)
            self.fusion = StackedGate(runs, dim, gens)
        self.classifier = StackedMLP(runs, dim, tuple(classifier_hidden), 2, gens, dropout, self.rng)
        self.subgroup_head = StackedCosineClassifier(runs, dim, N_SUBGROUPS, gens)

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


class LinearModel(nn.Module):
    """R linear probes: the cached features -> one Linear(D, 2) (the design's CLIP + Linear + CE)."""

    def __init__(self, seeds: list[int], dim: int):
        super().__init__()
        self.classifier = StackedLinear(len(seeds), dim, 2, run_generators(seeds))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(x)}


@register_task("stage2")
class Stage2Task(Task):
    max_runs = 64
    class_weighted = True  # its CE goes through class_weighted_mean (training.class_balance: weight)
    meta_columns = META
    requires_runs = {"stage1": "stage1"}
    # the per-run coefficients (cvar, ldam, sinkhorn, contrastive) come from these loss keys
    coefficient_keys = ("use_cvar", "use_ldam", "use_sinkhorn", "lambda_ldam", "lambda_sinkhorn", "lambda_contrastive",
                        "ce_weight_rule")

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        self.notes: list[str] = []

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        check_stage2_config(cfg)  # the warm-up first: its message also says how to move min_epoch
        super().check_config(cfg)

    @property
    def architecture(self) -> str:
        return self.conf.model.architecture

    def tensors(self, data) -> SplitData:
        meta = data.meta
        labels = meta["label"].to_numpy().astype(np.int64)
        if (labels < 0).any():
            bad = sorted(set(meta["split"][labels < 0].astype(str)))
            raise FeatcacheError(f"split(s) {', '.join(bad)} have rows without a label; Stage 2 needs labels")
        return SplitData({
            "x": torch.from_numpy(np.array(data.features)),
            "label": torch.from_numpy(labels),
            "subgroup": torch.from_numpy(meta["subgroup"].to_numpy().astype(np.int64)),
        }, meta)

    @staticmethod
    def run_coefficients(cfg: dict | Config) -> dict[str, float]:
        """The coefficients of one run's config (a switched-off term has coefficient 0) and ``ce_handoff``,
        a in CE's weight 1 - w a (see the module docstring)."""
        conf = Config.of(cfg)
        c, keep = conf.loss, float(conf.model.architecture != "linear")  # the linear probe has no fairness term
        coefs = {"cvar": keep * c.use_cvar, "ldam": keep * c.use_ldam * c.lambda_ldam,
                 "sinkhorn": keep * c.use_sinkhorn * c.lambda_sinkhorn, "contrastive": keep * c.lambda_contrastive}
        if c.ce_weight_rule == "cvar":
            coefs["ce_handoff"] = coefs["cvar"]
        else:
            coefs["ce_handoff"] = float(any(coefs[k] > 0 for k in FAIRNESS_KEYS))
        return coefs

    def _make_coefficients(self) -> dict[str, torch.Tensor]:
        per = [self.run_coefficients(conf) for conf in self.confs]
        return {k: self._coef(p[k] for p in per) for k in per[0]}

    def _stage1(self) -> Stage1Task:
        s1 = self.inputs.get("stage1")
        if s1 is None:
            raise FeatcacheError("stage2 needs the Stage-1 run: pass --stage1 RUN1")
        if s1.name != "stage1":
            raise FeatcacheError(f"--stage1 is a {s1.name} run, not a stage1 run")
        return s1

    def make_spec(self) -> dict:
        m, loss = self.conf.model, self.conf.loss
        train = self.data.get("train")
        if train is None or len(train) == 0:
            raise FeatcacheError("stage2: the cache has no readable rows in its train split (every row failed "
                                 "to extract, or there is no train split); see `featcache cache info` and re-extract")
        fairness = any(self.run_coefficients(conf)[k] > 0 for conf in self.confs for k in FAIRNESS_KEYS)
        note = check_demographics("stage2", train.meta, needed=fairness)
        if note:
            self.notes.append(note)
        x = train.tensors["x"]
        spec = {"architecture": self.architecture, "dim": int(x.shape[1]), "backbone": self.backbone}
        if self.architecture == "linear":
            return spec
        s1 = self._stage1()
        if s1.spec["dim"] != x.shape[1]:
            raise FeatcacheError(f"the Stage-1 run works on {s1.spec['dim']}-d features, this cache has {x.shape[1]}")
        trained_on = s1.spec.get("backbone")
        if trained_on and self.backbone and trained_on.get("weights_sha256") != self.backbone.get("weights_sha256"):
            raise FeatcacheError("the Stage-1 run was trained on features of another backbone than this cache; "
                                 "extract both with the same backbone and weights")
        groups = train.tensors["subgroup"].cpu().numpy()
        counts = np.bincount(groups[groups >= 0], minlength=N_SUBGROUPS)  # LDAM margins
        blur = loss.sinkhorn_blur  # "auto" or a number
        standard = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)
        spec.update({
            "stage1_hidden": int(s1.spec["adapter_hidden"]),
            "stage1_run": self.conf.options.stage1 if "stage1" in self.conf.options else "",
            "adapter_hidden": m.adapter_hidden, "num_ca_views": m.num_ca_views, "ca_heads": m.ca_heads,
            "classifier_hidden": [int(h) for h in m.classifier_hidden], "dropout": m.dropout,
            "subgroup_counts": counts.tolist(),
            "sinkhorn_blur": float(feature_scale(x)) if blur == "auto" else blur,
            # the start of geomloss's epsilon schedule, fixed: the Sinkhorn term compares the fused
            # (AdaIN-normalised) features, so twice the bounding box of the per-sample standardised
            # train features
            "sinkhorn_diameter": 2.0 * bounding_diameter(standard),
        })
        return spec

    def build(self, spec: dict) -> nn.Module:
        seeds = self.seeds()
        if spec.get("architecture", "fair") == "linear":
            return LinearModel(seeds, spec["dim"])
        loss = self.conf.loss
        model = Stage2Model(seeds, spec["dim"], spec["stage1_hidden"], spec["adapter_hidden"], spec["num_ca_views"],
                            spec["ca_heads"], spec["classifier_hidden"], spec["dropout"])
        s1 = self.inputs.get("stage1")
        if s1 is not None:  # training: every run's fair adapter is a copy of the Stage-1 run's (run 0 of it)
            src = s1.module.adapter.state_dict()
            model.fair.load_state_dict({k: v[:1].expand_as(model.fair.state_dict()[k]).clone() for k, v in src.items()})
        self.ldam = LDAMLoss(spec["subgroup_counts"], max_margin=loss.ldam_max_margin, s=loss.ldam_scale,
                             rule=loss.ldam_margin_rule)
        self.ldam.to(self.device)
        diameter = spec.get("sinkhorn_diameter") or 10.0 * spec["sinkhorn_blur"]
        self.sinkhorn = StackedSinkhorn(spec["sinkhorn_blur"], loss.sinkhorn_scaling, diameter)
        return model

    def fairness_weight(self, state: StepState) -> float:
        """w of an epoch, counted as the design counts epochs (from 0: e = epoch - 1):
        ``clip((e - warmup_start) / (warmup_end - warmup_start), 0, 1)``."""
        return warmup_weight(state.epoch, self.conf.fairness.warmup_start, self.conf.fairness.warmup_end)

    def epoch_values(self, state: StepState) -> dict:
        return {"fairness_weight": self.fairness_weight(state)}

    def batch_loss(self, batch, state):
        y, g = batch["label"], batch["subgroup"]
        out = self.module(batch["x"])
        logits = out["logits"]
        per_sample = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none").reshape(y.shape)
        terms = {"ce": self.class_weighted_mean(per_sample, y)}  # training.class_balance: weight
        if self.architecture == "linear":
            return terms["ce"], {k: v.detach() for k, v in terms.items()}
        c = self.coefficients()
        w = self.fairness_weight(state)  # a Python float from the schedule
        # A term is computed when some run of the stack weighs it (from the configs, not from tensors);
        # LDAM always, since it alone trains the subgroup head: a run that does not weigh it still gets
        # the head's zero gradient (hence AdamW's weight decay), alone as in any stack.
        want = {k: k == "ldam" or any(self.run_coefficients(conf)[k] > 0 for conf in self.confs)
                for k in ("cvar", "ldam", "sinkhorn", "contrastive")}
        loss = (1.0 - w * c["ce_handoff"]) * terms["ce"]
        if want["cvar"]:
            cl = self.conf.loss  # the worst fractions are equal across stacked runs (stack_key)
            terms["cvar"] = bilevel_cvar(per_sample, g, y, cl.inner_worst_fraction, cl.outer_worst_fraction)
            loss = loss + w * c["cvar"] * terms["cvar"]
        if want["ldam"]:
            terms["ldam"] = self.ldam.masked(out["subgroup_logits"], g)
            loss = loss + w * c["ldam"] * terms["ldam"]
        if want["sinkhorn"]:
            terms["sinkhorn"] = self.sinkhorn.terms(out["fused"], g, labels=y)["sinkhorn"]
            loss = loss + w * c["sinkhorn"] * terms["sinkhorn"]
        if want["contrastive"]:
            terms["disentangle"] = cosine_disentanglement(out["detect"], out["fair"])
            loss = loss + c["contrastive"] * terms["disentangle"]
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, batch: int = 8192) -> dict[str, torch.Tensor]:
        """Every run's outputs on the same rows: (n, D) -> {name: (R, n, ...)}."""
        outs = [self.module(x[i:i + batch].to(self.device).unsqueeze(0).expand(self.runs, -1, -1))
                for i in range(0, len(x), batch)]
        return {k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]}

    @torch.no_grad()
    def evaluate(self, split: str):
        self.module.eval()
        d = self.data[split]
        out = self.forward_all(d.tensors["x"])
        y = d.tensors["label"].cpu().numpy()
        groups = d.tensors["subgroup"].cpu().numpy()
        identity = video_keys(d.meta)
        results = []
        for r in range(self.runs):
            logits = out["logits"][r].float()
            score = (logits[:, 1] - logits[:, 0]).cpu().numpy()
            metrics = all_metrics(y, score, groups=groups, identity=identity)
            if "gate" in out:
                gate = out["gate"][r].float()
                metrics.update(gate_mean=float(gate.mean()), gate_std=float(gate.std()),
                               gate_min=float(gate.min()), gate_max=float(gate.max()))
                for v, value in enumerate(out["attention"][r].float().mean(0).tolist()):
                    metrics[f"attention_view{v}"] = value
            preds = d.meta[["sample_id", "label", "subgroup", "identity", "dataset", "method"]].copy()
            preds.insert(2, "score", score)
            preds.insert(3, "prob", sigmoid(score))
            results.append((metrics, preds))
        return results


def check_stage2_config(cfg: dict | Config) -> None:
    """Refuse a config whose fairness terms could never reach their weight, or that could select no epoch
    (``model.architecture``, ``loss.ldam_margin_rule`` and ``loss.ce_weight_rule`` are declared
    constraints of stage2.yaml, checked when the config is resolved)."""
    conf = Config.of(cfg)
    f, epochs = conf.fairness, conf.training.epochs
    coefs = Stage2Task.run_coefficients(conf)
    full = f.warmup_end + 1  # the first epoch (counted from 1) at the whole fairness weight
    if any(coefs[k] > 0 for k in FAIRNESS_KEYS) and epochs < full:
        end = max(1, (epochs - 1) // 2) if epochs > 1 else 0
        raise FeatcacheError(
            f"stage2: training.epochs={epochs} ends before the fairness warm-up does (fairness.warmup_end="
            f"{f.warmup_end}: the weight reaches 1 at epoch {full}, the design counting epochs from 0), so the "
            f"fairness losses would never reach their weight; train at least {full} epochs, or shorten the "
            f"warm-up (e.g. --set fairness.warmup_start={end // 2} --set fairness.warmup_end={end} "
            f"--set selection.min_epoch={end + 1})")


def warmup_weight(epoch: int, start: float, end: float) -> float:
    """The fairness weight of ``epoch`` (counted from 1) for a warm-up from ``start`` to ``end`` in the
    design's epochs, counted from 0: with e = epoch - 1, 0 up to e = start, linear to 1 at e = end."""
    e, start, end = epoch - 1, float(start), float(end)
    if end <= start:
        return float(e >= start)
    return float(min(1.0, max(0.0, (e - start) / (end - start))))


def video_keys(meta) -> np.ndarray | None:
    """The video of each frame: frames sharing identity, label and method (a person's real video
    and the forgeries made from it share the identity). None when identities are missing."""
    identity = meta["identity"].astype(str)
    if (identity == "").any():
        return None
    return (identity + "|" + meta["label"].astype(str) + "|" + meta["method"].astype(str)).to_numpy()
