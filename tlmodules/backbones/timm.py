"""``timm:<model name>``: an image model from PyTorch Image Models (timm) as a feature extractor.

The model is created by ``timm.create_model(name, pretrained=..., num_classes=0)``: with no classifier,
its forward pass returns the pooled pre-logits features ``(B, F)``, ``F = model.head_hidden_size``
(``model.num_features``, the last feature map's channels, where the model has no hidden head layer).
Wightman, "PyTorch Image Models", https://github.com/huggingface/pytorch-image-models.

- ``weights``: ``DEFAULT`` (the model's default pretrained tag), one of its pretrained tags (e.g.
  ``c3_in1k`` for ``resnet10t``; a spec may also carry one: ``timm:resnet10t.c3_in1k``), a local
  ``.safetensors`` / ``.pth`` file (for machines without network), or ``none`` (random initialisation).
- preprocessing: the pretrained config's eval recipe (``timm.data.resolve_data_config``): ``input_size``
  gives the channels and crop, ``crop_pct`` the resize (``floor(crop / crop_pct)``, timm's ``center`` crop
  mode), and ``mean``/``std``. It is read from timm's registry: nothing is downloaded or built for it.
- layer groups: the model's own ``group_matcher(coarse=True)`` (the grouping timm's layer-wise decay uses,
  stages for CNNs, blocks for ViTs), ordered input side → output side.

Weights never unpickle code: timm reads ``.safetensors`` with safetensors and other files with
``torch.load(weights_only=True)``; every ``torch.load`` during the build is forced to ``weights_only=True``
as well, whatever the installed timm version does.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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
from tlmodules.backbones.huggingface import offline_hub
from tlmodules.backbones.registry import BackboneKind, register_backbone_kind
from tlmodules.errors import MissingFileError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def import_timm(spec: str) -> ModuleType:
    """The ``timm`` package, or a :class:`BackboneError` saying how to install it (it is an optional extra)."""
    try:
        import timm
    except ImportError as err:
        raise BackboneError(
            f"the backbone {spec} needs the timm package: pip install timm (or pip install 'tlmodules[timm]')"
        ) from err
    return timm


@dataclass(frozen=True)
class TimmWeights:
    """Where a timm backbone's weights come from.

    Attributes:
        arch: the architecture name (``resnet10t``).
        tag: the pretrained tag whose config gives the preprocessing (and whose weights ``source="tag"``
            loads); ``None`` for an architecture without pretrained configs.
        source: ``"tag"`` (timm's own source: the Hugging Face hub or a URL), ``"file"`` or ``"none"``.
        file: the local weights file (``source="file"``), absolute.
    """

    arch: str
    tag: str | None
    source: str
    file: Path | None = None

    @property
    def cfg_name(self) -> str:
        """``arch.tag``, the name timm's registry and ``create_model`` resolve the pretrained config by."""
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def recorded(self) -> str | None:
        """What the backbone's origin records as ``weights``: the concrete tag, the file, or ``None``."""
        return {"tag": self.tag, "file": None if self.file is None else str(self.file)}.get(self.source)


def _is_file_name(weights: str) -> bool:
    return weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in weights or os.sep in weights


def resolve_timm_weights(timm: ModuleType, name: str, weights: str | None) -> TimmWeights:
    """Check ``name`` (``arch`` or ``arch.tag``) and ``weights`` against timm's registry, reading no file."""
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, split_model_name_tag

    arch, name_tag = split_model_name_tag(name)
    if not arch:
        raise BackboneError("a timm backbone needs a model name: timm:<model name>, e.g. timm:resnet50")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(f'timm:{c}' for c in close)}?" if close else ""
        raise BackboneError(f"timm has no model {name!r}.{hint} timm.list_models() lists them all")
    tags = [full.partition(".")[2] for full in get_arch_pretrained_cfgs(arch)]
    if name_tag and name_tag not in tags:
        raise BackboneError(f"timm:{arch} has no pretrained tag {name_tag!r}; its tags: {', '.join(tags) or 'none'}")
    default = get_pretrained_cfg(name)
    tag = name_tag or (default.tag if default is not None else None) or None
    if no_weights(weights):
        return TimmWeights(arch, tag, "none")
    text = str(weights)
    if text.upper() == "DEFAULT":
        if not tags:
            raise BackboneError(f"timm:{arch} has no pretrained weights; use weights=none or weights=<file>")
        return TimmWeights(arch, tag, "tag")
    if _is_file_name(text):
        return TimmWeights(arch, tag, "file", Path(text).expanduser().resolve())
    if text in tags and (not name_tag or text == name_tag):
        return TimmWeights(arch, text, "tag")
    choices = ", ".join(tags) if not name_tag else name_tag
    raise BackboneError(
        f"unknown weights {text!r} for timm:{name}; choose DEFAULT, a pretrained tag ({choices}), "
        "a path to a .safetensors or .pth file, or none"
    )


