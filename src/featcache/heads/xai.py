"""The XAI task: a frame-importance network and class prototypes over cached speech frames.

The frozen encoder's frames h(t) (centred on the train frames' mean, unit-normalised) of an utterance go through an importance
network (LayerNorm, linear to ``hidden``, a 1-D convolution over ``kernel`` frames for temporal
context, linear, sigmoid) giving w(t) in [0, 1].  Two prototypes, p_bonafide and p_spoof, live in
the frame space: ``ema`` (initialised at the train class means, then moved by an importance-
weighted EMA of the batch's frames, no gradient), ``fixed`` (the train class means), or
``learnable`` (parameters).  The objective is in ``configs/xai.yaml`` and
:mod:`featcache.losses.prototype`.  Importance mean and std per class are logged every epoch, and
training stops with a message when the importance collapses to all 0 or all 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FeatcacheError
from ..losses.prototype import ema_update, frame_contrastive
from ..metrics.detection import auc, eer
from ..metrics.xai import importance_score, localization_metrics
from ..report.plots import plot_importance
from .task import SplitData, StepState, Task, register_task

CLASSES = ("bonafide", "spoof")
META = ["sample_id", "label", "split", "segments", "identity", "method"]


class ImportanceNet(nn.Module):
    def __init__(self, dim: int, hidden: int = 256, kernel: int = 5, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D), ``mask`` (B, T) -> w (B, T) in [0, 1] (0 on padding)."""
        z = F.gelu(self.inp(self.norm(x))) * mask[..., None]  # padding is zero, as at the edges
        z = F.gelu(self.conv(z.transpose(1, 2)).transpose(1, 2))
        return torch.sigmoid(self.out(self.drop(z)).squeeze(-1)) * mask


