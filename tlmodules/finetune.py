"""Fine-tuning a pretrained backbone under a new classification head."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from tlmodules.backbones import Backbone, TransformerBackbone, build_backbone
from tlmodules.base import OptimizerName, ParamGroup, TransferModule, quiet_eval_mode_warning, unpack_batch
from tlmodules.classification import ClassificationMixin
from tlmodules.contrastive import (
    CLASS_WEIGHTS,
    ClassWeight,
    SupervisedContrastiveLoss,
    embed_split,
    fit_logistic_head,
    gather_in_sample_order,
    lone_anchor_share,
    share_rank_zero_buffers,
)
from tlmodules.errors import ConfigError, UserError
from tlmodules.freezing import LateParameterSync, eval_frozen_submodules
from tlmodules.heads import ClassificationHead, HeadKind, build_head, check_head
from tlmodules.regularizers import L2SP
from tlmodules.schedules import (
    FINETUNE_STRATEGIES,
    FinetuneStrategy,
    LRSchedule,
    layer_lr_multipliers,
    trainable_top_groups,
)

# warn when more than this share of contrastive anchors would have no same-class partner in a random batch
LONE_ANCHOR_WARNING = 0.1


class FineTuneModule(ClassificationMixin, TransferModule):
    """A pretrained backbone with a new head, trained under a freezing strategy.

    Strategies (see :func:`tlmodules.schedules.trainable_top_groups`): ``full``, ``freeze``
    (linear probe), ``freeze_unfreeze`` (head first, everything from ``unfreeze_epoch``),
    ``gradual`` (ULMFiT: one more layer group per epoch from the top), ``lp_ft`` (Kumar et al.
    2022: linear probe, then everything at the backbone's rate, head included) and ``contrastive``
    (for a few labelled examples per class, SetFit-style: Tunstall et al. 2022). Under ``contrastive``
    every step trains the whole backbone with a supervised contrastive loss on its pooled features
    ``(B, F)`` (SupCon, Khosla et al. 2020, ``contrastive_temperature``; :mod:`tlmodules.contrastive`),
    and the linear head, which sees L2-normalised features, is a logistic regression fitted on the
    training split's features whenever the backbone has moved and the head is needed: before each
    validation, when a checkpoint is written and when training ends. Each fit re-reads the training
    split once without gradients, a small cost for the few-label data this strategy is for.

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
        contrastive_temperature: SupCon's temperature τ under ``strategy="contrastive"``.
        contrastive_stop_gap: under ``strategy="contrastive"``, end the fit after the first epoch whose mean
            training loss is within this much of the loss's floor on the same batches
            (:meth:`SupervisedContrastiveLoss.floor`; logged as ``train/contrastive_gap``), i.e. once the
            training classes are nearly separated: a budget that follows the data without held-out labels.
            ``max_steps`` still caps the fit, ``min_steps`` still holds it. ``None`` (default): no such stop;
            on 8 examples per class (one batch per epoch) it cost 2 to 3 points (docs/finetune.md).
        contrastive_class_weight: under ``strategy="contrastive"``, the fitted head's class weights:
            ``"balanced"`` (default) weighs each class by ``N / (C · n_c)``, which changes nothing when the classes
            are balanced and keeps a class with few examples from being swamped by the others (an unweighted head
            on 8 against 56 examples can predict the majority class for everything); ``None``: unweighted, as
            SetFit (:func:`tlmodules.contrastive.fit_logistic_head`).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "builtin:lenet",
        weights: str | None = "DEFAULT",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        head: HeadKind = "linear",
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
        contrastive_temperature: float = 0.07,
        contrastive_stop_gap: float | None = None,
        contrastive_class_weight: ClassWeight = "balanced",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if strategy not in FINETUNE_STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(FINETUNE_STRATEGIES)}")
        if unfreeze_epoch < 0:
            raise ConfigError(f"unfreeze_epoch must be >= 0, got {unfreeze_epoch}")
        if lr <= 0 or backbone_lr_ratio < 0:
            raise ConfigError(f"lr must be positive and backbone_lr_ratio >= 0, got {lr} and {backbone_lr_ratio}")
        check_head(head, head_hidden)  # an unknown head or a zero-width MLP fails now, not at setup
        if strategy == "contrastive" and head != "linear":
            raise ConfigError(
                f"strategy 'contrastive' fits a logistic-regression head, which is linear; set head: linear "
                f"(got {head!r})"
            )
        if contrastive_temperature <= 0:
            raise ConfigError(f"contrastive_temperature must be positive, got {contrastive_temperature}")
        if contrastive_stop_gap is not None and contrastive_stop_gap <= 0:
            raise ConfigError(
                f"contrastive_stop_gap must be positive (or null for no stop on the training loss), "
                f"got {contrastive_stop_gap}"
            )
        if contrastive_class_weight not in CLASS_WEIGHTS:
            raise ConfigError(
                f"contrastive_class_weight must be 'balanced' or null (unweighted), got {contrastive_class_weight!r}"
            )
        self.contrastive_loss = (
            SupervisedContrastiveLoss(contrastive_temperature) if strategy == "contrastive" else None
        )
        self._head_fitted_step: int | None = None  # contrastive: the global step the head was last fitted at
        self.head_fit_samples = 0  # contrastive: how many training samples (all processes) the last fit saw
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
                raise ConfigError("LoRA (lora_rank > 0) is offered for transformer backbones (hf:/pkg: specs)")
            from tlmodules.lora import apply_lora

            apply_lora(self.backbone, lora_rank, lora_alpha, lora_dropout, lora_targets)
            if self.backbone.origin is not None:
                self.backbone.origin.extra["lora_rank"] = lora_rank
        self.head: ClassificationHead | None = None
        self.l2sp = L2SP(self.backbone.named_parameters(), l2sp_alpha, l2sp_beta) if l2sp_alpha or l2sp_beta else None
        self._late_sync = LateParameterSync()
        self._trainable_epoch = 0
        if num_classes is not None:
            self.size_classifier(num_classes)
        self.apply_trainable(0)

    # -- construction -----------------------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> None:
        hp = self.hparams
        self.head = build_head(
            hp.head,
            self.backbone.num_features,
            num_classes,
            hp.head_hidden,
            hp.dropout,
            normalize=hp.strategy == "contrastive",
        )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> FineTuneModule:
        """Lightning's loader, but without fetching pretrained weights that the checkpoint overwrites
        (pass ``pretrained=True`` to fetch them anyway)."""
        kwargs.setdefault("pretrained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        self.setup_labels(stage)
        self.apply_trainable(self._trainable_epoch)

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
        if self.head is not None and self.contrastive_loss is not None:
            # fitted, never trained: frozen, so DDP's reducer expects no gradient for it
            self.head.requires_grad_(False)
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
        quiet_eval_mode_warning()
        if self.contrastive_loss is not None:
            self._warn_of_lone_anchors()

    def _warn_of_lone_anchors(self) -> None:
        """SupCon learns nothing from an example without a same-class partner in its batch; with many classes
        random batches leave many of them so. Say so before the fit, with the fix (class-grouped batches)."""
        data = self.trainer.datamodule
        if data is None or getattr(data, "group_by_class", True) or "train" not in getattr(data, "datasets", {}):
            return
        try:
            labels = data.sample_labels("train")
        except (AttributeError, UserError):  # a datamodule that does not keep per-sample labels: nothing to say
            return
        share = lone_anchor_share(labels, data.batch_size)
        if share > LONE_ANCHOR_WARNING:
            rank_zero_warn(
                f"strategy 'contrastive': about {share:.0%} of the training examples will have no same-class "
                f"partner in a random batch of {data.batch_size} ({self.num_classes} classes), and the loss learns "
                f"nothing from them; set group_by_class: true on the datamodule (batches that keep same-class "
                f"pairs together) or raise batch_size"
            )

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
        self.log("train/trainable/backbone_groups", float(top), on_step=False, on_epoch=True)
        self.log("train/trainable/fraction", trainable / max(1, total), on_step=False, on_epoch=True)

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
        return self.head(self.features(inputs))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = unpack_batch(batch)
        if self.contrastive_loss is not None:
            loss = self.contrastive_loss(self.features(inputs), labels)
            self.log("train/contrastive_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
            gap = loss.detach() - self.contrastive_loss.floor(labels, self.num_classes)
            self.accumulate_epoch_mean("train/contrastive_gap", gap, len(labels))
        else:
            logits = self(inputs)
            loss = self.classification_loss(logits, labels)
            self.log_training(logits, labels, loss)
        if self.l2sp is not None:
            penalty = self.l2sp.penalty(self.backbone.named_parameters(), self.head.parameters())
            if self.logging_step():
                self.log("train/l2sp", penalty, on_step=True, on_epoch=False)
            loss = loss + penalty
        self.log_learning_rates()
        return loss

    # -- contrastive strategy: the head is fitted, not trained -------------------------------------
    def fit_contrastive_head(self) -> int:
        """Fit the head as a logistic regression on the features of the whole training split (every process's
        share, read in order, without gradients or batch augmentation). Returns the number of samples fitted on."""
        trainer = self.trainer
        make_loader = getattr(trainer.datamodule, "ordered_dataloader", None)
        if not callable(make_loader):
            raise ConfigError(
                "strategy 'contrastive' re-reads the training split to fit its head and needs a tlmodules "
                "datamodule (trainer.fit(model, datamodule=...)); pass one, or choose another strategy"
            )
        loader = make_loader("train", trainer.global_rank, trainer.world_size)
        batches = (move_data_to_device(batch, self.device) for batch in loader)
        share_rank_zero_buffers(self.backbone)
        was_training = self.training
        self.eval()
        with isolate_rng(), trainer.precision_plugin.forward_context():  # no draw may shift the training stream
            features, labels, index = embed_split(self.backbone, batches)
        self.train(was_training)
        features, labels = gather_in_sample_order(features, labels, index)
        with torch.no_grad():
            fit_logistic_head(
                self.head.net[-1],
                features,
                labels.to(features.device),
                self.num_classes,
                seed=0,
                class_weight=self.hparams.contrastive_class_weight,
            )
        self._head_fitted_step = trainer.global_step
        return len(labels)

    def _refit_contrastive_head(self) -> None:
        if self.contrastive_loss is not None and self._head_fitted_step != self.trainer.global_step:
            self.head_fit_samples = self.fit_contrastive_head()

    def on_validation_start(self) -> None:
        # not for the sanity check: nothing has trained yet, and its metrics are not kept
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._refit_contrastive_head()

    def on_train_epoch_means(self, means: dict[str, Tensor]) -> None:
        stop_gap = self.hparams.contrastive_stop_gap
        gap = means.get("train/contrastive_gap")
        if stop_gap is None or gap is None or float(gap) > stop_gap:
            return
        # the mean is over every process's batches, so all processes stop at the same epoch
        if not self.trainer.should_stop:
            step, min_steps = self.trainer.global_step, self.trainer.min_steps or 0
            # Lightning keeps a fit going until min_steps even when told to stop, and then ends it mid-epoch
            when = "now" if step >= min_steps else f"at min_steps={min_steps}"
            rank_zero_info(
                f"contrastive: the training loss is {float(gap):.3f} above its floor (contrastive_stop_gap="
                f"{stop_gap}) after {step} optimizer steps; the fit ends {when}"
            )
        self.trainer.should_stop = True

    def on_train_end(self) -> None:
        self._refit_contrastive_head()  # the model the fit hands back (a run cut short by max_steps included)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = unpack_batch(batch)
        self.log_evaluation("val", self(inputs), labels)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = unpack_batch(batch)
        self.log_evaluation("test", self(inputs), labels)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"index": (B,), "probs": (B, num_classes)}``."""
        inputs, _ = unpack_batch(batch)
        probs = self(inputs).float().softmax(-1)
        return {"index": self.prediction_index(batch, len(probs), dataloader_idx), "probs": probs}

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            **super().checkpoint_meta(),
            "trainable_epoch": self._trainable_epoch,
            "trainable_top_groups": self.trainable_top_groups(self._trainable_epoch),
            "head_fitted_step": self._head_fitted_step,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if (
            self.contrastive_loss is not None
            and self._trainer is not None
            and self.trainer.state.fn == TrainerFn.FITTING
        ):
            # every process builds the checkpoint, so the fit's collectives line up; Lightning collected the state
            # dict before this hook, so the refitted head goes in by hand
            self._refit_contrastive_head()
            checkpoint["tlmodules"]["head_fitted_step"] = self._head_fitted_step
            for name, value in self.head.state_dict().items():
                checkpoint["state_dict"][f"head.{name}"] = value.detach().clone()
        if self.l2sp is not None:
            checkpoint["l2sp_anchor"] = self.l2sp.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint["tlmodules"]
        if self.l2sp is not None and "l2sp_anchor" in checkpoint:
            self.l2sp.load_state_dict(checkpoint["l2sp_anchor"])
        self.apply_trainable(int(meta.get("trainable_epoch", 0)))
        self._head_fitted_step = meta.get("head_fitted_step")