def timm_preprocessing(pretrained_cfg: Mapping[str, Any]) -> Preprocessing:
    """Our :class:`Preprocessing` for a timm pretrained config (a ``PretrainedCfg`` as a dict).

    timm's eval transform (``timm.data.transforms_factory.transforms_imagenet_eval``, crop mode
    ``center``) resizes the shorter side to ``floor(crop / crop_pct)`` and centre-crops ``crop``: the
    torchvision recipe the datamodules apply. Square inputs: ``crop`` is the last side of ``input_size``.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    channels, _, crop = config["input_size"]
    crop_pct = config.get("crop_pct") or 1.0
    return Preprocessing(
        kind="image",
        in_channels=int(channels),
        resize_size=math.floor(crop / crop_pct),
        crop_size=int(crop),
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
    )


def _pretrained_cfg(weights: TimmWeights) -> dict[str, Any]:
    from timm.models import PretrainedCfg, get_pretrained_cfg

    cfg = get_pretrained_cfg(weights.cfg_name)
    return (cfg or PretrainedCfg()).to_dict()  # an architecture without configs gets timm's defaults


def timm_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by the model's ``group_matcher(coarse=True)``, input side → output side.

    ``timm.models.group_parameters`` numbers the groups by the matcher's ordinals (stem, then stages or
    blocks in order; unmatched parameters such as a final norm come last). Models without a matcher fall
    back to :func:`~tlmodules.backbones.core.block_groups`.
    """
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    try:
        spec = matcher(coarse=True) if matcher is not None else None
    except (NotImplementedError, TypeError):
        spec = None
    if not spec:
        return block_groups(model)
    grouped = group_parameters(model, spec)
    return [list(grouped[key]) for key in sorted(grouped)]


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[list[Any]]:
    """Inside: ``torch.load`` always runs with ``weights_only=True``, and timm's ``load_pretrained`` reports
    what it loaded. timm drops the classifier from the weights and loads the rest with ``strict=False`` when
    ``num_classes`` differs from the pretrained one (always here: 0), so a file of another model would load
    silently into nothing; the yielded list receives each ``load_state_dict`` result to check instead."""
    import timm.models._builder as builder

    results: list[Any] = []
    load = torch.load

    @functools.wraps(load)
    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return load(*args, **kwargs)

    original = getattr(builder, "load_pretrained", None)

    def recording_load_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plain = model.load_state_dict

        def record(*a: Any, **k: Any) -> Any:
            result = plain(*a, **k)
            results.append(result)
            return result

        with mock.patch.object(model, "load_state_dict", record):
            return original(model, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "load", safe_load))
        if original is not None:
            stack.enter_context(mock.patch.object(builder, "load_pretrained", recording_load_pretrained))
        yield results


