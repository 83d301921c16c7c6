"""Semantic segmentation data: paired image / mask folders, one segmentation task plus tasks derived from the masks.

A split folder holds ``<image_folder>/`` (photos) and ``<mask_folder>/`` (single-channel class-index images), paired
by file name without extension (``images/0001TP_006690.jpg`` ↔ ``labels/0001TP_006690.png``; sub-folders kept).

Samples are ``{"inputs": (3, H, W) float32, "labels": {task: ...}, "index": int}`` at the frame's own size
(training crops and scales it); batches (:class:`SegmentationCollator`) pad to the batch's largest frame::

    {"inputs": (B, 3, H, W) float32, "labels": {task: (B, H, W) | (B, K) | (B,)}, "index": (B,) int64,
     "sizes": (B, 2) int64}   # sizes: each sample's (H, W) before padding

Labels per task kind, computed from the (transformed) mask, void and padding excluded:

* ``segmentation``: ``(H, W)`` int64 class index per pixel; void and padding ``IGNORE_INDEX`` (-100).
* ``mask``: ``(H, W)`` float32, 1.0 where the pixel's class is in the task's ``classes``, else 0.0; void NaN.
* ``multilabel``: ``(K,)`` float32, 1.0 where class k covers more than ``min_share`` of the labelled pixels.
* ``regression``: 0-d float32, the share (0–1) of labelled pixels whose class is in ``classes``.

An image without a labelled pixel (and every predict image) gets a NaN row / NaN value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from datamodules.base import ClassificationDataModule, checked_label_list, seeded_split
from datamodules.images import find_corrupt_images, list_images
from datamodules.samplers import PassSeeds
from datamodules.tables import DataError
from tlmodules.backbones import resolve_preprocessing
from tlmodules.labels import IGNORE_INDEX

TASK_KINDS = ("segmentation", "mask", "multilabel", "regression")
DENSE_KINDS = ("segmentation", "mask")  # per-pixel targets
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")  # single-channel PIL modes: class indices
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_TARGET_STD = 1e-6
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_class_names(class_names: Sequence[str] | str | Path | None) -> list[str]:
    """The class names in label order: a list, or a text file with one name per line (blank lines skipped)."""
    fix = "pass class_names: a list of names in label order, or a text file with one name per line"
    if class_names is None:
        raise DataError(f"class_names is required (the masks hold indices into it); {fix}")
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise DataError(f"class_names {str(class_names)!r} is not a file; {fix}")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = f"class_names file {path}"
    else:
        names = [str(name) for name in class_names]
        where = f"class_names={names}"
    return checked_label_list(names, where=where)


def read_mask(path: Path) -> np.ndarray:
    """A mask file's class indices as an ``(H, W)`` int64 array; a colour (RGB, …) mask is a :class:`DataError`."""
    with Image.open(path) as handle:
        if handle.mode not in MASK_MODES:
            raise DataError(
                f"mask {path} is a {handle.mode} image; masks must hold class indices (one value per class, in "
                "class_names order: a single-channel PNG, PIL mode L, P or I;16), not colours. Convert colour masks "
                "to index masks"
            )
        return np.asarray(handle).astype(np.int64)


def map_void(mask: np.ndarray, ignore_value: int | None) -> torch.Tensor:
    """Raw mask values → ``(H, W)`` int64 tensor with ``ignore_value`` pixels set to ``IGNORE_INDEX``."""
    out = torch.from_numpy(mask)
    if ignore_value is not None:
        out = out.masked_fill(out == ignore_value, IGNORE_INDEX)
    return out


