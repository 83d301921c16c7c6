"""Samplers: length-grouped training batches and unpadded evaluation shards.

The DDP cases build one sampler per rank (``num_replicas=2``, ``rank=0/1``) without a process group; the
real two-process run is in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.samplers import LengthGroupedSampler, evaluation_sampler
from datamodules.text import TextClassificationDataModule


def random_lengths(n: int, seed: int = 0) -> list[int]:
    """Sentence-like token counts: mostly short, a long tail (5 to 120)."""
    rng = random.Random(seed)
    return [min(120, 5 + int(rng.expovariate(1 / 20))) for _ in range(n)]


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    """What a DataLoader reading ``order`` in sequence makes of it."""
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    """Tokens in the padded batches (each batch padded to its longest member)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_one_process_visits_every_sample_once_per_epoch_in_alike_batches() -> None:
    lengths = random_lengths(1000)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3, group_batches=20)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(1000)), "not a permutation of the dataset"
        assert len(sampler) == 1000
        orders.append(order)
    assert orders[0] != orders[1] != orders[2], "the order did not change between epochs"
    sampler.set_epoch(1)
    assert list(sampler) == orders[1], "an epoch's order is not reproducible"

    grouped = padded_tokens(batches_of(orders[0], 16), lengths)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = padded_tokens(batches_of(shuffled, 16), lengths)
    real = sum(lengths)
    assert grouped < 1.2 * real, f"grouped batches still pad a lot: {grouped} tokens for {real}"
    assert random_batches > 1.8 * real, "the random baseline pads little: the comparison says nothing"
    # ... while the batches are still in random order: neither sorted by length nor the same every epoch
    first_lengths = [max(lengths[i] for i in b) for b in batches_of(orders[0], 16)]
    assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths, reverse=True)


def test_the_one_short_batch_comes_last() -> None:
    lengths = random_lengths(100)
    order = list(LengthGroupedSampler(lengths, batch_size=16, group_batches=2))
    sizes = [len(b) for b in batches_of(order, 16)]
    assert sizes == [16] * 6 + [4]
    assert sorted(order) == list(range(100))


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 16), (999, 16), (37, 8), (3, 4)])
def test_ddp_ranks_get_distinct_shards_with_the_same_number_of_batches(n: int, batch_size: int) -> None:
    lengths = random_lengths(n, seed=n)
    for epoch in range(2):
        per_rank = []
        for rank in (0, 1):
            sampler = LengthGroupedSampler(lengths, batch_size, num_replicas=2, rank=rank, seed=5, group_batches=4)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        a, b = per_rank
        # equal shards (DistributedSampler's contract), so both ranks run the same number of batches
        assert len(a) == len(b) == (n + 1) // 2
        assert len(batches_of(a, batch_size)) == len(batches_of(b, batch_size))
        # together they cover the dataset; only the padding (one sample when n is odd) repeats
        counts = Counter(a + b)
        assert set(counts) == set(range(n))
        assert sum(c - 1 for c in counts.values()) == (n % 2)
        # every batch but a rank's last is full
        for order in per_rank:
            assert all(len(batch) == batch_size for batch in batches_of(order, batch_size)[:-1])
    if n >= 100:  # and the shards' batches are alike: far less padding than random batches of the same samples
        for order in per_rank:
            shuffled = [order[i] for i in torch.randperm(len(order), generator=torch.Generator().manual_seed(0))]
            grouped, random_ = (padded_tokens(batches_of(o, batch_size), lengths) for o in (order, shuffled))
            assert grouped < 0.75 * random_, (grouped, random_)


def test_evaluation_sampler_shards_without_repeats_only_under_ddp() -> None:
    dataset = list(range(13))
    assert evaluation_sampler(dataset, None) is None
    assert evaluation_sampler(dataset, SimpleNamespace(world_size=1, global_rank=0)) is None
    shards = [list(evaluation_sampler(dataset, SimpleNamespace(world_size=2, global_rank=r))) for r in (0, 1)]
    assert shards == [list(range(0, 13, 2)), list(range(1, 13, 2))]
    # a split smaller than the number of processes keeps Lightning's padded sampler (every rank needs a batch)
    assert evaluation_sampler([0], SimpleNamespace(world_size=2, global_rank=1)) is None


def test_text_datamodule_groups_training_batches_by_length(tiny_hf_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["good", "bad", "movie", "film", "great", "awful"]  # in the tiny tokenizer's vocabulary
    lines = ["text\tlabel"]
    for i in range(200):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.choice([2, 3, 4, 30, 40]))) + f"\t{i % 2}")
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")

    def epoch_batches(group_by_length: bool) -> list[dict]:
        data = TextClassificationDataModule(
            train_file=str(path), tokenizer=str(tiny_hf_dir), batch_size=16, val_fraction=0.1,
            group_by_length=group_by_length,
        )  # fmt: skip
        data.setup("fit")
        return list(data.train_dataloader())

    for group_by_length in (False, True):
        batches = epoch_batches(group_by_length)
        indices = torch.cat([b["index"] for b in batches]).tolist()
        assert sorted(indices) == sorted(set(indices)) and len(indices) == 180  # the training split, once each
    grouped, plain = epoch_batches(True), epoch_batches(False)
    real = sum(int(b["inputs"]["attention_mask"].sum()) for b in grouped)
    grouped_tokens = sum(b["inputs"]["input_ids"].numel() for b in grouped)
    plain_tokens = sum(b["inputs"]["input_ids"].numel() for b in plain)
    assert grouped_tokens < 1.2 * real < plain_tokens, (grouped_tokens, real, plain_tokens)
    # the validation loader is untouched: in order
    data = TextClassificationDataModule(
        train_file=str(path), tokenizer=str(tiny_hf_dir), batch_size=16, group_by_length=True, val_fraction=0.1
    )
    data.setup("fit")
    val = torch.cat([b["index"] for b in data.val_dataloader()]).tolist()
    assert val == sorted(val)