def _where_to_put(weights: TimmWeights, cfg: Mapping[str, Any]) -> str:
    """Where timm looks for the weights of ``weights.cfg_name``, as advice for a machine without network."""
    from huggingface_hub import constants

    if cfg.get("hf_hub_id"):
        return (
            f"fetch them where there is network (hf download {cfg['hf_hub_id']}) into the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} (set HF_HOME to move it), or save the weights file anywhere and pass "
            "weights=<path to the .safetensors or .pth file>, or use weights=none"
        )
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(cfg.get("url") or "<file>")).name
    return (
        f"place the file at {cache} (or set TORCH_HOME), or pass weights=<path to the .safetensors or .pth file>, "
        "or use weights=none"
    )


def _create(timm: ModuleType, weights: TimmWeights, load: bool) -> nn.Module:
    """``timm.create_model`` without classifier; with ``load``, the weights of ``weights`` loaded and checked."""
    if not load:
        return timm.create_model(weights.cfg_name, pretrained=False, num_classes=0)
    overlay = {"pretrained_cfg_overlay": {"file": str(weights.file)}} if weights.source == "file" else {}
    cfg = _pretrained_cfg(weights)
    what = f"the weights file {weights.file}" if weights.source == "file" else f"the weights of timm:{weights.cfg_name}"
    try:
        with offline_hub(), _weights_only_loading() as results:
            model = timm.create_model(weights.cfg_name, pretrained=True, num_classes=0, **overlay)
    except OSError as err:  # no network, not in the cache (huggingface_hub's errors and urllib's URLError)
        if weights.source == "file":
            raise BackboneError(f"cannot read {what}: {err}") from err
        reason = str(err).rstrip(".")
        raise BackboneError(
            f"could not load {what}: {reason}. Without network access, {_where_to_put(weights, cfg)}"
        ) from err
    except Exception as err:  # noqa: BLE001 - safetensors and torch's weights-only unpickler raise many types
        advice = "" if weights.source == "file" else ". Delete the cached file and fetch it again, or use weights=none"
        raise BackboneError(f"{what} is not a plain state dict of timm:{weights.arch}: {err}{advice}") from err
    missing = [key for result in results for key in result.missing_keys]
    if missing:
        raise BackboneError(
            f"{what} does not fit timm:{weights.arch}: it lacks {len(missing)} of the model's tensors "
            f"(e.g. {missing[:3]}); is it the state dict of another model?"
        )
    return model


def timm_backbone(name: str, weights: str | None = "DEFAULT", pretrained: bool = True) -> Backbone:
    """``timm:<name>``: a timm model without its classifier; features ``(B, F)``.

    ``pretrained=False`` builds the architecture only (weights about to be overwritten from a
    checkpoint) but keeps the pretrained config's preprocessing.
    """
    timm = import_timm(f"timm:{name}")
    resolved = resolve_timm_weights(timm, name, weights)
    load = pretrained and resolved.source != "none"
    if load and resolved.file is not None and not resolved.file.is_file():
        raise MissingFileError(f"timm weights file {resolved.file} does not exist; check the path")
    model = _create(timm, resolved, load)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    # the architecture's own config even without weights: a ViT's position embeddings fix its input size
    preprocessing = timm_preprocessing(model.pretrained_cfg)
    origin = BackboneOrigin(spec=f"timm:{name}", weights=resolved.recorded)
    return Backbone(model, int(width), timm_groups(model), preprocessing, origin)


def _preprocessing(name: str, settings: BackboneSettings) -> Preprocessing:
    timm = import_timm(f"timm:{name}")
    return timm_preprocessing(_pretrained_cfg(resolve_timm_weights(timm, name, settings.weights)))


TIMM = register_backbone_kind(
    BackboneKind(
        name="timm",
        form="timm:<model name>",
        description=(
            "e.g. timm:resnet50, with weights=DEFAULT, a pretrained tag, a .safetensors/.pth file or none; "
            "needs pip install timm"
        ),
        build=lambda name, settings: timm_backbone(name, settings.weights, settings.pretrained),
        preprocessing=_preprocessing,
    )
)
