"""DomainAdaptationDataModule (label spaces, paired training batches, per-domain evaluation loaders) and the
embedded digits → digits-on-photos pair (DigitsDomainDataModule, blend_onto_photos)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from PIL import Image
from torch import nn

from datamodules import (
    DataError,
    DigitsDomainDataModule,
    DomainAdaptationDataModule,
    ImageFolderDataModule,
    SklearnDigitsDataModule,
)
from datamodules.base import seeded_split
from datamodules.builtin import blend_onto_photos, sklearn_digit_images
from datamodules.domain import check_same_label_space
from datamodules.images import build_image_transform
from tlmodules import DANNModule
from tlmodules.backbones import resolve_preprocessing

SIZE = 16  # the generated folders' images: 3 x 16 x 16 after the default transform

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one OpenMP thread


def folder(root: Path, **kwargs: Any) -> ImageFolderDataModule:
    settings = {"batch_size": 4, "num_workers": 0, "val_fraction": 0.25, **kwargs}
    return ImageFolderDataModule(train_dir=str(root), **settings)


def tiny_dann(**kwargs: Any) -> DANNModule:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 8), nn.ReLU())
    settings = {"num_features": 8, "discriminator_hidden": 8, "lr": 0.05, "projection_samples": 0, **kwargs}
    return DANNModule(net, **settings)


# ---------------------------------------------------------------------------------------------
# label spaces
# ---------------------------------------------------------------------------------------------
def test_different_label_spaces_name_the_classes_each_side_lacks(make_image_folder) -> None:
    source = folder(make_image_folder("src", classes=("a", "b", "c"), per_class=2))
    target = folder(make_image_folder("tgt", classes=("b", "c", "d", "e"), per_class=2))
    with pytest.raises(DataError, match=r"only in source: \['a'\]; only in target: \['d', 'e'\]"):
        DomainAdaptationDataModule(source, target)
    with pytest.raises(DataError, match=r"only in source: \['d', 'e'\]; only in target: \['a'\]"):
        DomainAdaptationDataModule(target, source)


def test_digits_against_a_folder_without_the_nines(make_image_folder) -> None:
    digits = SklearnDigitsDataModule(num_workers=0)
    nines_missing = folder(make_image_folder("digits", classes=tuple(str(d) for d in range(9)), per_class=1))
    with pytest.raises(DataError, match=r"only in source: \['9'\]; only in target: \[\]"):
        DomainAdaptationDataModule(digits, nines_missing)


def test_label_space_check_order_and_unlabelled_target() -> None:
    names = ["x", "y", "z"]
    assert check_same_label_space(SimpleNamespace(class_names=names), SimpleNamespace(class_names=list(names))) == names
    with pytest.raises(DataError, match="same names, other order"):
        check_same_label_space(SimpleNamespace(class_names=names), SimpleNamespace(class_names=["y", "x", "z"]))
    # a target without labels adapts to the source's label space
    assert check_same_label_space(SimpleNamespace(class_names=names), SimpleNamespace(class_names=[])) == names
    assert check_same_label_space(SimpleNamespace(class_names=names), object()) == names


# ---------------------------------------------------------------------------------------------
# training batches: pairs, the shorter side cycles
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def pair(make_image_folder) -> DomainAdaptationDataModule:
    """Source: 3 classes x 8 images (18 train, 6 val, 5 batches of 4); target: 3 x 4 (9 train, 3 val, 3 batches)."""
    source = folder(make_image_folder("src", per_class=8))
    target = folder(make_image_folder("tgt", per_class=4, seed=1))
    return DomainAdaptationDataModule(source, target)


def test_training_batches_pair_both_domains_and_the_shorter_side_cycles(pair: DomainAdaptationDataModule) -> None:
    pair.setup("fit")
    assert pair.class_names == ["a", "b", "c"] and pair.num_classes == 3
    source_train = sorted(pair.source.datasets["train"].indices)
    target_train = sorted(pair.target.datasets["train"].indices)
    assert (len(source_train), len(target_train)) == (18, 9)

    loader = pair.train_dataloader()
    batches = [batch for batch, _, _ in iter(loader)]
    assert len(loader) == len(batches) == 5  # the longer (source) side's batch count
    for batch in batches:
        assert set(batch) == {"source", "target"}
        for side in batch.values():
            assert {"inputs", "labels", "index"} <= set(side)
            assert side["inputs"].shape[1:] == (3, SIZE, SIZE)
    source_seen = [i for b in batches for i in b["source"]["index"].tolist()]
    assert sorted(source_seen) == source_train  # one pass over the source
    target_seen = [i for b in batches for i in b["target"]["index"].tolist()]
    assert [len(b["target"]["index"]) for b in batches] == [4, 4, 1, 4, 4]
    assert sorted(target_seen[:9]) == target_train  # a full pass over the target ...
    assert set(target_seen[9:]) <= set(target_train)  # ... then it starts again
    labels = pair.source.datasets["train"].dataset.labels
    for b in batches:
        assert b["source"]["labels"].tolist() == [labels[i] for i in b["source"]["index"].tolist()]


def test_a_fit_runs_the_longer_sides_batch_count_per_epoch(pair: DomainAdaptationDataModule) -> None:
    steps: list[tuple[int, list[int], list[int]]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            steps.append((trainer.current_epoch, batch["source"]["index"].tolist(), batch["target"]["index"].tolist()))

    model = tiny_dann()
    trainer = make_trainer(max_epochs=2, callbacks=[Record()])
    trainer.fit(model, datamodule=pair)
    assert trainer.num_training_batches == 5
    assert trainer.global_step == 10
    assert [e for e, _, _ in steps] == [0] * 5 + [1] * 5
    assert pair.source.trainer is trainer and pair.target.trainer is trainer
    assert pair.val_domains == ["source", "target"]
    metrics = trainer.callback_metrics
    assert {"val/source/acc", "val/target/acc", "val/target/im_score"} <= set(metrics)
    assert model.num_classes == 3 and model.class_names == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# evaluation: one loader per domain that has the split
# ---------------------------------------------------------------------------------------------
def test_val_dataloader_returns_source_then_target(pair: DomainAdaptationDataModule) -> None:
    pair.setup("fit")
    assert pair.val_domains == []
    loaders = pair.val_dataloader()
    assert pair.val_domains == ["source", "target"]
    assert [loader.dataset for loader in loaders] == [pair.source.datasets["val"], pair.target.datasets["val"]]
    assert [len(loader.dataset) for loader in loaders] == [6, 3]


def test_a_target_without_a_test_split_leaves_only_the_source(make_image_folder) -> None:
    source_root = make_image_folder("src", per_class=4)
    target_root = make_image_folder("tgt", per_class=4, seed=1)
    source = folder(source_root, test_dir=str(make_image_folder("src_test", per_class=2, seed=2)))
    dm = DomainAdaptationDataModule(source, folder(target_root))
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert dm.test_domains == ["source"]
    assert [loader.dataset for loader in loaders] == [source.datasets["test"]]

    model = tiny_dann(num_classes=3)
    metrics = make_trainer().test(model, datamodule=dm, verbose=False)[0]
    assert "test/source/acc" in metrics
    assert not [k for k in metrics if k.startswith("test/target/")]


def test_a_test_split_on_the_target_alone_is_named_target(make_image_folder) -> None:
    source = folder(make_image_folder("src", per_class=4))
    target = folder(
        make_image_folder("tgt", per_class=4, seed=1), test_dir=str(make_image_folder("tgt_test", per_class=2))
    )
    dm = DomainAdaptationDataModule(source, target)
    model = tiny_dann(num_classes=3)
    metrics = make_trainer().test(model, datamodule=dm, verbose=False)[0]
    assert dm.test_domains == ["target"]
    assert {"test/target/acc", "test/target/entropy", "test/target/diversity", "test/target/im_score"} <= set(metrics)
    assert not [k for k in metrics if k.startswith("test/source/")]


def test_no_test_split_on_either_side_is_an_error(pair: DomainAdaptationDataModule) -> None:
    pair.setup("test")
    with pytest.raises(DataError, match="neither the source nor the target data has a test split"):
        pair.test_dataloader()


def test_prediction_goes_to_the_target(make_image_folder) -> None:
    source = folder(make_image_folder("src", per_class=4))
    target = ImageFolderDataModule(
        train_dir=str(make_image_folder("tgt", per_class=4, seed=1)),
        predict_dir=str(make_image_folder("unlabelled", per_class=1, seed=3)),
        num_workers=0,
        batch_size=2,
    )
    dm = DomainAdaptationDataModule(source, target)
    dm.setup("predict")
    assert dm.predict_dataloader().dataset is target.datasets["predict"]
    assert dm.prediction_id(0) == target.prediction_id(0) == str(Path("a") / "000.png")


# ---------------------------------------------------------------------------------------------
# the embedded pair: digits → digits on photos
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_pair() -> DigitsDomainDataModule:
    return DigitsDomainDataModule(batch_size=32)


def lenet_transform():
    return build_image_transform(resolve_preprocessing("builtin:lenet", "DEFAULT"))


def side_items(side: Any) -> list[dict]:
    """Every prepared sample of one domain, in the order of the images given to it."""
    return side.datasets["train"].dataset.items


def test_digits_pair_uses_disjoint_halves_of_load_digits(digits_pair: DigitsDomainDataModule) -> None:
    images, labels = sklearn_digit_images()
    source_idx, target_idx = seeded_split(labels, 0.5, 0)
    assert not set(source_idx) & set(target_idx)
    assert sorted(source_idx + target_idx) == list(range(len(images))) == list(range(1797))
    transform = lenet_transform()

    source = side_items(digits_pair.source)
    assert len(source) == len(source_idx)
    assert [s["labels"] for s in source] == [labels[i] for i in source_idx]
    for item, i in zip(source, source_idx):
        assert torch.equal(item["inputs"], transform(images[i]))
    # no target digit appears in the source (load_digits has no duplicate images)
    source_bytes = {item["inputs"].numpy().tobytes() for item in source}
    assert not source_bytes & {transform(images[i]).numpy().tobytes() for i in target_idx}

    target = side_items(digits_pair.target)
    assert len(target) == len(target_idx)
    assert [t["labels"] for t in target] == [labels[i] for i in target_idx]
    blended = blend_onto_photos([images[i] for i in target_idx], 28, 0)
    for item, image in zip(target, blended):
        assert torch.equal(item["inputs"], transform(image))

    # each domain is split seeded into train and validation (which doubles as test)
    for side, count in ((digits_pair.source, len(source_idx)), (digits_pair.target, len(target_idx))):
        train, val = side.datasets["train"].indices, side.datasets["val"].indices
        assert not set(train) & set(val) and sorted(train + val) == list(range(count))
        assert len(val) == round(0.3 * count)
        assert side.datasets["test"].indices == val
    assert digits_pair.class_names == [str(d) for d in range(10)]


def test_digits_pair_shapes_and_colours(digits_pair: DigitsDomainDataModule) -> None:
    batch = next(iter(digits_pair.train_dataloader()))[0]
    for side in ("source", "target"):
        assert batch[side]["inputs"].shape == (32, 3, 28, 28)
        assert batch[side]["inputs"].dtype == torch.float32
        assert batch[side]["inputs"].min() >= -1.0 and batch[side]["inputs"].max() <= 1.0
    source = torch.stack([s["inputs"] for s in side_items(digits_pair.source)[:50]])
    target = torch.stack([t["inputs"] for t in side_items(digits_pair.target)[:50]])
    # the source is gray (three equal channels); the target is coloured
    assert torch.equal(source[:, 0], source[:, 1]) and torch.equal(source[:, 1], source[:, 2])
    assert (target.flatten(2).var(-1) > 0).all()  # every channel of every image varies
    channel_gap = (target[:, 0] - target[:, 1]).abs().amax((1, 2)) + (target[:, 1] - target[:, 2]).abs().amax((1, 2))
    assert (channel_gap > 0.1).all()


def test_digits_pair_is_reproducible_per_seed(digits_pair: DigitsDomainDataModule) -> None:
    again = DigitsDomainDataModule(batch_size=32)
    first = [t["inputs"] for t in side_items(digits_pair.target)]
    assert all(torch.equal(a, b) for a, b in zip(first, [t["inputs"] for t in side_items(again.target)]))
    other = DigitsDomainDataModule(batch_size=32, seed=1)
    second = [t["inputs"] for t in side_items(other.target)]
    assert sum(torch.equal(a, b) for a, b in zip(first, second)) == 0
    images, labels = sklearn_digit_images()
    assert seeded_split(labels, 0.5, 1)[1] != seeded_split(labels, 0.5, 0)[1]


def test_digits_pair_rejects_a_bad_target_fraction() -> None:
    with pytest.raises(DataError, match=r"target_fraction must be in \(0, 1\)"):
        DigitsDomainDataModule(target_fraction=1.0)


def test_blend_onto_photos_is_the_absolute_difference_with_a_photo_patch() -> None:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    images, _ = sklearn_digit_images()
    digits = [images[3], images[100], Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    size, seed = 20, 7
    blended = blend_onto_photos(digits, size, seed)
    rng = np.random.default_rng(seed)
    for digit, out in zip(digits, blended):
        assert out.mode == "RGB" and out.size == (size, size)
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - size), rng.integers(photo.shape[1] - size)
        patch = photo[top : top + size, left : left + size]
        stroke = np.asarray(digit.resize((size, size), Image.BILINEAR), dtype=np.float32)[..., None] / 255.0
        expected = (np.abs(patch - stroke) * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(out), expected)
    # on the same patch (same seed, one digit each) a blank digit leaves the patch and a full stroke inverts it
    (blank,), (full,) = blend_onto_photos(digits[2:3], size, seed), blend_onto_photos(digits[3:4], size, seed)
    blank, full = np.asarray(blank).astype(int), np.asarray(full).astype(int)
    assert np.abs(blank + full - 255).max() <= 1 and blank.std() > 10
    assert blended[0].tobytes() != blended[1].tobytes()
    assert [b.tobytes() for b in blend_onto_photos(digits, size, seed)] == [b.tobytes() for b in blended]


def test_a_pair_without_validation_data_trains_without_a_validation_loop(make_image_folder) -> None:
    """``val_fraction=0`` on both sides: no validation loop (and no error at the first validation), every image
    trains; the pair passes its backbone to both sides."""

    def side(name: str) -> ImageFolderDataModule:
        folder = make_image_folder(name, classes=("a", "b"), per_class=4)
        return ImageFolderDataModule(train_dir=str(folder), val_fraction=0, num_workers=0, batch_size=4)

    data = DomainAdaptationDataModule(side("source"), side("target"), backbone="builtin:lenet")
    assert not data.has_split("val") and data.source.backbone_spec == data.target.backbone_spec == "builtin:lenet"
    trainer = make_trainer(max_epochs=2)
    trainer.fit(DANNModule(backbone="builtin:lenet", projection_samples=0), datamodule=data)
    assert trainer.global_step == 4 and len(data.source.datasets["train"]) == 8
    assert not [name for name in trainer.callback_metrics if name.startswith("val/")]
