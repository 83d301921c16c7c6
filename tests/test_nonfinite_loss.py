"""A NaN or infinite training loss stops the run with its step and batch, before the weights change,
and the last checkpoint written stays the last good one."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tlmodules import MultiTaskModule, NonFiniteLossError

TASKS = [{"name": "value", "kind": "regression", "num_outputs": 1}]


def rows(n: int, poisoned: int) -> list[dict]:
    """``n`` samples of 4 features; the sample ``poisoned`` has a NaN feature."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    x[poisoned, 2] = math.nan
    y = x.sum(1)
    return [{"inputs": x[i], "labels": {"value": y[i]}, "index": i} for i in range(n)]


def test_nan_loss_stops_with_step_and_batch_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = MultiTaskModule(tasks=TASKS, in_features=4, trunk_hidden=8, lr=0.01)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
    )
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):  # the weights right before the poisoned batch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Snapshot())
    loader = DataLoader(rows(40, poisoned=29), batch_size=8)  # sample 29 is in batch 3
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3 \(epoch 0, batch 3\)"):
        trainer.fit(model, loader)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the bad step changed nothing
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3  # written after the third good step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.equal(last["state_dict"][k], v) for k, v in before.items())
