"""The XAI task: a frame-importance network and class prototypes over cached speech frames.

The frozen encoder's frames h(t) (centred on the train frames' mean unless ``model.center`` is false, then unit-normalised) of an utterance go through an importance
network (LayerNorm, linear to ``hidden``, a 1-D convolution over ``kernel`` frames for temporal
context, linear, sigmoid) giving w(t) in [0, 1].  Two prototypes, p_bonafide and p_spoof, live in
the frame space: ``ema`` (initialised at the train class means, then moved by an importance-
weighted EMA of the batch's frames, no gradient), ``fixed`` (the train class means), or
``learnable`` (parameters).  The objective is in ``configs/xai.yaml`` and
:mod:`featcache.losses.prototype`.  Importance mean and std per class are logged every epoch, and
training stops with a message when the importance collapses to all 0 or all 1.

The utterance score is the mean z of the top 10 % of an utterance's importance logits (before the
sigmoid), mapped into (0, 1) by the Cauchy CDF 1/2 + arctan(z)/pi: the objective is linear in w, the logits grow without bound (to +-40 in 15 epochs on
``synth audio``), and from a logit of about 17 on float32's sigmoid is exactly 1.0, so a score read
from w becomes the same 1.0 for every utterance (the demo's AUC of exactly 0.500 from epoch 8 on).
w itself is computed in float64 from the logits for the maps and the localisation metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FeatcacheError
from ..losses.prototype import ema_update, frame_contrastive
from ..metrics.detection import auc, eer, eer_asvspoof
from ..metrics.xai import importance_score, localization_metrics
from ..report.plots import plot_importance
from .blocks import RunRNG, StackedDropout, StackedLayerNorm, StackedLinear, run_generators
from .task import SplitData, StepState, Task, register_task

CLASSES = ("bonafide", "spoof")
META = ["sample_id", "label", "split", "segments", "identity", "method"]


class ImportanceNet(nn.Module):
    """R stacked importance networks: LayerNorm, Linear(D, hidden), GELU, Conv1d(hidden, hidden, kernel)
    over time (one grouped convolution for all runs), GELU, dropout, Linear(hidden, 1)."""

    def __init__(self, seeds: list[int], dim: int, hidden: int = 256, kernel: int = 5, dropout: float = 0.1,
                 rng: RunRNG | None = None):
        super().__init__()
        runs, gens = len(seeds), run_generators(seeds)
        self.norm = StackedLayerNorm(runs, dim)
        self.inp = StackedLinear(runs, dim, hidden, gens)
        bound = 1.0 / math.sqrt(hidden * kernel)  # nn.Conv1d's default initialisation
        self.conv_weight = nn.Parameter(torch.stack([torch.empty(hidden, hidden, kernel).uniform_(-bound, bound, generator=g)
                                                     for g in gens]))
        self.conv_bias = nn.Parameter(torch.stack([torch.empty(hidden).uniform_(-bound, bound, generator=g)
                                                   for g in gens]))
        self.kernel = kernel
        self.drop = StackedDropout(dropout, rng)
        self.out = StackedLinear(runs, hidden, 1, gens)

    def logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (R, B, T, D), ``mask`` (R, B, T) -> the importance logits (R, B, T)."""
        r, b, t, _ = x.shape
        h = self.conv_weight.shape[1]
        z = F.gelu(self.inp(self.norm(x))) * mask[..., None]  # padding is zero, as at the edges
        z = z.permute(1, 0, 3, 2).reshape(b, r * h, t)
        z = F.conv1d(z, self.conv_weight.reshape(r * h, h, self.kernel), self.conv_bias.reshape(r * h),
                     padding=self.kernel // 2, groups=r)
        z = F.gelu(z.reshape(b, r, h, t).permute(1, 0, 3, 2))
        return self.out(self.drop(z)).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """w (R, B, T) in [0, 1] (0 on padding)."""
        return torch.sigmoid(self.logits(x, mask)) * mask


class XaiHead(nn.Module):
    def __init__(self, seeds: list[int], dim: int, hidden: int, kernel: int, dropout: float, prototype_mode: str,
                 prototypes: torch.Tensor | None = None, center: torch.Tensor | None = None):
        super().__init__()
        runs = len(seeds)
        self.rng = RunRNG(seeds)
        self.importance = ImportanceNet(seeds, dim, hidden, kernel, dropout, self.rng)
        # the train frames' mean, removed before normalising: frozen encoders' frames share a large
        # common direction that would otherwise put every frame (and both prototypes) close together
        c = center if center is not None else torch.zeros(dim)
        self.register_buffer("center", c.reshape(1, dim).expand(runs, dim).clone())
        init = prototypes if prototypes is not None else torch.zeros(len(CLASSES), dim)
        init = init.reshape(1, len(CLASSES), dim).expand(runs, -1, -1).clone()
        self.prototype_mode = prototype_mode
        if prototype_mode == "learnable":
            self.prototypes = nn.Parameter(init)
        else:
            self.register_buffer("prototypes", init)

    def unit_prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototypes, dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """h(t): the frames, centred and unit-normalised: (R, B, T, D)."""
        return F.normalize(x - self.center[:, None, None, :], dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return self.importance(x, mask), self.embed(x)


def frame_table(offsets: torch.Tensor) -> torch.Tensor:
    """(n, T_max) index of each utterance's frames in the flat frames, -1 after its end."""
    lengths = torch.diff(offsets)
    t_max = int(lengths.max()) if len(lengths) else 0
    t = torch.arange(t_max)
    return torch.where(t[None, :] < lengths[:, None], offsets[:-1, None] + t[None, :], torch.full((1,), -1))


def gather_frames(frames: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances ``rows`` (any shape S) as zero-padded frames (*S, T_max, D) and a mask (*S, T_max),
    by gathering (no host-device synchronisation)."""
    idx = table[rows]
    mask = (idx >= 0).to(frames.dtype)
    return frames[idx.clamp(min=0)] * mask[..., None], mask


@register_task("xai")
class XaiTask(Task):
    ablation_axes = ("test_loc_auroc", "test_auc")
    cache_kind = "frames"
    detects = False
    max_runs = 64
    meta_columns = META
    cli_options = {"prototype_mode": ("model.prototype_mode", "prototypes: ema (momentum, no gradient), fixed "
                                      "(train class means) or learnable [ema]")}
    # XAI's per-run coefficients: the regularisers' weights of xai.yaml
    coefficient_keys = ("lambda_bonafide", "lambda_smooth", "lambda_sparsity", "lambda_complement")
    summary_keys = ("auc", "eer", "loc_auroc", "loc_ap", "pointing_game", "relevance_mass")

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        self.flat: dict = {}
        self._init_prototypes: torch.Tensor | None = None
        self._init_center: torch.Tensor | None = None  # the train frames' mean (model.center)
        self._stats_epoch: int | None = None  # the epoch whose train importance stats are cached
        self._last_eval: tuple = (None, None, None)  # (split, per-run weights, flat frames) of the last evaluate
        self.stop_messages: list[str | None] = [None] * self.runs

    # -- data ----------------------------------------------------------------------------------
    def read(self, cache):
        return cache.load_frames(None, columns=META)

    def tensors(self, data) -> SplitData:
        offsets = torch.from_numpy(data.arrays["offsets"])
        self.flat = {"frames": torch.from_numpy(data.arrays["frames"]).to(self.device), "offsets": offsets,
                     "frame_labels": data.arrays["frame_labels"], "table": frame_table(offsets).to(self.device)}
        meta = data.meta
        labels = meta["label"].to_numpy().astype(np.int64)
        return SplitData({"row": torch.arange(len(meta)), "label": torch.from_numpy(labels)}, meta)

    def split_rows(self, split: str) -> np.ndarray:
        return self.data[split].tensors["row"].cpu().numpy()

    def _split_frames(self, split: str) -> torch.Tensor:
        off = self.flat["offsets"].numpy()
        idx = np.concatenate([np.arange(off[r], off[r + 1]) for r in self.split_rows(split)] or [np.zeros(0, int)])
        return self.flat["frames"][torch.from_numpy(idx).to(self.device)]

    def _center(self, split: str) -> torch.Tensor:
        frames = self._split_frames(split)
        if self.conf.model.center:
            return frames.mean(0)
        return torch.zeros(frames.shape[1], device=self.device)

    def class_means(self, split: str = "train") -> torch.Tensor:
        """Unit mean of the unit frames of each class's utterances (the ``fixed`` prototypes)."""
        h = F.normalize(self._split_frames(split) - self._center(split), dim=-1)
        off = self.flat["offsets"]
        lengths = torch.diff(off)[torch.from_numpy(self.split_rows(split))].to(h.device)
        frame_class = torch.repeat_interleave(self.data[split].tensors["label"].to(h.device), lengths)
        means = []
        for c in range(len(CLASSES)):
            sel = h[frame_class == c]
            means.append(F.normalize(sel.mean(0), dim=0) if len(sel) else torch.zeros(h.shape[1], device=h.device))
        return torch.stack(means)

    # -- model ---------------------------------------------------------------------------------
    def make_spec(self) -> dict:
        m = self.conf.model  # prototype_mode and loss.normalize: declared constraints of xai.yaml
        labels = self.data["train"].tensors["label"]
        if not ((labels == 0).any() and (labels == 1).any()):
            raise FeatcacheError("the train split needs bonafide (label 0) and spoof (label 1) utterances")
        self._init_prototypes = self.class_means("train").cpu()
        self._init_center = self._center("train").cpu()
        return {"dim": int(self.flat["frames"].shape[1]), "hidden": m.hidden, "kernel": m.kernel,
                "dropout": m.dropout, "prototype_mode": m.prototype_mode, "backbone": self.backbone}

    def build(self, spec: dict) -> nn.Module:
        return XaiHead(self.seeds(), spec["dim"], spec["hidden"], spec["kernel"], spec["dropout"],
                       spec["prototype_mode"], self._init_prototypes, self._init_center)

    # -- training ------------------------------------------------------------------------------
    def batch_loss(self, batch, state: StepState):
        c, co = self.conf.loss, self.coefficients()
        x, mask = gather_frames(self.flat["frames"], self.flat["table"], batch["row"].to(self.device))
        y = batch["label"].to(self.device)
        w, h = self.module(x, mask)
        protos = self.module.unit_prototypes()
        norm, tau = c.normalize, c.tau
        terms = {"contrastive": frame_contrastive(h, protos, y, w, mask, tau, norm)}
        if any(conf.loss.lambda_complement > 0 for conf in self.confs):
            # the frames left unimportant should look bonafide
            terms["complement"] = frame_contrastive(h, protos, torch.zeros_like(y), 1 - w, mask, tau, norm)
        bona, spoof = mask * (y == 0)[..., None], mask * (y == 1)[..., None]
        terms["bonafide_low"] = (w * bona).sum((-1, -2)) / bona.sum((-1, -2)).clamp_min(1)
        pair = mask[..., 1:] * mask[..., :-1]
        terms["smooth"] = (((w[..., 1:] - w[..., :-1]) ** 2) * pair).sum((-1, -2)) / pair.sum((-1, -2)).clamp_min(1)
        terms["sparsity"] = (w * spoof).sum((-1, -2)) / spoof.sum((-1, -2)).clamp_min(1)
        loss = (terms["contrastive"] + co["lambda_bonafide"] * terms["bonafide_low"]
                + co["lambda_smooth"] * terms["smooth"] + co["lambda_sparsity"] * terms["sparsity"])
        if "complement" in terms:
            loss = loss + co["lambda_complement"] * terms["complement"]
        if self.module.prototype_mode == "ema":
            weights = torch.where((y == 1)[..., None], w.detach(), torch.ones_like(w))
            ema_update(self.module.prototypes.data, h.detach(), y, weights, mask, self.conf.model.momentum)
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def importance_logits(self, split: str, batch: int = 64) -> list[list[np.ndarray]]:
        """The importance logits (before the sigmoid) of every utterance of ``split``, in row order, for
        each run: [run][utterance] float64 arrays."""
        self.module.eval()
        rows = self.data[split].tensors["row"].to(self.device)
        lengths = torch.diff(self.flat["offsets"])[rows.cpu()].tolist()
        out: list[list[np.ndarray]] = [[] for _ in range(self.runs)]
        for start in range(0, len(rows), batch):
            x, mask = gather_frames(self.flat["frames"], self.flat["table"], rows[start:start + batch])
            lg = self.module.importance.logits(x.unsqueeze(0).expand(self.runs, *x.shape),
                                               mask.unsqueeze(0).expand(self.runs, *mask.shape))
            lg = lg.double().cpu().numpy()
            for r in range(self.runs):
                out[r].extend(lg[r, i, :n] for i, n in enumerate(lengths[start:start + batch]))
        return out

    def importances(self, split: str, logits: list[list[np.ndarray]] | None = None) -> list[list[np.ndarray]]:
        """w(t) of every utterance of ``split``, in row order, for each run: [run][utterance], computed
        in float64 from the logits (float32's sigmoid is exactly 1.0 from a logit of about 17 on)."""
        logits = self.importance_logits(split) if logits is None else logits
        return [[1.0 / (1.0 + np.exp(-lg)) for lg in run] for run in logits]

    def importance_stats(self, split: str = "train", ws: list[list[np.ndarray]] | None = None) -> list[dict]:
        """Mean and std of w per class, and its range, for each run."""
        ws = self.importances(split) if ws is None else ws
        labels = self.data[split].tensors["label"].cpu().numpy()
        out = []
        for run in ws:
            stats = {}
            for c, name in enumerate(CLASSES):
                sel = [w for w, lab in zip(run, labels) if lab == c]
                v = np.concatenate(sel) if sel else np.zeros(0)
                stats[f"w_mean_{name}"] = float(v.mean()) if len(v) else float("nan")
                stats[f"w_std_{name}"] = float(v.std()) if len(v) else float("nan")
            allw = np.concatenate(run) if run else np.zeros(0)
            stats["w_mean"], stats["w_std"] = float(allw.mean()), float(allw.std())
            stats["w_max"], stats["w_min"] = float(allw.max()), float(allw.min())
            out.append(stats)
        return out

    def stop_reason(self, row: dict, r: int) -> str | None:
        """Stop run r when its train importances collapsed to all 0 or all 1 (checked once an epoch)."""
        epoch = int(row.get("epoch", 0))
        if self._stats_epoch != epoch:
            self._train_stats, self._stats_epoch = self.importance_stats("train"), epoch
            tol = self.conf.loss.collapse_tol
            self.stop_messages = [collapse_message(st, tol, epoch) for st in self._train_stats]
        return self.stop_messages[r]

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str):
        d = self.data[split]
        logits_runs = self.importance_logits(split)
        ws_runs = self.importances(split, logits_runs)
        labels = d.tensors["label"].cpu().numpy()
        off = self.flat["offsets"].numpy()
        fl = [self.flat["frame_labels"][off[i]:off[i + 1]] for i in self.split_rows(split)]
        stats = self.importance_stats(split, ws_runs)
        results = []
        for r, ws in enumerate(ws_runs):
            # The utterance score is read from the logits: the objective is linear in w, so training
            # (Adam's steps do not shrink with the gradient) drives the logits to +-40 and beyond,
            # where w itself is exactly 1.0 on the top frames of every utterance and a score read
            # from w is a constant (AUC 0.500). The logits keep the ranking.
            # The score in (0, 1) the metrics take: the Cauchy CDF 1/2 + arctan(z)/pi of the mean top-10 %
            # logit z, strictly increasing and far from saturating in float64 (unlike the sigmoid).
            logit_scores = np.array([importance_score(lg) for lg in logits_runs[r]])
            scores = 0.5 + np.arctan(logit_scores) / np.pi
            both = len(np.unique(labels)) == 2
            metrics = {"auc": auc(labels, scores) if both else float("nan"),
                       "eer": eer(labels, scores) if both else float("nan"),
                       # the ASVspoof challenges' EER (nearest operating point, averaged), beside featcache's
                       "eer_asvspoof": eer_asvspoof(labels, scores) if both else float("nan"),
                       **localization_metrics(ws, fl, labels),
                       **{k: v for k, v in stats[r].items() if k.startswith(("w_mean", "w_std"))}}
            preds = d.meta[["sample_id", "label", "segments", "method"]].copy()
            preds["score"] = scores
            preds["prob"] = scores  # the utterance score in (0, 1): what the AUC, EER and their intervals rank
            preds["score_logit"] = logit_scores
            preds["frames"] = [len(w) for w in ws]
            preds["w_mean"] = [float(w.mean()) if len(w) else float("nan") for w in ws]
            preds["top_second"] = [float((np.argmax(w) * 320 + 200) / 16000) if len(w) else float("nan") for w in ws]
            results.append((metrics, preds))
        self._last_eval = (split, ws_runs, fl)
        return results

    def write_plots(self, out: Path, split: str, title: str, count: int = 6, r: int = 0) -> list[str]:
        """Importance over time with the true spoofed intervals shaded, for a few spoofed utterances."""
        if self._last_eval[0] != split:
            self.evaluate(split)
        ws = self._last_eval[1][r]
        meta = self.data[split].meta
        spoofed = [i for i in range(len(ws)) if int(meta["label"].iloc[i]) == 1]
        partial = [i for i in spoofed if meta["method"].iloc[i] != "A01"] or spoofed
        pick = (partial + [i for i in spoofed if i not in partial])[:count]
        if not pick:
            return []
        out.mkdir(parents=True, exist_ok=True)
        plot_importance([ws[i] for i in pick], [meta["segments"].iloc[i] for i in pick],
                        [meta["sample_id"].iloc[i] for i in pick], out / "importance.png")
        return ["importance.png"]

    def finish(self, run_dir: Path, r: int = 0) -> dict:
        # the importance plots are the evaluation's (write_plots, through write_task_evaluation)
        return {"importance": self.importance_stats("train")[r], "stopped": self.stop_messages[r]}


def collapse_message(stats: dict, tol: float, epoch: int) -> str | None:
    """A message when every train frame's importance is within ``tol`` of 0 (or of 1)."""
    if stats["w_max"] < tol:
        side = "0"
    elif stats["w_min"] > 1 - tol:
        side = "1"
    else:
        return None
    return (f"importance collapsed to {side} at epoch {epoch} (train frames: mean {stats['w_mean']:.4f}, "
            f"std {stats['w_std']:.4f}, range {stats['w_min']:.4f}..{stats['w_max']:.4f}); training stopped. "
            + ("The regularisers outweigh the contrastive term: lower loss.lambda_sparsity or loss.lambda_bonafide"
               if side == "0" else "Raise loss.lambda_sparsity or loss.lambda_bonafide"))
