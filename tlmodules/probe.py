"""Feature extraction: a frozen backbone's features, computed once, into a new classifier."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from tlmodules.backbones import Backbone, TransformerBackbone, build_backbone, origin_dict
from tlmodules.base import OptimizerName, ParamGroup, TransferModule, quiet_eval_mode_warning, unpack_batch
from tlmodules.classification import ClassificationMixin
from tlmodules.entities import EntityF1
from tlmodules.errors import ConfigError
from tlmodules.estimators import (
    ESTIMATORS,
    estimator_scores,
    fit_estimator,
    is_linear,
    linear_head_parameters,
    load_pickled_estimator,
    make_estimator,
    save_pickled_estimator,
)
from tlmodules.feature_cache import FeatureCache, cache_key, merge_across_processes, tensor_digest
from tlmodules.heads import HEAD_KINDS, ClassificationHead, build_head, check_head
from tlmodules.labels import IGNORE_INDEX
from tlmodules.schedules import LRSchedule


class FeatureProbeModule(ClassificationMixin, TransferModule):
    """A frozen backbone, its features cached, and a new classifier on top (linear probing and kin).

    The backbone stays in eval mode with no gradient. Each sample's features are computed once and
    looked up by the batch's ``index`` afterwards, so ``k`` epochs cost one backbone pass plus ``k`` head
    passes (:class:`tlmodules.feature_cache.FeatureCache`; ``cache_dir`` also keeps them on disk for later
    runs, keyed by backbone, weights, preprocessing and data). Batches without an ``index`` are not cached.

    When the datamodule offers length-ordered batches (``extraction_dataloader``: text), the features of the
    training and validation splits are computed before the first training batch, in batches of similar
    lengths (little padding), each process its share, then exchanged (:meth:`extraction_pass`); every
    training batch is then a cache hit, whatever order the training sampler draws. Otherwise (images, a run
    limited to part of an epoch) each batch's features are computed the first time it is seen.

    Heads (``head``): ``linear`` or ``mlp`` (``head_hidden`` units, ``dropout``) trained by the Trainer's
    optimizer, or a scikit-learn estimator fitted on the cached training features at the end of the first
    training epoch — ``logistic_regression``, ``linear_svm``, ``rbf_svm``, ``random_forest`` or any
    classifier's class path, with ``estimator_args``. A linear estimator is copied into a linear
    head (a checkpoint of tensors only); another estimator is pickled next to the run and loading it
    back needs ``trust_pickled_estimator=True``, because unpickling runs code.

    Levels: ``sequence`` (one feature per input; images or pooled text) and ``token`` (one feature
    per word, at the first sub-token, for tagging such as named entities; batches carry per-token
    ``labels`` ``(B, T)``, :data:`~tlmodules.labels.IGNORE_INDEX` where no word starts, and
    ``word_starts`` ``(B, T)`` bool), with entity-level precision, recall and F1 next to token accuracy.

    ``predict`` returns class probabilities or, with ``predict_output="embeddings"``, the features; at token
    level one per word, which :class:`tlmodules.predictions.PredictionWriter` writes one CSV row per word.
    The first validation's features go to TensorBoard's projector, labelled by class.

    Args:
        backbone: a backbone spec or module (see :func:`tlmodules.backbones.build_backbone`).
        save_backbone: also store the frozen backbone's weights in checkpoints (by default only the
            spec is stored and a hash of the weights, checked when the checkpoint is loaded).
        projection_samples: how many validation features go to the projector (0: none).
        cache_features: ``False`` runs the backbone on every batch of every epoch (for comparison).
        normalize_features: L2-normalise features before the classifier (sentence-transformers
            models such as all-MiniLM-L6-v2 are trained to be compared as unit vectors).
        hidden_layers: a transformer backbone's features from its last ``hidden_layers`` layers side by side,
            each pooled and L2-normalised (:meth:`tlmodules.backbones.TransformerBackbone.use_hidden_layers`;
            the BERT paper's feature-based approach takes 4); 1: the last layer only.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "builtin:lenet",
        weights: str | None = "DEFAULT",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        level: Literal["sequence", "token"] = "sequence",
        head: str = "linear",
        estimator_args: dict[str, Any] | None = None,
        head_hidden: int = 256,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.9,
        lr_schedule: LRSchedule = "constant",
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
        pooling: Literal["mean", "cls", "max"] = "mean",
        trust_remote_code: bool = False,
        num_features: int | None = None,
        pretrained: bool = True,
        cache_dir: str | None = None,
        cache_features: bool = True,
        normalize_features: bool = False,
        hidden_layers: int = 1,
        predict_output: Literal["probabilities", "embeddings"] = "probabilities",
        projection_samples: int = 1000,
        save_backbone: bool = False,
        trust_pickled_estimator: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if level not in ("sequence", "token"):
            raise ConfigError(f"unknown level {level!r}; choose sequence or token")
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        self.backbone: Backbone = build_backbone(
            backbone,
            weights=weights,
            pooling=pooling,
            trust_remote_code=trust_remote_code,
            num_features=num_features,
            pretrained=pretrained,
        )
        if level == "token" and not isinstance(self.backbone, TransformerBackbone):
            raise ConfigError("level='token' needs a transformer backbone (hf: or pkg: spec) with per-token features")
        if hidden_layers != 1:
            if not isinstance(self.backbone, TransformerBackbone):
                raise ConfigError(
                    f"hidden_layers={hidden_layers} needs a transformer backbone (hf: or pkg: spec); other backbones "
                    "give one feature vector: set hidden_layers: 1"
                )
            self.backbone.use_hidden_layers(hidden_layers)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if head not in HEAD_KINDS and head not in ESTIMATORS and "." not in head:
            raise ConfigError(
                f"unknown head {head!r}; choose one of {[*HEAD_KINDS, *sorted(ESTIMATORS)]} or a "
                "scikit-learn classifier's class path such as 'sklearn.linear_model.RidgeClassifier'"
            )
        self.uses_estimator = head not in HEAD_KINDS
        if not self.uses_estimator:
            check_head(head, head_hidden)  # a zero-width MLP fails now, not at setup
        if self.uses_estimator and not cache_features:
            raise ConfigError("a scikit-learn classifier is fitted on the cached features: keep cache_features=True")
        self.linear_estimator = False
        if self.uses_estimator:
            from sklearn.linear_model._base import LinearClassifierMixin

            prototype = make_estimator(head, estimator_args, seed)  # fails now on a bad name or argument
            self.linear_estimator = isinstance(prototype, LinearClassifierMixin)
            self.automatic_optimization = False
            # what the no-op optimizer steps; also gives DDP a parameter that requires a gradient (it refuses
            # to wrap a module without one), though no gradient ever flows
            self.no_op_parameter = nn.Parameter(torch.zeros(1))
        self.head: ClassificationHead | None = None
        self.estimator: Any = None
        self.estimator_file: dict[str, str] | None = None
        self.estimator_fitted = False
        self.cache = FeatureCache(cache_dir)
        self.labels_seen: dict[str, dict[int, Tensor]] = {}
        self._backbone_digest: str | None = None
        self._projector_logged = False
        if num_classes is not None:
            self.size_classifier(num_classes)

    # -- construction -----------------------------------------------------------------------------
    def build_classifier(self, num_classes: int) -> None:
        hp = self.hparams
        if not self.uses_estimator or self.linear_estimator:
            kind = "linear" if self.uses_estimator else hp.head
            self.head = build_head(kind, self.backbone.num_features, num_classes, hp.head_hidden, hp.dropout)
            if self.uses_estimator:
                self.head.requires_grad_(False)  # filled from the fitted estimator, not trained
        if hp.level == "token":
            self.val_entities = EntityF1()
            self.test_entities = EntityF1()

    def train(self, mode: bool = True) -> FeatureProbeModule:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics and dropout stay as pretrained
        return self

    def backbone_digest(self) -> str:
        if self._backbone_digest is None:
            self._backbone_digest = tensor_digest(self.backbone)
        return self._backbone_digest

    def setup(self, stage: str) -> None:
        self.setup_labels(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        hparams = getattr(datamodule, "hparams", {})
        if stage == "fit" and (hparams.get("augment") or hparams.get("hflip")):
            raise ConfigError(
                "a feature probe computes each sample's features once; random augmentation would make the cached "
                "features stale. Set augment: false and hflip: false on the datamodule (or fine-tune instead)"
            )

    def _bind_cache(self, split: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        fingerprint = getattr(datamodule, "fingerprint", None)
        data_key = fingerprint(split) if callable(fingerprint) else None
        if data_key is None:  # no stable description of the data: memory only, for this datamodule object
            self.cache.bind(split, f"memory-{id(datamodule)}-{split}", persistent=False)
            return
        origin = origin_dict(self.backbone)
        key = cache_key(
            origin,
            repr(self.backbone.preprocessing),
            self.hparams.level,
            self.hparams.pooling,
            self.hparams.hidden_layers,
            self.backbone_digest(),
            data_key,
            split,
        )
        self.cache.bind(split, key)

    # -- features ---------------------------------------------------------------------------------
    def features(self, inputs: Any) -> Tensor:
        """Inputs → the frozen backbone's float32 features without the cache: sequence level ``(B, F)``;
        token level ``(B, T, F)``, one row per token."""
        with torch.no_grad():
            if self.hparams.level == "token":
                return self.backbone.forward_tokens(inputs).float()
            return self.backbone(inputs).float()

    def batch_features(self, batch: Any, split: str) -> tuple[Tensor, Tensor | None, list[int] | None]:
        """Cached or freshly computed features of a batch.

        Returns ``(features, labels, lengths)``: sequence level ``(B, F)``, ``(B,)``, ``None``;
        token level ``(N, F)`` and ``(N,)`` for the ``N`` labelled word starts of the batch, with
        ``lengths`` the number of words per sentence.
        """
        inputs, labels = unpack_batch(batch)
        index = batch.get("index") if isinstance(batch, dict) else None
        keys = index.tolist() if index is not None and self.hparams.cache_features else None
        cached = self.cache.lookup(split, keys) if keys is not None else None
        if self.hparams.level == "sequence":
            if labels is not None and labels.ndim != 1:
                raise ConfigError(
                    f"level='sequence' takes one label per input, but the batch's labels have shape "
                    f"{tuple(labels.shape)}: one per token (tagging data such as ConllDataModule's); set level='token'"
                )
            if cached is not None:
                feats = torch.stack(cached).to(self.device)
            else:
                feats = self.features(inputs)
                if keys is not None:
                    self.cache.add(split, keys, feats)
            return feats, labels, None
        starts = batch.get("word_starts") if isinstance(batch, dict) else None
        if starts is None and labels is None:
            raise ConfigError(
                "token-level batches need 'word_starts' (B, T) or 'labels' (B, T) marking word starts, as "
                "ConllDataModule gives"
            )
        if labels is not None and labels.ndim != 2:
            raise ConfigError(
                f"level='token' needs one label per token, (B, T) with {IGNORE_INDEX} where no word starts (as "
                f"ConllDataModule gives), but the batch's labels have shape {tuple(labels.shape)}: for one label per "
                "input use level='sequence'"
            )
        if starts is None:
            starts = labels != IGNORE_INDEX
        if labels is None:
            labels = torch.full(starts.shape, IGNORE_INDEX, dtype=torch.long, device=starts.device)
        lengths = starts.sum(1).tolist()
        if cached is not None:
            per_sentence = [c.to(self.device) for c in cached]
        else:
            hidden = self.features(inputs)
            per_sentence = [hidden[b][starts[b]] for b in range(hidden.shape[0])]
            if keys is not None:
                self.cache.add(split, keys, per_sentence)
        return torch.cat(per_sentence), labels[starts], lengths

    def extract(self, loader: Any, split: str) -> int:
        """The features of every batch of ``loader`` into the cache of ``split`` (no gradient; the backbone is
        in eval mode), skipping batches whose samples are all cached already. Stops at a batch without an
        ``index`` (nothing to file its features under). Returns the number of batches computed."""
        computed = 0
        for batch in loader:
            index = batch.get("index") if isinstance(batch, dict) else None
            if index is None:
                break
            if self.cache.lookup(split, index.tolist()) is not None:
                continue
            self.batch_features(move_data_to_device(batch, self.device), split)
            computed += 1
        return computed

    def extraction_pass(self) -> dict[str, int]:
        """Before the first training batch: every training and validation feature, computed in length order.

        A frozen pass does not depend on the order of its samples, so it need not follow the training sampler's
        (random) batches: the datamodule's ``extraction_dataloader(split, rank, world_size)`` gives this process's
        share of the split sorted by length, batches that are hardly padded (bench/README.md, "Speed", measures the
        gain over random batches). Afterwards the processes exchange their shares (a collective), rank 0 writes them
        to ``cache_dir``, and every training batch is a cache hit. Skipped (features are then computed batch by
        batch as training meets them) with ``cache_features=False``, when the datamodule has no such loader (images:
        order does not change their cost), and for a split this fit will not read whole (``limit_train_batches``,
        ``max_steps`` within the first epoch; ``limit_val_batches``, no validation). Returns the batches computed
        per split."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        make_loader = getattr(datamodule, "extraction_dataloader", None)
        if not self.hparams.cache_features or not callable(make_loader):
            return {}
        splits = [
            s
            for s, whole in (("train", self._reads_whole_training_split()), ("val", self._validates_whole_split()))
            if whole
        ]
        computed: dict[str, int] = {}
        for split in splits:
            loader = make_loader(split, trainer.global_rank, trainer.world_size)
            if loader is None:
                continue
            rank_zero_info(f"{type(self).__name__}: computing the {split} features in length order")
            # no random draw may shift the training stream (a loader's iterator draws a seed)
            with isolate_rng(), torch.no_grad(), trainer.precision_plugin.forward_context():
                computed[split] = self.extract(loader, split)
            self.cache.share(split)  # collective: every process takes part, the same splits in the same order
            if self.global_rank == 0:
                self.cache.flush(split)
            else:
                self.cache.mark_saved(split)  # rank 0 wrote every process's features
            if split == "train":
                self._train_shared = True
        return computed

    def _reads_whole_training_split(self) -> bool:
        """Whether this fit's next epoch reads every training batch (not cut by ``limit_train_batches`` or by
        ``max_steps``)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not _whole(trainer.limit_train_batches, batches):
            return False
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return remaining >= batches
        return True

    def _validates_whole_split(self) -> bool:
        """Whether this fit validates, over every validation batch."""
        trainer = self.trainer
        if not trainer.enable_validation or trainer.limit_val_batches == 0:
            return False
        every = trainer.check_val_every_n_epoch
        if every is not None and trainer.max_epochs is not None and 0 <= trainer.max_epochs < every:
            return False
        counts = trainer.num_val_batches or [0]
        return _whole(trainer.limit_val_batches, max(counts))

    def remember_labels(self, split: str, batch: Any, labels: Tensor | None, lengths: list[int] | None) -> None:
        index = batch.get("index") if isinstance(batch, dict) else None
        if index is None or labels is None:
            return
        table = self.labels_seen.setdefault(split, {})
        pieces = labels.split(lengths) if lengths is not None else labels
        for i, piece in zip(index.tolist(), pieces):
            table[i] = piece.detach().cpu()

    # -- classifier -------------------------------------------------------------------------------
    def prepare(self, feats: Tensor) -> Tensor:
        """What the classifier sees: the cached features, L2-normalised if asked."""
        return nn.functional.normalize(feats, dim=-1) if self.hparams.normalize_features else feats

    def classify(self, feats: Tensor) -> Tensor:
        """Features ``(N, F)`` → logits ``(N, num_classes)`` (log-probabilities for a fitted estimator)."""
        feats = self.prepare(feats)
        if self.head is not None:
            return self.head(feats)
        if self.estimator is None:
            raise RuntimeError("the estimator is not fitted yet: train for at least one epoch or load a checkpoint")
        probs = estimator_scores(self.estimator, feats.float().cpu(), self.num_classes)
        return probs.clamp_min(1e-12).log().to(feats.device)

    def forward(self, inputs: Any) -> Tensor:
        """Inputs → logits without the cache (for use outside the Trainer): sequence level ``(B, num_classes)``;
        token level ``(B, T, num_classes)``, one row per token (a word's tag is read at its first sub-token)."""
        feats = self.features(inputs)
        if self.hparams.level == "token":
            return self.classify(feats.flatten(0, 1)).view(*feats.shape[:2], -1)
        return self.classify(feats)

    def fit_estimator_on_cache(self) -> None:
        """Fit the scikit-learn estimator on every cached training feature (all processes' shards)."""
        merge_across_processes(self.labels_seen.setdefault("train", {}))
        labels = self.labels_seen["train"]
        pairs = [(f, labels[i]) for i, f in zip(*self.cache.items("train")) if i in labels]
        if self.hparams.level == "token":
            x = torch.cat([f for f, _ in pairs])
            y = torch.cat([y for _, y in pairs])
        else:
            x = torch.stack([f for f, _ in pairs])
            y = torch.stack([y for _, y in pairs]).view(-1)
        start = time.perf_counter()
        estimator = fit_estimator(
            make_estimator(self.hparams.head, self.hparams.estimator_args, self.hparams.seed), self.prepare(x), y
        )
        self.log(
            "train/estimator_fit_seconds", time.perf_counter() - start, on_step=False, on_epoch=True, sync_dist=True
        )
        if is_linear(estimator) and self.head is not None:
            weight, bias = linear_head_parameters(estimator, self.num_classes)
            layer = self.head.net[-1]
            with torch.no_grad():
                layer.weight.copy_(weight.to(layer.weight))
                layer.bias.copy_(bias.to(layer.bias))
        else:
            # a linear class whose fitted form has no per-class weight rows (e.g. RidgeClassifier's 1-d binary
            # coef_) keeps its estimator: the head built for it stays unfilled and must not classify
            self.head = None
            self.estimator = estimator
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "estimators"
            if self.global_rank == 0:
                path, digest = save_pickled_estimator(estimator, folder)
                self.estimator_file = {"path": str(path.resolve()), "sha256": digest}
        self.estimator_fitted = True
        train_logits = self.classify(x.to(self.device))
        self.train_metrics.update(train_logits, y.to(self.device))  # logged at the epoch's end

    # -- optimisation -----------------------------------------------------------------------------
    def parameter_groups(self) -> list[ParamGroup]:
        return [ParamGroup("head", list(self.head.parameters()), 1.0)]

    def configure_optimizers(self) -> Any:
        if self.uses_estimator:
            # scikit-learn fits the classifier. A no-op optimizer lets the Trainer count a step per batch:
            # checkpointing and logging intervals are counted in steps.
            return torch.optim.SGD([self.no_op_parameter], lr=0.0)
        return super().configure_optimizers()

    # -- loop hooks -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        quiet_eval_mode_warning()
        self._bind_cache("train")
        self._bind_cache("val")
        self._train_shared = False

    def on_train_start(self) -> None:
        super().on_train_start()
        # here, not in on_fit_start: the loaders are built and a resumed run's position is restored
        self.extraction_pass()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._bind_cache("val")

    def on_test_start(self) -> None:
        super().on_test_start()
        self._bind_cache("test")

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._bind_cache("predict")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        feats, labels, lengths = self.batch_features(batch, "train")
        if self.uses_estimator:
            self.remember_labels("train", batch, labels, lengths)
            self.optimizers().step()  # no-op: counts the step
            return None
        logits = self.classify(feats)
        loss = self.classification_loss(logits, labels)
        self.log_training(logits, labels, loss)
        self.log_learning_rates()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 < self.trainer.num_training_batches:
            return
        if not self._train_shared:  # first epoch done: every process gets every feature (collective)
            self.cache.share("train")
            self._train_shared = True
            if self.global_rank == 0:
                self.cache.flush("train")
        if self.uses_estimator and not self.estimator_fitted:
            self.fit_estimator_on_cache()

    def _evaluate(self, batch: Any, split: str, stage: str) -> None:
        if self.uses_estimator and not self.estimator_fitted:
            self.batch_features(batch, split)  # sanity check before the fit: just fill the cache
            return
        feats, labels, lengths = self.batch_features(batch, split)
        if split == "val":
            self.remember_labels(split, batch, labels, lengths)
        logits = self.classify(feats)
        self.log_evaluation(stage, logits, labels)
        if lengths is not None:
            entities = self.val_entities if stage == "val" else self.test_entities
            names = self.class_names
            predicted = [[names[i] for i in s.tolist()] for s in logits.argmax(-1).split(lengths)]
            gold = [[names[i] for i in s.tolist()] for s in labels.split(lengths)]
            entities.update(predicted, gold)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", "test")

    def _log_entities(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_entities", None)
        if metric is None or not metric.update_called:
            return
        scores = metric.compute()
        metric.reset()
        self.log_dict({f"{stage}/entity_{k}": v for k, v in scores.items()})

    def on_validation_epoch_end(self) -> None:
        if self.uses_estimator and not self.estimator_fitted:
            return
        self._log_entities("val")
        super().on_validation_epoch_end()
        self.cache.flush("val", self.global_rank)
        self.log_projector()

    def on_test_epoch_end(self) -> None:
        self._log_entities("test")
        super().on_test_epoch_end()
        self.cache.flush("test", self.global_rank)

    def log_projector(self) -> None:
        """Validation features with their class names to TensorBoard's projector (once per fit)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        count = self.hparams.projection_samples
        if self._projector_logged or count <= 0 or self.trainer.sanity_checking or self.global_rank != 0:
            return
        if not isinstance(self.logger, TensorBoardLogger) or self.hparams.level != "sequence":
            return
        labels = self.labels_seen.get("val", {})
        indices, feats = self.cache.items("val")
        chosen = [(i, f) for i, f in zip(indices, feats) if i in labels][:count]
        if not chosen:
            return
        names = self.class_names
        metadata = [names[int(labels[i])] for i, _ in chosen]
        matrix = torch.stack([f for _, f in chosen])
        self.logger.experiment.add_embedding(
            matrix, metadata=metadata, tag="val/feature_embedding", global_step=self.global_step
        )
        self._projector_logged = True

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Sequence level: ``{"index": (B,), "probs": (B, C)}``, or ``{"index", "embeddings": (B, F)}`` for
        embeddings output. Token level: ``{"index": (B,), "word_counts": (B,), "word_probs": (N, C)}`` (or
        ``"word_embeddings": (N, F)``), one row per word start of the batch in order, ``word_counts[b]`` of them
        for sentence ``b`` (:func:`tlmodules.predictions.word_rows` writes them one row per word)."""
        feats, _, lengths = self.batch_features(batch, "predict")
        if lengths is not None:
            index = self.prediction_index(batch, len(lengths), dataloader_idx)
            counts = torch.tensor(lengths, dtype=torch.long, device=feats.device)
            if self.hparams.predict_output == "embeddings":
                return {"index": index, "word_counts": counts, "word_embeddings": feats}
            return {"index": index, "word_counts": counts, "word_probs": self.classify(feats).float().softmax(-1)}
        index = self.prediction_index(batch, len(feats), dataloader_idx)
        if self.hparams.predict_output == "embeddings":
            return {"index": index, "embeddings": feats}
        return {"index": index, "probs": self.classify(feats).float().softmax(-1)}

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        kind = "head" if not self.uses_estimator else ("linear_estimator" if self.head is not None else "pickled")
        return {
            **super().checkpoint_meta(),
            "backbone_saved": bool(self.hparams.save_backbone),
            "backbone_digest": self.backbone_digest(),
            "head": {
                "name": self.hparams.head,
                "kind": kind,
                "fitted": self.estimator_fitted or not self.uses_estimator,
                **(self.estimator_file or {}),
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.hparams.save_backbone:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("backbone.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint["tlmodules"]
        state = checkpoint["state_dict"]
        if not any(k.startswith("backbone.") for k in state):
            saved_digest = meta.get("backbone_digest")
            if saved_digest and saved_digest != self.backbone_digest():
                raise ConfigError(
                    f"the backbone {meta.get('backbone', {}).get('spec')} now resolves to different weights than the "
                    "ones this probe was trained on; restore those weights, retrain, or save with save_backbone=True"
                )
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        classifier = meta.get("head", {})
        if self.uses_estimator and classifier.get("fitted") is False:
            raise ConfigError(
                f"this checkpoint of the {self.hparams.head} probe was saved during its feature pass "
                f"(step {checkpoint.get('global_step')}), before the estimator was fitted; the features seen so far "
                "are not in the checkpoint, so resuming would fit the estimator on part of the training data: "
                "start the run again without ckpt_path"
            )
        if classifier.get("kind") == "pickled":
            self.head = None  # (built when the class looked linear; the fitted estimator was pickled instead)
        if classifier.get("kind") == "pickled" and classifier.get("fitted"):
            self.estimator = load_pickled_estimator(
                classifier["path"], classifier["sha256"], allow_pickle=self.hparams.trust_pickled_estimator
            )
            self.estimator_file = {"path": classifier["path"], "sha256": classifier["sha256"]}
        self.estimator_fitted = bool(classifier.get("fitted", False))


def _whole(limit: int | float, batches: int | float) -> bool:
    """Whether a Lightning batch limit (``limit_*_batches``: a fraction, or a count) leaves a loader of
    ``batches`` batches whole (``batches`` is already the limited count)."""
    if isinstance(limit, float):
        return limit >= 1.0
    return batches < limit
