"""BatchNorm statistics of the target domain alone, for evaluating and predicting on the target (AdaBN).

AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR workshop
2017) keeps the trained weights and swaps every BatchNorm layer's running statistics for the target domain's:
each domain is normalised by its own mean and variance. Here the target statistics are gathered while training
runs, from the target rows of each training batch, as domain-specific BatchNorm does (Chang et al.,
"Domain-Specific Batch Normalization for Unsupervised Domain Adaptation", CVPR 2019; the affine weights stay
shared). With one BatchNorm layer (the bottleneck of the digit recipe) this is AdaBN's statistics as a running
average over the last steps; in deeper networks each layer's target statistics are taken under the joint
normalisation of the layers before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

TARGET_MEAN, TARGET_VAR = "target_running_mean", "target_running_var"


class TargetBatchNormStatistics:
    """Target running statistics for every BatchNorm layer under ``roots`` (that tracks running statistics).

    Each layer gets two persistent buffers, ``target_running_mean`` and ``target_running_var`` (so checkpoints hold
    them and DDP broadcasts them with the other buffers), updated like the layer's own running statistics (its
    ``momentum``, the unbiased variance) but from the rows that :meth:`collecting` names. :meth:`applied` swaps them
    in for the length of a block.
    """

    def __init__(self, roots: list[nn.Module]) -> None:
        self.layers: list[_BatchNorm] = [
            m for root in roots for m in root.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
        ]
        self._rows: slice | None = None
        for layer in self.layers:
            layer.register_buffer(TARGET_MEAN, layer.running_mean.detach().clone())
            layer.register_buffer(TARGET_VAR, layer.running_var.detach().clone())
            layer.register_forward_pre_hook(self._update)

    def _update(self, layer: _BatchNorm, inputs: tuple[Tensor, ...]) -> None:
        if self._rows is None or not layer.training:
            return
        rows = inputs[0][self._rows].detach().float()
        if len(rows) < 2:
            return
        dims = [0, *range(2, rows.dim())]  # every dimension but the channels
        mean = rows.mean(dims)
        var = rows.var(dims, unbiased=True)
        momentum = layer.momentum if layer.momentum is not None else 0.1
        with torch.no_grad():
            getattr(layer, TARGET_MEAN).lerp_(mean.to(layer.running_mean.dtype), momentum)
            getattr(layer, TARGET_VAR).lerp_(var.to(layer.running_var.dtype), momentum)

    @contextmanager
    def collecting(self, rows: slice) -> Iterator[None]:
        """Forward passes in the block update the target statistics from the batch rows ``rows`` (training mode)."""
        self._rows = rows
        try:
            yield
        finally:
            self._rows = None

    @contextmanager
    def applied(self) -> Iterator[None]:
        """In the block, every layer normalises with the target statistics (in eval mode)."""
        saved = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in self.layers]
        for layer in self.layers:
            layer.running_mean.copy_(getattr(layer, TARGET_MEAN))
            layer.running_var.copy_(getattr(layer, TARGET_VAR))
        try:
            yield
        finally:
            for layer, (mean, var) in zip(self.layers, saved):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)

    def adopt(self) -> None:
        """Make the target statistics the layers' own, for good (a model to deploy on the target domain only)."""
        for layer in self.layers:
            layer.running_mean.copy_(getattr(layer, TARGET_MEAN))
            layer.running_var.copy_(getattr(layer, TARGET_VAR))
