"""MultiTaskModule with per-pixel tasks: losses and metrics against direct computations, which parameters train
under every weighting, checkpoints, bf16-mixed, TensorBoard overlays and predicted mask files."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from datamodules import SegmentationDataModule
from tlmodules.dense_tasks import dense_loss, dense_scores, iou_from_confusion
from tlmodules.errors import ConfigError
from tlmodules.labels import IGNORE_INDEX
from tlmodules.multitask import MultiTaskModule
from tlmodules.predictions import PredictionWriter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one OpenMP thread

NAMES = ["sky", "road", "car", "person"]
VOID = 255
TASKS = [
    {"name": "scene", "kind": "segmentation"},
    {"name": "drivable", "kind": "mask", "classes": ["road"]},
    {"name": "objects", "kind": "multilabel", "classes": ["car", "person"]},
    {"name": "road_share", "kind": "regression", "classes": ["road"]},
]


def blocky(seed: int, height: int = 32, width: int = 40) -> np.ndarray:
    """Blocks of 8×8 pixels of one class each; about a tenth of the blocks void."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(NAMES), size=(height // 8, width // 8))
    blocks[rng.random(blocks.shape) < 0.1] = VOID
    return np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)


def write_split(root: Path, count: int, seed: int) -> Path:
    """``root/images/*.png`` whose colour says the class (plus noise), ``root/labels/*.png`` the masks."""
    colours = np.array([[90, 160, 230], [120, 120, 120], [200, 30, 30], [240, 200, 40]] + [[0, 0, 0]] * 252)
    rng = np.random.default_rng(seed + 1000)
    for i in range(count):
        mask = blocky(seed + i)
        image = np.clip(colours[mask] + rng.normal(0, 20, (*mask.shape, 3)), 0, 255).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"frame_{i:02d}.png")
        Image.fromarray(mask).save(root / "labels" / f"frame_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_split(root / "train", 8, seed=0)
    write_split(root / "val", 5, seed=100)  # an odd count: DDP shards it unevenly
    return root


def data_for(scenes: Path, tasks: list[dict[str, Any]] = TASKS, **kwargs: Any) -> SegmentationDataModule:
    settings = {
        "train_dir": str(scenes / "train"),
        "val_dir": str(scenes / "val"),
        "class_names": NAMES,
        "ignore_value": VOID,
        "tasks": tasks,
        "batch_size": 4,
        "backbone": "torchvision:resnet18",
        "weights": "none",
    }
    return SegmentationDataModule(**{**settings, **kwargs})


def model_for(data: SegmentationDataModule, **kwargs: Any) -> MultiTaskModule:
    settings = {"backbone": "torchvision:resnet18", "weights": "none", "tasks": data.tasks, "decoder_channels": 16}
    return MultiTaskModule(**{**settings, "lr": 3e-3, **kwargs})


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    return pl.Trainer(**{**settings, **kwargs})


# -- losses and metrics ------------------------------------------------------------------------------------------
def test_iou_mean_iou_and_pixel_accuracy_from_a_confusion_matrix() -> None:
    # rows: truth; class 3 never occurs nor is predicted (NaN, left out of the mean)
    confusion = torch.tensor([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    iou = iou_from_confusion(confusion)
    assert iou[:3].tolist() == pytest.approx([3 / 5, 2 / 3, 0.0]) and math.isnan(iou[3])
    task = {"name": "s", "kind": "segmentation", "num_outputs": 4, "class_names": ["a", "b", "c", "d"]}
    scores = dense_scores(task, confusion, "val/s/")
    assert float(scores["val/s/miou"]) == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert float(scores["val/s/pixel_acc"]) == pytest.approx(5 / 7)
    assert float(scores["val/s/iou/b"]) == pytest.approx(2 / 3)
    mask = dense_scores({"name": "m", "kind": "mask"}, torch.tensor([[5, 1], [2, 4]]), "val/m/")
    assert float(mask["val/m/iou"]) == pytest.approx(4 / 7) and float(mask["val/m/acc"]) == pytest.approx(9 / 12)


def test_segmentation_loss_ignores_void_pixels_and_weights_classes() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, 0] = IGNORE_INDEX
    task = {"kind": "segmentation", "num_outputs": 3, "class_weights": [1.0, 2.0, 0.5]}
    loss = dense_loss(task, logits, labels)
    changed = logits.clone()
    changed[0, :, 0] += 100.0  # only void pixels change
    assert float(dense_loss(task, changed, labels)) == pytest.approx(float(loss))
    # the weighted mean over labelled pixels: sum(w_y · nll) / sum(w_y)
    known = labels != IGNORE_INDEX
    nll = -F.log_softmax(logits, 1).gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)[known]
    weights = torch.tensor([1.0, 2.0, 0.5])[labels[known]]
    assert float(loss) == pytest.approx(float((weights * nll).sum() / weights.sum()), rel=1e-6)


def test_mask_loss_ignores_void_pixels() -> None:
    logits = torch.randn(2, 4, 5)
    labels = (torch.rand(2, 4, 5) > 0.5).float()
    labels[1, 2:] = math.nan
    loss = dense_loss({"kind": "mask"}, logits, labels)
    known = ~torch.isnan(labels)
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known])
    changed = logits.clone()
    changed[1, 2:] = 50.0
    assert float(loss) == pytest.approx(float(expected))
    assert float(dense_loss({"kind": "mask"}, changed, labels)) == pytest.approx(float(loss))


