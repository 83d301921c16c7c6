"""Shared plumbing of the classification datamodules: label sets, seeded splits, loaders."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.augment import augment_state, load_augment_state, seed_for_process
from datamodules.loaders import ResumableLoader
from datamodules.samplers import LengthOrderedSampler, evaluation_sampler, training_sampler
from datamodules.tables import DataError


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """:func:`file_digest` of one file or of each of several files."""
    return [file_digest(paths)] if isinstance(paths, (str, os.PathLike)) else [file_digest(p) for p in paths]


def hash_json(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def default_num_workers() -> int:
    """Loader processes: up to 4, leaving one core to the training process."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


AUTO_VAL_FRACTION = 0.1  # held out for validation when val_fraction is unset ...
AUTO_VALIDATION_MIN_TRAIN = 500  # ... from this many training samples up (below: every sample trains)


def seeded_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded train/validation split, stratified by label where every class has 2+ samples."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.array([])
    stratify = labels if len(counts) and counts[counts > 0].min() >= 2 else None
    n_val = max(1, round(val_fraction * len(labels)))
    if n_val >= len(labels):
        raise DataError(
            f"cannot hold out {val_fraction:.0%} of {len(labels)} samples for validation and keep training data"
        )
    if stratify is not None and n_val < len(set(labels)):
        stratify = None
    train, val = train_test_split(indices, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return sorted(train.tolist()), sorted(val.tolist())


def map_labels(
    values: Sequence[Any], class_names: Sequence[str], where: str, label_column: str | int | None = None
) -> list[int]:
    """Map raw label values to indices of ``class_names``; an unknown value is an error naming it and the row."""
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for row, value in enumerate(values, 1):
        key = _label_key(value)
        if key not in index:
            raise DataError(
                f"label {value!r} in {where} (data row {row}, header excluded) is not in the label set "
                f"{list(class_names)}; "
                f"fix the row, add the label to 'labels', or check label_column={label_column!r}"
            )
        out.append(index[key])
    return out


def _label_key(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "<missing>"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def checked_label_list(
    labels: Sequence[Any], what: str = "class", plural: str = "classes", where: str | None = None
) -> list[str]:
    """A user's fixed label list as strings: two or more, each named once; ``where`` names it in errors
    (default ``labels=[...]``)."""
    names = [str(v) for v in labels]
    where = where or f"labels={names}"
    if len(names) < 2:
        raise DataError(f"{where} names fewer than two {plural}; give two or more")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{where} names {twice} more than once; list each {what} once")
    return names


def label_set(values: Sequence[Any]) -> list[str]:
    """Sorted distinct label values as strings (numerically when they are all integers)."""
    keys = {_label_key(v) for v in values}
    keys.discard("<missing>")
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


# Lightning warns that a validation loader of length zero "across ranks" may not be intended; an empty list is how
# a datamodule says it has no validation data on purpose, and the CLI's run summary already says so with the fix
NO_VALIDATION_WARNING = r"Total length of `list` across ranks is zero"


def no_validation() -> list[DataLoader]:
    """No validation loader (an empty list, which Lightning takes as "no validation loop"), without Lightning's
    warning that this might be a mistake."""
    warnings.filterwarnings("ignore", message=NO_VALIDATION_WARNING)
    return []


class ClassificationDataModule(pl.LightningDataModule):
    """Base of the classification datamodules.

    Subclasses fill ``self.class_names`` in ``__init__`` (so ``num_classes`` is known before
    the model is built) and ``self.datasets[stage]`` in ``setup``.
    """

    # each split's file or folder can be given alone (test or predict without the training data, the label
    # set then coming from the checkpoint through ``labels``); MultiTaskDataModule needs its training table
    splits_stand_alone: ClassVar[bool] = True

    def __init__(self, batch_size: int, num_workers: int | None, val_fraction: float | None, seed: int) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}; or leave it unset (automatic)")
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.class_names: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.collate_fn: Callable | None = None
        self.batch_augment: Callable[[Any], Any] | None = None  # applied to training batches on their device
        self.group_by_length = False  # training batches of similar lengths, where sample_lengths knows them
        self.group_by_class = False  # training batches that hold each of their classes several times

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``batch_augment`` (e.g. :class:`datamodules.augment.RandomAffineBatch`) on the inputs of training
        batches only, after they reached the device; validation, test and prediction batches pass unchanged."""
        trainer = getattr(self, "trainer", None)
        if self.batch_augment is None or trainer is None or not trainer.training or not isinstance(batch, dict):
            return batch
        return {**batch, "inputs": self.batch_augment(batch["inputs"])}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def training_size(self) -> int | None:
        """How many training samples the training file or folder holds, known before ``setup`` (``None`` where
        it is not known; subclasses that read their listing early say)."""
        return None

    @property
    def held_out_fraction(self) -> float:
        """The share of the training data held out for validation when there is no validation file or folder.

        ``val_fraction`` when given. Unset (automatic): :data:`AUTO_VAL_FRACTION`, but none for a training set
        smaller than :data:`AUTO_VALIDATION_MIN_TRAIN`: a tenth of a few dozen examples measures nothing
        (±15 points of accuracy at 10 examples) and costs a tenth of the little training data there is."""
        if self.val_fraction is not None:
            return self.val_fraction
        size = self.training_size()
        return 0.0 if size is not None and size < AUTO_VALIDATION_MIN_TRAIN else AUTO_VAL_FRACTION

    def validation_note(self) -> str | None:
        """Why this fit has no validation data although ``val_fraction`` was left unset; ``None`` otherwise."""
        sources = {**getattr(self, "files", {}), **getattr(self, "dirs", {})}
        if self.val_fraction is not None or sources.get("val") is not None or self.held_out_fraction > 0:
            return None
        return (
            f"no validation split: the {self.training_size()} training samples (fewer than "
            f"{AUTO_VALIDATION_MIN_TRAIN}) all train; set val_fraction (e.g. 0.2) or a val file/folder to hold "
            "some out"
        )

    def use_backbone(self, backbone: str | None, weights: str | None) -> None:
        """Follow a backbone: its spec and weights decide the preprocessing (images) or the tokenizer (text).

        The constructor calls it with its own ``backbone``/``weights`` (linked from the model in the CLI); a
        composite datamodule (:class:`datamodules.DomainAdaptationDataModule`) calls it to pass the model's
        backbone on to the datamodules it holds, which were built before the link could reach them.
        """
        self.backbone_spec, self.backbone_weights = backbone, weights
        self._apply_backbone()

    def _apply_backbone(self) -> None:
        """Derive what the data needs from ``backbone_spec`` / ``backbone_weights`` (subclasses that have any)."""

    def has_split(self, stage: str) -> bool:
        """Whether ``stage`` (train / val / test / predict) has data, known from the arguments before ``setup``:
        its own file or folder, or for ``val`` a ``val_fraction`` of the training data."""
        if stage in self.datasets:
            return True
        sources = {**getattr(self, "files", {}), **getattr(self, "dirs", {})}
        if sources.get(stage) is not None:
            return True
        return stage == "val" and sources.get("train") is not None and self.held_out_fraction > 0

    def data_sources(self) -> dict[str, str]:
        """The files or folders each split comes from (``{"train": path, ...}``), for run summaries."""
        sources = {**getattr(self, "files", {}), **getattr(self, "dirs", {})}
        return {stage: str(path) for stage, path in sources.items() if path is not None}

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        """Shuffled (training): a :class:`datamodules.loaders.ResumableLoader` over a sampler seeded by ``seed``
        and the epoch, sharded per process, class-grouped where ``group_by_class`` (``sample_labels``) asks,
        length-grouped where ``group_by_length`` and ``sample_lengths`` allow, so a checkpoint records the position
        and a resumed run reads the same batches. In order
        (evaluation): a plain loader, sharded without repeats under DDP."""
        if stage not in self.datasets:
            raise DataError(f"no {stage} data: set the {stage} file or folder of {type(self).__name__}")
        dataset = self.datasets[stage]
        common = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate_fn,
        }
        if not shuffle:
            return DataLoader(dataset, sampler=evaluation_sampler(dataset, self.trainer), **common)
        lengths = self.sample_lengths(stage) if self.group_by_length else None
        labels = self.sample_labels(stage) if self.group_by_class else None
        sampler = training_sampler(len(dataset), self.batch_size, self.trainer, self.seed, lengths, labels)  # type: ignore[arg-type]
        return ResumableLoader(dataset, sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        """The training loader; a ``batch_augment`` without a generator of its own gets one, seeded by ``seed`` and
        the process (restored from a checkpoint before this is called, it keeps its state)."""
        seed_for_process(self.batch_augment, self.seed, self.trainer)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader; none (an empty list, which Lightning takes as "no validation") when there is
        no validation data (``val_fraction=0`` and no val file or folder)."""
        if "val" not in self.datasets and self.datasets and not self.has_split("val"):
            return no_validation()
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The prediction loader: in length order where ``sample_lengths`` knows the lengths (text: batches of
        alike lengths, far less padding; every row carries its ``index``, and
        :class:`tlmodules.predictions.PredictionWriter` writes the rows in index order), else in order."""
        trainer = getattr(self, "trainer", None)
        world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
        rank = trainer.global_rank if world_size > 1 else 0
        loader = self.extraction_dataloader("predict", rank, world_size)
        if loader is not None and (world_size == 1 or len(loader.sampler.batches) > 0):
            return loader
        return self._loader("predict", shuffle=False)

    def extraction_dataloader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader | None:
        """Process ``rank``'s share of ``split`` in batches sorted by length (:class:`LengthOrderedSampler`, longest
        first), not shuffled, with the split's collate function and batch size: for passes that do not depend
        on the order, such as a frozen backbone's features (:meth:`tlmodules.FeatureProbeModule.extraction_pass`)
        or predictions. ``None`` where the lengths are unknown (``sample_lengths`` gives ``None``: images, whose
        cost does not depend on the order) or the split has no data."""
        if split not in self.datasets:
            return None
        lengths = self.sample_lengths(split)
        if lengths is None:
            return None
        dataset = self.datasets[split]
        if len(lengths) != len(dataset):  # type: ignore[arg-type]
            raise DataError(f"sample_lengths({split!r}) gives {len(lengths)} lengths for {len(dataset)} samples")  # type: ignore[arg-type]
        return self._length_ordered_loader(dataset, lengths, rank, world_size)

    def _length_ordered_loader(
        self, dataset: Dataset, lengths: Sequence[int], rank: int, world_size: int
    ) -> DataLoader:
        sampler = LengthOrderedSampler(lengths, self.batch_size, num_replicas=world_size, rank=rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def ordered_dataloader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Process ``rank``'s share of ``split``, every sample once, not shuffled and without ``batch_augment`` (an
        image split's per-image ``augment``/``hflip`` is part of its dataset and still applies): the
        length-ordered :meth:`extraction_dataloader` where lengths are known, else the split in dataset order
        (cut into the same per-process batches). For passes over a whole split that do not train, such as
        fitting :class:`tlmodules.FineTuneModule`'s ``contrastive`` head."""
        loader = self.extraction_dataloader(split, rank, world_size)
        if loader is not None:
            return loader
        if split not in self.datasets:
            raise DataError(f"no {split} data: set the {split} file or folder of {type(self).__name__}")
        dataset = self.datasets[split]
        return self._length_ordered_loader(dataset, [0] * len(dataset), rank, world_size)  # type: ignore[arg-type]

    def sample_lengths(self, stage: str) -> list[int] | None:
        """The length of every sample of ``stage`` (e.g. its token count) for length-grouped batching;
        ``None`` where samples have no length (images)."""
        return None

    def sample_labels(self, stage: str) -> list[int]:
        """The class index of every sample of ``stage`` (a held-out split's share of its dataset included), for
        class-grouped batching."""
        dataset = self.datasets[stage]
        rows = list(dataset.indices) if isinstance(dataset, Subset) else None
        full = dataset.dataset if isinstance(dataset, Subset) else dataset
        labels = getattr(full, "labels", None)
        if labels is None:
            raise DataError(f"group_by_class needs per-sample class labels, which {type(self).__name__} does not keep")
        labels = [int(y) for y in labels]
        return labels if rows is None else [labels[i] for i in rows]

    @staticmethod
    def check_batch_grouping(group_by_length: bool, group_by_class: bool) -> None:
        """Training batches are grouped by length or by class, not both."""
        if group_by_length and group_by_class:
            raise DataError(
                "group_by_length and group_by_class both set: batches are grouped one way; keep group_by_class "
                "for a contrastive loss (it needs same-class pairs), group_by_length otherwise"
            )

    def fingerprint(self, stage: str) -> str | None:
        """A string that changes whenever the inputs of ``stage`` could change (files, preprocessing), so
        a feature cache keyed by it is never stale; ``None`` when the data cannot be described (no disk cache)."""
        return None

    def file_fingerprint(self, stage: str, *settings: Any) -> str | None:
        """Fingerprint of a file-backed stage: the file's bytes plus the settings that shape its inputs.

        A validation split drawn from ``train_file`` shares the training file (indices address its rows).
        """
        files = getattr(self, "files", {})
        source = "train" if stage == "val" and not files.get("val") else stage
        path = files.get(source)
        if path is None:
            return None
        if not isinstance(path, (str, os.PathLike)):  # several files merged into one split
            return hash_json([source, [str(os.path.abspath(p)) for p in path], files_digest(path), *settings])
        return hash_json([source, str(os.path.abspath(path)), file_digest(path), *settings])

    def prediction_id(self, index: int) -> str:
        """The identifier written next to a prediction of sample ``index`` of the predict set."""
        return str(index)

    def check_not_empty(self, stage: str, size: int, source: Any) -> None:
        if size == 0:
            raise DataError(f"the {stage} split is empty (from {source}); give it at least one sample")

    def state_dict(self) -> dict[str, Any]:
        """The label set, and every process's ``batch_augment`` generator state (a collective under DDP: Lightning
        asks every process, rank 0 writes the file)."""
        state: dict[str, Any] = {"class_names": list(self.class_names)}
        augment = augment_state(self.batch_augment, self.trainer)
        if augment is not None:
            state["batch_augment"] = augment
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("batch_augment") is not None and self.batch_augment is not None:
            load_augment_state(self.batch_augment, state_dict["batch_augment"], self.trainer)
        saved = state_dict.get("class_names")
        if saved is not None and not self.class_names:  # e.g. predict-only data: take the checkpoint's names
            self.class_names = list(saved)
        elif saved is not None and list(saved) != list(self.class_names):
            raise DataError(
                f"the checkpoint was trained on labels {saved} but this data has {self.class_names}; "
                "use the same label set (set 'labels' explicitly) to resume"
            )
