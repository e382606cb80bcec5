"""Prototype objectives of the XAI head: the importance-weighted frame contrastive loss and the EMA update.

Frames h(t) and prototypes p_c are unit vectors.  For an utterance of class y with importance
w(t) in [0, 1]::

    l_t = -log softmax_c(h(t) . p_c / tau)[y]            L = sum_t w(t) l_t / N

with N = 1 (``none``: the design's objective, the plain sum sum_t w(t) l_t), N = sum_t w(t)
(``importance``) or the number of frames T (``frames``), averaged over the utterances of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_contrastive(h: torch.Tensor, prototypes: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                      mask: torch.Tensor, tau: float = 0.07, normalize: str = "importance",
                      eps: float = 1e-6) -> torch.Tensor:
    """Importance-weighted, normalised frame contrastive loss.

    ``h`` (..., B, T, D) unit frames, ``prototypes`` (..., C, D) unit, ``y`` (..., B) class per
    utterance, ``w`` (..., B, T) importance, ``mask`` (..., B, T) true on real (not padded) frames;
    leading dimensions (stacked runs) are kept: returns (...).  ``normalize``: ``none`` keeps each
    utterance's sum (the design's sum_t w(t) l_t), ``importance`` divides it by sum_t w(t) (invariant to
    the level of w), ``frames`` by its number of frames T.
    """
    logits = torch.einsum("...btd,...cd->...btc", h, prototypes) / tau
    target = y[..., None, None].expand(*y.shape, h.shape[-2], 1)
    nll = -F.log_softmax(logits, dim=-1).gather(-1, target).squeeze(-1)
    wm = w * mask
    if normalize == "importance":
        den = wm.sum(-1).clamp_min(eps)
    elif normalize == "frames":
        den = mask.sum(-1).clamp_min(1)
    elif normalize == "none":
        den = 1.0
    else:
        raise ValueError(f"normalize must be none, importance or frames, got {normalize!r}")
    return ((wm * nll).sum(-1) / den).mean(-1)


@torch.no_grad()
def ema_update(prototypes: torch.Tensor, h: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
               mask: torch.Tensor, momentum: float = 0.99) -> torch.Tensor:
    """In place: p_c <- normalize(m p_c + (1 - m) normalize(sum_t a(t) h(t) / sum_t a(t))).

    The sum runs over the batch's frames of class-c utterances with weights ``weights`` (B, T)
    (importance for spoof, 1 for bonafide in the XAI head); a class absent from the batch is kept.
    Stacked runs: prototypes (R, C, D), h (R, B, T, D), y (R, B), weights and mask (R, B, T), each run
    updated from its own batch. No host-device synchronisation.
    """
    single = prototypes.ndim == 2
    p = prototypes.unsqueeze(0) if single else prototypes
    if single:
        h, y, weights, mask = h.unsqueeze(0), y.unsqueeze(0), weights.unsqueeze(0), mask.unsqueeze(0)
    for c in range(p.shape[-2]):
        a = weights * mask * (y == c)[..., None]  # (R, B, T)
        total = a.sum((-1, -2))  # (R,)
        mean = F.normalize((a[..., None] * h).sum((-3, -2)) / total.clamp_min(1e-12)[:, None], dim=-1)
        new = F.normalize(momentum * p[:, c] + (1 - momentum) * mean, dim=-1)
        p[:, c] = torch.where((total > 0)[:, None], new, p[:, c])
    return prototypes
