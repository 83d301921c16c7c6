"""The inference graph of a trained module: plain tensors in, named probabilities (or values) out.

Exporters trace a graph, not the LightningModule itself: the module's Trainer-bound attributes (``trainer``,
``log``) cannot be traced or scripted, and a deployed model needs none of them. The graph holds references to the
module's own layers, so its outputs are the module's outputs, bit for bit, in eval mode.

Inputs: images ``pixels`` ``(B, C, H, W)`` float32, already resized and normalised as the sidecar JSON says; text
``input_ids`` and ``attention_mask`` ``(B, T)`` int64 from the exported tokenizer (single sentences: the token type
ids are all zero, which the model assumes when they are not given); numeric rows ``features`` ``(B, F)`` float32,
standardised with the training statistics the sidecar JSON gives (a multi-task model on a table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tlmodules.backbones import Backbone, TransformerBackbone
from tlmodules.errors import ConfigError

INPUT_NAMES = {"text": ("input_ids", "attention_mask"), "image": ("pixels",), "numeric": ("features",)}


@dataclass
class OutputSpec:
    """One named output: its shape (``"batch"``, ``"sequence"``, ``"height"``/``"width"`` or sizes), the activation
    applied inside the graph (``softmax``, ``sigmoid`` or ``none``) and what its columns mean."""

    name: str
    shape: list[Any]
    activation: str
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceGraph(nn.Module):
    """``inputs → features → heads → activations`` of one module, as a plain ``nn.Module``.

    Args:
        backbone: the module's backbone (its pooling included for text).
        tail: features ``(B, F)`` (or ``(B, T, F)`` per token) → ``{output name: tensor}``.
        kind: ``text`` (inputs ``input_ids, attention_mask``), ``image`` or ``numeric`` (one tensor).
        per_token: text features per token ``(B, T, F)`` (a token-level probe) instead of pooled ``(B, F)``.
    """

    def __init__(self, backbone: Backbone, tail: nn.Module, kind: str, per_token: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.tail = tail
        self.kind = kind
        self.text = kind == "text"
        self.per_token = per_token

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.text:
            batch = {"input_ids": inputs[0], "attention_mask": inputs[1]}
            feats = self.backbone.forward_tokens(batch) if self.per_token else self.backbone(batch)
        else:
            feats = self.backbone(inputs[0])
        return tuple(self.tail(feats.float()))


class Tail(nn.Module):
    """Features → a tuple of outputs, through ``layers`` (a callable of the module's own layers) then the
    activations. ``layers`` returns one tensor per output, in ``activations``' order."""

    def __init__(self, layers: nn.Module, activations: list[str], dims: list[int]) -> None:
        super().__init__()
        self.layers = layers
        self.activations = activations
        self.dims = dims  # the class dimension each softmax runs over

    def forward(self, feats: Tensor) -> list[Tensor]:
        outs = self.layers(feats)
        outs = outs if isinstance(outs, list | tuple) else [outs]
        done = []
        for out, activation, dim in zip(outs, self.activations, self.dims):
            out = out.float()
            if activation == "softmax":
                out = out.softmax(dim)
            elif activation == "sigmoid":
                out = out.sigmoid()
            done.append(out)
        return done


class Chain(nn.Module):
    """``second(first(x))`` for two of a module's own layers (e.g. DANN's bottleneck then its classifier)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


class Normalized(nn.Module):
    """A feature probe's head on L2-normalised features (``normalize_features=True``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.normalize(x, dim=-1))


@dataclass
class GraphSpec:
    """An :class:`InferenceGraph` and what a user needs to feed it and read it."""

    graph: InferenceGraph
    outputs: list[OutputSpec]
    in_features: int | None = None  # numeric inputs: the row width
    any_size: bool = False  # images of any height and width (per-pixel outputs), not one fixed size

    @property
    def kind(self) -> str:
        return self.graph.kind

    @property
    def inputs(self) -> tuple[str, ...]:
        return INPUT_NAMES[self.graph.kind]


def input_kind(module: Any) -> str:
    """``text`` for a Hugging Face backbone, ``numeric`` for a trunk on table rows (MultiTaskModule's ``mlp``, which
    records ``in_features``), else ``image``."""
    if isinstance(module.backbone, TransformerBackbone):
        return "text"
    if module.hparams.get("in_features") and module.backbone.preprocessing is None:
        return "numeric"
    return "image"


def classifier_spec(module: Any, layers: nn.Module, per_token: bool = False) -> GraphSpec:
    """A single-label classifier's graph: ``probs`` ``(B, num_classes)`` (``(B, T, num_classes)`` per token)."""
    shape = ["batch", "sequence", module.num_classes] if per_token else ["batch", module.num_classes]
    tail = Tail(layers, ["softmax"], [-1])
    outputs = [OutputSpec("probs", shape, "softmax", list(module.class_names))]
    return GraphSpec(InferenceGraph(module.backbone, tail, input_kind(module), per_token), outputs)


def finetune_spec(module: Any) -> GraphSpec:
    return classifier_spec(module, module.head)


def dann_spec(module: Any) -> GraphSpec:
    """DANN's classifier path only: backbone → bottleneck → label classifier (no discriminator)."""
    return classifier_spec(module, Chain(module.bottleneck, module.head))


def probe_spec(module: Any) -> GraphSpec:
    if module.head is None:
        raise ConfigError(
            f"this FeatureProbeModule's classifier is a pickled scikit-learn {module.hparams.head} estimator, which "
            "none of the export formats (onnx, torchscript, hf) can hold: they hold tensors only. Linear heads can "
            "be exported: retrain with head: linear, mlp, logistic_regression or linear_svm"
        )
    layers: nn.Module = Normalized(module.head) if module.hparams.normalize_features else module.head
    return classifier_spec(module, layers, per_token=module.hparams.level == "token")


class MultiTaskLayers(nn.Module):
    """A multi-task module's forward pass after the backbone, its outputs in task order."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module_forward: Callable[[Tensor], dict[str, Tensor]] = module.forward
        self.names = [t["name"] for t in module.tasks]
        # registered here, so that exporters see them as this graph's parameters rather than captured constants
        parts = {"heads": module.heads}
        if isinstance(getattr(module, "decoder", None), nn.Module):
            parts["decoder"] = module.decoder
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = self.module_forward(x)
        return [outputs[name] for name in self.names]


class MultiTaskGraph(InferenceGraph):
    """The multi-task forward runs its backbone itself (dense tasks read several of its stages)."""

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        batch = {"input_ids": inputs[0], "attention_mask": inputs[1]} if self.text else inputs[0]
        return tuple(self.tail(batch))


TASK_ACTIVATIONS = {
    "multiclass": "softmax",
    "binary": "sigmoid",
    "multilabel": "sigmoid",
    "regression": "none",
    "segmentation": "softmax",
    "mask": "sigmoid",
}


def multitask_spec(module: Any) -> GraphSpec:
    """One named output per task, in the module's task order: class probabilities (softmax), binary and multi-label
    probabilities (sigmoid), regression values in the targets' units, per-pixel class probabilities
    ``(B, C, H, W)`` for segmentation and per-pixel probabilities ``(B, H, W)`` for masks."""
    activations, dims, outputs = [], [], []
    for task in module.tasks:
        kind, width = task["kind"], task["num_outputs"]
        activation = TASK_ACTIVATIONS[kind]
        activations.append(activation)
        dims.append(1 if kind == "segmentation" else -1)
        single = kind in ("binary", "regression") and width == 1
        if kind == "segmentation":
            shape = ["batch", width, "height", "width"]
        elif kind == "mask":
            shape = ["batch", "height", "width"]
        else:
            shape = ["batch"] if single else ["batch", width]
        names = task.get("class_names") or task.get("labels")
        extra = {"kind": kind}
        outputs.append(OutputSpec(task["name"], shape, activation, list(names) if names else None, extra))
    tail = Tail(MultiTaskLayers(module), activations, dims)
    kind = input_kind(module)
    graph = MultiTaskGraph(module.backbone, tail, kind)
    in_features = module.hparams.get("in_features") if kind == "numeric" else None
    return GraphSpec(graph, outputs, in_features, any_size=module.dense)


def graph_spec(module: nn.Module) -> GraphSpec:
    """The inference graph of any tlmodules module, in eval mode."""
    from tlmodules import DANNModule, FeatureProbeModule, FineTuneModule, MultiTaskModule

    builders: list[tuple[type, Callable[[Any], GraphSpec]]] = [
        (FineTuneModule, finetune_spec),
        (FeatureProbeModule, probe_spec),
        (DANNModule, dann_spec),
        (MultiTaskModule, multitask_spec),
    ]
    for cls, build in builders:
        if isinstance(module, cls):
            spec = build(module)
            spec.graph.eval()
            return spec
    raise ConfigError(f"cannot export a {type(module).__name__}: export takes a tlmodules module's checkpoint")


def example_inputs(spec: GraphSpec, image_shape: tuple[int, int, int] | None, batch: int, length: int) -> tuple:
    """Inputs of the graph's form: ``batch`` images of ``image_shape`` ``(C, H, W)`` or numeric rows drawn from a
    seeded normal, or ``batch`` token sequences of ``length`` (ids 100…999, the later rows padded: lengths differ,
    as in real batches). A model that reads images of any size gets ``length × 8`` by ``length × 12`` pixels."""
    generator = torch.Generator().manual_seed(0)
    if spec.any_size and image_shape is not None:
        image_shape = (image_shape[0], length * 8, length * 12)
    if spec.kind == "numeric":
        return (torch.randn(batch, spec.in_features, generator=generator),)
    if spec.kind == "text":
        ids = torch.randint(100, 1000, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        for row in range(1, batch):
            mask[row, max(2, length - row * 2) :] = 0
        return ids, mask
    if image_shape is None:
        raise ConfigError("the image size is unknown; pass --image_size")
    return (torch.randn(batch, *image_shape, generator=generator),)
