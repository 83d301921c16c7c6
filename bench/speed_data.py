"""Data loading against training: do the datamodules deliver batches faster than the model consumes them?

For each datamodule the figure alternates (rounds of ``bench/timing.py``) two measurements:

- ``loader``: samples per second of the training loader alone (its default ``num_workers``, persistent
  workers), iterated after a few warm-up batches, nothing else running;
- ``training``: samples per second of ``FineTuneModule`` training steps under the Trainer on the same
  batches, read beforehand into memory (so the step time holds no loading).

``value = loader / training``: above 1 the loader keeps the model busy (with a worker process, loading
overlaps the step). The details also give the loader with ``num_workers=0`` (loading in the training
process), so the default's gain shows.

- ``loader_throughput_images``: ``ImageFolderDataModule`` on USPS's 7,291 training PNGs resized to 64×64
  (decode, resize, normalise per image), ResNet-18 (random init), batches of 32.
- ``loader_throughput_text``: ``TextClassificationDataModule`` on 2,000 SST-2 sentences (tokenized once at
  setup; the loader pads each batch), MiniLM, batches of 32.

    python bench/speed.py --figures loader_throughput_images loader_throughput_text --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from bench.common import MINILM, SHARED, read_tsv, sample, write_tsv
from bench.timing import QUIET_TRAINER, StepTimes, alternate, median_ms
from datamodules import ImageFolderDataModule
from datamodules.base import ClassificationDataModule
from datamodules.text import TextClassificationDataModule
from tlmodules import FineTuneModule

BATCH = 32


def loader_samples_per_s(
    make_data: Callable[[int | None], ClassificationDataModule], workers: int | None, batches: int
):
    """One round: a fresh datamodule's training loader, ``batches`` timed batches after 3 warm-up ones."""

    def run() -> float:
        data = make_data(workers)
        data.setup("fit")
        iterator = iter(data.train_dataloader())
        for _ in range(3):
            next(iterator)
        start = time.perf_counter()
        count = sum(len(batch["labels"]) for batch in itertools.islice(iterator, batches))
        return count / (time.perf_counter() - start)

    return run


def training_samples_per_s(make_model: Callable[[], FineTuneModule], batches: list[Any], steps: tuple[int, int]):
    """One round: FineTuneModule steps under the Trainer on batches already in memory."""

    def run() -> float:
        warmup, timed = steps
        pl.seed_everything(0)
        timer = StepTimes(warmup)
        trainer = pl.Trainer(max_steps=warmup + timed, accelerator="cpu", devices=1, callbacks=[timer], **QUIET_TRAINER)
        trainer.fit(make_model(), train_dataloaders=DataLoader(batches, batch_size=None))  # the batches as they are
        return 1000.0 * BATCH / median_ms(timer.times)

    return run


def figure(
    name: str,
    make_data: Callable[[int | None], ClassificationDataModule],
    make_model: Callable[[], FineTuneModule],
    args: argparse.Namespace,
    steps: tuple[int, int],
) -> dict[str, Any]:
    repeats = 1 if args.quick else args.repeats
    loader_batches = 4 if args.quick else 40
    default = make_data(None)
    default.setup("fit")
    batches = list(itertools.islice(iter(default.train_dataloader()), sum(steps) + 1))
    rounds = alternate(
        {
            "loader": loader_samples_per_s(make_data, None, loader_batches),
            "loader_no_workers": loader_samples_per_s(make_data, 0, loader_batches),
            "training": training_samples_per_s(make_model, batches, steps),
        },
        repeats,
    )
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    value = medians["loader"] / medians["training"]
    return {
        "figure": name,
        "value": round(value, 2),
        "goal": "> 1 (loader faster than training)",
        "met": value > 1.0,
        "details": {
            "samples_per_s": {k: round(v, 1) for k, v in medians.items()},
            "rounds_samples_per_s": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
            "num_workers_default": default.num_workers,
            "persistent_workers": default.num_workers > 0,
            "batch_size": BATCH,
            "loader_batches_timed": loader_batches,
            "training_warmup_steps": steps[0],
            "training_steps": steps[1],
            "rounds": repeats,
        },
    }


def loader_throughput_images(args: argparse.Namespace) -> dict[str, Any]:
    folder = SHARED / "digits" / "usps" / "train"

    def make_data(workers: int | None) -> ImageFolderDataModule:
        return ImageFolderDataModule(
            train_dir=str(folder), backbone="torchvision:resnet18", weights="none", image_size=64,
            val_fraction=0.0, batch_size=BATCH, num_workers=workers, verify_images=False,
        )  # fmt: skip

    def make_model() -> FineTuneModule:
        return FineTuneModule(backbone="torchvision:resnet18", weights="none", num_classes=10, strategy="full")

    result = figure("loader_throughput_images", make_data, make_model, args, (1, 2) if args.quick else (3, 12))
    result["details"]["data"] = "USPS train PNGs (16x16 grayscale) resized to 64x64, 3 channels"
    return result


def loader_throughput_text(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_tsv(SHARED / "text" / "sst2" / "train.tsv", 0, 1, header=True)
    scratch = Path(tempfile.mkdtemp(prefix="speed_text_"))
    train = write_tsv(sample(rows, 256 if args.quick else 2000, seed=0), scratch / "train.tsv")

    def make_data(workers: int | None) -> TextClassificationDataModule:
        return TextClassificationDataModule(
            train_file=str(train), text_column=0, label_column=1, quoting=False, backbone=MINILM, max_length=128,
            val_fraction=0.0, batch_size=BATCH, num_workers=0 if workers is None else workers,
        )  # fmt: skip

    def make_model() -> FineTuneModule:
        return FineTuneModule(backbone=MINILM, num_classes=2, strategy="full", lr=1e-3, backbone_lr_ratio=0.05)

    result = figure("loader_throughput_text", make_data, make_model, args, (1, 2) if args.quick else (3, 12))
    result["details"]["data"] = "SST-2, 2,000 training sentences, MiniLM tokenizer, max_length 128"
    return result