class SegmentationTransform:
    """``(image, mask)`` → ``(inputs (3, H, W) float32 normalised, mask (H, W) int64)``.

    The mask arrives with void already ``IGNORE_INDEX``. With ``augment``: a random scale by a factor drawn from
    ``scale_range`` (image bilinear, mask nearest), a random crop to ``crop_size`` (default: the frame's size before
    scaling) padded where the frame is smaller (image 0, mask ``IGNORE_INDEX``), a horizontal flip (p 0.5, ``hflip``)
    and a colour jitter of the image only (``photometric``). Geometric steps take one draw for image and mask (both
    ``tv_tensors``). Without ``augment`` only the normalisation: full frames, unchanged. Random draws come from
    torch's CPU generator (seeded per item by :class:`SegmentationSamples`).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        scale_range: tuple[float, float] = (0.75, 1.5),
        crop_size: tuple[int, int] | None = None,
        hflip: bool = True,
        photometric: bool = True,
    ) -> None:
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.augment, self.scale_range, self.crop_size = augment, tuple(scale_range), crop_size
        self.hflip, self.photometric = hflip, photometric
        self.flip = v2.RandomHorizontalFlip(p=0.5)
        self.jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.augment:
            height, width = image.shape[-2:]
            low, high = self.scale_range
            factor = float(torch.empty(()).uniform_(low, high)) if high > low else float(low)
            size = [max(1, round(height * factor)), max(1, round(width * factor))]
            image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
            mask = F.resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)  # centres aligned as bilinear
            crop = v2.RandomCrop(
                self.crop_size or (height, width),
                pad_if_needed=True,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
            )
            image, mask = crop(image, mask)
            if self.hflip:
                image, mask = self.flip(image, mask)
            if self.photometric:
                image, mask = self.jitter(image, mask)  # images only; the mask passes through
        inputs = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        return inputs.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor).contiguous()

    def __repr__(self) -> str:
        steps = f"mean={self.mean}, std={self.std}"
        if self.augment:
            steps += f", scale_range={self.scale_range}, crop_size={self.crop_size}, hflip={self.hflip}"
            steps += f", photometric={self.photometric}"
        return f"SegmentationTransform({steps})"


def derive_labels(mask: torch.Tensor, tasks: Sequence[dict[str, Any]], num_classes: int) -> dict[str, torch.Tensor]:
    """Each task's label from an ``(H, W)`` int64 mask (``IGNORE_INDEX``: void or padding); see the module docstring."""
    labelled = mask != IGNORE_INDEX
    counts = torch.bincount(mask[labelled], minlength=num_classes).double()
    total = float(counts.sum())
    labels: dict[str, torch.Tensor] = {}
    for task in tasks:
        kind, name = task["kind"], task["name"]
        if kind == "segmentation":
            labels[name] = mask
            continue
        indices = torch.tensor(task["class_indices"], dtype=torch.long)
        if kind == "mask":
            inside = torch.isin(mask, indices).float()
            labels[name] = inside.masked_fill(~labelled, math.nan)
        elif kind == "multilabel":
            if total == 0:
                labels[name] = torch.full((len(indices),), math.nan)
            else:
                labels[name] = (counts[indices] / total > task["min_share"]).float()
        else:  # regression
            value = float(counts[indices].sum()) / total if total else math.nan
            labels[name] = torch.tensor(value, dtype=torch.float32)
    return labels


class SegmentationSamples(Dataset):
    """Image (and mask) files → ``{"inputs": (3, H, W), "labels": {task: ...}, "index": int}``.

    ``masks`` is ``None`` for unlabelled images (predict): every label is then missing (``IGNORE_INDEX`` / NaN).
    Random transforms are seeded as :class:`datamodules.images.ImageSamples`' are: once a training loader named the
    pass (:meth:`set_pass`), each item's draws depend on ``(pass key, index)`` only, whichever worker reads it, and
    again in a resumed run; the key lives in shared memory, so persistent workers see every new pass.
    """

    def __init__(
        self,
        images: Sequence[Path],
        masks: Sequence[Path] | None,
        transform: SegmentationTransform,
        tasks: Sequence[dict[str, Any]],
        num_classes: int,
        ignore_value: int | None,
    ) -> None:
        self.images = list(images)
        self.masks = None if masks is None else list(masks)
        self.transform = transform
        self.tasks = [dict(task) for task in tasks]
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.seeds = PassSeeds()

    def set_pass(self, key: int) -> None:
        """Seed every item's random transform by ``(key, index)`` from now on (:class:`PassSeeds`)."""
        self.seeds.set_pass(key)

    def item_seed(self, index: int) -> int | None:
        return self.seeds.item_seed(index)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.images[index]) as handle:
            image = F.pil_to_tensor(handle.convert("RGB"))
        if self.masks is None:
            mask = torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.int64)
        else:
            mask = map_void(read_mask(self.masks[index]), self.ignore_value)
        inputs, mask = self.seeds.apply(index, self.transform, image, mask)
        return {"inputs": inputs, "labels": derive_labels(mask, self.tasks, self.num_classes), "index": index}


