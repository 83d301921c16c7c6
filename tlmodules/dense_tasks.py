"""The per-pixel task kinds of :class:`tlmodules.MultiTaskModule`: what counts as labelled, the loss, the metrics
and the prediction of a ``segmentation`` task (one class per pixel) and a ``mask`` task (one binary label per
pixel, e.g. drivable area).

Shapes: a ``segmentation`` task's outputs are logits ``(B, C, H, W)`` and its labels class indices ``(B, H, W)``
with :data:`~tlmodules.labels.IGNORE_INDEX` for void pixels; a ``mask`` task's outputs are logits ``(B, H, W)``
and its labels 0/1 floats ``(B, H, W)`` with NaN for void pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryConfusionMatrix, MulticlassConfusionMatrix

from tlmodules.labels import IGNORE_INDEX

DENSE_KINDS = ("segmentation", "mask")


def is_dense(task: Mapping[str, Any]) -> bool:
    return task["kind"] in DENSE_KINDS


def dense_labelled(task: Mapping[str, Any], labels: Tensor) -> Tensor:
    """``(B,)``: the images with at least one labelled pixel for this task."""
    known = labels != IGNORE_INDEX if task["kind"] == "segmentation" else ~torch.isnan(labels)
    return known.flatten(1).any(1)


def dense_loss(task: Mapping[str, Any], output: Tensor, labels: Tensor) -> Tensor:
    """Mean loss over the labelled pixels: cross-entropy (weighted by the task's ``class_weights`` when it has
    them: the weighted mean, as ``F.cross_entropy`` defines it) or binary cross-entropy with logits."""
    if task["kind"] == "segmentation":
        weights = task.get("class_weights")
        weight = None if weights is None else torch.as_tensor(weights, dtype=output.dtype, device=output.device)
        return F.cross_entropy(output, labels.long(), weight=weight, ignore_index=IGNORE_INDEX)
    known = ~torch.isnan(labels)
    return F.binary_cross_entropy_with_logits(output[known], labels[known].float())


def dense_metrics(task: Mapping[str, Any], prefix: str) -> MetricCollection:
    """One confusion matrix over every labelled pixel of the stage (void ignored); IoU, mean IoU and pixel
    accuracy are read from it by :func:`dense_scores`, so the values are exact under DDP (the matrices add up)."""
    if task["kind"] == "segmentation":
        matrix = MulticlassConfusionMatrix(task["num_outputs"], ignore_index=IGNORE_INDEX)
    else:
        matrix = BinaryConfusionMatrix(ignore_index=IGNORE_INDEX)
    return MetricCollection({"confusion": matrix}, prefix=prefix)


def dense_metric_inputs(task: Mapping[str, Any], output: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(predictions, targets)`` for the confusion matrix: class indices, or mask probabilities with void pixels
    as ``IGNORE_INDEX`` targets."""
    if task["kind"] == "segmentation":
        return output.argmax(1), labels.long()
    target = torch.where(torch.isnan(labels), torch.full_like(labels, IGNORE_INDEX), labels).long()
    return output.sigmoid(), target


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class intersection over union ``TP / (TP + FP + FN)`` from a ``(C, C)`` confusion matrix (rows: truth);
    NaN for a class absent from both truth and prediction."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


def dense_scores(task: Mapping[str, Any], confusion: Tensor, prefix: str) -> dict[str, Tensor]:
    """The logged values of a dense task from its confusion matrix.

    ``segmentation``: ``miou`` (the mean over classes of IoU, classes absent from truth and prediction left out),
    ``pixel_acc`` and ``iou/<class>`` per class; ``mask``: ``iou`` of the positive class and ``acc``.
    """
    accuracy = confusion.diagonal().sum().double() / confusion.sum().clamp_min(1)
    iou = iou_from_confusion(confusion)
    if task["kind"] == "mask":
        return {f"{prefix}iou": iou[1].float(), f"{prefix}acc": accuracy.float()}
    names: Sequence[Any] = task.get("class_names") or range(task["num_outputs"])
    scores = {f"{prefix}miou": iou.nanmean().float(), f"{prefix}pixel_acc": accuracy.float()}
    scores.update({f"{prefix}iou/{name}": value.float() for name, value in zip(names, iou)})
    return scores


def score_key(task: Mapping[str, Any]) -> str:
    """The value of a dense task that enters ``<stage>/score``."""
    return "miou" if task["kind"] == "segmentation" else "iou"


def dense_prediction(task: Mapping[str, Any], output: Tensor) -> Tensor:
    """``(B, H, W)`` uint8: the most probable class, or 1 where the mask's probability is at least 0.5."""
    if task["kind"] == "segmentation":
        return output.argmax(1).to(torch.uint8)
    return (output >= 0).to(torch.uint8)  # logit 0 is probability 0.5
