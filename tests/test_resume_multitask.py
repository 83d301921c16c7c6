"""Resuming a multi-task run mid-epoch gives the run that was never interrupted, DWA's epoch statistics
included: the stop falls in the middle of the epoch whose mean task losses set the next epoch's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_resume import ResumableLoader, StopAt, max_abs_diff, state
from torch.utils.data import Dataset

from tlmodules import MultiTaskModule

pytestmark = pytest.mark.slow

NUM_SAMPLES, BATCH_SIZE, MAX_EPOCHS = 48, 8, 3  # 6 steps per epoch
TASKS = [
    {"name": "digit", "kind": "multiclass", "num_outputs": 3},
    {"name": "load", "kind": "regression", "num_outputs": 1},
]


class TwoTaskData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(NUM_SAMPLES, 6, generator=g)
        self.digit = self.x[:, :3].argmax(1)
        self.load = 2 * self.x[:, 3] + self.x[:, 4]

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.x[i], "labels": {"digit": self.digit[i], "load": self.load[i]}, "index": i}


def resumable_loader() -> ResumableLoader:
    return ResumableLoader(TwoTaskData(), batch_size=BATCH_SIZE)


class Weights(pl.Callback):
    """DWA's task weights at the start of every epoch."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, dict[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.per_epoch[trainer.current_epoch] = pl_module.weighting.weights()


def make_module(seed: int) -> MultiTaskModule:
    torch.manual_seed(seed)
    return MultiTaskModule(tasks=TASKS, in_features=6, trunk_hidden=16, weighting="dwa", lr=0.02)


def make_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings = {"accelerator": "cpu", "max_epochs": MAX_EPOCHS, "logger": False, "enable_progress_bar": False}
    return pl.Trainer(**settings, enable_model_summary=False, deterministic=True, callbacks=callbacks, **kwargs)


def test_dwa_run_resumed_mid_epoch_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    weights_a = Weights()
    model_a = make_module(seed=0)
    make_trainer([weights_a], enable_checkpointing=False).fit(model_a, train_dataloaders=resumable_loader())

    stop = 9  # mid-epoch 1: epoch 1's mean losses (which set epoch 2's weights) straddle the interruption
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    make_trainer([StopAt(stop), saver]).fit(make_module(seed=0), train_dataloaders=resumable_loader())
    [ckpt] = sorted(tmp_path.glob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    loader = resumable_loader()  # Lightning issue #20550: restore the loader state as test_resume.py does
    loader.load_state_dict(saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0])
    weights_b = Weights()
    model_b = make_module(seed=1)
    make_trainer([weights_b], enable_checkpointing=False).fit(
        model_b, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True
    )

    assert len(set(weights_a.per_epoch[2].values())) == 2  # DWA really moved the weights in epoch 2
    assert weights_b.per_epoch[2] == pytest.approx(weights_a.per_epoch[2], abs=1e-6)
    assert max_abs_diff(state(model_a), state(model_b)) < 1e-5
