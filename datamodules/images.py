"""Image classification data from folders (``<root>/<class>/<image>``), fed the way the backbone expects."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from datamodules.augment import RandomAffineBatch
from datamodules.base import ClassificationDataModule, checked_label_list, hash_json, seeded_split
from datamodules.samplers import PassSeeds
from datamodules.tables import DataError
from tlmodules.backbones import Preprocessing, resolve_preprocessing
from tlmodules.labels import IGNORE_INDEX


class ConvertMode:
    """Convert a PIL image to ``RGB`` or ``L`` (grayscale digits into an RGB network and back)."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise DataError(f"in_channels must be 1 or 3, got {channels}")
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def build_image_transform(
    preprocessing: Preprocessing | None,
    image_size: int | None = None,
    in_channels: int | None = None,
    augment: bool = False,
    hflip: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised tensor ``(C, H, W)``.

    Size: ``image_size`` (square resize) when given, else the backbone's resize-then-centre-crop
    recipe (a square resize when the backbone names no crop), else the image's own size.
    ``augment`` swaps the crop for a random resized crop (scale 0.7–1); ``hflip`` adds random
    horizontal flips (wrong for digits and text images).
    """
    pre = preprocessing or Preprocessing(kind="image")
    channels = in_channels or pre.in_channels or 3
    mean = pre.mean or (0.5,) * channels
    std = pre.std or (0.5,) * channels
    if len(mean) != channels:  # e.g. RGB statistics for a single-channel network
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    steps: list[Callable] = [ConvertMode(channels)]
    final = image_size or pre.crop_size or pre.resize_size
    if augment and final:
        steps.append(T.RandomResizedCrop(final, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True))
    elif image_size:
        steps.append(T.Resize((image_size, image_size), antialias=True))
    elif pre.resize_size and pre.crop_size:  # torchvision's recipe: shorter side, then centre crop
        steps.append(T.Resize(pre.resize_size, antialias=True))
        steps.append(T.CenterCrop(pre.crop_size))
    elif pre.resize_size:  # no crop (builtin:lenet): a square of that size, whatever the aspect ratio
        steps.append(T.Resize((pre.resize_size, pre.resize_size), antialias=True))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def find_corrupt_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Files that PIL cannot identify, whose data fails its integrity check, or that do not decode.

    ``verify`` alone passes a truncated JPEG (it checks no JPEG data), so each file is also decoded;
    JPEGs at 1/8 scale (``draft``), which still reads the whole compressed stream but costs less.
    """
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            bad.append((path, f"{type(err).__name__}: {err}"))
    return bad


class ImageSamples(Dataset):
    """``(image source, label, id)`` triples → ``{"inputs", "labels", "index"}`` dicts.

    A source is a file path or an in-memory PIL image; ``label`` is ``IGNORE_INDEX`` for an unlabelled image.

    Random transforms (``augment``, ``hflip``) draw from torch's CPU generator, as torchvision's do. Once a
    training loader has named the pass (:meth:`set_pass`, from :class:`datamodules.loaders.ResumableLoader`:
    a seed of ``(seed, epoch, cycle)``), each item's draws are seeded by ``(pass key, index)``: the same image
    whichever worker process reads it, in whatever order, and again in a resumed run. The key lives in shared
    memory, so persistent workers (copies of this dataset made once) see each new pass. Before any pass is
    named the transform draws from the global generator, as before.
    """

    def __init__(self, sources: Sequence[Any], labels: Sequence[int], transform: Callable) -> None:
        self.sources = list(sources)
        self.labels = list(labels)
        self.transform = transform
        self.seeds = PassSeeds()

    def set_pass(self, key: int) -> None:
        """Seed every item's random transform by ``(key, index)`` from now on (:class:`PassSeeds`)."""
        self.seeds.set_pass(key)

    def item_seed(self, index: int) -> int | None:
        return self.seeds.item_seed(index)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.sources[index]
        if isinstance(source, Image.Image):
            image = source
        else:
            with Image.open(source) as handle:
                image = handle.copy()
        inputs = self.seeds.apply(index, self.transform, image)
        return {"inputs": inputs, "labels": self.labels[index], "index": index}


class ImageFolderDataModule(ClassificationDataModule):
    """Images in class folders: ``train_dir/<class>/<image>``, likewise ``val_dir`` and ``test_dir``.

    Without ``val_dir`` a seeded, stratified ``val_fraction`` of the training images is held out; unset, a
    tenth from 500 training images up and none below (:attr:`held_out_fraction`).
    Class names are the training folder's sub-folders, sorted (ImageFolder's convention); a class
    folder in ``val_dir``/``test_dir`` that training lacks is an error. ``predict_dir`` may be a flat
    folder of images; predictions are identified by the image's path relative to it.

    Preprocessing comes from the backbone (``backbone``/``weights``, linked from the model in the
    CLI): channels, resize and crop, normalisation. ``image_size`` and ``in_channels`` override it.
    Every image is opened and checked once before training (``verify_images``), so a corrupt file
    fails the run at the start, not hours in. ``labels`` fixes the class list and its order (class folders
    outside it are an error); ``test``/``predict`` from a checkpoint get the checkpoint's classes this way.
    ``batch_augment`` (a :class:`RandomAffineBatch`) transforms whole training batches on their device,
    after the per-image ``augment``/``hflip``. ``group_by_class`` makes training batches that hold each of their
    classes several times (:class:`datamodules.samplers.ClassGroupedSampler`), for ``strategy: contrastive``.
    """

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        backbone: str | None = None,
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        in_channels: int | None = None,
        augment: bool = False,
        hflip: bool = False,
        val_fraction: float | None = None,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        verify_images: bool = True,
        batch_augment: RandomAffineBatch | None = None,
        labels: list[str] | None = None,
        group_by_class: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights", "batch_augment"])  # the model logs these
        self.batch_augment = batch_augment
        self.group_by_class = group_by_class
        if image_size is not None and image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.image_size, self.in_channels, self.augment, self.hflip = image_size, in_channels, augment, hflip
        self.verify_images = verify_images
        self._training_size: int | None = None
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir, "predict": predict_dir}
        for stage, folder in self.dirs.items():
            if folder is not None and not Path(folder).is_dir():
                raise DataError(f"{stage}_dir {folder} is not a folder; check the path")
        if train_dir is None and predict_dir is None and test_dir is None:
            raise DataError("give at least train_dir (or test_dir / predict_dir for evaluation and prediction)")
        if labels is not None:
            self.class_names = checked_label_list(labels, "class")
        else:
            reference = train_dir or test_dir
            role = "train_dir" if train_dir else "test_dir"
            self.class_names = self._class_folders(Path(reference), role) if reference else []
        self.use_backbone(backbone, weights)
        self.predict_ids: list[str] = []

    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        preprocessing = resolve_preprocessing(spec, weights) if isinstance(spec, str) else None
        if preprocessing is not None and preprocessing.kind != "image":
            raise DataError(f"backbone {spec} is a text model; image folders need an image backbone")
        common = {"image_size": self.image_size, "in_channels": self.in_channels}
        self.eval_transform = build_image_transform(preprocessing, **common)
        self.train_transform = build_image_transform(preprocessing, augment=self.augment, hflip=self.hflip, **common)

    def fingerprint(self, stage: str) -> str | None:
        """The stage's folder listing (relative path, size, modification time) and the eval transform.

        Train and validation drawn from ``train_dir`` share the listing; indices address its images.
        """
        source = {"val": "val" if self.dirs["val"] else "train"}.get(stage, stage)
        folder = self.dirs.get(source)
        if folder is None:
            return None
        root = Path(folder)
        listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_images(root)]
        return f"{source}:{root.resolve()}:{hash_json(listing)}:{self.eval_transform!r}"

    def training_size(self) -> int | None:
        folder = self.dirs["train"]
        if folder is None:
            return None
        if self._training_size is None:
            self._training_size = sum(len(list_images(d)) for d in Path(folder).iterdir() if d.is_dir())
        return self._training_size

    def prediction_id(self, index: int) -> str:
        """The predicted image's path relative to ``predict_dir``."""
        return self.predict_ids[index]

    @staticmethod
    def _class_folders(folder: Path, role: str) -> list[str]:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes:
            raise DataError(f"{role} {folder} has no class sub-folders; expected <{role}>/<class name>/<image files>")
        return classes

    def _labelled(self, stage: str) -> tuple[list[Path], list[int]]:
        folder = Path(self.dirs[stage])
        classes = self._class_folders(folder, f"{stage}_dir")
        unknown = sorted(set(classes) - set(self.class_names))
        if unknown:
            raise DataError(
                f"{stage}_dir {folder} has class folders {unknown} that the training data lacks "
                f"(classes: {self.class_names}); the label spaces must match"
            )
        paths, labels = [], []
        for name in classes:
            found = list_images(folder / name)
            paths += found
            labels += [self.class_names.index(name)] * len(found)
        self.check_not_empty(stage, len(paths), folder)
        return paths, labels

    def _verify(self, paths: Sequence[Path]) -> None:
        if not self.verify_images:
            return
        bad = find_corrupt_images(paths)
        if bad:
            listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"{len(bad)} unreadable image file(s): {listing}{more}. Remove or replace them")

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.dirs["train"] and "train" not in self.datasets:
            paths, labels = self._labelled("train")
            self._verify(paths)
            if self.dirs["val"]:
                val_paths, val_labels = self._labelled("val")
                self._verify(val_paths)
                self.datasets["train"] = ImageSamples(paths, labels, self.train_transform)
                self.datasets["val"] = ImageSamples(val_paths, val_labels, self.eval_transform)
            elif self.held_out_fraction > 0:
                train_idx, val_idx = seeded_split(labels, self.held_out_fraction, self.seed)
                self.datasets["train"] = Subset(ImageSamples(paths, labels, self.train_transform), train_idx)
                self.datasets["val"] = Subset(ImageSamples(paths, labels, self.eval_transform), val_idx)
            else:
                self.datasets["train"] = ImageSamples(paths, labels, self.train_transform)
        if stage in (None, "test") and self.dirs["test"] and "test" not in self.datasets:
            paths, labels = self._labelled("test")
            self._verify(paths)
            self.datasets["test"] = ImageSamples(paths, labels, self.eval_transform)
        if stage in (None, "predict") and self.dirs["predict"] and "predict" not in self.datasets:
            folder = Path(self.dirs["predict"])
            paths = list_images(folder)
            self.check_not_empty("predict", len(paths), folder)
            self._verify(paths)
            self.predict_ids = [str(p.relative_to(folder)) for p in paths]
            self.datasets["predict"] = ImageSamples(paths, [IGNORE_INDEX] * len(paths), self.eval_transform)
