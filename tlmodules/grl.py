"""Gradient reversal (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015;
Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016).

Identity in the forward pass; in the backward pass the gradient is multiplied by ``-λ``. Placed
between a feature extractor and a domain discriminator, it makes one backward pass train the
discriminator to tell the domains apart and the features to confuse it. ``λ`` is an argument of
every call, never a hidden counter, so a schedule of training progress (and a resumed run) sets it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, inputs: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output.neg() * ctx.coefficient, None


def grad_reverse(inputs: Tensor, coefficient: float = 1.0) -> Tensor:
    """``inputs`` unchanged (any shape); their gradient times ``-coefficient`` on the way back."""
    return _GradientReversal.apply(inputs, float(coefficient))


class GradientReversalLayer(nn.Module):
    """Module form of :func:`grad_reverse`: ``forward(x, coefficient)`` → ``x`` (shape kept)."""

    def forward(self, inputs: Tensor, coefficient: float = 1.0) -> Tensor:
        return grad_reverse(inputs, coefficient)
