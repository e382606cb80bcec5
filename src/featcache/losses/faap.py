"""FAAP's objectives on a detector's (perturbed) outputs.

- :func:`image_scores`: an image's detection confidence, the mean over its top-k queries of the
  highest class probability (the no-object class excluded).
- :func:`ranking_split`: the adaptive positives (top fraction by score) and anchors (bottom
  fraction) of a batch, at least ``min_count`` each, the middle ignored.
- :func:`score_contrastive`: InfoNCE pulling each anchor's embedding towards the positives'
  (optionally positives towards each other too: the bidirectional variant).
- :func:`quantile_gap` / :func:`one_way_wasserstein`: the 1-Wasserstein distance between two
  empirical score distributions, and its one-way version that only penalises where the
  female quantiles lie below the male ones (pulling them up; the male side is a fixed target).
- :class:`DetectionCriterion`: DETR's set criterion (Hungarian matching, class, L1, GIoU) from
  transformers, against the ground truth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Largest number of quantile levels of the exact Wasserstein computation (lcm of the sizes).
MAX_LEVELS = 8192


def image_scores(logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(n, Q, C+1) logits -> (n,) mean of the top-k queries' highest non-background probability."""
    probs = logits.softmax(-1)[..., :-1].amax(-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1).values.mean(-1)


def ranking_split(scores: torch.Tensor, fraction: float = 0.4, min_count: int = 2):
    """(positives, anchors) index tensors: the top and bottom ``fraction`` of the batch by score.

    Each side gets ``max(min_count, floor(fraction * n))`` samples, but never more than half
    the batch; when that leaves fewer than ``min_count`` per side, both are empty.
    """
    n = int(scores.shape[0])
    k = min(max(min_count, int(math.floor(fraction * n))), n // 2)
    if k < min_count:
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return empty, empty
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    return order[:k], order[n - k:]


def score_contrastive(z: torch.Tensor, positives: torch.Tensor, anchors: torch.Tensor, tau: float = 0.1,
                      bidirectional_weight: float = 0.0) -> torch.Tensor:
    """InfoNCE on L2-normalised embeddings ``z``: every anchor a against every positive p,

        -log exp(z_a.z_p / tau) / sum_{j in P u A, j != a} exp(z_a.z_j / tau),

    averaged over the (a, p) pairs; with ``bidirectional_weight`` w > 0, plus w times the same
    term for every ordered pair of distinct positives (positive-to-positive clustering).
    """
    if len(positives) == 0 or len(anchors) == 0:
        return z.sum() * 0.0
    members = torch.cat([positives, anchors])
    sim = z @ z[members].T / tau  # (n, |P|+|A|)
    n_pos = len(positives)

    def term(rows: torch.Tensor, exclude_self: bool) -> torch.Tensor:
        s = sim[rows]  # (r, m)
        self_mask = rows[:, None] == members[None, :]
        denom = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1)  # (r,)
        pos = s[:, :n_pos]
        keep = ~self_mask[:, :n_pos] if exclude_self else torch.ones_like(pos, dtype=torch.bool)
        losses = (denom[:, None] - pos)[keep]
        return losses.mean() if losses.numel() else z.sum() * 0.0

    loss = term(anchors, exclude_self=False)
    if bidirectional_weight > 0 and n_pos > 1:
        loss = loss + bidirectional_weight * term(positives, exclude_self=True)
    return loss


def _quantiles(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The empirical quantile function of x at the midpoints (i + 0.5) / levels (a step function)."""
    xs = torch.sort(x).values
    idx = torch.floor((torch.arange(levels, device=x.device, dtype=torch.float64) + 0.5) * len(x) / levels).long()
    return xs[idx.clamp(max=len(x) - 1)]


def _levels(n: int, m: int) -> int:
    lcm = n * m // math.gcd(n, m)
    return lcm if lcm <= MAX_LEVELS else MAX_LEVELS


def quantile_gap(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q_high(t) - Q_low(t) at the common quantile midpoints (exact steps when lcm(n, m) <= 8192)."""
    k = _levels(len(low), len(high))
    return _quantiles(high, k) - _quantiles(low, k)


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1-Wasserstein distance between two empirical distributions (equals scipy.stats.wasserstein_distance)."""
    if len(a) == 0 or len(b) == 0:
        return torch.tensor(float("nan"))
    return quantile_gap(a, b).abs().mean()


def one_way_wasserstein(female: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
    """mean over quantiles of relu(Q_male - Q_female), male detached: pulls female scores up only."""
    if len(female) == 0 or len(male) == 0:
        return female.sum() * 0.0
    return F.relu(quantile_gap(female, male.detach())).mean()


class DetectionCriterion(torch.nn.Module):
    """DETR's set loss against the ground truth, from transformers (HungarianMatcher + ImageLoss).

    Weights as DETR's: class 1 (no-object weight ``eos_coef`` 0.1), L1 5, GIoU 2; matching costs
    class 1, L1 5, GIoU 2. ``forward`` takes logits (n, Q, C+1), boxes (n, Q, 4) and a list of
    targets ``{"class_labels": (g,), "boxes": (g, 4)}`` and returns (loss, terms).
    """

    def __init__(self, num_classes: int, eos_coef: float = 0.1, class_weight: float = 1.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__()
        from transformers.loss.loss_for_object_detection import HungarianMatcher, ImageLoss

        self.matcher = HungarianMatcher(class_cost=class_weight, bbox_cost=bbox_weight, giou_cost=giou_weight)
        self.loss = ImageLoss(matcher=self.matcher, num_classes=num_classes, eos_coef=eos_coef,
                              losses=["labels", "boxes"])
        self.weights = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]):
        terms = self.loss({"logits": logits, "pred_boxes": boxes}, targets)
        total = sum(self.weights[k] * terms[k] for k in self.weights)
        return total, {k: terms[k] for k in self.weights}