# -- the model ----------------------------------------------------------------------------------------------------
def test_outputs_per_kind_and_pooled_features(scenes: Path) -> None:
    data = data_for(scenes)
    model = model_for(data).eval()
    images = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        outputs = model(images)
        features = model.features(images)
        assert torch.allclose(features, model.backbone(images), atol=1e-5)  # ResNet: the pooled last stage
    assert outputs["scene"].shape == (2, 4, 36, 44) and outputs["drivable"].shape == (2, 36, 44)
    assert outputs["objects"].shape == (2, 2) and outputs["road_share"].shape == (2,)
    assert [g.name for g in model.parameter_groups()] == ["backbone", "decoder", "head"]


def test_a_dense_task_needs_a_spatial_backbone() -> None:
    task = {"name": "scene", "kind": "segmentation", "num_outputs": 3}
    with pytest.raises(ConfigError, match="no 2-D feature map"):
        MultiTaskModule(backbone="mlp", in_features=4, tasks=[task])
    with pytest.raises(ConfigError, match="class_weights"):
        MultiTaskModule(backbone="mlp", in_features=4, tasks=[{**task, "class_weights": [1.0, 2.0]}])


@pytest.mark.parametrize("weighting", ["equal", "static", "uncertainty", "dwa", "rlw"])
def test_training_moves_trunk_decoder_and_every_head(scenes: Path, tmp_path: Path, weighting: str) -> None:
    data = data_for(scenes)
    model = model_for(data, weighting=weighting)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=data)
    after = model.state_dict()

    def moved(prefix: str) -> bool:
        keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
        return bool(keys) and any(not torch.equal(before[k], after[k]) for k in keys)

    assert moved("backbone.body.conv1.") and moved("backbone.body.layer4.") and moved("decoder.")
    for task in TASKS:
        assert moved(f"heads.{task['name']}."), task["name"]


