"""LDAM: label-distribution-aware margin loss (Cao et al., NeurIPS 2019) on cosine logits.

The margin of class k is the Stage-2 design's formula ``m_k = max_margin / n_k^(1/4)`` (rule ``literal``,
the default: C = max_margin = 0.5 gives 0.038 to 0.087 on FF++'s subgroup counts).  Rule ``normalized``
is the LDAM paper's reference code, ``m_k = max_margin * n_k^(-1/4) / max_j n_j^(-1/4)``: the rarest class
gets ``max_margin`` itself (the same ratios between classes, all larger by the factor ``min_j n_j^(1/4)``,
5.8 on FF++'s counts). The loss subtracts ``m_y`` from the logit of the target
class, scales all logits by ``s`` and takes the cross-entropy. The logits are cosine similarities in
[-1, 1] (see :class:`featcache.heads.blocks.CosineClassifier`), which is why a scale ``s`` (30) is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MARGIN_RULES = ("literal", "normalized")


def ldam_margins(counts: Tensor | Sequence[float], max_margin: float = 0.5, rule: str = "literal") -> Tensor:
    """Per-class LDAM margins: ``literal`` (the design's) ``m_k = max_margin / n_k^(1/4)``, or
    ``normalized`` ``m_k = max_margin * n_k^(-1/4) / max_j n_j^(-1/4)``.

    Args:
        counts: (K,) number of training samples of each class. A count of 0 is treated as 1 (a class
            absent from training gets the largest margin, ``max_margin``, instead of an infinity).
        max_margin: the numerator C (``literal``), the margin of the rarest class (``normalized``).
        rule: ``literal`` or ``normalized``.

    Returns:
        (K,) float tensor (float32 unless ``counts`` is a floating tensor), on the device of ``counts``.
    """
    c = torch.as_tensor(counts)
    if not c.is_floating_point():
        c = c.to(torch.float32)
    if c.ndim != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
    if bool((c < 0).any()):
        raise ValueError("class counts must be non-negative")
    if rule not in MARGIN_RULES:
        raise ValueError(f"the LDAM margin rule must be literal or normalized, got {rule!r}")
    m = c.clamp(min=1.0).pow(-0.25)
    return max_margin * m / m.max() if rule == "normalized" else max_margin * m


class LDAMLoss(nn.Module):
    """Cross-entropy of ``s * (z - m_y * onehot(y))`` on cosine logits ``z``.

    Args:
        counts: (K,) training samples per class (see :func:`ldam_margins`).
        max_margin: the numerator C of the margins (``literal``), or the rarest class's margin (``normalized``).
        s: logit scale.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, e.g. for CVaR).
        rule: ``literal`` (the design's) or ``normalized`` (see :func:`ldam_margins`).

    The margins are a registered buffer (``self.margins``): they move with ``.to(device)`` and are
    saved in the state dict.
    """

    margins: Tensor

    def __init__(self, counts: Tensor | Sequence[float], max_margin: float = 0.5, s: float = 30.0,
                 reduction: str = "mean", rule: str = "literal") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.register_buffer("margins", ldam_margins(counts, max_margin, rule).to(torch.float32))
        self.max_margin = float(max_margin)
        self.s = float(s)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits``: (..., K) cosine logits; ``target``: (...) class indices. Returns the loss."""
        target = target.long()
        m = self.margins.to(dtype=logits.dtype, device=logits.device)[target]  # (B,)
        shifted = logits - F.one_hot(target, logits.shape[-1]).to(logits.dtype) * m.unsqueeze(-1)
        per = F.cross_entropy((self.s * shifted).reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        per = per.reshape(target.shape)
        return per if self.reduction == "none" else per.sum() if self.reduction == "sum" else per.mean()

    def masked(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-run mean over the rows with a known target (>= 0): logits (R, B, K), target (R, B) -> (R,);
        0 for a run without one. No boolean indexing (no host-device synchronisation)."""
        known = target >= 0
        t = target.clamp(min=0).long()
        m = self.margins.to(dtype=logits.dtype, device=logits.device)[t]
        shifted = logits - F.one_hot(t, logits.shape[-1]).to(logits.dtype) * m.unsqueeze(-1)
        per = F.cross_entropy((self.s * shifted).reshape(-1, logits.shape[-1]), t.reshape(-1),
                              reduction="none").reshape(t.shape)
        return (per * known).sum(-1) / known.sum(-1).clamp(min=1)

    def extra_repr(self) -> str:
        return f"n_classes={self.margins.numel()}, max_margin={self.max_margin}, s={self.s}, reduction={self.reduction!r}"
