"""Export a trained module for use outside tlmodules: ONNX, TorchScript or a Hugging Face folder.

    python train.py export --ckpt_path runs/tlmodules/version_0/checkpoints/last.ckpt --format onnx --output out/

or, in Python, :func:`export_checkpoint` / :func:`export_module`. docs/export.md says what each format holds and
how to load it. The export is written into a temporary folder beside ``output`` and renamed into place only once
it reproduces the module's outputs, so a failed export leaves nothing behind, and an existing non-empty folder
is never written into.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from tlmodules.errors import ConfigError
from tlmodules.export.formats import FORMATS, TOLERANCE, WRITERS, ExportCheckError, save_tokenizer
from tlmodules.export.graph import GraphSpec, graph_spec
from tlmodules.export.loading import load_module, prepared_for_export
from tlmodules.export.preprocessing import (
    datamodule_settings,
    image_preprocessing,
    numeric_preprocessing,
    text_preprocessing,
)

__all__ = ["FORMATS", "TOLERANCE", "ExportCheckError", "export_checkpoint", "export_module", "load_module"]


def check_output_folder(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output} already exists and is not an empty folder; choose a new --output folder")


def export_module(
    module: nn.Module,
    format: str,
    output: str | Path,
    image_size: int | None = None,
    settings: dict[str, Any] | None = None,
    source: str | None = None,
) -> Path:
    """Write ``module`` (a trained tlmodules module) to the folder ``output`` in ``format`` (``onnx``,
    ``torchscript`` or ``hf``), with ``preprocessing.json`` beside the model; returns the folder.

    Args:
        image_size: the square input size of an image model when it differs from its backbone's default (the
            datamodule's ``image_size``); read from ``settings`` when recorded there.
        settings: the training datamodule's hyperparameters (``image_size``, ``in_channels``, ``max_length``,
            ``long_text``), when known.
        source: where the module came from (a checkpoint path), recorded in ``preprocessing.json``.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    check_output_folder(output)
    settings = dict(settings or {})
    with prepared_for_export(module) as ready:
        write(ready, format, output, image_size, settings, source)
    return output


def write(
    module: nn.Module, format: str, output: Path, image_size: int | None, settings: dict[str, Any], source: str | None
) -> None:
    """Trace ``module`` (ready: eval mode, no gradients, LoRA merged) into a staging folder beside ``output``, check
    it, and rename the folder into place."""
    spec = graph_spec(module)
    meta = describe(module, spec, format, image_size or settings.get("image_size"), settings, source)
    image_shape = None
    if "image" in meta:
        image = meta["image"]
        image_shape = (image["channels"], *(image["size"] or (64, 96)))  # any size: the example's is arbitrary
        if image["size"]:
            meta["inputs"][0]["shape"] = ["batch", *image_shape]
        else:
            meta["inputs"][0]["shape"] = ["batch", image["channels"], "height", "width"]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if spec.kind == "text":
            save_tokenizer(module.backbone, staging)
        meta["written"] = WRITERS[format](module, spec, staging, image_shape)
        (staging / "preprocessing.json").write_text(json.dumps(meta, indent=2, default=str))
        check_output_folder(output)  # still free: nothing was created there meanwhile
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(
    module: nn.Module,
    spec: GraphSpec,
    format: str,
    image_size: int | None,
    settings: dict[str, Any],
    source: str | None,
) -> dict[str, Any]:
    """``preprocessing.json``: the inputs, the outputs (names, shapes, activation, labels) and the preprocessing."""
    from dataclasses import asdict

    from tlmodules import __version__

    meta: dict[str, Any] = {
        "format": format,
        "module": type(module).__name__,
        "source": source,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tlmodules_version": __version__,
        "backbone": module.backbone.origin.spec if module.backbone.origin else None,
        "outputs": [asdict(o) for o in spec.outputs],
    }
    if getattr(module, "target_bn", None) is not None:
        meta["batchnorm"] = "the target domain's statistics (DANNModule target_batchnorm): a model for the target"
    if spec.kind == "text":
        meta["inputs"] = [{"name": name, "shape": ["batch", "sequence"], "dtype": "int64"} for name in spec.inputs]
        meta["text"] = text_preprocessing(module.backbone, settings.get("max_length"), settings.get("long_text"))
    elif spec.kind == "numeric":
        meta["inputs"] = [{"name": "features", "shape": ["batch", spec.in_features], "dtype": "float32"}]
        meta["numeric"] = numeric_preprocessing(settings, spec.in_features)
    else:
        meta["inputs"] = [{"name": "pixels", "shape": ["batch", "channels", "height", "width"], "dtype": "float32"}]
        meta["image"] = image_preprocessing(
            module.backbone.preprocessing, image_size, settings.get("in_channels"), spec.any_size
        )
    return meta


def export_checkpoint(ckpt_path: str | Path, format: str, output: str | Path, image_size: int | None = None) -> Path:
    """Load a tlmodules checkpoint (``weights_only=True``) and export it: :func:`export_module`."""
    from tlmodules.backbones import load_checkpoint

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    check_output_folder(Path(output))
    checkpoint = load_checkpoint(ckpt_path)
    settings = datamodule_settings(checkpoint)
    module = load_module(ckpt_path, checkpoint)
    return export_module(module, format, output, image_size, settings, str(ckpt_path))
