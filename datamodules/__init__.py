"""LightningDataModules: images, segmentation masks, text tables, CoNLL files, domain pairs, and data shipped with
dependencies."""

from datamodules.augment import RandomAffineBatch
from datamodules.builtin import DigitsDomainDataModule, SklearnDigitsDataModule
from datamodules.conll import ConllDataModule, align_word_labels
from datamodules.domain import DomainAdaptationDataModule
from datamodules.images import ImageFolderDataModule
from datamodules.multitask import MultiTaskDataModule
from datamodules.photo_digits import DigitsOnPhotosDataModule
from datamodules.segmentation import SegmentationDataModule
from datamodules.tables import DataError
from datamodules.text import TextClassificationDataModule

__all__ = [
    "RandomAffineBatch",
    "ConllDataModule",
    "DataError",
    "DigitsDomainDataModule",
    "DigitsOnPhotosDataModule",
    "DomainAdaptationDataModule",
    "ImageFolderDataModule",
    "MultiTaskDataModule",
    "SegmentationDataModule",
    "SklearnDigitsDataModule",
    "TextClassificationDataModule",
    "align_word_labels",
]
