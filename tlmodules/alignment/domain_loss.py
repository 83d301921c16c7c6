"""What every domain-adversarial loss shares: the discriminator's binary cross-entropy with source = 1 and
target = 0 (optionally weighted per sample) and its accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _domain_cross_entropy(logits: Tensor, label: float, weights: Tensor | None) -> Tensor:
    target = torch.full_like(logits, label)
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights).sum()


def binary_domain_loss(
    d_s: Tensor, d_t: Tensor, weights_s: Tensor | None = None, weights_t: Tensor | None = None
) -> Tensor:
    """``0.5 · (BCE(d_s, 1) + BCE(d_t, 0))`` of the discriminator's logits ``d_s`` ``(B_s,)`` and ``d_t``
    ``(B_t,)``: each domain's term is the mean over its samples, or, given its ``weights`` ``(B,)`` (summing to
    one over the domain's batch), the weighted sum. Returns a scalar."""
    return 0.5 * (_domain_cross_entropy(d_s, 1.0, weights_s) + _domain_cross_entropy(d_t, 0.0, weights_t))


def domain_accuracy(d_s: Tensor, d_t: Tensor) -> Tensor:
    """The discriminator's accuracy, the mean of both domains' (source: ``d_s > 0``, target: ``d_t <= 0``),
    so that 0.5 is chance whatever the batch sizes. Returns a scalar without gradient."""
    return 0.5 * ((d_s > 0).float().mean() + (d_t <= 0).float().mean())
