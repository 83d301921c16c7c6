"""Dense (per-pixel) task outputs: the validation images and IoU table TensorBoard shows
(:mod:`tlmodules.dense_logging`), and the mask PNGs plus CSV that ``predict`` writes
(:class:`tlmodules.predictions.PredictionWriter`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from tlmodules.dense_logging import colorize, iou_table, log_dense_images, log_text, overlay_grid, palette
from tlmodules.labels import IGNORE_INDEX
from tlmodules.predictions import PredictionWriter, in_index_order, mask_relative_path

# -- dense_logging ---------------------------------------------------------------------------------------------


def test_palette_is_deterministic_distinct_and_never_black() -> None:
    colours = palette(20)
    assert colours.shape == (20, 3) and colours.dtype == torch.uint8
    assert torch.equal(colours, palette(20)) and torch.equal(palette(5), colours[:5])  # class k: one colour
    assert len({tuple(c) for c in colours.tolist()}) == 20
    assert all(sum(c) > 0 for c in colours.tolist())  # black is left for void pixels
    assert colours[:3].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]  # Pascal VOC's colours 1..3


def test_colorize_maps_classes_to_the_palette_and_void_to_black() -> None:
    labels = torch.tensor([[[0, 1, IGNORE_INDEX], [2, 7, -1]]])  # (1, 2, 3); 7 and -1 are outside 0..2
    out = colorize(labels, 3)
    assert out.shape == (1, 3, 2, 3) and out.dtype == torch.uint8
    colours = palette(3)
    assert out[0, :, 0, 0].tolist() == colours[0].tolist()
    assert out[0, :, 0, 1].tolist() == colours[1].tolist()
    assert out[0, :, 1, 0].tolist() == colours[2].tolist()
    for y, x in [(0, 2), (1, 1), (1, 2)]:
        assert out[0, :, y, x].tolist() == [0, 0, 0]


def test_overlay_grid_shows_image_truth_and_prediction_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 12, 16, generator=g) * 2.0 + 1.0  # normalised inputs, far outside [0, 1]
    target = torch.randint(0, 4, (3, 12, 16), generator=g)
    target[:, :2] = IGNORE_INDEX
    prediction = target.clamp_min(0).clone()
    prediction[:, 6:] = (prediction[:, 6:] + 1) % 4  # wrong below row 6

    grid = overlay_grid(images, target, prediction, num_classes=4, max_images=2)
    assert grid.shape == (3, 2 * (12 + 2) + 2, 3 * (16 + 2) + 2)  # 2 rows (max_images) × 3 columns, padding 2
    assert grid.dtype == torch.float32 and grid.min() >= 0.0 and grid.max() <= 1.0

    def tile(row: int, column: int) -> Tensor:
        top, left = 2 + row * 14, 2 + column * 18
        return grid[:, top : top + 12, left : left + 16]

    for row in range(2):
        image = images[row]
        shown = (image - image.min()) / (image.max() - image.min())
        torch.testing.assert_close(tile(row, 0), shown)  # min-max rescaled
        torch.testing.assert_close(tile(row, 1)[:, :2], shown[:, :2])  # void pixels: the image only
        expected = 0.5 * shown + 0.5 * colorize(target[row : row + 1], 4)[0].float() / 255
        torch.testing.assert_close(tile(row, 1)[:, 2:], expected[:, 2:])
        torch.testing.assert_close(tile(row, 2)[:, 2:6], tile(row, 1)[:, 2:6])  # right: same colours
        differs = (tile(row, 2)[:, 6:] - tile(row, 1)[:, 6:]).abs().amax(0) > 1e-6
        assert differs.all()  # wrong everywhere below row 6: the prediction column differs
        assert not torch.equal(tile(row, 2)[:, :2], tile(row, 1)[:, :2])  # void in truth, predicted anyway


def test_iou_table_rows_na_and_mean_without_nan() -> None:
    text = iou_table(["road", "sky", "car"], torch.tensor([0.5, float("nan"), 0.25]), pixel_accuracy=0.875)
    assert text.splitlines() == [
        "| class | IoU |",
        "| --- | --- |",
        "| road | 0.500 |",
        "| sky | n/a |",
        "| car | 0.250 |",
        "| mean | 0.375 |",  # (0.5 + 0.25) / 2: sky left out
        "| pixel accuracy | 0.875 |",
    ]
    none = iou_table(["a", "b"], torch.tensor([float("nan"), float("nan")]))
    assert none.splitlines()[-1] == "| mean | n/a |" and "pixel accuracy" not in none


def test_log_helpers_write_to_tensorboard_only(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    grid = overlay_grid(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), torch.ones(1, 8, 8).long(), 2)
    assert log_dense_images(logger, "val/scene_images", grid, step=7)
    assert log_text(logger, "val/scene_iou", iou_table(["a", "b"], torch.tensor([0.5, 1.0])), step=7)
    logger.experiment.flush()
    assert list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    [image] = events.Images("val/scene_images")
    assert image.step == 7 and (image.height, image.width) == tuple(grid.shape[1:])
    assert any("val/scene_iou" in tag for tag in events.Tags()["tensors"])

    assert not log_dense_images(None, "x", grid, 0) and not log_text(None, "x", "t", 0)
    assert not log_text(CSVLogger(str(tmp_path / "csv")), "x", "t", 0)
    assert log_text([CSVLogger(str(tmp_path / "csv")), logger], "y", "t", 1)  # trainer.loggers: the TensorBoard one


# -- PredictionWriter ------------------------------------------------------------------------------------------

TASKS = [
    {"name": "weather", "kind": "multiclass", "num_outputs": 2, "class_names": ["dry", "wet"]},
    {"name": "scene", "kind": "segmentation", "num_outputs": 3, "class_names": ["road", "sky", "car"]},
    {"name": "drivable", "kind": "mask", "num_outputs": 1, "class_names": []},
]
IDS = ["a.jpg", "sub/b.jpg", "c.png"]


def dense_batch(index: list[int], sizes: list[list[int]], height: int, width: int, seed: int) -> dict[str, Tensor]:
    """A predict_step output: padded (B, H, W) masks (padding filled with 9s / 1s, which cropping must drop)."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.full((len(index), height, width), 9, dtype=torch.uint8)
    drivable = torch.ones(len(index), height, width, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        scene[i, :h, :w] = torch.randint(0, 3, (h, w), generator=g, dtype=torch.uint8)
        drivable[i, :h, :w] = torch.randint(0, 2, (h, w), generator=g, dtype=torch.uint8)
    weather = torch.rand(len(index), 2, generator=g).softmax(-1)
    return {
        "index": torch.tensor(index),
        "sizes": torch.tensor(sizes, dtype=torch.int64),
        "weather": weather,
        "scene": scene,
        "drivable": drivable,
    }


def fake_trainer(rank: int = 0, world_size: int = 1) -> Any:
    return SimpleNamespace(
        world_size=world_size, global_rank=rank, datamodule=SimpleNamespace(prediction_id=IDS.__getitem__)
    )


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_prediction_writer_writes_cropped_mask_pngs_and_the_csv_in_index_order(tmp_path: Path) -> None:
    # two batches out of index order, padded to different sizes
    first = dense_batch([2, 0], [[5, 6], [3, 4]], 5, 6, seed=1)
    second = dense_batch([1], [[4, 7]], 4, 7, seed=2)
    target = tmp_path / "out" / "preds.csv"
    writer = PredictionWriter(str(target))
    writer.write_on_epoch_end(fake_trainer(), SimpleNamespace(tasks=TASKS), [[first, second]], [])

    header, *rows = read_csv(target)
    assert header == ["id", "scene", "drivable", "weather", "weather_prob_dry", "weather_prob_wet"]
    assert [r[0] for r in rows] == IDS  # index order 0, 1, 2
    assert [r[1:3] for r in rows] == [
        ["preds_masks/scene/a.png", "preds_masks/drivable/a.png"],
        ["preds_masks/scene/sub/b.png", "preds_masks/drivable/sub/b.png"],
        ["preds_masks/scene/c.png", "preds_masks/drivable/c.png"],
    ]
    expected = {  # index: (batch, row in it)
        0: (first, 1),
        1: (second, 0),
        2: (first, 0),
    }
    for index, row in enumerate(rows):
        batch, i = expected[index]
        h, w = batch["sizes"][i].tolist()
        for column, task in [(1, "scene"), (2, "drivable")]:
            png = Image.open(target.parent / row[column])
            assert png.mode == "L" and png.size == (w, h)  # cropped to the image's size
            np.testing.assert_array_equal(np.asarray(png), batch[task][i, :h, :w].numpy())
        probs = batch["weather"][i]
        assert row[3] == ["dry", "wet"][int(probs.argmax())]
        assert [float(v) for v in row[4:]] == pytest.approx(probs.tolist(), abs=1e-6)
    assert not list(target.parent.rglob("*.partial"))  # written through temporary names, all renamed


def test_prediction_writer_dense_only_without_sizes_and_per_rank(tmp_path: Path) -> None:
    tasks = [TASKS[1]]
    batch = dense_batch([1, 0], [[2, 3], [2, 3]], 2, 3, seed=3)
    del batch["sizes"], batch["weather"], batch["drivable"]
    target = tmp_path / "preds.csv"
    PredictionWriter(str(target)).write_on_epoch_end(
        fake_trainer(rank=1, world_size=2), SimpleNamespace(tasks=tasks), [batch], []
    )
    assert not target.exists()
    header, *rows = read_csv(tmp_path / "preds.rank1.csv")  # this rank's CSV, the shared masks folder
    assert header == ["id", "scene"]
    assert rows == [["a.jpg", "preds_masks/scene/a.png"], ["sub/b.jpg", "preds_masks/scene/sub/b.png"]]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / rows[1][1])), batch["scene"][0].numpy())


