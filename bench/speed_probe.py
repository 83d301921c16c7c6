"""``probe_cache_speedup_10_epochs``: the cached FeatureProbeModule against one that re-runs the frozen backbone.

Both fit a linear head on frozen MiniLM features (mean pooling) for 10 epochs on the same 400 SST-2 training
sentences (batches of 32, max_length 128) under the Trainer, in the same process; the cached one keeps each
sentence's features in memory after epoch 0 (``cache_features=True``, the default), the other runs MiniLM on
every batch of every epoch (``cache_features=False``). A round is one full ``fit`` of each (wall time, model
construction excluded); the rounds alternate (``bench/timing.py``), ``value`` = median uncached seconds ÷
median cached seconds. Both heads are then scored on SST-2's 872 test sentences: caching must not change
what the head learns.

    python bench/speed.py --figures probe_cache_speedup_10_epochs --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from bench.common import MINILM, SHARED, read_tsv, sample, write_tsv
from bench.timing import QUIET_TRAINER, alternate
from datamodules.text import TextClassificationDataModule
from tlmodules import FeatureProbeModule

EPOCHS = 10
GOAL = 8.0


def probe_round(files: tuple[Path, Path], cache: bool, epochs: int, scores: dict[bool, list[float]]):
    def run() -> float:
        pl.seed_everything(0)
        data = TextClassificationDataModule(
            train_file=str(files[0]), test_file=str(files[1]), text_column=0, label_column=1, quoting=False,
            backbone=MINILM, max_length=128, val_fraction=0.0, batch_size=32, num_workers=0,
        )  # fmt: skip
        model = FeatureProbeModule(backbone=MINILM, head="linear", lr=5e-3, cache_features=cache, num_classes=2)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, **QUIET_TRAINER)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        scores[cache].append(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
        return seconds

    return run


def probe_cache_speedup(args: argparse.Namespace) -> dict[str, Any]:
    sst2 = SHARED / "text" / "sst2"
    scratch = Path(tempfile.mkdtemp(prefix="speed_probe_"))
    count, epochs = (64, 2) if args.quick else (400, EPOCHS)
    test_rows = read_tsv(sst2 / "test.tsv", 0, 1, header=True)
    files = (
        write_tsv(sample(read_tsv(sst2 / "train.tsv", 0, 1, header=True), count, seed=0), scratch / "train.tsv"),
        write_tsv(test_rows[:64] if args.quick else test_rows, scratch / "test.tsv"),
    )
    repeats = 1 if args.quick else args.repeats
    scores: dict[bool, list[float]] = {True: [], False: []}
    rounds = alternate(
        {
            "rerun_backbone": probe_round(files, False, epochs, scores),
            "cached": probe_round(files, True, epochs, scores),
        },
        repeats,
    )
    uncached, cached = statistics.median(rounds["rerun_backbone"]), statistics.median(rounds["cached"])
    value = uncached / cached
    return {
        "figure": "probe_cache_speedup_10_epochs",
        "value": round(value, 2),
        "goal": f">= {GOAL:g}",
        "met": value >= GOAL,
        "details": {
            "rerun_backbone_seconds": round(uncached, 1),
            "cached_seconds": round(cached, 1),
            "rounds_seconds": {k: [round(v, 1) for v in vs] for k, vs in rounds.items()},
            "test_acc": {"cached": scores[True], "rerun_backbone": scores[False]},
            "epochs": epochs,
            "train_sentences": count,
            "rounds": repeats,
        },
    }
