"""SegmentationDataModule: pairing and checks, joint augmentation, derived tasks, seeding, collation, splits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DataError, SegmentationDataModule
from datamodules.segmentation import IMAGENET_MEAN, IMAGENET_STD
from tlmodules.labels import IGNORE_INDEX

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
NAMES = ["sky", "road", "car", "person", "tree", "sign"]
VOID = 255


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny tensors: one OpenMP thread."""


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def grey_image(mask: np.ndarray) -> np.ndarray:
    """RGB image whose grey level encodes the pixel's class: class k → 40 * (k + 1); void → 250."""
    grey = np.where(mask == VOID, 250, 40 * (mask.astype(np.int64) + 1)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def make_split(root: Path, masks: dict[str, np.ndarray], image_ext: str = ".png") -> Path:
    """``root/images/<stem><image_ext>`` (class-coded greys) and ``root/labels/<stem>.png`` (the masks)."""
    for stem, mask in masks.items():
        save(root / "images" / f"{stem}{image_ext}", grey_image(mask))
        save(root / "labels" / f"{stem}.png", mask.astype(np.uint8))
    return root


def random_masks(count: int, height: int = 16, width: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"img_{i:03d}": rng.integers(0, len(NAMES), size=(height, width)).astype(np.uint8) for i in range(count)}


def blocky_mask(height: int = 40, width: int = 48, block: int = 8, seed: int = 0) -> np.ndarray:
    """Blocks of one class each in an asymmetric layout (a flip or shift of the image alone would show)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(NAMES), size=(height // block, width // block))
    return np.kron(blocks, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def decode_grey(inputs: torch.Tensor) -> torch.Tensor:
    """Normalised (3, H, W) inputs → (H, W) grey levels 0–255 (mean over channels)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((inputs * std + mean) * 255).mean(0)


def module(tmp_path: Path, **kwargs) -> SegmentationDataModule:
    kwargs.setdefault("class_names", NAMES)
    return SegmentationDataModule(**kwargs)


# -- listing, pairing and checks ------------------------------------------------------------------------------------
def test_pairs_by_stem_with_subfolders(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(3), image_ext=".jpg")
    nested = blocky_mask(16, 24)
    save(root / "images" / "seq1" / "f001.png", grey_image(nested))
    save(root / "labels" / "seq1" / "f001.png", nested)
    dm = module(tmp_path, train_dir=str(root))
    pairs = dm.pairs["train"]
    assert dm.training_size() == 4
    assert [(i.relative_to(root / "images").with_suffix("").as_posix()) for i, _ in pairs] == [
        "img_000",
        "img_001",
        "img_002",
        "seq1/f001",
    ]
    assert all(i.stem == m.stem and i.suffix == ".jpg" or i.parent.name == "seq1" for i, m in pairs)
    assert all(m.parent.relative_to(root / "labels") == i.parent.relative_to(root / "images") for i, m in pairs)


def test_unmatched_stems_are_named(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    save(root / "images" / "lonely_image.png", grey_image(random_masks(1)["img_000"]))
    save(root / "labels" / "lonely_mask.png", random_masks(1)["img_000"])
    with pytest.raises(DataError, match="lonely_image") as err:
        module(tmp_path, train_dir=str(root))
    assert "lonely_mask" in str(err.value) and "pair by name without extension" in str(err.value)


def test_missing_mask_folder_names_the_layout(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    (root / "labels").rename(root / "masks")
    with pytest.raises(DataError, match="has no 'labels' folder.*mask_folder"):
        module(tmp_path, train_dir=str(root))
    assert module(tmp_path, train_dir=str(root), mask_folder="masks").training_size() == 2


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    save(root / "labels" / "img_001.png", np.zeros((10, 20), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        module(tmp_path, train_dir=str(root))
    message = str(err.value)
    assert "images/img_001.png is 20x16" in message and "labels/img_001.png is 20x10" in message


def test_rgb_mask_is_refused(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    save(root / "labels" / "img_000.png", grey_image(random_masks(1)["img_000"]))  # a colour mask
    with pytest.raises(
        DataError, match=r"img_000.png is a RGB image; masks must hold class indices.*not colours"
    ) as err:
        module(tmp_path, train_dir=str(root))
    assert "unreadable" not in str(err.value)


def test_out_of_range_mask_value_names_file_and_value(tmp_path: Path) -> None:
    masks = random_masks(2)
    masks["img_001"][3, 4] = 7  # neither a class (0-5) nor void (255)
    masks["img_001"][5, 5] = VOID
    root = make_split(tmp_path / "train", masks)
    with pytest.raises(DataError) as err:
        module(tmp_path, train_dir=str(root))
    message = str(err.value)
    assert "labels/img_001.png: [7]" in message and "img_000" not in message
    assert "class_names" in message and "ignore_value" in message
    with pytest.raises(DataError, match=r"img_001.png: \[7, 255\]"):  # no void value: 255 is bad too
        module(tmp_path, train_dir=str(root), ignore_value=None)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(3))
    (root / "labels" / "img_002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"unreadable file\(s\).*img_002.png"):
        module(tmp_path, train_dir=str(root))


def test_class_names_required_or_read_from_file(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    with pytest.raises(DataError, match="class_names is required.*list of names.*text file"):
        SegmentationDataModule(train_dir=str(root))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(NAMES) + "\n\n")
    dm = SegmentationDataModule(train_dir=str(root), class_names=str(names))
    assert dm.class_names == NAMES and dm.num_classes == 6
    with pytest.raises(DataError, match="is not a file"):
        SegmentationDataModule(train_dir=str(root), class_names=str(tmp_path / "nope.txt"))
    names.write_text("sky\nroad\nsky\n")
    with pytest.raises(DataError, match=r"class_names file .*classes.txt names \['sky'\] more than once"):
        SegmentationDataModule(train_dir=str(root), class_names=str(names))
    with pytest.raises(DataError, match=r"class_names=\['sky'\] names fewer than two classes"):
        SegmentationDataModule(train_dir=str(root), class_names=["sky"])


@pytest.mark.parametrize(
    ("tasks", "pattern"),
    [
        ([{"name": "a", "kind": "mask", "classes": ["road", "lake"]}], r"\['lake'\].*choose from \['sky', 'road'"),
        ([{"name": "a", "kind": "mask", "classes": []}], "needs classes"),
        ([{"name": "a", "kind": "depth"}], r"unknown kind 'depth'; choose one of \['segmentation', 'mask'"),
        ([{"name": "a", "kind": "mask", "classes": ["car"]}, {"name": "a", "kind": "regression", "classes": ["car"]}],
         "used by more than one task"),
        ([{"name": "a", "kind": "segmentation"}, {"name": "b", "kind": "segmentation"}], "keep one"),
        ([{"name": "s", "kind": "segmentation", "class_weights": [1.0, 2.0]}], "give 6 non-negative numbers"),
    ],
)  # fmt: skip
def test_task_spec_errors(tmp_path: Path, tasks: list[dict], pattern: str) -> None:
    root = make_split(tmp_path / "train", random_masks(2))
    with pytest.raises(DataError, match=pattern):
        module(tmp_path, train_dir=str(root), tasks=tasks)


def test_empty_predict_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "predict").mkdir()
    with pytest.raises(DataError, match="predict_dir .* holds no images"):
        module(tmp_path, predict_dir=str(tmp_path / "predict"))


# -- transforms ----------------------------------------------------------------------------------------------------
def test_training_transform_moves_image_and_mask_together(tmp_path: Path) -> None:
    mask = blocky_mask()
    root = make_split(tmp_path / "train", {"a": mask, "b": blocky_mask(seed=1)})
    dm = module(tmp_path, train_dir=str(root), photometric=False, scale_range=(0.6, 1.4))
    dm.setup("fit")
    dataset = dm.datasets["train"]
    padded_seen, flipped_seen = 0, 0
    for key in range(8):
        dataset.set_pass(key)
        sample = dataset[0]
        labels = sample["labels"]["segmentation"]
        assert sample["inputs"].shape == (3, 40, 48) and labels.shape == (40, 48)  # cropped back to the frame size
        grey = decode_grey(sample["inputs"])
        padded = labels == IGNORE_INDEX
        assert torch.allclose(grey[padded], torch.zeros(()), atol=1.0)  # padding: black image, void mask
        padded_seen += int(padded.any())
        # off the class edges (a 3x3 neighbourhood of one class) the image's grey level is exactly its mask's class
        window = torch.nn.functional.pad(labels.float()[None, None], (1, 1, 1, 1), value=math.nan)
        patches = torch.nn.functional.unfold(window, 3).view(9, 40, 48)
        inside = ((patches == labels.float()) | patches.isnan()).all(0) & ~padded
        assert inside.sum() > 0.5 * (~padded).sum()
        assert torch.allclose(grey[inside], 40.0 * (labels[inside] + 1).float(), atol=0.5)
        flipped_seen += int(not torch.equal(labels[~padded], torch.from_numpy(mask).long()[~padded]))
    assert padded_seen > 0 and flipped_seen > 0  # the draws did scale down and move things


def test_photometric_jitter_changes_image_only(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", {"a": blocky_mask(), "b": blocky_mask(seed=1)})
    plain = module(tmp_path, train_dir=str(root), photometric=False)
    jitter = module(tmp_path, train_dir=str(root), photometric=True)
    for dm in (plain, jitter):
        dm.setup("fit")
        dm.datasets["train"].set_pass(11)
    for index in (0, 1):
        a, b = plain.datasets["train"][index], jitter.datasets["train"][index]
        for name in ("segmentation",):
            assert torch.equal(a["labels"][name], b["labels"][name])
        assert not torch.allclose(a["inputs"], b["inputs"])


def test_same_pass_same_item_is_identical_other_pass_differs(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(4, 32, 40))
    dm = module(tmp_path, train_dir=str(root), crop_size=(12, 16), scale_range=(0.5, 2.0))
    dm.setup("fit")
    dataset = dm.datasets["train"]
    state = torch.get_rng_state()
    dataset.set_pass(123)
    first, again = dataset[2], dataset[2]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert first["inputs"].shape == (3, 12, 16) and first["labels"]["segmentation"].shape == (12, 16)
    assert torch.equal(first["inputs"], again["inputs"])
    assert torch.equal(first["labels"]["segmentation"], again["labels"]["segmentation"])
    dataset.set_pass(124)
    other = dataset[2]
    assert not torch.equal(first["inputs"], other["inputs"])
    assert not torch.equal(first["labels"]["segmentation"], other["labels"]["segmentation"])


def test_no_void_value_pads_with_ignore_index(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", {"a": blocky_mask(), "b": blocky_mask(seed=1)})
    dm = module(tmp_path, train_dir=str(root), ignore_value=None, scale_range=(0.5, 0.5), hflip=False)
    dm.setup("fit")
    dm.datasets["train"].set_pass(0)
    labels = dm.datasets["train"][0]["labels"]["segmentation"]
    assert labels.dtype == torch.int64 and labels.shape == (40, 48)
    assert (labels == IGNORE_INDEX).sum() == 40 * 48 - 20 * 24  # half the size each way, the rest padding
    assert set(labels[labels != IGNORE_INDEX].unique().tolist()) <= set(range(6))


# -- CamVid ----------------------------------------------------------------------------------------------------------
def test_camvid_test_split_full_frame() -> None:
    dm = SegmentationDataModule(test_dir=str(CAMVID / "test"), class_names=str(CAMVID / "classes.txt"), ignore_value=11)
    assert dm.class_names[:3] == ["Sky", "Building", "Pole"] and dm.num_classes == 11
    dm.setup("test")
    assert len(dm.datasets["test"]) == 233
    sample = dm.datasets["test"][0]
    labels = sample["labels"]["segmentation"]
    assert sample["inputs"].shape == (3, 180, 240) and sample["inputs"].dtype == torch.float32
    assert labels.shape == (180, 240) and labels.dtype == torch.int64
    raw = torch.from_numpy(np.asarray(Image.open(dm.pairs["test"][0][1])).astype(np.int64))
    assert (raw == 11).any()
    assert torch.equal(labels, raw.masked_fill(raw == 11, IGNORE_INDEX))
    assert set(labels.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}


def test_camvid_training_tasks_completed_before_setup() -> None:
    tasks = [
        {"name": "seg", "kind": "segmentation", "class_weights": "median_frequency"},
        {"name": "drivable", "kind": "mask", "classes": ["Road"], "weight": 0.5},
        {"name": "objects", "kind": "multilabel", "classes": ["Car", "Pedestrian", "Bicyclist", "SignSymbol"]},
        {"name": "road_share", "kind": "regression", "classes": ["Road"]},
    ]
    dm = SegmentationDataModule(
        train_dir=str(CAMVID / "train"), class_names=str(CAMVID / "classes.txt"), ignore_value=11, tasks=tasks
    )
    seg, drivable, objects, road = dm.tasks
    assert dm.task_names == ["seg", "drivable", "objects", "road_share"] and dm.in_features is None
    assert dm.dense_task_names == ["seg", "drivable"]
    assert (seg["num_outputs"], drivable["num_outputs"], objects["num_outputs"], road["num_outputs"]) == (11, 1, 4, 1)
    assert seg["class_names"] == dm.class_names and objects["class_names"] == tasks[2]["classes"]
    assert objects["class_indices"] == [8, 9, 10, 6] and drivable["weight"] == 0.5
    assert len(seg["class_weights"]) == 11 and seg["class_weights"][3] < 1 < seg["class_weights"][2]  # road, pole
    assert 0.2 < road["target_mean"] < 0.5 and road["target_std"] > 0.01
    assert dm.training_size() == 367 and dm.held_out_fraction == 0.0 and not dm.has_split("val")
    dm.setup("fit")
    sample = dm.datasets["train"][5]
    assert sample["inputs"].shape == (3, 180, 240) and sample["labels"]["drivable"].shape == (180, 240)


# -- derived tasks and statistics ----------------------------------------------------------------------------------
DERIVED = [
    {"name": "segmentation", "kind": "segmentation"},
    {"name": "wheels", "kind": "mask", "classes": ["road", "car"]},
    {"name": "present", "kind": "multilabel", "classes": ["car", "sky", "person"]},
    {"name": "common", "kind": "multilabel", "classes": ["car", "sky", "person"], "min_share": 0.2},
    {"name": "share", "kind": "regression", "classes": ["road", "car"]},
]


def known_mask() -> np.ndarray:
    """16x20: rows 0-3 void (80 px), rows 4-9 sky (120), rows 10-13 road (80), rows 14-15 car (40)."""
    mask = np.full((16, 20), VOID, dtype=np.uint8)
    mask[4:10], mask[10:14], mask[14:16] = 0, 1, 2
    return mask


def test_derived_task_labels_are_exact(tmp_path: Path) -> None:
    root = make_split(tmp_path / "test", {"known": known_mask(), "void": np.full((16, 20), VOID, np.uint8)})
    dm = module(tmp_path, test_dir=str(root), tasks=DERIVED)
    dm.setup("test")
    labels = dm.datasets["test"][0]["labels"]
    assert torch.equal(labels["segmentation"][:4], torch.full((4, 20), IGNORE_INDEX))
    assert labels["segmentation"][4:].unique().tolist() == [0, 1, 2]
    wheels = labels["wheels"]
    assert wheels.dtype == torch.float32 and wheels[:4].isnan().all()
    assert (wheels[4:10] == 0).all() and (wheels[10:] == 1).all()
    assert labels["present"].tolist() == [1.0, 1.0, 0.0]  # car, sky, person
    assert labels["common"].tolist() == [0.0, 1.0, 0.0]  # car covers 1/6 of the labelled pixels, sky 1/2
    assert labels["share"].shape == () and labels["share"].item() == pytest.approx(0.5)  # (80 + 40) / 240
    void = dm.datasets["test"][1]["labels"]
    assert void["present"].isnan().all() and void["share"].isnan() and void["wheels"].isnan().all()
    assert (void["segmentation"] == IGNORE_INDEX).all()


def test_regression_statistics_and_median_frequency(tmp_path: Path) -> None:
    masks = random_masks(6, seed=3)
    for i, mask in enumerate(masks.values()):
        mask[: 2 * i] = VOID  # different labelled areas
        mask[mask == 5] = 4 if i % 2 else 5  # "sign" only in some images
        mask[mask == 3] = 0  # "person" never appears
    root = make_split(tmp_path / "train", masks)
    tasks = [{"name": "seg", "kind": "segmentation", "class_weights": "median_frequency"}, DERIVED[-1]]
    dm = module(tmp_path, train_dir=str(root), tasks=tasks)
    stack = np.stack(list(masks.values())).astype(np.int64)
    labelled = (stack != VOID).sum((1, 2))
    shares = np.isin(stack, [1, 2]).sum((1, 2)) / labelled
    assert dm.tasks[1]["target_mean"] == pytest.approx(shares.mean(), abs=1e-12)
    assert dm.tasks[1]["target_std"] == pytest.approx(shares.std(), abs=1e-12)
    freq = {}
    for c in range(6):
        present = [(m == c).any() for m in stack]
        if any(present):
            freq[c] = (stack == c).sum() / labelled[present].sum()
    median = np.median(list(freq.values()))
    expected = [median / freq[c] if c in freq else 1.0 for c in range(6)]
    assert 3 not in freq and dm.tasks[0]["class_weights"][3] == 1.0
    assert dm.tasks[0]["class_weights"] == pytest.approx(expected, rel=1e-12)
    # a held-out validation part does not count
    held = module(tmp_path, train_dir=str(root), tasks=tasks, val_fraction=0.5)
    train_idx = held.held_out[0]
    assert held.tasks[1]["target_mean"] == pytest.approx(shares[train_idx].mean(), abs=1e-12)


def test_constant_regression_target_std_is_floored(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", {f"m{i}": known_mask() for i in range(3)})
    dm = module(tmp_path, train_dir=str(root), tasks=[DERIVED[-1]])
    assert dm.tasks[0]["target_mean"] == pytest.approx(0.5) and dm.tasks[0]["target_std"] == 1e-6
    assert dm.dense_task_names == []


# -- batches, splits, prediction ---------------------------------------------------------------------------------------
def test_collate_pads_to_the_largest_frame(tmp_path: Path) -> None:
    small = np.zeros((10, 12), dtype=np.uint8)
    small[:, 3:] = 2
    root = make_split(tmp_path / "test", {"big": known_mask(), "small": small})
    dm = module(tmp_path, test_dir=str(root), tasks=DERIVED)
    dm.setup("test")
    batch = dm.collate_fn([dm.datasets["test"][1], dm.datasets["test"][0]])
    assert batch["inputs"].shape == (2, 3, 16, 20)
    assert batch["sizes"].tolist() == [[10, 12], [16, 20]] and batch["sizes"].dtype == torch.int64
    assert batch["index"].tolist() == [1, 0] and batch["index"].dtype == torch.int64
    seg, wheels = batch["labels"]["segmentation"], batch["labels"]["wheels"]
    assert seg.shape == wheels.shape == (2, 16, 20) and seg.dtype == torch.int64
    assert (seg[0, 10:] == IGNORE_INDEX).all() and (seg[0, :, 12:] == IGNORE_INDEX).all()
    assert torch.equal(seg[0, :10, :12], dm.datasets["test"][1]["labels"]["segmentation"])
    assert wheels[0, 10:].isnan().all() and wheels[0, :, 12:].isnan().all() and (wheels[0, :10, 3:12] == 1).all()
    assert (batch["inputs"][0, :, 10:] == 0).all() and (batch["inputs"][0, :, :, 12:] == 0).all()
    assert batch["labels"]["present"].shape == (2, 3) and batch["labels"]["share"].shape == (2,)
    assert batch["labels"]["share"].tolist() == pytest.approx([0.75, 0.5])


def test_held_out_validation_split(tmp_path: Path) -> None:
    root = make_split(tmp_path / "train", random_masks(10))
    auto = module(tmp_path, train_dir=str(root))
    assert auto.held_out_fraction == 0.0 and not auto.has_split("val")  # fewer than 500 pairs: all train
    assert "no validation split" in auto.validation_note()
    dm = module(tmp_path, train_dir=str(root), val_fraction=0.2, augment=False)
    assert dm.has_split("val")
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    train_ids = {train[i]["index"] for i in range(len(train))}
    val_ids = {val[i]["index"] for i in range(len(val))}
    assert len(val_ids) == 2 and not train_ids & val_ids and train_ids | val_ids == set(range(10))
    assert val.dataset.transform is dm.eval_transform
    again = module(tmp_path, train_dir=str(root), val_fraction=0.2)
    assert again.held_out == dm.held_out  # seeded
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["inputs"].shape == (8, 3, 16, 20) and set(batch["index"].tolist()) <= train_ids


def test_predict_ids_and_missing_labels(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    save(flat / "b.jpg", grey_image(known_mask()))
    save(flat / "seq" / "a.png", grey_image(known_mask()))
    dm = module(tmp_path, predict_dir=str(flat), tasks=DERIVED)
    dm.setup("predict")
    assert dm.predict_ids == ["b.jpg", "seq/a.png"] and dm.prediction_id(1) == "seq/a.png"
    labels = dm.datasets["predict"][0]["labels"]
    assert (labels["segmentation"] == IGNORE_INDEX).all() and labels["segmentation"].shape == (16, 20)
    assert labels["wheels"].isnan().all() and labels["present"].isnan().all() and math.isnan(labels["share"])
    nested = make_split(tmp_path / "split", {"x": known_mask()})  # images/ and labels/: the images are read
    dm = module(tmp_path, predict_dir=str(nested))
    dm.setup("predict")
    assert dm.predict_ids == ["x.png"]
    assert dm.data_sources() == {"predict": str(nested)}


def test_val_dir_checked_at_setup_and_backbone_normalisation(tmp_path: Path) -> None:
    train = make_split(tmp_path / "train", random_masks(3))
    masks = random_masks(2, seed=1)
    masks["img_001"][0, 0] = 9
    val = make_split(tmp_path / "val", masks)
    dm = module(tmp_path, train_dir=str(train), val_dir=str(val))  # listing and pairing only, so far
    assert dm.has_split("val") and dm.data_sources() == {"train": str(train), "val": str(val)}
    with pytest.raises(DataError, match=r"val/labels/img_001.png: \[9\]"):
        dm.setup("fit")
    dm.use_backbone("builtin:lenet", None)  # the backbone's statistics replace ImageNet's
    assert dm.eval_transform.mean == [0.5, 0.5, 0.5] and dm.train_transform.std == [0.5, 0.5, 0.5]
