"""``ckpt:<path to a .ckpt>``: the backbone of an earlier tlmodules run.

The checkpoint records how its backbone was built (:class:`BackboneOrigin`, under ``tlmodules.backbone``);
that spec is rebuilt through the registry, whatever its kind, and the checkpoint's weights are loaded into
it. The file is read with ``weights_only=True``: a checkpoint holding pickled code is refused unread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tlmodules.backbones.core import Backbone, BackboneError, BackboneOrigin, BackboneSettings, Preprocessing
from tlmodules.backbones.registry import BackboneKind, build_backbone, register_backbone_kind, resolve_preprocessing
from tlmodules.errors import MissingFileError
from tlmodules.feature_cache import tensor_digest


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; a clear error when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        raise BackboneError(
            f"cannot read checkpoint {path}: {err}. It may be truncated, not a checkpoint, or hold pickled "
            "objects that are not plain weights (which tlmodules refuses to unpickle)"
        ) from err


def checkpoint_origin(ckpt: Mapping[str, Any], path: str | Path) -> BackboneOrigin:
    """The :class:`BackboneOrigin` a tlmodules checkpoint records (an error for any other checkpoint)."""
    meta = ckpt.get("tlmodules") or {}
    origin = meta.get("backbone")
    if not origin:
        raise BackboneError(
            f"checkpoint {path} was not written by a tlmodules module with a spec backbone "
            "(no 'tlmodules.backbone' entry); it cannot serve as a backbone"
        )
    return BackboneOrigin(**origin)


def checkpoint_backbone(path: str) -> Backbone:
    """``ckpt:<path>``: rebuild the architecture recorded in a tlmodules checkpoint and load its weights."""
    ckpt = load_checkpoint(path)
    origin = checkpoint_origin(ckpt, path)
    if origin.extra.get("lora_rank"):
        raise BackboneError(
            f"checkpoint {path} holds a LoRA-adapted backbone; using it as a backbone is not supported yet"
        )
    state = {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    backbone = build_backbone(
        origin.spec,
        weights=origin.weights,
        pooling=origin.pooling,
        trust_remote_code=origin.trust_remote_code,
        pretrained=not state,  # a feature probe's checkpoint holds the spec of its frozen backbone, not the weights
    )
    if not state:
        recorded = ckpt["tlmodules"].get("backbone_digest")
        if recorded and recorded != tensor_digest(backbone):
            raise BackboneError(
                f"checkpoint {path} records a frozen {origin.spec} whose weights differ from those it resolves to now"
            )
    missing, unexpected = backbone.load_state_dict(state, strict=False) if state else ([], [])
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not match its recorded backbone {origin.spec}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    backbone.origin = origin
    return backbone


def _preprocessing(path: str, settings: BackboneSettings) -> Preprocessing | None:
    origin = checkpoint_origin(load_checkpoint(path), path)
    return resolve_preprocessing(origin.spec, origin.weights)


CKPT = register_backbone_kind(
    BackboneKind(
        name="ckpt",
        form="ckpt:<path>",
        description="the backbone of an earlier tlmodules checkpoint",
        build=lambda path, settings: checkpoint_backbone(path),
        preprocessing=_preprocessing,
    )
)