class SegmentationCollator:
    """Samples → one batch padded at the bottom and right to its largest frame: inputs 0, ``segmentation``
    labels ``IGNORE_INDEX``, ``mask`` labels NaN; ``sizes`` ``(B, 2)`` holds each sample's ``(H, W)`` before padding."""

    def __init__(self, kinds: dict[str, str]) -> None:
        self.kinds = dict(kinds)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sizes = torch.tensor([list(item["inputs"].shape[-2:]) for item in items], dtype=torch.int64)
        height, width = (int(v) for v in sizes.max(0).values)
        first = items[0]["inputs"]
        inputs = first.new_zeros((len(items), first.shape[0], height, width))
        for row, item in enumerate(items):
            h, w = item["inputs"].shape[-2:]
            inputs[row, :, :h, :w] = item["inputs"]
        labels: dict[str, torch.Tensor] = {}
        for name, kind in self.kinds.items():
            values = [item["labels"][name] for item in items]
            if kind in DENSE_KINDS:
                fill = IGNORE_INDEX if kind == "segmentation" else math.nan
                out = torch.full((len(items), height, width), fill, dtype=values[0].dtype)
                for row, value in enumerate(values):
                    out[row, : value.shape[0], : value.shape[1]] = value
                labels[name] = out
            else:
                labels[name] = torch.stack(values)
        index = torch.tensor([int(item["index"]) for item in items], dtype=torch.int64)
        return {"inputs": inputs, "labels": labels, "index": index, "sizes": sizes}


