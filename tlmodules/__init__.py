"""tlmodules: PyTorch Lightning modules for transfer learning."""

from tlmodules.alignment import ConditionalDomainAdversarialLoss, DomainAdversarialLoss
from tlmodules.backbones import Backbone, BackboneError, Preprocessing, build_backbone, resolve_preprocessing
from tlmodules.base import NonFiniteLossError, ParamGroup, TransferModule
from tlmodules.classification import ClassificationMixin
from tlmodules.dann import DANNModule
from tlmodules.finetune import FineTuneModule
from tlmodules.heads import ClassificationHead
from tlmodules.multitask import MultiTaskModule
from tlmodules.probe import FeatureProbeModule

__all__ = [
    "Backbone",
    "BackboneError",
    "ClassificationHead",
    "ClassificationMixin",
    "ConditionalDomainAdversarialLoss",
    "DomainAdversarialLoss",
    "DANNModule",
    "FeatureProbeModule",
    "FineTuneModule",
    "MultiTaskModule",
    "NonFiniteLossError",
    "ParamGroup",
    "Preprocessing",
    "build_backbone",
    "TransferModule",
    "resolve_preprocessing",
]
__version__ = "0.1.0"
