"""``python train.py export``: the export subcommand beside LightningCLI's fit / validate / test / predict.

It takes the checkpoint the other subcommands take (``--ckpt_path``) but no recipe: the checkpoint records the
module, its hyperparameters and the backbone it was built on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tlmodules.export import FORMATS, export_checkpoint

EXAMPLES = """examples:
  python train.py export --ckpt_path runs/tlmodules/version_0/checkpoints/last.ckpt --format onnx --output export/onnx
  python train.py export --ckpt_path last.ckpt --format torchscript --output export/ts
  python train.py export --ckpt_path last.ckpt --format hf --output export/hf   # Hugging Face encoders only

onnx: model.onnx (dynamic batch axis, and sequence axis for text); torchscript: model.pt; hf: a save_pretrained
folder of the fine-tuned encoder with its tokenizer, head.safetensors and head.json. Every folder also holds
preprocessing.json (inputs, outputs, labels, preprocessing). See docs/export.md."""


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="train.py export",
        description="Export a trained tlmodules checkpoint as ONNX, TorchScript or a Hugging Face folder.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parse.add_argument("--ckpt_path", required=True, help="a checkpoint written by a tlmodules run (.ckpt)")
    parse.add_argument("--format", required=True, choices=FORMATS, help="onnx, torchscript or hf")
    parse.add_argument("--output", required=True, help="a new (or empty) folder to write the export into")
    parse.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="image models: the square input size, when the checkpoint does not record the datamodule's",
    )
    return parse


def run(args: list[str]) -> Path:
    """Parse ``args`` (after ``export``) and export; a user's mistake raises a :class:`tlmodules.errors.UserError`
    (argparse's own usage errors exit with status 2 and its message)."""
    options = parser().parse_args(args)
    if options.image_size is not None and options.image_size <= 0:
        parser().error(f"--image_size must be a positive number of pixels, got {options.image_size}")
    folder = export_checkpoint(options.ckpt_path, options.format, options.output, options.image_size)
    print(f"exported {options.ckpt_path} as {options.format} to {folder} (see {folder / 'preprocessing.json'})")
    return folder
