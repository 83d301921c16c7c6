"""A two-process DDP run of DANN on the CPU (gloo), for ``tests/test_distributed.py``.

Lightning's ``strategy="ddp"`` starts the other process by running this script again, so it lives
outside pytest. The source has 48 training samples and the target 32 (batches of 8): each rank should
get its own half of both sides, so 3 source batches, and 2 target batches that the combined loader cycles
to 3. One epoch of DANN, then one validation on both domains.

Usage: ``python ddp_domain.py OUT_DIR``. Every rank writes ``OUT_DIR/rank<r>.pt``: the source and target
sample indices it trained on (in order), its initial and final parameters, the metrics it logged, and the
final model's accuracy on each domain's whole validation set.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.base import ClassificationDataModule
from datamodules.domain import DomainAdaptationDataModule
from tlmodules.dann import DANNModule

IN_FEATURES = 8
NUM_CLASSES = 3
SOURCE_TRAIN, TARGET_TRAIN, VAL = 48, 32, 16
BATCH = 8


class SmallNet(nn.Module):
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatternData(Dataset):
    """Label ``i % 3``: a noisy pattern of the label, shifted by ``shift`` (the domain gap)."""

    def __init__(self, n: int, seed: int, shift: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.inputs = torch.randn(n, IN_FEATURES, generator=g) * 0.5 + shift
        self.inputs[torch.arange(n), self.labels * 2] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": i}


class PatternDataModule(ClassificationDataModule):
    def __init__(self, train: int, seed: int, shift: float) -> None:
        super().__init__(batch_size=BATCH, num_workers=0, val_fraction=0.0, seed=seed)
        self.class_names = [str(c) for c in range(NUM_CLASSES)]
        self.datasets = {"train": PatternData(train, seed, shift), "val": PatternData(VAL, seed + 100, shift)}

    def setup(self, stage: str | None = None) -> None:
        return None


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.source: list[int] = []
        self.target: list[int] = []
        self.target_batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.source.extend(batch["source"]["index"].tolist())
        self.target.extend(batch["target"]["index"].tolist())
        self.target_batches.append(len(batch["target"]["index"]))


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)

    model = DANNModule(SmallNet(), discriminator_hidden=16, lr=0.05, weight_decay=0.0, projection_samples=0, gamma=10.0)
    data = DomainAdaptationDataModule(
        PatternDataModule(SOURCE_TRAIN, seed=1, shift=0.0), PatternDataModule(TARGET_TRAIN, seed=2, shift=1.0)
    )
    recorder = RecordBatches()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    initial: dict[str, torch.Tensor] = {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            initial.update(params(pl_module))

    trainer.callbacks.append(Initial())
    trainer.fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():  # accuracy of the final model on each domain's whole validation set (both ranks' shards)
        full_val_acc = {
            name: float((model(side.datasets["val"].inputs).argmax(-1) == side.datasets["val"].labels).float().mean())
            for name, side in (("source", data.source), ("target", data.target))
        }
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "source": recorder.source,
            "target": recorder.target,
            "target_batches": recorder.target_batches,
            "global_step": trainer.global_step,
            "initial": initial,
            "final": params(model),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "val_domains": data.val_domains,
            "full_val_acc": full_val_acc,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
