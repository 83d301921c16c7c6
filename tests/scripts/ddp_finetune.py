"""A two-process DDP fine-tuning run on the CPU (gloo), for ``tests/test_distributed.py``.

Lightning's ``strategy="ddp"`` starts the other process by running this script again, so it lives
outside pytest. ``freeze_unfreeze`` trains the head alone in epoch 0 and the whole network from
epoch 1: the backbone's parameters are frozen when DDP wraps the model, so DDP's reducer does not
cover them and :class:`tlmodules.freezing.LateParameterSync` must average their gradients.

Usage: ``python ddp_finetune.py OUT_DIR [--no-late-sync] [--save-at-step N] [--resume CKPT]``.
Every rank writes ``OUT_DIR/rank<r>.pt``: initial and final parameters, BatchNorm buffers, the
sample indices it trained on and validated on (per epoch), the metrics it logged, the final model's
accuracy and loss over the whole 13-sample validation set, the parameter names recorded outside the reducer, and
how many parameters each optimizer step synced. ``--save-at-step N`` also writes
``OUT_DIR/step<N>.ckpt`` after optimizer step ``N``; ``--resume`` continues from such a checkpoint;
``--group-by-length`` gives sample ``i`` the length ``LENGTHS[i]`` and trains on length-grouped batches;
``--contrastive`` trains ``strategy="contrastive"`` instead (and records a head fitted in one process).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from pattern_data import IN_FEATURES, NUM_CLASSES, PatternDataModule, RecordIndices, whole_set_scores
from torch import nn
from torch.utils.data import Dataset

from tlmodules.contrastive import fit_logistic_head
from tlmodules.finetune import FineTuneModule

NUM_SAMPLES = 64
NUM_VAL = 13  # odd: a padded sampler would repeat one sample on one rank
LENGTHS = [(i * 37) % 61 + 1 for i in range(NUM_SAMPLES)]  # for --group-by-length


class SmallBackbone(nn.Module):
    """Three blocks (three layer groups), two of them with BatchNorm: ``(B, 8) → (B, 16)``."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class SaveAtStep(pl.Callback):
    """``trainer.save_checkpoint`` (a call every rank makes) once ``global_step`` reaches ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def reference_head(model: FineTuneModule, data: Dataset) -> dict[str, torch.Tensor]:
    """A logistic-regression head fitted here, in one process, on the final backbone's features of every
    training sample: what the contrastive strategy's head, fitted on the shards of both ranks, must equal."""
    model.eval()
    with torch.no_grad():
        features = model.backbone(data.inputs)
    layer = nn.Linear(model.backbone.num_features, NUM_CLASSES)
    with torch.no_grad():
        fit_logistic_head(layer, features, data.labels, NUM_CLASSES, seed=0)
    return {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-late-sync", action="store_true", help="control: disable LateParameterSync")
    parser.add_argument("--save-at-step", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--group-by-length", action="store_true", help="length-grouped training batches")
    parser.add_argument("--contrastive", action="store_true", help="strategy='contrastive' (fitted head)")
    parser.add_argument("--group-by-class", action="store_true", help="class-grouped training batches")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    model = FineTuneModule(
        backbone=SmallBackbone(),
        num_classes=NUM_CLASSES,
        strategy="contrastive" if args.contrastive else "freeze_unfreeze",
        unfreeze_epoch=1,
        lr=0.05,
        weight_decay=0.0,
        lr_schedule="constant",
    )
    initial = params(model)
    synced: list[tuple[int, int]] = []  # (epoch, parameters synced) per optimizer step
    late_sync = model._late_sync
    original_sync = late_sync.sync

    def counting_sync() -> int:
        n = 0 if args.no_late_sync else original_sync()
        synced.append((model.current_epoch, n))
        return n

    late_sync.sync = counting_sync

    recorder = RecordIndices()
    callbacks: list[pl.Callback] = [recorder]
    if args.save_at_step:
        callbacks.append(SaveAtStep(args.save_at_step, args.out / f"step{args.save_at_step}.ckpt"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = PatternDataModule(NUM_SAMPLES, NUM_VAL, seed=1234, batch_size=8, val_noise=2.0)
    if args.group_by_length:  # pretend sample i has length LENGTHS[i]
        data.group_by_length = True
        data.sample_lengths = lambda stage: LENGTHS
    data.group_by_class = args.group_by_class
    trainer.fit(model, datamodule=data, ckpt_path=args.resume, weights_only=True if args.resume else None)

    names = {id(p): n for n, p in model.named_parameters()}
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "initial": initial,
            "final": params(model),
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "seen": recorder.seen,
            "validated": recorder.validated,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "whole_val": whole_set_scores(model, data.datasets["val"]),
            "outside": [names[id(p)] for p in late_sync.outside],
            "synced": synced,
            "trainable_epoch": model._trainable_epoch,
            "train_sampler": type(trainer.train_dataloader.sampler).__name__,
            "lengths": LENGTHS,
            "train_labels": [int(y) for y in data.datasets["train"].labels],
            "head_fit_samples": model.head_fit_samples,
            "head_fitted_step": model._head_fitted_step,
            "global_step": trainer.global_step,
            "reference_head": reference_head(model, data.datasets["train"]) if args.contrastive else {},
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
