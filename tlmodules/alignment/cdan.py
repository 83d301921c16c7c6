"""CDAN's conditional domain-adversarial loss (Long et al., "Conditional Adversarial Domain Adaptation",
NeurIPS 2018), with CDAN+E's entropy conditioning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tlmodules.alignment.domain_loss import binary_domain_loss, domain_accuracy
from tlmodules.grl import grad_reverse
from tlmodules.information import entropy


class ConditionalDomainAdversarialLoss(nn.Module):
    """CDAN (Long et al., "Conditional Adversarial Domain Adaptation", NeurIPS 2018); CDAN+E with
    ``entropy_conditioning=True``.

    The domain discriminator ``D`` sees each sample's features conditioned on the classifier's prediction
    ``p = softmax(logits)`` (detached: the predictions condition ``D`` but get no gradient from it) by the
    multilinear map ``p ⊗ f``, the outer product flattened to ``(B, C·W)`` (class-major, as
    Transfer-Learning-Library's ``MultiLinearMap``), through a gradient reversal layer. The loss is

        ``0.5 · (BCE(D(p_s ⊗ f_s), 1) + BCE(D(p_t ⊗ f_t), 0))``,

    each term a mean over its batch; with entropy conditioning (CDAN+E) each sample weighs
    ``w = 1 + exp(-H(p))`` normalised to sum to one over its domain's batch, so confident predictions count
    more than uncertain ones.

    Args:
        discriminator: ``(B, W·C)`` → domain logits ``(B,)``, e.g. :class:`tlmodules.heads.DomainDiscriminator`
            ``(W·C)``. It is this module's only submodule (state-dict keys ``discriminator.*``).
        entropy_conditioning: weigh samples by the certainty of their predictions (CDAN+E).
    """

    def __init__(self, discriminator: nn.Module, entropy_conditioning: bool = True) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.entropy_conditioning = entropy_conditioning

    def extra_repr(self) -> str:
        return f"entropy_conditioning={self.entropy_conditioning}"

    def forward(
        self, f_s: Tensor, f_t: Tensor, logits_s: Tensor, logits_t: Tensor, coefficient: float
    ) -> tuple[Tensor, Tensor]:
        """Features ``f_s`` ``(B_s, W)``, ``f_t`` ``(B_t, W)``, classifier logits ``logits_s`` ``(B_s, C)``,
        ``logits_t`` ``(B_t, C)`` and the gradient-reversal coefficient ``λ`` → ``(loss, discriminator
        accuracy)``, both float32 scalars (the accuracy carries no gradient)."""
        probs_s, probs_t = logits_s.detach().float().softmax(-1), logits_t.detach().float().softmax(-1)
        inputs_s = torch.bmm(probs_s.unsqueeze(2), f_s.float().unsqueeze(1)).flatten(1)
        inputs_t = torch.bmm(probs_t.unsqueeze(2), f_t.float().unsqueeze(1)).flatten(1)
        weights_s = weights_t = None
        if self.entropy_conditioning:
            weights_s = 1.0 + torch.exp(-entropy(probs_s))
            weights_t = 1.0 + torch.exp(-entropy(probs_t))
            weights_s, weights_t = weights_s / weights_s.sum(), weights_t / weights_t.sum()
        # one batch of both domains, as in Transfer-Learning-Library: the discriminator's BatchNorm must not
        # normalise each domain on its own (that erases a shift between them after the first layer)
        d = self.discriminator(grad_reverse(torch.cat([inputs_s, inputs_t]), coefficient)).float()
        d_s, d_t = d[: len(inputs_s)], d[len(inputs_s) :]
        return binary_domain_loss(d_s, d_t, weights_s, weights_t), domain_accuracy(d_s, d_t)
