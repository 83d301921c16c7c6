"""Single-label classification on top of :class:`tlmodules.base.TransferModule`.

:class:`ClassificationMixin` holds what the classification techniques (fine-tuning, feature probing,
domain adaptation) share and multi-task learning does not: a label set taken from the data or a
checkpoint, a head sized to it, cross-entropy, accuracy, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from tlmodules.errors import ConfigError
from tlmodules.labels import IGNORE_INDEX


def check_label_range(labels: Tensor, num_classes: int) -> None:
    """A clear error for a class label outside ``0 … num_classes - 1`` (:data:`IGNORE_INDEX` is allowed)."""
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ConfigError(
            f"label {int(bad[0])} is outside the model's {num_classes} classes (0 … {num_classes - 1}); give "
            f"num_classes that covers every label, or map the labels to 0 … {num_classes - 1} in the data"
        )


def classification_metrics(num_classes: int, prefix: str, validate_args: bool = True) -> MetricCollection:
    """Accuracy (micro) and macro-F1, logged as ``<prefix>acc`` and ``<prefix>f1_macro``. ``validate_args=False``
    skips torchmetrics' per-update label checks (each a host sync on a GPU), for labels checked already."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=validate_args),
            "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro", validate_args=validate_args),
        },
        prefix=prefix,
    )


