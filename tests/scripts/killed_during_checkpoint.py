"""Train a tiny MultiTaskModule, saving ``last.ckpt`` after every step; the process dies (``os._exit``, as a
``kill -9`` would leave it: no cleanup, no exception handling) half-way through writing the checkpoint of
step ``--die-at``. Used by tests/test_resume.py.

    python killed_during_checkpoint.py OUT --die-at 3
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import fsspec.implementations.local as local_fs
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tlmodules import MultiTaskModule


class DieInCheckpointWrite(pl.Callback):
    """From step ``die_at`` on, the next file write stops half-way and the process exits at once."""

    def __init__(self, die_at: int) -> None:
        self.die_at = die_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.die_at:
            original = local_fs.LocalFileOpener.write

            def half_then_die(opener, data):
                original(opener, data[: len(data) // 2])
                opener.flush()
                os._exit(137)

            local_fs.LocalFileOpener.write = half_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--die-at", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    x = torch.randn(64, 4)
    samples = [{"inputs": x[i], "labels": {"value": x[i].sum()}, "index": i} for i in range(64)]
    model = MultiTaskModule(
        tasks=[{"name": "value", "kind": "regression", "num_outputs": 1}], in_features=4, trunk_hidden=8, lr=0.01
    )
    out = Path(args.out)
    # the kill hook runs before ModelCheckpoint's save of the same step (callbacks run in order; checkpoints last)
    checkpoints = ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DieInCheckpointWrite(args.die_at), checkpoints],
    )
    trainer.fit(model, DataLoader(samples, batch_size=8))


if __name__ == "__main__":
    main()
