"""Samplers the datamodules hand to their loaders.

Under DDP Lightning replaces a loader's sampler with a ``DistributedSampler`` that pads every rank's
shard to the same length by repeating samples: fine for training, but a validation or test metric then
counts a few samples twice. :func:`evaluation_sampler` shards evaluation data without repeats instead
(ranks may differ by one sample), so synchronised metrics equal those over the whole split.
:class:`LengthGroupedSampler` orders training text into batches of similar lengths, sharded per process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler


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


class LengthGroupedSampler(DistributedSampler):
    """Training order whose consecutive runs of ``batch_size`` samples have similar lengths.

    Random batches of sentences are padded to their longest member, so most of their tokens are padding.
    As in Hugging Face's ``group_by_length``: each epoch shuffles the samples (seeded by ``seed + epoch``),
    cuts the order into groups of ``group_batches`` batches per process, sorts each group by length, cuts
    it into batches and shuffles the batches, so batches stay random while their members are alike.

    Under DDP (``num_replicas`` > 1) it shards like ``DistributedSampler``: the order is padded by repeating
    samples to a multiple of the number of processes, and each process takes every ``num_replicas``-th batch,
    so every process runs the same number of batches (a process's one short batch comes last). It is a
    ``DistributedSampler``, so Lightning keeps it and calls :meth:`set_epoch` every epoch; the loader must
    read it in order with the same ``batch_size``.

    Args:
        lengths: the length (e.g. token count) of every sample of the dataset.
        batch_size: samples per batch (the loader's).
        num_replicas, rank: processes and this process's rank (1 and 0 without DDP).
        seed: shuffling seed; epoch ``e`` uses ``seed + e``.
        group_batches: batches per process sorted together; larger groups pad less but mix less.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_batches: int = 50,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        super().__init__(self.lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        if batch_size <= 0 or group_batches <= 0:
            raise ValueError(f"batch_size and group_batches must be positive, got {batch_size} and {group_batches}")
        self.batch_size = batch_size
        self.group_batches = group_batches

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order += (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        group = self.batch_size * self.num_replicas * self.group_batches
        order = [i for s in range(0, len(order), group) for i in sorted(order[s : s + group], key=self._longest_first)]
        full_batches, short = divmod(self.num_samples, self.batch_size)
        cut = full_batches * self.batch_size * self.num_replicas
        batches = [order[s : s + self.batch_size] for s in range(0, cut, self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        mine = [i for batch in batches[self.rank :: self.num_replicas] for i in batch]
        mine += order[cut + self.rank * short : cut + (self.rank + 1) * short]
        return iter(mine)

    def _longest_first(self, index: int) -> int:
        return -self.lengths[index]


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, trainer: Any, seed: int) -> LengthGroupedSampler:
    """A :class:`LengthGroupedSampler` for ``trainer``'s processes (one process when ``trainer`` is ``None``)."""
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = trainer.global_rank if world_size > 1 else 0
    return LengthGroupedSampler(lengths, batch_size, num_replicas=world_size, rank=rank, seed=seed)
