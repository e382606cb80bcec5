"""Disentanglement of the Stage-2 detection features from the Stage-1 fair features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_disentanglement(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over the batch of ``cos(a_i, b_i)^2``: 0 when each pair is orthogonal, 1 when parallel.

    Minimising it pushes the Stage-2 detection features ``a`` (B, D) away from (towards orthogonality
    with) the Stage-1 fair features ``b`` (B, D); squaring makes anti-parallel as bad as parallel.
    Typically ``b`` is detached (the fair encoder is frozen in Stage 2). Returns a () tensor, or (R,)
    for stacked runs' (R, B, D) features (the mean over each run's batch).
    """
    return F.cosine_similarity(a, b, dim=-1, eps=eps).pow(2).mean(-1)
