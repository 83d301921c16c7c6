"""The one shared base class: named parameter groups, optimizer and schedule, metrics, logging.

Subclasses own the learning logic. They describe their parameters as named groups
(:class:`ParamGroup`) and this class turns them into one optimizer whose group structure never
changes during a run (frozen parameters stay in it without gradients), so a checkpoint's
optimizer state always fits a resumed run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from tlmodules.backbones import Backbone, build_backbone
from tlmodules.errors import ConfigError
from tlmodules.hardware import PrecisionHardwareCheck
from tlmodules.outputs import OutputFolderCheck
from tlmodules.random_state import TrainingRandomState
from tlmodules.schedules import lr_shape

OptimizerName = Literal["adamw", "sgd"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before it reaches the weights."""


def fused_optimizer_supported(params: Sequence[Tensor]) -> bool | None:
    """``True`` where torch's fused AdamW / SGD kernels take every parameter (floating point, on the CPU or a
    CUDA device, all on one device type); ``None`` (torch's default choice) otherwise."""
    kinds = {p.device.type for p in params}
    ok = bool(params) and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return True if ok else None


def check_label_range(labels: Tensor, num_classes: int) -> None:
    """A clear error for a class label outside ``0 … num_classes - 1`` (``-100``, ignored, is allowed)."""
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ConfigError(
            f"label {int(bad[0])} is outside the model's {num_classes} classes (0 … {num_classes - 1}); give "
            f"num_classes that covers every label, or map the labels to 0 … {num_classes - 1} in the data"
        )


@dataclass
class ParamGroup:
    """A named set of parameters with a learning-rate multiplier (relative to ``lr``)."""

    name: str
    params: list[nn.Parameter]
    lr_mult: float = 1.0


EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


def quiet_eval_mode_warning() -> None:
    """Frozen layers are in eval mode on purpose (their BatchNorm statistics and dropout stay fixed);
    silence Lightning's warning about modules in eval mode at the start of training."""
    warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)


