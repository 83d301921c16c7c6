"""The LightningCLI behind ``train.py``: fit / validate / test / predict from one YAML recipe.

The backbone is written once, in the model: its spec and weights flow to the datamodule (which
derives the preprocessing from them), and the datamodule's label set flows back to the model
(``num_classes``, ``class_names``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from tlmodules.backbones import (
    ACCEPTED_FORMS,
    BUILTIN_PREPROCESSING,
    BackboneError,
    load_checkpoint,
    resolve_preprocessing,
)
from tlmodules.predictions import PredictionWriter
from tlmodules.summary import RunSummary


def spec_or_none(backbone: Any) -> str | None:
    """Only a spec string tells the datamodule how to preprocess; a module object does not."""
    return backbone if isinstance(backbone, str) else None


def known_or_none(value: Any) -> Any:
    """A datamodule without labelled data (``predict_dir`` alone) has an empty label set: unknown, not zero classes."""
    return value or None


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
MODULE_BACKBONE_NAMES = (
    "mlp",
)  # backbones a module builds itself (MultiTaskModule's MLP trunk)  # ckpt_path values Lightning resolves itself


class TransferCLI(LightningCLI):
    """LightningCLI with tlmodules' links and defaults (TensorBoard under ``runs/``, best and last checkpoints,
    a rich progress bar)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        # The modules build their own optimizer (named parameter groups: backbone_lr_ratio, layer_decay,
        # no-decay biases, warmup and LP-FT schedules). LightningCLI's --optimizer/--lr_scheduler would
        # replace it with one flat group over model.parameters() and silently drop all of that.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check a local ``ckpt_path`` (readable, weights only) before Lightning reads its
        hyperparameters: a truncated or foreign file is a usage error naming the file."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        local = isinstance(ckpt_path, str) and "://" not in ckpt_path and not ckpt_path.startswith("registry")
        if local and ckpt_path not in LIGHTNING_CKPT_NAMES:
            try:
                load_checkpoint(ckpt_path)
            except (BackboneError, FileNotFoundError) as err:
                parser.error(f"ckpt_path: {err}")

    def before_instantiate_classes(self) -> None:
        """Check the backbone spec (and weights name) before anything is built: a usage error, not a traceback."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        init_args = config.get("model", {}).get("init_args", {}) if hasattr(config, "get") else {}
        spec = spec_or_none(init_args.get("backbone"))
        if isinstance(spec, str) and ":" not in spec and spec not in MODULE_BACKBONE_NAMES:
            self.parser.error(
                f"model.init_args.backbone: {spec!r} has no kind; "
                + ACCEPTED_FORMS.format(builtin_names=sorted(BUILTIN_PREPROCESSING))
            )
        try:
            resolve_preprocessing(spec, init_args.get("weights", "DEFAULT"))
        except (BackboneError, FileNotFoundError) as err:
            self.parser.error(f"model.init_args.backbone: {err}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with Lightning's ``RichProgressBar`` (``rich`` is a dependency) unless the progress bar is
        off (``--trainer.enable_progress_bar false``) or another progress bar callback is given."""
        config = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer = {**(config.get("trainer") or {}), **kwargs}
        callbacks = trainer.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__name__}",
                    "init_args": {"save_dir": "runs", "name": "tlmodules"},
                },
            }
        )
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone", compute_fn=spec_or_none)
        parser.link_arguments("model.init_args.weights", "data.init_args.weights")
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", compute_fn=known_or_none, apply_on="instantiate"
        )
        parser.link_arguments(
            "data.class_names", "model.init_args.class_names", compute_fn=known_or_none, apply_on="instantiate"
        )


def main(args: list[str] | None = None) -> TransferCLI:
    return TransferCLI(args=args)
