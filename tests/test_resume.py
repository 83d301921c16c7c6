"""Resuming a fine-tuning run after (or around) an unfreeze gives the run that was never interrupted.

Run A trains uninterrupted for 3 epochs. Run B trains the same configuration, writes a checkpoint
after optimizer step ``S`` (ModelCheckpoint) and stops there; a fresh module (other random
initialisation) then resumes it with ``trainer.fit(..., ckpt_path=..., weights_only=True)``.

The data loader resumes mid-epoch (Lightning's ``state_dict``/``load_state_dict`` protocol) and
shuffles with a permutation seeded by the epoch, so A and the resumed B see the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tlmodules.finetune import FineTuneModule

NUM_SAMPLES = 48
BATCH_SIZE = 8
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH_SIZE  # 6
MAX_EPOCHS = 3
NUM_CLASSES = 3

pytestmark = pytest.mark.slow


class SmallBackbone(nn.Module):
    """Three blocks (three layer groups), two with BatchNorm: ``(B, 8) → (B, 16)``."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PatternData(Dataset):
    """Label ``i % 3``; the input carries a bump at position ``2 · label`` (learnable in a few steps)."""

    def __init__(self, n: int = NUM_SAMPLES) -> None:
        g = torch.Generator().manual_seed(1234)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.inputs = torch.randn(n, 8, generator=g) * 0.5
        self.inputs[torch.arange(n), self.labels * 2] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": i}


class EpochSampler(Sampler[int]):
    """A permutation seeded by the epoch (Lightning calls ``set_epoch``), able to start mid-epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.yielded = n, 0, 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples already consumed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist()
        start = self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0
        self.resume_at = None
        self.yielded = start
        for i in order[start:]:
            self.yielded += 1
            yield i


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves and restores mid-epoch.

    With ``num_workers=0`` and a sized loader Lightning does not prefetch, so the samples the
    sampler has yielded are the samples training has consumed.
    """

    def __init__(self, dataset: Dataset | None = None, batch_size: int = BATCH_SIZE) -> None:
        dataset = PatternData() if dataset is None else dataset
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset)), num_workers=0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "yielded": self.sampler.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at = (state["epoch"], state["yielded"])