def test_validation_metrics_equal_a_direct_count_over_full_frames(scenes: Path, tmp_path: Path) -> None:
    data = data_for(scenes)
    model = model_for(data)
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, datamodule=data)
    logged = trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]
    model.eval()
    confusion = np.zeros((4, 4), np.int64)
    mask_hits = np.zeros((2, 2), np.int64)
    with torch.no_grad():
        for item in data.datasets["val"]:
            outputs = model(item["inputs"][None])
            truth = item["labels"]["scene"].numpy()
            assert truth.shape == (32, 40)  # full frames, no crop
            known = truth != IGNORE_INDEX
            predicted = outputs["scene"][0].argmax(0).numpy()
            np.add.at(confusion, (truth[known], predicted[known]), 1)
            road = item["labels"]["drivable"].numpy()
            seen = ~np.isnan(road)
            np.add.at(mask_hits, (road[seen].astype(int), (outputs["drivable"][0].numpy()[seen] >= 0).astype(int)), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    assert logged["val/scene/miou"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert logged["val/scene/pixel_acc"] == pytest.approx(tp.sum() / confusion.sum(), abs=1e-6)
    for name, value in zip(NAMES, iou):
        if not np.isnan(value):
            assert logged[f"val/scene/iou/{name}"] == pytest.approx(value, abs=1e-6)
    road_iou = mask_hits[1, 1] / (mask_hits[1, 1] + mask_hits[0, 1] + mask_hits[1, 0])
    assert logged["val/drivable/iou"] == pytest.approx(road_iou, abs=1e-6)
    assert logged["val/score"] == pytest.approx(
        np.mean([np.nanmean(iou), road_iou, logged["val/objects/acc"], logged["val/road_share/r2"]]), abs=1e-5
    )


def test_checkpoint_holds_decoder_heads_and_completed_tasks(scenes: Path, tmp_path: Path) -> None:
    data = data_for(scenes, tasks=[{**TASKS[0], "class_weights": "median_frequency"}, *TASKS[1:]])
    model = model_for(data)
    fitter = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fitter.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    fitter.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("decoder.") for k in keys) and any(k.startswith("heads.scene.") for k in keys)
    saved = {t["name"]: t for t in checkpoint["tlmodules"]["tasks"]}
    assert saved["scene"]["class_weights"] == pytest.approx(data.tasks[0]["class_weights"])
    assert saved["road_share"]["target_std"] == pytest.approx(data.tasks[3]["target_std"])
    restored = MultiTaskModule.load_from_checkpoint(path, map_location="cpu").eval()
    images = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        expected, got = model.eval()(images), restored(images)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name


def test_bf16_mixed_trains_and_evaluates(scenes: Path, tmp_path: Path) -> None:
    data = data_for(scenes)
    model = model_for(data)
    fitter = trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-mixed")
    fitter.fit(model, datamodule=data)
    assert math.isfinite(float(fitter.callback_metrics["train/loss_step"]))
    logged = trainer(tmp_path, precision="bf16-mixed").validate(model, datamodule=data, verbose=False)[0]
    assert 0.0 <= logged["val/scene/miou"] <= 1.0 and 0.0 <= logged["val/drivable/iou"] <= 1.0
    assert math.isfinite(logged["val/road_share/r2"])


def test_overlays_and_iou_table_reach_tensorboard(scenes: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = data_for(scenes)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fitter = trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=1, logger=logger, log_every_n_steps=1)
    fitter.fit(model_for(data, overlay_images=3), datamodule=data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert images == ["val/scene/overlay_0"]  # one grid of 3 images (the first batch holds 4)
    height = events.Images("val/scene/overlay_0")[0].height
    assert height == 3 * (32 + 2) + 2  # one row per image
    table = events.Tensors("val/scene/iou_table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(f"| {name} |" in table for name in NAMES) and "| mean |" in table


def test_predict_writes_mask_pngs_and_per_image_columns(scenes: Path, tmp_path: Path) -> None:
    data = data_for(scenes, predict_dir=str(scenes / "val" / "images"))
    model = model_for(data)
    output = tmp_path / "out" / "predictions.csv"
    writer = PredictionWriter(str(output))
    fitter = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[writer])
    fitter.fit(model, datamodule=data)
    fitter.predict(model, datamodule=data, return_predictions=False)
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [f"frame_{i:02d}.png" for i in range(5)]
    model.eval()
    for row in rows:
        image = data.datasets["predict"][data.predict_ids.index(row["id"])]["inputs"]
        with torch.no_grad():
            outputs = model(image[None])
        scene = np.asarray(Image.open(output.parent / row["scene"]))
        assert scene.shape == (32, 40) and (scene == outputs["scene"][0].argmax(0).numpy()).all()
        drivable = np.asarray(Image.open(output.parent / row["drivable"]))
        assert (drivable == (outputs["drivable"][0] >= 0).numpy()).all()
        assert float(row["road_share"]) == pytest.approx(float(outputs["road_share"][0]), abs=1e-4)
        assert set(row["objects"].split("|")) <= {"", "car", "person"}
