"""Building blocks of the trainable heads.

Every block works on features of any width ``dim`` (read from the cache, never hard-coded), on any
device and dtype, batched along the first dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -- gradient reversal (DANN) ------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambd`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float | Tensor) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * (-ctx.lambd), None


def grad_reverse(x: Tensor, lambd: float | Tensor = 1.0) -> Tensor:
    """Gradient reversal layer: ``x`` unchanged forward, gradient times ``-lambd`` backward.

    Put it between a feature and an adversary (e.g. a race or gender :class:`MLPHead`): the adversary
    learns to predict the attribute while the features upstream learn to remove it.
    """
    return GradientReversal.apply(x, lambd)


class GradReverse(nn.Module):
    """Module form of :func:`grad_reverse`; set ``.lambd`` during training (e.g. from :func:`dann_lambda`)."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


def dann_lambda(p: float, max_lambda: float = 1.0, gamma: float = 10.0) -> float:
    """DANN schedule of the reversal strength: ``max_lambda * (2 / (1 + exp(-gamma p)) - 1)``.

    ``p`` is the training progress in [0, 1] (e.g. step / total steps): 0 at the start, rising to
    ``max_lambda`` (about 0.9999 of it at p = 1 with gamma = 10).
    """
    return max_lambda * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


# -- MLPs --------------------------------------------------------------------------------------


def _mlp(dim: int, hidden: Sequence[int], out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


class ResidualAdapter(nn.Module):
    """Residual bottleneck adapter: ``x + adapter(x)``, adapter = D -> hidden -> hidden -> D.

    adapter = LayerNorm(D) -> Linear(D, hidden) -> GELU -> Dropout -> Linear(hidden, hidden) -> GELU ->
    Dropout -> Linear(hidden, D). The input LayerNorm (pre-norm, as in transformer blocks) makes the
    adapter indifferent to the scale of the cached features; the residual path carries ``x`` as is.

    The last Linear is initialised to zeros (weight and bias), so at initialisation the adapter is
    exactly the identity: training starts from the frozen backbone's features and moves away only as
    far as the loss asks. (The zero layer still receives gradient, so the adapter does train.)
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = _mlp(dim, (hidden, hidden), dim, dropout)
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return x + self.net(self.norm(x))


class MLPHead(nn.Module):
    """Small classifier ``dim -> hidden -> n_classes`` (GELU, dropout): the race (4-way) and gender
    (2-way) adversaries. ``hidden`` may be a sequence of widths for several hidden layers.
    Returns logits (..., n_classes)."""

    def __init__(self, dim: int, hidden: int | Sequence[int], n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        self.net = _mlp(dim, hidden, n_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BinaryClassifier(nn.Module):
    """Real/fake classifier ``dim -> 384 -> 192 -> 2`` logits (GELU, dropout); index 1 is fake.

    The detection score of the metrics is ``logits[:, 1] - logits[:, 0]`` (sigmoid of it is the
    softmax probability of fake).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (384, 192), dropout: float = 0.1) -> None:
        super().__init__()
        self.net = _mlp(dim, tuple(hidden), 2, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CosineClassifier(nn.Module):
    """Cosine logits ``<x / |x|, w_k / |w_k|>`` in [-1, 1], one weight row per class (for LDAM).

    No bias and no scale: :class:`featcache.losses.LDAMLoss` subtracts the margins and scales by ``s``.
    """

    def __init__(self, dim: int, n_classes: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., n_classes) cosine logits."""
        return F.normalize(x, dim=-1, eps=self.eps) @ F.normalize(self.weight, dim=-1, eps=self.eps).t()


# -- conditioning and fusion -------------------------------------------------------------------


class AdaIN(nn.Module):
    """Adaptive instance normalisation of a feature ``x`` conditioned on ``cond``.

    ``out = gamma(cond) * (x - mean(x)) / (std(x) + eps) + beta(cond)``, where the mean and the
    (biased, i.e. population) standard deviation are taken over the feature dimension of each sample,
    and ``gamma``, ``beta`` are ``Linear(cond_dim -> dim)``.

    "Initialised to identity" means an identity affine: both Linears have zero weights, ``gamma``'s
    bias is 1 and ``beta``'s bias is 0, so at initialisation ``out`` is the plain normalisation of
    ``x`` (whatever ``cond``), and the conditioning grows in with training.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Linear(cond_dim, dim)
        self.beta = nn.Linear(cond_dim, dim)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)
        self.eps = eps

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (..., dim), cond (..., cond_dim) with the same leading dimensions -> (..., dim)."""
        mean = x.mean(-1, keepdim=True)
        # clamp: a constant row gives std 0 without a NaN gradient from sqrt at 0
        std = x.var(-1, unbiased=False, keepdim=True).clamp_min(1e-12).sqrt()
        return self.gamma(cond) * (x - mean) / (std + self.eps) + self.beta(cond)


class MultiViewCrossAttention(nn.Module):
    """Cross-attention of the detection feature over V views of the fair feature.

    The fair feature (B, cond_dim) is projected by ``Linear(cond_dim -> V * dim)`` into V views
    (B, V, dim), the keys and values; the detection feature (B, dim) is the single query of an
    ``nn.MultiheadAttention(dim, heads, batch_first=True)``.

    ``forward(x, cond)`` returns ``(out, weights)``: the attention output (B, dim) (no residual: the
    caller fuses it, e.g. with :class:`GatedFusion`) and the attention weights (B, V) averaged over
    heads (each row sums to 1).

    Contract for turning it off: with ``n_views=0`` the module has no parameters, ``enabled`` is
    False and ``forward`` returns ``(None, None)``; the Stage-2 model then uses AdaIN only (no gate).
    """

    def __init__(self, dim: int, cond_dim: int, n_views: int = 4, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if n_views < 0:
            raise ValueError(f"n_views must be >= 0, got {n_views}")
        self.dim, self.cond_dim, self.n_views, self.heads = dim, cond_dim, n_views, heads
        self.enabled = n_views > 0
        if self.enabled:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
            self.views = nn.Linear(cond_dim, n_views * dim)
            self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cond_dim={self.cond_dim}, n_views={self.n_views}, heads={self.heads}"

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """x (B, dim) the query, cond (B, cond_dim) -> (out (B, dim), weights (B, V)), or (None, None)."""
        if not self.enabled:
            return None, None
        kv = self.views(cond).reshape(*cond.shape[:-1], self.n_views, self.dim)  # (B, V, dim)
        out, w = self.attn(x.unsqueeze(-2), kv, kv, need_weights=True, average_attn_weights=True)
        return out.squeeze(-2), w.squeeze(-2)


class GatedFusion(nn.Module):
    """Per-dimension gate between two features: ``gate = sigmoid(W [a; b] + bias)``,
    ``out = gate * a + (1 - gate) * b``; returns ``(out, gate)``, both (..., dim).

    The bias starts at 0, so the gate starts near 0.5 (an even mix) for features of moderate size.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.proj.bias)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.proj(torch.cat([a, b], dim=-1)))
        return gate * a + (1.0 - gate) * b, gate
