"""Regularisers toward the pretrained starting point."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class L2SP:
    """L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", ICML 2018): ``α/2 · ‖w − w⁰‖²`` over the pretrained weights plus
    ``β/2 · ‖w_new‖²`` over the new layers.

    The anchor ``w⁰`` is a copy of the backbone's weights at construction. It is not a module
    buffer (DDP would broadcast it every step); :meth:`state_dict` / :meth:`load_state_dict`
    carry it through checkpoints so a resumed run penalises distance from the same point.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], alpha: float, beta: float) -> None:
        self.alpha = alpha
        self.beta = beta
        self.anchor: dict[str, Tensor] = {n: p.detach().clone() for n, p in named_parameters}

    def penalty(self, pretrained: Iterable[tuple[str, nn.Parameter]], new: Iterable[nn.Parameter]) -> Tensor:
        terms: list[Tensor] = []
        for name, param in pretrained:
            if name not in self.anchor:
                continue
            ref = self.anchor[name]
            if ref.device != param.device:
                ref = self.anchor[name] = ref.to(param.device)
            terms.append(0.5 * self.alpha * (param.float() - ref.float()).pow(2).sum())
        if self.beta:
            terms.extend(0.5 * self.beta * p.float().pow(2).sum() for p in new)
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.cpu() for n, t in self.anchor.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.anchor = dict(state)
