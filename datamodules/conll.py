"""Token classification (named entities, chunks, POS) from CoNLL-style files, tokenized by the backbone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from datamodules.base import ClassificationDataModule, checked_label_list, seeded_split
from datamodules.tables import DataError
from datamodules.text import (
    PadCollator,
    TextClassificationDataModule,
    check_max_length_argument,
    checked_max_length,
    token_counts,
)
from tlmodules.labels import IGNORE_INDEX

DOCSTART = "-DOCSTART-"


@dataclass
class ConllFile:
    """Sentences of a CoNLL file: ``words[s][w]``, ``tags[s][w]`` (empty lists without tags) and the
    1-based file line of every word, ``lines[s][w]``."""

    path: Path
    words: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    lines: list[list[int]] = field(default_factory=list)


def read_conll(path: str | Path, token_column: int, tag_column: int | None, role: str) -> ConllFile:
    """Read one word per line (whitespace-separated columns), a blank line between sentences; ``-DOCSTART-``
    lines are skipped. ``tag_column=None`` reads words only (predict files)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{role} file {path} is a folder; give the path of a CoNLL file (one word per line)")
    data = ConllFile(path)
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def end_sentence() -> None:
        if words:
            data.words.append(list(words))
            data.tags.append(list(tags))
            data.lines.append(list(lines))
        words.clear()
        tags.clear()
        lines.clear()

    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                columns = line.split()
                if not columns:
                    end_sentence()
                    continue
                if columns[0] == DOCSTART:
                    end_sentence()
                    continue
                words.append(_column(columns, token_column, "token", path, number))
                if tag_column is not None:
                    if _position(tag_column, len(columns)) == _position(token_column, len(columns)):
                        raise DataError(
                            f"{path} line {number}: token_column={token_column} and tag_column={tag_column} are the "
                            f"same column of this {len(columns)}-column line {line.strip()!r}; the line has no tag: "
                            "give every word a tag column, or fix token_column / tag_column"
                        )
                    tags.append(_column(columns, tag_column, "tag", path, number))
                lines.append(number)
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}; convert the file to UTF-8") from err
    end_sentence()
    if not data.words:
        raise DataError(f"{role} file {path} has no sentences (only blank or {DOCSTART} lines); give it data")
    return data


def _position(column: int, width: int) -> int:
    return column if column >= 0 else width + column


def _column(columns: list[str], column: int, role: str, path: Path, number: int) -> str:
    if not -len(columns) <= column < len(columns):
        raise DataError(
            f"{path} line {number} has {len(columns)} column(s) {columns} but {role}_column={column} needs "
            f"{column + 1 if column >= 0 else -column}; fix the line (one word per line, columns separated by "
            f"whitespace, a blank line between sentences) or set {role}_column"
        )
    return columns[column]


def conll_tag_set(tags: Sequence[Sequence[str]]) -> list[str]:
    """Sorted distinct tags, ``"O"`` first when present."""
    names = sorted({tag for sentence in tags for tag in sentence})
    return ["O", *(n for n in names if n != "O")] if "O" in names else names


def align_word_labels(
    word_ids: Sequence[int | None], word_labels: Sequence[int], ignore_index: int = IGNORE_INDEX
) -> list[int]:
    """One label per token: a word's label on its FIRST sub-token, ``ignore_index`` on its later sub-tokens
    and on special tokens (``word_id`` None). ``word_ids``: (T,) as a fast tokenizer's ``word_ids()`` gives
    them; ``word_labels``: (W,) one label per word. Returns (T,)."""
    seen: set[int] = set()
    out = []
    for word in word_ids:
        if word is None or word in seen:
            out.append(ignore_index)
            continue
        if not 0 <= word < len(word_labels):
            raise ValueError(f"word id {word} has no label: word_labels has {len(word_labels)} entries")
        seen.add(word)
        out.append(int(word_labels[word]))
    return out


def word_start_mask(word_ids: Sequence[int | None]) -> list[bool]:
    """Where words start: ``word_ids`` (T,) as a fast tokenizer's ``word_ids()`` gives them → (T,) ``True`` on
    each word's FIRST sub-token, ``False`` on later sub-tokens and special tokens (``word_id`` None). These are
    the positions that :func:`align_word_labels` labels."""
    seen: set[int] = set()
    out = []
    for word in word_ids:
        out.append(word is not None and word not in seen)
        if word is not None:
            seen.add(word)
    return out


