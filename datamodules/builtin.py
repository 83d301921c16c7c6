"""Data that ships with the dependencies: nothing to download."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from datamodules.base import ClassificationDataModule, seeded_split
from datamodules.images import ImageSamples, build_image_transform
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
        self.backbone_spec, self.backbone_weights = backbone, weights
        self.class_names = [str(d) for d in range(10)]
        preprocessing = resolve_preprocessing(backbone, weights) if isinstance(backbone, str) else None
        self.transform = build_image_transform(preprocessing, image_size=image_size, in_channels=in_channels)
        self.test_fraction = test_fraction

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
