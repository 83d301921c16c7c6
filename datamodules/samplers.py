"""Samplers the datamodules hand to their loaders.

Under DDP Lightning replaces a loader's sampler with a ``DistributedSampler`` that pads every rank's
shard to the same length by repeating samples: fine for training, but a validation or test metric then
counts a few samples twice. :func:`evaluation_sampler` shards evaluation data without repeats instead
(ranks may differ by one sample), so synchronised metrics equal those over the whole split.

Training samplers are :class:`ResumableSampler` subclasses: one iteration is a *pass* ``(epoch, cycle)`` whose
order is a pure function of ``(seed, epoch, cycle)`` and the process's shard, and a pass can start part-way, so a run
resumed mid-epoch (:class:`datamodules.loaders.ResumableLoader` keeps the count) reads what the uninterrupted
run would have read. :class:`ShuffledSampler` shuffles like ``DistributedSampler``;
:class:`LengthGroupedSampler` orders training text into batches of similar lengths, and :class:`ClassGroupedSampler`
into batches that hold each of their classes several times (for contrastive losses), both sharded per process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
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


def mix_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` that depends on every part (a hash of their ``repr``).

    Unlike ``seed + epoch``, neighbouring inputs (seed 0 epoch 1, seed 1 epoch 0, or the same numbers for
    another purpose, named by a string part) give unrelated seeds. It fits an int64 tensor and
    ``torch.Generator.manual_seed``.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PassSeeds:
    """The seeds of a dataset's random per-item transforms, once a training loader has named the pass.

    :class:`datamodules.loaders.ResumableLoader` calls the dataset's ``set_pass(key)`` with a seed of ``(seed,
    epoch, cycle)``; from then on item ``index`` transforms under the seed ``mix_seed(key, index)``: the same draws
    whichever worker process reads it, in whatever order, and again in a resumed run. The key lives in shared
    memory, so persistent workers (copies of the dataset made once) see each new pass. Before any pass is named
    the transform draws from the global generator.
    """

    def __init__(self) -> None:
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()  # [named?, key]

    def set_pass(self, key: int) -> None:
        """Seed every item's random transform by ``(key, index)`` from now on."""
        self._pass[1] = int(key)
        self._pass[0] = 1

    def item_seed(self, index: int) -> int | None:
        """The seed of item ``index``'s random transform in the current pass; ``None`` before any pass."""
        named, key = self._pass.tolist()
        return mix_seed(key, index) if named else None

    def apply(self, index: int, transform: Callable[..., Any], *args: Any) -> Any:
        """``transform(*args)`` drawing from item ``index``'s seed, leaving the caller's CPU stream as it was."""
        seed = self.item_seed(index)
        if seed is None:
            return transform(*args)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
            return transform(*args)


