"""The three export formats, each written into an empty folder and checked against the module before it is kept.

- ``onnx``: ``model.onnx`` (``torch.onnx.export``, dynamic batch axis, and sequence axis for text), run back
  through onnxruntime when it is installed.
- ``torchscript``: ``model.pt`` (``torch.jit.trace``), loadable with ``torch.jit.load`` alone; the trace is rerun
  on inputs of another batch size (and length, for text) and refused if it does not generalise.
- ``hf``: the fine-tuned Hugging Face encoder as a ``save_pretrained`` folder with its tokenizer, plus the
  classifier's weights (``head.safetensors``) and ``head.json`` (labels, pooling, layer layout).

Each folder also holds ``preprocessing.json`` (:mod:`tlmodules.export.preprocessing`): inputs, outputs, labels and
the preprocessing they expect.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tlmodules.backbones import TransformerBackbone
from tlmodules.errors import ConfigError
from tlmodules.export.graph import GraphSpec, example_inputs

# how far an exported model's outputs may sit from the module's own (float32 kernels differ in summation order)
TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """The exported file does not reproduce the module's outputs (a bug, or a model the format cannot trace)."""


def largest_difference(expected: tuple[Tensor, ...], got: list[Any]) -> float:
    return max(float((torch.as_tensor(g).float() - e.float()).abs().max()) for e, g in zip(expected, got))


def check_outputs(what: str, expected: tuple[Tensor, ...], got: list[Any]) -> float:
    difference = largest_difference(expected, got)
    if not difference <= TOLERANCE:
        raise ExportCheckError(
            f"the {what} gives outputs up to {difference:.2e} away from the module's own (tolerance {TOLERANCE}); "
            "the export was not written"
        )
    return difference


def require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{what} needs the '{package}' package: pip install 'tlmodules[export]'")


