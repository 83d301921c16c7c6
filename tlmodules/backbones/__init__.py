"""The backbone seam: every technique gets its feature extractor from here and nowhere else.

A backbone maps inputs to a feature tensor ``(B, num_features)``, knows its layer groups (input side →
output side) and, where the source knows it, its preprocessing. Specs are ``<kind>:<rest>``, one
registered :class:`BackboneKind` per kind (:mod:`tlmodules.backbones.registry`)::

    torchvision:<model name>        + weights=DEFAULT | IMAGENET1K_V1 | ... | none        (torchvision.py)
    hf:<hub id or local folder>     + pooling=mean | cls | max, trust_remote_code=False   (huggingface.py)
    pkg:<python package>/<folder>   a Hugging Face model folder shipped inside an installed package
    ckpt:<path to a .ckpt>          the backbone of an earlier tlmodules run (loaded weights_only)  (checkpoint.py)
    builtin:lenet                   small networks for small images, trained from scratch  (builtin.py)
    timm:<model name>               + weights=DEFAULT | <pretrained tag> | <file> | none; pip install timm  (timm.py)
    an nn.Module                    from Python, with ``num_features`` given or as an attribute

Weights are always loaded without unpickling code: torchvision state dicts with ``weights_only=True``,
Hugging Face models through safetensors (or transformers' own ``weights_only`` loader), timm weights
through safetensors or ``weights_only=True``, tlmodules checkpoints with ``weights_only=True``.
"""

from __future__ import annotations

# The kind modules register themselves on import, in the order the error listing shows them (torchvision
# first: messages and tests read "accepted backbone specs: 'torchvision:..."), so the order is kept by hand.
# isort: off
from tlmodules.backbones import torchvision, huggingface, checkpoint, builtin, timm  # noqa: F401

# isort: on
from tlmodules.backbones.builtin import BUILTIN_PREPROCESSING, builtin_backbone
from tlmodules.backbones.checkpoint import checkpoint_backbone, checkpoint_origin, load_checkpoint
from tlmodules.backbones.core import (
    Backbone,
    BackboneError,
    BackboneOrigin,
    BackboneSettings,
    Preprocessing,
    TransformerBackbone,
    block_groups,
    no_weights,
    origin_dict,
)
from tlmodules.backbones.huggingface import hf_backbone, package_folder
from tlmodules.backbones.registry import (
    BackboneKind,
    accepted_forms,
    backbone_kinds,
    build_backbone,
    register_backbone_kind,
    resolve_preprocessing,
    spec_kind,
    unregister_backbone_kind,
)
from tlmodules.backbones.timm import timm_backbone, timm_preprocessing
from tlmodules.backbones.torchvision import torchvision_backbone, torchvision_preprocessing

__all__ = [
    "BUILTIN_PREPROCESSING",
    "Backbone",
    "BackboneError",
    "BackboneKind",
    "BackboneOrigin",
    "BackboneSettings",
    "Preprocessing",
    "TransformerBackbone",
    "accepted_forms",
    "backbone_kinds",
    "block_groups",
    "build_backbone",
    "builtin_backbone",
    "checkpoint_backbone",
    "checkpoint_origin",
    "hf_backbone",
    "load_checkpoint",
    "no_weights",
    "origin_dict",
    "package_folder",
    "register_backbone_kind",
    "resolve_preprocessing",
    "spec_kind",
    "timm_backbone",
    "timm_preprocessing",
    "torchvision_backbone",
    "torchvision_preprocessing",
    "unregister_backbone_kind",
]