class ResumableSampler(DistributedSampler):
    """A training sampler whose every iteration is one pass ``(epoch, cycle)`` that may start part-way.

    ``epoch`` comes from :meth:`set_epoch` (Lightning calls it every epoch; it keeps a ``DistributedSampler``
    subclass as it is, so this also shards under DDP). ``cycle`` counts re-reads within an epoch: a
    ``CombinedLoader("max_size_cycle")`` iterates its shorter side again, and each re-read should get a fresh
    order, not the same one again. ``skip`` drops the first samples of the pass (those a resumed run already
    trained on). The loader sets ``cycle`` and ``skip`` through :meth:`start_pass`; nothing else is hidden, so
    the loader's ``(epoch, cycle, batches consumed)`` is the whole position.

    Subclasses implement :meth:`pass_order`: this process's samples for the current pass, a pure function of
    ``seed``, ``epoch``, ``cycle``, ``num_replicas`` and ``rank``.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.cycle = 0
        self.skip = 0

    def start_pass(self, cycle: int, skip: int) -> None:
        """The next iteration reads pass ``(self.epoch, cycle)`` from its ``skip``-th sample on."""
        if cycle < 0 or skip < 0:
            raise ValueError(f"cycle and skip must be >= 0, got {cycle} and {skip}")
        self.cycle, self.skip = cycle, skip

    def pass_key(self) -> int:
        """The seed of the current pass: per-item random transforms draw from it (``set_pass`` of a dataset)."""
        return mix_seed(self.seed, self.epoch, self.cycle)

    def pass_order(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.pass_order()[self.skip :])

    def shard_batches(self, order: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
        """This process's share of ``order`` (a permutation of the dataset, whose consecutive runs of
        ``batch_size`` are the batches meant): padded by repeating samples to a multiple of the number of
        processes, cut into full batches, the batches shuffled by ``generator`` and dealt out ``rank::num_replicas``,
        so every process runs the same number of batches (a process's one short batch comes last). A re-read within
        an epoch (cycle > 0) shuffles this process's full batches again, seeded by :meth:`pass_key`."""
        order = order + (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        full_batches, short = divmod(self.num_samples, batch_size)
        cut = full_batches * batch_size * self.num_replicas
        batches = [order[s : s + batch_size] for s in range(0, cut, batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        batches = batches[self.rank :: self.num_replicas]
        if self.cycle:
            again = torch.Generator().manual_seed(self.pass_key())
            batches = [batches[i] for i in torch.randperm(len(batches), generator=again).tolist()]
        mine = [i for batch in batches for i in batch]
        mine += order[cut + self.rank * short : cut + (self.rank + 1) * short]
        return mine


class ShuffledSampler(ResumableSampler):
    """Shuffled training order: in cycle 0 of an epoch exactly ``DistributedSampler``'s (a permutation seeded by
    ``seed + epoch``, padded by repeating samples to a multiple of ``num_replicas``, every ``num_replicas``-th
    sample to this process); a re-read in the same epoch (cycle > 0) permutes this process's shard again, seeded
    by :meth:`pass_key`, so processes stay disjoint and each cycle is a fresh order.
    """

    def pass_order(self) -> list[int]:
        shard = list(DistributedSampler.__iter__(self))
        if self.cycle:
            generator = torch.Generator().manual_seed(self.pass_key())
            shard = [shard[i] for i in torch.randperm(len(shard), generator=generator).tolist()]
        return shard


class LengthGroupedSampler(ResumableSampler):
    """Training order whose consecutive runs of ``batch_size`` samples have similar lengths.

    Random batches of sentences are padded to their longest member, so most of their tokens are padding.
    As in Hugging Face's ``group_by_length``: each epoch shuffles the samples (seeded by ``seed + epoch``),
    cuts the order into groups of ``group_batches`` batches per process, sorts each group by length, cuts
    it into batches and shuffles the batches, so batches stay random while their members are alike.

    Under DDP (``num_replicas`` > 1) it shards like ``DistributedSampler``: the order is padded by repeating
    samples to a multiple of the number of processes, and each process takes every ``num_replicas``-th batch,
    so every process runs the same number of batches (a process's one short batch comes last). It is a
    ``DistributedSampler``, so Lightning keeps it and calls :meth:`set_epoch` every epoch; the loader must
    read it in order with the same ``batch_size``. A re-read within an epoch (cycle > 0, see
    :class:`ResumableSampler`) shuffles this process's full batches again, seeded by :meth:`pass_key`.

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
        super().__init__(len(self.lengths), num_replicas=num_replicas, rank=rank, seed=seed)
        if batch_size <= 0 or group_batches <= 0:
            raise ValueError(f"batch_size and group_batches must be positive, got {batch_size} and {group_batches}")
        self.batch_size = batch_size
        self.group_batches = group_batches

    def pass_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order += (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        group = self.batch_size * self.num_replicas * self.group_batches
        order = [i for s in range(0, len(order), group) for i in sorted(order[s : s + group], key=self._longest_first)]
        return self.shard_batches(order, self.batch_size, generator)

    def _longest_first(self, index: int) -> int:
        return -self.lengths[index]


class ClassGroupedSampler(ResumableSampler):
    """Training order whose batches hold each of their classes several times: positives for a contrastive loss.

    A supervised contrastive loss (SupCon, Khosla et al. 2020) learns only from the anchors that have a same-class
    partner in their batch. Random batches of ``B`` from ``C`` balanced classes leave an anchor without one with
    probability about ``(1 - 1/C)^(B-1)``: nil for 2 classes, 4 % for 10 at ``B = 32``, 20 % for 20, half of them
    for 50. As the P×K batches of metric learning (Hermans et al., "In Defense of the Triplet Loss for Person
    Re-Identification", 2017) do, each pass here keeps same-class samples together: it shuffles every class and
    cuts it into runs of ``per_class`` samples, and spreads each class's runs evenly over the pass (run ``j`` of a
    class with ``n`` runs sits at ``(j + u) / n``, ``u`` drawn per class). So every batch's mix follows the classes'
    shares (two balanced classes: 16 and 16 in every batch of 32), no class is used up early, and a class in a batch
    is there at least twice, unless a batch's edge cuts one of its runs (which an odd batch size, or a class's run
    of three before it, can make happen). Every sample is read once per pass, as with a shuffle; a class's last,
    shorter run joins the one before it (a run of three) rather than stand alone.

    Under DDP it shards like :class:`LengthGroupedSampler` (whole batches per process, see
    :meth:`ResumableSampler.shard_batches`), so each process's batch keeps its runs together.

    Args:
        labels: the class index of every sample of the dataset.
        batch_size: samples per batch (the loader's).
        num_replicas, rank: processes and this process's rank (1 and 0 without DDP).
        seed: shuffling seed; epoch ``e`` uses ``seed + e``.
        per_class: samples of one class kept together: the fewest of a class in a batch that holds it.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        per_class: int = 2,
    ) -> None:
        self.labels = [int(y) for y in labels]
        super().__init__(len(self.labels), num_replicas=num_replicas, rank=rank, seed=seed)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 2 <= per_class <= batch_size:
            raise ValueError(f"per_class must be from 2 to batch_size={batch_size}, got {per_class}")
        self.batch_size, self.per_class = batch_size, per_class
        members: dict[int, list[int]] = {}
        for i, y in enumerate(self.labels):  # one pass, not one per class: a few hundred classes are common
            members.setdefault(y, []).append(i)
        self.members = dict(sorted(members.items()))

    def pass_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        runs: list[tuple[float, list[int]]] = []
        for members in self.members.values():
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            class_runs = [shuffled[s : s + self.per_class] for s in range(0, len(shuffled), self.per_class)]
            if len(class_runs) > 1 and len(class_runs[-1]) < self.per_class:
                class_runs[-2].extend(class_runs.pop())
            offset = float(torch.rand((), generator=generator))
            runs += [((j + offset) / len(class_runs), run) for j, run in enumerate(class_runs)]
        runs.sort(key=lambda keyed: keyed[0])
        return self.shard_batches([i for _, run in runs for i in run], self.batch_size, generator)


def _processes(trainer: Any) -> tuple[int, int]:
    """``(world_size, rank)`` of ``trainer`` (one process when ``trainer`` is ``None``)."""
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    return world_size, trainer.global_rank if world_size > 1 else 0


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, trainer: Any, seed: int) -> LengthGroupedSampler:
    """A :class:`LengthGroupedSampler` for ``trainer``'s processes (one process when ``trainer`` is ``None``)."""
    world_size, rank = _processes(trainer)
    return LengthGroupedSampler(lengths, batch_size, num_replicas=world_size, rank=rank, seed=seed)


def training_sampler(
    size: int,
    batch_size: int,
    trainer: Any,
    seed: int,
    lengths: Sequence[int] | None = None,
    labels: Sequence[int] | None = None,
) -> ResumableSampler:
    """The training sampler for ``trainer``'s processes: class-grouped batches where ``labels`` are given,
    length-grouped ones where ``lengths`` are, else a :class:`ShuffledSampler`."""
    world_size, rank = _processes(trainer)
    if labels is not None:
        return ClassGroupedSampler(labels, batch_size, num_replicas=world_size, rank=rank, seed=seed)
    if lengths is not None:
        return length_grouped_sampler(lengths, batch_size, trainer, seed)
    return ShuffledSampler(size, num_replicas=world_size, rank=rank, seed=seed)


class LengthOrderedSampler(DistributedSampler):
    """One process's share of a split in length order, longest first, for passes whose result does not depend on
    the order (a frozen backbone's features, predictions): batches of similar lengths are hardly padded.

    The samples sorted by length (ties in dataset order) are cut into batches of ``batch_size``, and process
    ``rank`` takes batches ``rank, rank + num_replicas, …``: every sample once, no padding repeats, and the
    processes get batches of alike lengths (one may have a batch more). Read it with the same ``batch_size``.
    It is a ``DistributedSampler``, so Lightning keeps it under DDP.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.batches = batches[rank::num_replicas]
        self.num_samples = sum(len(b) for b in self.batches)
        self.total_size = len(order)

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.batches for i in batch)

    def __len__(self) -> int:
        return self.num_samples
