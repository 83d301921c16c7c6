"""A two-process DDP run (CPU, gloo) that is resumed mid-epoch, for ``tests/test_random_state.py``.

Lightning's ``strategy="ddp"`` starts the other process by running this script again, so it lives outside
pytest. Both fits run in the same two processes: run A trains 12 steps uninterrupted (40 training images,
4 per batch per process: 5 steps an epoch, validation after each) and writes a checkpoint after step 7
(mid-epoch 1); run B resumes that checkpoint in a model with another initialisation. Each process seeds its
own stream at ``on_train_start`` and augments with its own generator, so the processes' random states
differ and restoring the wrong process's state would change the result.

Usage: ``python ddp_random_state.py OUT_DIR``. Every rank writes ``OUT_DIR/rank<r>.pt``: its final weights of
both runs and its torch generator state when the checkpoint was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset

from datamodules import RandomAffineBatch
from datamodules.base import ClassificationDataModule
from tlmodules import FineTuneModule

CHECKPOINT_STEP, MAX_STEPS = 7, 12


class RowImages(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.inputs = torch.rand(n, 1, 8, 8, generator=g) * 0.3
        self.inputs[torch.arange(n), 0, 2 * self.labels] += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": i}


class Patterns(ClassificationDataModule):
    """40 training images ``(1, 8, 8)`` whose bright row is the label; 9 validation images; batch augmentation."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(batch_size=batch_size, num_workers=0, val_fraction=0.0, seed=3)
        self.class_names = ["0", "1", "2"]
        self.batch_augment = RandomAffineBatch(degrees=10.0)
        self.datasets = {"train": RowImages(40, 0), "val": RowImages(9, 1)}

    def setup(self, stage: str | None = None) -> None:
        return None


class Flat(nn.Module):
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PerProcessStream(pl.Callback):
    """Seeds each process's stream apart at the start of training; records it when the checkpoint is written."""

    def __init__(self) -> None:
        self.at_checkpoint: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(1000 + trainer.global_rank)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == CHECKPOINT_STEP:
            self.at_checkpoint = torch.get_rng_state()


def fit(out: Path, init_seed: int, ckpt: Path | None) -> tuple[pl.Trainer, FineTuneModule, PerProcessStream]:
    pl.seed_everything(init_seed)
    model = FineTuneModule(backbone=Flat(), num_classes=3, dropout=0.5, lr=0.05, lr_schedule="cosine")
    stream = PerProcessStream()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        check_val_every_n_epoch=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            stream,
            ModelCheckpoint(dirpath=out, every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1, filename="{step}"),
        ],
    )
    trainer.fit(model, datamodule=Patterns(), ckpt_path=ckpt, weights_only=True if ckpt else None)
    return trainer, model, stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer, whole, stream = fit(args.out / "a", 0, None)
    _, resumed, _ = fit(args.out / "b", 1, args.out / "a" / f"step={CHECKPOINT_STEP}.ckpt")
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "whole": {k: v.detach().clone() for k, v in whole.state_dict().items()},
            "resumed": {k: v.detach().clone() for k, v in resumed.state_dict().items()},
            "stream_at_checkpoint": stream.at_checkpoint,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
