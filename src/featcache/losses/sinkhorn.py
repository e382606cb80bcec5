"""Sinkhorn divergences between the feature distributions of subgroups (geomloss).

``S(x, y)`` is geomloss's debiased Sinkhorn divergence ``SamplesLoss("sinkhorn", p=2, blur, scaling,
debias=True, backend="tensorized")`` between the uniform empirical measures on two point clouds.
It is 0 for identical clouds and grows with their distance (~ half the squared Wasserstein-2 distance
for small ``blur``).

All the comparisons of one call are made in ONE batched geomloss call: each cloud is padded to the
largest cloud size with weight-0 points. geomloss (``_legacy/sinkhorn_divergence.py: log_weights``)
maps a weight ``<= 0`` to a log-weight of -100000, so a padded point carries no mass. A padded point
is a copy of a real point of the same cloud, not a zero: its dual potential is then exactly that of
the point it copies, so in every soft-min its term is exactly exp(-1e5) (i.e. 0) times that point's;
and the padding changes neither geomloss's estimate of the diameter (the bounding box of the points)
nor the range of the cost matrices (zeros far from float32 features would add ~|x|^2 costs).

The epsilon-scaling schedule starts from a ``diameter``; geomloss estimates it over all the points of
the batch, so the value of one pair can depend (very slightly: only through the annealing schedule,
the final temperature is always ``blur**2``) on the other clouds in the call. Pass ``diameter`` to fix it.

Working out the group sizes needs the group codes on the host (one synchronisation per call), and
geomloss itself synchronises to estimate the diameter; these losses are not sync-free.
"""

from __future__ import annotations

import itertools

import torch
from geomloss import SamplesLoss
from torch import Tensor, nn


def feature_scale(x: Tensor) -> float:
    """RMS distance of the points (N, D) to their mean: ``sqrt(mean_i ||x_i - mean||^2)``.

    A natural unit for the Sinkhorn ``blur``: a blur that is a fraction of the feature scale works for
    features of any magnitude (CLIP features, normalised or not).
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if x.shape[0] == 0:
        raise ValueError("feature_scale of an empty set of points")
    return float((x - x.mean(0)).pow(2).sum(-1).mean().sqrt())


def _members(groups: Tensor, min_group: int, mask: Tensor | None = None) -> dict[int, Tensor]:
    """Known subgroup code -> (n_g,) CPU indices of its samples, for groups with at least ``min_group``."""
    g = groups.detach().to("cpu", torch.long)
    keep = g >= 0
    if mask is not None:
        keep &= mask.detach().to("cpu", torch.bool)
    out = {}
    for code in torch.unique(g[keep]).tolist():
        idx = torch.nonzero(keep & (g == code)).flatten()
        if idx.numel() >= min_group:
            out[int(code)] = idx
    return out


class GroupSinkhorn(nn.Module):
    """Sinkhorn divergences between the feature clouds of subgroups, batched into one geomloss call.

    Args:
        blur: geomloss blur (the entropic temperature is ``blur**2``); a fraction of
            :func:`feature_scale` of the features is a sensible default.
        scaling: geomloss epsilon-scaling ratio in (0, 1); closer to 1 is more accurate and slower.
        min_group: subgroups with fewer samples than this are skipped.
        diameter: optional upper bound on the distances, the start of the annealing schedule;
            None lets geomloss estimate it from the points of each call.

    Subgroup codes are integers; codes < 0 (unknown) are ignored. Every method returns a ()
    differentiable tensor; with nothing to compare, a zero that still works in backward.
    """

    def __init__(self, blur: float, scaling: float = 0.9, min_group: int = 2, diameter: float | None = None) -> None:
        super().__init__()
        if not blur > 0:
            raise ValueError(f"blur must be positive, got {blur}")
        if not 0 < scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
        self.blur = float(blur)
        self.scaling = float(scaling)
        self.min_group = max(1, int(min_group))
        self.diameter = None if diameter is None else float(diameter)
        self.loss = SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=self.scaling, debias=True,
                                backend="tensorized", diameter=self.diameter)

    def extra_repr(self) -> str:
        return f"blur={self.blur}, scaling={self.scaling}, min_group={self.min_group}, diameter={self.diameter}"

    # -- the batched computation -------------------------------------------------------------
    @staticmethod
    def _pad(x: Tensor, clouds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Clouds of index lists -> points (P, N, D) and uniform weights (P, N), padded with weight 0.

        A padded slot repeats the cloud's first point (see the module docstring).
        """
        n_max = max(len(c) for c in clouds)
        idx = torch.empty(len(clouds), n_max, dtype=torch.long)
        w = torch.zeros(len(clouds), n_max, dtype=torch.float64)
        for p, c in enumerate(clouds):
            idx[p, : len(c)] = c
            idx[p, len(c):] = c[0]
            w[p, : len(c)] = 1.0 / len(c)
        idx = idx.to(x.device, non_blocking=True)
        return x[idx], w.to(device=x.device, dtype=x.dtype)

    def divergences(self, x: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """``S(x[i], x[j])`` for each pair of index tensors ``(i, j)``, in one batched call: (P,).

        Each cloud is padded to the largest cloud of its side of the pairs, with weight-0 points.
        """
        if not pairs:
            return x.sum().reshape(1)[:0]
        xs, a = self._pad(x, [p[0] for p in pairs])
        ys, b = self._pad(x, [p[1] for p in pairs])
        return self.loss(a, xs, b, ys)

    @staticmethod
    def _mean(x: Tensor, values: Tensor) -> Tensor:
        return values.mean() if values.numel() else x.sum() * 0.0

    # -- the three comparisons ---------------------------------------------------------------
    def global_(self, x: Tensor, groups: Tensor) -> Tensor:
        """Mean over subgroups g (``n_g >= min_group``) of ``S(x[g], x[all samples of a known subgroup]``).

        Args: x (B, D) features; groups (B,) codes, -1 unknown.
        """
        members = _members(groups, self.min_group)
        if not members:
            return x.sum() * 0.0
        everyone = _members(groups, 1)
        known = torch.cat(list(everyone.values())).sort().values
        return self._mean(x, self.divergences(x, [(idx, known) for idx in members.values()]))

    def pairwise(self, x: Tensor, groups: Tensor) -> Tensor:
        """Mean over all unordered pairs (g, h), g < h, of present subgroups of ``S(x[g], x[h])``."""
        members = list(_members(groups, self.min_group).values())
        return self._mean(x, self.divergences(x, list(itertools.combinations(members, 2))))

    def per_class(self, x: Tensor, groups: Tensor, labels: Tensor) -> Tensor:
        """Subgroup pairs within each class: the mean over all the pairs (g, h), g < h, of subgroups
        present among the reals and all such pairs among the fakes, pooled (8 subgroups present in both
        classes: 2 x 28 = 56 pairs), of ``S(x[g, c], x[h, c])``.

        Args: x (B, D); groups (B,) codes, -1 unknown; labels (B,) in {0, 1}.
        """
        lab = labels.detach().to("cpu", torch.long)
        pairs = []
        for c in torch.unique(lab).tolist():
            members = list(_members(groups, self.min_group, lab == c).values())
            pairs += list(itertools.combinations(members, 2))
        return self._mean(x, self.divergences(x, pairs))