def first_token_words(word_ids: Sequence[int | None]) -> list[int]:
    """The words that have a first sub-token, in order: ``word_ids`` (T,) as a fast tokenizer's ``word_ids()``
    gives them → the distinct word ids, special tokens (``None``) left out. These are the words that
    :func:`align_word_labels` labels, in the same order."""
    return [word for word in dict.fromkeys(word_ids) if word is not None]


class TokenizedSentences(Dataset):
    """Pre-tokenized sentences: ``{"features": {"input_ids": [...][, "token_type_ids"]}, "labels": [...] (one
    per token, ``IGNORE_INDEX`` where there is none), "word_starts": [...] (one bool per token, ``True`` on each
    word's first sub-token), "index": sentence number in its file (0-based)}``."""

    def __init__(
        self, encodings: dict[str, list[list[int]]], labels: list[list[int]], word_starts: list[list[bool]]
    ) -> None:
        self.encodings = encodings
        self.labels = labels
        self.word_starts = word_starts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.encodings.items()}
        return {"features": item, "labels": self.labels[index], "word_starts": self.word_starts[index], "index": index}


class ConllDataModule(ClassificationDataModule):
    """Tagged sentences from CoNLL-style files (e.g. CoNLL-2003 ``EU NNP B-NP B-ORG``).

    One word per line with whitespace-separated columns: the word in ``token_column`` (default 0), its tag
    in ``tag_column`` (default -1, the last; e.g. 2 for the chunk tags of CoNLL-2003), a blank line between
    sentences; ``-DOCSTART-`` lines are skipped. ``class_names`` is ``labels`` when given, else the sorted
    tags of the training file with ``"O"`` first; a val/test tag outside it is an error.

    Sentences are tokenized at setup with the backbone's fast tokenizer (or ``tokenizer``), words given as
    split, truncated to ``max_length`` tokens (default: 128, or the model's position limit when smaller; a value
    above that limit is refused). Batches: ``{"inputs": {"input_ids": (B, T), "attention_mask":
    (B, T)[, "token_type_ids"]}, "labels": (B, T) int64, "word_starts": (B, T) bool, "index": (B,)}``, padded
    per batch. ``word_starts`` is ``True`` on each word's first sub-token that survives truncation and ``False``
    on later sub-tokens, special tokens and padding. ``labels`` holds the word's tag index where
    ``word_starts`` is ``True`` and ``IGNORE_INDEX`` (-100) elsewhere. Words beyond ``max_length`` after
    truncation get no label and are not scored. Predict batches have no tags: ``labels`` is ``IGNORE_INDEX``
    everywhere, and ``word_starts`` says which tokens to predict (one per word).
    ``group_by_length`` makes training batches of sentences of similar token counts (as in
    :class:`TextClassificationDataModule`).

    ``self.sentences[stage]`` / ``self.tags[stage]`` are the words / tags of each sentence, indexed by the
    batch's ``index`` (a validation split held out of the training file indexes the training sentences).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        token_column: int = 0,
        tag_column: int = -1,
        labels: list[str] | None = None,
        backbone: str | None = None,
        weights: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int | None = 0,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights"])  # the model logs these
        self.group_by_length = group_by_length
        self.tokenizer, self.max_length = tokenizer, max_length
        check_max_length_argument(max_length)
        for name, value in (("token_column", token_column), ("tag_column", tag_column)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{name} must be a column position (an int, negative from the end), got {value!r}")
        if token_column == tag_column:
            raise DataError(f"token_column and tag_column are both {token_column}; the tag needs its own column")
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        if not any(self.files.values()):
            raise DataError("give at least train_file (or test_file / predict_file)")
        self.use_backbone(backbone, weights)
        self.data: dict[str, ConllFile] = {}
        for stage, path in self.files.items():
            if path is not None:
                self.data[stage] = read_conll(path, token_column, None if stage == "predict" else tag_column, stage)
        self.class_names = self._class_names(labels)
        for stage, data in self.data.items():  # fail now on a tag outside the set, not after an epoch
            if stage != "predict":
                self._check_tags(data)
        self.sentences: dict[str, list[list[str]]] = {stage: data.words for stage, data in self.data.items()}
        self.tags: dict[str, list[list[str]]] = {stage: data.tags for stage, data in self.data.items()}
        self.tagged_words: dict[str, list[list[int]]] = {}  # filled at setup, see prediction_words

    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        self.tokenizer_source = self.tokenizer or TextClassificationDataModule._tokenizer_from_backbone(spec, weights)
        model = self.tokenizer or spec
        self.max_length = checked_max_length(self.hparams.max_length, self.tokenizer_source, model)

    def _class_names(self, labels: list[str] | None) -> list[str]:
        if labels is not None:
            return checked_label_list(labels, "tag", "tags")
        reference = self.data.get("train") or self.data.get("test") or self.data.get("val")
        if reference is None:
            return []  # predict only: the checkpoint's names arrive through load_state_dict
        names = conll_tag_set(reference.tags)
        if len(names) < 2:
            raise DataError(
                f"{reference.path} has fewer than two distinct tags ({names}) in tag_column="
                f"{self.hparams.tag_column}; check tag_column, or give data with two or more tags"
            )
        return names

    def _check_tags(self, data: ConllFile) -> None:
        known = set(self.class_names)
        for sentence_tags, sentence_lines in zip(data.tags, data.lines):
            for tag, line in zip(sentence_tags, sentence_lines):
                if tag not in known:
                    raise DataError(
                        f"tag {tag!r} in {data.path} line {line} is not in the tag set {self.class_names} "
                        "(the training file's tags, or 'labels'); fix the line, add the tag to 'labels', or "
                        f"check tag_column={self.hparams.tag_column}"
                    )

    def _load_tokenizer(self):
        if self.tokenizer_source is None:
            raise DataError("no tokenizer: set backbone (hf:/pkg: spec) or tokenizer on the CoNLL datamodule")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
        if not tokenizer.is_fast:
            raise DataError(
                f"the tokenizer of {self.tokenizer_source} is not a fast tokenizer; word-label alignment needs "
                "word_ids(): use a backbone or tokenizer folder with a tokenizer.json"
            )
        return tokenizer

    def _encode(self, tokenizer, stage: str) -> TokenizedSentences:
        data = self.data[stage]
        encodings = tokenizer(data.words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        word_ids = [encodings.word_ids(i) for i in range(len(data.words))]
        if stage == "predict":  # no tags: nothing to score, word_starts marks what to predict
            labels = [[IGNORE_INDEX] * len(ids) for ids in word_ids]
        else:
            index = {name: i for i, name in enumerate(self.class_names)}
            labels = [align_word_labels(ids, [index[tag] for tag in tags]) for ids, tags in zip(word_ids, data.tags)]
        self.tagged_words[stage] = [first_token_words(ids) for ids in word_ids]
        keep = [k for k in ("input_ids", "token_type_ids") if k in encodings]
        return TokenizedSentences({k: encodings[k] for k in keep}, labels, [word_start_mask(ids) for ids in word_ids])

    def setup(self, stage: str | None = None) -> None:
        if self.collate_fn is not None:
            return
        tokenizer = self._load_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.collate_fn = PadCollator(pad_id, label_pad_id=IGNORE_INDEX)
        for name in self.data:
            self.datasets[name] = self._encode(tokenizer, name)
        if "train" in self.datasets and "val" not in self.datasets and self.val_fraction > 0:
            full = self.datasets["train"]
            # distinct stand-in labels: a plain seeded shuffle split, no stratification
            train_idx, val_idx = seeded_split(list(range(len(full))), self.val_fraction, self.seed)
            self.datasets["train"], self.datasets["val"] = Subset(full, train_idx), Subset(full, val_idx)
            self.sentences["val"], self.tags["val"] = self.sentences["train"], self.tags["train"]
            self.tagged_words["val"] = self.tagged_words["train"]

    def sample_lengths(self, stage: str) -> list[int] | None:
        return token_counts(self.datasets[stage])

    def fingerprint(self, stage: str) -> str | None:
        hp = self.hparams
        return self.file_fingerprint(stage, "conll", hp.token_column, self.max_length, self.tokenizer_source)

    def prediction_id(self, index: int) -> str:
        """Sentence number (1-based, ``-DOCSTART-`` lines not counted) of the predicted sentence in ``predict_file``."""
        return str(index + 1)

    def prediction_words(self, index: int) -> tuple[list[str], list[int]]:
        """The words of predicted sentence ``index`` and the positions (0-based, in order) of those that have a
        prediction: the words whose first sub-token is in the encoding. A word cut off by ``max_length``, or one
        the tokenizer turns into no token at all (a lone soft hyphen), has none. Known after ``setup``."""
        return self.sentences["predict"][index], self.tagged_words["predict"][index]
