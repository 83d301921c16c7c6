"""One registry of backbone kinds: a spec ``<kind>:<rest>`` is dispatched here and nowhere else.

Each kind is one :class:`BackboneKind` entry holding its builder, its preprocessing resolver and the
form it shows in the "accepted backbone specs" error. Adding a kind is one call::

    register_backbone_kind(BackboneKind(
        name="mykind",
        form="mykind:<model name>",
        description="what it is, e.g. mykind:small",
        build=lambda rest, settings: ...,          # -> Backbone
        preprocessing=lambda rest, settings: ...,  # -> Preprocessing | None, without building the network
    ))

after which :func:`build_backbone`, :func:`resolve_preprocessing`, the CLI's spec check and the error
listing (:func:`accepted_forms`) all know it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tlmodules.backbones.core import Backbone, BackboneError, BackboneSettings, Preprocessing, module_backbone


@dataclass(frozen=True)
class BackboneKind:
    """One kind of backbone spec.

    Attributes:
        name: the prefix before the first ``:`` of a spec (``torchvision`` in ``torchvision:resnet18``).
        form: the spec's shape as the error listing shows it, e.g. ``"torchvision:<model name>"``.
        description: one line on what the kind is and which settings it reads.
        build: ``(rest, settings) -> Backbone``; ``rest`` is the spec after ``<name>:``.
        preprocessing: ``(rest, settings) -> Preprocessing | None``, the preprocessing the spec implies,
            resolved without building the network or loading weights (the datamodules call it).
    """

    name: str
    form: str
    description: str
    build: Callable[[str, BackboneSettings], Backbone]
    preprocessing: Callable[[str, BackboneSettings], Preprocessing | None]


_KINDS: dict[str, BackboneKind] = {}  # in registration order: the order of the error listing


def register_backbone_kind(kind: BackboneKind, *, replace: bool = False) -> BackboneKind:
    """Add ``kind`` to the registry (``replace=True`` to swap an entry of the same name); returns it."""
    if not kind.name or ":" in kind.name:
        raise ValueError(f"a backbone kind's name is a non-empty word without ':', got {kind.name!r}")
    if not kind.form.startswith(f"{kind.name}:"):
        raise ValueError(f"the form of backbone kind {kind.name!r} must start with '{kind.name}:', got {kind.form!r}")
    if kind.name in _KINDS and not replace:
        raise ValueError(f"backbone kind {kind.name!r} is already registered (pass replace=True to swap it)")
    _KINDS[kind.name] = kind
    return kind


def unregister_backbone_kind(name: str) -> BackboneKind:
    """Remove the kind called ``name`` from the registry and return it."""
    try:
        return _KINDS.pop(name)
    except KeyError:
        raise KeyError(f"no backbone kind {name!r} is registered") from None


def backbone_kinds() -> tuple[BackboneKind, ...]:
    """The registered kinds, in registration order."""
    return tuple(_KINDS.values())


def spec_kind(spec: str) -> BackboneKind | None:
    """The registered kind of a spec string (``None`` when it has no ``:`` or an unknown prefix)."""
    name, colon, _ = spec.partition(":")
    return _KINDS.get(name) if colon else None


def accepted_forms() -> str:
    """The "accepted backbone specs: ..." text of errors, one ``'<form>' (<description>)`` per kind."""
    listed = ", ".join(f"'{kind.form}' ({kind.description})" for kind in _KINDS.values())
    return f"accepted backbone specs: {listed}, or an nn.Module passed from Python"


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
        spec: ``<kind>:<rest>`` for a registered kind (see :func:`accepted_forms`), or an ``nn.Module``.
        weights: pretrained weights: ``DEFAULT``, a source's own name (torchvision ``IMAGENET1K_V1``, a timm
            pretrained tag), a local weights file (timm), or ``none``.
        pooling: ``mean`` | ``cls`` | ``max`` for sequence models.
        trust_remote_code: let a Hugging Face repository run its own code (off by default).
        num_features: feature width of a plain ``nn.Module`` (else its ``num_features`` attribute).
        pretrained: load the pretrained weights (``False``: the architecture and preprocessing only,
            for weights that a checkpoint is about to overwrite).

    Returns:
        a :class:`Backbone` mapping inputs to features ``(B, num_features)``.
    """
    if isinstance(spec, Backbone):
        return spec
    if isinstance(spec, nn.Module):
        return module_backbone(spec, num_features)
    kind = spec_kind(spec) if isinstance(spec, str) else None
    if kind is None:
        raise BackboneError(f"{accepted_forms()}; got {spec!r}")
    settings = BackboneSettings(
        weights=weights, pooling=pooling, trust_remote_code=trust_remote_code, pretrained=pretrained
    )
    return kind.build(spec.partition(":")[2], settings)


def resolve_preprocessing(spec: str | None, weights: str | None = "DEFAULT") -> Preprocessing | None:
    """The preprocessing a spec implies, without building the network or loading weights.

    ``None`` for no spec or a string without ``:`` (a backbone a module builds itself, such as
    MultiTaskModule's ``mlp``); an unknown kind raises the listing error.
    """
    if not isinstance(spec, str) or ":" not in spec:
        return None
    kind = spec_kind(spec)
    if kind is None:
        raise BackboneError(f"{accepted_forms()}; got {spec!r}")
    return kind.preprocessing(spec.partition(":")[2], BackboneSettings(weights=weights))
