"""A two-process DDP feature-probe run on the CPU (gloo), for ``tests/test_distributed.py``.

Lightning's ``strategy="ddp"`` starts the other process by running this script again, so it lives
outside pytest. A :class:`tlmodules.FeatureProbeModule` on a small frozen BatchNorm network is fitted
three times on the same 64 samples: a linear head for 3 epochs (the training sampler reshuffles the shards
every epoch), a logistic-regression probe for 1 epoch, and the linear head again on data that has lengths
(``sample_lengths``, as text has), so the features are computed by the length-ordered extraction pass
before training. The data has no fingerprint, so the feature cache lives in memory.

Usage: ``python ddp_probe.py OUT_DIR``. Every rank writes ``OUT_DIR/rank<r>.pt`` with, per run
(``"linear"``, ``"logistic_regression"``, ``"linear_length_ordered"``): the sample indices whose training
batches made the backbone run, per epoch (``"computed"``), the indices this rank trained on, per epoch
(``"seen"``), the number of backbone calls on training and on validation batches, the samples of each
split this rank's extraction pass computed, in order (``"extracted"``), the number of training / validation
samples in the cache after the fit, the metrics it logged, the final model's accuracy and loss over the whole
13-sample validation set, the head's state before and after, whether the backbone's parameters and
buffers are unchanged, and the number of samples each estimator fit used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from pattern_data import IN_FEATURES, NUM_CLASSES, PatternDataModule, whole_set_scores
from torch import nn

import tlmodules.probe
from tlmodules import FeatureProbeModule

NUM_SAMPLES = 64
NUM_VAL = 13  # odd: a padded sampler would repeat one sample on one rank
BATCH_SIZE = 8


class SmallBackbone(nn.Module):
    """``(B, 8) → (B, 16)`` with BatchNorm (its statistics must not move) and dropout (must stay off)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5)),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class LengthPatternDataModule(PatternDataModule):
    """The pattern data with a made-up length per sample, so the probe's extraction pass runs in length order."""

    def sample_lengths(self, stage: str) -> list[int] | None:
        return [length_of(i) for i in range(len(self.datasets[stage]))]


def length_of(position: int) -> int:
    return (7 * position) % 11


class Recorder(pl.Callback):
    """Which training samples this rank saw, and on which training batches its backbone ran, per epoch; which
    samples its extraction pass computed, per split, in order."""

    def __init__(self, model: FeatureProbeModule, data: PatternDataModule) -> None:
        self.seen: dict[int, list[int]] = {}
        self.computed: dict[int, list[int]] = {}
        self.extracted: dict[str, list[int]] = {}
        self.train_calls = 0
        self.val_calls = 0
        self.batch: list[int] = []
        self.stage = ""
        # an input row → its sample index (the backbone sees inputs only)
        self.index_of = {
            tuple(row.tolist()): dataset.offset + i
            for dataset in data.datasets.values()
            for i, row in enumerate(dataset.inputs)
        }
        model.backbone.body.register_forward_hook(self.on_backbone_forward)
        extract = model.extract

        def recording_extract(loader: Any, split: str) -> int:
            self.stage = f"extract:{split}"
            try:
                return extract(loader, split)
            finally:
                self.stage = ""

        model.extract = recording_extract

    def on_backbone_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stage.startswith("extract:"):
            rows = [self.index_of[tuple(row.tolist())] for row in args[0]]
            self.extracted.setdefault(self.stage.removeprefix("extract:"), []).extend(rows)
        elif self.stage == "train":
            self.train_calls += 1
            self.computed.setdefault(self.epoch, []).extend(self.batch)
        elif self.stage == "val":
            self.val_calls += 1
        elif self.stage != "finished":
            raise AssertionError("the backbone ran outside a training or validation batch")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stage, self.epoch, self.batch = "train", trainer.current_epoch, batch["index"].tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(self.batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stage = ""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.stage = "val"

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.stage = ""


def fit(classifier: str, epochs: int, root: Path, lengths: bool = False) -> dict[str, Any]:
    pl.seed_everything(0, workers=True)
    model = FeatureProbeModule(backbone=SmallBackbone(), num_classes=NUM_CLASSES, head=classifier, lr=0.05)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    kind = LengthPatternDataModule if lengths else PatternDataModule
    data = kind(NUM_SAMPLES, NUM_VAL, seed=1, batch_size=BATCH_SIZE, val_noise=2.0)
    recorder = Recorder(model, data)
    fits: list[int] = []
    original_fit = tlmodules.probe.fit_estimator

    def counting_fit(estimator: Any, features: torch.Tensor, labels: torch.Tensor) -> Any:
        fits.append(len(labels))
        return original_fit(estimator, features, labels)

    tlmodules.probe.fit_estimator = counting_fit
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[recorder],
    )
    try:
        trainer.fit(model, datamodule=data)
    finally:
        tlmodules.probe.fit_estimator = original_fit
    recorder.stage = "finished"  # the whole-set scores below run the backbone outside the Trainer
    backbone_after = model.backbone.state_dict()
    return {
        "seen": recorder.seen,
        "computed": recorder.computed,
        "extracted": recorder.extracted,
        "train_calls": recorder.train_calls,
        "val_calls": recorder.val_calls,
        "train_cached": model.cache.size("train"),
        "train_cached_indices": model.cache.items("train")[0],
        "val_cached": model.cache.size("val"),
        "head_initial": head_before,
        "head": {k: v.detach().clone() for k, v in model.head.state_dict().items()},
        "backbone_unchanged": all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before),
        "estimator_fits": fits,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "whole_val": whole_set_scores(model, data.datasets["val"]),
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"linear": fit("linear", 3, args.out / "linear"), "pid": os.getpid()}
    results["logistic_regression"] = fit("logistic_regression", 1, args.out / "logreg")
    results["linear_length_ordered"] = fit("linear", 3, args.out / "length_ordered", lengths=True)
    rank = results["linear"]["rank"]
    torch.save(results, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
