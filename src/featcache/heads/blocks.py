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

    Put it between a feature and an adversary (a race or gender classifier): the adversary learns to
    predict the attribute while the features upstream learn to remove it.
    """
    return GradientReversal.apply(x, lambd)


def dann_lambda(p: float, max_lambda: float = 1.0, gamma: float = 10.0, initial: float = 0.0) -> float:
    """DANN schedule of the reversal strength: ``initial + (max_lambda - initial) * (2 / (1 + exp(-gamma p)) - 1)``.

    ``p`` is the training progress in [0, 1] (e.g. step / total steps): ``initial`` at the start
    (the design's ``initial_lambda_grl``, 0 by default: DANN's own ``max_lambda * (2 / (1 +
    exp(-gamma p)) - 1)``), rising to ``max_lambda`` (about 0.9999 of the way at p = 1 with gamma = 10).
    """
    return initial + (max_lambda - initial) * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


# -- stacked blocks: R runs in one module ---------------------------------------------------------
#
# Every parameter and buffer below has a leading run dimension R, and every forward takes inputs of
# shape (R, ..., features): run r's rows only ever meet run r's parameters. One optimizer step over
# the stacked parameters is R independent steps (AdamW is element-wise).
#
# Seeding: a stacked block is initialised from one torch.Generator per run (``gens``), drawn in
# construction order, so run r's initial values depend only on its own generator (hence its seed),
# never on R or on the other runs. Dropout draws run r's masks from run r's own generator
# (:class:`RunRNG`), so R = 1 and R > 1 see the same masks.


def run_generators(seeds: Sequence[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per run, seeded ``seed + offset`` (the initialisation stream of each run)."""
    return [torch.Generator().manual_seed(int(s) + offset) for s in seeds]


class RunRNG:
    """Per-run random streams for dropout, one generator per run and device (seeded ``seed + offset``).

    Not a module and not in the state dict; the loop saves each run's streams in its resume point
    (:meth:`get_state` / :meth:`set_state`), so a resumed run draws the masks it would have drawn.
    """

    def __init__(self, seeds: Sequence[int], offset: int = 1_000_003) -> None:
        self.seeds = [int(s) + offset for s in seeds]
        self._gens: dict[str, list[torch.Generator]] = {}

    def generators(self, device: torch.device) -> list[torch.Generator]:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self._gens[key]

    def get_state(self, r: int) -> dict[str, Tensor]:
        """Run r's streams, one state per device used so far."""
        return {dev: gens[r].get_state() for dev, gens in self._gens.items()}

    def set_state(self, r: int, state: dict[str, Tensor]) -> None:
        for dev, st in state.items():
            self.generators(torch.device(dev))[r].set_state(st)

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """(R, *shape) uniform draws, row r from run r's generator."""
        gens = self.generators(device)
        out = torch.empty((len(gens), *shape), device=device, dtype=dtype)
        for r, g in enumerate(gens):
            out[r].uniform_(0.0, 1.0, generator=g)
        return out


def _uniform(shape: Sequence[int], bound: float, gen: torch.Generator) -> Tensor:
    return torch.empty(tuple(shape)).uniform_(-bound, bound, generator=gen)


def _run_view(t: Tensor, ndim: int) -> Tensor:
    """A (R, F) per-run vector viewed to broadcast against (R, ..., F) with ``ndim`` dimensions."""
    return t.reshape(t.shape[0], *([1] * (ndim - 2)), t.shape[-1])


class StackedLinear(nn.Module):
    """R independent ``nn.Linear(in_features, out_features)``: weight (R, in, out), bias (R, out).

    ``init``: ``default`` is nn.Linear's (uniform in +-1/sqrt(in) for weight and bias), ``zeros``
    zero weight and bias, ``xavier`` Xavier-uniform weight and zero bias (MultiheadAttention's
    input projections); ``bias_value`` overrides the bias with a constant.
    """

    def __init__(self, runs: int, in_features: int, out_features: int, gens: Sequence[torch.Generator],
                 init: str = "default", bias_value: float | None = None) -> None:
        super().__init__()
        if len(gens) != runs:
            raise ValueError(f"{runs} runs need {runs} generators, got {len(gens)}")
        self.in_features, self.out_features = in_features, out_features
        w, b = [], []
        for g in gens:
            if init == "default":
                bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
                w.append(_uniform((out_features, in_features), bound, g).t())
                b.append(_uniform((out_features,), bound, g))
            elif init == "xavier":
                bound = math.sqrt(6.0 / (in_features + out_features))
                w.append(_uniform((out_features, in_features), bound, g).t())
                b.append(torch.zeros(out_features))
            elif init == "zeros":
                w.append(torch.zeros(in_features, out_features))
                b.append(torch.zeros(out_features))
            else:
                raise ValueError(f"unknown init {init!r}")
        self.weight = nn.Parameter(torch.stack(w).contiguous())
        bias = torch.stack(b)
        if bias_value is not None:
            bias.fill_(bias_value)
        self.bias = nn.Parameter(bias)

    def extra_repr(self) -> str:
        return f"runs={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: Tensor) -> Tensor:
        """(R, ..., in) -> (R, ..., out)."""
        lead = x.shape[1:-1]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)
        return out.reshape(x.shape[0], *lead, self.out_features)


