"""Text classification data from CSV / TSV / JSON-lines files, tokenized by the backbone's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from datamodules.base import ClassificationDataModule, checked_label_list, label_set, map_labels, seeded_split
from datamodules.tables import DataError, Table, TableFormat, read_table
from tlmodules.backbones import resolve_preprocessing
from tlmodules.labels import IGNORE_INDEX
from tlmodules.positions import position_limit

DEFAULT_MAX_LENGTH = 128


def check_max_length_argument(max_length: int | None) -> None:
    """Refuse a ``max_length`` that is not a positive integer (``None`` is the default, see
    :func:`checked_max_length`)."""
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0):
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")


def checked_max_length(max_length: int | None, tokenizer_source: str | None, model: str | None) -> int:
    """The length to truncate tokenized texts to. A ``max_length`` above the position limit of the model at
    ``tokenizer_source`` (:func:`tlmodules.positions.position_limit`) is refused now: the tokenizer would keep
    such texts and the model fail on the first one, mid-run. ``None`` (the default) is 128, or the limit when
    that is smaller. ``model`` names the model in the message (the backbone spec or tokenizer)."""
    limit = position_limit(tokenizer_source) if tokenizer_source is not None else None
    if max_length is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    if limit is not None and max_length > limit:
        raise DataError(
            f"max_length {max_length} is above the {limit} positions of {model or tokenizer_source}; "
            f"set max_length to {limit} or less"
        )
    return max_length


class TokenizedTexts(Dataset):
    """Pre-tokenized sentences: each item is ``{"input_ids": [...], "labels": int, "index": int}``."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int]) -> None:
        self.encodings = encodings
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.encodings.items()}
        return {"features": item, "labels": self.labels[index], "index": index}


def token_counts(dataset: Dataset) -> list[int]:
    """Tokens of every sample of a dataset with ``encodings["input_ids"]`` (:class:`TokenizedTexts`, CoNLL
    sentences) or of a ``Subset`` of one, in the dataset's order."""
    if isinstance(dataset, Subset):
        counts = token_counts(dataset.dataset)
        return [counts[i] for i in dataset.indices]
    return [len(ids) for ids in dataset.encodings["input_ids"]]


