"""A two-process DDP run of MultiTaskModule with per-pixel tasks on the CPU (gloo), for ``tests/test_distributed.py``.

``SegmentationDataModule`` on the folders ``tests/test_multitask_dense.py:write_split`` made (8 training frames,
5 validation frames: an odd count, sharded without repeats), a ResNet-18 trunk without weights, segmentation +
drivable mask + object presence + road share; one epoch of two steps per rank (batches of 2), then validation.

Usage: ``python ddp_segmentation.py OUT_DIR DATA_DIR``. Every rank writes ``OUT_DIR/rank<r>.pt``: its final
parameters and buffers and the validation metrics it logged.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules import SegmentationDataModule
from tlmodules.multitask import MultiTaskModule

NAMES = ["sky", "road", "car", "person"]
TASKS = [
    {"name": "scene", "kind": "segmentation"},
    {"name": "drivable", "kind": "mask", "classes": ["road"]},
    {"name": "objects", "kind": "multilabel", "classes": ["car", "person"]},
    {"name": "road_share", "kind": "regression", "classes": ["road"]},
]


def data(folder: Path) -> SegmentationDataModule:
    return SegmentationDataModule(
        train_dir=str(folder / "train"), val_dir=str(folder / "val"), class_names=NAMES, ignore_value=255,
        tasks=TASKS, batch_size=2, backbone="torchvision:resnet18", weights="none",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    datamodule = data(args.data)
    model = MultiTaskModule(
        backbone="torchvision:resnet18", weights="none", tasks=datamodule.tasks, decoder_channels=16,
        weighting="uncertainty", lr=3e-3,
    )  # fmt: skip
    common = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = pl.Trainer(devices=2, strategy="ddp", max_epochs=1, num_sanity_val_steps=0, **common)
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "steps": trainer.global_step,
            "final": {n: t.detach().clone() for n, t in model.state_dict().items()},
            "metrics": metrics,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