class ClassificationMixin:
    """Labels, loss, metrics and checkpoint label space of a single-label classifier.

    Mixed in before :class:`~tlmodules.base.TransferModule`
    (``class FineTuneModule(ClassificationMixin, TransferModule)``). The module implements
    :meth:`build_classifier` (the layers that output ``num_classes`` logits) and calls
    :meth:`size_classifier` when ``num_classes`` is given, :meth:`setup_labels` in ``setup`` (the size from
    the datamodule), and :meth:`log_training` / :meth:`log_evaluation` in its steps. The label space is
    stored in checkpoints and checked when one is loaded.
    """

    # -- the label set ----------------------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> None:
        """Create the layers that output ``num_classes`` logits (the module)."""
        raise NotImplementedError

    def size_classifier(self, num_classes: int) -> None:
        """Build the classifier and its metrics for ``num_classes`` and record the number."""
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(
                f"num_classes={num_classes!r}: a classifier needs at least 2 classes (softmax over the labels). "
                "Leave num_classes out to take it from the data, or give the label set's size"
            )
        self.build_classifier(num_classes)
        self._num_classes = num_classes
        self.update_hparams(num_classes=num_classes)
        self._build_classification_metrics(num_classes)

    @property
    def num_classes(self) -> int | None:
        return getattr(self, "_num_classes", None)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes or 0)]

    def setup_labels(self, stage: str) -> None:
        """Size the classifier from the datamodule's label set, or check that it agrees.

        A datamodule without labels (prediction only) leaves the size to the checkpoint being
        loaded (:meth:`on_load_checkpoint`).
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None) or None  # 0: a prediction-only datamodule
        if self.num_classes is None and data_classes is None and stage != "fit":
            return
        if self.num_classes is None:
            if data_classes is None:
                raise ConfigError(
                    "num_classes is unknown: pass num_classes=<n> or use a datamodule with a num_classes attribute"
                )
            self.size_classifier(int(data_classes))
        elif data_classes is not None and int(data_classes) != self.num_classes:
            raise ConfigError(
                f"num_classes={self.num_classes} in the model disagrees with the data, which has "
                f"{data_classes} classes ({getattr(datamodule, 'class_names', None)}); set num_classes={data_classes}"
            )
        if self.hparams.get("class_names") is None and data_classes and getattr(datamodule, "class_names", None):
            self.update_hparams(class_names=list(datamodule.class_names))

    def require_classifier(self) -> None:
        if self.num_classes is None:
            raise ConfigError(
                "the model has no head yet: give num_classes, a datamodule with labels, or ckpt_path=<checkpoint>"
            )

    def on_validation_start(self) -> None:
        self.require_classifier()

    def on_test_start(self) -> None:
        self.require_classifier()

    def on_predict_start(self) -> None:
        self.require_classifier()

    # -- loss and metrics -------------------------------------------------------------------------
    def _build_classification_metrics(self, num_classes: int) -> None:
        # training labels: range-checked at the first step (classification_loss) and by the datamodules
        self.train_metrics = classification_metrics(num_classes, "train/", validate_args=False)
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.val_confusion = MulticlassConfusionMatrix(num_classes=num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes=num_classes)
        # mean loss weighted by labelled samples and summed over processes: the whole split's mean loss
        # under DDP even when the processes' shards differ in size (self.log's sync_dist averages the means)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on float32 logits (safe under autocast); :data:`IGNORE_INDEX` labels are ignored. The
        first batch's labels are checked against the head's classes (the datamodules check every label at setup;
        a plain loader would otherwise fail inside the loss, on a GPU as an opaque device-side assert)."""
        if not getattr(self, "_label_range_checked", False):
            check_label_range(labels, logits.shape[-1])
            self._label_range_checked = True
        smoothing = float(self.hparams.get("label_smoothing", 0.0))
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)

    def log_training(self, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.train_metrics.update(logits.detach(), labels)  # logged once, at the epoch's end

    def on_train_epoch_end(self) -> None:
        """The epoch's training accuracy and macro-F1 over every process's samples, computed once."""
        metrics = getattr(self, "train_metrics", None)
        if metrics is not None and any(m.update_called for m in metrics.values()):
            self.log_dict(metrics.compute())
            metrics.reset()
        super().on_train_epoch_end()

    def log_evaluation(self, stage: str, logits: Tensor, labels: Tensor) -> None:
        """Loss (synchronised across processes), accuracy, macro-F1 and the confusion matrix of ``stage``."""
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confusion = self.val_confusion if stage == "val" else self.test_confusion
        loss_mean = self.val_loss if stage == "val" else self.test_loss
        labelled = int((labels != IGNORE_INDEX).sum())
        if labelled:
            loss_mean.update(self.classification_loss(logits, labels).detach(), weight=labelled)
            self.log(f"{stage}/loss", loss_mean, on_step=False, on_epoch=True, prog_bar=stage == "val")
        metrics.update(logits, labels)
        confusion.update(logits, labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self.log("hp_metric", self.val_metrics["acc"].compute())
        self.log_confusion_matrix(self.val_confusion, "val/confusion_matrix", self.class_names)

    def on_test_epoch_end(self) -> None:
        self.log_confusion_matrix(self.test_confusion, "test/confusion_matrix", self.class_names)

    def log_confusion_matrix(self, metric: MulticlassConfusionMatrix, tag: str, class_names: Sequence[str]) -> None:
        """Compute (synchronised across processes) and write a confusion-matrix figure to TensorBoard."""
        matrix = metric.compute()
        metric.reset()
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        if self.global_rank != 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = max(4.0, 0.45 * len(class_names) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        metric.plot(val=matrix, ax=ax, labels=list(class_names), add_text=len(class_names) <= 20)
        ax.set_title(f"{tag} (step {self.global_step})")
        self.logger.experiment.add_figure(tag, fig, global_step=self.global_step, close=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            **super().checkpoint_meta(),
            "num_classes": self.num_classes,
            "class_names": self.hparams.get("class_names"),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's module type and label space; size the classifier from it when unsized."""
        super().on_load_checkpoint(checkpoint)
        meta: Mapping[str, Any] = checkpoint["tlmodules"]
        saved = meta.get("num_classes")
        if self.num_classes is None and saved is not None:
            self.size_classifier(int(saved))
            if self.hparams.get("class_names") is None and meta.get("class_names"):
                self.update_hparams(class_names=list(meta["class_names"]))
        elif self.num_classes is not None and saved is not None and saved != self.num_classes:
            raise ConfigError(
                f"the checkpoint's head has {saved} classes but this model has {self.num_classes}; "
                f"to reuse its backbone for a new label set use backbone='ckpt:<path>'"
            )
