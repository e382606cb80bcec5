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

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data.manifest import GENDERS, RACES
from ..errors import FeatcacheError
from ..losses.sinkhorn import StackedSinkhorn, bounding_diameter, feature_scale
from .blocks import RunRNG, StackedAdapter, StackedMLP, dann_lambda, grad_reverse, run_generators
from .task import SplitData, StepState, Task, meta_codes, register_task

META = ["sample_id", "label", "split", "gender", "race", "subgroup", "identity"]


class Stage1Model(nn.Module):
    """R stacked Stage-1 models: adapter, race and gender adversaries (inputs (R, B, D))."""

    def __init__(self, seeds: list[int], dim: int, adapter_hidden: int, adversary_hidden: int, dropout: float):
        super().__init__()
        runs, gens, self.rng = len(seeds), run_generators(seeds), RunRNG(seeds)
        self.adapter = StackedAdapter(runs, dim, adapter_hidden, gens, dropout=dropout, rng=self.rng)
        self.race_head = StackedMLP(runs, dim, (adversary_hidden,), len(RACES), gens, dropout, self.rng)
        self.gender_head = StackedMLP(runs, dim, (adversary_hidden,), len(GENDERS), gens, dropout, self.rng)

    def forward(self, x: torch.Tensor, grl_lambda: float | None = 1.0):
        """``grl_lambda`` None: no reversal layer (the design's ``use_grl: false``)."""
        z = self.adapter(x)
        zr = z if grl_lambda is None else grad_reverse(z, grl_lambda)
        return z, self.race_head(zr), self.gender_head(zr)


def masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows with a known target (>= 0), per run: logits (R, B, K), target
    (R, B) -> (R,); 0 for a run with none. No boolean indexing (sync-free)."""
    known = target >= 0
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.clamp(min=0).reshape(-1),
                          reduction="none").reshape(target.shape)
    return (per * known).sum(-1) / known.sum(-1).clamp(min=1)


def masked_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    known = target >= 0
    if not bool(known.any()):
        return float("nan")
    return float((logits.argmax(-1)[known] == target[known]).float().mean())


def balanced_accuracy(pred, target) -> float:
    """Mean recall over the classes present among the rows with a known target (>= 0): chance is
    1 / classes whatever the class balance (scikit-learn's ``balanced_accuracy_score``); NaN if none."""
    pred, target = np.asarray(pred), np.asarray(target)
    known = target >= 0
    if not known.any():
        return float("nan")
    pred, target = pred[known], target[known]
    return float(np.mean([(pred[target == k] == k).mean() for k in np.unique(target)]))


def subgroup_variance(z: torch.Tensor, groups: torch.Tensor, classes: int = 8) -> torch.Tensor:
    """The share of the features' variance that lies between the subgroups' means, per run:
    ``sum_k n_k |mean_k - mean|^2 / sum_i |z_i - mean|^2`` over the rows with a known group (>= 0);
    z (R, B, D), groups (R, B) -> (R,), in [0, 1], 0 when every subgroup has the same mean.

    Zero is LEACE's condition for the subgroup indicators (Belrose et al. 2023: the features'
    cross-covariance with them is ``p_k (mean_k - mean)``): no linear probe of subgroup, race or
    gender then beats a constant. Sync-free (no boolean indexing)."""
    known = (groups >= 0).to(z.dtype)
    onehot = F.one_hot(groups.clamp(min=0), classes).to(z.dtype) * known[..., None]  # (R, B, K)
    n = known.sum(-1).clamp(min=1)  # (R,)
    mean = (z * known[..., None]).sum(1) / n[:, None]  # (R, D)
    counts = onehot.sum(1)  # (R, K)
    means = onehot.transpose(1, 2) @ z / counts.clamp(min=1)[..., None]  # (R, K, D)
    between = (counts * (means - mean[:, None]).pow(2).sum(-1)).sum(-1)
    total = ((z - mean[:, None]).pow(2).sum(-1) * known).sum(-1)
    return between / total.clamp_min(1e-12)


def grl_warm_epoch(cfg: dict | Config, share: float = 0.5) -> int:
    """The first epoch whose GRL lambda has risen ``share`` of the way from ``initial_lambda_grl`` to
    ``grl_max_lambda`` under ``cfg``'s schedule and epochs: before it the adversaries have barely
    acted on the adapter. With the design's schedule and 20 epochs: epoch 4 (lambda 0.635). 1 when
    lambda does not rise (``use_grl: false``, or max equal to initial)."""
    conf = Config.of(cfg)
    loss, epochs = conf.loss, conf.training.epochs
    lo, hi = loss.initial_lambda_grl, loss.grl_max_lambda
    if not loss.use_grl or hi <= lo:
        return 1
    for epoch in range(1, epochs + 1):
        if dann_lambda(StepState(epoch, epochs).progress, hi, loss.grl_gamma, initial=lo) >= lo + share * (hi - lo):
            return epoch
    return epochs


def check_demographics(task: str, meta, needed: bool) -> str | None:
    """Refuse (fairness needs them) or warn (a baseline may run) when no row has gender or race."""
    missing = [c for c in ("gender", "race") if c not in meta or not (meta[c].astype(str) != "").any()]
    sub = meta["subgroup"] if "subgroup" in meta else None
    if sub is not None and (sub.to_numpy() >= 0).any() and not missing:
        return None
    cols = ", ".join(missing) or "subgroup"
    if needed:
        raise FeatcacheError(f"{task}: the cache has no {cols} (every subgroup is -1); its fairness losses need "
                             "them: extract a manifest with gender and race columns, or use a preset without "
                             "fairness terms")
    return f"warning: the cache has no {cols}; the fairness metrics will be NaN"


@register_task("stage1")
class Stage1Task(Task):
    ablation_axes = ("probe_race_debiased", "test_cos")
    ablation_notes = (
        "- cos: mean cosine similarity of the debiased to the raw test features (1 = unchanged)\n"
        "- race_acc, gender_acc: the adversaries' accuracy on test (lower = less attribute information)\n"
        "- probe <attr>_raw / <attr>_debiased: val accuracy of a logistic-regression probe trained on the "
        "raw / debiased train features (debiased below raw = less leakage); chance is 1 / classes\n")
    detects = False
    max_runs = 64
    meta_columns = META
    summary_keys = ("cos", "race_acc", "gender_acc")
    # Stage 1's per-run coefficients: the loss weights of stage1.yaml
    coefficient_keys = ("lambda_race", "lambda_gender", "lambda_similarity", "lambda_fairness", "lambda_pairwise",
                        "lambda_subgroup_variance")

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        super().check_config(cfg)
        sel = Config.of(cfg).selection
        if sel.probe_rows <= 0 and "probe_" in sel.score:
            raise FeatcacheError(f"selection.score {sel.score!r} reads the per-epoch probe, which "
                                 f"selection.probe_rows={sel.probe_rows} turns off; set selection.probe_rows "
                                 "to a positive number of rows, or score on the adversaries: --set "
                                 "selection.score=\"cos - 0.3 * race_acc - 0.2 * gender_acc\"")

    def tensors(self, data) -> SplitData:
        meta = data.meta
        return SplitData({
            "x": torch.from_numpy(np.array(data.features)),
            "race": torch.from_numpy(meta_codes(meta, "race", RACES)),
            "gender": torch.from_numpy(meta_codes(meta, "gender", GENDERS)),
            "subgroup": torch.from_numpy(meta["subgroup"].to_numpy().astype(np.int64)),
        }, meta)

    def make_spec(self) -> dict:
        m, loss = self.conf.model, self.conf.loss
        train = self.data["train"]
        if len(train) == 0:
            raise FeatcacheError("stage1: the train split has no readable rows; check the cache with "
                                 "`featcache cache info` and re-extract")
        check_demographics("stage1", train.meta, needed=True)  # the adversaries learn race and gender
        x = train.tensors["x"]
        blur = loss.sinkhorn_blur  # "auto" or a number
        return {
            "dim": int(x.shape[1]), "adapter_hidden": m.adapter_hidden, "adversary_hidden": m.adversary_hidden,
            "dropout": m.dropout, "sinkhorn_blur": float(feature_scale(x)) if blur == "auto" else blur,
            # the start of geomloss's epsilon schedule, fixed: twice the train features' bounding box
            "sinkhorn_diameter": 2.0 * bounding_diameter(x),
            "backbone": self.backbone,
        }

    def build(self, spec: dict) -> nn.Module:
        diameter = spec.get("sinkhorn_diameter") or 10.0 * spec["sinkhorn_blur"]
        self.sinkhorn = StackedSinkhorn(spec["sinkhorn_blur"], self.conf.loss.sinkhorn_scaling, diameter)
        return Stage1Model(self.seeds(), spec["dim"], spec["adapter_hidden"], spec["adversary_hidden"],
                           spec["dropout"])

    def grl_lambda(self, state: StepState) -> float | None:
        """DANN's schedule at p = state.progress, from ``loss.initial_lambda_grl`` (the design's 0) at
        the first epoch (the design's p = epoch / total with epochs counted from 0) up to
        ``loss.grl_max_lambda``; None with ``loss.use_grl: false`` (no reversal layer)."""
        loss = self.conf.loss
        if not loss.use_grl:
            return None
        return dann_lambda(state.progress, loss.grl_max_lambda, loss.grl_gamma, initial=loss.initial_lambda_grl)

    def epoch_values(self, state: StepState) -> dict:
        lam = self.grl_lambda(state)
        return {"grl_lambda": float("nan") if lam is None else lam}

    def batch_loss(self, batch, state):
        c = self.coefficients()
        x = batch["x"]
        z, race_logits, gender_logits = self.module(x, self.grl_lambda(state))
        terms = {
            "race_ce": masked_ce(race_logits, batch["race"]),
            "gender_ce": masked_ce(gender_logits, batch["gender"]),
            "similarity": 1.0 - F.cosine_similarity(x, z, dim=-1).mean(-1),
        }
        # a Sinkhorn term is computed when some run weighs it (decided from the configs, not tensors)
        want = {"fairness": any(conf.loss.lambda_fairness > 0 for conf in self.confs),
                "pairwise": any(conf.loss.lambda_pairwise > 0 for conf in self.confs)}
        if want["fairness"] or want["pairwise"]:
            terms.update(self.sinkhorn.terms(z, batch["subgroup"], global_=want["fairness"],
                                             pairwise=want["pairwise"]))
        if any(conf.loss.lambda_subgroup_variance > 0 for conf in self.confs):
            terms["subgroup_variance"] = subgroup_variance(z, batch["subgroup"])
        loss = (c["lambda_race"] * terms["race_ce"] + c["lambda_gender"] * terms["gender_ce"]
                + c["lambda_similarity"] * terms["similarity"])
        if "subgroup_variance" in terms:
            loss = loss + c["lambda_subgroup_variance"] * terms["subgroup_variance"]
        if "sinkhorn_global" in terms:
            loss = loss + c["lambda_fairness"] * terms["sinkhorn_global"]
        if "sinkhorn_pairwise" in terms:
            loss = loss + c["lambda_pairwise"] * terms["sinkhorn_pairwise"]
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def transform(self, x: torch.Tensor, r: int = 0) -> torch.Tensor:
        """The debiased features x' of run r: (n, D) -> (n, D)."""
        return self.transform_runs(x)[r]

    @torch.no_grad()
    def transform_runs(self, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """The debiased features x' of every run: (n, D) -> (R, n, D)."""
        self.module.eval()
        return torch.cat([self.module.adapter(x[i:i + batch].to(self.device).unsqueeze(0).expand(self.runs, -1, -1))
                          for i in range(0, len(x), batch)], dim=1)

    def evaluation_inputs(self) -> tuple[str, ...]:
        """The per-epoch probe is fitted on the train split: an evaluation of the run's own cache loads it."""
        return ("train",) if self.conf.selection.probe_rows > 0 else ()

    @torch.no_grad()
    def evaluate(self, split: str):
        d = self.data[split]
        x = d.tensors["x"]
        zs = self.transform_runs(x)
        all_race, all_gender = self.module.race_head(zs), self.module.gender_head(zs)
        probing = split != "train" and "train" in self.data and self.conf.selection.probe_rows > 0
        train_z = self.transform_runs(self.data["train"].tensors["x"]) if probing else None
        out = []
        for r in range(self.runs):
            race_logits, gender_logits = all_race[r], all_gender[r]
            cos = F.cosine_similarity(x, zs[r], dim=1)
            metrics = {
                "cos": float(cos.mean()),
                "race_acc": masked_accuracy(race_logits, d.tensors["race"]),
                "gender_acc": masked_accuracy(gender_logits, d.tensors["gender"]),
                "race_bacc": balanced_accuracy(race_logits.argmax(1).cpu(), d.tensors["race"].cpu()),
                "gender_bacc": balanced_accuracy(gender_logits.argmax(1).cpu(), d.tensors["gender"].cpu()),
                "race_ce": float(masked_ce(race_logits[None], d.tensors["race"][None])[0]),
                "gender_ce": float(masked_ce(gender_logits[None], d.tensors["gender"][None])[0]),
            }
            if train_z is not None:  # a fresh probe on this epoch's frozen debiased train features
                metrics.update(self.epoch_probe(train_z[r], zs[r], d, r))
            preds = d.meta[["sample_id", "gender", "race", "subgroup"]].copy()
            preds["race_pred"] = [RACES[i] for i in race_logits.argmax(1).tolist()]
            preds["gender_pred"] = [GENDERS[i] for i in gender_logits.argmax(1).tolist()]
            preds["cos"] = cos.cpu().numpy()
            out.append((metrics, preds))
        return out

    def epoch_probe(self, train_z: torch.Tensor, z: torch.Tensor, d: SplitData, r: int = 0) -> dict:
        """``probe_<attr>_acc`` / ``_bacc``: a standardised logistic regression fitted on (at most
        ``selection.probe_rows`` rows, drawn with run r's seed, of) the debiased train features, scored on ``d``."""
        train, rows = self.data["train"], self.conf.selection.probe_rows
        seed = self.confs[r].training.seed
        out = {}
        for attr in ("race", "gender"):
            clf = fit_probe(train_z.cpu().numpy(), train.tensors[attr].cpu().numpy(), seed=seed, max_rows=rows)
            acc, bacc = probe_scores(clf, z.cpu().numpy(), d.tensors[attr].cpu().numpy())
            out[f"probe_{attr}_acc"], out[f"probe_{attr}_bacc"] = acc, bacc
        return out

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        """Leakage probes: logistic regression trained on train, scored on val (``raw``, ``debiased``:
        accuracy; ``*_bacc``: balanced accuracy) and on test (``*_test``, ``*_test_bacc``), raw vs debiased."""
        train = self.data["train"]
        seed = self.confs[r].training.seed
        splits = [s for s in ("val", "test") if s in self.data]
        feats = {"raw": {s: self.data[s].tensors["x"].cpu().numpy() for s in ("train", *splits)}}
        feats["debiased"] = {s: self.transform(self.data[s].tensors["x"], r).cpu().numpy() for s in ("train", *splits)}
        probe = {}
        for attr, classes in (("race", RACES), ("gender", GENDERS)):
            ytr = train.tensors[attr].cpu().numpy()
            yva = self.data["val"].tensors[attr].cpu().numpy()
            row = {"chance": 1.0 / len(classes)}
            kva = yva >= 0
            row["n"] = int(kva.sum())
            if kva.any():
                row["majority"] = float(pd.Series(yva[kva]).value_counts(normalize=True).iloc[0])
            for name, x in feats.items():
                clf = fit_probe(x["train"], ytr, seed=seed)
                for split in splits:
                    acc, bacc = probe_scores(clf, x[split], self.data[split].tensors[attr].cpu().numpy())
                    key = name if split == "val" else f"{name}_{split}"
                    row[key], row[f"{key}_bacc"] = acc, bacc
            probe[attr] = row
        return {"probe": probe, "remarks": leakage_remarks(probe)}


def leakage_remarks(probe: dict) -> list[str]:
    """A remark for each attribute whose probe reads MORE of it from the debiased features than from
    the raw ones, by more than the probes' noise: the adapter made the leakage it should remove worse.

    The noise is two standard errors of a difference of two accuracies on the row's ``n`` val rows,
    ``2 sqrt(p_raw (1 - p_raw) / n + p_deb (1 - p_deb) / n)`` (both probes score the same rows, so
    the true spread is smaller: the bound errs towards silence); without ``n``, any rise counts.
    The demo's 64 val rows put it at about 0.17: its rise of 1 row in 64 (0.016) is noise."""
    out = []
    for attr, row in probe.items():
        raw, deb = row.get("raw", float("nan")), row.get("debiased", float("nan"))
        if not deb > raw:
            continue
        n = row.get("n")
        noise = 2.0 * math.sqrt((raw * (1 - raw) + deb * (1 - deb)) / n) if n else 0.0
        if deb - raw > noise:
            out.append(f"remark: the {attr} probe reads more from the debiased features ({deb:.3f}) than from "
                       f"the raw ones ({raw:.3f})" + (f", beyond the noise of {n} val rows (±{noise:.3f})" if n else "")
                       + f": this adapter raised the {attr} leakage; try more epochs, a larger adversary weight "
                       f"(loss.lambda_{attr}), or check the run's training curves")
    return out


def fit_probe(xtr, ytr, seed: int = 0, max_rows: int | None = None):
    """The post-hoc probe: ``StandardScaler`` then ``LogisticRegression(max_iter=2000)`` fitted on the
    rows with a known label (``ytr >= 0``), at most ``max_rows`` of them drawn with ``seed``; None
    when fewer than two classes are known."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = np.asarray(xtr), np.asarray(ytr)
    known = np.flatnonzero(ytr >= 0)
    if max_rows and len(known) > max_rows:
        known = np.sort(np.random.default_rng(seed).choice(known, size=int(max_rows), replace=False))
    if len(np.unique(ytr[known])) < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(xtr[known], ytr[known])


def probe_scores(clf, x, y) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of a fitted probe on the rows with a known label (NaN, NaN if
    there is no probe or no such row)."""
    x, y = np.asarray(x), np.asarray(y)
    known = y >= 0
    if clf is None or not known.any():
        return float("nan"), float("nan")
    pred = clf.predict(x[known])
    return float((pred == y[known]).mean()), balanced_accuracy(pred, y[known])


def probe_accuracy(xtr, ytr, xva, yva, seed: int = 0) -> float:
    """Accuracy on val of a standardised logistic regression fitted on train (NaN if impossible)."""
    if len(xva) == 0:
        return float("nan")
    return probe_scores(fit_probe(xtr, ytr, seed=seed), xva, yva)[0]
