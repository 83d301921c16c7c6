"""A trained tlmodules module back from its checkpoint, ready to export: eval mode, no gradients, LoRA merged."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlmodules.backbones import load_checkpoint
from tlmodules.errors import ConfigError

MODULES = ("FineTuneModule", "FeatureProbeModule", "DANNModule", "MultiTaskModule")


def module_class(checkpoint: dict[str, Any], path: str | Path) -> type:
    """The tlmodules class that wrote ``checkpoint`` (its ``tlmodules.module`` entry)."""
    import tlmodules

    name = (checkpoint.get("tlmodules") or {}).get("module")
    if name not in MODULES:
        raise ConfigError(
            f"{path} was not written by a tlmodules module (its 'tlmodules.module' entry is {name!r}); export takes "
            f"a checkpoint of {', '.join(MODULES)}, e.g. runs/<name>/version_0/checkpoints/last.ckpt"
        )
    return getattr(tlmodules, name)


def load_module(path: str | Path, checkpoint: dict[str, Any] | None = None) -> nn.Module:
    """The module a checkpoint holds, in eval mode without gradients and with any LoRA adapters merged.

    The checkpoint is read with ``weights_only=True`` (:func:`tlmodules.backbones.load_checkpoint`). Pretrained
    weights that the checkpoint overwrites are not fetched (``pretrained=False``), except for a feature probe that
    stored only its frozen backbone's spec: that backbone is rebuilt from its weights and checked against the
    digest the checkpoint records. ``checkpoint``: the file's contents when the caller has read them already.
    """
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    cls = module_class(checkpoint, path)
    saved = any(k.startswith("backbone.") for k in checkpoint.get("state_dict", {}))
    kwargs: dict[str, Any] = {"pretrained": False} if saved else {}
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot rebuild the {cls.__name__} of {path}: {err}") from err
    merge_lora(module.backbone)
    module.eval()
    module.requires_grad_(False)
    return module


def merge_lora(backbone: nn.Module) -> int:
    """Fold LoRA adapters into the weights they adapt (``W + B A · alpha / r``) and put the plain layers back, so
    that the exported network is the base architecture. Returns the number of layers merged."""
    if not getattr(backbone, "adapter_names", None):
        return 0
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, layer in list(backbone.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, layer.get_base_layer())
            merged += 1
    backbone.adapter_names = set()
    with torch.no_grad():
        leftovers = [n for n, _ in backbone.named_parameters() if "lora_" in n]
    if leftovers:
        raise RuntimeError(f"LoRA parameters left after merging: {leftovers[:3]}")
    return merged


@contextmanager
def prepared_for_export(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode without gradients, and with LoRA merged, for the length of the block; afterwards the
    caller's module is as it was (modes and ``requires_grad`` restored). A module with LoRA adapters is exported from
    a copy, because merging replaces its layers, and so is a DANNModule with ``target_batchnorm``, whose copy takes
    the target's BatchNorm statistics as its own; otherwise no copy is made (a feature probe's cache can be
    large)."""
    target_statistics = getattr(module, "target_bn", None) is not None
    if getattr(module.backbone, "adapter_names", None) or target_statistics:
        trainer = module.__dict__.get("_trainer")
        module._trainer = None  # a copy of the module, not of the Trainer it is attached to
        try:
            target = copy.deepcopy(module)
        finally:
            module._trainer = trainer
        merge_lora(target.backbone)
        if target_statistics:  # DANN with target_batchnorm: the exported model is for the target domain
            target.target_bn.adopt()
    else:
        target = module
    modes = {m: m.training for m in target.modules()}
    grads = {p: p.requires_grad for p in target.parameters()}
    target.eval()
    target.requires_grad_(False)
    try:
        yield target
    finally:
        for m, training in modes.items():
            m.training = training
        for p, needed in grads.items():
            p.requires_grad_(needed)
