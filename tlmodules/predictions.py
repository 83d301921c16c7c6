"""Writing predictions to a CSV file: input id, predicted label, one probability column per class."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` results as CSV: ``id, label, prob_<class>…`` (or ``id, f0…`` for embeddings).

    The id comes from the datamodule's ``prediction_id(index)`` (an image's relative path, a text
    row number) when it has one. With several processes each writes ``<stem>.rank<r>.csv``.
    The file is written to a temporary name and renamed, so an interrupted run never leaves a
    half-written file in place of an earlier one.
    """

    def __init__(self, output_path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def target_path(self, trainer: pl.Trainer) -> Path:
        path = Path(self.output_path)
        return (
            path if trainer.world_size == 1 else path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        )

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        datamodule = trainer.datamodule
        names = list(getattr(pl_module, "class_names", None) or getattr(datamodule, "class_names", []))
        to_id = getattr(datamodule, "prediction_id", str)
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        path = self.target_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if batches and "embeddings" in batches[0]:
                width = batches[0]["embeddings"].shape[-1]
                writer.writerow(["id", *(f"f{i}" for i in range(width))])
                for batch in batches:
                    for index, row in zip(batch["index"].tolist(), batch["embeddings"].float().cpu().tolist()):
                        writer.writerow([to_id(index), *(f"{v:.6g}" for v in row)])
            else:
                writer.writerow(["id", "label", *(f"prob_{n}" for n in names)])
                for batch in batches:
                    for index, row in zip(batch["index"].tolist(), batch["probs"].cpu().tolist()):
                        best = max(range(len(row)), key=row.__getitem__)
                        label = names[best] if best < len(names) else str(best)
                        writer.writerow([to_id(index), label, *(f"{p:.6f}" for p in row)])
        partial.replace(path)
