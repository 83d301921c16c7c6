"""BatchNorm statistics of the target domain alone, for evaluating and predicting on the target (AdaBN).

AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR workshop
2017) keeps the trained weights and swaps every BatchNorm layer's running statistics for the target domain's:
each domain is normalised by its own mean and variance. Two ways fill the target statistics:

- :meth:`TargetBatchNormStatistics.estimate`, AdaBN's own: one pass over the target's training images with the
  network in eval mode (dropout off) and the BatchNorm layers averaging their batch statistics over the whole pass;
- while training runs, from the target rows of each training batch, as domain-specific BatchNorm does (Chang et
  al., "Domain-Specific Batch Normalization for Unsupervised Domain Adaptation", CVPR 2019; the affine weights
  stay shared): a fallback where the target's training split cannot be read again. These statistics are taken in
  training mode, so they carry dropout's extra variance, which the network at evaluation does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

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

    @torch.no_grad()
    def estimate(self, batches: Iterable[Any], forward: Callable[[Any], Any]) -> int:
        """AdaBN's statistics: run ``forward`` over ``batches`` (the target's training inputs; the caller has put the
        network in eval mode) with only the BatchNorm layers in training mode and averaging every batch's statistics
        (``momentum=None``), and keep the result as the target statistics. The layers' own statistics, momentum and
        mode are restored. Returns the number of batches (0: the target statistics are left as they were)."""
        saved = [
            (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone(), layer.momentum)
            for layer in self.layers
        ]
        modes = [layer.training for layer in self.layers]
        for layer in self.layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        rows, self._rows = self._rows, None  # this pass is not a training step: nothing to collect
        count = 0
        try:
            for batch in batches:
                forward(batch)
                count += 1
            if count:
                for layer in self.layers:
                    getattr(layer, TARGET_MEAN).copy_(layer.running_mean)
                    getattr(layer, TARGET_VAR).copy_(layer.running_var)
        finally:
            self._rows = rows
            for layer, (mean, var, tracked, momentum), training in zip(self.layers, saved, modes):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(tracked)
                layer.momentum = momentum
                layer.train(training)
        return count

    def buffers(self) -> list[Tensor]:
        """The target statistics of every layer, in a fixed order (for averaging across processes)."""
        return [getattr(layer, name) for layer in self.layers for name in (TARGET_MEAN, TARGET_VAR)]
