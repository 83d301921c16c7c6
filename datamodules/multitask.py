"""Multi-task data: one table, one input (numeric columns, a text column or an image-path column) and several
label columns, each the target of a task (multiclass, binary or regression)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from datamodules.base import ClassificationDataModule, files_digest, label_set, map_labels, seeded_split
from datamodules.images import build_image_transform
from datamodules.tables import DataError, Table, TableFormat, merge_tables, read_table
from datamodules.text import PadCollator, TextClassificationDataModule, check_max_length_argument, checked_max_length
from tlmodules.backbones import resolve_preprocessing
from tlmodules.labels import IGNORE_INDEX

TASK_KINDS = ("multiclass", "binary", "multilabel", "regression")
MULTILABEL_SEPARATOR = "|"  # "a|c": labels a and c; in JSON lines a list ["a", "c"] works too
INPUT_KINDS = ("numeric", "text", "image")
BINARY_WORDS = {"0": 0.0, "1": 1.0, "false": 0.0, "true": 1.0, "no": 0.0, "yes": 1.0}


def is_missing(value: Any) -> bool:
    """An empty cell, a JSON ``null`` or a NaN."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def is_one(paths: Any) -> bool:
    """One file path (not a list of several)."""
    return isinstance(paths, (str, Path))


def label_tokens(value: Any, separator: str) -> list[str] | None:
    """A multilabel cell as its labels: ``"a|c"`` or ``["a", "c"]`` → ``["a", "c"]``; ``"|"`` or ``[]`` → ``[]``
    (none of the labels); an empty cell or null → ``None`` (missing)."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    if is_missing(value):
        return None
    return [token.strip() for token in str(value).split(separator) if token.strip()]


def to_number(value: Any) -> float:
    """A cell as a float; ``ValueError`` for text that is not a number (booleans are not numbers)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return float(value)
    return float(str(value).strip())


def binary_word(key: str) -> float | None:
    """0.0/1.0 for 0/1, false/true, no/yes (any case, ``1.0`` too); ``None`` for any other value."""
    word = BINARY_WORDS.get(key.lower())
    if word is not None:
        return word
    try:
        number = float(key)
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


class FeatureScaler:
    """``(x - mean) / std`` with the training statistics; shared by the datasets, so statistics restored
    from a checkpoint after ``setup`` apply to every later sample."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class OpenImage:
    """Image path → the backbone's input tensor (the file is read at each access, like ``ImageSamples``)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, path: Path) -> torch.Tensor:
        with Image.open(path) as handle:
            image = handle.copy()
        return self.transform(image)


class MultiTaskSamples(Dataset):
    """Rows of one table: ``{"inputs": ..., "labels": {task: 0-d tensor}, "index": row}``.

    ``inputs`` holds one entry per row (raw feature rows, tokenized rows, image paths) that ``transform``
    (when given) turns into the model's input; ``labels`` holds one ``(N,)`` tensor per task.
    """

    def __init__(
        self, inputs: Sequence[Any], labels: dict[str, torch.Tensor], transform: Callable[[Any], Any] | None = None
    ) -> None:
        self.inputs = inputs
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inputs = self.inputs[index]
        if self.transform is not None:
            inputs = self.transform(inputs)
        return {"inputs": inputs, "labels": {k: v[index] for k, v in self.labels.items()}, "index": index}


