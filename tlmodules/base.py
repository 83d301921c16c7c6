"""The core every technique derives from: named parameter groups, optimizer and schedule, the non-finite-loss
guard, run checks, epoch means of training values and checkpoint metadata. It assumes nothing about labels;
single-label classification is :class:`tlmodules.classification.ClassificationMixin`.

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
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from tlmodules.backbones import Backbone, origin_dict
from tlmodules.baseline import TfidfBaseline, wants_baseline
from tlmodules.budget import MinimumSteps
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


class TransferModule(pl.LightningModule):
    """The core of every tlmodules technique.

    A subclass saves ``lr``, ``weight_decay``, ``optimizer``, ``momentum``, ``lr_schedule`` and
    ``warmup_fraction`` as hyperparameters (``save_hyperparameters``), builds ``self.backbone`` with
    :func:`tlmodules.backbones.build_backbone`, and implements :meth:`parameter_groups`; it may override
    :meth:`dynamic_lr_factor` (phase-dependent rates), :meth:`features`, :meth:`checkpoint_meta` (what a
    checkpoint records beyond the state dict) and :meth:`on_train_epoch_means` (epoch means of training values).
    See docs/architecture.md for the checklist of a new technique.
    """

    backbone: Backbone

    def features(self, inputs: Any) -> Tensor:
        """Inputs → the features the technique's heads read, ``(B, F)``; the backbone's by default."""
        return self.backbone(inputs)

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
        # the fused kernels update every parameter in one pass instead of looping over them (same arithmetic);
        # bench/speed.py measures the difference
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
        uninterrupted one (:mod:`tlmodules.random_state`), in the Python API as in the CLI. A datamodule with raw
        texts that asks for it (``baseline: tfidf``, the text datamodule's default) adds a TF-IDF + logistic
        regression baseline beside the model's metrics (:mod:`tlmodules.baseline`). The trainer's ``min_steps`` is a
        floor on the optimizer steps (:mod:`tlmodules.budget`). Lightning calls this after attaching the
        datamodule and before its ``setup``."""
        callbacks: list[pl.Callback] = [
            OutputFolderCheck(),
            PrecisionHardwareCheck(),
            TrainingRandomState(),
            MinimumSteps(),
        ]
        trainer = self._trainer
        if trainer is not None and wants_baseline(trainer.datamodule):
            callbacks.append(TfidfBaseline())
        return callbacks

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

    def logging_step(self) -> bool:
        """Whether Lightning writes step-level values after this training step (every ``log_every_n_steps``).

        Values logged only per step (learning rates, λ) are logged on those steps alone: each ``self.log``
        costs Lightning bookkeeping and a host-to-device copy of a Python float, a real share of a short GPU
        step (``bench/speed.py`` measures it), for values the logger would not write."""
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

    def accumulate_epoch_mean(self, name: str, value: Tensor, weight: int | Tensor) -> None:
        """Add a training step's ``value`` (weighted by ``weight`` samples; 0 adds nothing but the name) to
        ``name``'s epoch mean, logged at the epoch's end: one ``self.log`` per epoch instead of one per step, no
        host sync. Every process must accumulate the same names (they are reduced together)."""
        sums = self.__dict__.setdefault("_epoch_mean_sums", {})
        weight = torch.as_tensor(weight, dtype=torch.float64, device=value.device)
        pair = torch.stack([value.detach().double() * weight, weight])
        sums[name] = sums[name].to(pair.device) + pair if name in sums else pair

    def on_train_epoch_end(self) -> None:
        """Log the :meth:`accumulate_epoch_mean` values, each over every process's samples, and hand them to
        :meth:`on_train_epoch_means`."""
        sums = self.__dict__.get("_epoch_mean_sums")
        if not sums:
            return
        names = sorted(sums)
        totals = self.trainer.strategy.reduce(torch.stack([sums[n] for n in names]), reduce_op="sum")
        means = {n: (t[0] / t[1]).float() for n, t in zip(names, totals) if float(t[1]) > 0}
        self.log_dict(means)
        self._epoch_mean_sums = {}
        self.on_train_epoch_means(means)

    def on_train_epoch_means(self, means: dict[str, Tensor]) -> None:
        """The epoch's means of the accumulated training values (every process's samples); nothing by default."""

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
        """What a checkpoint records about this module beyond its state dict (subclasses extend): the module's
        class, so that another technique's checkpoint is refused, and the backbone's origin, so that
        ``backbone='ckpt:<path>'`` can rebuild it."""
        backbone = self.__dict__.get("_modules", {}).get("backbone")
        return {"module": type(self).__name__, "backbone": origin_dict(backbone) if backbone is not None else None}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The metadata, and the running epoch's sums of :meth:`accumulate_epoch_mean`, summed over processes
        (every process runs this hook), so a run resumed mid-epoch logs the same epoch means."""
        checkpoint["tlmodules"] = self.checkpoint_meta()
        sums = self.__dict__.get("_epoch_mean_sums") or {}
        names = sorted(sums)
        if names and self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(torch.stack([sums[n] for n in names]), reduce_op="sum")
            sums = dict(zip(names, totals))
        checkpoint["epoch_mean_sums"] = {n: sums[n].cpu() for n in names}

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
        """Check the checkpoint's module type; restore the running epoch's sums (each process takes an equal
        share: the epoch-end sum over processes gives back the saved sum)."""
        self.check_checkpoint_meta(checkpoint)
        saved = checkpoint.get("epoch_mean_sums") or {}
        world = self.trainer.world_size if self._trainer is not None else 1
        self._epoch_mean_sums = {n: s.to(self.device) / world for n, s in saved.items()}
