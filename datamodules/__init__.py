"""LightningDataModules for tlmodules: image folders, text tables, and data shipped with dependencies."""

from datamodules.builtin import SklearnDigitsDataModule
from datamodules.images import ImageFolderDataModule
from datamodules.tables import DataError
from datamodules.text import TextClassificationDataModule

__all__ = ["DataError", "ImageFolderDataModule", "SklearnDigitsDataModule", "TextClassificationDataModule"]
