"""tlmodules: PyTorch Lightning modules for transfer learning."""

from tlmodules.backbones import Backbone, BackboneError, Preprocessing, build_backbone, resolve_preprocessing
from tlmodules.finetune import FineTuneModule
from tlmodules.heads import ClassificationHead

__all__ = [
    "Backbone",
    "BackboneError",
    "ClassificationHead",
    "FineTuneModule",
    "Preprocessing",
    "build_backbone",
    "resolve_preprocessing",
]
__version__ = "0.1.0"
