"""The LightningCLI behind ``train.py``: fit / validate / test / predict from one YAML recipe.

The backbone is written once, in the model: its spec and weights flow to the datamodule (which
derives the preprocessing from them, and passes them on to the datamodules it holds), and the
datamodule's label set flows back to the model (``num_classes``, ``class_names``).

A user's mistake (bad data, a bad value, an unknown key, a malformed YAML file, an unreadable
checkpoint) ends as one ``error: ...`` line on stderr and exit status 2; ``TLMODULES_DEBUG=1`` brings
the traceback back. Errors that are not the user's (bugs) keep their traceback.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from tlmodules.backbones import BackboneError, accepted_forms, load_checkpoint, resolve_preprocessing, spec_kind
from tlmodules.cli_errors import DEBUG_VARIABLE, CommandLineError, check_config_files, simplify_parser_message
from tlmodules.errors import find_user_error
from tlmodules.predictions import PredictionWriter
from tlmodules.summary import RunSummary

SPLITS = ("train", "val", "test", "predict")
SPLITS_READ = {"test": ("test",), "predict": ("predict",)}  # what test / predict need; fit and validate read all
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself
MODULE_BACKBONE_NAMES = ("mlp",)  # backbones a module builds itself (MultiTaskModule's MLP trunk)


def spec_or_none(backbone: Any) -> str | None:
    """Only a spec string tells the datamodule how to preprocess; a module object does not."""
    return backbone if isinstance(backbone, str) else None


def known_or_none(value: Any) -> Any:
    """A datamodule without labelled data (``predict_dir`` alone) has an empty label set: unknown, not zero classes."""
    return value or None


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def datamodule_blocks(config: Any, parent: Namespace | None = None, key: str | None = None) -> list[tuple]:
    """``(block, parent_init_args, key)`` for the ``class_path``/``init_args`` block of a datamodule config and
    for those of the datamodules inside it (a domain pair's ``source`` and ``target``), outermost first."""
    if not isinstance(config, Namespace) or "class_path" not in config:
        return []
    blocks = [(config, parent, key)]
    init_args = config.get("init_args") or Namespace()
    for name, value in vars(init_args).items():
        if isinstance(value, Namespace) and "class_path" in value:
            cls = import_class(value["class_path"])
            if isinstance(cls, type) and issubclass(cls, LightningDataModule):
                blocks += datamodule_blocks(value, init_args, name)
    return blocks


def split_arguments(init_args: Namespace) -> list[str]:
    """The names of the file and folder arguments of a datamodule's splits (``train_file``, ``test_dir``, ...)."""
    return [f"{stage}_{kind}" for stage in SPLITS for kind in ("file", "dir") if f"{stage}_{kind}" in init_args]


RUN_FOLDER_BOOKKEEPING = ("hparams.yaml", "config.yaml")  # written at the start of every run


def is_empty_run_folder(folder: Path) -> bool:
    """A log folder holding nothing a user would miss: TensorBoard event files and the run's bookkeeping."""
    return all(
        p.is_dir() or p.name.startswith("events.out.tfevents.") or p.name in RUN_FOLDER_BOOKKEEPING
        for p in folder.rglob("*")
    )


class TransferArgumentParser(LightningArgumentParser):
    """The CLI's parser: a usage error becomes a :class:`CommandLineError` holding one line (the key and the
    problem), which :func:`main` prints, instead of the usage text and jsonargparse's Union report."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # jsonargparse's own trial parses expect its ArgumentError
            return super().error(message, ex)
        subcommand = self.prog.split()[-1] if self.prog.split()[-1] in ("fit", "validate", "test", "predict") else None
        detail = message if debugging() else simplify_parser_message(message, subcommand)
        raise CommandLineError(detail) from ex


class OwnArgumentsInstantiator(_InstantiatorFn):
    """Lightning's instantiator hands every datamodule built under the ``data`` key the hyperparameters of the
    top-level one, so a datamodule nested in it (a domain pair's ``source`` and ``target``) would record the
    outer config instead of its own arguments. Nested classes are built plainly and save their own."""

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        self.cli._dump_config()
        top = (self.cli.config_dump.get(self.key) or {}).get("class_path")
        if top is not None and import_class(top) is not class_type:
            return class_type(*args, **kwargs)
        # a link whose target the class does not take (the data's class_names for MultiTaskModule) would be
        # saved among its hyperparameters, and a later ``--ckpt_path`` run would pass it to the constructor
        accepted = set(inspect.signature(class_type.__init__).parameters)
        applied = {k: v for k, v in applied_instantiation_links.items() if k.rpartition(".")[2] in accepted}
        return super().__call__(class_type, *args, applied_instantiation_links=applied, **kwargs)


class TransferCLI(LightningCLI):
    """LightningCLI with tlmodules' links and defaults (TensorBoard under ``runs/``, best and last checkpoints,
    a rich progress bar), one-line usage errors, and runs that read only what they need:

    * ``test`` / ``predict`` read only their own split (the label set comes from the checkpoint);
    * ``test`` / ``validate`` of a checkpoint inside a run folder log into that run, ``predict`` logs nothing;
    * ``fit`` without validation data trains without a validation loop and keeps the last checkpoint;
    * a run that fails leaves no empty run folder behind.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", TransferArgumentParser)
        # The modules build their own optimizer (named parameter groups: backbone_lr_ratio, layer_decay,
        # no-decay biases, warmup and LP-FT schedules). LightningCLI's --optimizer/--lr_scheduler would
        # replace it with one flat group over model.parameters() and silently drop all of that.
        kwargs.setdefault("auto_configure_optimizers", False)
        self.checkpoint: dict[str, Any] | None = None
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(
            OwnArgumentsInstantiator(cli=self, key="model"), LightningModule, subclasses=self.subclass_mode_model
        )
        self.parser.add_instantiator(
            OwnArgumentsInstantiator(cli=self, key="data"), LightningDataModule, subclasses=self.subclass_mode_data
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check a local ``ckpt_path`` (readable, weights only) before Lightning reads its
        hyperparameters: a truncated or foreign file is a usage error naming the file."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        local = isinstance(ckpt_path, str) and "://" not in ckpt_path and not ckpt_path.startswith("registry")
        if local and ckpt_path not in LIGHTNING_CKPT_NAMES:
            try:
                self.checkpoint = load_checkpoint(ckpt_path)
            except (BackboneError, FileNotFoundError) as err:
                parser.error(f"ckpt_path: {err}")
            written_by = (self.checkpoint.get("tlmodules") or {}).get("module")
            class_path = self.model_class_path()
            if written_by and class_path and written_by != class_path.rpartition(".")[2]:
                parser.error(
                    f"ckpt_path: {ckpt_path} was written by {written_by}, not {class_path.rpartition('.')[2]}; "
                    f"use a config whose model is {written_by}, or use the checkpoint as a backbone with "
                    f"--model.init_args.backbone ckpt:{ckpt_path}"
                )

    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of the checkpoint's hyperparameters into the model config, for checkpoints written
        outside the CLI too: their hyperparameters carry no class path (the config's model is taken, which the
        check above matched to the checkpoint), and only arguments the model's constructor takes are kept."""
        if self.checkpoint is None:
            return
        hparams = dict(self.checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None) or self.model_class_path()
        cls = import_class(class_path)
        if not hparams or cls is None:
            return
        accepted = set(inspect.signature(cls.__init__).parameters)
        init_args = {k: v for k, v in hparams.items() if k in accepted}
        update = {self.config.subcommand: {"model": {"class_path": class_path, "init_args": init_args}}}
        self.config = self.parser.parse_object(update, self.config)

    def model_class_path(self) -> str:
        """The parsed config's model class path (before instantiation; ``""`` when there is none)."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        return (config.get("model") or {}).get("class_path") or ""

    def subcommand_config(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Check the backbone spec (and weights name) before anything is built, then shape the run to its
        subcommand (the splits it reads, the run folder it logs into)."""
        config = self.subcommand_config()
        init_args = config.get("model", {}).get("init_args", {}) if hasattr(config, "get") else {}
        spec = spec_or_none(init_args.get("backbone"))
        if isinstance(spec, str) and spec not in MODULE_BACKBONE_NAMES and spec_kind(spec) is None:
            kind = spec.partition(":")[0]
            problem = "has no kind" if ":" not in spec else f"has an unknown kind {kind!r}"
            self.parser.error(f"model.init_args.backbone: {spec!r} {problem}; {accepted_forms()}")
        try:
            resolve_preprocessing(spec, init_args.get("weights", "DEFAULT"))
        except (BackboneError, FileNotFoundError) as err:
            self.parser.error(f"model.init_args.backbone: {err}")
        if self.subcommand in SPLITS_READ:
            self.read_only_splits(config.get("data"), SPLITS_READ[self.subcommand])
        self.choose_run_folder(config)

    def read_only_splits(self, data: Any, keep: tuple[str, ...]) -> None:
        """Unset the data files and folders of the splits this subcommand does not read (``test`` would
        otherwise read and check the training file), and take the label set from the checkpoint. A datamodule
        inside another (a side of a domain pair) left with no data at all is dropped."""
        class_names = ((self.checkpoint or {}).get("tlmodules") or {}).get("class_names")
        for block, parent, key in datamodule_blocks(data):
            if not getattr(import_class(block["class_path"]), "splits_stand_alone", False):
                continue
            init_args = block["init_args"]
            for name in split_arguments(init_args):
                if not name.startswith(keep):
                    init_args[name] = None
            if parent is not None and not any(init_args[name] for name in split_arguments(init_args)):
                parent[key] = None
            elif class_names and "labels" in init_args and init_args["labels"] is None:
                init_args["labels"] = list(class_names)

    def choose_run_folder(self, config: Any) -> None:
        """``predict`` logs nothing; ``test``/``validate`` of a checkpoint saved inside a TensorBoard run folder
        (``<save_dir>/<name>/<version>/checkpoints/``) log into that run, beside its training curves."""
        trainer = config.get("trainer")
        if trainer is None:
            return
        if self.subcommand == "predict":  # nothing to log, and the predictions file is the output
            trainer["logger"] = False
            self.save_config_callback = None
            return
        ckpt_path = config.get("ckpt_path")
        logger = trainer.get("logger")
        if self.subcommand not in ("test", "validate") or not ckpt_path or not isinstance(logger, Namespace):
            return
        if import_class(logger.get("class_path", "")) is not TensorBoardLogger:
            return
        init_args = logger.get("init_args") or Namespace()
        run = Path(ckpt_path).resolve().parent.parent
        root = Path(init_args.get("save_dir") or ".").resolve() / (init_args.get("name") or "lightning_logs")
        if Path(ckpt_path).resolve().parent.name == "checkpoints" and run.parent == root:
            init_args["version"] = run.name
            logger["init_args"] = init_args
            self.save_config_callback = None  # the run's config.yaml (of its fit) stays as it is

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with Lightning's ``RichProgressBar`` (``rich`` is a dependency) unless the progress bar is
        off (``--trainer.enable_progress_bar false``) or another progress bar callback is given; without
        validation data, a fit keeps only its last checkpoint (there is no metric to choose a best one by)."""
        config = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer = {**(config.get("trainer") or {}), **kwargs}
        callbacks = trainer.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        has_split = getattr(self.datamodule, "has_split", None)
        if self.subcommand == "fit" and callable(has_split) and not has_split("val"):
            checkpoint = config.get("checkpoint")
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor is not None:
                checkpoint.monitor, checkpoint.save_top_k = None, 0
                checkpoint.save_last = True
            note = getattr(self.datamodule, "validation_note", lambda: None)()
            reason = note or "no validation data (no val file or folder, val_fraction 0)"
            rank_zero_info(
                f"{reason[0].upper()}{reason[1:]}: training without a validation loop; last.ckpt is the "
                "checkpoint to use"
            )
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; if it fails before its first training step, remove the run folder it created (and the log
        folders above it that it created) when that holds no checkpoint or summary: TensorBoard and the config
        file are opened before the data is set up. A run that trained keeps its folder (its curves)."""
        created = self.folders_this_run_creates()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            resumed_at = (self.checkpoint or {}).get("global_step", 0)
            if subcommand != "fit" or self.trainer.global_step <= resumed_at:
                for folder in created:  # deepest first
                    if folder.is_dir() and is_empty_run_folder(folder):
                        shutil.rmtree(folder, ignore_errors=True)
            raise

    def folders_this_run_creates(self) -> list[Path]:
        """The logger's run folder and those of its parents that do not exist yet, deepest first (none on ranks
        other than 0, which do not write logs)."""
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger) or self.trainer.global_rank != 0:
            return []
        created = []
        folder = Path(logger.log_dir).absolute()
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
        return created

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


def is_user_error(error: BaseException) -> BaseException | None:
    """The error to show the user in one line: a :class:`tlmodules.errors.UserError` in the chain, or Lightning's
    own report of a misconfigured Trainer."""
    found = find_user_error(error)
    if found is None and isinstance(error, MisconfigurationException):
        found = error
    return found


def writes_to_stderr(stream: Any) -> bool:
    try:
        return stream is sys.stderr or stream.fileno() == sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file (e.g. captured by a test)
        return False


def raised_in(error: BaseException) -> str | None:
    """The tlmodules module or datamodule whose constructor raised ``error`` (the innermost one), if any: a
    message about a bad argument value then says which class the value was given to."""
    owner = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(candidate, LightningModule | LightningDataModule):
            owner = type(candidate).__name__
    return owner


def main(args: list[str] | None = None) -> TransferCLI | None:
    """``train.py``: run the CLI (``export`` runs :mod:`tlmodules.export.command`; it returns ``None``); a user's
    mistake ends as ``error: <message>`` on stderr with exit status 2."""
    # Lightning's progress reports (devices, "Seed set to 0", "`Trainer.fit` stopped") go to stdout, so that
    # stderr holds problems only: a user's mistake is then the one line there
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and writes_to_stderr(handler.stream):
                handler.setStream(sys.stdout)
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["export"]:  # not a Trainer subcommand: tlmodules.export.command parses it
            from tlmodules.export.command import run as run_export

            run_export(argv[1:])
            return None
        check_config_files(argv)
        return TransferCLI(args=args)
    except Exception as err:  # SystemExit and KeyboardInterrupt pass through
        shown = is_user_error(err)
        if shown is None or debugging():
            raise
        owner = raised_in(shown)
        print(f"error: {owner + ': ' if owner else ''}{shown}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
