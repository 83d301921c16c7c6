"""What every backbone kind shares: the :class:`Backbone` module, its preprocessing and origin records,
the settings a kind is built with, the error type, and the generic layer grouping.

A backbone maps inputs to a feature tensor ``(B, num_features)``. It knows an ordered list of layer
groups (input side → output side) used for unfreezing and layer-wise learning rates, and, where the
source knows it, its preprocessing (torchvision and timm weights carry their eval transforms; Hugging
Face models carry a tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tlmodules.errors import ConfigError, UserError
from tlmodules.pooling import get_pooling


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


@dataclass(frozen=True)
class BackboneSettings:
    """The model arguments a backbone kind may read (each kind reads those that apply to it).

    Attributes:
        weights: which pretrained weights (``DEFAULT``, a source's own weights name, a file, or ``none``).
        pooling: ``mean`` | ``cls`` | ``max``, how sequence models pool token states.
        trust_remote_code: let a Hugging Face repository run its own code (off unless asked).
        pretrained: load the pretrained weights; ``False`` builds the architecture (and keeps the
            preprocessing) for weights that a checkpoint is about to overwrite.
    """

    weights: str | None = "DEFAULT"
    pooling: str = "mean"
    trust_remote_code: bool = False
    pretrained: bool = True


def no_weights(weights: str | None) -> bool:
    """Whether ``weights`` asks for a random initialisation (``none``, ``null``, ``random``, empty or ``None``)."""
    return weights is None or str(weights).lower() in {"", "none", "null", "random"}


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


# the tokenizer's tensors a Hugging Face encoder takes (a batch may also carry ``document``, which it does not)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TransformerBackbone(Backbone):
    """A Hugging Face encoder whose token states are pooled into one vector per sequence.

    ``inputs`` is the tokenizer's batch: ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``
    and optionally ``token_type_ids``; output ``(B, hidden_size)``, each sequence's token states pooled by
    ``pooling`` (``mean`` | ``cls`` | ``max``, :mod:`tlmodules.pooling`).

    Documents cut into windows (``TextClassificationDataModule(long_text="chunks")``) come as ``W`` window
    rows plus ``document`` ``(W,)``, the position ``0 … B-1`` of each window's document in the batch. Each
    window is pooled as above, then the windows of a document are combined with the same operator, so the
    output is ``(B, hidden_size)``, one row per document in document order: ``max``, the maximum over the
    document's windows (the maximum over all its tokens); ``mean``, the windows weighted by their token
    counts (the mean over all its tokens, a token in two overlapping windows counted twice); ``cls``, the
    mean of the windows' ``[CLS]`` states.

    A batch of long documents can hold hundreds of windows, and the activations a backward pass keeps grow
    with them, enough to exhaust a machine's memory. So the windows are encoded
    ``windows_per_pass`` rows at a time; while the encoder trains, each slice runs under activation
    checkpointing (:func:`torch.utils.checkpoint.checkpoint`), which keeps only its pooled ``(w, F)`` output
    and recomputes the slice in the backward pass: memory follows ``windows_per_pass``, not the batch's
    windows, for one more forward pass of the slices. Batches of at most ``windows_per_pass`` windows run as
    one pass, as before.

    :meth:`use_hidden_layers` takes the features from the last ``n`` layers instead of the last one.
    """

    def __init__(self, *args: Any, pooling: str = "mean", windows_per_pass: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pooling = pooling
        self._pool = get_pooling(pooling)
        self.windows_per_pass = windows_per_pass
        self.hidden_size = self.num_features
        self.hidden_layers = 1

    def use_hidden_layers(self, count: int) -> None:
        """Features from the last ``count`` hidden layers side by side, ``(B, count · hidden_size)``: the
        feature-based approach of the BERT paper (Devlin et al., NAACL 2019, §5.3: the last four layers
        concatenated were its best frozen features for NER). Earlier layers keep more of the words themselves,
        which a frozen sentence encoder's last layer has pooled away. Each layer is pooled by itself (a
        document's windows combined as usual) and its pooled vector L2-normalised, so that no layer outweighs
        the others by scale (all-MiniLM-L6-v2's last layer has about a third of the norm of the ones below
        it). :meth:`forward_tokens` gives the layers' token states side by side, unnormalised. ``count`` counts
        the embedding output as a layer too."""
        depth = getattr(getattr(self.body, "config", None), "num_hidden_layers", None)
        if count < 1 or (depth is not None and count > depth + 1):
            raise ConfigError(
                f"hidden_layers must be between 1 and {depth + 1 if depth is not None else 'the model depth'} "
                f"(the encoder's layers plus its embeddings), got {count}; 4 is the BERT paper's choice"
            )
        self.hidden_layers = count
        self.num_features = self.hidden_size * count

    def forward_tokens(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Per-token features ``(B, T, hidden_size · hidden_layers)`` (per window row when ``inputs`` has
        ``document``)."""
        encoder = {k: v for k, v in inputs.items() if k in ENCODER_INPUTS}
        if self.hidden_layers == 1:
            return self.body(**encoder).last_hidden_state
        states = self.body(**encoder, output_hidden_states=True).hidden_states
        return torch.cat(states[-self.hidden_layers :], dim=-1)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        mask = inputs["attention_mask"]
        document = inputs.get("document")
        if document is None:
            pooled = self._pool_part(inputs)
        else:
            pooled = self.combine_windows(self.pooled_windows(inputs), mask.sum(1), document, self.pooling)
        if self.hidden_layers == 1:
            return pooled
        # each layer normalised once per document (after its windows are combined), not per window
        layers = pooled.split(self.hidden_size, dim=-1)
        return torch.cat([nn.functional.normalize(layer, dim=-1) for layer in layers], dim=-1)

    def pooled_windows(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Each window row pooled, ``(W, num_features)`` (with several layers, each unnormalised), encoded
        ``windows_per_pass`` rows at a time (see the class docstring)."""
        rows = inputs["attention_mask"].shape[0]
        if rows <= self.windows_per_pass:
            return self._pool_part(inputs)
        encoder = {k: v for k, v in inputs.items() if k in ENCODER_INPUTS}
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.body.parameters())
        parts = []
        for start in range(0, rows, self.windows_per_pass):
            part = {k: v[start : start + self.windows_per_pass] for k, v in encoder.items()}
            if training:
                parts.append(checkpoint(self._pool_part, part, use_reentrant=False))
            else:
                parts.append(self._pool_part(part))
        return torch.cat(parts)

    def _pool_part(self, part: Mapping[str, Tensor]) -> Tensor:
        # mean, max and cls pool each feature alone, so several layers side by side are pooled layer by layer
        return self._pool(self.forward_tokens(part), part["attention_mask"])

    @staticmethod
    def combine_windows(pooled: Tensor, window_tokens: Tensor, document: Tensor, pooling: str) -> Tensor:
        """Pooled windows ``(W, F)`` → pooled documents ``(B, F)``: ``window_tokens`` ``(W,)`` real tokens per
        window, ``document`` ``(W,)`` each window's document ``0 … B-1``; ``pooling`` as in the class docstring.
        Computed in float32, returned in ``pooled``'s dtype."""
        documents = int(document.max()) + 1
        values = pooled.float()
        out = values.new_zeros(documents, values.shape[1])
        if pooling == "max":
            index = document.unsqueeze(1).expand_as(values)
            return out.scatter_reduce(0, index, values, reduce="amax", include_self=False).to(pooled.dtype)
        weights = window_tokens.float() if pooling == "mean" else torch.ones_like(document, dtype=torch.float32)
        totals = out.index_add(0, document, values * weights.unsqueeze(1))
        norms = values.new_zeros(documents).index_add(0, document, weights)
        return (totals / norms.clamp_min(1e-9).unsqueeze(1)).to(pooled.dtype)


def origin_dict(backbone: Backbone) -> dict[str, Any] | None:
    """The backbone's origin as a plain dict (what checkpoints store under ``tlmodules.backbone``)."""
    return None if backbone.origin is None else asdict(backbone.origin)


# ---------------------------------------------------------------------------------------------
# layer grouping
# ---------------------------------------------------------------------------------------------
def param_names(module: nn.Module, prefix: str) -> list[str]:
    """``module``'s parameter names, each prefixed with ``prefix`` (its path in the enclosing network)."""
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
        stages = [param_names(getattr(model, f"layer{i}"), f"layer{i}.") for i in range(1, 5)]
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
        param_names(child, f"{prefix}{child_name}.")
        for child_name, child in blocks.named_children()
        if any(True for _ in child.parameters())
    ]
    in_blocks = {n for g in block_groups_ for n in g}
    first = names.index(block_groups_[0][0])
    stem = [n for n in names[:first] if n not in in_blocks]
    neck = [n for n in names[first:] if n not in in_blocks]
    return [g for g in [stem, *block_groups_, neck] if g]


def module_backbone(module: nn.Module, num_features: int | None = None) -> Backbone:
    """Wrap a user's ``nn.Module`` (feature width ``num_features``, else its ``num_features`` attribute)."""
    width = num_features if num_features is not None else getattr(module, "num_features", None)
    if not isinstance(width, int):
        raise BackboneError(f"{type(module).__name__} has no integer 'num_features'; pass num_features=<feature width>")
    return Backbone(module, width, block_groups(module))
