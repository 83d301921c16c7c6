"""Output folders checked before a run starts: a folder that cannot be created or written fails at once,
naming the folder and the fix, instead of after hours of training at the first checkpoint or prediction."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl

from tlmodules.errors import UserError


class OutputFolderError(UserError, OSError):
    """An output folder (checkpoints, logs, predictions) cannot be created or written."""


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Raise :class:`OutputFolderError` unless ``folder`` exists as a writable folder or could be created.

    Nothing is created: the nearest existing ancestor must be a folder the process may write to.
    """
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(
            f"the {what} {folder} cannot be created: {existing} is a file, not a folder. Choose another "
            "folder, or move the file away"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"the {what} {folder} cannot be written: no write permission on {existing}. Choose a folder you "
            "may write to"
        )


def check_run_outputs(trainer: pl.Trainer) -> None:
    """The checkpoint folders and the logger's folder of a run, checked before it starts."""
    for callback in trainer.checkpoint_callbacks:  # without a dirpath, checkpoints go under default_root_dir
        check_writable_folder(getattr(callback, "dirpath", None) or trainer.default_root_dir, "checkpoint folder")
    for logger in trainer.loggers:
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        if root:
            check_writable_folder(root, "log folder")


class OutputFolderCheck(pl.Callback):
    """Checks the run's checkpoint and log folders in ``setup`` of ``fit``: before the model's own setup,
    feature caching or the first step (every tlmodules module adds it through ``configure_callbacks``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_run_outputs(trainer)
