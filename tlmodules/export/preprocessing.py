"""What an exported model expects before its first layer, written beside it as ``preprocessing.json``."""

from __future__ import annotations

from typing import Any

from torch import nn

from tlmodules.backbones import Preprocessing
from tlmodules.errors import ConfigError


def image_preprocessing(
    preprocessing: Preprocessing | None, image_size: int | None, in_channels: int | None, any_size: bool = False
) -> dict[str, Any]:
    """The eval transform the training datamodule applied (``datamodules.images.build_image_transform``), as data:
    ``channels``, the resize/crop ``steps``, ``size`` ``[H, W]`` of the network's input (``None`` with ``any_size``:
    per-pixel models read whole frames of any size), and ``mean``/``std`` of the normalisation after scaling pixel
    values to ``[0, 1]``."""
    pre = preprocessing or Preprocessing(kind="image")
    channels = in_channels or pre.in_channels or 3
    mean = list(pre.mean or (0.5,) * channels)
    std = list(pre.std or (0.5,) * channels)
    if len(mean) != channels:  # RGB statistics for a single-channel network: their averages, as in training
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    final = image_size or pre.crop_size or pre.resize_size
    if any_size:
        return {
            "channels": channels,
            "size": None,
            "steps": [
                "convert to RGB" if channels == 3 else f"convert to {channels} channels",
                "keep the frame's own size (outputs come at the input's height and width)",
                "scale pixel values to [0, 1]",
                "subtract mean, divide by std",
            ],
            "mean": mean,
            "std": std,
            "layout": "NCHW float32",
        }
    if final is None:
        raise ConfigError(
            "the model's input size is not recorded in the checkpoint (its backbone names none and the datamodule "
            "did not record image_size); pass --image_size <pixels> (image_size= in Python)"
        )
    if image_size:
        steps = [f"resize to {image_size}x{image_size}"]
    elif pre.resize_size and pre.crop_size:
        steps = [f"resize the shorter side to {pre.resize_size}", f"centre-crop {pre.crop_size}x{pre.crop_size}"]
    else:
        steps = [f"resize to {final}x{final}"]
    convert = "RGB" if channels == 3 else "L (greyscale)" if channels == 1 else f"{channels} channels"
    return {
        "channels": channels,
        "size": [final, final],
        "steps": [f"convert to {convert}", *steps, "scale pixel values to [0, 1]", "subtract mean, divide by std"],
        "mean": mean,
        "std": std,
        "layout": "NCHW float32",
    }


def text_preprocessing(backbone: nn.Module, max_length: int | None, long_text: str | None) -> dict[str, Any]:
    """The tokenizer (its files are written into the export folder), the longest input the model was trained on,
    the pooling of token states, and how long documents were handled in training."""
    pre: Preprocessing | None = getattr(backbone, "preprocessing", None)
    limit = max_length or (pre.max_length if pre else None)
    handling = long_text or "truncate"
    notes = {
        "truncate": "inputs longer than max_length are cut at max_length tokens",
        "head_tail": "long inputs kept their first and last tokens up to max_length in training; do the same",
        "chunks": "long documents were cut into windows of max_length tokens and their pooled features "
        "averaged in training; the exported graph reads one window, so run it per window and average "
        "the probabilities, or cut at max_length",
    }
    return {
        "tokenizer": "the tokenizer files in this folder (transformers.AutoTokenizer.from_pretrained(<folder>))",
        "max_length": limit,
        "truncation": True,
        "padding": "to the longest sequence of the batch; attention_mask is 0 on padding",
        "pooling": getattr(backbone, "pooling", None),
        "long_text": handling,
        "long_text_note": notes.get(handling, ""),
    }


def numeric_preprocessing(settings: dict[str, Any], in_features: int | None) -> dict[str, Any]:
    """Table rows: the columns in order and the training mean and standard deviation to standardise them with."""
    columns = settings.get("feature_columns")
    mean, std = settings.get("feature_mean"), settings.get("feature_std")
    return {
        "columns": list(columns) if columns is not None else None,
        "in_features": in_features,
        "mean": [float(v) for v in mean] if mean is not None else None,
        "std": [float(v) for v in std] if std is not None else None,
        "steps": ["take the columns in this order", "subtract mean, divide by std"],
    }


def datamodule_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the training datamodule: its hyperparameters (Lightning stores them when the
    datamodule saved them; none for e.g. a domain-adaptation pair) and the feature scaling of a table's numeric
    columns (in the datamodule's own state)."""
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    settings = dict(hparams) if isinstance(hparams, dict) else {}
    for value in checkpoint.values():
        if isinstance(value, dict) and "feature_mean" in value:
            settings.update({k: value[k] for k in ("feature_columns", "feature_mean", "feature_std") if k in value})
    return settings