def snapshot(module: FineTuneModule, trainer: pl.Trainer) -> dict[str, Any]:
    """What must agree between runs at the same point: freezing, module modes, optimizer groups."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    return {
        "epoch": trainer.current_epoch,
        "requires_grad": tuple(n for n, p in module.named_parameters() if p.requires_grad),
        "training": tuple(n for n, m in module.backbone.named_modules() if m.training),
        "groups": None
        if optimizer is None
        else [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups],
    }


class Probe(pl.Callback):
    """Snapshots at ``on_fit_start`` (what DDP would wrap), ``on_train_start`` and before every batch."""

    def __init__(self) -> None:
        self.fit_start: dict[str, Any] | None = None
        self.train_start: dict[str, Any] | None = None
        self.steps: dict[int, dict[str, Any]] = {}
        self.batches: dict[int, list[int]] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = snapshot(pl_module, trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = snapshot(pl_module, trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = snapshot(pl_module, trainer)
        self.batches[trainer.global_step] = batch["index"].tolist()


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def make_module(strategy: str, seed: int = 0) -> FineTuneModule:
    torch.manual_seed(seed)
    return FineTuneModule(
        backbone=SmallBackbone(),
        num_classes=NUM_CLASSES,
        strategy=strategy,
        unfreeze_epoch=0 if strategy == "gradual" else 1,
        lr=0.05,
        weight_decay=0.01,
        lr_schedule="cosine",
        warmup_fraction=0.1,
    )


def make_trainer(callbacks: list[pl.Callback], max_epochs: int = MAX_EPOCHS, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


_UNINTERRUPTED: dict[str, tuple[dict[str, torch.Tensor], Probe]] = {}


def uninterrupted(strategy: str) -> tuple[dict[str, torch.Tensor], Probe]:
    """Run A (cached per strategy): final state dict and probe."""
    if strategy not in _UNINTERRUPTED:
        probe = Probe()
        model = make_module(strategy)
        make_trainer([probe], enable_checkpointing=False).fit(model, train_dataloaders=ResumableLoader())
        assert max(probe.steps) == MAX_EPOCHS * STEPS_PER_EPOCH - 1
        _UNINTERRUPTED[strategy] = (state(model), probe)
    return _UNINTERRUPTED[strategy]


def interrupted_then_resumed(strategy: str, stop_step: int, folder: Path) -> dict[str, Any]:
    """Run B: stop after optimizer step ``stop_step`` with a checkpoint, then resume in a fresh module."""
    first = Probe()
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=stop_step, save_top_k=-1)
    make_trainer([first, StopAt(stop_step), saver]).fit(make_module(strategy), train_dataloaders=ResumableLoader())
    assert max(first.steps) == stop_step - 1, "run B did not stop where it was told to"
    [ckpt] = sorted(folder.glob("*.ckpt"))

    probe = Probe()
    resumed = make_module(strategy, seed=1)
    loader = ResumableLoader()
    # Lightning drops a checkpoint's data-loader state when the train loader was loaded before the
    # restore, which `trainer.estimated_stepping_batches` in configure_optimizers does (Lightning
    # issue #20550); restore it here as Lightning would. Loading the same state twice is harmless.
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    loader.load_state_dict(saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0])
    make_trainer([probe], enable_checkpointing=False).fit(
        resumed, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True
    )
    return {
        "ckpt": saved,
        "final": state(resumed),
        "probe": probe,
    }


# (strategy, stop step, expected checkpoint trainable_epoch): steps 0-5 are epoch 0, 6-11 epoch 1, 12-17 epoch 2.
CASES = [
    pytest.param("freeze_unfreeze", 9, 1, id="freeze_unfreeze-mid-epoch1"),
    pytest.param("freeze_unfreeze", 6, 0, id="freeze_unfreeze-end-epoch0-before-unfreeze"),
    pytest.param("gradual", 9, 1, id="gradual-mid-epoch1"),
    pytest.param("gradual", 12, 1, id="gradual-last-batch-epoch1"),
]


@pytest.mark.parametrize(("strategy", "stop_step", "trainable_epoch"), CASES)
def test_resume_matches_uninterrupted_run(strategy: str, stop_step: int, trainable_epoch: int, tmp_path: Path) -> None:
    final_a, probe_a = uninterrupted(strategy)
    b = interrupted_then_resumed(strategy, stop_step, tmp_path)
    probe_b: Probe = b["probe"]

    # the checkpoint records the trainable state it was written in, as plain (weights_only) data
    meta = b["ckpt"]["tlmodules"]
    assert meta["trainable_epoch"] == trainable_epoch
    top = 3 if strategy == "freeze_unfreeze" and trainable_epoch >= 1 else 0
    if strategy == "gradual":
        top = trainable_epoch + 1  # unfreeze_epoch=0: one more group per epoch
    assert meta["trainable_top_groups"] == top
    assert b["ckpt"]["global_step"] == stop_step

    # the resumed run trained exactly the remaining batches, the same ones as run A
    assert sorted(probe_b.steps) == list(range(stop_step, MAX_EPOCHS * STEPS_PER_EPOCH))
    for step in probe_b.steps:
        assert probe_b.batches[step] == probe_a.batches[step], f"different batch at step {step}"

    # right after restoring (before any batch), and before every later batch, the resumed module
    # freezes the same parameters, keeps the same modules in train mode and has the same optimizer
    # groups and learning rates as run A at the same step
    at_stop = probe_a.steps[stop_step]
    # what DDP would wrap: the trainable state the checkpoint was written in (on_load_checkpoint)
    assert probe_b.fit_start["requires_grad"] == probe_a.steps[stop_step - 1]["requires_grad"]
    # optimizer restored (on_train_start): same groups, learning rates and weight decay as run A
    assert probe_b.train_start["groups"] == at_stop["groups"]
    # before the first resumed batch: the freezing of the epoch being trained (also when the
    # checkpoint was written on an epoch's last batch and the resumed run starts the next epoch)
    assert probe_b.steps[stop_step] == at_stop
    for step, snap in probe_b.steps.items():
        assert snap == probe_a.steps[step], f"state differs from run A before step {step}"

    # and ends with run A's weights and BatchNorm statistics
    diff = max_abs_diff(b["final"], final_a)
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff}"


def test_resume_with_spec_backbone_loads_weights_only(tmp_path: Path) -> None:
    """A spec backbone (``builtin:lenet``) puts strings in the hyperparameters; they load with weights_only."""

    class Images(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(i)
            x = torch.randn(3, 28, 28, generator=g) * 0.1
            x[:, 8 * (i % 3) : 8 * (i % 3) + 4] += 1.0
            return {"inputs": x, "labels": i % 3}

    def fit(ckpt: Path | None, **kwargs: Any) -> FineTuneModule:
        torch.manual_seed(0)
        model = FineTuneModule(backbone="builtin:lenet", num_classes=3, strategy="freeze_unfreeze", lr=0.01)
        loader = DataLoader(Images(), batch_size=8)
        trainer = make_trainer(kwargs.pop("callbacks", []), max_epochs=2, **kwargs)
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True if ckpt else None)
        return model

    fit(None, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)])
    first_epoch = tmp_path / "epoch=0-step=2.ckpt"
    assert first_epoch.is_file(), sorted(tmp_path.iterdir())
    ckpt = torch.load(first_epoch, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "builtin:lenet"
    assert ckpt["tlmodules"]["trainable_epoch"] == 0
    resumed = fit(first_epoch, enable_checkpointing=False)
    assert all(p.requires_grad for p in resumed.backbone.parameters())
    assert resumed._trainable_epoch == 1


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_readable(tmp_path: Path) -> None:
    """The process dies half-way through writing step 3's ``last.ckpt``: step 2's stays whole and resumable."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "scripts" / "killed_during_checkpoint.py"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, str(script), str(out), "--die-at", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 137, result.stderr[-3000:]  # it really died mid-write
    checkpoint = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2  # the previous checkpoint, whole
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert [p.name for p in out.iterdir()] == ["last.ckpt"]  # no half-written file beside it