class StackedLayerNorm(nn.Module):
    """R independent ``nn.LayerNorm(dim)``: weight (R, dim) = 1, bias (R, dim) = 0 at initialisation."""

    def __init__(self, runs: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(runs, dim))
        self.bias = nn.Parameter(torch.zeros(runs, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        return y * _run_view(self.weight, x.ndim) + _run_view(self.bias, x.ndim)


class StackedDropout(nn.Module):
    """Dropout whose mask for run r comes from run r's generator in ``rng`` (identity in eval mode)."""

    def __init__(self, p: float, rng: RunRNG | None) -> None:
        super().__init__()
        self.p = float(p)
        self.rng = rng

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0 or self.rng is None:
            return x
        keep = self.rng.rand(x.shape[1:], x.device, x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class StackedMLP(nn.Module):
    """R independent MLPs ``in -> hidden... -> out`` (Linear, GELU, Dropout per hidden layer);
    ``zero_last`` zero-initialises the last Linear."""

    def __init__(self, runs: int, in_features: int, hidden: Sequence[int], out_features: int,
                 gens: Sequence[torch.Generator], dropout: float = 0.0, rng: RunRNG | None = None,
                 zero_last: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [StackedLinear(runs, d, h, gens), nn.GELU(), StackedDropout(dropout, rng)]
            d = h
        layers.append(StackedLinear(runs, d, out_features, gens, init="zeros" if zero_last else "default"))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class StackedAdapter(nn.Module):
    """R residual bottleneck adapters: ``x + MLP(LayerNorm(x))``, MLP = D -> hidden -> hidden -> D
    (GELU, dropout) with its last Linear zero (the identity at initialisation)."""

    def __init__(self, runs: int, dim: int, hidden: int, gens: Sequence[torch.Generator], dropout: float = 0.0,
                 rng: RunRNG | None = None) -> None:
        super().__init__()
        self.norm = StackedLayerNorm(runs, dim)
        self.net = StackedMLP(runs, dim, (hidden, hidden), dim, gens, dropout, rng, zero_last=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(self.norm(x))


class StackedAdaIN(nn.Module):
    """R adaptive instance norms: each sample's features standardised over the feature axis, then
    ``gamma(cond) * x_hat + beta(cond)`` with gamma, beta = Linear(cond -> dim), the identity affine
    at initialisation (gamma 1, beta 0)."""

    def __init__(self, runs: int, dim: int, cond_dim: int, gens: Sequence[torch.Generator], eps: float = 1e-5):
        super().__init__()
        self.gamma = StackedLinear(runs, cond_dim, dim, gens, init="zeros", bias_value=1.0)
        self.beta = StackedLinear(runs, cond_dim, dim, gens, init="zeros")
        self.eps = eps

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.var(-1, unbiased=False, keepdim=True).clamp_min(1e-12).sqrt()
        return self.gamma(cond) * (x - mean) / (std + self.eps) + self.beta(cond)


class StackedCrossAttention(nn.Module):
    """R multi-view cross-attentions, written out: the fair
    feature is projected into V views (keys and values), the detection feature is the one query of
    ``heads``-head scaled dot-product attention with MultiheadAttention's projections and
    initialisation (Xavier in-projections, zero biases, default out-projection weight).

    ``forward(x (R, B, dim), cond (R, B, cond_dim))`` -> (out (R, B, dim), weights (R, B, V)
    averaged over heads).
    """

    def __init__(self, runs: int, dim: int, cond_dim: int, n_views: int, heads: int,
                 gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.n_views, self.heads = dim, n_views, heads
        self.views = StackedLinear(runs, cond_dim, n_views * dim, gens)
        self.q = StackedLinear(runs, dim, dim, gens, init="xavier")
        self.k = StackedLinear(runs, dim, dim, gens, init="xavier")
        self.v = StackedLinear(runs, dim, dim, gens, init="xavier")
        self.out = StackedLinear(runs, dim, dim, gens, bias_value=0.0)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        r, b = x.shape[:2]
        h, dh = self.heads, self.dim // self.heads
        kv = self.views(cond).reshape(r, b, self.n_views, self.dim)
        q = self.q(x).reshape(r, b, h, 1, dh)
        k = self.k(kv).reshape(r, b, self.n_views, h, dh).transpose(2, 3)  # (R, B, H, V, dh)
        v = self.v(kv).reshape(r, b, self.n_views, h, dh).transpose(2, 3)
        w = torch.softmax((q * k).sum(-1) / math.sqrt(dh), dim=-1)  # (R, B, H, V)
        out = (w.unsqueeze(-1) * v).sum(-2).reshape(r, b, self.dim)
        return self.out(out), w.mean(2)


class StackedGate(nn.Module):
    """R gated fusions: ``gate = sigmoid(W [a; b] + 0)``, out = gate * a + (1 - gate) * b (a gate of
    0.5 for zero inputs at initialisation)."""

    def __init__(self, runs: int, dim: int, gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.proj = StackedLinear(runs, 2 * dim, dim, gens, bias_value=0.0)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.proj(torch.cat([a, b], dim=-1)))
        return gate * a + (1.0 - gate) * b, gate


class StackedCosineClassifier(nn.Module):
    """R cosine classifiers (for LDAM): weight (R, K, D) initialised as nn.Linear's, cosine logits
    ``<x / |x|, w_k / |w_k|>`` in [-1, 1], no bias and no scale (the loss scales by ``s``)."""

    def __init__(self, runs: int, dim: int, n_classes: int, gens: Sequence[torch.Generator], eps: float = 1e-8):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.stack([_uniform((n_classes, dim), bound, g) for g in gens]))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(R, B, D) -> (R, B, K)."""
        w = F.normalize(self.weight, dim=-1, eps=self.eps)
        return torch.bmm(F.normalize(x, dim=-1, eps=self.eps), w.transpose(1, 2))
