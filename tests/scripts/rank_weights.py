"""A callback for launched runs (torchrun, SLURM): every rank saves its final parameters to ``<folder>/rank<r>.pt``.

Used by tests/test_distributed.py through the CLI: ``--trainer.callbacks+=rank_weights.SaveRankWeights``
with ``tests/scripts`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class SaveRankWeights(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "global_step": trainer.global_step,
            # parameters only: BatchNorm running statistics stay local after the last forward (DDP broadcasts
            # rank 0's buffers at the start of each forward, and checkpoints hold rank 0's)
            "state": {k: v.detach().cpu() for k, v in pl_module.named_parameters()},
        }
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")