class XaiHead(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int, dropout: float, prototype_mode: str,
                 prototypes: torch.Tensor | None = None, center: torch.Tensor | None = None):
        super().__init__()
        self.importance = ImportanceNet(dim, hidden, kernel, dropout)
        # the train frames' mean, removed before normalising: frozen encoders' frames share a large
        # common direction that would otherwise put every frame (and both prototypes) close together
        self.register_buffer("center", center.clone() if center is not None else torch.zeros(dim))
        init = prototypes if prototypes is not None else torch.zeros(len(CLASSES), dim)
        self.prototype_mode = prototype_mode
        if prototype_mode == "learnable":
            self.prototypes = nn.Parameter(init.clone())
        else:
            self.register_buffer("prototypes", init.clone())

    def unit_prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototypes, dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """h(t): the frames, centred and unit-normalised."""
        return F.normalize(x - self.center, dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return self.importance(x, mask), self.embed(x)


def pad_frames(frames: torch.Tensor, offsets: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances ``rows`` of flat ``frames`` as a zero-padded (B, T_max, D) batch and its mask."""
    rows = [int(r) for r in rows]
    lengths = [int(offsets[r + 1] - offsets[r]) for r in rows]
    t_max = max(lengths) if lengths else 0
    x = frames.new_zeros((len(rows), t_max, frames.shape[1]))
    mask = torch.zeros((len(rows), t_max), dtype=frames.dtype, device=frames.device)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        x[i, :n] = frames[int(offsets[r]):int(offsets[r]) + n]
        mask[i, :n] = 1
    return x, mask


@register_task("xai")
class XaiTask(Task):
    cache_kind = "frames"
    detects = False

    meta_columns = META
    summary_keys = ("auc", "eer", "loc_auroc", "loc_ap", "pointing_game", "relevance_mass")

    def __init__(self, cfgs, device, run_dirs=None):
        super().__init__(cfgs, device, run_dirs)
        self.flat: dict[str, dict] = {}
        self._init_prototypes: torch.Tensor | None = None
        self.stop_message: str | None = None

    # -- data ----------------------------------------------------------------------------------
    def read(self, cache):
        return cache.load_frames(None, columns=META)

    def tensors(self, data) -> SplitData:
        self._all = data.arrays  # flat frames of every row; cut per split in load()
        labels = data.meta["label"].to_numpy().astype(np.int64)
        return SplitData({"row": torch.arange(len(data.meta)), "label": torch.from_numpy(labels)}, data.meta)

    def load(self, cache, splits=("train", "val", "test")) -> None:
        super().load(cache, splits)
        off = self._all["offsets"]
        for split in splits:
            rows = self.data[split].tensors["row"].cpu().numpy()
            lengths = off[rows + 1] - off[rows]
            take = np.concatenate([np.arange(off[r], off[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
            self.flat[split] = {
                "frames": torch.from_numpy(self._all["frames"][take]).to(self.device),
                "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
                "frame_labels": self._all["frame_labels"][take],
            }
            self.data[split].tensors["row"] = torch.arange(len(rows), device=self.device)
        del self._all

    def _center(self, split: str) -> torch.Tensor:
        if self.cfg["model"]["center"]:
            return self.flat[split]["frames"].mean(0)
        return torch.zeros(self.flat[split]["frames"].shape[1], device=self.device)

    def class_means(self, split: str = "train") -> torch.Tensor:
        """Unit mean of the unit frames of each class's utterances (the ``fixed`` prototypes)."""
        f = self.flat[split]
        h = F.normalize(f["frames"] - self._center(split), dim=-1)
        lengths = torch.diff(f["offsets"]).to(h.device)
        frame_class = torch.repeat_interleave(self.data[split].tensors["label"].to(h.device), lengths)
        means = []
        for c in range(len(CLASSES)):
            sel = h[frame_class == c]
            means.append(F.normalize(sel.mean(0), dim=0) if len(sel) else torch.zeros(h.shape[1], device=h.device))
        return torch.stack(means)

    # -- model ---------------------------------------------------------------------------------
    def make_spec(self) -> dict:
        m = self.cfg["model"]
        if m["prototype_mode"] not in ("ema", "fixed", "learnable"):
            raise FeatcacheError(f"model.prototype_mode must be ema, fixed or learnable, got {m['prototype_mode']!r}")
        labels = self.data["train"].tensors["label"]
        if not ((labels == 0).any() and (labels == 1).any()):
            raise FeatcacheError("the train split needs bonafide (label 0) and spoof (label 1) utterances")
        self._init_prototypes = self.class_means("train").cpu()
        self._init_center = self._center("train").cpu()
        return {"dim": int(self.flat["train"]["frames"].shape[1]), "hidden": int(m["hidden"]),
                "kernel": int(m["kernel"]), "dropout": float(m["dropout"]),
                "prototype_mode": m["prototype_mode"], "backbone": self.backbone}

    def build(self, spec: dict) -> nn.Module:
        return XaiHead(spec["dim"], spec["hidden"], spec["kernel"], spec["dropout"], spec["prototype_mode"],
                       self._init_prototypes, getattr(self, "_init_center", None))

    # -- training ------------------------------------------------------------------------------
    def batch_loss(self, batch, state: StepState):
        c = self.cfg["loss"]
        batch = {k: v[0] for k, v in batch.items()}  # R = 1
        f = self.flat["train"]
        x, mask = pad_frames(f["frames"], f["offsets"], batch["row"].tolist())
        y = batch["label"].to(self.device)
        w, h = self.module(x, mask)
        protos = self.module.unit_prototypes()
        norm = c["normalize"]
        terms = {"contrastive": frame_contrastive(h, protos, y, w, mask, float(c["tau"]), norm)}
        if c["lambda_complement"] > 0:  # the frames left unimportant should look bonafide
            terms["complement"] = frame_contrastive(h, protos, torch.zeros_like(y), 1 - w, mask, float(c["tau"]), norm)
        bona, spoof = mask * (y == 0)[:, None], mask * (y == 1)[:, None]
        terms["bonafide_low"] = (w * bona).sum() / bona.sum().clamp_min(1)
        pair = mask[:, 1:] * mask[:, :-1]
        terms["smooth"] = (((w[:, 1:] - w[:, :-1]) ** 2) * pair).sum() / pair.sum().clamp_min(1)
        terms["sparsity"] = (w * spoof).sum() / spoof.sum().clamp_min(1)
        loss = (terms["contrastive"] + c["lambda_bonafide"] * terms["bonafide_low"]
                + c["lambda_smooth"] * terms["smooth"] + c["lambda_sparsity"] * terms["sparsity"])
        if "complement" in terms:
            loss = loss + c["lambda_complement"] * terms["complement"]
        if self.module.prototype_mode == "ema":
            weights = torch.where((y == 1)[:, None], w.detach(), torch.ones_like(w))
            ema_update(self.module.prototypes.data, h.detach(), y, weights, mask,
                       float(self.cfg["model"]["momentum"]))
        return loss.reshape(1), {k: v.detach().reshape(1) for k, v in terms.items()}

    @torch.no_grad()
    def importances(self, split: str, batch: int = 64) -> list[np.ndarray]:
        """w(t) of every utterance of ``split``, in row order."""
        self.module.eval()
        f = self.flat[split]
        n = len(f["offsets"]) - 1
        out = []
        for start in range(0, n, batch):
            rows = list(range(start, min(n, start + batch)))
            x, mask = pad_frames(f["frames"], f["offsets"], rows)
            w, _ = self.module(x, mask)
            w = w.cpu().numpy()
            out.extend(w[i, :int(f["offsets"][r + 1] - f["offsets"][r])] for i, r in enumerate(rows))
        return out

    def importance_stats(self, split: str = "train") -> dict:
        ws = self.importances(split)
        labels = self.data[split].tensors["label"].cpu().numpy()
        stats = {}
        for c, name in enumerate(CLASSES):
            sel = [w for w, lab in zip(ws, labels) if lab == c]
            v = np.concatenate(sel) if sel else np.zeros(0)
            stats[f"w_mean_{name}"] = float(v.mean()) if len(v) else float("nan")
            stats[f"w_std_{name}"] = float(v.std()) if len(v) else float("nan")
        allw = np.concatenate(ws) if ws else np.zeros(0)
        stats["w_mean"], stats["w_std"] = float(allw.mean()), float(allw.std())
        stats["w_max"], stats["w_min"] = float(allw.max()), float(allw.min())
        return stats

    def epoch_values(self, state: StepState) -> dict:
        stats = self.importance_stats("train")
        self.stop_message = collapse_message(stats, float(self.cfg["loss"]["collapse_tol"]), state.epoch)
        return {k: v for k, v in stats.items() if k.startswith("w_mean") or k.startswith("w_std")}

    def stop_reason(self, row: dict, r: int = 0) -> str | None:
        return self.stop_message

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str):
        d = self.data[split]
        ws = self.importances(split)
        labels = d.tensors["label"].cpu().numpy()
        f = self.flat[split]
        off = f["offsets"].numpy()
        fl = [f["frame_labels"][off[i]:off[i + 1]] for i in range(len(ws))]
        scores = np.array([importance_score(w) for w in ws])
        metrics = {"auc": auc(labels, scores) if len(np.unique(labels)) == 2 else float("nan"),
                   "eer": eer(labels, scores) if len(np.unique(labels)) == 2 else float("nan"),
                   **localization_metrics(ws, fl, labels)}
        preds = d.meta[["sample_id", "label", "segments", "method"]].copy()
        preds["score"] = scores
        preds["frames"] = [len(w) for w in ws]
        preds["w_mean"] = [float(w.mean()) if len(w) else float("nan") for w in ws]
        preds["top_second"] = [float((np.argmax(w) * 320 + 200) / 16000) if len(w) else float("nan") for w in ws]
        self._last_eval = (split, ws, fl)
        return [(metrics, preds)]

    def write_plots(self, out: Path, split: str, title: str, count: int = 6) -> list[str]:
        """Importance over time with the true spoofed intervals shaded, for a few spoofed utterances."""
        if getattr(self, "_last_eval", (None,))[0] != split:
            self.evaluate(split)
        _, ws, _ = self._last_eval
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
        for split in ("val", "test"):
            self.write_plots(run_dir / "eval" / split / "plots", split, f"{run_dir.name}, {split}")
        return {"importance": self.importance_stats("train"), "stopped": self.stop_message}


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
