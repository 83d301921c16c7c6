"""DigitsOnPhotosDataModule: MNIST digits → other MNIST digits blended onto photo patches (the MNIST-M recipe),
built from the shared MNIST test digits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_trainer
from PIL import Image

from datamodules import DataError, DigitsOnPhotosDataModule
from datamodules.builtin import blend_onto_photos
from datamodules.images import build_image_transform
from datamodules.photo_digits import PHOTO_SOURCE, list_digit_files, split_domains
from tlmodules import DANNModule
from tlmodules.backbones import resolve_preprocessing

DIGITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits" / "mnist_t10k"
SOURCE, TARGET = 300, 200  # digits per domain in most tests: a few tenths of a second to build

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny tensors: one OpenMP thread
    pytest.mark.skipif(not DIGITS.is_dir(), reason="shared MNIST digits (../shared/data/digits/mnist_t10k) absent"),
]


def build(**kwargs) -> DigitsOnPhotosDataModule:
    settings = {"digits_dir": str(DIGITS), "source_size": SOURCE, "target_size": TARGET, "batch_size": 32, **kwargs}
    return DigitsOnPhotosDataModule(**settings)


@pytest.fixture(scope="module")
def pair() -> DigitsOnPhotosDataModule:
    return build()


def items(side) -> list[dict]:
    """Every prepared sample of one domain, in the order of its digit files (``side.ids``)."""
    return side.datasets["train"].dataset.items


def grey(relative: str) -> Image.Image:
    with Image.open(DIGITS / relative) as image:
        return image.convert("L")


def test_the_domains_are_disjoint_stratified_draws_of_the_digit_files(pair: DigitsOnPhotosDataModule) -> None:
    source, target = pair.source.ids, pair.target.ids
    assert (len(source), len(target)) == (SOURCE, TARGET)
    assert not set(source) & set(target) and len(set(source)) == SOURCE and len(set(target)) == TARGET
    paths, labels = list_digit_files(DIGITS)
    assert len(paths) == 10_000
    folder_share = Counter(labels)
    for side, ids, size in ((pair.source, source, SOURCE), (pair.target, target, TARGET)):
        assert all((DIGITS / i).is_file() for i in ids)
        side_labels = [s["labels"] for s in items(side)]
        assert side_labels == [int(i.split("/")[0]) for i in ids]  # the label is the class folder
        counts = Counter(side_labels)
        for digit in range(10):  # stratified: each class in the folder's proportion, to one digit
            assert abs(counts[digit] - size * folder_share[digit] / len(labels)) <= 1
        # each domain is split seeded into train and validation, which doubles as test and predict
        train, val = side.datasets["train"].indices, side.datasets["val"].indices
        assert not set(train) & set(val) and sorted(train + val) == list(range(size))
        assert len(val) == round(0.2 * size) and side.datasets["test"].indices == val
    assert pair.class_names == [str(d) for d in range(10)] and pair.num_classes == 10

    # unset sizes: half of the folder each, every digit in exactly one domain
    source_idx, target_idx = split_domains(labels, None, None, 0, "digits")
    assert len(source_idx) == len(target_idx) == 5000
    assert sorted(source_idx + target_idx) == list(range(10_000))


def test_the_source_is_the_grey_digit_and_the_target_its_blend_with_a_photo_patch(
    pair: DigitsOnPhotosDataModule,
) -> None:
    transform = build_image_transform(resolve_preprocessing("builtin:lenet", "DEFAULT"))
    source = items(pair.source)
    for item, relative in zip(source[:20], pair.source.ids):
        assert torch.equal(item["inputs"], transform(grey(relative)))
    inputs = torch.stack([s["inputs"] for s in source])
    assert torch.equal(inputs[:, 0], inputs[:, 1]) and torch.equal(inputs[:, 1], inputs[:, 2])  # grey

    digits = [grey(relative) for relative in pair.target.ids]
    blended = blend_onto_photos(digits, 28, 0)
    target = items(pair.target)
    assert all(torch.equal(item["inputs"], transform(image)) for item, image in zip(target, blended))
    assert blended[0].mode == "RGB" and blended[0].size == (28, 28)
    colour = torch.stack([t["inputs"] for t in target])
    assert ((colour[:, 0] - colour[:, 1]).abs().amax((1, 2)) > 0.1).float().mean() > 0.9  # coloured

    # the first target digit against |patch − digit| computed directly: seed 0's first photo patch
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    photo = photos[rng.integers(len(photos))]
    top, left = rng.integers(photo.shape[0] - 28), rng.integers(photo.shape[1] - 28)
    stroke = np.asarray(digits[0], dtype=np.float32)[..., None] / 255.0
    expected = (np.abs(photo[top : top + 28, left : left + 28] - stroke) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(blended[0]), expected)
    row, col = np.unravel_index(np.argmax(np.asarray(digits[0])), (28, 28))  # on the stroke: the patch inverted
    assert np.asarray(digits[0])[row, col] == 255
    np.testing.assert_allclose(np.asarray(blended[0])[row, col], 255 * (1 - photo[top + row, left + col]), atol=1)


def test_the_same_seed_gives_the_same_pair_and_another_seed_another(pair: DigitsOnPhotosDataModule) -> None:
    again = build()
    assert again.source.ids == pair.source.ids and again.target.ids == pair.target.ids
    for a, b in ((pair.source, again.source), (pair.target, again.target)):
        assert all(torch.equal(x["inputs"], y["inputs"]) for x, y in zip(items(a), items(b)))
        assert a.datasets["val"].indices == b.datasets["val"].indices

    other = build(seed=1)
    assert other.source.ids != pair.source.ids and other.target.ids != pair.target.ids
    # the same digit gets other patches: blend the first seed's target digits with seed 1
    reblended = blend_onto_photos([grey(r) for r in pair.target.ids], 28, 1)
    first = blend_onto_photos([grey(r) for r in pair.target.ids], 28, 0)
    assert sum(a.tobytes() == b.tobytes() for a, b in zip(first, reblended)) == 0


def test_training_batches_pair_both_domains_through_the_composite_loaders(pair: DigitsOnPhotosDataModule) -> None:
    pair.setup("fit")
    loader = pair.train_dataloader()
    batch = next(iter(loader))[0]
    assert set(batch) == {"source", "target"}
    for name, side in (("source", pair.source), ("target", pair.target)):
        inputs = batch[name]["inputs"]
        assert inputs.shape == (32, 3, 28, 28) and inputs.dtype == torch.float32
        assert inputs.min() >= -1.0 and inputs.max() <= 1.0 and inputs.min() < -0.9  # normalised with 0.5 / 0.5
        labels = [items(side)[i]["labels"] for i in batch[name]["index"].tolist()]
        assert batch[name]["labels"].tolist() == labels
    assert len(loader) == -(-len(pair.source.datasets["train"]) // 32)  # the longer (source) side's batches
    assert [len(v.dataset) for v in pair.val_dataloader()] == [round(0.2 * SOURCE), round(0.2 * TARGET)]
    assert pair.val_domains == ["source", "target"]
    predict = pair.predict_dataloader().dataset
    index = predict[0]["index"]
    assert pair.prediction_id(index) == pair.target.ids[index] and (DIGITS / pair.prediction_id(index)).is_file()
    assert pair.data_sources() == {
        "source.all": str(DIGITS),
        "target.all": f"{DIGITS} on photos",
        "target.photos": PHOTO_SOURCE,
    }


def test_image_size_blends_and_resizes_both_domains() -> None:
    data = build(source_size=40, target_size=40, image_size=32, batch_size=16)
    batch = next(iter(data.train_dataloader()))[0]
    assert batch["source"]["inputs"].shape == batch["target"]["inputs"].shape == (16, 3, 32, 32)
    blended = blend_onto_photos([grey(r) for r in data.target.ids[:3]], 32, 0)  # blended at 32, not resized after
    transform = build_image_transform(resolve_preprocessing("builtin:lenet", "DEFAULT"), image_size=32)
    assert all(torch.equal(t["inputs"], transform(b)) for t, b in zip(items(data.target), blended))


def test_dann_trains_on_the_pair() -> None:
    data = build(source_size=40, target_size=40, batch_size=16)
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(DANNModule(backbone="builtin:lenet", projection_samples=0), datamodule=data)
    assert trainer.global_step == 2
    assert {"val/source/acc", "val/target/acc"} <= set(trainer.callback_metrics)


def test_bad_folders_and_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"digits_dir .*nowhere is not a folder; expected <digits_dir>/<digit>/"):
        DigitsOnPhotosDataModule(digits_dir=str(tmp_path / "nowhere"))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (28, 28)).save(flat / "a.png")
    with pytest.raises(DataError, match=r"missing class folders \['0', .*'9'\]; expected .*10 class folders 0 … 9"):
        DigitsOnPhotosDataModule(digits_dir=str(flat))
    nine = tmp_path / "nine"
    for d in [*range(9), "x"]:
        (nine / str(d)).mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing class folders \['9'\]; unexpected folders \['x'\]"):
        DigitsOnPhotosDataModule(digits_dir=str(nine))
    (nine / "x").rmdir()
    (nine / "9").mkdir()
    with pytest.raises(DataError, match=r"class folder 0/ holds no images"):
        DigitsOnPhotosDataModule(digits_dir=str(nine))

    with pytest.raises(DataError, match=r"6000 \+ target_size 5000 = 11000 digits, but digits_dir .* holds 10000"):
        build(source_size=6000, target_size=None)
    with pytest.raises(DataError, match=r"target_size must be a positive number of digits .* got 0"):
        build(target_size=0)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\)"):
            build(val_fraction=fraction)
    with pytest.raises(DataError, match=r"image_size must be a positive integer"):
        build(image_size=0)
    with pytest.raises(DataError, match=r"image size 500 does not fit in the photos \(427 pixels .*below 427"):
        build(image_size=500)
