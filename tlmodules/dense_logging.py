"""What TensorBoard shows of a dense (per-pixel) task at validation: an image grid of input | ground truth |
prediction overlays, and a Markdown table of the per-class IoU.

Shapes: images ``(B, 3, H, W)`` float (normalised network inputs, any range); label maps ``(B, H, W)`` int64
class indices with :data:`~tlmodules.labels.IGNORE_INDEX` (or any value outside ``0..C-1``) for void pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid


def palette(num_classes: int) -> Tensor:
    """``(num_classes, 3)`` uint8: one colour per class, the same for class ``k`` whatever ``num_classes`` is.

    The Pascal VOC palette (each class number's bits spread over the high bits of R, G and B) without its first,
    black entry: class ``k`` gets VOC colour ``k + 1``, so black is left for void pixels. The colours are distinct
    for up to 2**24 - 1 classes.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    codes = torch.arange(1, num_classes + 1, dtype=torch.int64)
    colours = torch.zeros(num_classes, 3, dtype=torch.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((codes >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.to(torch.uint8)


def colorize(labels: Tensor, num_classes: int) -> Tensor:
    """``(B, H, W)`` class indices → ``(B, 3, H, W)`` uint8 colours of :func:`palette`; ``IGNORE_INDEX`` and any
    other value outside ``0..num_classes-1`` are black. (Any leading shape works: ``(..., H, W)`` →
    ``(..., 3, H, W)``.)"""
    labels = labels.detach().long()
    valid = (labels >= 0) & (labels < num_classes)
    colours = palette(max(num_classes, 1)).to(labels.device)[labels.clamp(0, max(num_classes - 1, 0))]
    colours = colours * valid.unsqueeze(-1).to(torch.uint8)
    return colours.movedim(-1, -3).contiguous()


def _rescale(images: Tensor) -> Tensor:
    """Each image min-max rescaled to ``[0, 1]`` (a constant image becomes 0)."""
    flat = images.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1, 1)
    return ((images - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)


def overlay_grid(
    images: Tensor,
    target: Tensor,
    prediction: Tensor,
    num_classes: int,
    alpha: float = 0.5,
    max_images: int = 4,
) -> Tensor:
    """One ``(3, H', W')`` float grid in ``[0, 1]`` (:func:`torchvision.utils.make_grid`, 2-pixel padding), one row
    per image (the first ``max_images``) of three columns: the image | the image blended with the ground truth's
    colours (void pixels show the image only) | the image blended with the prediction's colours.

    ``images`` ``(B, 3, H, W)`` (or ``(B, 1, H, W)``) float in any range, each min-max rescaled for display;
    ``target`` and ``prediction`` ``(B, H, W)`` int64 class indices (a mask task: 0/1 with ``num_classes=2``).
    ``alpha`` is the colours' weight in the blend. For ``B`` images of ``H × W`` the grid is
    ``(3, B·(H+2)+2, 3·(W+2)+2)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if target.shape != prediction.shape or tuple(target.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} must be (B, H, W) matching "
            f"images {tuple(images.shape)}"
        )
    count = max(1, min(max_images, images.shape[0]))
    shown = _rescale(images[:count].detach().float().cpu()).expand(-1, 3, -1, -1)

    def blend(labels: Tensor) -> Tensor:
        labels = labels[:count].detach().cpu().long()
        colours = colorize(labels, num_classes).float() / 255.0
        known = ((labels >= 0) & (labels < num_classes)).unsqueeze(1)
        return torch.where(known, (1.0 - alpha) * shown + alpha * colours, shown)

    tiles = torch.stack([shown, blend(target), blend(prediction)], dim=1).flatten(0, 1)  # (3·count, 3, H, W)
    return make_grid(tiles, nrow=3, padding=2, pad_value=0.0).clamp(0.0, 1.0)


def iou_table(class_names: Sequence[str], iou: Tensor, pixel_accuracy: float | None = None) -> str:
    """A Markdown table ``| class | IoU |``: one row per class (3 decimals; ``n/a`` for a NaN IoU, a class absent
    from both prediction and target), then ``| mean | … |`` over the classes that have one (``n/a`` when none has)
    and, when given, ``| pixel accuracy | … |``. A class without a name is shown by its index."""
    values = [float(v) for v in torch.as_tensor(iou, dtype=torch.float64).reshape(-1).tolist()]

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    def name(k: int) -> str:
        return (str(class_names[k]) if k < len(class_names) else str(k)).replace("|", "\\|")

    known = [v for v in values if not math.isnan(v)]
    lines = ["| class | IoU |", "| --- | --- |"]
    lines += [f"| {name(k)} | {cell(v)} |" for k, v in enumerate(values)]
    lines.append(f"| mean | {cell(sum(known) / len(known) if known else math.nan)} |")
    if pixel_accuracy is not None:
        lines.append(f"| pixel accuracy | {cell(float(pixel_accuracy))} |")
    return "\n".join(lines)


def _tensorboards(logger: Any) -> list[TensorBoardLogger]:
    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    return [one for one in loggers if isinstance(one, TensorBoardLogger)]


def log_dense_images(logger: Any, tag: str, grid: Tensor, step: int) -> bool:
    """Write ``grid`` ``(3, H, W)`` float in ``[0, 1]`` as image ``tag`` at ``step`` when ``logger`` is a Lightning
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` (or a list of loggers, ``trainer.loggers``, holding
    one): returns True; another logger, or None, is left alone: returns False."""
    boards = _tensorboards(logger)
    for board in boards:
        board.experiment.add_image(tag, grid.detach().float().cpu(), global_step=step, dataformats="CHW")
    return bool(boards)


def log_text(logger: Any, tag: str, text: str, step: int) -> bool:
    """Write ``text`` (Markdown, e.g. :func:`iou_table`) as text ``tag`` at ``step`` when ``logger`` is a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` (or a list holding one): True; otherwise False."""
    boards = _tensorboards(logger)
    for board in boards:
        board.experiment.add_text(tag, text, global_step=step)
    return bool(boards)