def test_in_index_order_keeps_masks_of_different_sizes_per_sample() -> None:
    same = in_index_order(
        [
            {"index": torch.tensor([1]), "m": torch.ones(1, 2, 2)},
            {"index": torch.tensor([0]), "m": torch.zeros(1, 2, 2)},
        ]
    )
    assert isinstance(same[0]["m"], Tensor) and same[0]["m"][:, 0, 0].tolist() == [0.0, 1.0]
    [merged] = in_index_order(
        [
            {
                "index": torch.tensor([2, 0]),
                "sizes": torch.tensor([[1, 1], [2, 2]]),
                "m": torch.arange(8).view(2, 2, 2),
            },
            {"index": torch.tensor([1]), "sizes": torch.tensor([[3, 1]]), "m": torch.full((1, 3, 1), 7)},
        ]
    )
    assert merged["index"].tolist() == [0, 1, 2] and merged["sizes"].tolist() == [[2, 2], [3, 1], [1, 1]]
    assert [m.shape for m in merged["m"]] == [(2, 2), (3, 1), (2, 2)]
    assert merged["m"][0].tolist() == [[4, 5], [6, 7]] and merged["m"][2].tolist() == [[0, 1], [2, 3]]


def test_mask_paths_stay_inside_the_masks_folder_and_collisions_are_refused(tmp_path: Path) -> None:
    assert mask_relative_path("scene", "0001TP_008550.jpg") == Path("scene/0001TP_008550.png")
    assert mask_relative_path("scene", "/abs/../x.y.jpg") == Path("scene/abs/x.y.png")
    assert mask_relative_path("scene", "17") == Path("scene/17.png")
    batch = dense_batch([0, 1], [[2, 2], [2, 2]], 2, 2, seed=4)
    del batch["weather"], batch["drivable"]
    trainer = fake_trainer()
    trainer.datamodule.prediction_id = ["x.jpg", "x.png"].__getitem__
    with pytest.raises(ValueError, match="would both write"):
        PredictionWriter(str(tmp_path / "p.csv")).write_on_epoch_end(
            trainer, SimpleNamespace(tasks=[TASKS[1]]), [batch], []
        )
    assert not list(tmp_path.rglob("*.png"))  # refused before any was written
    trainer.datamodule.prediction_id = ["x.jpg", "x.jpg"].__getitem__  # a sampler repeating an image: written once
    PredictionWriter(str(tmp_path / "p.csv")).write_on_epoch_end(
        trainer, SimpleNamespace(tasks=[TASKS[1]]), [batch], []
    )
    assert [r[1] for r in read_csv(tmp_path / "p.csv")[1:]] == ["p_masks/scene/x.png"] * 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "p_masks/scene/x.png")), batch["scene"][0].numpy())