def unpack_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` from a dict batch (``inputs``/``labels``) or a tuple ``(x, y)``/``(x,)``."""
    if isinstance(batch, Mapping):
        return batch["inputs"], batch.get("labels")
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


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


class TransferModule(pl.LightningModule):
    """Shared plumbing for the tlmodules techniques.

    Subclasses set ``self.hparams`` fields ``lr``, ``weight_decay``, ``optimizer``, ``momentum``,
    ``lr_schedule`` and ``warmup_fraction`` (via ``save_hyperparameters``) and implement
    :meth:`parameter_groups`; they may override :meth:`dynamic_lr_factor` for phase-dependent rates.
    """

    # -- backbone -------------------------------------------------------------------------------
    def backbone_from_hparams(self, backbone: str | nn.Module) -> Backbone:
        """Resolve the backbone from the module's saved arguments (``weights``, ``pooling``,
        ``trust_remote_code``, ``num_features``, ``pretrained``): one seam for every technique."""
        hp = self.hparams
        return build_backbone(
            backbone,
            weights=hp.get("weights", "DEFAULT"),
            pooling=hp.get("pooling", "mean"),
            trust_remote_code=hp.get("trust_remote_code", False),
            num_features=hp.get("num_features"),
            pretrained=hp.get("pretrained", True),
        )

    # -- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def dynamic_lr_factor(self, group_name: str) -> float:
        """A multiplier that may change with the epoch (e.g. LP-FT's phase); 1 by default."""
        return 1.0

    def training_progress(self, step: int) -> float:
        if step <= 0:  # asking the trainer for its total steps this early loads the train dataloader before a
            return 0.0  # resume restores its state (Lightning issue #20550)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        return 0.0 if not math.isfinite(total) or total <= 0 else min(1.0, step / total)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups: list[dict[str, Any]] = []
        for group in self.parameter_groups():
            decay = [p for p in group.params if p.ndim > 1]
            no_decay = [p for p in group.params if p.ndim <= 1]
            for suffix, params, wd in (("", decay, hp.weight_decay), (".no_decay", no_decay, 0.0)):
                if params:
                    groups.append(
                        {
                            "name": group.name + suffix,
                            "base_name": group.name,
                            "params": params,
                            "lr": hp.lr * group.lr_mult,
                            "weight_decay": wd,
                        }
                    )
        # the fused kernels update every parameter in one pass: on the CPU 8x (AdamW, MiniLM) to 9x (SGD, DANN's
        # LeNet and discriminator) faster than the default per-parameter loop (bench/speed.py); same arithmetic
        fused = fused_optimizer_supported([p for g in groups for p in g["params"]])
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=fused)
        elif hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0, fused=fused)
        else:
            raise ConfigError(f"unknown optimizer {hp.optimizer!r}; choose adamw or sgd")

        def factor_for(base_name: str):
            def factor(step: int) -> float:
                shape = lr_shape(hp.lr_schedule, self.training_progress(step), hp.warmup_fraction)
                return shape * self.dynamic_lr_factor(base_name)

            return factor

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(g["base_name"]) for g in groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def refresh_learning_rates(self) -> None:
        """Re-evaluate the schedule's factors now (call at an epoch start).

        The step scheduler last ran after the previous epoch's final step, while ``current_epoch``
        still named that epoch; without this an epoch-dependent factor (:meth:`dynamic_lr_factor`,
        e.g. LP-FT's phase switch) would take effect one step late.
        """
        scheduler = self.lr_schedulers() if self._trainer is not None else None
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates

    def on_train_start(self) -> None:
        # also here: a run resumed from an epoch's last batch may enter the next epoch without
        # on_train_epoch_start
        self.refresh_learning_rates()

    def on_train_epoch_start(self) -> None:
        self.refresh_learning_rates()

    def configure_callbacks(self) -> list[pl.Callback]:
        """Output folders that cannot be written fail the run before it starts (:mod:`tlmodules.outputs`); a
        bf16 precision on a CPU that only emulates bf16 is warned about (:mod:`tlmodules.hardware`); training
        keeps its own random stream, carried per process in checkpoints, so a resumed run repeats the
        uninterrupted one (:mod:`tlmodules.random_state`), in the Python API as in the CLI."""
        return [OutputFolderCheck(), PrecisionHardwareCheck(), TrainingRandomState()]

    # -- a NaN or infinite loss stops the run before the backward pass ---------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_index = batch_idx

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop at the first non-finite loss, before its gradients reach the weights: the run fails with
        the step and batch, and checkpoints already written (the last good one) stay as they are."""
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(
                f"the training loss is {loss.detach().float().mean().item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {getattr(self, '_batch_index', '?')}); the run stopped before this "
                "step touched the weights, and the last checkpoint is the last good one. Look for NaN or infinite "
                "values in that batch, or lower the learning rate (and prefer bf16-mixed to 16-mixed)"
            )

    # -- metrics and logging --------------------------------------------------------------------
    def update_hparams(self, **values: Any) -> None:
        """Record hyperparameters learned late (from the datamodule in ``setup``).

        Lightning's loggers write ``hparams_initial`` (a copy taken by ``save_hyperparameters``) after
        ``setup``; both it and ``hparams`` (saved in checkpoints) get the values.
        """
        self.hparams.update(values)
        initial = getattr(self, "_hparams_initial", None)
        if initial is not None:
            initial.update(values)

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

    def logging_step(self) -> bool:
        """Whether Lightning writes step-level values after this training step (every ``log_every_n_steps``).

        Values logged only per step (learning rates, λ) are logged on those steps alone: each ``self.log``
        costs Lightning about a millisecond of bookkeeping (and a host-to-device copy of a Python float), a
        real share of a GPU step (``bench/speed.py``), for values the logger would not write."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (self.global_step + 1) % max(1, int(trainer.log_every_n_steps)) == 0

    def log_learning_rates(self) -> None:
        if not self.logging_step():
            return
        optimizer = self.optimizers(use_pl_optimizer=False)
        rates = {f"train/lr/{g['name']}": g["lr"] for g in optimizer.param_groups if not g["name"].endswith("no_decay")}
        self.log_dict(rates, on_step=True, on_epoch=False)

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

    # -- labels and evaluation ------------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> None:
        """Create the layers that output ``num_classes`` logits (subclasses)."""
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

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes or 0)]

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

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on float32 logits (safe under autocast); label ``-100`` is ignored. The first batch's
        labels are checked against the head's classes (the datamodules check every label at setup; a plain
        loader would otherwise fail inside the loss, on a GPU as an opaque device-side assert)."""
        if not getattr(self, "_label_range_checked", False):
            check_label_range(labels, logits.shape[-1])
            self._label_range_checked = True
        smoothing = float(self.hparams.get("label_smoothing", 0.0))
        return F.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=smoothing)

    def log_training(self, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.train_metrics.update(logits.detach(), labels)  # logged once, at the epoch's end

    def accumulate_epoch_mean(self, name: str, value: Tensor, weight: int) -> None:
        """Add a training step's ``value`` (weighted by ``weight`` samples) to ``name``'s epoch mean, logged at the
        epoch's end: one ``self.log`` per epoch instead of one per step, and no host sync."""
        sums = getattr(self, "_epoch_mean_sums", None)
        if sums is None:
            sums = self._epoch_mean_sums = {}
        pair = torch.stack([value.detach().double() * weight, value.new_tensor(float(weight), dtype=torch.float64)])
        sums[name] = sums[name] + pair if name in sums else pair

    def on_train_epoch_end(self) -> None:
        """The epoch's training accuracy and macro-F1 and the :meth:`accumulate_epoch_mean` values, each over
        every process's samples, computed once."""
        metrics = getattr(self, "train_metrics", None)
        if metrics is not None and any(m.update_called for m in metrics.values()):
            self.log_dict(metrics.compute())
            metrics.reset()
        sums = getattr(self, "_epoch_mean_sums", None)
        if sums:
            names = sorted(sums)
            totals = self.trainer.strategy.reduce(torch.stack([sums[n] for n in names]), reduce_op="sum")
            self.log_dict({n: (t[0] / t[1]).float() for n, t in zip(names, totals)})
            self._epoch_mean_sums = {}

    def log_evaluation(self, stage: str, logits: Tensor, labels: Tensor) -> None:
        """Loss (synchronised across processes), accuracy, macro-F1 and the confusion matrix of ``stage``."""
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confusion = self.val_confusion if stage == "val" else self.test_confusion
        loss_mean = self.val_loss if stage == "val" else self.test_loss
        labelled = int((labels != -100).sum())
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

    def on_predict_epoch_start(self) -> None:
        self._predict_offsets: dict[int, int] = {}

    def prediction_index(self, batch: Any, count: int, dataloader_idx: int = 0) -> Tensor:
        """The batch's ``index`` (sample ids), else positions counted per dataloader (a short last batch included)."""
        index = batch.get("index") if isinstance(batch, Mapping) else None
        offsets = self.__dict__.setdefault("_predict_offsets", {})
        start = offsets.get(dataloader_idx, 0)
        offsets[dataloader_idx] = start + count
        return index if index is not None else torch.arange(start, start + count, device=self.device)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint records about this module beyond its state dict (subclasses extend)."""
        return {
            "module": type(self).__name__,
            "num_classes": self.num_classes,
            "class_names": self.hparams.get("class_names"),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tlmodules"] = self.checkpoint_meta()

    def check_checkpoint_meta(self, checkpoint: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written by another module type, with a message that says so."""
        meta = checkpoint.get("tlmodules")
        if meta is None:
            raise ConfigError("this checkpoint was not written by tlmodules (no 'tlmodules' entry)")
        if meta.get("module") != type(self).__name__:
            raise ConfigError(
                f"this checkpoint was written by {meta.get('module')}, not {type(self).__name__}; "
                f"load it with {meta.get('module')}, or use it as a backbone with backbone='ckpt:<path>'"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's module type and label space; size the classifier from it when unsized."""
        self.check_checkpoint_meta(checkpoint)
        meta = checkpoint["tlmodules"]
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
