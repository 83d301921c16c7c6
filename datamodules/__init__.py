"""LightningDataModules for tlmodules: image folders, text tables, CoNLL files, and data shipped with dependencies."""

from datamodules.builtin import SklearnDigitsDataModule
from datamodules.conll import ConllDataModule, align_word_labels
from datamodules.images import ImageFolderDataModule
from datamodules.tables import DataError
from datamodules.text import TextClassificationDataModule

__all__ = [
    "ConllDataModule",
    "DataError",
    "ImageFolderDataModule",
    "SklearnDigitsDataModule",
    "TextClassificationDataModule",
    "align_word_labels",
]
