"""Training budgets that follow the data: ``Trainer(min_steps=…)`` as a floor on optimizer steps."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class MinimumSteps(pl.Callback):
    """Make the trainer's ``min_steps`` a floor on a fit's optimizer steps.

    In Lightning, ``min_steps`` only keeps early stopping from ending a run sooner; ``max_epochs`` still ends it.
    A recipe written in epochs for thousands of examples then takes a handful of updates on a few dozen (16
    sentences at batch 16: one step per epoch). Here, when ``max_epochs`` would end the fit before ``min_steps``
    optimizer steps, the fit gets as many epochs as ``min_steps`` needs. Learning-rate schedules read the
    fit's total steps from the trainer, so they stretch with it; ``max_steps`` still caps the fit.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        min_steps, max_epochs = trainer.min_steps, trainer.max_epochs
        if not min_steps or max_epochs is None or max_epochs < 0:
            return
        batches = trainer.num_training_batches
        if not batches or not math.isfinite(batches):
            return
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        needed = math.ceil(min_steps / per_epoch)
        if needed > max_epochs:
            rank_zero_info(
                f"min_steps={min_steps}: training {needed} epochs instead of max_epochs={max_epochs} "
                f"({per_epoch} optimizer steps per epoch)"
            )
            trainer.fit_loop.max_epochs = needed
