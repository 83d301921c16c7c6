"""``torchvision:<model name>``: a torchvision classification model, its classifier removed.

Weights come from torchvision's own registry (``weights=DEFAULT``, ``IMAGENET1K_V1``, ..., or ``none``);
the state dict is deserialised with ``weights_only=True``, so a weights file cannot run code.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from tlmodules.backbones.core import (
    Backbone,
    BackboneError,
    BackboneOrigin,
    BackboneSettings,
    Preprocessing,
    block_groups,
    no_weights,
)
from tlmodules.backbones.registry import BackboneKind, register_backbone_kind

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_weights(name: str, weights: str | None) -> Any | None:
    """The ``WeightsEnum`` member ``weights`` names for model ``name`` (``None`` for no weights)."""
    from torchvision.models import get_model_weights

    if no_weights(weights):
        return None
    enum = get_model_weights(name)
    try:
        return enum[str(weights)]
    except KeyError:
        choices = ", ".join(list(enum.__members__)) + ", none"
        raise BackboneError(f"unknown weights {weights!r} for torchvision:{name}; choose one of: {choices}") from None


def _torchvision_builder(name: str) -> Any:
    from torchvision.models import get_model_builder, list_models

    try:
        return get_model_builder(name)
    except ValueError:
        import torchvision.models as tvm

        close = difflib.get_close_matches(name, list_models(module=tvm), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"torchvision has no classification model {name!r}.{hint}") from None


def torchvision_preprocessing(weight: Any | None) -> Preprocessing:
    """The eval transform torchvision attaches to ``weight`` (ImageNet statistics without weights)."""
    if weight is None:
        return Preprocessing(kind="image", in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    t = weight.transforms()
    return Preprocessing(
        kind="image",
        in_channels=3,
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def _replace_last_linear(model: nn.Module) -> int:
    """Replace the final ``nn.Linear`` (the classifier) by ``nn.Identity``; return its input width."""
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = mod_name
    if last is None:
        raise BackboneError("could not find a final nn.Linear classifier to remove")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_features = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Identity())
    return in_features


def torchvision_backbone(name: str, weights: str | None = "DEFAULT", pretrained: bool = True) -> Backbone:
    """``torchvision:<name>`` through torchvision's own model and weights registry.

    The pretrained state dict is fetched by torchvision's loader (which looks in
    ``$TORCH_HOME/hub/checkpoints/<file name of the weights' URL>`` before downloading) but
    deserialised with ``weights_only=True``. ``pretrained=False`` builds the architecture only
    (weights about to be overwritten from a checkpoint) but keeps the weights' preprocessing.
    Output features ``(B, F)``, ``F`` the input width of the removed classifier.
    """
    builder = _torchvision_builder(name)
    weight = _torchvision_weights(name, weights)
    if weight is not None and pretrained:
        import torchvision.models._api as tv_api

        safe_loader = functools.partial(torch.hub.load_state_dict_from_url, weights_only=True)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weight.url).name
        try:
            with mock.patch.object(tv_api, "load_state_dict_from_url", safe_loader):
                model = builder(weights=weight)
        except OSError as err:  # includes urllib's URLError: no network
            raise BackboneError(
                f"could not load torchvision weights {weight} for {name}: {err}. Without network access, "
                f"place the state dict at {cache} (or set TORCH_HOME), or use weights=none"
            ) from err
        except Exception as err:  # noqa: BLE001 - a corrupt file makes torch's weights-only unpickler raise
            # UnpicklingError, EOFError, IndexError, KeyError, UnicodeDecodeError, ...; a wrong one RuntimeError
            raise BackboneError(
                f"the weights file {cache} for {weight} is not a plain state dict of {name}: {err}. "
                "Delete it and fetch it again"
            ) from err
    else:
        model = builder(weights=None)
    num_features = _replace_last_linear(model)
    preprocessing = torchvision_preprocessing(weight)
    origin = BackboneOrigin(spec=f"torchvision:{name}", weights=None if weight is None else weight.name)
    return Backbone(model, num_features, block_groups(model), preprocessing, origin)


def _preprocessing(name: str, settings: BackboneSettings) -> Preprocessing:
    _torchvision_builder(name)  # an unknown model fails here, before any data is read
    return torchvision_preprocessing(_torchvision_weights(name, settings.weights))


TORCHVISION = register_backbone_kind(
    BackboneKind(
        name="torchvision",
        form="torchvision:<model name>",
        description="e.g. torchvision:resnet18, with weights=DEFAULT, IMAGENET1K_V1, ... or none",
        build=lambda name, settings: torchvision_backbone(name, settings.weights, settings.pretrained),
        preprocessing=_preprocessing,
    )
)
