"""Domain-adversarial adaptation: features that serve the labelled source and the unlabelled target alike."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torchmetrics import MetricCollection

from tlmodules.alignment import (
    ConditionalDomainAdversarialLoss,
    ConfidenceThresholdedSelfTraining,
    DomainAdversarialLoss,
    MinimumClassConfusionLoss,
    StrongAugmentBatch,
    TargetBatchNormStatistics,
)
from tlmodules.backbones import Backbone, build_backbone
from tlmodules.base import OptimizerName, ParamGroup, TransferModule, unpack_batch
from tlmodules.classification import ClassificationMixin, classification_metrics
from tlmodules.errors import ConfigError, UserError
from tlmodules.heads import ClassificationHead, DomainDiscriminator, HeadKind, build_head, check_head
from tlmodules.information import InformationMaximization, SoftNeighborhoodDensity
from tlmodules.labels import IGNORE_INDEX
from tlmodules.projection import log_domain_projection
from tlmodules.schedules import LRSchedule, dann_lambda, linear_ramp

DOMAINS = ("source", "target")


class DANNModule(ClassificationMixin, TransferModule):
    """DANN (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016) and its
    conditional variant CDAN (Long et al., "Conditional Adversarial Domain Adaptation", NeurIPS 2018).

    ``backbone → bottleneck (optional) → features f → classifier``; a domain discriminator sees
    ``f`` (DANN) or ``f ⊗ softmax(logits)`` (CDAN; with ``entropy_conditioning`` samples with
    confident predictions weigh more, CDAN+E) through a gradient reversal layer. The loss is the
    source cross-entropy plus the discriminator's binary cross-entropy on both domains; the reversal
    coefficient follows ``λ_p = λ_max (2 / (1 + exp(-γ p)) - 1)`` of training progress ``p`` and the
    learning rate ``μ_0 / (1 + 10 p)^0.75`` (``lr_schedule="dann"``), so a resumed run continues both.

    Training batches are ``{"source": source batch, "target": target batch}`` (target labels, if
    any, are never used for training). Validation and test take one dataloader per domain (names from
    the datamodule's ``val_domains``/``test_domains``, else source then target); target accuracy is
    logged when target labels exist, and always the label-free information-maximisation signals
    ``val/target/entropy``, ``val/target/diversity`` and ``val/target/im_score``, and the soft neighbourhood density
    ``val/target/snd`` (:class:`tlmodules.information.SoftNeighborhoodDensity`), for choosing checkpoints without
    target labels. ``adversarial=False`` is the source-only baseline through the
    very same pipeline.

    Two terms on the target's predictions add to any of these (``adversarial`` true or false), each when its
    weight is positive: MCC, the target batch's class confusion (Jin et al., "Minimum Class Confusion for
    Versatile Domain Adaptation", ECCV 2020; :class:`tlmodules.alignment.MinimumClassConfusionLoss`), and
    FixMatch-style self-training (Sohn et al., NeurIPS 2020;
    :class:`tlmodules.alignment.ConfidenceThresholdedSelfTraining`): confident predictions on the target batch
    as the datamodule gives it (the weak view) become pseudo-labels for a strongly augmented copy
    (:class:`tlmodules.alignment.StrongAugmentBatch`, image batches only).

    Args:
        bottleneck: width of a ``Linear → BatchNorm → ReLU`` layer after the backbone (0: none).
        head, head_hidden, dropout: the label classifier on the features, ``linear`` or ``mlp`` of ``head_hidden``
            units, with ``dropout``.
        discriminator_hidden, discriminator_layers: width and number of the discriminator's hidden layers
            (``Linear → BatchNorm → ReLU`` each). 2 × 1024 is Transfer-Learning-Library's (1.3 M parameters
            on a 256-wide bottleneck); DANN's MNIST network has 1 × 100. The adversarial loss itself is
            :class:`tlmodules.alignment.DomainAdversarialLoss` or
            :class:`tlmodules.alignment.ConditionalDomainAdversarialLoss` (``method``, ``entropy_conditioning``).
        joint_batch: source and target go through the backbone as one batch (shared BatchNorm
            statistics); ``False`` runs them separately (per-domain batch statistics).
        backbone_lr_ratio: the backbone's learning rate relative to the new layers'.
        discriminator_lr_ratio: the discriminator's learning rate relative to the new layers' (the DANN paper and
            Transfer-Learning-Library use one rate for all; a faster discriminator gives the feature extractor a
            sharper reversed gradient, a slower one a smoother one).
        target_statistics: with ``adversarial=False``, still pass each target batch through the network
            (no loss on it) so that BatchNorm statistics cover both domains exactly as in the adversarial
            runs: the source-only baseline then differs from DANN by the adversarial loss alone. ``False``
            trains on source batches only (about half the cost per step). MCC and self-training need the target
            batch, so with either of them it is always computed.
        mcc_weight: weight of the MCC loss on the target logits (0: off); the paper uses 1.
        mcc_temperature: MCC's softmax temperature ``T > 0``.
        self_training_weight: weight of the self-training loss (0: off), reached after ``self_training_warmup``.
        self_training_threshold: confidence in ``(0, 1]`` a target prediction needs to become a pseudo-label.
        self_training_warmup: fraction of training progress over which the self-training weight rises linearly
            from 0 to ``self_training_weight`` (0: the full weight from the start).
        target_batchnorm: the BatchNorm layers of the classifier path (backbone, bottleneck) keep statistics of the
            target domain, and evaluation on the target, test on the target and ``predict`` (which is for the target
            domain) normalise with them: each domain by its own statistics (AdaBN;
            :class:`tlmodules.alignment.TargetBatchNormStatistics`). They are estimated AdaBN's way before every
            validation and at the end of training, from one eval-mode pass over the target's training split
            (:meth:`estimate_target_statistics`), and gathered from the target rows of the training batches in
            between. Source evaluation keeps the shared statistics; checkpoints and exported models carry the
            target's.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "builtin:lenet",
        weights: str | None = "DEFAULT",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        adversarial: bool = True,
        method: Literal["dann", "cdan"] = "dann",
        entropy_conditioning: bool = True,
        lambda_max: float = 1.0,
        gamma: float = 10.0,
        bottleneck: int = 0,
        head: HeadKind = "linear",
        head_hidden: int = 256,
        dropout: float = 0.0,
        discriminator_hidden: int = 1024,
        discriminator_layers: int = 2,
        joint_batch: bool = True,
        lr: float = 0.01,
        backbone_lr_ratio: float = 1.0,
        discriminator_lr_ratio: float = 1.0,
        weight_decay: float = 5e-4,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.9,
        lr_schedule: LRSchedule = "dann",
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
        pooling: Literal["mean", "cls", "max"] = "mean",
        trust_remote_code: bool = False,
        num_features: int | None = None,
        pretrained: bool = True,
        projection_samples: int = 500,
        target_statistics: bool = True,
        mcc_weight: float = 0.0,
        mcc_temperature: float = 2.5,
        self_training_weight: float = 0.0,
        self_training_threshold: float = 0.9,
        self_training_warmup: float = 0.0,
        target_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        check_head(head, head_hidden)  # an unknown head or a zero-width MLP fails now, not at setup
        if method not in ("dann", "cdan"):
            raise ConfigError(f"unknown method {method!r}; choose dann or cdan")
        if lr <= 0 or lambda_max < 0:
            raise ConfigError(f"lr must be positive and lambda_max >= 0, got {lr} and {lambda_max}")
        if discriminator_lr_ratio <= 0:
            raise ConfigError(f"discriminator_lr_ratio must be positive, got {discriminator_lr_ratio}")
        if adversarial and (discriminator_layers < 1 or discriminator_hidden < 1):
            raise ConfigError(
                f"the discriminator needs discriminator_layers >= 1 and discriminator_hidden >= 1, got "
                f"{discriminator_layers} and {discriminator_hidden}"
            )
        check_target_terms(
            mcc_weight, mcc_temperature, self_training_weight, self_training_threshold, self_training_warmup
        )
        if target_batchnorm and not (adversarial or target_statistics or mcc_weight > 0 or self_training_weight > 0):
            raise ConfigError(
                "target_batchnorm gathers BatchNorm statistics from the target batches, which this source-only run "
                "does not pass through the network (target_statistics: false); set target_statistics: true"
            )
        self.backbone: Backbone = build_backbone(
            backbone,
            weights=weights,
            pooling=pooling,
            trust_remote_code=trust_remote_code,
            num_features=num_features,
            pretrained=pretrained,
        )
        width = self.backbone.num_features
        if bottleneck > 0:
            self.bottleneck: nn.Module = nn.Sequential(
                nn.Linear(width, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(inplace=True)
            )
            width = bottleneck
        else:
            self.bottleneck = nn.Identity()
        self.feature_width = width
        # created before any layer that is not on the classifier path, so only backbone and bottleneck get buffers
        self.target_bn = TargetBatchNormStatistics([self.backbone, self.bottleneck]) if target_batchnorm else None
        self.head: ClassificationHead | None = None
        self.alignment: DomainAdversarialLoss | ConditionalDomainAdversarialLoss | None = None
        self._projection: dict[str, list[tuple[Tensor, Tensor]]] = {}
        # the terms on the target's predictions: no parameters, so checkpoints are the same with or without them
        self.mcc = MinimumClassConfusionLoss(mcc_temperature) if mcc_weight > 0 else None
        self.self_training: ConfidenceThresholdedSelfTraining | None = None
        self.strong_augment: StrongAugmentBatch | None = None
        if self_training_weight > 0:
            self.self_training = ConfidenceThresholdedSelfTraining(self_training_threshold)
            self.strong_augment = StrongAugmentBatch()  # draws from the training stream (see its docstring)
        if num_classes is not None:
            self.size_classifier(num_classes)

    # -- construction -----------------------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> None:
        hp = self.hparams
        self.head = build_head(hp.head, self.feature_width, num_classes, hp.head_hidden, hp.dropout)
        if hp.adversarial:
            width = self.feature_width * (num_classes if hp.method == "cdan" else 1)
            disc = DomainDiscriminator(width, hp.discriminator_hidden, layers=hp.discriminator_layers)
            if hp.method == "cdan":
                self.alignment = ConditionalDomainAdversarialLoss(disc, entropy_conditioning=hp.entropy_conditioning)
            else:
                self.alignment = DomainAdversarialLoss(disc)
        self.domain_metrics = nn.ModuleDict(
            {
                f"{stage}_{domain}": classification_metrics(num_classes, f"{stage}/{domain}/")
                for stage in ("val", "test")
                for domain in DOMAINS
            }
        )
        self.target_information = nn.ModuleDict(
            {stage: InformationMaximization(num_classes) for stage in ("val", "test")}
        )
        self.target_density = nn.ModuleDict({stage: SoftNeighborhoodDensity() for stage in ("val", "test")})

    def setup(self, stage: str) -> None:
        self.setup_labels(stage)

    def describe(self) -> dict[str, str]:
        """The method in one word, for run summaries: ``source-only``, ``dann``, ``cdan`` or ``cdan+e``, followed by
        the added target terms, ``+mcc`` and ``+self-training`` (e.g. ``dann+mcc``, ``source-only+self-training``)."""
        hp = self.hparams
        if not hp.adversarial:
            method = "source-only"
        elif hp.method == "cdan":
            method = "cdan+e" if hp.entropy_conditioning else "cdan"
        else:
            method = "dann"
        if self.mcc is not None:
            method += "+mcc"
        if self.self_training is not None:
            method += "+self-training"
        if self.target_bn is not None:
            method += "+target-bn"
        return {"method": method}

    # -- forward ----------------------------------------------------------------------------------
    def features(self, inputs: Any) -> Tensor:
        """Inputs → adapted features ``(B, feature_width)``."""
        return self.bottleneck(self.backbone(inputs))

    def forward(self, inputs: Any) -> Tensor:
        """Inputs → class logits ``(B, num_classes)``."""
        return self.head(self.features(inputs))

    def _domain_features(self, source: Any, target: Any, *more: Any) -> tuple[Tensor, ...]:
        """Features of the source, the target and any ``more`` batches (the target's strong view): one pass of
        all of them with ``joint_batch`` (shared BatchNorm statistics, as FixMatch passes its labelled, weak and
        strong batches), else one pass each."""
        parts = (source, target, *more)
        joinable = all(isinstance(p, Tensor) and p.shape[1:] == source.shape[1:] for p in parts)
        if self.hparams.joint_batch and joinable:
            with self._collecting_target(slice(len(source), len(source) + len(target))):
                return torch.split(self.features(torch.cat(parts)), [len(p) for p in parts])
        features = [self.features(source)]
        with self._collecting_target(slice(None)):
            features.append(self.features(target))
        return (*features, *(self.features(p) for p in more))

    def _collecting_target(self, rows: slice) -> AbstractContextManager:
        """With ``target_batchnorm``, passes in the block update the target BatchNorm statistics from ``rows``."""
        return self.target_bn.collecting(rows) if self.target_bn is not None else nullcontext()

    def _target_normalisation(self) -> AbstractContextManager:
        """With ``target_batchnorm``, the block normalises with the target's BatchNorm statistics."""
        return self.target_bn.applied() if self.target_bn is not None else nullcontext()

    # -- adversarial loss -------------------------------------------------------------------------
    def adaptation_weight(self) -> float:
        """``λ_p`` at the current step (a pure function of progress: resumes continue it)."""
        progress = self.training_progress(self.global_step)
        return dann_lambda(progress, self.hparams.lambda_max, self.hparams.gamma)

    def current_self_training_weight(self) -> float:
        """The self-training weight at the current step: ``self_training_weight`` times the linear ramp over the
        first ``self_training_warmup`` of training (a pure function of progress: resumes continue it)."""
        progress = self.training_progress(self.global_step)
        return self.hparams.self_training_weight * linear_ramp(progress, self.hparams.self_training_warmup)

    def _strong_view(self, inputs: Any) -> Tensor:
        """The target batch's strongly augmented copy (:class:`tlmodules.alignment.StrongAugmentBatch`)."""
        if not (isinstance(inputs, Tensor) and inputs.dim() == 4 and inputs.is_floating_point()):
            kind = type(inputs).__name__
            if isinstance(inputs, Tensor):
                kind = f"a {inputs.dtype} tensor of shape {tuple(inputs.shape)}"
            raise ConfigError(
                "self-training trains the target's predictions on a strongly augmented copy of each target batch, "
                f"which exists for image batches (B, C, H, W) only; the target inputs here are {kind} (text, "
                "tokens or tables cannot be image-augmented). Set self_training_weight: 0 (MCC, mcc_weight, works "
                "on any input)"
            )
        return self.strong_augment(inputs)

    def estimate_target_statistics(self) -> int:
        """With ``target_batchnorm``: AdaBN's target statistics from one pass over the target's training split (each
        process its share, without batch augmentation, the network in eval mode), averaged across processes.
        Needs a datamodule whose target side can read its training split again (``ordered_dataloader``, as every
        tlmodules datamodule can); otherwise the statistics gathered during training stay. Returns the number of
        batches read on this process."""
        trainer = self._trainer
        target = getattr(getattr(trainer, "datamodule", None), "target", None) if trainer is not None else None
        make_loader = getattr(target, "ordered_dataloader", None)
        if self.target_bn is None or not callable(make_loader):
            return 0
        try:
            loader = make_loader("train", trainer.global_rank, trainer.world_size)
        except UserError:  # no target training split (e.g. a test run from a checkpoint): keep the saved statistics
            return 0
        was_training = self.training
        self.eval()
        try:
            with isolate_rng(), trainer.precision_plugin.forward_context():
                batches = (move_data_to_device(unpack_batch(b)[0], self.device) for b in loader)
                count = self.target_bn.estimate(batches, self.features)
        finally:
            self.train(was_training)
        if trainer.world_size > 1:
            for buffer in self.target_bn.buffers():
                buffer.copy_(trainer.strategy.reduce(buffer.clone(), reduce_op="mean"))
        if count:
            self._target_statistics_step = trainer.global_step
        return count

    def on_train_start(self) -> None:
        self._target_statistics_step: int | None = None

    def on_validation_epoch_start(self) -> None:
        self.estimate_target_statistics()

    def on_train_end(self) -> None:
        # the model the fit hands back, with or without a validation loop; a validation after the last step has
        # already estimated these weights' statistics, so the pass is not repeated
        if getattr(self, "_target_statistics_step", None) != self.trainer.global_step:
            self.estimate_target_statistics()

    @property
    def discriminator(self) -> nn.Module | None:
        """The domain discriminator of :attr:`alignment` (``None`` for the source-only baseline); read-only."""
        return None if self.alignment is None else self.alignment.discriminator

    # -- optimisation -----------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParamGroup]:
        groups = [
            ParamGroup("backbone", list(self.backbone.parameters()), self.hparams.backbone_lr_ratio),
            ParamGroup("head", [*self.bottleneck.parameters(), *self.head.parameters()], 1.0),
        ]
        if self.discriminator is not None:
            groups.append(
                ParamGroup("discriminator", list(self.discriminator.parameters()), self.hparams.discriminator_lr_ratio)
            )
        return groups

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not isinstance(batch, dict) or "source" not in batch or "target" not in batch:
            raise ConfigError(
                "DANNModule trains on batches {'source': ..., 'target': ...}; use DomainAdaptationDataModule "
                "(or a CombinedLoader of a source and a target loader)"
            )
        inputs_s, labels_s = unpack_batch(batch["source"])
        inputs_t, _ = unpack_batch(batch["target"])
        target_terms = self.mcc is not None or self.self_training is not None
        strong = [self._strong_view(inputs_t)] if self.self_training is not None else []
        feats_strong = None
        if self.alignment is not None or self.hparams.target_statistics or target_terms:
            feats_s, feats_t, *rest = self._domain_features(inputs_s, inputs_t, *strong)
            feats_strong = rest[0] if rest else None
        else:  # source-only without target statistics or target terms: the target batch plays no part at all
            feats_s, feats_t = self.features(inputs_s), None
        logits_s = self.head(feats_s)
        conditional = isinstance(self.alignment, ConditionalDomainAdversarialLoss)
        logits_t = self.head(feats_t) if conditional or target_terms else None
        loss = self.classification_loss(logits_s, labels_s)
        batch_size = len(labels_s)
        self.log("train/source/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        accuracy = (logits_s.argmax(-1) == labels_s).float().mean()
        self.accumulate_epoch_mean("train/source/acc", accuracy, batch_size)
        if self.alignment is not None:
            coefficient = self.adaptation_weight()
            if conditional:
                domain_loss, domain_acc = self.alignment(feats_s, feats_t, logits_s, logits_t, coefficient)
            else:
                domain_loss, domain_acc = self.alignment(feats_s, feats_t, coefficient)
            loss = loss + domain_loss
            self.log("train/domain/loss", domain_loss, on_step=True, on_epoch=True, batch_size=batch_size)
            self.accumulate_epoch_mean("train/domain/acc", domain_acc, batch_size)
            if self.logging_step():
                self.log("train/lambda", coefficient, on_step=True, on_epoch=False)
        if self.mcc is not None:
            mcc_loss = self.mcc(logits_t)
            loss = loss + self.hparams.mcc_weight * mcc_loss
            self.log("train/mcc/loss", mcc_loss, on_step=True, on_epoch=True, batch_size=len(logits_t))
        if self.self_training is not None:
            weight = self.current_self_training_weight()
            st_loss, mask_ratio = self.self_training(logits_t, self.head(feats_strong))
            loss = loss + weight * st_loss
            self.log("train/self_training/loss", st_loss, on_step=True, on_epoch=True, batch_size=len(logits_t))
            self.log(
                "train/self_training/mask_ratio", mask_ratio, on_step=True, on_epoch=True, batch_size=len(logits_t)
            )
            if self.logging_step():
                self.log("train/self_training/weight", weight, on_step=True, on_epoch=False)
                self.log(
                    "train/self_training/threshold",
                    float(self.hparams.self_training_threshold),
                    on_step=True,
                    on_epoch=False,
                )
        self.log_learning_rates()
        return loss

    def _domain_name(self, stage: str, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, f"{stage}_domains", None) or DOMAINS
        return names[dataloader_idx] if dataloader_idx < len(names) else f"domain{dataloader_idx}"

    def _evaluate(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        domain = self._domain_name(stage, dataloader_idx)
        inputs, labels = unpack_batch(batch)
        with self._target_normalisation() if domain == "target" else nullcontext():
            feats = self.features(inputs)
        logits = self.head(feats)
        if domain == "target":
            self.target_information[stage].update(logits)
            self.target_density[stage].update(logits)
        labelled = labels is not None and bool((labels != IGNORE_INDEX).all())
        if labelled:
            key = f"{stage}_{domain}"
            if key in self.domain_metrics:
                self.domain_metrics[key].update(logits, labels)
            if domain == "target":
                (self.val_confusion if stage == "val" else self.test_confusion).update(logits, labels)
        if stage == "val" and self.hparams.projection_samples > 0:
            kept = self._projection.setdefault(domain, [])
            room = self.hparams.projection_samples - sum(len(f) for f, _ in kept)
            if room > 0:  # at most projection_samples per domain
                marks = labels if labels is not None else torch.full((len(feats),), IGNORE_INDEX, device=feats.device)
                kept.append((feats[:room].detach().float().cpu(), marks[:room].detach().cpu()))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    def _log_domains(self, stage: str) -> dict[str, Tensor]:
        logged: dict[str, Tensor] = {}
        for domain in DOMAINS:
            metrics: MetricCollection = self.domain_metrics[f"{stage}_{domain}"]
            if any(m.update_called for m in metrics.values()):
                logged.update(metrics.compute())
            metrics.reset()
        information = self.target_information[stage]
        if information.update_called:
            scores = information.compute()
            logged.update({f"{stage}/target/{k if k != 'score' else 'im_score'}": v for k, v in scores.items()})
        information.reset()
        density = self.target_density[stage]
        if density.update_called:
            logged[f"{stage}/target/snd"] = density.compute()
        density.reset()
        self.log_dict(logged)
        return logged

    def on_validation_epoch_end(self) -> None:
        logged = self._log_domains("val")
        best = logged.get("val/target/acc", logged.get("val/target/im_score"))
        if best is not None:
            self.log("hp_metric", best)
        if self.val_confusion.update_called:
            self.log_confusion_matrix(self.val_confusion, "val/target/confusion_matrix", self.class_names)
        if not self.trainer.sanity_checking:
            log_domain_projection(self, self._projection, self.class_names)
        self._projection = {}

    def on_test_epoch_end(self) -> None:
        self._log_domains("test")
        if self.test_confusion.update_called:
            self.log_confusion_matrix(self.test_confusion, "test/target/confusion_matrix", self.class_names)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        inputs, _ = unpack_batch(batch)
        with self._target_normalisation():  # predictions are for the target domain
            probs = self(inputs).float().softmax(-1)
        return {"index": self.prediction_index(batch, len(probs), dataloader_idx), "probs": probs}


def check_target_terms(
    mcc_weight: float,
    mcc_temperature: float,
    self_training_weight: float,
    self_training_threshold: float,
    self_training_warmup: float,
) -> None:
    """Refuse settings of the MCC and self-training terms that cannot work, naming the fix (the comparisons are
    written so that NaN fails them too)."""
    if not all(math.isfinite(w) and w >= 0 for w in (mcc_weight, self_training_weight)):
        raise ConfigError(
            f"mcc_weight and self_training_weight must be finite and >= 0 (0 turns the term off), got {mcc_weight} "
            f"and {self_training_weight}"
        )
    if not (math.isfinite(mcc_temperature) and mcc_temperature > 0):
        raise ConfigError(
            f"mcc_temperature must be positive (1 is the plain softmax, 2.5 the default), got {mcc_temperature}"
        )
    if not 0.0 < self_training_threshold <= 1.0:
        raise ConfigError(
            f"self_training_threshold must be in (0, 1] (a confidence, e.g. 0.9 or FixMatch's 0.95), got "
            f"{self_training_threshold}"
        )
    if not 0.0 <= self_training_warmup <= 1.0:
        raise ConfigError(
            f"self_training_warmup must be in [0, 1] (a fraction of training; 0: no ramp), got {self_training_warmup}"
        )
