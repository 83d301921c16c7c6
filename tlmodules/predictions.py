"""Writing predictions to a CSV file: input id, predicted label, one probability column per class (one row per
word for a tagger); a multi-task model's dense (per-pixel) tasks also write one mask PNG per image."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from tlmodules.dense_tasks import DENSE_KINDS
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

    A multi-task model with dense tasks (``segmentation``, ``mask``) also writes each image's predicted mask per
    dense task as a PNG, ``<folder>/<stem>_masks/<task>/<id with suffix .png>``, and the CSV holds that PNG's path
    relative to the CSV's folder: see :func:`write_masks` (every process writes its own images' PNGs into the
    same folders).
    """

    def __init__(self, output_path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":  # fail now, not after the whole prediction pass
            check_writable_folder(self.target_path(trainer).parent, "predictions folder")

    def masks_folder(self) -> Path:
        """``<folder>/<stem>_masks``: where dense tasks' PNGs go, one sub-folder per task (one for all ranks)."""
        path = Path(self.output_path)
        return path.with_name(f"{path.stem}_masks")

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
        tasks = getattr(pl_module, "tasks", None)
        dense = isinstance(tasks, Sequence) and any(isinstance(t, dict) and t.get("kind") in DENSE_KINDS for t in tasks)
        if batches and "word_counts" in batches[0]:
            header, rows = word_rows(batches, names, to_id, getattr(datamodule, "prediction_words", None), path)
        elif batches and "embeddings" in batches[0]:
            header, rows = embedding_rows(batches, to_id)
        elif batches and "probs" not in batches[0] and dense:
            header, rows = dense_task_rows(batches, tasks, to_id, self.masks_folder(), path.parent)  # type: ignore[arg-type]
        elif batches and "probs" not in batches[0] and tasks:
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
    ``embeddings``, a task's outputs, ``word_counts``, ``sizes``, a dense task's ``(B, H, W)`` masks) is reordered
    with ``index``; one with a row per word (``word_probs``, ``word_embeddings``: ``word_counts[b]`` consecutive
    rows for input ``b``) moves with its input's rows. Per-input values whose shapes differ between batches
    (dense masks of batches padded to different sizes) are not concatenated: they become a list of per-input
    tensors (``(H, W)`` each, still padded), in index order.
    """
    if not batches or not all(isinstance(b, dict) and isinstance(b.get("index"), Tensor) for b in batches):
        return list(batches)
    index = torch.cat([b["index"].detach().reshape(-1).cpu() for b in batches])
    order = torch.argsort(index, stable=True)
    if torch.equal(order, torch.arange(len(order))):
        return list(batches)
    merged: dict[str, Tensor | list[Tensor]] = {}
    for key in batches[0]:
        values = [b.get(key) for b in batches]
        if not all(isinstance(v, Tensor) and v.ndim > 0 for v in values):
            return list(batches)
        tensors: list[Tensor] = [v.detach().cpu() for v in values]  # type: ignore[union-attr]
        if len({t.shape[1:] for t in tensors}) == 1:
            merged[key] = torch.cat(tensors)
        elif all(len(t) == len(b["index"].reshape(-1)) for t, b in zip(tensors, batches)):
            merged[key] = [row for t in tensors for row in t]  # one per input, shapes differ: kept apart
        else:
            return list(batches)
    counts = merged.get("word_counts")
    word_keys = [k for k in merged if k.startswith("word_") and k != "word_counts"]
    if word_keys and not isinstance(counts, Tensor):
        return list(batches)
    word_order = None
    if isinstance(counts, Tensor):
        starts = torch.cumsum(counts, 0) - counts
        moved = counts[order]
        new_starts = torch.cumsum(moved, 0) - moved
        word_order = torch.arange(int(moved.sum())) + torch.repeat_interleave(starts[order] - new_starts, moved)
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if key in word_keys:
            if not isinstance(value, Tensor) or len(value) != len(word_order):  # type: ignore[arg-type]
                return list(batches)
            out[key] = value[word_order]
        elif len(value) != len(index):
            return list(batches)
        elif isinstance(value, list):
            out[key] = [value[i] for i in order.tolist()]
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


def mask_relative_path(task_name: str, prediction_id: str) -> Path:
    """``<task>/<id with its suffix replaced by .png>``, keeping the id's sub-folders (``"sub/x.jpg"`` →
    ``<task>/sub/x.png``); an absolute id or ``..`` in it cannot lead out of the masks folder (the anchor and
    ``..``/``.`` parts are dropped)."""
    parts = [p for p in Path(str(prediction_id).replace("\\", "/")).parts if p not in ("..", ".", "/", "")]
    parts = [p for p in parts if not Path(p).anchor]
    if not parts:
        raise ValueError(f"prediction id {prediction_id!r} names no file to write task {task_name!r}'s mask to")
    return Path(task_name, *parts[:-1], f"{Path(parts[-1]).stem}.png")


def mask_array(value: Tensor, size: Sequence[int] | None = None) -> Any:
    """A predicted ``(H, W)`` mask (class indices, or 0/1) as a uint8 numpy array, cropped to ``size``
    ``(height, width)`` (the image's size before padding) when given."""
    mask = value.detach().cpu()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"a dense prediction must be one (H, W) mask per image, got {tuple(value.shape)}")
    if size is not None:
        mask = mask[: int(size[0]), : int(size[1])]
    if mask.dtype != torch.uint8:
        if mask.is_floating_point():
            mask = mask.round()
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 255):
            raise ValueError("a predicted mask's values must lie in 0..255 to be written as an 8-bit PNG")
        mask = mask.to(torch.uint8)
    return mask.contiguous().numpy()


