"""Multi-task learning: one shared trunk, one head per task, losses combined by a weighting strategy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from tlmodules.backbones import Backbone, build_backbone
from tlmodules.base import OptimizerName, ParamGroup, TransferModule
from tlmodules.dense import DenseHead, FPNDecoder, StagePlan, multi_scale_features, plan_stages, pooled_features
from tlmodules.dense_logging import iou_table, log_dense_images, log_text, overlay_grid
from tlmodules.dense_tasks import (
    DENSE_KINDS,
    dense_labelled,
    dense_loss,
    dense_metric_inputs,
    dense_metrics,
    dense_prediction,
    dense_scores,
    is_dense,
    score_key,
)
from tlmodules.errors import ConfigError
from tlmodules.heads import HeadKind, build_head, check_head
from tlmodules.labels import IGNORE_INDEX
from tlmodules.nets import MLPFeatures
from tlmodules.schedules import LRSchedule
from tlmodules.weighting import WEIGHTINGS, LossWeighting, build_weighting

TASK_KINDS = ("multiclass", "binary", "multilabel", "regression", *DENSE_KINDS)
MAX_MASK_CLASSES = 256  # predicted masks are written as 8-bit PNGs


def check_tasks(tasks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate task dicts ``{"name", "kind", "num_outputs", ["weight"], ["head"], ["head_hidden"], ["class_names"],
    ["target_mean"], ["target_std"]}``."""
    if not tasks:
        raise ConfigError("tasks is empty: give at least one {name, kind, num_outputs} (the datamodule's 'tasks')")
    checked, names = [], set()
    for task in tasks:
        task = dict(task)
        name, kind = task.get("name"), task.get("kind")
        if not name or name in names:
            raise ConfigError(f"every task needs a unique name; got {name!r} in {[t.get('name') for t in tasks]}")
        if kind not in TASK_KINDS:
            raise ConfigError(f"task {name!r} has kind {kind!r}; choose one of {list(TASK_KINDS)}")
        outputs = task.get("num_outputs") or (1 if kind in ("binary", "regression", "mask") else None)
        least = 2 if kind in ("multiclass", "multilabel", "segmentation") else 1
        if not isinstance(outputs, int) or outputs < least:
            raise ConfigError(f"task {name!r} ({kind}) needs num_outputs >= {least}")
        if kind == "segmentation" and outputs > MAX_MASK_CLASSES:
            raise ConfigError(f"task {name!r} has {outputs} classes; predicted masks hold at most {MAX_MASK_CLASSES}")
        if kind == "mask" and outputs != 1:
            raise ConfigError(f"task {name!r} (mask) has one output per pixel; got num_outputs={outputs}")
        weights = task.get("class_weights")
        if weights is not None and (kind != "segmentation" or len(weights) != outputs):
            raise ConfigError(
                f"task {name!r}: class_weights needs a segmentation task and one weight per class ({outputs}); "
                f"got {len(weights)} for a {kind} task"
            )
        std = torch.as_tensor(task.get("target_std", 1.0), dtype=torch.float64)
        if kind == "regression" and not bool((std > 0).all()):
            raise ConfigError(f"task {name!r} has target_std={task['target_std']!r}; it must be positive")
        task["num_outputs"] = outputs
        names.add(name)
        checked.append(task)
    return checked


def task_metrics(task: Mapping[str, Any], prefix: str) -> MetricCollection:
    """Accuracy and macro-F1 (classification), MAE, RMSE and R² (regression), or a dense task's confusion
    matrix (:func:`tlmodules.dense_tasks.dense_metrics`), as ``<prefix><metric>``."""
    if is_dense(task):
        return dense_metrics(task, prefix)
    if task["kind"] == "multiclass":
        n = task["num_outputs"]
        metrics = {
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
        }
    elif task["kind"] == "binary":
        metrics = {"acc": BinaryAccuracy(), "f1_macro": BinaryF1Score()}
    elif task["kind"] == "multilabel":  # acc: the mean over labels of per-label accuracy
        n = task["num_outputs"]
        metrics = {"acc": MultilabelAccuracy(n, average="micro"), "f1_macro": MultilabelF1Score(n, average="macro")}
    else:
        outputs = task["num_outputs"]
        metrics = {
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
            "r2": R2Score(multioutput="uniform_average") if outputs > 1 else R2Score(),
        }
    return MetricCollection(metrics, prefix=prefix)


