"""Objective functions shared across tasks.

- :mod:`.cvar`: CVaR at a worst fraction, closed form and sync-free; the bilevel (class, subgroup)
  CVaR of DAW-FDD.
- :mod:`.ldam`: LDAM margins and loss on cosine logits.
- :mod:`.sinkhorn`: Sinkhorn divergences between subgroup feature clouds, batched into one geomloss call.
- :mod:`.disentangle`: squared-cosine disentanglement of detection and fair features.
- :mod:`.prototype`: the importance-weighted frame contrastive loss and the prototypes' EMA update (XAI).
"""

from .cvar import BilevelCVaR, bilevel_cvar, bilevel_cvar_parts, cvar
from .disentangle import cosine_disentanglement
from .ldam import LDAMLoss, ldam_margins
from .prototype import ema_update, frame_contrastive
from .sinkhorn import StackedSinkhorn, bounding_diameter, feature_scale

__all__ = [
    "BilevelCVaR",
    "LDAMLoss",
    "StackedSinkhorn",
    "bilevel_cvar",
    "bilevel_cvar_parts",
    "bounding_diameter",
    "cosine_disentanglement",
    "cvar",
    "ema_update",
    "feature_scale",
    "frame_contrastive",
    "ldam_margins",
]
