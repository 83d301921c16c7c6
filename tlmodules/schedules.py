"""Pure functions of training progress: learning-rate shapes and unfreezing schedules.

Everything here is computed from the trainer's own counters (epoch, step / total steps), never
from a hidden counter, so a resumed run continues every schedule where it stopped.
"""

from __future__ import annotations

import math
from typing import Literal

from tlmodules.errors import ConfigError

FinetuneStrategy = Literal["full", "freeze", "freeze_unfreeze", "gradual", "lp_ft", "contrastive"]
LRSchedule = Literal["constant", "cosine", "linear", "dann"]
FINETUNE_STRATEGIES: tuple[str, ...] = ("full", "freeze", "freeze_unfreeze", "gradual", "lp_ft", "contrastive")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "dann")


def trainable_top_groups(strategy: str, epoch: int, num_groups: int, unfreeze_epoch: int = 1) -> int:
    """How many backbone layer groups, counted from the output side, train during ``epoch``.

    - ``full`` and ``contrastive`` (whose head is fitted, not trained): all of them from the start.
    - ``freeze``: none (the head alone trains: linear probing).
    - ``freeze_unfreeze`` and ``lp_ft``: none before ``unfreeze_epoch``, all from then on
      (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022).
    - ``gradual``: one more group per epoch from ``unfreeze_epoch`` on, top group first
      (ULMFiT gradual unfreezing: Howard & Ruder, ACL 2018).
    """
    if strategy in ("full", "contrastive"):
        return num_groups
    if strategy == "freeze":
        return 0
    if strategy in ("freeze_unfreeze", "lp_ft"):
        return num_groups if epoch >= unfreeze_epoch else 0
    if strategy == "gradual":
        return max(0, min(num_groups, epoch - unfreeze_epoch + 1))
    raise ConfigError(f"unknown fine-tuning strategy {strategy!r}; choose one of {', '.join(FINETUNE_STRATEGIES)}")


def lr_shape(schedule: str, progress: float, warmup_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``progress`` ∈ [0, 1] (step / total steps).

    Linear warm-up over the first ``warmup_fraction`` of training, then ``constant``,
    ``cosine`` (to 0; Loshchilov & Hutter 2017), ``linear`` decay (to 0) or DANN's annealing
    ``1 / (1 + 10 p)^0.75`` (:func:`dann_lr_factor`).
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return progress / warmup_fraction
    if schedule == "constant":
        return 1.0
    rest = (progress - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * rest))
    if schedule == "linear":
        return 1.0 - rest
    return dann_lr_factor(rest)


def layer_lr_multipliers(num_groups: int, backbone_lr_ratio: float, layer_decay: float | None) -> list[float]:
    """Learning-rate multipliers of the backbone groups (input side first), relative to the head's.

    Without decay every group gets ``backbone_lr_ratio``. With layer-wise decay (as in BEiT/ELECTRA
    fine-tuning) the top group gets ``backbone_lr_ratio`` and each group below it ``layer_decay``
    times the one above: group ``i`` of ``G`` gets ``backbone_lr_ratio · layer_decay^(G-1-i)``.
    """
    if layer_decay is None:
        return [backbone_lr_ratio] * num_groups
    return [backbone_lr_ratio * layer_decay ** (num_groups - 1 - i) for i in range(num_groups)]


def dann_lambda(progress: float, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """DANN's adaptation weight ``λ_p = λ_max · (2 / (1 + exp(-γ p)) - 1)`` (Ganin et al., JMLR 2016, §5.2.2):
    0 at the start, rising to ``λ_max``, so the early, noisy discriminator does not disturb the features."""
    progress = min(max(progress, 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


def dann_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN's annealing ``μ_p / μ_0 = 1 / (1 + α p)^β`` (Ganin et al., JMLR 2016, §5.2.2)."""
    progress = min(max(progress, 0.0), 1.0)
    return (1.0 + alpha * progress) ** (-beta)


def linear_ramp(progress: float, warmup: float) -> float:
    """A weight's multiplier at training ``progress`` ∈ [0, 1]: rising linearly from 0 to 1 over the first
    ``warmup`` of training, then 1 (``warmup = 0``: 1 from the start). A pure function of progress, so a resumed
    run continues it."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, progress) / warmup)