class PadCollator:
    """Dynamic padding: pad each batch to its own longest sequence.

    Returns ``{"inputs": {"input_ids": (B, T), "attention_mask": (B, T)[, "token_type_ids"]},
    "labels": (B,), "index": (B,)}``; when each item's labels are a list (one per token), ``"labels"``
    is (B, T), padded with ``label_pad_id``. Items with ``"word_starts"`` (one bool per token) add
    ``"word_starts"``: a (B, T) bool tensor padded with ``False``.
    """

    def __init__(self, pad_token_id: int, label_pad_id: int = IGNORE_INDEX) -> None:
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(it["features"]["input_ids"]) for it in items)
        batch_size = len(items)
        ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": mask}
        has_types = "token_type_ids" in items[0]["features"]
        if has_types:
            inputs["token_type_ids"] = torch.zeros((batch_size, length), dtype=torch.long)
        for row, item in enumerate(items):
            seq = item["features"]["input_ids"]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            if has_types:
                types = item["features"]["token_type_ids"]
                inputs["token_type_ids"][row, : len(types)] = torch.tensor(types, dtype=torch.long)
        batch = {
            "inputs": inputs,
            "labels": self._labels([it["labels"] for it in items], length),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if "word_starts" in items[0]:
            starts = torch.zeros((batch_size, length), dtype=torch.bool)
            for row, item in enumerate(items):
                starts[row, : len(item["word_starts"])] = torch.tensor(item["word_starts"], dtype=torch.bool)
            batch["word_starts"] = starts
        return batch

    def _labels(self, labels: list[Any], length: int) -> torch.Tensor:
        """(B,) for one label per item; (B, T) padded with ``label_pad_id`` for one label per token."""
        if not isinstance(labels[0], (list, tuple)):
            return torch.tensor(labels, dtype=torch.long)
        out = torch.full((len(labels), length), self.label_pad_id, dtype=torch.long)
        for row, seq in enumerate(labels):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out


class TextClassificationDataModule(ClassificationDataModule):
    """Sentences and labels from CSV, TSV or JSON lines.

    Columns are named (with a header) or numbered from 0 (without); ``header`` defaults to
    "yes when the columns are given by name". ``quoting=False`` reads quote marks literally
    (sentence files with unbalanced quotes). Label values of any type (``ham``/``spam``, ``0``/``1``,
    topic names) map to indices of ``labels`` when given, else of the sorted distinct training
    labels; the mapping is ``class_names`` and travels in checkpoints.

    The tokenizer comes from the backbone (``backbone``, linked from the model in the CLI) or
    ``tokenizer`` (a folder or hub id). Sentences are tokenized once at setup, truncated to
    ``max_length`` tokens (default: 128, or the model's position limit when smaller; a value above that limit
    is refused), and padded per batch. ``group_by_length`` makes training batches of sentences of
    similar lengths (:class:`datamodules.samplers.LengthGroupedSampler`, shuffled between batches and sharded
    under DDP), which pads far less than random batches.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_column: str | int = "text",
        label_column: str | int = "label",
        file_format: TableFormat = "auto",
        header: bool | None = None,
        quoting: bool = True,
        labels: list[str] | None = None,
        backbone: str | None = None,
        weights: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights"])  # the model logs these
        self.group_by_length = group_by_length
        self.tokenizer, self.max_length = tokenizer, max_length
        check_max_length_argument(max_length)
        if header is None:
            header = isinstance(text_column, str) and not text_column.isdigit()
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        if not any(self.files.values()):
            raise DataError("give at least train_file (or test_file / predict_file)")
        self.tables: dict[str, Table] = {}
        for stage, path in self.files.items():
            if path is not None:
                self.tables[stage] = read_table(path, file_format, header, quoting, role=stage)
                self.tables[stage].column_index(text_column, "text")
                if stage != "predict":
                    self.tables[stage].column_index(label_column, "label")
        reference = self.tables.get("train") or self.tables.get("test") or self.tables.get("val")
        if labels is not None:
            self.class_names = checked_label_list(labels)
        elif reference is not None:
            self.class_names = label_set(reference.column(label_column, "label"))
        if reference is not None and len(self.class_names) < 2:
            raise DataError(
                f"{reference.path} has fewer than two distinct labels ({self.class_names}) in label column "
                f"{label_column!r}; check label_column, or give data with two or more classes"
            )
        for stage, table in self.tables.items():  # fail now on a label outside the set, not after an epoch
            if stage != "predict":
                map_labels(table.column(label_column, "label"), self.class_names, str(table.path), label_column)
        self.use_backbone(backbone, weights)

    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        self.tokenizer_source = self.tokenizer or self._tokenizer_from_backbone(spec, weights)
        model = self.tokenizer or spec
        self.max_length = checked_max_length(self.hparams.max_length, self.tokenizer_source, model)

    @staticmethod
    def _tokenizer_from_backbone(backbone: str | None, weights: str | None) -> str | None:
        preprocessing = resolve_preprocessing(backbone, weights) if isinstance(backbone, str) else None
        if preprocessing is not None and preprocessing.kind != "text":
            raise DataError(f"backbone {backbone} is an image model; text data needs a text backbone (hf: or pkg:)")
        return None if preprocessing is None else preprocessing.tokenizer

    def _load_tokenizer(self):
        if self.tokenizer_source is None:
            raise DataError("no tokenizer: set backbone (hf:/pkg: spec) or tokenizer on the text datamodule")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_source)

    def _encode(self, tokenizer, stage: str) -> tuple[dict[str, list[list[int]]], list[int]]:
        hp = self.hparams
        table = self.tables[stage]
        texts = ["" if t is None else str(t) for t in table.column(hp.text_column, "text")]
        self.check_not_empty(stage, len(texts), table.path)
        encodings = tokenizer(texts, truncation=True, max_length=self.max_length)
        keep = [k for k in ("input_ids", "token_type_ids") if k in encodings]
        if stage == "predict":
            labels = [IGNORE_INDEX] * len(texts)
        else:
            labels = map_labels(table.column(hp.label_column, "label"), self.class_names, str(table.path))
        return {k: encodings[k] for k in keep}, labels

    def setup(self, stage: str | None = None) -> None:
        if self.collate_fn is not None:
            return
        tokenizer = self._load_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.collate_fn = PadCollator(pad_id)
        for name in self.tables:
            encodings, labels = self._encode(tokenizer, name)
            self.datasets[name] = TokenizedTexts(encodings, labels)
        if "train" in self.datasets and "val" not in self.datasets and self.val_fraction > 0:
            full = self.datasets["train"]
            train_idx, val_idx = seeded_split(full.labels, self.val_fraction, self.seed)
            self.datasets["train"], self.datasets["val"] = Subset(full, train_idx), Subset(full, val_idx)

    def sample_lengths(self, stage: str) -> list[int] | None:
        return token_counts(self.datasets[stage])

    def fingerprint(self, stage: str) -> str | None:
        hp = self.hparams
        settings = (hp.text_column, hp.file_format, hp.header, hp.quoting, self.max_length, self.tokenizer_source)
        return self.file_fingerprint(stage, *settings)

    def prediction_id(self, index: int) -> str:
        """Row number (1-based, header excluded) of the predicted sentence in ``predict_file``."""
        return str(index + 1)
