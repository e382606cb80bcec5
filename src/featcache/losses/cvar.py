"""Conditional value at risk (CVaR) of losses, and the bilevel (class, subgroup) CVaR of DAW-FDD.

CVaR of losses l_1..l_n at worst fraction ``alpha`` in (0, 1] is the mean of the worst ``alpha * n``
losses, the boundary sample weighted fractionally. It equals

    min_lambda  lambda + E[(l - lambda)_+] / alpha

(Rockafellar and Uryasev). ``alpha = 1`` is the mean, ``alpha -> 0`` the maximum.

Here it is computed in closed form: sort each row in descending order and weight rank i (from 0) by
``w_i = clamp(k - i, 0, 1) / k`` with ``k = alpha * n``. There is no inner optimiser and no
host-device synchronisation (no ``.item()``, no boolean indexing, no Python branch on a tensor
value), so the functions can sit inside a CUDA graph or a fully asynchronous training step.

DAW-FDD (Ju et al., "Improving Fairness in Deepfake Detection", WACV 2024) calls this worst
fraction ``alpha``: its default ``alpha = 0.9`` means the worst 90 % of the samples, not the best.
FairnessDeepfake's inner CVaR ``alpha = 0.9`` is the other way round: it is featcache's worst fraction 0.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _check_fraction(alpha: float | Tensor, name: str = "alpha") -> None:
    # Only Python numbers are checked: checking a tensor would synchronise with the device.
    if not isinstance(alpha, Tensor) and not (0.0 < float(alpha) <= 1.0):
        raise ValueError(f"{name} (the worst fraction) must be in (0, 1], got {alpha}")


def cvar(losses: Tensor, alpha: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """CVaR of the last dimension of ``losses`` at worst fraction ``alpha``.

    Args:
        losses: (..., n) losses; each row along the last dimension is one population.
        alpha: the worst fraction in (0, 1]: a float, or a tensor broadcastable to ``losses.shape[:-1]``
            (tensor values are not range-checked, to avoid a host-device synchronisation).
        mask: optional boolean (..., n) selecting the members of each row (``n_row = mask.sum(-1)``);
            ``losses`` and ``mask`` broadcast against each other (e.g. (n,) losses with a (G, n) mask).
            Non-members never contribute, whatever their value (inf and NaN included).

    Returns:
        (...) the CVaR of each row; a row with no member gives 0 (the caller knows which rows are
        empty from ``mask.any(-1)``). Differentiable with respect to ``losses``.
    """
    _check_fraction(alpha)
    if mask is None:
        mask = torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    else:
        mask = mask.to(device=losses.device, dtype=torch.bool)
        shape = torch.broadcast_shapes(losses.shape, mask.shape)
        losses, mask = losses.expand(shape), mask.expand(shape)
    # Sort key: members by value (descending), non-members after every member. The key only gives the
    # permutation; the values are gathered from `losses` and non-members replaced by 0, so no -inf (or
    # NaN) of a non-member is ever multiplied by a zero weight.
    key = torch.where(mask, losses.detach(), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    member_sorted = torch.gather(mask, -1, order)
    values = torch.where(member_sorted, torch.gather(losses, -1, order), 0.0)
    n_row = mask.sum(-1).to(losses.dtype)  # (...)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=losses.device, dtype=losses.dtype)
    k = (n_row * alpha).unsqueeze(-1)  # (..., 1); a Python float alpha creates no device tensor
    ranks = torch.arange(losses.shape[-1], dtype=losses.dtype, device=losses.device)
    weights = (k - ranks).clamp(0.0, 1.0)  # (..., n); zero from rank ceil(k) on, hence for non-members
    k_safe = torch.where(k > 0, k, torch.ones_like(k))
    return (weights * values).sum(-1) / k_safe.squeeze(-1)


class BilevelCVaR(NamedTuple):
    """The pieces of :func:`bilevel_cvar_parts` (C = 2 classes, G subgroups)."""

    value: Tensor  # () mean of `outer` over the classes present ((...) with leading dimensions)
    inner: Tensor  # (C, G) CVaR of the losses of subgroup g within class c; 0 where absent
    group_present: Tensor  # (C, G) bool: subgroup g has at least one sample of class c
    outer: Tensor  # (C,) CVaR over the present subgroups of `inner`; 0 where the class is absent
    class_present: Tensor  # (C,) bool: the class has at least one sample of a known subgroup


def bilevel_cvar_parts(
    losses: Tensor,
    groups: Tensor,
    labels: Tensor,
    *,
    inner_worst_fraction: float | Tensor = 0.1,
    outer_worst_fraction: float | Tensor = 0.5,
    n_groups: int = 8,
    n_classes: int = 2,
) -> BilevelCVaR:
    """:func:`bilevel_cvar` with its intermediate values and presence masks; see there (the fractions
    by keyword here: this form is for inspecting a loss, not for a training step)."""
    _check_fraction(inner_worst_fraction, "inner_worst_fraction")
    _check_fraction(outer_worst_fraction, "outer_worst_fraction")
    device = losses.device
    groups = groups.to(device)
    labels = labels.to(device)
    cls = torch.arange(n_classes, device=device)
    grp = torch.arange(n_groups, device=device)
    # (..., C, G, B): sample b is of class c and subgroup g. Unknown subgroups (-1), and codes outside
    # [0, n_groups), match no g and are excluded. Leading dimensions (e.g. stacked runs) are kept.
    in_class = labels.long().unsqueeze(-2) == cls.unsqueeze(-1)  # (..., C, B)
    in_group = groups.long().unsqueeze(-2) == grp.unsqueeze(-1)  # (..., G, B)
    member = in_class.unsqueeze(-2) & in_group.unsqueeze(-3)  # (..., C, G, B)
    inner = cvar(losses.unsqueeze(-2).unsqueeze(-2), inner_worst_fraction, member)  # (..., C, G)
    group_present = member.any(-1)  # (..., C, G)
    outer = cvar(inner, outer_worst_fraction, group_present)  # (..., C)
    class_present = group_present.any(-1)  # (..., C)
    n_present = class_present.sum(-1).to(losses.dtype)
    value = torch.where(class_present, outer, torch.zeros_like(outer)).sum(-1) / n_present.clamp(min=1.0)
    return BilevelCVaR(value, inner, group_present, outer, class_present)


def bilevel_cvar(losses: Tensor, groups: Tensor, labels: Tensor, inner_worst_fraction: float | Tensor = 0.1,
                 outer_worst_fraction: float | Tensor = 0.5, n_groups: int = 8) -> Tensor:
    """Bilevel CVaR of per-sample losses over (class, subgroup), as in DAW-FDD.

    For each class c in {0, 1} separately: the inner CVaR (worst fraction ``inner_worst_fraction``)
    over the samples of each subgroup g of class c gives a (G,) vector; the outer CVaR (worst
    fraction ``outer_worst_fraction``) runs over the subgroups present in class c (at least one
    sample). The result is the mean of the outer values over the classes present in the batch.

    DAW-FDD's ``alpha`` is a worst fraction in this sense: its ``alpha = 0.9`` means the worst 90 %.

    Args:
        losses: (B,) per-sample losses (e.g. cross-entropy with ``reduction="none"``), or (..., B) with
            leading dimensions (stacked runs: (R, B) gives (R,) values); groups and labels alike.
        groups: (B,) intersectional subgroup codes 0..n_groups-1; -1 (unknown) is excluded.
        labels: (B,) class labels in {0, 1}.
        inner_worst_fraction: worst fraction of the samples within a subgroup.
        outer_worst_fraction: worst fraction of the subgroups within a class.
        n_groups: number of subgroup codes.

    Returns:
        () differentiable scalar; 0 (still in the graph) when no sample has a known subgroup.
        No host-device synchronisation. :func:`bilevel_cvar_parts` also returns which classes and
        subgroups were present.
    """
    return bilevel_cvar_parts(losses, groups, labels, inner_worst_fraction=inner_worst_fraction,
                              outer_worst_fraction=outer_worst_fraction, n_groups=n_groups).value
