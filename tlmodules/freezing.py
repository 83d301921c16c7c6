"""Freezing that really freezes, and unfreezing that survives DDP and resumes.

Three known failure modes of fine-tuning callbacks are handled here:

1. A frozen BatchNorm keeps updating its running statistics (and frozen dropout keeps dropping)
   because ``model.train()`` reaches it: :func:`eval_frozen_submodules` puts every submodule whose
   parameters are all frozen back into eval mode after each ``train()``.
2. DDP's gradient reducer only knows the parameters that required gradients when the model was
   wrapped; parameters unfrozen later are silently not averaged across processes and drift apart.
   :class:`LateParameterSync` records the parameters outside the reducer and all-reduces their
   gradients itself before each optimizer step.
3. Resuming after an unfreeze must restore the unfrozen state before DDP wraps the model and
   before the optimizer is built: the trainable state is a pure function of the epoch
   (:func:`tlmodules.schedules.trainable_top_groups`) and is re-applied from the checkpoint's epoch.

Frozen parameters have ``requires_grad=False``, so they get no gradient; optimizers skip
parameters without a gradient, weight decay included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def eval_frozen_submodules(module: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen into eval mode (BatchNorm, dropout).

    A submodule without parameters (dropout, activation) follows its nearest ancestor that has
    parameters: it is in eval mode when that ancestor is entirely frozen.
    """
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        if any(True for _ in child.parameters()):
            eval_frozen_submodules(child)


class LateParameterSync:
    """Average across processes the gradients of parameters that DDP's reducer does not cover.

    Call :meth:`record` once the model is wrapped (``on_fit_start``): every parameter frozen
    at that moment is outside the reducer. Call :meth:`sync` before each optimizer step
    (``on_before_optimizer_step``); it all-reduces, as one flat tensor, the gradients of the
    recorded parameters that train now. Every process unfreezes at the same epoch, so every
    process makes the same collective call.
    """

    def __init__(self) -> None:
        self.outside: list[nn.Parameter] = []

    def record(self, module: nn.Module, wrapped_by_ddp: bool) -> None:
        self.outside = [p for p in module.parameters() if not p.requires_grad] if wrapped_by_ddp else []

    def sync(self) -> int:
        """All-reduce (mean) the late parameters' gradients; return how many parameters were synced."""
        if not self.outside or not (dist.is_available() and dist.is_initialized()):
            return 0
        late = [p for p in self.outside if p.requires_grad]
        if not late:
            return 0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in late]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, synced in zip(late, torch._utils._unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = synced.clone()
            else:
                p.grad.copy_(synced)
        return len(late)