class DenseModel(pl.LightningModule):
    """predict_step as a multi-task model with a dense task returns it: per-image class plus a uint8 mask."""

    tasks = TASKS[:2]

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 3, 1)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.layer(batch["inputs"])
        return {
            "index": batch["index"],
            "sizes": batch["sizes"],
            "weather": logits.mean((2, 3))[:, :2].softmax(-1),
            "scene": logits.argmax(1).to(torch.uint8),
        }


def test_prediction_writer_through_trainer_predict(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    batches = [  # a loader's batches out of index order, padded to different sizes
        {"inputs": torch.randn(2, 3, 4, 5, generator=g), "index": torch.tensor([1, 2]), "sizes": [[4, 5], [3, 2]]},
        {"inputs": torch.randn(1, 3, 6, 3, generator=g), "index": torch.tensor([0]), "sizes": [[6, 3]]},
    ]
    for batch in batches:
        batch["sizes"] = torch.tensor(batch["sizes"])
    model = DenseModel()
    target = tmp_path / "predictions.csv"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[PredictionWriter(str(target))],
    )
    loader = DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    header, *rows = read_csv(target)
    assert header == ["id", "scene", "weather", "weather_prob_dry", "weather_prob_wet"]
    assert [r[0] for r in rows] == ["0", "1", "2"] and rows[2][1] == "predictions_masks/scene/2.png"
    with torch.no_grad():
        expected = model.layer(batches[0]["inputs"][1:2]).argmax(1)[0, :3, :2]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / rows[2][1])), expected.numpy())
    assert math.isclose(sum(float(v) for v in rows[0][3:]), 1.0, abs_tol=1e-5)
