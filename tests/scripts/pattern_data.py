"""Tiny learnable data shared by the DDP scripts: label ``i % 3``, a noisy input with a bump at ``2 · label``.

``PatternDataModule`` serves it through :class:`datamodules.base.ClassificationDataModule`'s loaders, so
the scripts exercise the library's own sharding (Lightning's padded ``DistributedSampler`` for training,
the unpadded :func:`datamodules.samplers.evaluation_sampler` for validation).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.base import ClassificationDataModule

IN_FEATURES = 8
NUM_CLASSES = 3


class PatternData(Dataset):
    """``n`` samples of noise ``noise``; ``shift`` moves every input (a domain gap); ``index`` is ``offset + i``."""

    def __init__(self, n: int, seed: int, shift: float = 0.0, offset: int = 0, noise: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.inputs = torch.randn(n, IN_FEATURES, generator=g) * noise + shift
        self.inputs[torch.arange(n), self.labels * 2] += 2.0
        self.offset = offset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": self.offset + i}


class PatternDataModule(ClassificationDataModule):
    """Training and validation :class:`PatternData`; validation indices start at 1000 and its noise is
    ``val_noise`` (noisier than training, so validation accuracy is not a trivial 1.0)."""

    def __init__(
        self, train: int, val: int, seed: int, batch_size: int, shift: float = 0.0, val_noise: float = 0.5
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=0, val_fraction=0.0, seed=seed)
        self.class_names = [str(c) for c in range(NUM_CLASSES)]
        self.datasets = {
            "train": PatternData(train, seed, shift),
            "val": PatternData(val, seed + 100, shift, offset=1000, noise=val_noise),
        }

    def setup(self, stage: str | None = None) -> None:
        return None


@torch.no_grad()
def whole_set_scores(model: nn.Module, data: PatternData) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode) over every sample of ``data``."""
    was_training = model.training
    model.eval()
    logits = model(data.inputs).float()
    model.train(was_training)
    return {
        "acc": float((logits.argmax(-1) == data.labels).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(logits, data.labels)),
    }


class RecordIndices(pl.Callback):
    """The sample indices this rank trained on and validated on, per epoch (sanity checks excluded)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}
        self.validated: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.validated.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())
