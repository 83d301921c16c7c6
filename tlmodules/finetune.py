"""Fine-tuning a pretrained backbone under a new classification head."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from tlmodules.backbones import Backbone, TransformerBackbone, build_backbone, origin_dict
from tlmodules.base import OptimizerName, ParamGroup, TransferModule, unpack_batch
from tlmodules.freezing import LateParameterSync, eval_frozen_submodules
from tlmodules.heads import ClassificationHead
from tlmodules.regularizers import L2SP
from tlmodules.schedules import (
    STRATEGIES,
    FinetuneStrategy,
    LRSchedule,
    layer_lr_multipliers,
    trainable_top_groups,
)

EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class FineTuneModule(TransferModule):
    """A pretrained backbone with a new head, trained under a freezing strategy.

    Strategies (see :func:`tlmodules.schedules.trainable_top_groups`): ``full``, ``freeze``
    (linear probe), ``freeze_unfreeze`` (head first, everything from ``unfreeze_epoch``),
    ``gradual`` (ULMFiT: one more layer group per epoch from the top) and ``lp_ft`` (Kumar et al.
    2022: linear probe, then everything at the backbone's rate, head included).

    Learning rates: the head trains at ``lr``; backbone group ``i`` of ``G`` at
    ``lr · backbone_lr_ratio · layer_decay^(G-1-i)`` (no decay when ``layer_decay`` is unset).
    Options: L2-SP (``l2sp_alpha``, ``l2sp_beta``; Li et al. 2018), LoRA adapters for transformer
    backbones (``lora_rank > 0``, needs ``peft``; Hu et al. 2022).

    Args:
        backbone: a spec (``torchvision:resnet18``, ``hf:<folder>``, ``pkg:<package>/<folder>``,
            ``ckpt:<path>``, ``builtin:lenet``) or an ``nn.Module`` (with ``num_features``).
        weights: torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, …, ``none``).
        num_classes: size of the new head; taken from the datamodule's ``num_classes`` when unset.
        class_names: names for the confusion matrix and predictions; from the datamodule when unset.
        head: ``linear`` or ``mlp`` (one hidden layer of ``head_hidden`` units, with ``dropout``).
        pretrained: fetch the pretrained weights; ``False`` builds the architecture only, for
            weights that a checkpoint will overwrite (``load_from_checkpoint`` does this itself).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "builtin:lenet",
        weights: str | None = "DEFAULT",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        head: Literal["linear", "mlp"] = "linear",
        head_hidden: int = 256,
        dropout: float = 0.0,
        strategy: FinetuneStrategy = "full",
        unfreeze_epoch: int = 1,
        lr: float = 1e-3,
        backbone_lr_ratio: float = 1.0,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.9,
        lr_schedule: LRSchedule = "cosine",
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
        l2sp_alpha: float = 0.0,
        l2sp_beta: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        pooling: Literal["mean", "cls", "max"] = "mean",
        trust_remote_code: bool = False,
        num_features: int | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if unfreeze_epoch < 0:
            raise ValueError(f"unfreeze_epoch must be >= 0, got {unfreeze_epoch}")
        if lr <= 0 or backbone_lr_ratio < 0:
            raise ValueError(f"lr must be positive and backbone_lr_ratio >= 0, got {lr} and {backbone_lr_ratio}")
        self.backbone: Backbone = build_backbone(
            backbone,
            weights=weights,
            pooling=pooling,
            trust_remote_code=trust_remote_code,
            num_features=num_features,
            pretrained=pretrained,
        )
        if lora_rank > 0:
            if not isinstance(self.backbone, TransformerBackbone):
                raise ValueError("LoRA (lora_rank > 0) is offered for transformer backbones (hf:/pkg: specs)")
            from tlmodules.lora import apply_lora

            apply_lora(self.backbone, lora_rank, lora_alpha, lora_dropout, lora_targets)
            if self.backbone.origin is not None:
                self.backbone.origin.extra["lora_rank"] = lora_rank
        self.head: ClassificationHead | None = None
        self.l2sp = L2SP(self.backbone.named_parameters(), l2sp_alpha, l2sp_beta) if l2sp_alpha or l2sp_beta else None
        self._late_sync = LateParameterSync()
        self._trainable_epoch = 0
        if num_classes is not None:
            self._build_head(num_classes)
        self.apply_trainable(0)

    # -- construction -----------------------------------------------------------------------------
    def _build_head(self, num_classes: int) -> None:
        hp = self.hparams
        hidden = hp.head_hidden if hp.head == "mlp" else 0
        self.head = ClassificationHead(self.backbone.num_features, num_classes, hidden, hp.dropout)
        self.update_hparams(num_classes=num_classes)
        self._build_classification_metrics(num_classes)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> FineTuneModule:
        """Lightning's loader, but without fetching pretrained weights that the checkpoint overwrites
        (pass ``pretrained=True`` to fetch them anyway)."""
        kwargs.setdefault("pretrained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if not data_classes:  # a prediction-only datamodule has no label set (0 classes): nothing to check
            data_classes = None
        if self.head is None and data_classes is None and stage != "fit":
            return  # evaluating or predicting from a checkpoint: on_load_checkpoint sizes the head
        if self.head is None:
            if data_classes is None:
                raise ValueError(
                    "num_classes is unknown: pass num_classes=<n> or use a datamodule with a num_classes attribute"
                )
            self._build_head(int(data_classes))
        elif data_classes is not None and int(data_classes) != self.head.num_classes:
            raise ValueError(
                f"num_classes={self.head.num_classes} in the model disagrees with the data, which has "
                f"{data_classes} classes ({getattr(datamodule, 'class_names', None)}); set num_classes={data_classes}"
            )
        if self.hparams.class_names is None and data_classes is not None and getattr(datamodule, "class_names", None):
            self.update_hparams(class_names=list(datamodule.class_names))
        self.apply_trainable(self._trainable_epoch)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        return list(names) if names else [str(i) for i in range(self.head.num_classes)]

    def _require_head(self) -> None:
        if self.head is None:
            raise ValueError(
                "the model has no head yet: give num_classes, a datamodule with labels, or ckpt_path=<checkpoint>"
            )

    def on_validation_start(self) -> None:
        self._require_head()

    def on_test_start(self) -> None:
        self._require_head()

    def on_predict_start(self) -> None:
        self._require_head()

    # -- freezing ---------------------------------------------------------------------------------
    def trainable_top_groups(self, epoch: int) -> int:
        hp = self.hparams
        return trainable_top_groups(hp.strategy, epoch, self.backbone.num_groups, hp.unfreeze_epoch)

    def apply_trainable(self, epoch: int) -> int:
        """Set which backbone groups train during ``epoch``; frozen groups go to eval mode."""
        groups = self.backbone.num_groups
        top = self.trainable_top_groups(epoch)
        adapters = self.backbone.adapter_names
        params = dict(self.backbone.body.named_parameters())
        for i in range(groups):
            unfrozen = i >= groups - top
            for name in self.backbone.group_names(i):
                params[name].requires_grad_(unfrozen and (not adapters or name in adapters))
        self._trainable_epoch = epoch
        if self.training:
            self.backbone.train()
            eval_frozen_submodules(self.backbone)
        return top

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        if mode:
            eval_frozen_submodules(self.backbone)
        return self

    def on_fit_start(self) -> None:
        self._late_sync.record(self, wrapped_by_ddp=self.trainer.world_size > 1)
        # Frozen layers are in eval mode on purpose (their BatchNorm statistics and dropout stay fixed).
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)

    def on_train_start(self) -> None:
        # Resuming from a checkpoint written on an epoch's last batch, Lightning enters the next epoch
        # without calling on_train_epoch_start; the trainable state must still follow the epoch. What
        # this unfreezes was frozen at on_fit_start, so LateParameterSync averages it under DDP.
        super().on_train_start()
        if self._trainable_epoch != self.current_epoch:
            self.apply_trainable(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # the epoch's learning rates (LP-FT's head rate) from its first step
        top = self.apply_trainable(self.current_epoch)
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self.log("trainable/backbone_groups", float(top), on_step=False, on_epoch=True)
        self.log("trainable/fraction", trainable / max(1, total), on_step=False, on_epoch=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._late_sync.sync()

    # -- optimisation -----------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParamGroup]:
        hp = self.hparams
        mults = layer_lr_multipliers(self.backbone.num_groups, hp.backbone_lr_ratio, hp.layer_decay)
        groups = [
            ParamGroup(f"backbone.{i}", self.backbone.group_parameters(i), mults[i])
            for i in range(self.backbone.num_groups)
        ]
        return [*groups, ParamGroup("head", list(self.head.parameters()), 1.0)]

    def dynamic_lr_factor(self, group_name: str) -> float:
        """LP-FT: after the probe phase the head drops to the backbone's rate."""
        hp = self.hparams
        in_ft_phase = self._trainer is not None and self.current_epoch >= hp.unfreeze_epoch
        if hp.strategy == "lp_ft" and group_name == "head" and in_ft_phase:
            return hp.backbone_lr_ratio
        return 1.0

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> Tensor:
        """Inputs (images ``(B, C, H, W)`` or a tokenizer batch) → logits ``(B, num_classes)``."""
        return self.head(self.backbone(inputs))

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = unpack_batch(batch)
        logits = self(inputs)
        loss = self._loss(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        if self.l2sp is not None:
            penalty = self.l2sp.penalty(self.backbone.named_parameters(), self.head.parameters())
            self.log("train/l2sp", penalty, on_step=True, on_epoch=False)
            loss = loss + penalty
        self.train_metrics.update(logits.detach(), labels)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        self.log_learning_rates()
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        inputs, labels = unpack_batch(batch)
        logits = self(inputs)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confusion = self.val_confusion if stage == "val" else self.test_confusion
        loss = self._loss(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(labels), sync_dist=True)
        metrics.update(logits, labels)
        confusion.update(logits, labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log("hp_metric", self.val_metrics["acc"].compute())
        self.log_confusion_matrix(self.val_confusion, "val/confusion_matrix", self.class_names)

    def on_test_epoch_end(self) -> None:
        self.log_confusion_matrix(self.test_confusion, "test/confusion_matrix", self.class_names)

    def on_predict_epoch_start(self) -> None:
        self._predict_offsets = {}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"index": (B,), "probs": (B, num_classes)}``; without an ``index`` in the batch, the
        sample's position in its dataloader (counted, so a short last batch is numbered right)."""
        inputs, _ = unpack_batch(batch)
        probs = self(inputs).float().softmax(-1)
        index = batch.get("index") if isinstance(batch, dict) else None
        offsets = self.__dict__.setdefault("_predict_offsets", {})
        start = offsets.get(dataloader_idx, 0)
        offsets[dataloader_idx] = start + len(probs)
        if index is None:
            index = torch.arange(start, start + len(probs), device=probs.device)
        return {"index": index, "probs": probs}

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            **super().checkpoint_meta(),
            "backbone": origin_dict(self.backbone),
            "num_classes": None if self.head is None else self.head.num_classes,
            "class_names": self.hparams.class_names,
            "trainable_epoch": self._trainable_epoch,
            "trainable_top_groups": self.trainable_top_groups(self._trainable_epoch),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.l2sp is not None:
            checkpoint["l2sp_anchor"] = self.l2sp.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint["tlmodules"]
        saved = meta.get("num_classes")
        if self.head is None and saved is not None:
            self._build_head(int(saved))
            if self.hparams.class_names is None and meta.get("class_names"):
                self.update_hparams(class_names=list(meta["class_names"]))
        elif self.head is not None and saved is not None and saved != self.head.num_classes:
            raise ValueError(
                f"the checkpoint's head has {saved} classes but this model has {self.head.num_classes}; "
                f"to reuse its backbone for a new label set use backbone='ckpt:<path>'"
            )
        if self.l2sp is not None and "l2sp_anchor" in checkpoint:
            self.l2sp.load_state_dict(checkpoint["l2sp_anchor"])
        self.apply_trainable(int(meta.get("trainable_epoch", 0)))