class MultiTaskModule(TransferModule):
    """One shared trunk, one head per task (Caruana, "Multitask Learning", Machine Learning 1997), the
    per-task losses combined by a weighting strategy (:mod:`tlmodules.weighting`).

    ``inputs → trunk → features (B, W) → head_t → outputs_t``: ``(B, C_t)`` logits for ``multiclass``,
    ``(B,)`` logits for ``binary``, ``(B, K_t)`` logits (one per label) for ``multilabel``, ``(B,)`` or
    ``(B, D_t)`` values for ``regression``. A regression head learns standardised targets
    ``(y - target_mean) / target_std`` (the task's statistics, which ``MultiTaskDataModule`` takes from the
    training split), so tasks of any scale train alike and the loss is the mean squared error in standard
    units; outputs, metrics and predictions are in the target's own units. A multilabel task's loss is the
    binary cross-entropy averaged over samples and labels; its labels are ``(B, K_t)`` 0/1 floats.

    **Dense tasks** (Long, Shelhamer & Darrell, "Fully Convolutional Networks", CVPR 2015): ``segmentation``
    (logits ``(B, C, H, W)``, labels ``(B, H, W)`` class indices, void pixels ``IGNORE_INDEX``; optional per-class
    ``class_weights``) and ``mask`` (logits ``(B, H, W)``, labels 0/1 with NaN for void pixels), see
    :mod:`tlmodules.dense_tasks`. With any dense task the trunk is spatial: the backbone's stages give feature
    maps at strides 4–32 (:func:`tlmodules.dense.plan_stages`), an FPN decoder (``decoder_channels`` wide) merges
    them into one stride-4 map, and each dense head is a 1×1 convolution upsampled to the input's size; the
    per-image heads read the global average of the coarsest map. Metrics: ``miou``, ``pixel_acc`` and
    ``iou/<class>`` (segmentation), ``iou`` and ``acc`` (mask), from one confusion matrix per stage; a
    TensorBoard logger also gets image / truth / prediction overlays and the per-class IoU table at validation.

    Batches are ``{"inputs": ..., "labels": {task: tensor}}``. **Partial labels**: a missing label is
    :data:`~tlmodules.labels.IGNORE_INDEX` (multiclass) or NaN (binary, regression; a row of NaN for
    multilabel); such samples add nothing to that task's loss or metrics, and a task with no label in a batch
    has no loss there (the weighting skips it) while its head still takes part in the graph with a zero
    gradient, so DDP sees every parameter used.

    Logged: ``train/loss``, ``train/<task>/loss_step`` every step and ``train/<task>/loss_epoch`` (the mean over
    the epoch's labelled samples), ``train/weight/<task>`` every logged step (and what the
    weighting adds, e.g. ``train/log_var/<task>``); ``<stage>/<task>/<metric>`` (acc, f1_macro; mae,
    rmse, r2) and ``<stage>/score``, the mean over tasks of accuracy (classification) and R²
    (regression), which is also ``hp_metric``.

    Args:
        backbone: a backbone spec (see :mod:`tlmodules.backbones`), a module, or ``"mlp"``: an MLP trunk
            (``trunk_hidden`` × ``trunk_depth``) for numeric feature vectors of ``in_features`` columns.
        tasks: task dicts ``{"name", "kind", "num_outputs", "weight"?, "head"?, "head_hidden"?, "class_names"?,
            "target_mean"?, "target_std"?}``
            (``MultiTaskDataModule.tasks`` has this form). Left out, the model takes the datamodule's
            ``tasks`` and ``in_features`` in ``setup`` (how the CLI builds it).
        weighting: ``equal``, ``static`` (each task's ``weight``, default 1), ``uncertainty`` (Kendall et al.
            2018), ``dwa`` (Liu et al. 2019) or ``rlw`` (Lin et al. 2022); ``weighting_args`` go to it.
        head, head_hidden, dropout: every task's head, ``linear`` or ``mlp`` of ``head_hidden`` units (a task dict's
            own ``head`` / ``head_hidden`` win), and the dropout of heads and the ``mlp`` trunk.
        decoder_channels: width of the FPN decoder of dense tasks.
        overlay_images: validation images shown as overlays in TensorBoard per validation (0: none).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "mlp",
        weights: str | None = "DEFAULT",
        tasks: list[dict[str, Any]] | None = None,
        weighting: Literal["equal", "static", "uncertainty", "dwa", "rlw"] = "equal",
        weighting_args: dict[str, Any] | None = None,
        in_features: int | None = None,
        trunk_hidden: int = 64,
        trunk_depth: int = 2,
        head: HeadKind = "linear",
        head_hidden: int = 256,
        dropout: float = 0.0,
        lr: float = 1e-3,
        backbone_lr_ratio: float = 1.0,
        weight_decay: float = 0.01,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.9,
        lr_schedule: LRSchedule = "cosine",
        warmup_fraction: float = 0.0,
        pooling: Literal["mean", "cls", "max"] = "mean",
        trust_remote_code: bool = False,
        num_features: int | None = None,
        pretrained: bool = True,
        decoder_channels: int = 64,
        overlay_images: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if decoder_channels < 1:
            raise ConfigError(f"decoder_channels must be >= 1, got {decoder_channels}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {weighting!r}; accepted names: {list(WEIGHTINGS)!r}")
        check_head(head, head_hidden)  # an unknown head or a zero-width MLP fails now
        object.__setattr__(self, "_backbone_spec", backbone)  # a module given here is registered once built
        self.tasks: list[dict[str, Any]] = []
        self.stage_plan: StagePlan | None = None  # set by build() when a task is per-pixel
        if tasks is not None:
            self.build(tasks, in_features)

    # -- construction ------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return bool(self.tasks)

    def build(self, tasks: Sequence[Mapping[str, Any]], in_features: int | None) -> None:
        """Create trunk, heads, weighting and metrics for ``tasks`` (at construction when they are given,
        else in :meth:`setup` from the datamodule's ``tasks`` and ``in_features``)."""
        hp = self.hparams
        self.tasks = check_tasks(tasks)
        self.task_names = [t["name"] for t in self.tasks]
        self.update_hparams(tasks=self.tasks, in_features=in_features)
        backbone = self._backbone_spec
        if isinstance(backbone, str) and backbone == "mlp":
            if not in_features:
                raise ConfigError("backbone 'mlp' needs in_features (the number of numeric input columns)")
            backbone = MLPFeatures(in_features, hp.trunk_hidden, hp.trunk_depth, hp.dropout)
        self.backbone: Backbone = build_backbone(
            backbone,
            weights=hp.weights,
            pooling=hp.pooling,
            trust_remote_code=hp.trust_remote_code,
            num_features=hp.num_features,
            pretrained=hp.pretrained,
        )
        width = self.backbone.num_features
        self.stage_plan = None
        if any(is_dense(t) for t in self.tasks):  # a spatial trunk: the backbone's feature maps and a decoder
            preprocessing = self.backbone.preprocessing
            channels = (preprocessing.in_channels if preprocessing is not None else None) or 3
            self.stage_plan = plan_stages(self.backbone.body, channels)
            self.decoder = FPNDecoder(self.stage_plan.channels, hp.decoder_channels)
            width = self.stage_plan.channels[-1]
        self.heads = nn.ModuleDict(
            {
                t["name"]: DenseHead(hp.decoder_channels, t["num_outputs"])
                if is_dense(t)
                else build_head(
                    t.get("head", hp.head), width, t["num_outputs"], t.get("head_hidden", hp.head_hidden), hp.dropout
                )
                for t in self.tasks
            }
        )
        arguments = dict(hp.weighting_args or {})
        if hp.weighting == "static":
            arguments.setdefault("weights", {t["name"]: float(t.get("weight", 1.0)) for t in self.tasks})
        if hp.weighting == "uncertainty":
            arguments.setdefault("kinds", {t["name"]: t["kind"] for t in self.tasks})
        self.weighting: LossWeighting = build_weighting(hp.weighting, self.task_names, **arguments)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{t['name']}": task_metrics(t, f"{stage}/{t['name']}/")
                for stage in ("val", "test")
                for t in self.tasks
            }
        )

    def setup(self, stage: str) -> None:
        """Build from the datamodule's task list when the model was made without one (the CLI's way);
        otherwise check that the data's tasks are the model's."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_tasks = getattr(datamodule, "tasks", None)
        if not self.built:
            if not data_tasks:
                raise ConfigError(
                    "MultiTaskModule has no tasks: pass tasks=[...] or train with a MultiTaskDataModule, "
                    "whose task list (and numeric input width) the model takes"
                )
            self.build(data_tasks, self.hparams.in_features or getattr(datamodule, "in_features", None))
        elif data_tasks:
            theirs = [(t["name"], t["kind"], t["num_outputs"]) for t in check_tasks(data_tasks)]
            mine = [(t["name"], t["kind"], t["num_outputs"]) for t in self.tasks]
            if theirs != mine:
                raise ConfigError(f"the data's tasks {theirs} differ from the model's {mine}; use one task list")

    # -- forward and losses ------------------------------------------------------------------------
    @property
    def dense(self) -> bool:
        """Whether the model has per-pixel tasks (and so a spatial trunk)."""
        return self.stage_plan is not None

    def features(self, inputs: Any) -> Tensor:
        """The per-image heads' features ``(B, W)``: the backbone's, or with dense tasks the global average of
        the coarsest feature map."""
        if not self.dense:
            return super().features(inputs)
        return pooled_features(multi_scale_features(self.backbone.body, self.stage_plan, inputs))

    def forward(self, inputs: Any) -> dict[str, Tensor]:
        """Inputs → ``{task: outputs}`` (logits or values, shapes in the class docstring)."""
        decoded = None
        if self.dense:
            maps = multi_scale_features(self.backbone.body, self.stage_plan, inputs)
            features, decoded = pooled_features(maps), self.decoder(maps)
        else:
            features = self.features(inputs)
        outputs = {}
        for task in self.tasks:
            if is_dense(task):
                out = self.heads[task["name"]](decoded, tuple(inputs.shape[-2:]))
                outputs[task["name"]] = out.squeeze(1) if task["kind"] == "mask" else out
                continue
            out = self.heads[task["name"]](features)
            single = task["kind"] in ("binary", "regression") and out.shape[-1] == 1
            out = out.squeeze(-1) if single else out
            if task["kind"] == "regression":  # the head predicts standardised values
                mean, std = self.target_scale(task, out)
                out = out * std + mean
            outputs[task["name"]] = out
        return outputs

    @staticmethod
    def target_scale(task: Mapping[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
        """A regression task's ``target_mean`` and ``target_std`` (scalars or ``(D,)``; default 0 and 1) as
        tensors on ``like``'s device: the head learns ``(y - mean) / std``, the model answers ``y``."""
        mean = torch.as_tensor(task.get("target_mean", 0.0), dtype=like.dtype, device=like.device)
        std = torch.as_tensor(task.get("target_std", 1.0), dtype=like.dtype, device=like.device)
        return mean, std

    @staticmethod
    def labelled(task: Mapping[str, Any], labels: Tensor) -> Tensor:
        """Boolean mask ``(B,)`` of the samples that carry this task's label (dense: at least one pixel's)."""
        if is_dense(task):
            return dense_labelled(task, labels)
        if task["kind"] == "multiclass":
            return labels != IGNORE_INDEX
        missing = torch.isnan(labels)
        return ~missing.flatten(1).any(1) if missing.dim() > 1 else ~missing

    def task_loss(
        self, task: Mapping[str, Any], output: Tensor, labels: Tensor, mask: Tensor | None = None
    ) -> Tensor | None:
        """The task's mean loss over its labelled samples (``mask``, else :meth:`labelled`); ``None`` when the
        batch has none."""
        mask = self.labelled(task, labels) if mask is None else mask
        return self._labelled_loss(task, output[mask].float(), labels[mask]) if bool(mask.any()) else None

    def _labelled_loss(self, task: Mapping[str, Any], output: Tensor, labels: Tensor) -> Tensor:
        if is_dense(task):
            return dense_loss(task, output, labels)
        if task["kind"] == "multiclass":
            return F.cross_entropy(output, labels.long())
        if task["kind"] in ("binary", "multilabel"):  # multilabel: the mean over samples and labels
            return F.binary_cross_entropy_with_logits(output, labels.float())
        _, std = self.target_scale(task, output)  # mean squared error of standardised values
        return F.mse_loss(output / std, labels.float() / std)

    # -- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParamGroup]:
        groups = [
            ParamGroup("backbone", list(self.backbone.parameters()), self.hparams.backbone_lr_ratio),
            ParamGroup("head", list(self.heads.parameters()), 1.0),
        ]
        if self.dense:  # the decoder is new, like the heads
            groups.insert(1, ParamGroup("decoder", list(self.decoder.parameters()), 1.0))
        extra = list(self.weighting.parameters())
        if extra:  # uncertainty weighting's log-variances, trained by the same optimizer
            groups.append(ParamGroup("weighting", extra, 1.0))
        return groups

    # -- steps -------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        outputs = self(batch["inputs"])
        labels = batch["labels"]
        masks = {t["name"]: self.labelled(t, labels[t["name"]]) for t in self.tasks}
        losses = {
            t["name"]: self.task_loss(t, outputs[t["name"]], labels[t["name"]], masks[t["name"]]) for t in self.tasks
        }
        total, logged = self.weighting(losses, self.global_step)
        # every head and weighting parameter stays in the graph (zero gradient where a task has no label)
        anchor = sum(out.float().sum() for out in outputs.values())
        anchor = anchor + sum(p.sum() for p in self.weighting.parameters())
        total = total + 0.0 * anchor
        batch_size = len(next(iter(labels.values())))
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        for task in self.tasks:
            name, loss = task["name"], losses[task["name"]]
            if loss is not None:
                self.log(f"train/{name}/loss_step", loss, on_step=True, on_epoch=False, batch_size=batch_size)
            # every task, every step (weight 0 without labels), so that every process reduces the same names
            value = loss if loss is not None else total.new_zeros(())
            self.accumulate_epoch_mean(f"train/{name}/loss_epoch", value, masks[name].sum())
        if self.logging_step():  # per-step values: only on the steps the logger writes
            self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False)
        self.log_learning_rates()
        return total

    def on_train_epoch_means(self, means: dict[str, Tensor]) -> None:
        """Each task's mean training loss of the epoch (every process's labelled samples) to the weighting (DWA)."""
        epoch_losses = {
            n: float(means[f"train/{n}/loss_epoch"]) for n in self.task_names if f"train/{n}/loss_epoch" in means
        }
        self.weighting.end_epoch(epoch_losses)

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        outputs = self(batch["inputs"])
        for task in self.tasks:
            name, labels = task["name"], batch["labels"][task["name"]]
            mask = self.labelled(task, labels)
            if not bool(mask.any()):
                continue
            output, target = outputs[name][mask].float(), labels[mask]
            if is_dense(task):
                output, target = dense_metric_inputs(task, output, target)
            elif task["kind"] in ("binary", "multilabel"):
                output, target = output.sigmoid(), target.long()
            self.metrics[f"{stage}_{name}"].update(output, target)
        if stage == "val" and self.dense:
            self._log_overlays(batch, outputs)

    def _log_overlays(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        """Image / truth / prediction of the first segmentation task for the first validation images, on the
        first process, to a TensorBoard logger (once per validation, not in the sanity check)."""
        shown = self.hparams.overlay_images
        done = getattr(self, "_overlays_shown", 0)
        task = next((t for t in self.tasks if t["kind"] == "segmentation"), None)
        if task is None or shown <= 0 or done >= shown or self.trainer.sanity_checking or self.global_rank != 0:
            return
        name, count = task["name"], min(shown - done, len(batch["inputs"]))
        grid = overlay_grid(
            batch["inputs"][:count].float(),
            batch["labels"][name][:count],
            outputs[name][:count].argmax(1),
            task["num_outputs"],
            max_images=count,
        )
        log_dense_images(self.logger, f"val/{name}/overlay_{done}", grid, self.global_step)
        self._overlays_shown = done + count

    def on_validation_epoch_start(self) -> None:
        self._overlays_shown = 0

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_stage(self, stage: str) -> dict[str, Tensor]:
        logged: dict[str, Tensor] = {}
        scores = []
        for task in self.tasks:
            metrics = self.metrics[f"{stage}_{task['name']}"]
            if any(m.update_called for m in metrics.values()):
                values = metrics.compute()
                prefix = f"{stage}/{task['name']}/"
                if is_dense(task):
                    values = dense_scores(task, values[f"{prefix}confusion"], prefix)
                    self._log_iou_table(task, values, prefix)
                key = score_key(task) if is_dense(task) else "r2" if task["kind"] == "regression" else "acc"
                logged.update(values)
                scores.append(values[f"{prefix}{key}"])
            metrics.reset()
        if scores:
            logged[f"{stage}/score"] = torch.stack([s.float() for s in scores]).mean()
        self.log_dict(logged)
        return logged

    def _log_iou_table(self, task: Mapping[str, Any], scores: Mapping[str, Tensor], prefix: str) -> None:
        """The per-class IoU table of a segmentation task (its :func:`dense_scores`) as TensorBoard text, on the
        first process only."""
        if task["kind"] != "segmentation" or self.global_rank != 0 or self.trainer.sanity_checking:
            return
        names = task.get("class_names") or [str(c) for c in range(task["num_outputs"])]
        iou = torch.stack([scores[f"{prefix}iou/{name}"] for name in names])
        table = iou_table(names, iou, float(scores[f"{prefix}pixel_acc"]))
        log_text(self.logger, f"{prefix}iou_table", table, self.global_step)

    def on_validation_epoch_end(self) -> None:
        logged = self._log_stage("val")
        if "val/score" in logged:
            self.log("hp_metric", logged["val/score"])

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"index", task: probabilities (classification) or values (regression) or ``(B, H, W)`` uint8 masks
        (dense: class indices, or 0/1), "sizes"?}``; ``sizes`` ``(B, 2)``, each image's size before the batch was
        padded, when the batch has it."""
        outputs = self(batch["inputs"])
        result: dict[str, Any] = {"index": self.prediction_index(batch, len(next(iter(outputs.values()))))}
        if isinstance(batch, Mapping) and "sizes" in batch:
            result["sizes"] = batch["sizes"]
        for task in self.tasks:
            out = outputs[task["name"]].float()
            if is_dense(task):
                result[task["name"]] = dense_prediction(task, out)
                continue
            result[task["name"]] = (
                out.softmax(-1)
                if task["kind"] == "multiclass"
                else out.sigmoid()
                if task["kind"] in ("binary", "multilabel")
                else out
            )
        return result

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "tasks": self.tasks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another task list; the trained heads' target scaling wins over the statistics of whatever data
        built this model."""
        super().on_load_checkpoint(checkpoint)
        saved = [(t["name"], t["kind"], t["num_outputs"]) for t in checkpoint["tlmodules"].get("tasks", [])]
        mine = [(t["name"], t["kind"], t["num_outputs"]) for t in self.tasks]
        if saved != mine:
            raise ConfigError(f"the checkpoint's tasks {saved} differ from this model's {mine}; use the same task list")
        for task, saved_task in zip(self.tasks, checkpoint["tlmodules"]["tasks"]):
            for key in ("target_mean", "target_std"):
                if key in saved_task:
                    task[key] = saved_task[key]
