"""Text classification data from CSV / TSV / JSON-lines files, tokenized by the backbone's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch.utils.data import Dataset, Subset

from datamodules.base import ClassificationDataModule, checked_label_list, label_set, map_labels, seeded_split
from datamodules.long_text import LongText, check_content_budget, check_long_text_arguments, encode_texts
from datamodules.tables import DataError, Table, TableFormat, read_table
from tlmodules.backbones import resolve_preprocessing
from tlmodules.labels import IGNORE_INDEX
from tlmodules.positions import position_limit

DEFAULT_MAX_LENGTH = 128
Baseline = Literal["none", "tfidf"]


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
    """Pre-tokenized texts: each item is ``{"features": {"input_ids": [...][, "token_type_ids"]}, "labels": int,
    "index": int}``; a text cut into windows (``long_text="chunks"``) has a list of windows per key instead,
    so an item is always one whole text (document)."""

    def __init__(self, encodings: dict[str, list[Any]], labels: Sequence[int]) -> None:
        self.encodings = encodings
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.encodings.items()}
        return {"features": item, "labels": self.labels[index], "index": index}


def token_counts(dataset: Dataset) -> list[int]:
    """Tokens of every sample of a dataset with ``encodings["input_ids"]`` (:class:`TokenizedTexts`, CoNLL
    sentences) or of a ``Subset`` of one, in the dataset's order; a text cut into windows counts the tokens of
    all its windows."""
    if isinstance(dataset, Subset):
        counts = token_counts(dataset.dataset)
        return [counts[i] for i in dataset.indices]
    return [
        sum(len(w) for w in ids) if ids and isinstance(ids[0], list) else len(ids)
        for ids in dataset.encodings["input_ids"]
    ]


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

    def pad(self, sequences: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        """``{"input_ids": [...][, "token_type_ids": [...]]}`` per row → ``input_ids`` ``(N, T)`` padded with
        ``pad_token_id``, ``attention_mask`` ``(N, T)`` and ``token_type_ids`` ``(N, T)`` padded with 0."""
        length = max(len(seq["input_ids"]) for seq in sequences)
        rows = len(sequences)
        ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, length), dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": mask}
        has_types = "token_type_ids" in sequences[0]
        if has_types:
            inputs["token_type_ids"] = torch.zeros((rows, length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            tokens = seq["input_ids"]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
            if has_types:
                types = seq["token_type_ids"]
                inputs["token_type_ids"][row, : len(types)] = torch.tensor(types, dtype=torch.long)
        return inputs

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        inputs = self.pad([it["features"] for it in items])
        batch_size, length = inputs["input_ids"].shape
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


class WindowPadCollator(PadCollator):
    """:class:`PadCollator` for documents cut into windows (``long_text="chunks"``): every window of every
    document of the batch is one padded row.

    Returns ``{"inputs": {"input_ids": (W, T), "attention_mask": (W, T)[, "token_type_ids"], "document": (W,)},
    "labels": (B,), "index": (B,)}`` for ``B`` documents with ``W`` windows in all; ``document[w]`` is the
    position (``0 … B-1``) in the batch of window ``w``'s document, and a document's windows are consecutive rows.
    """

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        windows: list[dict[str, Sequence[int]]] = []
        document: list[int] = []
        for position, item in enumerate(items):
            features = item["features"]
            for w in range(len(features["input_ids"])):
                windows.append({k: v[w] for k, v in features.items()})
                document.append(position)
        inputs = self.pad(windows)
        inputs["document"] = torch.tensor(document, dtype=torch.long)
        return {
            "inputs": inputs,
            "labels": self._labels([it["labels"] for it in items], 0),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }


class TextClassificationDataModule(ClassificationDataModule):
    """Sentences or documents and their labels from CSV, TSV or JSON lines.

    Columns are named (with a header) or numbered from 0 (without); ``header`` defaults to
    "yes when the columns are given by name". ``quoting=False`` reads quote marks literally
    (sentence files with unbalanced quotes). Label values of any type (``ham``/``spam``, ``0``/``1``,
    topic names) map to indices of ``labels`` when given, else of the sorted distinct training
    labels; the mapping is ``class_names`` and travels in checkpoints.

    The tokenizer comes from the backbone (``backbone``, linked from the model in the CLI) or
    ``tokenizer`` (a folder or hub id). Texts are tokenized once at setup to at most ``max_length`` tokens per
    sequence (default: 128, or the model's position limit when smaller; a value above that limit is refused),
    and padded per batch. ``group_by_length`` makes training batches of texts of similar lengths
    (:class:`datamodules.samplers.LengthGroupedSampler`, shuffled between batches and sharded under DDP), which
    pads far less than random batches. ``group_by_class`` makes training batches that hold each of their classes
    several times (:class:`datamodules.samplers.ClassGroupedSampler`), so a contrastive loss (``strategy:
    contrastive``) finds a same-class partner for every sentence even with many classes.

    Texts longer than ``max_length`` tokens (special tokens included) follow ``long_text``; a text that fits is
    the tokenizer's own encoding under every setting. ``budget`` is ``max_length`` minus the tokenizer's special
    tokens (``[CLS]``, ``[SEP]``: 126 of 128).

    * ``truncate``: the first ``max_length`` tokens.
    * ``head_tail`` (default; Sun et al., "How to Fine-Tune BERT for Text Classification?", CCL 2019: head 128 +
      tail 382 beat the head alone on IMDb): the first ``head_tokens`` text tokens and the last
      ``budget - head_tokens``, between the special tokens. ``head_tokens`` defaults to a quarter of ``budget``.
    * ``chunks``: windows of ``budget`` text tokens (plus the special tokens) starting ``chunk_stride`` tokens
      apart (default: half a window), the last reaching the text's end; ``max_chunks`` keeps that many evenly
      spaced windows (the first and the last among them) of a longer text. An item is still one document (so
      DDP shards documents and a document's windows stay together); the batch carries every window as a row
      and ``inputs["document"]`` ``(W,)``, the position in the batch of each window's document, and the
      backbone pools the windows of each document into one feature vector
      (:class:`tlmodules.backbones.TransformerBackbone`). Labels and ``index`` stay ``(B,)``.

    ``baseline`` is read by the TF-IDF baseline callback (:mod:`tlmodules.baseline`), not here.

    Without ``val_file``, ``val_fraction`` of the training texts is held out (seeded, stratified); unset, a
    tenth from 500 training texts up and none below (:attr:`held_out_fraction`).

    Args:
        long_text: ``truncate`` | ``head_tail`` | ``chunks``, what to do with a text longer than ``max_length``.
        head_tokens: text tokens kept from the head under ``head_tail`` (``None``: a quarter of ``budget``,
            rounded; below ``budget``).
        chunk_stride: text tokens between the starts of consecutive windows under ``chunks`` (``None``: half
            of ``budget``; from 1 to ``budget``).
        max_chunks: the most windows per document under ``chunks`` (``None``: every window).
        baseline: ``tfidf`` fits TF-IDF + logistic regression on the training split and logs
            ``<stage>/baseline/acc`` beside the model's metrics (``tlmodules/baseline.py``); ``none`` does not.
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
        val_fraction: float | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = 0,
        group_by_length: bool = False,
        group_by_class: bool = False,
        long_text: LongText = "head_tail",
        head_tokens: int | None = None,
        chunk_stride: int | None = None,
        max_chunks: int | None = None,
        baseline: Baseline = "tfidf",
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights"])  # the model logs these
        self.check_batch_grouping(group_by_length, group_by_class)
        self.group_by_length, self.group_by_class = group_by_length, group_by_class
        self.tokenizer, self.max_length = tokenizer, max_length
        self._loaded_tokenizer: tuple[str, Any] | None = None
        self.texts: dict[str, list[str]] = {}
        check_max_length_argument(max_length)
        check_long_text_arguments(long_text, head_tokens, chunk_stride, max_chunks)
        if baseline not in get_args(Baseline):
            raise DataError(f"baseline must be one of {list(get_args(Baseline))}, got {baseline!r}")
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
        hp = self.hparams
        self.max_length = checked_max_length(hp.max_length, self.tokenizer_source, model)
        if self.tokenizer_source is not None and (hp.head_tokens is not None or hp.chunk_stride is not None):
            specials = self._load_tokenizer().num_special_tokens_to_add()  # the bounds depend on the tokenizer
            check_content_budget(self.max_length - specials, self.max_length, specials, hp.head_tokens, hp.chunk_stride)

    @staticmethod
    def _tokenizer_from_backbone(backbone: str | None, weights: str | None) -> str | None:
        preprocessing = resolve_preprocessing(backbone, weights) if isinstance(backbone, str) else None
        if preprocessing is not None and preprocessing.kind != "text":
            raise DataError(f"backbone {backbone} is an image model; text data needs a text backbone (hf: or pkg:)")
        return None if preprocessing is None else preprocessing.tokenizer

    def _load_tokenizer(self):
        if self.tokenizer_source is None:
            raise DataError("no tokenizer: set backbone (hf:/pkg: spec) or tokenizer on the text datamodule")
        if self._loaded_tokenizer is None or self._loaded_tokenizer[0] != self.tokenizer_source:
            from transformers import AutoTokenizer

            self._loaded_tokenizer = (self.tokenizer_source, AutoTokenizer.from_pretrained(self.tokenizer_source))
        return self._loaded_tokenizer[1]

    def _encode(self, tokenizer, stage: str) -> tuple[dict[str, list[Any]], list[int]]:
        hp = self.hparams
        table = self.tables[stage]
        texts = ["" if t is None else str(t) for t in table.column(hp.text_column, "text")]
        self.check_not_empty(stage, len(texts), table.path)
        self.texts[stage] = texts
        encodings = encode_texts(
            tokenizer, texts, self.max_length, hp.long_text, hp.head_tokens, hp.chunk_stride, hp.max_chunks
        )
        if stage == "predict":
            labels = [IGNORE_INDEX] * len(texts)
        else:
            labels = map_labels(table.column(hp.label_column, "label"), self.class_names, str(table.path))
        return encodings, labels

    def setup(self, stage: str | None = None) -> None:
        if self.collate_fn is not None:
            return
        tokenizer = self._load_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.collate_fn = WindowPadCollator(pad_id) if self.hparams.long_text == "chunks" else PadCollator(pad_id)
        for name in self.tables:
            encodings, labels = self._encode(tokenizer, name)
            self.datasets[name] = TokenizedTexts(encodings, labels)
        if "train" in self.datasets and "val" not in self.datasets and self.held_out_fraction > 0:
            full = self.datasets["train"]
            train_idx, val_idx = seeded_split(full.labels, self.held_out_fraction, self.seed)
            self.datasets["train"], self.datasets["val"] = Subset(full, train_idx), Subset(full, val_idx)

    def training_size(self) -> int | None:
        table = self.tables.get("train")
        return None if table is None else len(table.rows)

    def split_texts(self, split: str) -> tuple[list[str], list[int]]:
        """The raw texts of ``split`` (after :meth:`setup`) and their label indices (``IGNORE_INDEX`` for
        ``predict``), in the split's order: a validation split held out of ``train_file`` is those rows, and
        ``train`` then excludes them."""
        dataset = self.datasets.get(split)
        if dataset is None:
            raise DataError(f"no {split} texts: set the {split} file of {type(self).__name__} and call setup first")
        if isinstance(dataset, Subset):
            full, rows = dataset.dataset, list(dataset.indices)
            texts = self.texts["train"]
            return [texts[i] for i in rows], [full.labels[i] for i in rows]
        return list(self.texts[split]), list(dataset.labels)

    def sample_lengths(self, stage: str) -> list[int] | None:
        """Tokens per text (per document: over all its windows under ``long_text="chunks"``)."""
        return token_counts(self.datasets[stage])

    def fingerprint(self, stage: str) -> str | None:
        hp = self.hparams
        settings = (hp.text_column, hp.file_format, hp.header, hp.quoting, self.max_length, self.tokenizer_source)
        long_text = (hp.long_text, hp.head_tokens, hp.chunk_stride, hp.max_chunks)
        return self.file_fingerprint(stage, *settings, *long_text)

    def prediction_id(self, index: int) -> str:
        """Row number (1-based, header excluded) of the predicted sentence in ``predict_file``."""
        return str(index + 1)
