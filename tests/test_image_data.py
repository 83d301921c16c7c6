"""ImageFolderDataModule and SklearnDigitsDataModule on generated folders and on the real USPS digits."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_trainer
from PIL import Image

from datamodules import DataError, ImageFolderDataModule, SklearnDigitsDataModule
from datamodules.images import find_corrupt_images, list_images
from tlmodules import FineTuneModule
from tlmodules.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def folder_module(train_dir: Path, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return ImageFolderDataModule(train_dir=str(train_dir), **kwargs)


def split_paths(dm: ImageFolderDataModule, stage: str) -> list[Path]:
    subset = dm.datasets[stage]
    return [subset.dataset.sources[i] for i in subset.indices]


# -- classes and the seeded split ---------------------------------------------------------------
def test_class_names_are_sorted_subfolders(make_image_folder):
    root = make_image_folder(classes=("zebra", "apple", "mango", "10", "9"), per_class=2)
    dm = folder_module(root, val_fraction=0.1)
    assert dm.class_names == ["10", "9", "apple", "mango", "zebra"]  # ImageFolder's plain sort
    assert dm.num_classes == 5
    dm.setup("fit")
    full = dm.datasets["train"].dataset
    for path, label in zip(full.sources, full.labels):
        assert dm.class_names[label] == path.parent.name


def test_seeded_split_reproducible_disjoint_covering_stratified(make_image_folder):
    root = make_image_folder(classes=("a", "b", "c"), per_class=10)
    all_images = set(list_images(root))
    assert len(all_images) == 30

    def split(seed: int) -> tuple[list[Path], list[Path]]:
        dm = folder_module(root, val_fraction=0.2, seed=seed)
        dm.setup("fit")
        return split_paths(dm, "train"), split_paths(dm, "val")

    train0, val0 = split(0)
    assert split(0) == (train0, val0)
    assert set(split(1)[1]) != set(val0)
    assert set(train0).isdisjoint(val0)
    assert set(train0) | set(val0) == all_images
    assert len(val0) == 6
    assert Counter(p.parent.name for p in val0) == {"a": 2, "b": 2, "c": 2}


# -- preprocessing from the backbone ------------------------------------------------------------
def test_lenet_batches_are_rgb_28_from_grayscale_files(make_image_folder):
    root = make_image_folder(per_class=4, size=16)
    assert Image.open(next(iter(list_images(root)))).mode == "L"
    dm = folder_module(root, backbone="builtin:lenet", val_fraction=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"inputs", "labels", "index"}
    assert batch["inputs"].shape == (4, 3, 28, 28)
    assert batch["inputs"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    # grayscale replicated into three equal channels, normalised to [-1, 1] by mean=std=0.5
    assert torch.equal(batch["inputs"][:, 0], batch["inputs"][:, 1])
    assert batch["inputs"].min() >= -1.0 and batch["inputs"].max() <= 1.0
    val = next(iter(dm.val_dataloader()))
    full = dm.datasets["val"].dataset
    assert [full.labels[i] for i in val["index"].tolist()] == val["labels"].tolist()


def test_in_channels_1_from_rgb_files(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("x", "y"):
        (tmp_path / "rgb" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 12, 3), dtype=np.uint8), "RGB").save(
                tmp_path / "rgb" / cls / f"{i}.png"
            )
    dm = folder_module(tmp_path / "rgb", backbone="builtin:lenet", in_channels=1, val_fraction=0, batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (6, 1, 28, 28)
    no_size = folder_module(tmp_path / "rgb", in_channels=1, val_fraction=0, batch_size=6)
    no_size.setup("fit")
    assert next(iter(no_size.train_dataloader()))["inputs"].shape == (6, 1, 20, 12)  # the image's own size


def constant_gray_folder(root: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("L", size, value).save(root / cls / "0.png")
    return root


def test_torchvision_weights_give_imagenet_crop_and_normalisation(tmp_path):
    root = constant_gray_folder(tmp_path / "gray", 128)
    dm = folder_module(root, backbone="torchvision:resnet18", weights="IMAGENET1K_V1", val_fraction=0, batch_size=2)
    dm.setup("fit")
    inputs = next(iter(dm.train_dataloader()))["inputs"]
    assert inputs.shape == (2, 3, 224, 224)
    for c in range(3):
        expected = (128 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert inputs[:, c].mean().item() == pytest.approx(expected, abs=1e-4)
        assert inputs[:, c].std().item() < 1e-4
    # the three channels differ: per-channel statistics, not one shared value
    assert inputs[0, 0, 0, 0] != pytest.approx(inputs[0, 2, 0, 0].item(), abs=1e-3)


def test_image_size_overrides_backbone_size(tmp_path):
    root = constant_gray_folder(tmp_path / "gray", 200)
    dm = folder_module(
        root, backbone="torchvision:resnet18", weights="IMAGENET1K_V1", image_size=32, val_fraction=0, batch_size=2
    )
    dm.setup("fit")
    inputs = next(iter(dm.train_dataloader()))["inputs"]
    assert inputs.shape == (2, 3, 32, 32)
    assert inputs[0, 1, 5, 5].item() == pytest.approx((200 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1], abs=1e-4)
    lenet = folder_module(root, backbone="builtin:lenet", image_size=12, val_fraction=0, batch_size=2)
    lenet.setup("fit")
    assert next(iter(lenet.train_dataloader()))["inputs"].shape == (2, 3, 12, 12)


# -- errors -------------------------------------------------------------------------------------
def test_val_and_test_class_folders_unknown_to_training(make_image_folder):
    train = make_image_folder("train", classes=("a", "b"), per_class=2)
    val = make_image_folder("val", classes=("a", "b", "c", "d"), per_class=1)
    dm = folder_module(train, val_dir=str(val))
    with pytest.raises(DataError, match=r"val_dir .*class folders \['c', 'd'\].*training data lacks") as err:
        dm.setup("fit")
    assert "['a', 'b']" in str(err.value) and "label spaces must match" in str(err.value)
    test = make_image_folder("test", classes=("a", "e"), per_class=1)
    dm = folder_module(train, test_dir=str(test))
    with pytest.raises(DataError, match=r"test_dir .*test.*\['e'\]"):
        dm.setup("test")


def test_val_dir_may_lack_a_training_class(make_image_folder):
    train = make_image_folder("train", classes=("a", "b", "c"), per_class=2)
    val = make_image_folder("val", classes=("c",), per_class=2)
    dm = folder_module(train, val_dir=str(val))
    dm.setup("fit")
    assert dm.datasets["val"].labels == [2, 2]
    assert len(dm.datasets["train"]) == 6


def test_corrupt_and_fake_images_fail_at_setup_listing_files(make_image_folder):
    root = make_image_folder(per_class=3)
    (root / "a" / "x.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "b" / "notes.jpg").write_text("this is a text file, not an image\n")
    dm = folder_module(root, backbone="builtin:lenet")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "2 unreadable image file(s)" in message
    assert str(root / "a" / "x.png") in message and str(root / "b" / "notes.jpg") in message
    assert "Remove or replace them" in message
    assert dm.datasets == {}  # nothing to iterate: no batch was produced
    skipped = folder_module(root, verify_images=False, val_fraction=0)
    skipped.setup("fit")  # verification off: the bad files are only found when loaded
    assert len(skipped.datasets["train"]) == 11


def test_truncated_jpeg_is_found_although_pil_verify_passes_it(make_image_folder):
    root = make_image_folder(per_class=2, size=32)
    good = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(root / "c" / "cut.jpg", quality=95)
    data = (root / "c" / "cut.jpg").read_bytes()
    (root / "c" / "cut.jpg").write_bytes(data[: len(data) * 3 // 4])
    with Image.open(root / "c" / "cut.jpg") as image:
        image.verify()  # PIL's integrity check alone does not notice
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\): .*cut\.jpg \(OSError: image file is truncated"):
        folder_module(root).setup("fit")


def test_corrupt_image_in_predict_dir_fails_at_setup(tmp_path, make_image_folder):
    train = make_image_folder("train", per_class=2)
    predict = tmp_path / "predict"
    predict.mkdir()
    Image.new("L", (8, 8), 10).save(predict / "ok.png")
    (predict / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # PNG signature, truncated
    dm = folder_module(train, predict_dir=str(predict))
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\): .*broken\.png"):
        dm.setup("predict")


def test_empty_test_split(make_image_folder, tmp_path):
    train = make_image_folder("train", classes=("a", "b"), per_class=2)
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "readme.txt").write_text("not an image")
    dm = folder_module(train, test_dir=str(tmp_path / "test"))
    with pytest.raises(DataError, match=r"the test split is empty \(from .*test\); give it at least one sample"):
        dm.setup("test")


def test_missing_or_flat_train_dir(tmp_path):
    with pytest.raises(DataError, match=r"train_dir .*nowhere is not a folder; check the path"):
        ImageFolderDataModule(train_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="give at least train_dir"):
        ImageFolderDataModule()
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(DataError, match=r"has no class sub-folders; expected <train_dir>/<class name>/<image files>"):
        ImageFolderDataModule(train_dir=str(tmp_path / "flat"))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size(make_image_folder, batch_size):
    root = make_image_folder(per_class=1)
    with pytest.raises(DataError, match=r"batch_size must be a positive integer, got"):
        ImageFolderDataModule(train_dir=str(root), batch_size=batch_size)
    with pytest.raises(DataError, match=r"batch_size must be a positive integer"):
        SklearnDigitsDataModule(batch_size=batch_size)


def test_without_val_data_every_image_trains_and_validation_is_skipped(make_image_folder):
    """val_fraction=0 and no val_dir: no image is held out, and the validation loader is empty, which Lightning
    takes as "no validation" (a missing split would otherwise fail the fit after its first epoch)."""
    dm = folder_module(make_image_folder(per_class=2), val_fraction=0, backbone="builtin:lenet")
    assert not dm.has_split("val")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and dm.val_dataloader() == []
    trainer = make_trainer(max_epochs=2)
    trainer.fit(FineTuneModule(backbone="builtin:lenet"), datamodule=dm)
    assert trainer.global_step == 4 and trainer.current_epoch == 2
    assert not [name for name in trainer.callback_metrics if name.startswith("val/")]


def test_a_missing_test_split_names_the_setting(make_image_folder):
    dm = folder_module(make_image_folder(per_class=2), val_fraction=0)
    dm.setup("test")
    with pytest.raises(DataError, match="no test data: set the test file or folder"):
        dm.test_dataloader()


# -- prediction ---------------------------------------------------------------------------------
def test_predict_dir_flat_folder_ids_are_relative_paths(tmp_path):
    predict = tmp_path / "unlabelled"
    (predict / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.new("RGB", (10, 10), (5, 6, 7)).save(predict / name)
    (predict / "ignore.txt").write_text("not an image")
    dm = ImageFolderDataModule(predict_dir=str(predict), backbone="builtin:lenet", num_workers=0, batch_size=8)
    assert dm.class_names == []
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["inputs"].shape == (3, 3, 28, 28)
    assert batch["labels"].tolist() == [IGNORE_INDEX] * 3  # unlabelled
    ids = [dm.prediction_id(i) for i in batch["index"].tolist()]
    assert ids == ["a.jpg", "b.png", str(Path("sub") / "c.png")]


# -- real data ----------------------------------------------------------------------------------
USPS_TEST_COUNTS = [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]


@pytest.mark.skipif(not (SHARED_DATA / "digits/usps/test").is_dir(), reason="shared USPS data not available")
def test_real_usps_test_folder():
    root = SHARED_DATA / "digits/usps/test"
    start = time.perf_counter()
    dm = ImageFolderDataModule(test_dir=str(root), backbone="builtin:lenet", num_workers=0, batch_size=64)
    dm.setup("test")  # lists and verifies all 2,007 images
    elapsed = time.perf_counter() - start
    print(f"USPS test setup with verify_images: {elapsed:.2f}s")
    assert dm.class_names == [str(d) for d in range(10)]
    data = dm.datasets["test"]
    assert len(data) == 2007
    assert [Counter(data.labels)[k] for k in range(10)] == USPS_TEST_COUNTS
    assert find_corrupt_images(data.sources) == []  # what setup checked: nothing unreadable
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"].shape == (64, 3, 28, 28)
    assert batch["labels"][:5].tolist() == [0] * 5  # sorted: class folder 0 first


# -- scikit-learn digits ------------------------------------------------------------------------
def test_sklearn_digits_split_and_batches():
    dm = SklearnDigitsDataModule(batch_size=16, seed=3)  # documented defaults: 15% validation, 15% test
    dm.setup()
    sizes = {stage: len(dm.datasets[stage]) for stage in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(0.15 * 1797)
    assert abs(sizes["val"] - 0.15 * 1797) <= 1
    indices = {stage: set(dm.datasets[stage].indices) for stage in ("train", "val", "test")}
    assert indices["train"].isdisjoint(indices["val"]) and indices["train"].isdisjoint(indices["test"])
    assert indices["val"].isdisjoint(indices["test"])
    assert set().union(*indices.values()) == set(range(1797))
    labels = dm.datasets["train"].dataset.labels
    assert {labels[i] for i in indices["test"]} == set(range(10))  # stratified
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (16, 3, 28, 28) and batch["inputs"].dtype == torch.float32
    assert dm.num_classes == 10
    again = SklearnDigitsDataModule(seed=3)
    again.setup()
    assert set(again.datasets["test"].indices) == indices["test"]


def test_small_image_folders_train_on_every_image_unless_a_validation_share_is_asked(make_image_folder) -> None:
    root = make_image_folder(per_class=4)
    automatic = folder_module(root, val_fraction=None)
    assert automatic.training_size() == 12 and not automatic.has_split("val")
    automatic.setup("fit")
    assert len(automatic.datasets["train"]) == 12 and "val" not in automatic.datasets
    assert "12 training samples" in automatic.validation_note()
    asked = folder_module(root, val_fraction=0.25)
    asked.setup("fit")
    assert len(asked.datasets["val"]) == 3 and asked.validation_note() is None