class SegmentationDataModule(ClassificationDataModule):
    """Semantic segmentation from paired image / mask folders, as a multi-task data source.

    Layout: ``<split>_dir/<image_folder>/<name>.<jpg|png|…>`` and ``<split>_dir/<mask_folder>/<name>.png`` for the
    train, val and test splits, paired by path without extension; ``predict_dir`` holds images only, directly or in
    its ``<image_folder>/``. Masks are single-channel class-index images (PIL mode L, P or I;16): value ``c`` is
    ``class_names[c]``, ``ignore_value`` is void (mapped to ``IGNORE_INDEX``); any other value is an error.

    Batches: ``{"inputs": (B, 3, H, W), "labels": {task: (B, H, W) | (B, K) | (B,)}, "index": (B,), "sizes": (B, 2)}``
    padded to the batch's largest frame (:class:`SegmentationCollator`; label kinds in the module docstring).

    Tasks (``tasks``, default one ``segmentation`` task): ``{"name", "kind", "classes"?, ...}``:

    * ``segmentation``: the mask; optional ``class_weights``: ``num_classes`` floats or ``"median_frequency"``
      (SegNet's: ``median(freq) / freq_c``, ``freq_c`` the pixels of class c over the labelled pixels of the training
      images where c appears; a class absent from training gets 1.0).
    * ``mask``: per pixel, whether its class is one of ``classes`` (e.g. drivable area ``classes: [Road]``).
    * ``multilabel``: per image, whether each class of ``classes`` covers more than ``min_share`` (default 0) of
      the labelled pixels.
    * ``regression``: per image, the share of labelled pixels whose class is in ``classes``.

    Known after ``__init__`` (the model reads them in its ``setup``): ``tasks`` completed with ``num_outputs``
    (segmentation: ``num_classes``; mask and regression: 1; multilabel: ``len(classes)``), ``class_names``
    (segmentation: all; multilabel: its classes; others ``None``), ``class_indices`` (derived kinds: the label
    indices of ``classes``), ``target_mean``/``target_std`` (regression: population statistics of the full-frame
    value over the training images, std at least 1e-6; 0 and 1 without training data) and resolved
    ``class_weights``; other keys (``weight``, ``head``, …) pass through. Also ``task_names``, ``dense_task_names``
    (segmentation and mask tasks) and ``in_features`` (``None``). The training masks are read once here: their
    values are checked and their class histograms kept for these statistics.

    Training (``augment``): random scale (``scale_range``, of the frame's own size), random crop to ``crop_size``
    (``(height, width)``, default the frame's size) padded where needed, horizontal flip (``hflip``), colour jitter
    of the image (``photometric``); image and mask share every geometric draw. Evaluation, test and prediction use
    full frames, only normalised (the backbone's mean/std, ImageNet's without one). Per-item draws depend on
    ``(seed, epoch, index)`` only, so a resumed run sees the same crops.

    Without ``val_dir`` a seeded ``held_out_fraction`` of the training pairs validates (``val_fraction``; unset: a
    tenth from 500 training pairs up, none below). Every listing, pairing and the training masks are checked in
    ``__init__``; validation and test files in ``setup`` (unreadable files, image/mask size mismatches, mask values).
    """

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        class_names: list[str] | str | None = None,
        ignore_value: int | None = 255,
        tasks: list[dict[str, Any]] | None = None,
        image_folder: str = "images",
        mask_folder: str = "labels",
        augment: bool = True,
        scale_range: tuple[float, float] = (0.75, 1.5),
        crop_size: tuple[int, int] | None = None,
        hflip: bool = True,
        photometric: bool = True,
        backbone: str | None = None,
        weights: str | None = "DEFAULT",
        val_fraction: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int | None = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights", "tasks"])  # the model logs these (tasks completed)
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir, "predict": predict_dir}
        if all(folder is None for folder in self.dirs.values()):
            raise DataError(
                "give at least train_dir (or val_dir / test_dir / predict_dir for evaluation and prediction)"
            )
        for stage, folder in self.dirs.items():
            if folder is not None and not Path(folder).is_dir():
                raise DataError(f"{stage}_dir {folder} is not a folder; check the path")
        self.class_names = read_class_names(class_names)
        self.class_names_file = str(class_names) if isinstance(class_names, (str, Path)) else None
        if ignore_value is not None and (not isinstance(ignore_value, int) or isinstance(ignore_value, bool)):
            raise DataError(f"ignore_value must be an integer mask value or None, got {ignore_value!r}")
        if ignore_value is not None and 0 <= ignore_value < self.num_classes:
            raise DataError(
                f"ignore_value={ignore_value} is the index of class {self.class_names[ignore_value]!r}; set it to the "
                f"masks' void value (outside 0–{self.num_classes - 1}) or None"
            )
        self.ignore_value = ignore_value
        self.image_folder, self.mask_folder = image_folder, mask_folder
        self.augment, self.hflip, self.photometric = augment, hflip, photometric
        self.scale_range = self._checked_scale_range(scale_range)
        self.crop_size = self._checked_crop_size(crop_size)
        self.pairs: dict[str, list[tuple[Path, Path]]] = {
            stage: self._pair(stage) for stage in ("train", "val", "test") if self.dirs[stage] is not None
        }
        self.predict_root: Path | None = None
        self.predict_images: list[Path] = []
        if predict_dir is not None:
            root = Path(predict_dir)
            self.predict_root = root / image_folder if (root / image_folder).is_dir() else root
            self.predict_images = list_images(self.predict_root)
            if not self.predict_images:
                raise DataError(
                    f"predict_dir {predict_dir} holds no images; put them in {root} or {root / image_folder}"
                )
        self.train_counts: np.ndarray | None = None  # (N, C) labelled pixels per training pair and class
        self.held_out: tuple[list[int], list[int]] | None = None  # (train, val) pair indices without val_dir
        if train_dir is not None:
            self.train_counts = self._check_split("train")
            if val_dir is None and self.held_out_fraction > 0:
                self.held_out = seeded_split([0] * len(self.pairs["train"]), self.held_out_fraction, seed)
        self.tasks = [self._complete_task(task) for task in self._check_task_specs(tasks)]
        self.task_names = [task["name"] for task in self.tasks]
        self.dense_task_names = [task["name"] for task in self.tasks if task["kind"] in DENSE_KINDS]
        self.in_features: int | None = None
        self.collate_fn = SegmentationCollator({task["name"]: task["kind"] for task in self.tasks})
        self.predict_ids: list[str] = []
        self.use_backbone(backbone, weights)

    # -- arguments ---------------------------------------------------------------------------------
    @staticmethod
    def _checked_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
        values = tuple(float(v) for v in scale_range)
        if len(values) != 2 or not 0 < values[0] <= values[1] or not all(math.isfinite(v) for v in values):
            raise DataError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        return values  # type: ignore[return-value]

    @staticmethod
    def _checked_crop_size(crop_size: Sequence[int] | int | None) -> tuple[int, int] | None:
        if crop_size is None:
            return None
        values = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise DataError(f"crop_size must be (height, width), two positive integers, or None; got {crop_size!r}")
        return values  # type: ignore[return-value]

    def _check_task_specs(self, tasks: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        if tasks is None:
            return [{"name": "segmentation", "kind": "segmentation"}]
        example = '[{"name": "seg", "kind": "segmentation"}, {"name": "drivable", "kind": "mask", "classes": ["Road"]}]'
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise DataError(f"tasks must be a non-empty list of task dicts, e.g. {example}")
        names: list[str] = []
        specs = []
        for number, task in enumerate(tasks, 1):
            if not isinstance(task, dict) or "name" not in task or "kind" not in task:
                raise DataError(f"task {number} is {task!r}; every task is a dict with name and kind, e.g. {example}")
            name, kind = task["name"], task["kind"]
            if not isinstance(name, str) or not name:
                raise DataError(f"task {number} has name {name!r}; give each task a non-empty string name")
            if name in names:
                raise DataError(
                    f"task name {name!r} is used by more than one task ({[*names, name]}); give each its own"
                )
            if kind not in TASK_KINDS:
                raise DataError(f"task {name!r} has unknown kind {kind!r}; choose one of {list(TASK_KINDS)}")
            names.append(name)
            specs.append(dict(task))
        dense = [t["name"] for t in specs if t["kind"] == "segmentation"]
        if len(dense) > 1:
            raise DataError(f"tasks {dense} are all segmentation tasks; keep one (it predicts every class)")
        return specs

    def _task_classes(self, task: dict[str, Any]) -> list[int]:
        """The label indices of a derived task's ``classes`` (names of ``class_names``)."""
        name, classes = task["name"], task.get("classes")
        if isinstance(classes, str):
            classes = [classes]
        if not classes or not isinstance(classes, (list, tuple)):
            raise DataError(
                f"task {name!r} ({task['kind']}) needs classes: a non-empty list of class names, some of "
                f"{self.class_names}"
            )
        unknown = [str(c) for c in classes if str(c) not in self.class_names]
        if unknown:
            raise DataError(
                f"task {name!r} names classes {unknown} that are not class names; choose from {self.class_names}"
            )
        twice = sorted({str(c) for c in classes if list(map(str, classes)).count(str(c)) > 1})
        if twice:
            raise DataError(f"task {name!r} lists classes {twice} more than once; list each once")
        return [self.class_names.index(str(c)) for c in classes]

    def _complete_task(self, task: dict[str, Any]) -> dict[str, Any]:
        kind, name = task["kind"], task["name"]
        train = self._training_counts()
        if kind == "segmentation":
            if task.get("classes") is not None:
                raise DataError(f"segmentation task {name!r} predicts every class; remove its 'classes'")
            done = {
                **task,
                "num_outputs": self.num_classes,
                "class_names": list(self.class_names),
                "class_indices": None,
            }
            if task.get("class_weights") is not None:
                done["class_weights"] = self._class_weights(name, task["class_weights"], train)
            return done
        indices = self._task_classes(task)
        if kind == "mask":
            return {**task, "num_outputs": 1, "class_names": None, "class_indices": indices}
        if kind == "multilabel":
            min_share = float(task.get("min_share", 0.0))
            if not 0.0 <= min_share < 1.0:
                raise DataError(f"multilabel task {name!r} has min_share={min_share}; give a share in [0, 1)")
            names = [self.class_names[i] for i in indices]
            return {
                **task,
                "num_outputs": len(indices),
                "class_names": names,
                "class_indices": indices,
                "min_share": min_share,
            }
        mean, std = 0.0, 1.0  # no training data (test/predict from a checkpoint, whose statistics the model keeps)
        if train is not None:
            labelled = train.sum(1)
            shares = train[:, indices].sum(1)[labelled > 0] / labelled[labelled > 0]
            if len(shares):
                mean, std = float(shares.mean()), max(float(shares.std()), MIN_TARGET_STD)
        return {
            **task,
            "num_outputs": 1,
            "class_names": None,
            "class_indices": indices,
            "target_mean": mean,
            "target_std": std,
        }

    def _class_weights(self, name: str, weights: Any, train: np.ndarray | None) -> list[float]:
        if weights == "median_frequency":
            return median_frequency_weights(train) if train is not None else [1.0] * self.num_classes
        if isinstance(weights, (list, tuple)) and len(weights) == self.num_classes:
            try:
                values = [float(w) for w in weights]
            except (TypeError, ValueError):
                values = []
            if len(values) == self.num_classes and all(math.isfinite(v) and v >= 0 for v in values):
                return values
        raise DataError(
            f"segmentation task {name!r} has class_weights={weights!r}; give {self.num_classes} non-negative numbers "
            "(one per class, in class_names order) or 'median_frequency'"
        )

    def _training_counts(self) -> np.ndarray | None:
        """Per-pair class pixel counts of the training part (without the held-out validation pairs)."""
        if self.train_counts is None:
            return None
        return self.train_counts if self.held_out is None else self.train_counts[self.held_out[0]]

    # -- listing and checks -----------------------------------------------------------------------
    def _pair(self, stage: str) -> list[tuple[Path, Path]]:
        """The split's ``(image, mask)`` paths, paired by path without extension, sorted."""
        root = Path(self.dirs[stage])  # type: ignore[arg-type]
        layout = f"{root}/{self.image_folder}/<name>.jpg and {root}/{self.mask_folder}/<name>.png"
        found: dict[str, dict[str, Path]] = {}
        for role, sub in (("image", self.image_folder), ("mask", self.mask_folder)):
            folder = root / sub
            if not folder.is_dir():
                raise DataError(
                    f"{stage}_dir {root} has no {sub!r} folder; expected {layout} (set image_folder / mask_folder "
                    "to the sub-folder names)"
                )
            found[role] = {}
            for path in list_images(folder):
                stem = path.relative_to(folder).with_suffix("").as_posix()
                if stem in found[role]:
                    raise DataError(
                        f"{found[role][stem]} and {path} share the name {stem!r}; keep one {role} per name in {folder}"
                    )
                found[role][stem] = path
        images, masks = found["image"], found["mask"]
        lone_images = sorted(set(images) - set(masks))
        lone_masks = sorted(set(masks) - set(images))
        if lone_images or lone_masks:
            raise DataError(
                f"{stage}_dir {root}: {len(lone_images)} image(s) without a mask {lone_images[:5]} and "
                f"{len(lone_masks)} mask(s) without an image {lone_masks[:5]}; images and masks pair by name without "
                f"extension ({layout}): add the missing files or remove the strays"
            )
        if not images:
            raise DataError(f"the {stage} split is empty ({root}); expected {layout}")
        return [(images[stem], masks[stem]) for stem in sorted(images)]

    def _check_split(self, stage: str) -> np.ndarray:
        """Read every file of a split once: unreadable files, image/mask sizes, mask modes and values. Returns the
        ``(N, C)`` int64 labelled-pixel counts per pair and class."""
        pairs = self.pairs[stage]
        unreadable = find_corrupt_images([image for image, _ in pairs])
        broken = {path for path, _ in unreadable}
        counts = np.zeros((len(pairs), self.num_classes), dtype=np.int64)
        bad_values: list[tuple[Path, list[int]]] = []
        for row, (image_path, mask_path) in enumerate(pairs):
            try:
                mask = read_mask(mask_path)
            except DataError:  # a colour mask: its own message (DataError is a ValueError)
                raise
            except UNREADABLE as err:
                unreadable.append((mask_path, f"{type(err).__name__}: {err}"))
                continue
            if image_path in broken:
                continue
            with Image.open(image_path) as handle:
                size = handle.size
            if size != (mask.shape[1], mask.shape[0]):
                raise DataError(
                    f"image {image_path} is {size[0]}x{size[1]} but its mask {mask_path} is "
                    f"{mask.shape[1]}x{mask.shape[0]} (width x height); a mask must label the image pixel for pixel"
                )
            flat = mask.ravel()
            known = (flat >= 0) & (flat < self.num_classes)
            counts[row] = np.bincount(flat[known], minlength=self.num_classes)
            if not known.all():
                others = np.unique(flat[~known])
                if self.ignore_value is not None:
                    others = others[others != self.ignore_value]
                if len(others):
                    bad_values.append((mask_path, others.tolist()))
        if unreadable:
            listing = "; ".join(f"{p} ({why})" for p, why in unreadable[:5])
            more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
            raise DataError(
                f"{len(unreadable)} unreadable file(s) in {stage}_dir: {listing}{more}. Remove or replace them"
            )
        if bad_values:
            listing = "; ".join(f"{p}: {values[:10]}" for p, values in bad_values[:3])
            more = f" (and {len(bad_values) - 3} more masks)" if len(bad_values) > 3 else ""
            raise DataError(
                f"mask values that are neither a class index (0-{self.num_classes - 1}, {self.num_classes} "
                f"class_names) nor ignore_value={self.ignore_value}: {listing}{more}. Add the missing classes to "
                "class_names, or set ignore_value to the masks' void value"
            )
        return counts

    # -- preprocessing -----------------------------------------------------------------------------
    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        preprocessing = resolve_preprocessing(spec, weights) if isinstance(spec, str) else None
        if preprocessing is not None and preprocessing.kind != "image":
            raise DataError(f"backbone {spec} is a text model; segmentation needs an image backbone")
        if preprocessing is not None and preprocessing.in_channels not in (None, 3):
            raise DataError(f"backbone {spec} reads {preprocessing.in_channels}-channel images; segmentation feeds RGB")
        mean = tuple(preprocessing.mean) if preprocessing is not None and preprocessing.mean else IMAGENET_MEAN
        std = tuple(preprocessing.std) if preprocessing is not None and preprocessing.std else IMAGENET_STD
        if len(mean) != 3:  # single-value statistics
            mean, std = (sum(mean) / len(mean),) * 3, (sum(std) / len(std),) * 3
        self.eval_transform = SegmentationTransform(mean, std)
        self.train_transform = (
            SegmentationTransform(
                mean, std, True, self.scale_range, self.crop_size, hflip=self.hflip, photometric=self.photometric
            )
            if self.augment
            else self.eval_transform
        )

    # -- datasets ----------------------------------------------------------------------------------
    def data_sources(self) -> dict[str, str]:
        """The split folders, and the class-name file when the names come from one."""
        sources = super().data_sources()
        return {**sources, "class_names": self.class_names_file} if self.class_names_file else sources

    def training_size(self) -> int | None:
        """The number of training image/mask pairs (before any held-out validation)."""
        return len(self.pairs["train"]) if "train" in self.pairs else None

    def _samples(self, pairs: Sequence[tuple[Path, Path]], transform: SegmentationTransform) -> SegmentationSamples:
        images, masks = [p for p, _ in pairs], [m for _, m in pairs]
        return SegmentationSamples(images, masks, transform, self.tasks, self.num_classes, self.ignore_value)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            if self.dirs["train"] and "train" not in self.datasets:
                pairs = self.pairs["train"]
                if self.held_out is not None:
                    train_idx, val_idx = self.held_out
                    self.datasets["train"] = Subset(self._samples(pairs, self.train_transform), train_idx)
                    self.datasets["val"] = Subset(self._samples(pairs, self.eval_transform), val_idx)
                else:
                    self.datasets["train"] = self._samples(pairs, self.train_transform)
            if self.dirs["val"] and "val" not in self.datasets:
                self._check_split("val")
                self.datasets["val"] = self._samples(self.pairs["val"], self.eval_transform)
        if stage in (None, "test") and self.dirs["test"] and "test" not in self.datasets:
            self._check_split("test")
            self.datasets["test"] = self._samples(self.pairs["test"], self.eval_transform)
        if stage in (None, "predict") and self.predict_root is not None and "predict" not in self.datasets:
            bad = find_corrupt_images(self.predict_images)
            if bad:
                listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
                raise DataError(
                    f"{len(bad)} unreadable image file(s) in predict_dir: {listing}. Remove or replace them"
                )
            self.predict_ids = [p.relative_to(self.predict_root).as_posix() for p in self.predict_images]
            self.datasets["predict"] = SegmentationSamples(
                self.predict_images, None, self.eval_transform, self.tasks, self.num_classes, self.ignore_value
            )

    def prediction_id(self, index: int) -> str:
        """The predicted image's path relative to the predict folder (its ``image_folder`` when it has one)."""
        return self.predict_ids[index]

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["tasks"] = [
            {"name": t["name"], "kind": t["kind"], "class_indices": t["class_indices"]} for t in self.tasks
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        mine = {t["name"]: t for t in self.tasks}
        for saved in state_dict.get("tasks", []):
            task = mine.get(saved["name"])
            if task is not None and (task["kind"], task["class_indices"]) != (saved["kind"], saved["class_indices"]):
                raise DataError(
                    f"task {saved['name']!r}: the checkpoint was trained as {saved['kind']} over class indices "
                    f"{saved['class_indices']} but this data gives {task['kind']} over {task['class_indices']}; use "
                    "the same task list to resume"
                )


def median_frequency_weights(counts: np.ndarray) -> list[float]:
    """SegNet's median frequency balancing from ``(N, C)`` per-image class pixel counts: ``median(freq) / freq_c``
    with ``freq_c`` = pixels of class c / labelled pixels of the images where c appears (median over the classes
    that appear); a class that never appears gets 1.0."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    labelled = counts.sum(1, keepdims=True)
    pixels = counts.sum(0)
    exposure = (labelled * present).sum(0)
    seen = exposure > 0
    if not seen.any():
        return [1.0] * counts.shape[1]
    freq = np.where(seen, pixels / np.where(seen, exposure, 1.0), 0.0)
    median = float(np.median(freq[seen]))
    return [float(median / f) if s else 1.0 for f, s in zip(freq, seen)]
