"""Class-grouped training batches (``group_by_class``): every sample of a batch has a same-class partner in it.

SupCon learns only from anchors with a positive in their batch; random batches from many classes leave most
anchors without one. The DDP cases build one sampler per rank (``num_replicas=2``, ``rank=0/1``) without a
process group, as ``tests/test_samplers.py`` does.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_trainer

from datamodules.images import ImageFolderDataModule
from datamodules.samplers import ClassGroupedSampler, ShuffledSampler
from datamodules.tables import DataError
from datamodules.text import TextClassificationDataModule
from tlmodules import FineTuneModule
from tlmodules.contrastive import lone_anchor_share


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def anchors_without_partner(order: list[int], labels: list[int], batch_size: int) -> int:
    """Samples whose class appears only once in their batch (SupCon anchors that teach nothing)."""
    alone = 0
    for batch in batches_of(order, batch_size):
        counts = Counter(labels[i] for i in batch)
        alone += sum(1 for i in batch if counts[labels[i]] < 2)
    return alone


def test_two_balanced_classes_split_evenly_in_every_batch_and_every_sample_is_read_once() -> None:
    labels = [0] * 64 + [1] * 64
    sampler = ClassGroupedSampler(labels, batch_size=32, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(128)), "not a permutation of the dataset"
        assert [Counter(labels[i] for i in b) for b in batches_of(order, 32)] == [Counter({0: 16, 1: 16})] * 4
        orders.append(order)
    assert orders[0] != orders[1] != orders[2], "the order did not change between epochs"
    sampler.set_epoch(1)
    assert list(sampler) == orders[1], "an epoch's order is not reproducible"
    # random batches of the same data are not balanced (so the check above says something)
    shuffled = list(ShuffledSampler(128, seed=3))
    assert any(Counter(labels[i] for i in b)[0] != 16 for b in batches_of(shuffled, 32))


def test_many_classes_every_anchor_has_a_same_class_partner() -> None:
    labels = [c for c in range(50) for _ in range(8)]  # 50 classes, 8 examples each
    random.Random(0).shuffle(labels)
    for epoch in range(3):
        sampler = ClassGroupedSampler(labels, batch_size=32, seed=1)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(400))
        assert anchors_without_partner(order, labels, 32) == 0
        per_batch = [len(Counter(labels[i] for i in b)) for b in batches_of(order, 32)]
        assert min(per_batch[:-1]) >= 12, per_batch  # many classes per batch: negatives from across the label set
    # a random shuffle leaves about (1 - 7/399)^31 = 58 % of the anchors alone
    shuffled = list(ShuffledSampler(400, seed=1))
    assert anchors_without_partner(shuffled, labels, 32) > 0.4 * 400


def test_imbalanced_classes_keep_their_share_in_every_batch() -> None:
    labels = [0] * 870 + [1] * 130
    random.Random(1).shuffle(labels)
    order = list(ClassGroupedSampler(labels, batch_size=32, seed=0))
    assert sorted(order) == list(range(1000))
    minority = [sum(labels[i] for i in b) for b in batches_of(order, 32)[:-1]]
    # 13 % of 32 is 4.2: runs of two, spread evenly over the pass, give 4 or 6 in every batch, never none
    assert set(minority) <= {2, 4, 6}, minority
    assert abs(sum(minority) / len(minority) - 32 * 0.13) < 0.6
    assert anchors_without_partner(order, labels, 32) <= 2  # at most a pair cut by the last batch's edge


def test_a_class_of_odd_size_ends_in_a_run_of_three_not_a_lone_sample() -> None:
    labels = [0] * 7 + [1] * 9
    order = list(ClassGroupedSampler(labels, batch_size=4, per_class=2))
    runs, current = [], [order[0]]
    for i in order[1:]:
        if labels[i] == labels[current[-1]]:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    assert min(len(r) for r in runs) >= 2, runs


@pytest.mark.parametrize(("n", "batch_size"), [(128, 16), (101, 8)])
def test_ddp_ranks_get_distinct_grouped_shards_with_the_same_number_of_batches(n: int, batch_size: int) -> None:
    labels = [i % 4 for i in range(n)]
    for epoch in range(2):
        shards = []
        for rank in (0, 1):
            sampler = ClassGroupedSampler(labels, batch_size, num_replicas=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        a, b = shards
        assert len(a) == len(b) == (n + 1) // 2
        counts = Counter(a + b)
        assert set(counts) == set(range(n)) and sum(c - 1 for c in counts.values()) == n % 2  # only padding repeats
        for shard in shards:  # each process's full batches are grouped, not only the whole pass
            full = [batch for batch in batches_of(shard, batch_size) if len(batch) == batch_size]
            assert anchors_without_partner([i for batch in full for i in batch], labels, batch_size) <= 2


@pytest.mark.parametrize("per_class", [1, 33])
def test_per_class_outside_two_to_batch_size_is_refused(per_class: int) -> None:
    with pytest.raises(ValueError, match="per_class must be from 2 to batch_size=32"):
        ClassGroupedSampler([0, 1] * 10, batch_size=32, per_class=per_class)


def write_topics(path: Path, classes: int, per_class: int) -> Path:
    words = ["good", "bad", "movie", "film", "great", "awful"]  # in the tiny tokenizer's vocabulary
    rng = random.Random(0)
    rows = [(" ".join(rng.choices(words, k=4)), f"topic{c}") for c in range(classes) for _ in range(per_class)]
    rng.shuffle(rows)
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def test_text_datamodule_groups_training_batches_by_class(tiny_hf_dir: Path, tmp_path: Path) -> None:
    path = write_topics(tmp_path / "train.tsv", classes=20, per_class=10)

    def training_batches(group_by_class: bool) -> list[dict]:
        data = TextClassificationDataModule(
            train_file=str(path), tokenizer=str(tiny_hf_dir), batch_size=16, val_fraction=0.2,
            group_by_class=group_by_class,
        )  # fmt: skip
        data.setup("fit")
        return list(data.train_dataloader())

    def alone(batches: list[dict]) -> int:
        return sum(int((torch.bincount(b["labels"])[b["labels"]] < 2).sum()) for b in batches)

    grouped, plain = training_batches(True), training_batches(False)
    for batches in (grouped, plain):  # the training split (160 of 200 texts) once each, either way
        indices = torch.cat([b["index"] for b in batches]).tolist()
        assert len(indices) == len(set(indices)) == 160
    assert alone(grouped) == 0
    assert alone(plain) > 40  # 20 classes, batches of 16: most random anchors have no partner


def test_image_datamodule_groups_training_batches_by_class(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder("train", classes=tuple("abcdefgh"), per_class=6)
    data = ImageFolderDataModule(
        train_dir=str(root), backbone="resnet18", weights=None, image_size=16, batch_size=8, val_fraction=0.0,
        num_workers=0, group_by_class=True,
    )  # fmt: skip
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 48
    for b in batches:
        assert int(torch.bincount(b["labels"])[b["labels"]].min()) >= 2, b["labels"].tolist()


def test_grouping_by_length_and_by_class_at_once_is_a_clear_error(tiny_hf_dir: Path, tmp_path: Path) -> None:
    path = write_topics(tmp_path / "train.tsv", classes=2, per_class=5)
    with pytest.raises(DataError, match="group_by_length and group_by_class both set"):
        TextClassificationDataModule(
            train_file=str(path), tokenizer=str(tiny_hf_dir), group_by_length=True, group_by_class=True
        )


# -- the contrastive strategy says when random batches would waste its anchors -------------------------------
@pytest.mark.parametrize(
    ("labels", "batch_size"), [([c for c in range(20) for _ in range(6)], 16), ([0] * 90 + [1] * 10, 8)]
)
def test_lone_anchor_share_matches_random_batches(labels: list[int], batch_size: int) -> None:
    expected = lone_anchor_share(labels, batch_size)
    alone = total = 0
    for epoch in range(200):
        sampler = ShuffledSampler(len(labels), seed=0)
        sampler.set_epoch(epoch)
        order = list(sampler)
        full = len(order) // batch_size * batch_size  # the formula is for full batches
        alone += anchors_without_partner(order[:full], labels, batch_size)
        total += full
    assert abs(alone / total - expected) < 0.02, (alone / total, expected)


def test_lone_anchor_share_at_the_edges() -> None:
    assert lone_anchor_share([0] * 64 + [1] * 64, 32) < 1e-9  # two balanced classes: always a partner
    assert lone_anchor_share([0, 1, 2], 32) == 1.0  # three examples of three classes: never one
    assert lone_anchor_share([0, 0, 1, 1], 32) == 0.0  # one batch holds both of each class


def contrastive_fit_warnings(tiny_hf_dir: Path, tmp_path: Path, group_by_class: bool) -> list[str]:
    data = TextClassificationDataModule(
        train_file=str(write_topics(tmp_path / "topics.tsv", classes=12, per_class=4)),
        backbone=f"hf:{tiny_hf_dir}", max_length=16, batch_size=8, baseline="none", group_by_class=group_by_class,
    )  # fmt: skip
    model = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=1, max_epochs=None, default_root_dir=tmp_path).fit(model, datamodule=data)
    return [str(w.message) for w in caught if "same-class partner" in str(w.message)]


def test_contrastive_warns_of_lone_anchors_until_batches_are_grouped_by_class(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    # 12 classes of 4, batches of 8: C(44, 7) / C(47, 7) = 61 % of the anchors have no partner in a random batch
    (message,) = contrastive_fit_warnings(tiny_hf_dir, tmp_path, group_by_class=False)
    assert "about 61% of the training examples" in message and "group_by_class: true" in message
    assert contrastive_fit_warnings(tiny_hf_dir, tmp_path, group_by_class=True) == []
