"""Data that ships with the dependencies: nothing to download."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from datamodules.augment import RandomAffineBatch
from datamodules.base import ClassificationDataModule, seeded_split
from datamodules.domain import DomainAdaptationDataModule
from datamodules.images import ImageSamples, build_image_transform
from datamodules.tables import DataError
from tlmodules.backbones import resolve_preprocessing


def sklearn_digit_images() -> tuple[list[Image.Image], list[int]]:
    """scikit-learn's ``load_digits()`` (1,797 UCI optdigits, 8×8, values 0–16) as 8-bit grayscale PIL images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels], digits.target.tolist()


class SklearnDigitsDataModule(ClassificationDataModule):
    """The 1,797 digits of scikit-learn's ``load_digits()``, split seeded and stratified into
    train / validation / test, resized and converted to what the backbone expects
    (``builtin:lenet``: 3 × 28 × 28)."""

    def __init__(
        self,
        backbone: str | None = "builtin:lenet",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        in_channels: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int | None = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters(ignore=["backbone", "weights"])  # the model logs these
        self.class_names = [str(d) for d in range(10)]
        self.image_size, self.in_channels = image_size, in_channels
        self.test_fraction = test_fraction
        self.use_backbone(backbone, weights)

    def _apply_backbone(self) -> None:
        spec, weights = self.backbone_spec, self.backbone_weights
        preprocessing = resolve_preprocessing(spec, weights) if isinstance(spec, str) else None
        self.transform = build_image_transform(preprocessing, image_size=self.image_size, in_channels=self.in_channels)

    def has_split(self, stage: str) -> bool:
        return stage in ("train", "val", "test", "predict")  # all drawn from load_digits() (val: 1 sample at least)

    def data_sources(self) -> dict[str, str]:
        return {"all": "sklearn.datasets.load_digits()"}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, labels = sklearn_digit_images()
        dataset = ImageSamples(images, labels, self.transform)
        rest, test = seeded_split(labels, self.test_fraction, self.seed)
        rest_labels = [labels[i] for i in rest]
        train, val = seeded_split(rest_labels, self.val_fraction / (1 - self.test_fraction), self.seed)
        self.datasets = {
            "train": Subset(dataset, [rest[i] for i in train]),
            "val": Subset(dataset, [rest[i] for i in val]),
            "test": Subset(dataset, test),
            "predict": Subset(dataset, test),
        }

    def fingerprint(self, stage: str) -> str | None:
        """scikit-learn's digits are fixed per scikit-learn version; indices address ``load_digits()``."""
        import sklearn

        return f"sklearn-digits:{sklearn.__version__}:{self.transform!r}"

    def prediction_id(self, index: int) -> str:
        return f"load_digits[{index}]"


def blend_onto_photos(digits: list[Image.Image], size: int, seed: int) -> list[Image.Image]:
    """The MNIST-M recipe (Ganin & Lempitsky, ICML 2015) on scikit-learn's own photos.

    Each digit is resized to ``size × size``; a random ``size × size`` patch is cut from one of
    scikit-learn's ``load_sample_images()`` photos; the result is ``|patch − digit|`` per channel,
    so the digit shows as an inverted stroke on a colourful background.
    """
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    blended = []
    for digit in digits:
        stroke = np.asarray(digit.resize((size, size), Image.BILINEAR), dtype=np.float32)[..., None] / 255.0
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - size)
        left = rng.integers(photo.shape[1] - size)
        patch = photo[top : top + size, left : left + size]
        blended.append(Image.fromarray((np.abs(patch - stroke) * 255).astype(np.uint8), mode="RGB"))
    return blended


class PreparedImages(Dataset):
    """Every item of a deterministic image dataset transformed once, up front (small in-memory sets)."""

    def __init__(self, dataset: Dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class InMemoryImageDataModule(ClassificationDataModule):
    """Images already in memory with labels, split seeded and stratified into train / validation
    (the validation split doubles as the test and predict split). Used to compose the embedded domain pair."""

    def __init__(
        self,
        images: list[Image.Image],
        labels: list[int],
        class_names: list[str],
        transform,
        val_fraction: float,
        seed: int,
        batch_size: int,
        num_workers: int | None,
        name: str,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.class_names = list(class_names)
        self.transform = transform
        dataset = PreparedImages(ImageSamples(images, labels, transform))
        train, val = seeded_split(labels, val_fraction, seed)
        held_out = Subset(dataset, val)  # validation, test and prediction: the same held-out images
        self.datasets = {"train": Subset(dataset, train), "val": held_out, "test": held_out, "predict": held_out}
        self.name = name

    def setup(self, stage: str | None = None) -> None:
        return None

    def data_sources(self) -> dict[str, str]:
        return {"all": self.name}

    def prediction_id(self, index: int) -> str:
        return f"{self.name}[{index}]"


class DigitsDomainDataModule(DomainAdaptationDataModule):
    """An embedded domain-adaptation pair, nothing to download.

    Source: scikit-learn's ``load_digits()`` as grayscale images. Target: *other* digits of the same
    set (a seeded, disjoint half) blended onto random patches of scikit-learn's two sample photos
    (:func:`blend_onto_photos`, the recipe by which MNIST-M was made from MNIST). Each domain is split
    seeded and stratified into train and validation; target labels serve evaluation only.

    Args:
        target_fraction: share of the 1,797 digits that become the target domain.
        val_fraction: share of each domain held out for validation (and test).
        batch_augment: a random transform of whole training batches of both domains (e.g.
            :class:`datamodules.augment.RandomAffineBatch`); evaluation batches are never augmented.
    """

    def __init__(
        self,
        backbone: str | None = "builtin:lenet",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        target_fraction: float = 0.5,
        val_fraction: float = 0.3,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int | None = 0,
        batch_augment: RandomAffineBatch | None = None,
    ) -> None:
        if not 0.0 < target_fraction < 1.0:
            raise DataError(f"target_fraction must be in (0, 1), got {target_fraction}")
        images, labels = sklearn_digit_images()
        source_idx, target_idx = seeded_split(labels, target_fraction, seed)
        preprocessing = resolve_preprocessing(backbone, weights) if isinstance(backbone, str) else None
        transform = build_image_transform(preprocessing, image_size=image_size)
        size = image_size or (preprocessing.resize_size if preprocessing and preprocessing.resize_size else 28)
        names = [str(d) for d in range(10)]
        common = {"val_fraction": val_fraction, "seed": seed, "batch_size": batch_size, "num_workers": num_workers}
        source = InMemoryImageDataModule(
            [images[i] for i in source_idx], [labels[i] for i in source_idx], names, transform, name="digits", **common
        )
        target_images = blend_onto_photos([images[i] for i in target_idx], size, seed)
        target = InMemoryImageDataModule(
            target_images, [labels[i] for i in target_idx], names, transform, name="digits-on-photos", **common
        )
        source.batch_augment = target.batch_augment = batch_augment
        super().__init__(source, target)
        self.save_hyperparameters(ignore=["backbone", "weights", "batch_augment"])
        self.backbone_spec, self.backbone_weights = backbone, weights
