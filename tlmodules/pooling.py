"""Pooling of per-token hidden states into one vector per sequence.

All functions take ``hidden`` of shape ``(B, T, H)`` and ``mask`` of shape ``(B, T)``
(1 for real tokens, 0 for padding) and return ``(B, H)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tlmodules.errors import ConfigError


def cls_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The first token's state (BERT's ``[CLS]``)."""
    return hidden[:, 0]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens only, as sentence-transformers computes it (Reimers & Gurevych 2019)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def max_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Element-wise maximum over real tokens only."""
    fill = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, fill).amax(1)


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cls": cls_pool,
    "mean": mean_pool,
    "max": max_pool,
}


def get_pooling(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    try:
        return POOLINGS[name]
    except KeyError:
        raise ConfigError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}") from None