class MultiTaskPadCollator(PadCollator):
    """:class:`PadCollator` for tokenized multi-task rows: pads ``inputs`` per batch and stacks each task's
    labels into ``(B,)``."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return super().__call__([{**item, "features": item["inputs"]} for item in items])

    def _labels(self, labels: list[Any], length: int) -> dict[str, torch.Tensor]:
        return {name: torch.stack([row[name] for row in labels]) for name in labels[0]}


class MultiTaskDataModule(ClassificationDataModule):
    """One table (CSV, TSV or JSON lines) with one input and one label column per task, or several
    single-task tables merged.

    Merging: give a list of files for a split (``train_file: [sentiment.csv, topics.csv]``). Columns are
    matched by header name; every file needs the input column(s), and a task's label column may live in some
    of the files only: rows of the others lack that task's label (missing, as an empty cell), so each sample
    carries its own labels and trains only the tasks it has.

    Batches are ``{"inputs": ..., "labels": {task name: (B,) tensor}, "index": (B,)}``; ``index`` is the
    0-based data row of the sample in its file (a validation split held out of ``train_file`` indexes
    the training file's rows). Labels per task kind:

    * ``multiclass``: int64 index into the task's class names (its ``labels`` when given, else the sorted
      distinct values of the training file); a missing label is ``IGNORE_INDEX`` (-100, ignored).
    * ``binary``: float32 0.0/1.0 from 0/1, true/false, yes/no (any case), or, when the training column holds
      exactly two other values, from those two in sorted order; a missing label is NaN.
    * ``multilabel``: ``(K,)`` float32 0/1 over the task's label names (its ``labels`` when given, else the
      sorted labels of the training file), from cells like ``"a|c"`` (the task's ``separator``, default ``|``)
      or JSON lists; ``"|"`` or ``[]`` is none of the labels, and a missing cell is a row of NaN.
    * ``regression``: float32 values; a missing label is NaN.

    A missing label is an empty cell or a JSON ``null``; a row with every label missing is kept. The predict
    file needs no label columns: its labels are all missing.

    Inputs per ``input_kind``:

    * ``numeric``: ``(in_features,)`` float32 rows of ``feature_columns``, standardised with the mean and
      (population) standard deviation of the training split only; a constant column is only centred. The
      statistics (``feature_mean``, ``feature_std``) travel in checkpoints and replace the data's own.
    * ``text``: ``text_column`` tokenized by the backbone's tokenizer as
      :class:`~datamodules.text.TextClassificationDataModule` does (truncated to ``max_length``, padded
      per batch): ``{"input_ids": (B, T), "attention_mask": (B, T)[, "token_type_ids"]}``.
    * ``image``: ``image_column`` holds image paths relative to the table's folder (or absolute), opened
      with PIL and fed through the backbone's evaluation transform (``build_image_transform``).

    Attributes known before ``setup`` (the model links them): ``tasks``, the task dicts completed with
    ``num_outputs`` (multiclass: the number of classes; binary and regression: 1) and ``class_names``
    (multiclass and binary: the class names, a binary task's negative class first; regression: ``None``),
    for regression also ``target_mean`` and ``target_std`` (population) of the labelled values of the training
    split only, their other keys (``weight``, ``head_hidden``, …) kept as given; ``task_names``;
    ``in_features`` (the number of numeric input columns, MultiTaskModule's ``in_features``; numeric input only,
    else ``None``). ``targets[stage]`` maps each task to the ``(N,)`` label tensor of a file.

    Args:
        train_file: the training table (or a list of tables to merge); without ``val_file``, a seeded
            ``val_fraction`` of its rows is held out for validation (``val_fraction=0``: none).
        val_file, test_file, predict_file: optional tables (or lists) with the same columns (predict: inputs
            only); a merged predict split's row ids count on through the files in order.
        tasks: ``[{"name": str, "kind": "multiclass" | "binary" | "multilabel" | "regression", "column": str,
            "labels": [...] (optional: a multiclass or multilabel task's fixed label list; a binary task's two
            values, negative first), "separator": str (multilabel cells, default "|")}, ...]``; other keys
            pass through untouched.
        input_kind: ``numeric``, ``text`` or ``image``.
        feature_columns: the numeric input columns (``None``: every column that no task uses).
        text_column: the text column (``input_kind="text"``).
        image_column: the image-path column (``input_kind="image"``).
        backbone, weights: the backbone spec whose tokenizer (text) or preprocessing (image) to use; linked
            from the model in the CLI.
        max_length: longest tokenized text (text input); default 128, or the backbone's position limit when
            smaller. A value above that limit is refused.
        file_format: ``auto`` (by suffix), ``csv``, ``tsv`` or ``jsonl``.
        header: whether CSV/TSV files start with a header row (without one, columns are named "0", "1", ...).
        val_fraction, seed: the held-out validation split of ``train_file``.
        batch_size, num_workers: the loaders' batch size and worker processes (``None``: up to 4).
    """

    splits_stand_alone: ClassVar[bool] = False  # label sets and feature scaling come from train_file

    def __init__(
        self,
        train_file: str | list[str],
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        predict_file: str | list[str] | None = None,
        tasks: list[dict[str, Any]] | None = None,
        input_kind: Literal["numeric", "text", "image"] = "numeric",
        feature_columns: list[str] | None = None,
        text_column: str | None = None,
        image_column: str | None = None,
        backbone: str | None = None,
        weights: str | None = "DEFAULT",
        max_length: int | None = None,
        file_format: TableFormat = "auto",
        header: bool = True,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights", "tasks"])  # the model logs these (tasks completed)
        if input_kind not in INPUT_KINDS:
            raise DataError(f"input_kind={input_kind!r} is not one of {list(INPUT_KINDS)}; choose one of them")
        check_max_length_argument(max_length)
        if train_file is None:
            raise DataError("give train_file: the task label sets and the feature scaling come from it")
        self.input_kind = input_kind
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        self.parts: dict[str, list[Table]] = {  # each stage's files; several are merged into one table
            stage: [read_table(p, file_format, header, role=stage) for p in ([paths] if is_one(paths) else paths)]
            for stage, paths in self.files.items()
            if paths is not None
        }
        self.tables: dict[str, Table] = {stage: merge_tables(parts, stage) for stage, parts in self.parts.items()}
        train = self.tables["train"]
        specs = self._check_task_specs(tasks, train)
        self.binary_words: set[str] = set()  # binary tasks read as 0/1, true/false, yes/no
        self.input_columns = self._input_columns(specs, train, feature_columns, text_column, image_column)
        self.in_features: int | None = len(self.input_columns) if input_kind == "numeric" else None
        for stage, table in self.tables.items():
            for column in self.input_columns:  # in every file; a label column in one file of a stage at least
                for part in self.parts[stage]:
                    self._require_column(part, column, "input column", self._input_fix())
            if stage != "predict":
                for task in specs:
                    fix = "set the task's 'column' to one of them"
                    self._require_column(table, task["column"], f"task {task['name']!r}: label column", fix)
        self.tasks = [self._complete_task(task, train) for task in specs]
        self.task_names = [task["name"] for task in self.tasks]
        self.targets: dict[str, dict[str, torch.Tensor]] = {}
        for stage, table in self.tables.items():  # fail now on a bad label, not after an epoch
            self.targets[stage] = {task["name"]: self._encode_labels(task, table, stage) for task in self.tasks}
        self.tasks = [self._with_target_scale(task) for task in self.tasks]
        self.use_backbone(backbone, weights)
        self.scaler: FeatureScaler | None = None

    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        self.tokenizer_source: str | None = None
        self.max_length: int | None = None  # text input: the length texts are truncated to
        self.image_transform: Callable | None = None
        if self.input_kind == "text":
            self.tokenizer_source = TextClassificationDataModule._tokenizer_from_backbone(spec, weights)
            self.max_length = checked_max_length(self.hparams.max_length, self.tokenizer_source, spec)
        elif self.input_kind == "image":
            preprocessing = resolve_preprocessing(spec, weights) if isinstance(spec, str) else None
            if preprocessing is not None and preprocessing.kind != "image":
                raise DataError(f"backbone {spec} is a text model; image input needs an image backbone")
            self.image_transform = build_image_transform(preprocessing)

    # -- configuration checks ----------------------------------------------------------------------
    @staticmethod
    def _require_column(table: Table, column: str, what: str, fix: str) -> None:
        if column not in table.columns:
            hint = "" if table.has_header else " (read without a header: columns are numbered from 0)"
            raise DataError(
                f"{what} {column!r} is not in {table.path}; its columns are {table.columns}{hint}. Fix: {fix}"
            )

    def _input_fix(self) -> str:
        return {
            "numeric": "set feature_columns to columns of the file",
            "text": "set text_column to the column holding the text",
            "image": "set image_column to the column holding the image paths",
        }[self.input_kind]

    @staticmethod
    def _check_task_specs(tasks: list[dict[str, Any]] | None, train: Table) -> list[dict[str, Any]]:
        example = '[{"name": "price", "kind": "regression", "column": "price"}, ...]'
        if not tasks or not isinstance(tasks, (list, tuple)):
            raise DataError(f"tasks is empty; give one dict per label column, e.g. {example}")
        specs, names = [], []
        for number, task in enumerate(tasks, 1):
            if not isinstance(task, dict):
                raise DataError(f"task {number} is {task!r}, not a dict; give dicts like {example}")
            missing = [key for key in ("name", "kind", "column") if key not in task]
            if missing:
                raise DataError(f"task {number} ({task}) lacks {missing}; every task needs name, kind and column")
            name, kind, column = task["name"], task["kind"], task["column"]
            if not isinstance(name, str) or not name:
                raise DataError(f"task {number} has name {name!r}; give each task a non-empty string name")
            if name in names:
                raise DataError(
                    f"task name {name!r} is used by more than one task ({[t.get('name') for t in tasks]}); "
                    "give each task its own name"
                )
            if kind not in TASK_KINDS:
                raise DataError(f"task {name!r} has unknown kind {kind!r}; choose one of {list(TASK_KINDS)}")
            if not isinstance(column, str):
                if isinstance(column, int) and not isinstance(column, bool) and not train.has_header:
                    column = str(column)
                else:
                    raise DataError(
                        f"task {name!r} has column {column!r}; give a column name of {train.path}: {train.columns}"
                    )
            if task.get("labels") is not None and kind == "regression":
                raise DataError(f"task {name!r} is a regression task but sets labels; remove 'labels'")
            names.append(name)
            specs.append({**task, "column": column})
        return specs

    def _input_columns(
        self,
        specs: list[dict[str, Any]],
        train: Table,
        feature_columns: list[str] | None,
        text_column: str | None,
        image_column: str | None,
    ) -> list[str]:
        label_columns = {task["column"] for task in specs}
        if self.input_kind == "numeric":
            columns = [c for c in train.columns if c not in label_columns] if feature_columns is None else None
            if columns is None:
                columns = [str(c) for c in feature_columns]
                twice = sorted({c for c in columns if columns.count(c) > 1})
                if twice:
                    raise DataError(f"feature_columns names {twice} more than once; list each column once")
            if not columns:
                raise DataError(
                    f"no feature columns: every column of {train.path} ({train.columns}) is a task's label; "
                    "add feature columns to the file or set feature_columns"
                )
        else:
            role = "text_column" if self.input_kind == "text" else "image_column"
            column = text_column if self.input_kind == "text" else image_column
            if column is None:
                raise DataError(
                    f"input_kind={self.input_kind!r} needs {role}: one of the columns of {train.path} ({train.columns})"
                )
            columns = [str(column)]
        leaked = sorted(label_columns & set(columns))
        if leaked:
            raise DataError(
                f"column(s) {leaked} are both an input and a task's label; an input must not hold a target: "
                "drop them from the inputs or change the task's column"
            )
        return columns

    # -- labels ------------------------------------------------------------------------------------
    def _complete_task(self, task: dict[str, Any], train: Table) -> dict[str, Any]:
        """The task dict with ``num_outputs`` and ``class_names`` from the training file's column."""
        name, kind, column = task["name"], task["kind"], task["column"]
        if kind == "regression":
            return {**task, "num_outputs": 1, "class_names": None}
        values = train.column(column, "label")
        given = task.get("labels")
        if kind == "multilabel":
            separator = task.get("separator", MULTILABEL_SEPARATOR)
            seen = sorted({t for v in values for t in (label_tokens(v, separator) or [])})
            names = [str(v) for v in given] if given is not None else seen
            if len(set(names)) != len(names) or len(names) < 2:
                raise DataError(
                    f"multilabel task {name!r} has labels {names}; it needs two or more distinct labels (cells like "
                    f"'a{separator}c', or JSON lists): fix the column {column!r} or give 'labels'"
                )
            return {**task, "num_outputs": len(names), "class_names": names}
        if kind == "multiclass":
            names = [str(v) for v in given] if given is not None else label_set(values)
            source = f"labels={names}" if given is not None else f"column {column!r} of {train.path}"
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise DataError(f"task {name!r}: labels={names} names {twice} more than once; list each class once")
            if len(names) < 2:
                raise DataError(
                    f"task {name!r} ({source}) has fewer than two classes ({names}); a multiclass task needs two "
                    "or more: fix the column or make the task binary/regression"
                )
            return {**task, "num_outputs": len(names), "class_names": names}
        if given is not None:
            names = [str(v) for v in given]
            if len(names) != 2 or names[0] == names[1]:
                raise DataError(f"binary task {name!r} has labels={names}; give two values, the negative class first")
            return {**task, "num_outputs": 1, "class_names": names}
        keys = label_set([v for v in values if not is_missing(v)])
        if all(binary_word(key) is not None for key in keys):  # 0/1, true/false, yes/no
            self.binary_words.add(name)
            lowered = {key.lower() for key in keys}
            names = next((pair for pair in (["no", "yes"], ["false", "true"]) if keys and lowered <= set(pair)), None)
            return {**task, "num_outputs": 1, "class_names": names or ["0", "1"]}
        if len(keys) != 2:
            raise DataError(
                f"binary task {name!r}: column {column!r} of {train.path} has {len(keys)} distinct values "
                f"{keys[:10]}; a binary task takes 0/1, true/false, yes/no or exactly two values. Fix the column, "
                "or make the task multiclass"
            )
        return {**task, "num_outputs": 1, "class_names": keys}  # two values: the first sorted is 0.0

    def _encode_labels(self, task: dict[str, Any], table: Table, stage: str) -> torch.Tensor:
        """The ``(N,)`` label tensor of one task in one file (all missing for the predict file)."""
        kind, n = task["kind"], len(table.rows)
        if stage == "predict":
            if kind == "multiclass":
                return torch.full((n,), IGNORE_INDEX, dtype=torch.long)
            if kind == "multilabel":
                return torch.full((n, task["num_outputs"]), math.nan, dtype=torch.float32)
            return torch.full((n,), math.nan, dtype=torch.float32)
        values = table.column(task["column"], "label")
        where = f"{table.path} (task {task['name']!r}, column {task['column']!r})"
        if kind == "multilabel":
            return self._multilabel_rows(task, values, where)
        if kind == "regression":
            return torch.tensor([self._regression_value(v, row, where) for row, v in enumerate(values, 1)])
        missing = [is_missing(v) for v in values]
        names = task["class_names"]
        if kind == "binary" and task["name"] in self.binary_words:
            out = []
            for row, (value, gap) in enumerate(zip(values, missing), 1):
                word = None if gap else binary_word(str(value).strip())
                if not gap and word is None:
                    raise DataError(
                        f"label {value!r} in {where} (data row {row}, header excluded) is not a binary value; "
                        "the training file uses 0/1, true/false, yes/no: fix the row"
                    )
                out.append(math.nan if gap else word)
            return torch.tensor(out, dtype=torch.float32)
        filled = [names[0] if gap else v for v, gap in zip(values, missing)]  # placeholders, masked below
        indices = torch.tensor(map_labels(filled, names, where, task["column"]), dtype=torch.long)
        gaps = torch.tensor(missing, dtype=torch.bool)
        if kind == "multiclass":
            return indices.masked_fill(gaps, IGNORE_INDEX)
        return indices.float().masked_fill(gaps, math.nan)

    def _with_target_scale(self, task: dict[str, Any]) -> dict[str, Any]:
        """A regression task with ``target_mean`` and ``target_std`` of its labelled training-split values
        (the model learns standardised targets and answers in the column's own units); others unchanged."""
        if task["kind"] != "regression":
            return task
        values = self.targets["train"][task["name"]]
        split = self._split()
        if split is not None:
            values = values[split[0]]
        values = values[~torch.isnan(values)].double()
        mean = float(values.mean()) if len(values) else 0.0
        std = float(values.std(unbiased=False)) if len(values) > 1 else 0.0
        return {**task, "target_mean": mean, "target_std": std if std > 0 else 1.0}

    @staticmethod
    def _multilabel_rows(task: dict[str, Any], values: Sequence[Any], where: str) -> torch.Tensor:
        """``(N, K)`` float32 0/1 rows of a multilabel column; a missing cell gives a row of NaN."""
        names = task["class_names"]
        position = {label: k for k, label in enumerate(names)}
        rows = torch.zeros(len(values), len(names))
        for row, value in enumerate(values):
            tokens = label_tokens(value, task.get("separator", MULTILABEL_SEPARATOR))
            if tokens is None:
                rows[row] = math.nan
                continue
            unknown = [t for t in tokens if t not in position]
            if unknown:
                raise DataError(
                    f"labels {unknown} in {where} (data row {row + 1}, header excluded) are not in the task's "
                    f"label set {names}: fix the row, or list them in the task's 'labels'"
                )
            rows[row, [position[t] for t in tokens]] = 1.0
        return rows

    @staticmethod
    def _regression_value(value: Any, row: int, where: str) -> float:
        if is_missing(value):
            return math.nan
        try:
            number = to_number(value)
        except ValueError:
            number = None
        if number is None or math.isinf(number):
            raise DataError(
                f"value {value!r} in {where} (data row {row}, header excluded) is not a number; regression "
                "targets must be numbers: fix the row, leave the cell empty for a missing label, or make the "
                "task multiclass"
            )
        return number

    # -- inputs ------------------------------------------------------------------------------------
    def _features(self, table: Table) -> torch.Tensor:
        """Raw ``(N, in_features)`` float32 features of a file."""
        columns = [table.column(c, "feature") for c in self.input_columns]
        rows = []
        for row in range(len(table.rows)):
            values = []
            for name, column in zip(self.input_columns, columns):
                value = column[row]
                try:
                    number = None if is_missing(value) else to_number(value)
                except ValueError:
                    number = None
                if number is None or not math.isfinite(number):
                    raise DataError(
                        f"feature column {name!r} of {table.path} has {value!r} in data row {row + 1} (header "
                        "excluded); numeric features must be finite numbers: fix the row, or drop the column "
                        "from feature_columns"
                    )
                values.append(number)
            rows.append(values)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.input_columns))

    def _fit_scaler(self, train: torch.Tensor) -> FeatureScaler:
        """Mean and population std of the training rows (float64, stored as float32); constant columns get 1."""
        data = train.double()
        mean, std = data.mean(0), data.std(0, correction=0)
        constant = data.amax(0) == data.amin(0)
        std = torch.where(constant | (std == 0), torch.ones_like(std), std)
        return FeatureScaler(mean.float(), std.float())

    def _image_paths(self, table: Table) -> list[Path]:
        column = self.input_columns[0]
        paths = []
        for row, value in enumerate(table.column(column, "image"), 1):
            if is_missing(value):
                raise DataError(
                    f"image column {column!r} of {table.path} is empty in data row {row} (header excluded); "
                    "give every row an image path"
                )
            path = table.row_source(row - 1).parent / str(value).strip()
            if not path.is_file():
                raise DataError(
                    f"image {str(value)!r} in column {column!r} of {table.path} (data row {row}, header excluded) "
                    f"is not a file ({path}); paths are relative to the table's folder: fix the path"
                )
            paths.append(path)
        return paths

    def _load_tokenizer(self):
        if self.tokenizer_source is None:
            raise DataError("no tokenizer: set backbone (an hf:/pkg: spec) on the multi-task datamodule")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_source)

    def _tokenize(self, tokenizer, table: Table) -> list[dict[str, list[int]]]:
        texts = ["" if is_missing(t) else str(t) for t in table.column(self.input_columns[0], "text")]
        encodings = tokenizer(texts, truncation=True, max_length=self.max_length)
        keep = [k for k in ("input_ids", "token_type_ids") if k in encodings]
        return [{k: encodings[k][i] for k in keep} for i in range(len(texts))]

    def _split(self) -> tuple[list[int], list[int]] | None:
        """Train/validation row indices of ``train_file`` when validation is held out of it, else ``None``."""
        if "val" in self.tables or self.val_fraction <= 0:
            return None
        # distinct stand-in labels: a plain seeded shuffle split, no stratification
        return seeded_split(list(range(len(self.tables["train"].rows))), self.val_fraction, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        split = self._split()
        inputs: dict[str, Sequence[Any]] = {}
        transform: Callable[[Any], Any] | None = None
        if self.input_kind == "numeric":
            inputs = {name: self._features(table) for name, table in self.tables.items()}
            if self.scaler is None:  # statistics restored from a checkpoint stay
                train = inputs["train"] if split is None else inputs["train"][split[0]]
                self.scaler = self._fit_scaler(train)
            transform = self.scaler
        elif self.input_kind == "text":
            tokenizer = self._load_tokenizer()
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            self.collate_fn = MultiTaskPadCollator(pad_id)
            inputs = {name: self._tokenize(tokenizer, table) for name, table in self.tables.items()}
        else:
            inputs = {name: self._image_paths(table) for name, table in self.tables.items()}
            transform = OpenImage(self.image_transform)
        for name, table in self.tables.items():
            self.check_not_empty(name, len(inputs[name]), table.path)
            self.datasets[name] = MultiTaskSamples(inputs[name], self.targets[name], transform)
        if split is not None:
            full = self.datasets["train"]
            self.datasets["train"], self.datasets["val"] = Subset(full, split[0]), Subset(full, split[1])
            for name in ("train", "val"):
                self.check_not_empty(name, len(self.datasets[name]), self.tables["train"].path)

    # -- scaling, checkpoints, caching -------------------------------------------------------------
    @property
    def feature_mean(self) -> torch.Tensor | None:
        """Per-feature training mean ``(in_features,)`` (numeric input, after ``setup`` or a checkpoint)."""
        return None if self.scaler is None else self.scaler.mean

    @property
    def feature_std(self) -> torch.Tensor | None:
        """Per-feature training standard deviation ``(in_features,)`` (1 for constant columns)."""
        return None if self.scaler is None else self.scaler.std

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "tasks": [{"name": t["name"], "kind": t["kind"], "class_names": t["class_names"]} for t in self.tasks]
        }
        if self.scaler is not None:
            state["feature_columns"] = list(self.input_columns)
            state["feature_mean"] = self.scaler.mean.clone()
            state["feature_std"] = self.scaler.std.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = {t["name"]: t for t in self.tasks}
        for saved in state_dict.get("tasks", []):
            task = mine.get(saved["name"])
            if task is not None and (task["kind"], task["class_names"]) != (saved["kind"], saved["class_names"]):
                raise DataError(
                    f"task {saved['name']!r}: the checkpoint was trained as {saved['kind']} with classes "
                    f"{saved['class_names']} but this data gives {task['kind']} with {task['class_names']}; use "
                    "the same kind and label set (set the task's 'labels' explicitly) to resume"
                )
        if state_dict.get("feature_mean") is None:
            return
        mean = torch.as_tensor(state_dict["feature_mean"], dtype=torch.float32)
        std = torch.as_tensor(state_dict["feature_std"], dtype=torch.float32)
        if self.input_kind != "numeric" or mean.shape != (self.in_features,):
            raise DataError(
                f"the checkpoint scales {len(mean)} numeric features ({state_dict.get('feature_columns')}) but this "
                f"data has {self.in_features} ({self.input_columns if self.input_kind == 'numeric' else 'none'}); "
                "use the same feature_columns"
            )
        if self.scaler is None:
            self.scaler = FeatureScaler(mean, std)
        else:  # the datasets share this scaler: later samples use the checkpoint's statistics
            self.scaler.mean, self.scaler.std = mean, std

    def fingerprint(self, stage: str) -> str | None:
        """The stage's file and the settings that shape its inputs; numeric inputs also depend on the
        training statistics (or what determines them)."""
        hp = self.hparams
        settings: list[Any] = [self.input_kind, self.input_columns, hp.file_format, hp.header]
        if self.input_kind == "text":
            settings += [self.max_length, self.tokenizer_source]
        elif self.input_kind == "image":
            settings.append(repr(self.image_transform))
        elif self.scaler is not None:
            settings += [self.scaler.mean.tolist(), self.scaler.std.tolist()]
        else:
            val = self.files["val"]
            settings += [files_digest(self.files["train"]), val and files_digest(val), hp.val_fraction, hp.seed]
        return self.file_fingerprint(stage, *settings)

    def prediction_id(self, index: int) -> str:
        """Row number (1-based, header excluded) of the predicted row in ``predict_file``."""
        return str(index + 1)
