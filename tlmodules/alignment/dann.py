"""DANN's domain-adversarial loss (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tlmodules.alignment.domain_loss import binary_domain_loss, domain_accuracy
from tlmodules.grl import grad_reverse


class DomainAdversarialLoss(nn.Module):
    """DANN (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016).

    A domain discriminator ``D`` sees the features of both domains through a gradient reversal layer and
    learns to tell source (label 1) from target (label 0); the loss is

        ``0.5 · (BCE(D(f_s), 1) + BCE(D(f_t), 0))``  (each term a mean over its batch).

    One backward pass then trains ``D`` to minimise it and, with the gradient reaching the features
    multiplied by ``-coefficient``, the feature extractor to maximise it: to make the domains indistinguishable.

    Args:
        discriminator: ``(B, W)`` → domain logits ``(B,)``, e.g. :class:`tlmodules.heads.DomainDiscriminator`
            ``(W)``. It is this module's only submodule (state-dict keys ``discriminator.*``).
    """

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, f_s: Tensor, f_t: Tensor, coefficient: float) -> tuple[Tensor, Tensor]:
        """Features ``f_s`` ``(B_s, W)`` and ``f_t`` ``(B_t, W)``, the gradient-reversal coefficient ``λ`` →
        ``(loss, discriminator accuracy)``, both scalars (float32; the accuracy carries no gradient)."""
        # one batch of both domains, as in Transfer-Learning-Library: the discriminator's BatchNorm must not
        # normalise each domain on its own (that erases a shift between them after the first layer)
        d = self.discriminator(grad_reverse(torch.cat([f_s, f_t]), coefficient)).float()
        d_s, d_t = d[: len(f_s)], d[len(f_s) :]
        return binary_domain_loss(d_s, d_t), domain_accuracy(d_s, d_t)
