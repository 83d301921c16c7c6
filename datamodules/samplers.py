"""Samplers the datamodules hand to their loaders.

Under DDP Lightning replaces a loader's sampler with a ``DistributedSampler`` that pads every rank's
shard to the same length by repeating samples: fine for training, but a validation or test metric then
counts a few samples twice. :func:`evaluation_sampler` shards evaluation data without repeats instead
(ranks may differ by one sample), so synchronised metrics equal those over the whole split.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset


def evaluation_sampler(dataset: Dataset, trainer: Any) -> UnrepeatedDistributedSampler | None:
    """An in-order shard of ``dataset`` for this process, without padding, when ``trainer`` runs on more than
    one process; ``None`` otherwise (the loader then reads in order and Lightning leaves it alone).

    A split with fewer samples than processes keeps Lightning's padded sampler: every process must run at
    least one batch.
    """
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world_size <= 1 or len(dataset) < world_size:  # type: ignore[arg-type]
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=trainer.global_rank, shuffle=False)
