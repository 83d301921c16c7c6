"""MNIST → MNIST digits blended onto colour photos (the MNIST-M recipe), built from a folder of MNIST digits."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from datamodules.augment import RandomAffineBatch
from datamodules.builtin import InMemoryImageDataModule, blend_onto_photos
from datamodules.domain import DomainAdaptationDataModule
from datamodules.images import build_image_transform, list_images
from datamodules.tables import DataError
from tlmodules.backbones import resolve_preprocessing

DIGIT_CLASSES = [str(d) for d in range(10)]
DEFAULT_DIGITS_DIR = "../shared/data/digits/mnist_t10k"
# what blend_onto_photos cuts its patches from (the two photos scikit-learn installs, CC BY 2.0)
PHOTO_SOURCE = "sklearn.datasets.load_sample_images(): china.jpg, flower.jpg (CC BY 2.0, Flickr)"
LAYOUT = "<digits_dir>/<digit>/<image>.png with the 10 class folders 0 … 9 (e.g. ../shared/data/digits/mnist_t10k)"


def list_digit_files(digits_dir: str | Path) -> tuple[list[Path], list[int]]:
    """The image files of a folder of digits in class folders ``0`` … ``9``, sorted, with their digit as label."""
    root = Path(digits_dir)
    if not root.is_dir():
        raise DataError(f"digits_dir {root} is not a folder; expected {LAYOUT}")
    folders = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    missing = [name for name in DIGIT_CLASSES if name not in folders]
    unexpected = sorted(folders - set(DIGIT_CLASSES))
    if missing or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"missing class folders {missing}" if missing else "",
                f"unexpected folders {unexpected}" if unexpected else "",
            )
            if part
        )
        raise DataError(f"digits_dir {root}: {detail}; expected {LAYOUT}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(DIGIT_CLASSES):
        found = list_images(root / name)
        if not found:
            raise DataError(f"digits_dir {root}: class folder {name}/ holds no images; expected {LAYOUT}")
        paths += found
        labels += [label] * len(found)
    return paths, labels


def split_domains(
    labels: list[int], source_size: int | None, target_size: int | None, seed: int, where: str
) -> tuple[list[int], list[int]]:
    """Sorted indices of two disjoint, seeded draws of ``source_size`` and ``target_size`` samples, stratified by
    label (when each draw holds one sample per class at least); ``None``: half of the samples each."""
    from sklearn.model_selection import train_test_split

    total = len(labels)
    n_source = total // 2 if source_size is None else source_size
    n_target = total - total // 2 if target_size is None else target_size
    for name, size in (("source_size", n_source), ("target_size", n_target)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"{name} must be a positive number of digits (or unset: half of them), got {size!r}")
    if n_source + n_target > total:
        raise DataError(
            f"source_size {n_source} + target_size {n_target} = {n_source + n_target} digits, but {where} holds "
            f"{total}: the two domains use disjoint digits; ask for fewer"
        )
    counts = [labels.count(c) for c in set(labels)]
    stratified = min(counts) >= 2 and min(n_source, n_target) >= len(counts)
    source, target = train_test_split(
        list(range(total)),
        train_size=n_source,
        test_size=n_target,
        random_state=seed,
        shuffle=True,
        stratify=labels if stratified else None,
    )
    return sorted(source), sorted(target)


def load_grey(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as handle:
            images.append(handle.convert("L"))
    return images


class DigitFilesDataModule(InMemoryImageDataModule):
    """One side of :class:`DigitsOnPhotosDataModule`: in-memory images, each known by the digit file it was
    made from (``ids``: paths relative to the digits folder, also the prediction ids)."""

    def __init__(self, images, labels, ids: list[str], sources: dict[str, str], **kwargs) -> None:
        super().__init__(images, labels, DIGIT_CLASSES, **kwargs)
        self.ids = list(ids)
        self.sources = dict(sources)

    def data_sources(self) -> dict[str, str]:
        return dict(self.sources)

    def prediction_id(self, index: int) -> str:
        return self.ids[index]


class DigitsOnPhotosDataModule(DomainAdaptationDataModule):
    """MNIST → MNIST-M-style domain pair from a folder of MNIST digits (``<digits_dir>/<digit>/<image>.png``).

    Source: MNIST digits as they are (grey). Target: *other* MNIST digits of the same folder (a seeded draw,
    disjoint from the source, both stratified by class) blended onto random patches of colour photos by
    :func:`datamodules.builtin.blend_onto_photos`: ``|patch − digit|`` per channel, the recipe by which
    Ganin et al. (ICML 2015; JMLR 2016) made MNIST-M from MNIST. The digits are read and blended once, in
    ``__init__`` (the same patches for the same ``seed``), and each domain is kept in memory, transformed, and
    split seeded and stratified into train and validation (which doubles as test and predict); target labels
    serve evaluation only.

    Photos: the two that scikit-learn installs (``sklearn.datasets.load_sample_images()``: ``china.jpg`` and
    ``flower.jpg``, 427 × 640, both CC BY 2.0 from Flickr, see ``sklearn/datasets/images/README.txt``). MNIST-M
    cut its patches from the 200 training photos of BSDS500; two photos give less varied backgrounds.

    Size: 28 × 28 for ``builtin:lenet`` (the MNIST size, and MNIST-M's); otherwise the backbone's resize size
    (or ``image_size``), at which the digits are blended before the backbone's transform (e.g. a centre crop).

    Args:
        digits_dir: the digit folder, 10 class folders ``0`` … ``9`` of images (default: the 10,000 MNIST test
            digits in ``../shared/data/digits/mnist_t10k``).
        backbone, weights: decide the preprocessing (linked from the model in the CLI).
        image_size: side of the square images; ``None``: the backbone's (28 for ``builtin:lenet``).
        source_size, target_size: how many digits each domain gets (disjoint); ``None``: half of the folder each.
        val_fraction: share of each domain held out for validation (and test, and prediction).
        seed: the draw of the two domains, the validation split and the photo patches.
        batch_augment: a random transform of whole training batches of both domains (e.g.
            :class:`datamodules.augment.RandomAffineBatch`); evaluation batches are never augmented.
    """

    def __init__(
        self,
        digits_dir: str = DEFAULT_DIGITS_DIR,
        backbone: str | None = "builtin:lenet",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        source_size: int | None = None,
        target_size: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int | None = 0,
        batch_augment: RandomAffineBatch | None = None,
    ) -> None:
        if type(val_fraction) not in (int, float) or not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if image_size is not None and (type(image_size) is not int or image_size < 1):
            raise DataError(f"image_size must be a positive integer (or unset: the backbone's), got {image_size!r}")
        preprocessing = resolve_preprocessing(backbone, weights) if isinstance(backbone, str) else None
        if preprocessing is not None and preprocessing.kind != "image":
            raise DataError(f"backbone {backbone} is a text model; digits on photos need an image backbone")
        size = image_size or (preprocessing.resize_size if preprocessing and preprocessing.resize_size else 28)
        smallest = photo_side()
        if size >= smallest:
            raise DataError(
                f"image size {size} does not fit in the photos ({smallest} pixels on their shorter side) that the "
                f"patches are cut from; use an image_size below {smallest}"
            )
        paths, labels = list_digit_files(digits_dir)
        source_idx, target_idx = split_domains(labels, source_size, target_size, seed, f"digits_dir {digits_dir}")
        root = Path(digits_dir)
        ids = [p.relative_to(root).as_posix() for p in paths]
        transform = build_image_transform(preprocessing, image_size=image_size)
        common = {
            "transform": transform,
            "val_fraction": val_fraction,
            "seed": seed,
            "batch_size": batch_size,
            "num_workers": num_workers,
        }
        source = DigitFilesDataModule(
            load_grey([paths[i] for i in source_idx]),
            [labels[i] for i in source_idx],
            [ids[i] for i in source_idx],
            {"all": str(digits_dir)},
            name="mnist",
            **common,
        )
        target = DigitFilesDataModule(
            blend_onto_photos(load_grey([paths[i] for i in target_idx]), size, seed),
            [labels[i] for i in target_idx],
            [ids[i] for i in target_idx],
            {"all": f"{digits_dir} on photos", "photos": PHOTO_SOURCE},  # run tables: mnist_t10k → … on photos
            name="mnist-on-photos",
            **common,
        )
        source.batch_augment = target.batch_augment = batch_augment
        super().__init__(source, target)
        self.save_hyperparameters(ignore=["backbone", "weights", "batch_augment"])
        self.backbone_spec, self.backbone_weights = backbone, weights


def photo_side() -> int:
    """The shorter side of the smallest photo :func:`blend_onto_photos` cuts patches from."""
    from sklearn.datasets import load_sample_images

    return min(min(p.shape[:2]) for p in load_sample_images().images)
