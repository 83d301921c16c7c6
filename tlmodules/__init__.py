"""tlmodules: PyTorch Lightning modules for transfer learning."""

from tlmodules.backbones import Backbone, BackboneError, Preprocessing, build_backbone, resolve_preprocessing
from tlmodules.finetune import FineTuneModule
from tlmodules.heads import ClassificationHead
from tlmodules.probe import FeatureProbeModule

__all__ = [
    "Backbone",
    "BackboneError",
    "ClassificationHead",
    "FeatureProbeModule",
    "FineTuneModule",
    "Preprocessing",
    "build_backbone",
    "resolve_preprocessing",
]
__version__ = "0.1.0"
