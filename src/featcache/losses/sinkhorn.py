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
from collections import Counter

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


def pad_clouds(x: Tensor, clouds: list[Tensor]) -> tuple[Tensor, Tensor]:
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


# -- stacked runs: every run's group comparisons in one call, no host-device synchronisation -------


def size_buckets(sizes: list[int], most: int = 4) -> list[list[int]]:
    """The indices of ``sizes`` (problems' cloud sizes) in at most ``most`` buckets, each to be padded
    to its own largest size: the split of the sorted sizes that minimises the dense work
    ``sum over buckets of (problems in it) x (its largest size)^2`` (dynamic programming over the
    distinct sizes).  Fewer buckets when fewer distinct sizes; one when ``most`` is 1."""
    if not sizes:
        return []
    tally = Counter(sizes)
    distinct = sorted(tally)
    counts = [tally[v] for v in distinct]
    m, parts = len(distinct), min(int(most), len(distinct))
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> int:  # distinct sizes i..j (inclusive) in one bucket
        return (prefix[j + 1] - prefix[i]) * distinct[j] ** 2

    inf = float("inf")
    best = [[inf] * m for _ in range(parts + 1)]  # best[b][j]: sizes 0..j in b buckets
    cut = [[0] * m for _ in range(parts + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for b in range(2, parts + 1):
        for j in range(b - 1, m):
            for i in range(b - 1, j + 1):  # the last bucket holds sizes i..j
                c = best[b - 1][i - 1] + cost(i, j)
                if c < best[b][j]:
                    best[b][j], cut[b][j] = c, i
    b = min(range(1, parts + 1), key=lambda q: best[q][m - 1])
    bounds, j = [], m - 1
    while b > 1:
        i = cut[b][j]
        bounds.append((i, j))
        j, b = i - 1, b - 1
    bounds.append((0, j))
    buckets = []
    for i, j in reversed(bounds):
        lo, hi = distinct[i], distinct[j]
        buckets.append([p for p, x in enumerate(sizes) if lo <= x <= hi])
    return buckets


class _SharedCost:
    """geomloss ``cost`` for problems whose clouds all live on the points of one run.

    Problem p = r * K + k compares two weightings of run r's B points. The halved squared distances
    (geomloss's own p = 2 cost) are computed once per run, (R, B, B), and repeated K times. geomloss
    calls ``cost(x, y.detach())`` with the live side first; here both sides are run r's points, so
    every call returns ``|z_i - z_j|^2 / 2`` with the gradient flowing through the first factor only,
    exactly as geomloss's detach convention does for ``C(x, y.detach())``.
    """

    def __init__(self, z: Tensor, k: int) -> None:
        zd = z.detach()
        sq = (z * z).sum(-1)
        c = (sq.unsqueeze(2) - 2 * torch.bmm(z, zd.transpose(1, 2)) + (zd * zd).sum(-1).unsqueeze(1)) / 2
        self.cost = c.clamp_min(0).repeat_interleave(k, dim=0)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.cost


def bounding_diameter(x: Tensor) -> float:
    """The diagonal of the bounding box of the points (N, D), geomloss's own diameter estimate;
    computed once (e.g. on the train features) so that no training step needs to estimate it."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    return float((x.amax(0) - x.amin(0)).norm())


class StackedSinkhorn(nn.Module):
    """Sinkhorn divergences between subgroup clouds of R runs at once, in one geomloss call.

    A cloud is a weighting of all B points of a run's batch: weight ``1 / n_g`` on the members of
    subgroup g, 0 elsewhere (masks as weights: no boolean indexing, no group sizes on the host).
    geomloss maps a weight <= 0 to a log-weight of -100000, so non-members carry no mass. The cost
    matrix of a run is computed once and shared by all its problems (:class:`_SharedCost`).

    ``diameter`` (required) starts the epsilon-scaling schedule, as geomloss's bounding-box estimate
    would, but fixed once (:func:`bounding_diameter` of the train features, times a margin) so that
    a step needs no synchronisation and a problem's value never depends on the other runs in the call.
    A comparison that is absent (a subgroup with fewer than ``min_group`` members) is solved on a
    uniform dummy weighting and masked out, so its value and gradient are exactly 0.

    ``mode``: ``masked`` is the above (sync-free, but every problem spans the whole batch: (B / n_g)^2
    times the work of a compact cloud); ``compact`` reads the group memberships on the host (one
    synchronisation per call) and gathers each cloud's members, padded with weight-0 copies of a
    member to the largest cloud (see :func:`pad_clouds`); ``auto`` (default): ``masked`` on
    CUDA, where a synchronisation stalls the device and the work is cheap, ``compact`` on the CPU,
    where there is no device to stall and the work is what costs. Both give the same values.

    ``backend``: ``tensorized`` (dense matrices; the only one without KeOps) or ``auto``:
    ``tensorized`` up to ``max_dense`` matrix entries, else ``online`` (KeOps) when pykeops is installed.
    """

    def __init__(self, blur: float, scaling: float, diameter: float, min_group: int = 2, n_groups: int = 8,
                 backend: str = "auto", max_dense: int = 2 ** 28, mode: str = "auto") -> None:
        super().__init__()
        if not blur > 0:
            raise ValueError(f"blur must be positive, got {blur}")
        if not 0 < scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
        if not diameter > 0:
            raise ValueError(f"diameter must be positive, got {diameter}")
        self.blur, self.scaling, self.diameter = float(blur), float(scaling), float(diameter)
        self.min_group, self.n_groups = max(1, int(min_group)), int(n_groups)
        self.backend, self.max_dense = backend, int(max_dense)
        if mode not in ("auto", "masked", "compact"):
            raise ValueError(f"mode must be auto, masked or compact, got {mode!r}")
        self.mode = mode
        self._pairs = torch.tensor(list(itertools.combinations(range(self.n_groups), 2)), dtype=torch.long)
        self._pairs_on: dict[str, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"blur={self.blur}, scaling={self.scaling}, diameter={self.diameter}, min_group={self.min_group}"

    def _backend(self, p: int, b: int) -> str:
        if self.backend != "auto":
            return self.backend
        if p * b * b <= self.max_dense:
            return "tensorized"
        try:
            import pykeops  # noqa: F401
        except ImportError:
            return "tensorized"
        return "online"

    def divergences(self, z: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """z (R, B, D) points; a, b (R, K, B) weights of the two clouds of K problems per run,
        each row summing to 1. Returns (R, K) Sinkhorn divergences S(a, b) on run r's points."""
        r, k, n = a.shape
        backend = self._backend(r * k, n)
        placeholder = z.new_zeros(r * k, n, 1)
        if backend == "tensorized":
            loss = SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=self.scaling, debias=True,
                               backend="tensorized", diameter=self.diameter, cost=_SharedCost(z, k))
            values = loss(a.reshape(r * k, n), placeholder, b.reshape(r * k, n), placeholder)
        else:  # KeOps computes the costs on the fly from the points themselves
            loss = SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=self.scaling, debias=True,
                               backend=backend, diameter=self.diameter)
            pts = z.unsqueeze(1).expand(r, k, n, z.shape[-1]).reshape(r * k, n, z.shape[-1])
            values = loss(a.reshape(r * k, n), pts, b.reshape(r * k, n), pts)
        return values.reshape(r, k)

    def compact_divergences(self, z: Tensor, a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
        """:meth:`divergences` of the valid problems on gathered clouds: a, b (R, K, B) weights (uniform
        on their members), valid (R, K). One host synchronisation (the memberships); (R, K), 0 where
        not valid."""
        r, k, n = a.shape
        a_m, b_m, ok = (a > 0).cpu(), (b > 0).cpu(), valid.cpu()
        probs = torch.nonzero(ok).tolist()
        values = z.new_zeros(r * k)
        if not probs:
            return values.reshape(r, k) + 0.0 * z.sum()
        flat = z.reshape(r * n, z.shape[-1])
        xa = [torch.nonzero(a_m[i, j]).flatten() + i * n for i, j in probs]
        xb = [torch.nonzero(b_m[i, j]).flatten() + i * n for i, j in probs]
        where = [i * k + j for i, j in probs]
        # clouds of similar size share a call, each call padded to its own largest (one call padded
        # to the largest of all did ~3.6x the dense work on the 15-run benchmark's subgroup clouds)
        for bucket in size_buckets([max(len(x), len(y)) for x, y in zip(xa, xb)]):
            pa, wa = pad_clouds(flat, [xa[p] for p in bucket])
            pb, wb = pad_clouds(flat, [xb[p] for p in bucket])
            backend = self._backend(len(bucket), max(pa.shape[1], pb.shape[1]))
            loss = SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=self.scaling, debias=True,
                               backend=backend, diameter=self.diameter)
            at = torch.tensor([where[p] for p in bucket], device=z.device)
            values = values.index_put((at,), loss(wa, pa, wb, pb))
        return values.reshape(r, k)

    def _clouds(self, member: Tensor) -> tuple[Tensor, Tensor]:
        """member (R, G, B) bool -> uniform weights on each group (dummy uniform where absent), present (R, G)."""
        count = member.sum(-1)
        present = count >= self.min_group
        w = member.to(torch.get_default_dtype()) / count.clamp_min(1).unsqueeze(-1)
        uniform = torch.full_like(w, 1.0 / member.shape[-1])
        return torch.where(present.unsqueeze(-1), w, uniform), present

    def _groups(self, groups: Tensor, extra: Tensor | None = None) -> Tensor:
        codes = torch.arange(self.n_groups, device=groups.device)
        member = groups.unsqueeze(1) == codes.view(1, -1, 1)  # (R, G, B); -1 matches nothing
        return member if extra is None else member & extra.unsqueeze(1)

    @staticmethod
    def _masked_mean(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        n = valid.sum(-1)
        return torch.where(valid, values, torch.zeros_like(values)).sum(-1) / n.clamp_min(1), n > 0

    def terms(self, z: Tensor, groups: Tensor, *, global_: bool = False, pairwise: bool = False,
              labels: Tensor | None = None) -> dict[str, Tensor]:
        """The requested comparisons of every run, all in one geomloss call; each an (R,) tensor.

        - ``global``: mean over subgroups g (n_g >= min_group) of S(x[g], x[every known subgroup]);
        - ``pairwise``: mean over pairs g < h of present subgroups of S(x[g], x[h]);
        - ``per_class`` (``labels`` given, (R, B) in {0, 1}): for each class c the mean over the pairs
          g < h of subgroups present within class c of S(x[g, c], x[h, c]) (L_c), then the mean over
          the classes that have at least one pair: (L_real + L_fake) / 2 when both have.
        A run with nothing to compare gets 0.
        """
        z = z.to(torch.get_default_dtype()) if not z.is_floating_point() else z
        dtype = z.dtype
        key = str(z.device)
        if key not in self._pairs_on:  # copied to the device once, not every step
            self._pairs_on[key] = (self._pairs[:, 0].to(z.device), self._pairs[:, 1].to(z.device))
        gi, hi = self._pairs_on[key]
        a_list, b_list, spans = [], [], {}
        start = 0

        def add(name, a, b, valid):
            nonlocal start
            a_list.append(a.to(dtype))
            b_list.append(b.to(dtype))
            spans[name] = (start, start + a.shape[1], valid)
            start += a.shape[1]

        if global_ or pairwise:
            w, present = self._clouds(self._groups(groups))
            if global_:
                known = (groups >= 0).unsqueeze(1)
                everyone, any_known = self._clouds(known)
                add("sinkhorn_global", w, everyone.expand_as(w), present & any_known)
            if pairwise:
                add("sinkhorn_pairwise", w[:, gi], w[:, hi], present[:, gi] & present[:, hi])
        if labels is not None:
            for c in (0, 1):
                w, present = self._clouds(self._groups(groups, labels == c))
                add(f"class{c}", w[:, gi], w[:, hi], present[:, gi] & present[:, hi])
        if not a_list:
            return {}
        mode = self.mode if self.mode != "auto" else ("masked" if z.is_cuda else "compact")
        a_all, b_all = torch.cat(a_list, 1), torch.cat(b_list, 1)
        if mode == "masked":
            values = self.divergences(z, a_all, b_all)
        else:
            valid = torch.cat([v for _, _, v in spans.values()], 1)
            values = self.compact_divergences(z, a_all, b_all, valid)
        out = {}
        for name, (s, e, valid) in spans.items():
            if not name.startswith("class"):
                out[name] = self._masked_mean(values[:, s:e], valid)[0]
        if labels is not None:
            per = [self._masked_mean(values[:, s:e], valid) for name, (s, e, valid) in spans.items()
                   if name.startswith("class")]
            means = torch.stack([m for m, _ in per], -1)  # (R, 2)
            has = torch.stack([h for _, h in per], -1)
            out["sinkhorn"] = self._masked_mean(means, has)[0]
        return out
