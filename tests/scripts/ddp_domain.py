"""A two-process DDP run of DANN on the CPU (gloo), for ``tests/test_distributed.py``.

Lightning's ``strategy="ddp"`` starts the other process by running this script again, so it lives
outside pytest. The source has 48 training samples and the target 32 (batches of 8): each rank should
get its own half of both sides, so 3 source batches, and 2 target batches that the combined loader cycles
to 3. One epoch of DANN, then one validation on both domains.

Usage: ``python ddp_domain.py OUT_DIR [--target-batchnorm]``. Every rank writes ``OUT_DIR/rank<r>.pt``: the source
and target sample indices it trained on (in order), its initial and final parameters, the metrics it logged, and
the final model's accuracy on each domain's whole validation set. ``--target-batchnorm``: the network has a
BatchNorm layer and DANN keeps target statistics (``target_batchnorm=True``); each rank also saves them, its
layer's shared statistics, and the target training inputs of its own shard (``ordered_dataloader``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from pattern_data import IN_FEATURES, PatternDataModule
from torch import nn

from datamodules.domain import DomainAdaptationDataModule
from tlmodules.dann import DANNModule

SOURCE_TRAIN, TARGET_TRAIN, VAL = 48, 32, 15  # odd VAL: a padded sampler would repeat a sample
BATCH = 8


class SmallNet(nn.Module):
    num_features = 16

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        norm = [nn.BatchNorm1d(16)] if batch_norm else []
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 16), *norm, nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.source: list[int] = []
        self.target: list[int] = []
        self.target_batches: list[int] = []
        self.validated: dict[int, list[int]] = {}  # validation indices per loader (0 source, 1 target)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.source.extend(batch["source"]["index"].tolist())
        self.target.extend(batch["target"]["index"].tolist())
        self.target_batches.append(len(batch["target"]["index"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.validated.setdefault(dataloader_idx, []).extend(batch["index"].tolist())


def target_statistics(model: DANNModule, data: DomainAdaptationDataModule, trainer: pl.Trainer) -> dict:
    norm = model.backbone.body.net[1]
    shard = [b["inputs"] for b in data.target.ordered_dataloader("train", trainer.global_rank, trainer.world_size)]
    return {
        "target_mean": norm.target_running_mean.clone(),
        "target_var": norm.target_running_var.clone(),
        "shared_mean": norm.running_mean.clone(),
        "target_shard": shard,
        "first_layer": {k: v.clone() for k, v in model.backbone.body.net[0].state_dict().items()},
    }


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--target-batchnorm", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)

    model = DANNModule(
        SmallNet(args.target_batchnorm),
        discriminator_hidden=16,
        lr=0.05,
        weight_decay=0.0,
        projection_samples=0,
        gamma=10.0,
        target_batchnorm=args.target_batchnorm,
    )
    data = DomainAdaptationDataModule(
        PatternDataModule(SOURCE_TRAIN, VAL, seed=1, batch_size=BATCH, shift=0.0),
        PatternDataModule(TARGET_TRAIN, VAL, seed=2, batch_size=BATCH, shift=1.0),
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
            "validated": recorder.validated,
            "full_val_acc": full_val_acc,
            **(target_statistics(model, data, trainer) if args.target_batchnorm else {}),
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
