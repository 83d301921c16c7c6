"""Writing predictions to a CSV file: input id, predicted label, one probability column per class (one row per
word for a tagger)."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from tlmodules.outputs import check_writable_folder


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` results as CSV: ``id, label, prob_<class>…`` (``id, f0…`` for embeddings; per task
    columns for a multi-task model, see :func:`task_rows`; one row per word for a token-level tagger, see
    :func:`word_rows`).

    The id comes from the datamodule's ``prediction_id(index)`` (an image's relative path, a text
    row number) when it has one. Rows are written in ``index`` order (the inputs' order), whatever order the
    loader read them in (text is predicted in length order: :meth:`datamodules.base.ClassificationDataModule.
    predict_dataloader`). With several processes each writes ``<stem>.rank<r>.csv``.
    The file is written to a temporary name and renamed, so an interrupted run never leaves a
    half-written file in place of an earlier one.
    """

    def __init__(self, output_path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":  # fail now, not after the whole prediction pass
            check_writable_folder(self.target_path(trainer).parent, "predictions folder")

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
        batches = in_index_order(batches)
        path = self.target_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        if batches and "word_counts" in batches[0]:
            header, rows = word_rows(batches, names, to_id, getattr(datamodule, "prediction_words", None), path)
        elif batches and "embeddings" in batches[0]:
            header, rows = embedding_rows(batches, to_id)
        elif batches and "probs" not in batches[0] and getattr(pl_module, "tasks", None):
            header, rows = task_rows(batches, pl_module.tasks, to_id)
        else:
            header, rows = class_rows(batches, names, to_id)
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        partial.replace(path)


Rows = Iterator[list[str]]


def in_index_order(batches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``batches`` as one batch sorted by ``index`` (stably), or the batches as they are when they are
    in that order already or of a form this does not know.

    A value with one row per input (a tensor whose first dimension is the batch's size: ``probs``,
    ``embeddings``, a task's outputs, ``word_counts``) is reordered with ``index``; one with a row per word
    (``word_probs``, ``word_embeddings``: ``word_counts[b]`` consecutive rows for input ``b``) moves with its
    input's rows.
    """
    if not batches or not all(isinstance(b, dict) and isinstance(b.get("index"), Tensor) for b in batches):
        return list(batches)
    index = torch.cat([b["index"].detach().reshape(-1).cpu() for b in batches])
    order = torch.argsort(index, stable=True)
    if torch.equal(order, torch.arange(len(order))):
        return list(batches)
    merged: dict[str, Tensor] = {}
    for key in batches[0]:
        values = [b.get(key) for b in batches]
        if not all(isinstance(v, Tensor) and v.ndim > 0 for v in values):
            return list(batches)
        merged[key] = torch.cat([v.detach().cpu() for v in values])  # type: ignore[union-attr]
    counts = merged.get("word_counts")
    word_keys = [k for k in merged if k.startswith("word_") and k != "word_counts"]
    if word_keys and counts is None:
        return list(batches)
    word_order = None
    if counts is not None:
        starts = torch.cumsum(counts, 0) - counts
        moved = counts[order]
        new_starts = torch.cumsum(moved, 0) - moved
        word_order = torch.arange(int(moved.sum())) + torch.repeat_interleave(starts[order] - new_starts, moved)
    out: dict[str, Tensor] = {}
    for key, value in merged.items():
        if key in word_keys:
            if len(value) != len(word_order):  # type: ignore[arg-type]
                return list(batches)
            out[key] = value[word_order]
        elif len(value) != len(index):
            return list(batches)
        else:
            out[key] = value[order]
    return [out]


def embedding_rows(batches: Sequence[dict[str, Any]], to_id: Callable[[int], str]) -> tuple[list[str], Rows]:
    """``id, f0, f1, …``: one feature vector per input."""
    width = batches[0]["embeddings"].shape[-1]

    def rows() -> Rows:
        for batch in batches:
            for index, row in zip(batch["index"].tolist(), batch["embeddings"].float().cpu().tolist()):
                yield [to_id(index), *(f"{v:.6g}" for v in row)]

    return ["id", *(f"f{i}" for i in range(width))], rows()


def class_rows(
    batches: Sequence[dict[str, Any]], names: list[str], to_id: Callable[[int], str]
) -> tuple[list[str], Rows]:
    """``id, label, prob_<class>…``: the most probable class and every class probability."""

    def rows() -> Rows:
        for batch in batches:
            for index, row in zip(batch["index"].tolist(), batch["probs"].cpu().tolist()):
                best = max(range(len(row)), key=row.__getitem__)
                label = names[best] if best < len(names) else str(best)
                yield [to_id(index), label, *(f"{p:.6f}" for p in row)]

    return ["id", "label", *(f"prob_{n}" for n in names)], rows()


def task_rows(
    batches: Sequence[dict[str, Any]], tasks: Sequence[dict[str, Any]], to_id: Callable[[int], str]
) -> tuple[list[str], Rows]:
    """Multi-task predictions, per task: ``<task>`` (the predicted class; for multilabel every label of
    probability ≥ 0.5 joined by ``|``; the value of a regression) then ``<task>_prob_<class>`` for every class
    (binary: the positive class's only); a regression with several outputs gives ``<task>_0``, ``<task>_1``, …"""
    header = ["id"]
    for task in tasks:
        name, names = task["name"], task.get("class_names") or []
        if task["kind"] in ("multiclass", "multilabel"):
            header += [name, *(f"{name}_prob_{c}" for c in names or range(task["num_outputs"]))]
        elif task["kind"] == "binary":
            header += [name, f"{name}_prob_{names[1] if len(names) == 2 else 1}"]
        else:
            header += [name] if task["num_outputs"] == 1 else [f"{name}_{d}" for d in range(task["num_outputs"])]

    def cells(task: dict[str, Any], value: Any) -> list[str]:
        names = task.get("class_names") or []
        if task["kind"] == "multiclass":
            best = max(range(len(value)), key=value.__getitem__)
            return [names[best] if best < len(names) else str(best), *(f"{p:.6f}" for p in value)]
        if task["kind"] == "multilabel":  # every label with probability >= 0.5, joined by "|"
            chosen = [names[k] if k < len(names) else str(k) for k, p in enumerate(value) if p >= 0.5]
            return ["|".join(chosen), *(f"{p:.6f}" for p in value)]
        if task["kind"] == "binary":
            label = int(value >= 0.5)
            return [names[label] if len(names) == 2 else str(label), f"{value:.6f}"]
        return [f"{v:.6g}" for v in (value if isinstance(value, list) else [value])]

    def rows() -> Rows:
        for batch in batches:
            columns = {t["name"]: batch[t["name"]].float().cpu().tolist() for t in tasks}
            for i, index in enumerate(batch["index"].tolist()):
                yield [to_id(index), *(cell for t in tasks for cell in cells(t, columns[t["name"]][i]))]

    return header, rows()


def word_rows(
    batches: Sequence[dict[str, Any]],
    names: list[str],
    to_id: Callable[[int], str],
    words_of: Callable[[int], tuple[list[str], list[int]]] | None,
    path: Path | str = "predictions",
) -> tuple[list[str], Rows]:
    """A tagger's predictions, one row per word of the input in order: ``sentence, word_index, word, tag, prob``
    (the sentence id, the word's 1-based position in it, the word, its most probable tag and that tag's
    probability), or ``sentence, word_index, word, f0, f1, …`` for embeddings output.

    ``words_of(index)`` (the datamodule's ``prediction_words``) gives a sentence's words and the positions of
    those that have a prediction, one per ``word_counts`` row. A word without one (cut off by ``max_length``,
    or tokenized to nothing) keeps its row with an empty tag and probability (empty features), and a warning
    counts them. Without ``words_of`` the words are unknown: one row per prediction, the word left empty.
    """
    embeddings = "word_embeddings" in batches[0]
    key = "word_embeddings" if embeddings else "word_probs"
    width = batches[0][key].shape[-1]
    header = ["sentence", "word_index", "word", *([f"f{i}" for i in range(width)] if embeddings else ["tag", "prob"])]

    def cells(values: list[float] | None) -> list[str]:
        if values is None:
            return [""] * width if embeddings else ["", ""]
        if embeddings:
            return [f"{v:.6g}" for v in values]
        best = max(range(len(values)), key=values.__getitem__)
        return [names[best] if best < len(names) else str(best), f"{values[best]:.6f}"]

    def rows() -> Rows:
        untagged = sentences_cut = 0
        for batch in batches:
            counts = batch["word_counts"].tolist()
            values = batch[key].float().cpu().tolist()
            start = 0
            for index, count in zip(batch["index"].tolist(), counts):
                predicted = values[start : start + count]
                start += count
                words, positions = words_of(index) if words_of is not None else ([""] * count, list(range(count)))
                if len(positions) != count:
                    raise ValueError(
                        f"sentence {to_id(index)} has {count} predicted words but the datamodule marks "
                        f"{len(positions)} words with a first sub-token; predict with the datamodule that was set up"
                    )
                by_word = dict(zip(positions, predicted))
                for position, word in enumerate(words):
                    yield [to_id(index), str(position + 1), word, *cells(by_word.get(position))]
                missing = len(words) - len(by_word)
                untagged += missing
                sentences_cut += missing > 0
        if untagged:
            warnings.warn(
                f"{untagged} words of {sentences_cut} sentences have no prediction in {path} (their rows have an "
                "empty tag and prob): cut off by max_length, or tokenized to nothing. Raise max_length (up to the "
                "backbone's limit) or split long sentences to tag them",
                stacklevel=2,
            )

    return header, rows()
