"""tlmodules: PyTorch Lightning modules for transfer learning."""

from tlmodules.backbones import Backbone, BackboneError, Preprocessing, build_backbone, resolve_preprocessing
from tlmodules.base import NonFiniteLossError
from tlmodules.dann import DANNModule
from tlmodules.finetune import FineTuneModule
from tlmodules.heads import ClassificationHead
from tlmodules.multitask import MultiTaskModule
from tlmodules.probe import FeatureProbeModule

__all__ = [
    "Backbone",
    "BackboneError",
    "ClassificationHead",
    "DANNModule",
    "FeatureProbeModule",
    "FineTuneModule",
    "MultiTaskModule",
    "NonFiniteLossError",
    "Preprocessing",
    "build_backbone",
    "resolve_preprocessing",
]
__version__ = "0.1.0"
