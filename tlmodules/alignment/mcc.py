"""MCC's minimum class confusion loss (Jin, Wang, Long & Wang, "Minimum Class Confusion for Versatile Domain
Adaptation", ECCV 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tlmodules.errors import ConfigError
from tlmodules.information import entropy


class MinimumClassConfusionLoss(nn.Module):
    """MCC (Jin et al., "Minimum Class Confusion for Versatile Domain Adaptation", ECCV 2020): the classifier's
    confusion between classes on an unlabelled target batch, to be minimised. It needs no discriminator and
    no target labels, so it serves alone (added to the source cross-entropy) or beside DANN or CDAN.

    Given the target logits ``Z`` ``(B, C)``:

    1. temperature-scaled probabilities ``Ŷ = softmax(Z / T)`` ``(B, C)``;
    2. uncertainty weights ``w_i = B · (1 + exp(-H(Ŷ_i))) / Σ_j (1 + exp(-H(Ŷ_j)))`` ``(B,)``: confident
       samples (low entropy ``H``) count more. The weights are *constants* (computed without gradient), as in
       the authors' code (``thuml/Versatile-Domain-Adaptation``, ``Entropy(...).detach()``) and
       Transfer-Learning-Library's ``tllib.self_training.mcc``: the loss moves the predictions, not the weights;
    3. class confusion ``M = Ŷᵀ diag(w) Ŷ`` ``(C, C)``: ``M_jk`` is how much the batch predicts ``j`` and ``k``
       at once;
    4. category normalisation: each row divided by its sum, ``M̃_jk = M_jk / Σ_k' M_jk'``, so that frequent
       classes do not dominate (``M`` is symmetric, so this equals the authors' division by the column sums);
    5. the loss ``(Σ_jk M̃_jk - Σ_j M̃_jj) / C``, the off-diagonal mass per class, in ``[0, (C - 1) / C]``:
       0 when every sample is confident and no two classes are confused, ``(C - 1) / C`` for uniform
       predictions.

    A class that the batch gives (numerically) zero probability has a zero row; it is left at zero instead of
    dividing 0 by 0. Computed in float32 whatever the logits' dtype (safe under autocast).

    Args:
        temperature: ``T > 0``; above 1 softens the predictions (1 is the plain softmax; 2.5 by default, as in
            Transfer-Learning-Library's MCC recipe).
    """

    def __init__(self, temperature: float = 2.5) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"the MCC temperature must be positive (e.g. 2.5, the default), got {temperature}")
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, target_logits: Tensor) -> Tensor:
        """Target logits ``(B, C)`` → the class confusion loss, a float32 scalar."""
        batch, num_classes = target_logits.shape
        probs = (target_logits.float() / self.temperature).softmax(-1)  # (B, C)
        with torch.no_grad():
            weights = 1.0 + torch.exp(-entropy(probs))  # (B,)
            weights = batch * weights / weights.sum()
        confusion = (probs * weights[:, None]).t() @ probs  # (C, C)
        confusion = confusion / confusion.sum(1, keepdim=True).clamp_min(torch.finfo(confusion.dtype).tiny)
        return (confusion.sum() - confusion.trace()) / num_classes
