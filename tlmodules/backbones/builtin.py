"""``builtin:<name>``: small networks for small images, trained from scratch (no pretrained weights)."""

from __future__ import annotations

from tlmodules.backbones.core import (
    Backbone,
    BackboneError,
    BackboneOrigin,
    BackboneSettings,
    Preprocessing,
    param_names,
)
from tlmodules.backbones.registry import BackboneKind, accepted_forms, register_backbone_kind
from tlmodules.nets import LeNetFeatures

BUILTIN_PREPROCESSING = {
    "lenet": Preprocessing(kind="image", in_channels=3, resize_size=28, mean=(0.5,) * 3, std=(0.5,) * 3),
}


def _unknown(name: str) -> BackboneError:
    return BackboneError(f"{accepted_forms()}; got builtin:{name}")


def builtin_backbone(name: str) -> Backbone:
    """``builtin:<name>``: small networks for small images, randomly initialised.

    ``lenet``: two conv blocks (the two layer groups), 28×28 inputs → features ``(B, 768)``.
    """
    if name == "lenet":
        net = LeNetFeatures(in_channels=3, dropout=0.5)
        groups = [param_names(net.conv1, "conv1."), param_names(net.conv2, "conv2.")]
        return Backbone(net, net.num_features, groups, BUILTIN_PREPROCESSING[name], BackboneOrigin(f"builtin:{name}"))
    raise _unknown(name)


def _preprocessing(name: str, settings: BackboneSettings) -> Preprocessing:
    if name not in BUILTIN_PREPROCESSING:
        raise _unknown(name)
    return BUILTIN_PREPROCESSING[name]


BUILTIN = register_backbone_kind(
    BackboneKind(
        name="builtin",
        form="builtin:<name>",
        description=f"one of {sorted(BUILTIN_PREPROCESSING)}",
        build=lambda name, settings: builtin_backbone(name),
        preprocessing=_preprocessing,
    )
)