def write_onnx(spec: GraphSpec, folder: Path, image_shape: tuple[int, int, int] | None) -> dict[str, Any]:
    """``model.onnx`` through torch's exporter (torch.export → ONNX, opset of the installed onnxscript), batch
    (and sequence) axes dynamic; then each output checked through onnxruntime on inputs of another size."""
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    example = example_inputs(spec, image_shape, batch=2, length=8)
    batch = torch.export.Dim("batch", min=1)
    axes: dict[int, Any] = {0: batch}
    if spec.kind == "text":
        axes[1] = torch.export.Dim("sequence", min=2)
    if spec.any_size:  # per-pixel outputs: frames of any size (ResNet-style trunks need at least 32 pixels)
        axes[2], axes[3] = torch.export.Dim("height", min=32), torch.export.Dim("width", min=32)
    path = folder / "model.onnx"
    torch.onnx.export(
        spec.graph,
        example,
        str(path),
        input_names=list(spec.inputs),
        output_names=[o.name for o in spec.outputs],
        dynamic_shapes=(tuple([axes] * len(example)),),  # the graph's forward takes *inputs: one tuple of them
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    report: dict[str, Any] = {"file": path.name}
    if importlib.util.find_spec("onnxruntime") is None:
        report["check"] = "skipped: onnxruntime is not installed"
        return report
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = example_inputs(spec, image_shape, batch=3, length=13)
    with torch.no_grad():
        expected = spec.graph(*other)
    got = session.run(None, {name: value.numpy() for name, value in zip(spec.inputs, other)})
    report["max_abs_difference"] = check_outputs("ONNX model under onnxruntime", expected, got)
    return report


def write_torchscript(spec: GraphSpec, folder: Path, image_shape: tuple[int, int, int] | None) -> dict[str, Any]:
    """``model.pt`` traced with :func:`torch.jit.trace`; checked on inputs of another batch size and length (or
    image size): a trace that baked in its example's shapes is refused."""
    example = example_inputs(spec, image_shape, batch=2, length=8)
    path = folder / "model.pt"
    with torch.no_grad(), warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated (docs/export.md: ONNX is the format to prefer); the tracer's warnings
        # about Python values taken as constants are what the check below tests for real
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(spec.graph, example, strict=False, check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    other = example_inputs(spec, image_shape, batch=3, length=13)
    with torch.no_grad():
        expected = spec.graph(*other)
        got = loaded(*other)
    got = list(got) if isinstance(got, list | tuple) else [got]
    if [tuple(g.shape) for g in got] != [tuple(e.shape) for e in expected]:
        raise ExportCheckError(
            "the TorchScript trace of this model fixed its example's input shapes and cannot run other batch sizes "
            "or lengths; export it with --format onnx, which keeps those axes dynamic"
        )
    return {"file": path.name, "max_abs_difference": check_outputs("traced TorchScript model", expected, got)}


def head_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers between the pooled backbone features and the logits, by name (what ``head.safetensors`` holds)."""
    from tlmodules import DANNModule, FeatureProbeModule, MultiTaskModule

    if isinstance(module, DANNModule):
        return {"bottleneck": module.bottleneck, "head": module.head}
    if isinstance(module, MultiTaskModule):
        return {"heads": module.heads}
    if isinstance(module, FeatureProbeModule) and module.head is None:
        raise ConfigError("a pickled scikit-learn estimator cannot go into an hf folder; see the onnx refusal")
    return {"head": module.head}


def write_hf(module: nn.Module, spec: GraphSpec, folder: Path) -> dict[str, Any]:
    """The encoder's ``save_pretrained`` folder, its tokenizer, ``head.safetensors`` and ``head.json``; then the
    folder is loaded back as an ``hf:<folder>`` backbone and its features compared with the module's."""
    from safetensors.torch import save_file

    backbone = module.backbone
    if not isinstance(backbone, TransformerBackbone):
        spec_name = backbone.origin.spec if backbone.origin else type(backbone.body).__name__
        raise ConfigError(
            f"the hf format holds Hugging Face transformer backbones; this model's backbone is {spec_name}. Export "
            "it with --format onnx or --format torchscript"
        )
    with quiet_transformers():
        backbone.body.save_pretrained(str(folder), safe_serialization=True)
    layers = head_layers(module)
    state = {
        f"{name}.{key}": value.detach().float().contiguous()
        for name, layer in layers.items()
        for key, value in layer.state_dict().items()
        if value.is_floating_point()
    }
    save_file(state, str(folder / "head.safetensors"))
    hparams = module.hparams
    description = {
        "module": type(module).__name__,
        "pooling": backbone.pooling,
        "normalize_features": bool(hparams.get("normalize_features", False)),
        "head": hparams.get("head"),
        "head_hidden": hparams.get("head_hidden"),
        "outputs": [asdict(o) for o in spec.outputs],
        "layers": {name: repr(layer) for name, layer in layers.items()},
        "tensors": {key: list(value.shape) for key, value in state.items()},
    }
    if hasattr(module, "tasks"):
        description["tasks"] = [{k: v for k, v in t.items() if not k.startswith("target_")} for t in module.tasks]
        description["target_scaling"] = {
            t["name"]: {k: t[k] for k in ("target_mean", "target_std") if k in t} for t in module.tasks
        }
    (folder / "head.json").write_text(json.dumps(description, indent=2, default=str))
    return {"files": sorted(p.name for p in folder.iterdir()), **check_hf_features(backbone, spec, folder)}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports off (a folder saved without the pooler, which tlmodules never
    uses, reports the pooler's weights as missing on every load), its warnings and errors kept."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def save_tokenizer(backbone: TransformerBackbone, folder: Path) -> None:
    """The backbone's tokenizer files, copied into the export folder (every format of a text model needs them)."""
    from transformers import AutoTokenizer

    source = backbone.preprocessing.tokenizer if backbone.preprocessing else None
    try:
        with quiet_transformers():
            AutoTokenizer.from_pretrained(source).save_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot read the backbone's tokenizer {source!r} to copy it: {err}") from err


def check_hf_features(backbone: TransformerBackbone, spec: GraphSpec, folder: Path) -> dict[str, Any]:
    """Load the folder back as a tlmodules ``hf:<folder>`` backbone and compare its features with the module's."""
    from tlmodules.backbones import build_backbone

    with quiet_transformers():
        reloaded = build_backbone(f"hf:{folder}", weights=None, pooling=backbone.pooling).eval()
    ids, mask = example_inputs(spec, None, batch=3, length=13)
    with torch.no_grad():
        expected = backbone({"input_ids": ids, "attention_mask": mask})
        got = reloaded({"input_ids": ids, "attention_mask": mask})
    return {"max_abs_difference": check_outputs("hf folder, loaded back as a backbone,", (expected,), [got])}


WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "onnx": lambda module, spec, folder, image_shape: write_onnx(spec, folder, image_shape),
    "torchscript": lambda module, spec, folder, image_shape: write_torchscript(spec, folder, image_shape),
    "hf": lambda module, spec, folder, image_shape: write_hf(module, spec, folder),
}
FORMATS = tuple(WRITERS)