def write_png(path: Path, array: Any) -> None:
    """Write ``array`` (uint8 ``(H, W)``) as a single-channel (mode ``L``) PNG, through a temporary name in the
    same folder renamed into place, so a failed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        Image.fromarray(array).save(partial, format="PNG")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_masks(
    batches: Sequence[dict[str, Any]],
    tasks: Sequence[dict[str, Any]],
    to_id: Callable[[int], str],
    folder: Path | str,
) -> list[dict[str, Path]]:
    """Write every image's predicted mask of every dense task as ``<folder>/<task>/<id with suffix .png>``
    (:func:`mask_relative_path`) and return, per image in the order of ``batches``, ``{task: path}``.

    A batch holds ``index`` ``(B,)``, per dense task ``(B, H, W)`` masks (uint8 class indices or 0/1; or a list
    of ``(H, W)`` masks, :func:`in_index_order`) and optionally ``sizes`` ``(B, 2)``: each image's ``(H, W)``
    before padding, to which its mask is cropped. The PNGs are single-channel with the mask's values, the format
    of label masks, so they read back as labels. Two different ids that would write the same file (``x.jpg``,
    ``x.png``) are refused before any is written; an id met twice (a sampler that repeats samples) is written once.
    """
    folder = Path(folder)
    names = [t["name"] for t in tasks if t.get("kind") in DENSE_KINDS]
    per_image: list[dict[str, Path]] = []
    writes: list[tuple[Path, Any, Any]] = []
    seen: dict[Path, str] = {}
    for batch in batches:
        sizes = batch.get("sizes")
        sizes = sizes.detach().cpu().tolist() if isinstance(sizes, Tensor) else sizes
        for i, index in enumerate(batch["index"].reshape(-1).tolist()):
            prediction_id = to_id(index)
            paths = {name: folder / mask_relative_path(name, prediction_id) for name in names}
            per_image.append(paths)
            for name, path in paths.items():
                if path in seen:
                    if seen[path] != prediction_id:
                        raise ValueError(
                            f"predictions {seen[path]!r} and {prediction_id!r} would both write mask {path}: ids "
                            "that differ only in their suffix cannot be told apart; rename one of the images"
                        )
                    continue
                seen[path] = prediction_id
                writes.append((path, batch[name][i], sizes[i] if sizes is not None else None))
    for path, value, size in writes:
        write_png(path, mask_array(value, size))
    return per_image


def dense_task_rows(
    batches: Sequence[dict[str, Any]],
    tasks: Sequence[dict[str, Any]],
    to_id: Callable[[int], str],
    masks_folder: Path | str,
    csv_folder: Path | str,
) -> tuple[list[str], Rows]:
    """A multi-task model with dense tasks: writes the masks (:func:`write_masks`, into ``masks_folder``) and gives
    the rows ``id, <dense task>…, <per-image task columns of task_rows>…``: a dense task's cell is its PNG's
    path relative to ``csv_folder`` (``/``-separated), the per-image tasks' cells are :func:`task_rows`'s."""
    dense = [t["name"] for t in tasks if t.get("kind") in DENSE_KINDS]
    per_image = [t for t in tasks if t.get("kind") not in DENSE_KINDS]
    written = write_masks(batches, tasks, to_id, masks_folder)
    header, image_rows = task_rows(batches, per_image, to_id)
    base = Path(csv_folder).resolve()

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), base)).as_posix()

    def rows() -> Rows:
        for paths, row in zip(written, image_rows):
            yield [row[0], *(relative(paths[name]) for name in dense), *row[1:]]

    return [header[0], *dense, *header[1:]], rows()


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
