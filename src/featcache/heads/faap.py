"""FAAP: a fairness-aware perturbation of a frozen DETR's decoder queries, trained from the cache.

The deployed detector stays untouched. A generator G reads each cached query h (and its
image's mean query) and produces a perturbation bounded per element by epsilon in units of that
dimension's standard deviation over the train split:

    delta = epsilon * std * tanh(G(h, mean_q h)),   h' = h + delta,   |delta_j| < epsilon * std_j

and DETR's own frozen class and box heads (``heads.safetensors`` of the cache) score h'.
Image score s = mean over the top-10 queries of the highest class probability. Losses:

- adaptive score contrastive: rank the batch by s; top 40 % positives, bottom 40 % anchors
  (at least 2 each); projection Linear(d, 512) + BN + ReLU + Linear(512, 128) of the mean-pooled
  h', L2-normalised; InfoNCE (tau 0.1) pulling anchors towards positives, weight ramped in over
  3 epochs; optional positive-to-positive term (``loss.bidirectional_weight``, 0.3);
- one-way Wasserstein between the sorted scores of women and men, pulling women's up (lambda 0.2);
- detection preservation: DETR's set criterion against the ground truth on h' (beta 0.5 -> 0.6).

Epsilon schedule: 0.05 rising to 0.10 over 8 warm-up epochs, held 6, cooling to 0.09 over 16.
The epsilon of the selected epoch is stored with the weights. Evaluation (COCO AP/AR per gender
with pycocotools, unperturbed vs perturbed) is in :meth:`FaapTask.evaluate`; ``featcache
evaluate`` also writes the FAAP table (markdown and JSON). Two score gaps, named for what they
are: ``pos_anchor_gap`` is the design's score gap, positive - anchor (mean score of the top
``rank_fraction`` minus the bottom's, per batch, as training ranks them; also logged per epoch);
``gender_score_gap`` is the mean image score of men minus women's, which the one-way Wasserstein
term closes (``gap_closed`` = its baseline minus its perturbed value).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..cache.splits import split_mask
from ..config import Section
from ..errors import FeatcacheError, write_atomic
from ..extract.detr import padded_ground_truth, read_heads
from ..losses.faap import (
    DetectionCriterion,
    image_scores,
    one_way_wasserstein,
    ranking_split,
    score_contrastive,
    wasserstein_1d,
)
from ..metrics.coco import bootstrap_group_ap_ar, coco_ground_truth, detr_detections, group_ap_ar, image_matches
from ..report.tables import markdown_table
from .task import SplitData, StepState, Task, meta_codes, register_task

META = ["sample_id", "split", "gender", "image_id"]
GENDER_CODES = ("male", "female")  # 0 male, 1 female
#: Bootstrap resamples of the test images behind the AP/AR intervals (``ci95``), seeded with 0.
N_BOOT = 200
#: The metrics with a ``ci95`` (each also as ``base_<key>``), and ``ap_gap_change`` (paired).
CI_KEYS = ("ap_male", "ap_female", "ap_gap", "ar_male", "ar_female", "ar_gap")


class FaapModel(nn.Module):
    """Generator, projection head, and DETR's frozen class and box heads."""

    def __init__(self, dim: int, num_logits: int, box_hidden: int, box_layers: int, generator_hidden: int,
                 proj_hidden: int = 512, proj_out: int = 128):
        super().__init__()
        from transformers.models.detr.modeling_detr import DetrMLPPredictionHead

        self.generator = nn.Sequential(nn.Linear(2 * dim, generator_hidden), nn.GELU(),
                                       nn.Linear(generator_hidden, dim))
        nn.init.zeros_(self.generator[-1].weight)  # start from no perturbation
        nn.init.zeros_(self.generator[-1].bias)
        self.projection = nn.Sequential(nn.Linear(dim, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.ReLU(),
                                        nn.Linear(proj_hidden, proj_out))
        self.class_head = nn.Linear(dim, num_logits)
        self.box_head = DetrMLPPredictionHead(input_dim=dim, hidden_dim=box_hidden, output_dim=4, num_layers=box_layers)
        for p in [*self.class_head.parameters(), *self.box_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("epsilon", torch.tensor(0.05))

    def bound(self) -> torch.Tensor:
        """The per-dimension bound epsilon * std."""
        return self.epsilon * self.scale

    def perturbation(self, h: torch.Tensor) -> torch.Tensor:
        ctx = h.mean(1, keepdim=True).expand_as(h)
        return self.bound() * torch.tanh(self.generator(torch.cat([h, ctx], -1)))

    def score(self, h: torch.Tensor):
        return self.class_head(h), self.box_head(h).sigmoid()

    def forward(self, h: torch.Tensor):
        delta = self.perturbation(h)
        hp = h + delta
        logits, boxes = self.score(hp)
        return hp, delta, logits, boxes

    def embed(self, hp: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(hp.mean(1)), dim=-1)


def epsilon_at(epoch: int, c: Section) -> float:
    """Warm-up from eps_start to eps_max over ``eps_warmup`` epochs, hold ``eps_hold``, cool to eps_end over
    ``eps_cool`` (``c``: the typed ``loss`` section)."""
    start, top, end = c.eps_start, c.eps_max, c.eps_end
    warm, hold, cool = c.eps_warmup, c.eps_hold, c.eps_cool
    if epoch <= warm:
        return start + (top - start) * (epoch - 1) / max(warm - 1, 1)
    if epoch <= warm + hold:
        return top
    return top + (end - top) * min(epoch - warm - hold, cool) / max(cool, 1)


def load_queries(cache, split: str | None = None):
    """Hidden states, ground truth (padded), image sizes and meta of the readable rows of a queries
    cache (one split, or every row for None); read once."""
    meta = cache.meta(META)
    mask = cache.load_rows("ok").astype(bool)
    if split is not None:
        mask &= split_mask(meta["split"], split, where=str(cache.path))
    if not mask.any():
        where = f"in split {split!r}" if split is not None else "at all"
        raise FeatcacheError(f"{cache.path} has no readable rows {where}")
    index = np.flatnonzero(mask)
    hidden = cache.load_rows("hidden", dtype=np.float32)[index]
    sizes = cache.load_rows("image_size")[index]
    boxes, classes = padded_ground_truth(cache)  # one pass over the ground truth of every row
    return hidden, sizes, boxes[index], classes[index], meta.iloc[index].reset_index(drop=True)


def targets_of(boxes: torch.Tensor, classes: torch.Tensor) -> list[dict]:
    keep = classes >= 0
    return [{"class_labels": classes[i][keep[i]], "boxes": boxes[i][keep[i]]} for i in range(len(classes))]


@register_task("faap")
class FaapTask(Task):
    detects = False
    cache_kind = "queries"
    max_runs = 1  # the DETR criterion's Hungarian matching runs per image on the host
    summary_keys = ("base_gender_score_gap", "gender_score_gap", "base_ap", "ap", "base_ap_gap", "ap_gap")

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        self._heads: dict | None = None
        self._baseline: dict[str, dict] = {}
        self._boot: dict[str, dict] = {}

    def load(self, cache, splits=("train", "val", "test")) -> None:
        super().load(cache, splits)
        self._heads = read_heads(cache.path)

    def read(self, cache):
        return load_queries(cache)

    def tensors(self, data) -> SplitData:
        hidden, sizes, boxes, classes, meta = data
        return SplitData({
            "hidden": torch.from_numpy(hidden), "gt_boxes": torch.from_numpy(boxes),
            "gt_classes": torch.from_numpy(classes), "image_size": torch.from_numpy(sizes.astype(np.int64)),
            "gender": torch.from_numpy(meta_codes(meta, "gender", GENDER_CODES)),
        }, meta)

    def make_spec(self) -> dict:
        h = self._heads
        if h is None:
            raise FeatcacheError("faap: the cache's heads were not loaded")
        return {
            "dim": int(h["class_labels_classifier.weight"].shape[1]),
            "num_logits": int(h["class_labels_classifier.weight"].shape[0]),
            "box_hidden": int(h["bbox_predictor.layers.0.weight"].shape[0]),
            "box_layers": len({k.split(".")[2] for k in h if k.startswith("bbox_predictor.layers.")}),
            "generator_hidden": self.conf.model.generator_hidden, "proj_hidden": self.conf.model.proj_hidden,
            "proj_out": self.conf.model.proj_out, "top_k": self.conf.model.top_k,
            "backbone": self.backbone,
        }

    def build(self, spec: dict) -> nn.Module:
        m = FaapModel(spec["dim"], spec["num_logits"], spec["box_hidden"], spec["box_layers"],
                      spec["generator_hidden"], spec["proj_hidden"], spec["proj_out"])
        self.criterion = DetectionCriterion(spec["num_logits"] - 1).to(self.device)
        if self._heads is not None:  # training: DETR's heads and the train split's per-dimension std
            m.class_head.load_state_dict({k.split(".", 1)[1]: v for k, v in self._heads.items()
                                          if k.startswith("class_labels_classifier.")})
            m.box_head.load_state_dict({k.split(".", 1)[1]: v for k, v in self._heads.items()
                                        if k.startswith("bbox_predictor.")})
            h = self.data["train"].tensors["hidden"]
            m.scale.copy_(h.reshape(-1, h.shape[-1]).std(0).clamp_min(1e-6).to(m.scale.device))
            m.epsilon.fill_(epsilon_at(1, self.conf.loss))
        return m

    # -- training ------------------------------------------------------------------------------
    def schedule(self, state: StepState) -> dict:
        """epsilon (:func:`epsilon_at`), beta (beta_start at the first epoch, linearly to beta_end at the
        last) and the contrastive weight (ramped over ``contrastive_ramp_epochs``) of an epoch."""
        c = self.conf.loss
        beta = c.beta_start + (c.beta_end - c.beta_start) * ((state.epoch - 1) / max(state.epochs - 1, 1))
        ramp = min(1.0, state.epoch / max(c.contrastive_ramp_epochs, 1))
        return {"epsilon": epsilon_at(state.epoch, c), "beta": beta, "contrastive_weight": c.contrastive_weight * ramp}

    def epoch_values(self, state: StepState) -> dict:
        return self.schedule(state)

    def batch_loss(self, batch, state):
        """One run: batch tensors (1, B, ...) -> loss (1,) and (1,) terms. The schedule values are
        Python floats and the gender means use masks; the DETR criterion's Hungarian matching (scipy,
        on the host) is the one synchronisation left in a step."""
        c, m = self.conf.loss, self.module
        batch = {k: v[0] for k, v in batch.items()}
        sched = self.schedule(state)
        m.epsilon.fill_(sched["epsilon"])
        h = batch["hidden"]
        hp, delta, logits, boxes = m(h)
        scores = image_scores(logits, self.spec["top_k"])
        pos, anc = ranking_split(scores, c.rank_fraction, c.rank_min)
        z = m.embed(hp)
        con = score_contrastive(z, pos, anc, c.tau, c.bidirectional_weight)
        gender = batch["gender"]
        female, male = gender == 1, gender == 0
        wass = one_way_wasserstein(scores[female], scores[male])
        det, det_terms = self.criterion(logits, boxes, targets_of(batch["gt_boxes"], batch["gt_classes"]))
        loss = sched["contrastive_weight"] * con + c.lambda_wasserstein * wass + sched["beta"] * det
        per_image = delta.flatten(1)
        nan = scores.new_tensor(float("nan"))
        terms = {"contrastive": con, "wasserstein": wass, "detection": det, **det_terms,
                 "n_pos": scores.new_tensor(float(len(pos))), "n_anchor": scores.new_tensor(float(len(anc))),
                 "pos_anchor_gap": (scores[pos].mean() - scores[anc].mean()) if len(pos) else nan,
                 "score_male": _masked_mean(scores, male), "score_female": _masked_mean(scores, female),
                 "delta_linf": delta.abs().max(), "delta_l2": per_image.norm(dim=1).mean()}
        return loss.reshape(1), {k: v.detach().reshape(1) for k, v in terms.items()}

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, split: str, perturbed: bool = True, batch: int = 1024):
        """Logits, boxes, image scores (numpy) and perturbation of a split, perturbed or not."""
        m, d = self.module, self.data[split]
        m.eval()
        res = {"logits": [], "boxes": [], "scores": [], "delta": []}
        for i in range(0, len(d), batch):
            h = d.tensors["hidden"][i:i + batch].to(self.device)
            if perturbed:
                _, delta, logits, boxes = m(h)
            else:
                delta = torch.zeros_like(h)
                logits, boxes = m.score(h)
            res["logits"].append(logits)
            res["boxes"].append(boxes)
            res["scores"].append(image_scores(logits, self.spec["top_k"]))
            res["delta"].append(delta)
        return {k: torch.cat(v).cpu().numpy() for k, v in res.items()}

    def _coco_inputs(self, split: str, out: dict):
        """(COCO ground truth, DETR's detections, gender codes, category ids) of a split's outputs."""
        d = self.data[split]
        sizes = d.tensors["image_size"].cpu().numpy()
        cls = d.tensors["gt_classes"].cpu().numpy()
        bx = d.tensors["gt_boxes"].cpu().numpy()
        gt = coco_ground_truth(sizes, [b[c >= 0] for b, c in zip(bx, cls)], [c[c >= 0] for c in cls])
        dets = detr_detections(out["logits"], out["boxes"], sizes)
        cats = str(self.conf.fairness.categories).strip()
        cat_ids = None if cats == "all" else [int(c) for c in cats.split(",")]
        return gt, dets, d.tensors["gender"].cpu().numpy(), cat_ids

    def _resamples(self, split: str, out: dict) -> dict:
        """Per-gender AP/AR and their gaps over :data:`N_BOOT` resamples of the split's images, each
        gender's images drawn with replacement from its own (seed 0: the same resamples for the
        unperturbed and the perturbed outputs, so their difference is paired)."""
        gt, dets, gender, cat_ids = self._coco_inputs(split, out)
        r = bootstrap_group_ap_ar(image_matches(gt, dets, cat_ids), gender, {0: "male", 1: "female"}, n_boot=N_BOOT)
        return {**r, "ap_gap": r["ap_male"] - r["ap_female"], "ar_gap": r["ar_male"] - r["ar_female"]}

    def _detection_metrics(self, split: str, out: dict) -> dict:
        gt, dets, gender, cat_ids = self._coco_inputs(split, out)
        r = group_ap_ar(gt, dets, gender, {0: "male", 1: "female"}, cat_ids)
        s = out["scores"]
        male, female = s[gender == 0], s[gender == 1]
        r.update(score=float(s.mean()), score_male=_np_mean(male), score_female=_np_mean(female),
                 gender_score_gap=_np_mean(male) - _np_mean(female), pos_anchor_gap=self._pos_anchor_gap(s),
                 ap_gap=r["ap_male"] - r["ap_female"],
                 ar_gap=r["ar_male"] - r["ar_female"],
                 wasserstein=float(wasserstein_1d(torch.from_numpy(male).double(), torch.from_numpy(female).double())))
        return r

    def _pos_anchor_gap(self, scores: np.ndarray) -> float:
        """The design's score gap, positive - anchor: in consecutive batches of ``training.batch_size``
        images (split order), the mean score of the top ``rank_fraction`` minus that of the bottom, as
        training ranks them; averaged over the batches that have both (NaN when none has)."""
        c, bs = self.conf.loss, self.conf.training.batch_size
        gaps = []
        for i in range(0, len(scores), bs):
            b = torch.from_numpy(np.asarray(scores[i:i + bs], dtype=np.float64))
            pos, anc = ranking_split(b, c.rank_fraction, c.rank_min)
            if len(pos):
                gaps.append(float(b[pos].mean() - b[anc].mean()))
        return float(np.mean(gaps)) if gaps else float("nan")

    @torch.no_grad()
    def evaluate(self, split: str):
        if split not in self._baseline:
            self._baseline[split] = self._detection_metrics(split, self.outputs(split, perturbed=False))
        base = self._baseline[split]
        out = self.outputs(split, perturbed=True)
        pert = self._detection_metrics(split, out)
        delta = out["delta"]
        bound = self.module.bound().cpu().numpy()
        metrics = {**pert, **{f"base_{k}": v for k, v in base.items()},
                   "epsilon": float(self.module.epsilon),
                   "delta_linf": float(np.abs(delta).max()),
                   "delta_l2": float(np.linalg.norm(delta.reshape(len(delta), -1), axis=1).mean()),
                   "delta_linf_over_bound": float((np.abs(delta) / bound).max()),
                   "gap_closed": base["gender_score_gap"] - pert["gender_score_gap"],
                   "ap_change": pert["ap"] - base["ap"], "ap_shift": abs(pert["ap"] - base["ap"])}
        metrics["ap_gap_change"] = pert["ap_gap"] - base["ap_gap"]
        if split == "test":  # the reported split; val is evaluated every epoch for selection, without intervals
            metrics.update(self._intervals(split, out))
        metrics["gender_score_gap_relative_change"] = _rel(pert["gender_score_gap"], base["gender_score_gap"])
        metrics["ap_gap_relative_change"] = _rel(pert["ap_gap"], base["ap_gap"])
        metrics["ar_gap_relative_change"] = _rel(pert["ar_gap"], base["ar_gap"])
        preds = self.data[split].meta[["sample_id", "gender", "image_id"]].copy()
        preds["base_score"] = self.outputs(split, perturbed=False)["scores"]
        preds["score"] = out["scores"]
        preds["delta_l2"] = np.linalg.norm(delta.reshape(len(delta), -1), axis=1)
        return [(metrics, preds)]

    def _intervals(self, split: str, out: dict) -> dict:
        """``ci95`` (95 % percentile bootstrap intervals over the split's images, :meth:`_resamples`) of
        :data:`CI_KEYS`, unperturbed (``base_``) and perturbed, and of ``ap_gap_change`` (perturbed
        gap minus unperturbed, on the same resamples), with ``ci95_info``."""
        if "base" not in self._boot.setdefault(split, {}):
            self._boot[split]["base"] = self._resamples(split, self.outputs(split, perturbed=False))
        base, pert = self._boot[split]["base"], self._resamples(split, out)
        ci = {}
        for k in CI_KEYS:
            ci[f"base_{k}"], ci[k] = _percentile(base[k]), _percentile(pert[k])
        ci["ap_gap_change"] = _percentile(pert["ap_gap"] - base["ap_gap"])
        info = {"method": "percentile bootstrap over images, each gender's images resampled from its own; "
                          "AP/AR recomputed from pycocotools' matching for each resample (metrics.coco.weighted_ap_ar)",
                "level": 0.95, "n_boot": N_BOOT, "seed": 0,
                "images": {"male": int((self.data[split].tensors["gender"] == 0).sum()),
                           "female": int((self.data[split].tensors["gender"] == 1).sum())}}
        return {"ci95": ci, "ci95_info": info}

    def report(self, metrics: dict, predictions: pd.DataFrame) -> str:
        """The FAAP table (Male AP, Female AP, Male AR, Female AR; baseline, perturbed, delta)."""
        return "## FAAP\n\n" + markdown_table(faap_table(metrics)) + "\n" + faap_summary(metrics) + "\n"

    def layout(self) -> dict:
        """The data-layout summary of the run (FAAP's ``dataset_layout.json``): per split the images,
        the images per gender, the ground-truth boxes per category; the queries' shape."""
        out = {"queries": None, "splits": {}}
        for split, d in self.data.items():
            h = d.tensors["hidden"]
            out["queries"] = {"per_image": int(h.shape[1]), "dim": int(h.shape[2])}
            cls = d.tensors["gt_classes"].cpu().numpy()
            gender = d.tensors["gender"].cpu().numpy()
            cats, counts = np.unique(cls[cls >= 0], return_counts=True)
            out["splits"][split] = {
                "images": len(d), "male": int((gender == 0).sum()), "female": int((gender == 1).sum()),
                "unknown_gender": int((gender < 0).sum()), "boxes": int((cls >= 0).sum()),
                "boxes_per_category": {str(int(c)): int(n) for c, n in zip(cats, counts)},
            }
        return out

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        write_atomic(Path(run_dir) / "dataset_layout.json", json.dumps(self.layout(), indent=2))
        (metrics, _), = self.evaluate("test")
        return {"faap_test": {k: metrics[k] for k in ("base_gender_score_gap", "gender_score_gap", "gap_closed",
                                                       "base_pos_anchor_gap", "pos_anchor_gap", "base_ap",
                                                       "ap", "ap_change", "base_ap_gap", "ap_gap", "ap_gap_change")}}


def faap_table(m: dict) -> pd.DataFrame:
    cols = {"Male AP": "ap_male", "Female AP": "ap_female", "Male AR": "ar_male", "Female AR": "ar_female",
            "AP gap": "ap_gap", "AR gap": "ar_gap", "gender score gap": "gender_score_gap",
            "pos - anchor gap": "pos_anchor_gap", "Wasserstein": "wasserstein"}
    rows = []
    for name, prefix in (("baseline", "base_"), ("perturbed", "")):
        rows.append({"": name, **{c: m[prefix + k] for c, k in cols.items()}})
    rows.append({"": "delta", **{c: m[k] - m["base_" + k] for c, k in cols.items()}})
    return pd.DataFrame(rows)


def faap_summary(m: dict) -> str:
    ci = m.get("ci95") or {}

    def iv(key: str) -> str:
        return f" [{ci[key][0]:.4f}, {ci[key][1]:.4f}]" if key in ci else ""

    text = (f"epsilon {m['epsilon']:.3f} (x per-dimension std); perturbation L-inf {m['delta_linf']:.4f} "
            f"({m['delta_linf_over_bound']:.3f} of the bound), mean per-image L2 {m['delta_l2']:.4f}; "
            f"gender score gap (male - female) {m['base_gender_score_gap']:.4f} -> {m['gender_score_gap']:.4f} "
            f"({100 * m['gender_score_gap_relative_change']:+.1f} %); AP gap {m['base_ap_gap']:.4f}{iv('base_ap_gap')} -> "
            f"{m['ap_gap']:.4f}{iv('ap_gap')} ({100 * m['ap_gap_relative_change']:+.1f} %); AP {m['base_ap']:.4f} -> {m['ap']:.4f}")
    if "ap_gap_change" in ci:
        text += (f"\n\nChange of the AP gap (perturbed - unperturbed, paired over the same resamples): "
                 f"{m['ap_gap_change']:+.4f}{iv('ap_gap_change')}; [lo, hi]: 95 % percentile bootstrap over the "
                 f"test images ({(m.get('ci95_info') or {}).get('n_boot', '?')} resamples, each gender's images "
                 "resampled from its own)")
    return text


def _percentile(x: np.ndarray) -> list[float]:
    """[2.5 %, 97.5 %] quantiles of the finite resampled values ([nan, nan] when none is)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return [float(v) for v in np.quantile(x, [0.025, 0.975])] if len(x) else [float("nan"), float("nan")]


def _rel(new: float, old: float) -> float:
    return (new - old) / abs(old) if old not in (0.0,) and np.isfinite(old) else float("nan")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (NaN when empty), without boolean indexing."""
    n = mask.sum()
    return torch.where(n > 0, (x * mask).sum() / n.clamp(min=1), x.new_tensor(float("nan")))


def _np_mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")
