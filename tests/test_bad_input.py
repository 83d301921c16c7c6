"""Guards that bad input fails at once, says what is wrong, and leaves earlier results alone: each case hands
tlmodules one bad input (an unknown backbone spec or weights name, a missing or empty data file or folder, a
missing column, a label outside the label set, a corrupt image, mismatched label spaces, a bad multi-task spec, a
model whose number of classes disagrees with its data or checkpoint, a checkpoint of another module type or cut in
half, a non-positive batch size or max_length, an unknown loss weighting or DANN method, a log folder that cannot
be created) through a constructor, ``Trainer.fit`` or the CLI, as a user would, and checks that the error has the
expected type and a message naming the problem (and the fix where it offers one), that no training batch started,
and that every file already in the output folder (checkpoints, predictions, a run summary) is byte for byte as it
was, with nothing removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from test_multitask_data import NUMERIC_TASKS, numeric_table, write
from torch.utils.data import DataLoader, TensorDataset

from datamodules import (
    DataError,
    DomainAdaptationDataModule,
    ImageFolderDataModule,
    MultiTaskDataModule,
    TextClassificationDataModule,
)
from tlmodules import DANNModule, FineTuneModule, MultiTaskModule
from tlmodules.backbones import BackboneError, build_backbone
from tlmodules.base import TransferModule
from tlmodules.cli import main
from tlmodules.outputs import OutputFolderError
from tlmodules.predictions import PredictionWriter

pytestmark = [
    # in-process CLI runs pass args= while pytest's own arguments sit in sys.argv; LightningCLI warns about that
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),
    # the output folder holds earlier results on purpose
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_finetune.yaml"  # FineTuneModule(builtin:lenet) + SklearnDigitsDataModule
MINILM = ROOT / "configs" / "minilm_finetune.yaml"  # FineTuneModule(pkg: MiniLM) + TextClassificationDataModule

# what the output folder holds before each case; each file must be unchanged afterwards
SENTINELS = {
    "last.ckpt": b"an earlier run's last checkpoint\n",
    "best-epoch03-acc0.9100.ckpt": b"an earlier run's best checkpoint\n",
    "predictions.csv": b"id,label,prob_a,prob_b\n1,a,0.9,0.1\n",
    "runs/tlmodules/version_0/summary.json": b'{"module": "FineTuneModule", "metrics": {"val/acc": 0.91}}\n',
    "blocker.txt": b"a file where a folder is expected\n",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real FineTuneModule checkpoint: builtin:lenet with a 2-class head, one step on random 28x28 images."""
    folder = tmp_path_factory.mktemp("lenet_checkpoint")
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 28, 28), torch.arange(4) % 2), batch_size=4)
    trainer = make_trainer(max_steps=1, default_root_dir=folder)
    trainer.fit(FineTuneModule(backbone="builtin:lenet", num_classes=2), loader)
    path = folder / "two_classes.ckpt"
    trainer.save_checkpoint(path)
    return path


@dataclass
class Env:
    """What a case builds its bad input from: a scratch folder, an output folder with sentinels, fixtures."""

    tmp: Path
    out: Path
    request: pytest.FixtureRequest
    lenet_checkpoint: Path

    def images(self, name: str = "images", classes: tuple[str, ...] = ("a", "b"), per_class: int = 4) -> Path:
        return self.request.getfixturevalue("make_image_folder")(name, classes=classes, per_class=per_class, size=16)

    def sentences(self, name: str = "train.tsv", n: int = 8) -> Path:
        return self.request.getfixturevalue("make_text_file")(name, n=n)

    def tokenizer(self) -> str:
        return str(self.request.getfixturevalue("tiny_hf_dir"))

    def checkpoint(self) -> Path:
        return self.lenet_checkpoint

    def truncated_checkpoint(self) -> Path:
        data = self.checkpoint().read_bytes()
        return write_bytes(self.tmp / "cut.ckpt", data[: len(data) // 2])

    def trainer(self, **overrides: Any) -> pl.Trainer:
        """A quiet CPU trainer that logs and checkpoints into the output folder (where earlier results lie)."""
        settings = {
            "default_root_dir": self.out,
            "enable_checkpointing": True,
            "callbacks": [ModelCheckpoint(dirpath=self.out, save_last=True), PredictionWriter(str(self.predictions))],
            "logger": TensorBoardLogger(save_dir=self.out / "runs", name="tlmodules"),
            "max_steps": 2,
            **overrides,
        }
        return make_trainer(**settings)

    @property
    def predictions(self) -> Path:
        return self.out / "predictions.csv"

    def cli(self, *args: str, recipe: Path = DIGITS) -> None:
        """``train.py fit`` with every output (checkpoints, logs, predictions) in the output folder."""
        outputs = [
            "--checkpoint.dirpath",
            str(self.out),
            "--trainer.logger.init_args.save_dir",
            str(self.out / "runs"),
            "--predictions.output_path",
            str(self.predictions),
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ]
        main(args=["fit", "--config", str(recipe), *outputs, *args])


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` → its bytes (``None`` for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def image_data(train_dir: Path, **kwargs: Any) -> ImageFolderDataModule:
    settings = {"backbone": "builtin:lenet", "batch_size": 2, "num_workers": 0, "val_fraction": 0.25, **kwargs}
    return ImageFolderDataModule(train_dir=str(train_dir), **settings)


def text_data(env: Env, **kwargs: Any) -> TextClassificationDataModule:
    kwargs.setdefault("train_file", str(env.sentences()))
    return TextClassificationDataModule(tokenizer=env.tokenizer(), batch_size=4, **kwargs)


def numeric_data(env: Env, **kwargs: Any) -> MultiTaskDataModule:
    kwargs.setdefault("tasks", NUMERIC_TASKS)
    return MultiTaskDataModule(train_file=str(numeric_table(env.tmp / "table.csv", n=12)), batch_size=4, **kwargs)


def fit_lenet(env: Env, data: pl.LightningDataModule, **model: Any) -> None:
    env.trainer().fit(FineTuneModule(backbone="builtin:lenet", **model), datamodule=data)


# -- the cases: each builds one bad input and triggers it ---------------------------------------------------------
def empty_class_folder(env: Env) -> None:
    root = env.tmp / "empty_images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here\n")
    fit_lenet(env, image_data(root))


def corrupt_png(env: Env) -> None:
    root = env.images()
    noise = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    write_bytes(root / "b" / "garbage.png", noise)
    fit_lenet(env, image_data(root))


def text_named_jpg(env: Env) -> None:
    root = env.images()
    (root / "a" / "notes.jpg").write_text("this is a text file, not an image\n")
    fit_lenet(env, image_data(root))


def val_dir_with_unknown_class(env: Env) -> None:
    train = env.images("train", classes=("a", "b"))
    val = env.images("val", classes=("a", "b", "d"), per_class=1)
    fit_lenet(env, image_data(train, val_dir=str(val)))


def different_label_spaces(env: Env) -> None:
    source = image_data(env.images("source", classes=("a", "b", "c")))
    target = image_data(env.images("target", classes=("b", "c", "d")))
    DomainAdaptationDataModule(source, target)


def model_with_more_classes_than_data(env: Env) -> None:
    fit_lenet(env, image_data(env.images(classes=("a", "b"))), num_classes=3)


def model_with_one_class(env: Env) -> None:
    FineTuneModule(backbone="builtin:lenet", num_classes=1)


def model_with_fewer_classes_than_data(env: Env) -> None:
    fit_lenet(env, image_data(env.images(classes=("a", "b", "c"))), num_classes=2)


def resume_other_module_type(env: Env) -> None:
    data = image_data(env.images(classes=("a", "b")))
    model = DANNModule(backbone="builtin:lenet", num_classes=2, projection_samples=0)
    env.trainer().fit(model, datamodule=data, ckpt_path=env.checkpoint())


def resume_other_number_of_classes(env: Env) -> None:
    data = image_data(env.images(classes=("a", "b", "c")))
    env.trainer().fit(FineTuneModule(backbone="builtin:lenet"), datamodule=data, ckpt_path=env.checkpoint())


def load_other_number_of_classes(env: Env) -> None:
    FineTuneModule.load_from_checkpoint(env.checkpoint(), num_classes=5)


def not_a_tlmodules_checkpoint(env: Env) -> None:
    path = env.tmp / "plain.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, path)
    FineTuneModule(backbone=f"ckpt:{path}", num_classes=2)


def unknown_optimizer(env: Env) -> None:
    fit_lenet(env, image_data(env.images()), optimizer="adam")


def log_folder_under_a_file(env: Env) -> None:
    logger = TensorBoardLogger(save_dir=env.out / "blocker.txt" / "runs", name="tlmodules")
    env.trainer(logger=logger).fit(FineTuneModule(backbone="builtin:lenet"), datamodule=image_data(env.images()))


def checkpoint_folder_under_a_file(env: Env) -> None:
    checkpoints = ModelCheckpoint(dirpath=env.out / "blocker.txt" / "checkpoints", save_last=True)
    env.trainer(callbacks=[checkpoints]).fit(
        FineTuneModule(backbone="builtin:lenet"), datamodule=image_data(env.images())
    )


def truncated_checkpoint_to_resume(env: Env) -> None:
    env.cli("--ckpt_path", str(env.truncated_checkpoint()))


def predictions_under_a_file(env: Env) -> None:
    main(
        args=[
            "predict",
            "--config",
            str(DIGITS),
            "--trainer.logger.init_args.save_dir",
            str(env.out / "runs"),
            "--trainer.logger.init_args.name",
            "tlmodules",
            "--predictions.output_path",
            str(env.out / "blocker.txt" / "predictions.csv"),
        ]
    )


def multitask_tasks_differ_from_data(env: Env) -> None:
    tasks = [{"name": "colour", "kind": "binary", "num_outputs": 1}]
    model = MultiTaskModule(backbone="mlp", tasks=tasks, in_features=3, trunk_hidden=8)
    env.trainer().fit(model, datamodule=numeric_data(env))


@dataclass(frozen=True)
class Bad:
    """``trigger(env)`` must raise ``error`` whose message matches ``match`` (for ``SystemExit``, a usage error:
    exit code 2 and ``match`` searched in what the CLI printed to stderr)."""

    trigger: Callable[[Env], Any]
    error: type[BaseException]
    match: str


CASES = [
    # -- backbone specs and weights --------------------------------------------------------------------------
    pytest.param(
        Bad(lambda env: build_backbone("resnet999"), BackboneError, r"accepted backbone specs: .*; got 'resnet999'"),
        id="backbone-spec-without-a-kind",
    ),
    pytest.param(
        Bad(
            lambda env: FineTuneModule(backbone="torchvision:resnet999"),
            BackboneError,
            r"torchvision has no classification model 'resnet999'\. Did you mean .*resnet18",
        ),
        id="backbone-unknown-torchvision-model",
    ),
    pytest.param(
        Bad(
            lambda env: build_backbone("builtin:nope"),
            BackboneError,
            r"'builtin:<name>' \(one of \['lenet'\]\).*; got builtin:nope",
        ),
        id="backbone-unknown-builtin",
    ),
    pytest.param(
        Bad(
            lambda env: build_backbone(f"hf:{env.tmp / 'no_such_model'}"),
            BackboneError,
            r"no_such_model.*local folder written by save_pretrained",
        ),
        id="backbone-missing-hf-folder",
    ),
    pytest.param(
        Bad(
            lambda env: FineTuneModule(backbone="torchvision:resnet18", weights="IMAGENET9K_V9"),
            BackboneError,
            r"unknown weights 'IMAGENET9K_V9' for torchvision:resnet18; choose one of: IMAGENET1K_V1, DEFAULT, none",
        ),
        id="torchvision-unknown-weights",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli(
                "--model.init_args.backbone", "torchvision:resnet18", "--model.init_args.weights", "V9"
            ),
            SystemExit,
            r"model\.init_args\.backbone: unknown weights 'V9' for torchvision:resnet18; choose one of: IMAGENET1K_V1",
        ),
        id="cli-unknown-weights",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli("--model.init_args.backbone", "builtin:nope"),
            SystemExit,
            r"model\.init_args\.backbone: accepted backbone specs: .*; got builtin:nope",
        ),
        id="cli-unknown-builtin-backbone",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli("--model.init_args.backbone", "resnet999"),
            SystemExit,  # a usage error now, before jsonargparse tries every Union member
            r"model\.init_args\.backbone: 'resnet999' has no kind; accepted backbone specs: 'torchvision:",
        ),
        id="cli-backbone-spec-without-a-kind",
    ),
    # -- image folders ---------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            lambda env: image_data(env.tmp / "nowhere"),
            DataError,
            r"train_dir .*nowhere is not a folder; check the path",
        ),
        id="image-folder-missing",
    ),
    pytest.param(
        Bad(
            lambda env: image_data(write_bytes(env.tmp / "flat" / "0.png", b"").parent),
            DataError,
            r"train_dir .*flat has no class sub-folders; expected <train_dir>/<class name>/<image files>",
        ),
        id="image-folder-without-class-folders",
    ),
    pytest.param(
        Bad(empty_class_folder, DataError, r"the train split is empty \(from .*empty_images\); give it at least one"),
        id="image-folder-without-images",
    ),
    pytest.param(
        Bad(corrupt_png, DataError, r"1 unreadable image file\(s\): .*garbage\.png \(.*\)\. Remove or replace them"),
        id="image-corrupt-png",
    ),
    pytest.param(
        Bad(text_named_jpg, DataError, r"1 unreadable image file\(s\): .*notes\.jpg \(.*\)\. Remove or replace them"),
        id="image-text-file-named-jpg",
    ),
    pytest.param(
        Bad(
            val_dir_with_unknown_class,
            DataError,
            r"val_dir .*val has class folders \['d'\] that the training data lacks \(classes: \['a', 'b'\]\)",
        ),
        id="image-val-class-outside-the-label-set",
    ),
    pytest.param(
        Bad(
            lambda env: image_data(env.images(), batch_size=0),
            DataError,
            r"batch_size must be a positive integer, got 0",
        ),
        id="image-batch-size-zero",
    ),
    pytest.param(
        Bad(lambda env: image_data(env.images(), image_size=0), DataError, r"image_size must be positive, got 0"),
        id="image-size-zero",
    ),
    # -- text tables -----------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            lambda env: text_data(env, train_file=str(env.tmp / "nope" / "train.tsv")),
            DataError,
            r"train file .*nope/train\.tsv does not exist; check the path",
        ),
        id="text-file-missing",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(env, train_file=str(write(env.tmp / "header.tsv", "text\tlabel\n"))),
            DataError,
            r"train file .*header\.tsv has no data rows",
        ),
        id="text-file-header-only",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(env, text_column="sentence"),
            DataError,
            r"text column 'sentence' not found in .*train\.tsv; its columns are \['text', 'label'\]\. "
            r"Set text_column to one of them",
        ),
        id="text-column-missing",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(env, label_column="sentiment"),
            DataError,
            r"label column 'sentiment' not found in .*train\.tsv; its columns are \['text', 'label'\]\. "
            r"Set label_column to one of them",
        ),
        id="text-label-column-missing",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(env, val_file=str(write(env.tmp / "val.tsv", "text\tlabel\ngood\tpos\nok\tmeh\n"))),
            DataError,
            r"label 'meh' in .*val\.tsv \(data row 2, header excluded\) is not in the label set \['neg', 'pos'\]; "
            r"fix the row, add the label to 'labels'",
        ),
        id="text-val-label-outside-the-label-set",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(env, labels=["neg", "neutral"]),
            DataError,
            r"label 'pos' in .*train\.tsv \(data row 2, header excluded\) is not in the label set \['neg', 'neutral'\]",
        ),
        id="text-labels-list-lacks-a-training-label",
    ),
    pytest.param(
        Bad(
            lambda env: text_data(
                env, train_file=str(write(env.tmp / "one.tsv", "text\tlabel\ngood\tpos\nnice\tpos\n"))
            ),
            DataError,
            r"one\.tsv has fewer than two distinct labels \(\['pos'\]\) in label column 'label'; check label_column",
        ),
        id="text-single-label",
    ),
    pytest.param(
        Bad(lambda env: text_data(env, max_length=0), DataError, r"max_length must be a positive integer, got 0"),
        id="text-max-length-zero",
    ),
    pytest.param(
        Bad(
            lambda env: TextClassificationDataModule(train_file=str(env.sentences()), batch_size=-1),
            DataError,
            r"batch_size must be a positive integer, got -1",
        ),
        id="text-batch-size-negative",
    ),
    pytest.param(
        Bad(
            lambda env: TextClassificationDataModule(train_file=str(env.sentences()), backbone="torchvision:resnet18"),
            DataError,
            r"backbone torchvision:resnet18 is an image model; text data needs a text backbone \(hf: or pkg:\)",
        ),
        id="text-data-with-image-backbone",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli("--data.init_args.train_file", str(env.tmp / "missing.tsv"), recipe=MINILM),
            SystemExit,  # the datamodule's DataError, as one line
            r"^error: TextClassificationDataModule: train file .*missing\.tsv does not exist; check the path",
        ),
        id="cli-text-file-missing",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli("--data.init_args.batch_size", "0"),
            SystemExit,
            r"^error: SklearnDigitsDataModule: batch_size must be a positive integer, got 0",
        ),
        id="cli-batch-size-zero",
    ),
    # -- domain pairs ----------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            different_label_spaces,
            DataError,
            r"source and target have different label spaces \(only in source: \['a'\]; only in target: \['d'\]\)",
        ),
        id="domain-different-label-spaces",
    ),
    # -- multi-task tables -----------------------------------------------------------------------------------
    pytest.param(
        Bad(
            lambda env: numeric_data(env, tasks=[{"name": "weight", "kind": "regression", "column": "weight"}]),
            DataError,
            r"task 'weight': label column 'weight' is not in .*table\.csv; its columns are "
            r"\['a', 'b', 'c', 'colour', 'price'\]\. Fix: set the task's 'column'",
        ),
        id="multitask-column-missing",
    ),
    pytest.param(
        Bad(
            lambda env: numeric_data(env, tasks=[{"name": "price", "kind": "regression", "column": "colour"}]),
            DataError,
            r"value 'red' in .*table\.csv \(task 'price', column 'colour'\) \(data row 1, header excluded\) is not "
            r"a number; regression targets must be numbers",
        ),
        id="multitask-regression-target-not-a-number",
    ),
    pytest.param(
        Bad(
            lambda env: numeric_data(env, tasks=[{"name": "colour", "kind": "ordinal", "column": "colour"}]),
            DataError,
            r"task 'colour' has unknown kind 'ordinal'; choose one of \['multiclass', 'binary', 'multilabel', "
            r"'regression'\]",
        ),
        id="multitask-unknown-task-kind",
    ),
    pytest.param(
        Bad(
            lambda env: numeric_data(env, tasks=[{"name": "colour", "kind": "binary", "column": "colour"}]),
            DataError,
            r"binary task 'colour': column 'colour' of .*table\.csv has 3 distinct values "
            r"\['blue', 'green', 'red'\]; .*make the task multiclass",
        ),
        id="multitask-binary-column-with-three-values",
    ),
    pytest.param(
        Bad(
            lambda env: numeric_data(
                env, val_file=str(write(env.tmp / "val.csv", "a,b,c,colour,price\n1,2,5,pink,3\n"))
            ),
            DataError,
            r"label 'pink' in .*val\.csv \(task 'colour', column 'colour'\) \(data row 1, header excluded\) is not in "
            r"the label set \['blue', 'green', 'red'\]",
        ),
        id="multitask-val-label-outside-the-label-set",
    ),
    pytest.param(
        Bad(
            lambda env: numeric_data(env, feature_columns=["a", "height"]),
            DataError,
            r"input column 'height' is not in .*table\.csv; .*Fix: set feature_columns to columns of the file",
        ),
        id="multitask-feature-column-missing",
    ),
    # -- models against their data -------------------------------------------------------------------------
    pytest.param(
        Bad(
            model_with_more_classes_than_data,
            ValueError,
            r"num_classes=3 in the model disagrees with the data, which has 2 classes \(\['a', 'b'\]\); "
            r"set num_classes=2",
        ),
        id="model-num-classes-larger-than-the-labels",
    ),
    pytest.param(
        Bad(
            model_with_fewer_classes_than_data,
            ValueError,
            r"num_classes=2 in the model disagrees with the data, which has 3 classes \(\['a', 'b', 'c'\]\); "
            r"set num_classes=3",
        ),
        id="model-num-classes-smaller-than-the-labels",
    ),
    pytest.param(
        Bad(
            model_with_one_class, ValueError, r"num_classes=1: a classifier needs at least 2 classes.*Leave num_classes"
        ),
        id="model-num-classes-one",
    ),
    pytest.param(
        Bad(
            multitask_tasks_differ_from_data,
            ValueError,
            r"the data's tasks .*'colour', 'multiclass', 3.* differ from the model's "
            r"\[\('colour', 'binary', 1\)\]; use one task list",
        ),
        id="multitask-model-tasks-differ-from-data",
    ),
    pytest.param(
        Bad(unknown_optimizer, ValueError, r"unknown optimizer 'adam'; choose adamw or sgd"),
        id="model-unknown-optimizer",
    ),
    pytest.param(
        Bad(
            lambda env: MultiTaskModule(backbone="mlp", weighting="gradnorm"),
            ValueError,
            r"unknown loss weighting 'gradnorm'; accepted names: \['equal', 'static', 'uncertainty', 'dwa', 'rlw'\]",
        ),
        id="multitask-unknown-weighting",
    ),
    pytest.param(
        Bad(
            lambda env: DANNModule(backbone="builtin:lenet", method="mmd"),
            ValueError,
            r"unknown method 'mmd'; choose dann or cdan",
        ),
        id="dann-unknown-method",
    ),
    # -- checkpoints -----------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            resume_other_module_type,
            ValueError,
            r"this checkpoint was written by FineTuneModule, not DANNModule; load it with FineTuneModule, or use it "
            r"as a backbone with backbone='ckpt:<path>'",
        ),
        id="checkpoint-of-another-module-type",
    ),
    pytest.param(
        Bad(
            resume_other_number_of_classes,
            ValueError,
            r"the checkpoint's head has 2 classes but this model has 3; to reuse its backbone for a new label set "
            r"use backbone='ckpt:<path>'",
        ),
        id="checkpoint-resumed-on-data-with-more-classes",
    ),
    pytest.param(
        Bad(
            load_other_number_of_classes,
            ValueError,
            r"the checkpoint's head has 2 classes but this model has 5",
        ),
        id="checkpoint-loaded-with-other-num-classes",
    ),
    pytest.param(
        Bad(
            lambda env: FineTuneModule(backbone=f"ckpt:{env.truncated_checkpoint()}", num_classes=2),
            BackboneError,
            r"cannot read checkpoint .*cut\.ckpt: .*It may be truncated",
        ),
        id="checkpoint-truncated-as-backbone",
    ),
    pytest.param(
        Bad(
            lambda env: image_data(env.images(), backbone=f"ckpt:{env.truncated_checkpoint()}"),
            BackboneError,
            r"cannot read checkpoint .*cut\.ckpt: .*It may be truncated",
        ),
        id="checkpoint-truncated-for-preprocessing",
    ),
    pytest.param(
        Bad(
            lambda env: env.cli("--model.init_args.backbone", f"ckpt:{env.truncated_checkpoint()}"),
            SystemExit,
            r"model\.init_args\.backbone: cannot read checkpoint .*cut\.ckpt: .*It may be truncated",
        ),
        id="cli-checkpoint-truncated-as-backbone",
    ),
    pytest.param(
        Bad(
            lambda env: FineTuneModule(backbone=f"ckpt:{env.tmp / 'nope.ckpt'}"),
            FileNotFoundError,
            r"checkpoint .*nope\.ckpt does not exist",
        ),
        id="checkpoint-missing-as-backbone",
    ),
    pytest.param(
        Bad(
            not_a_tlmodules_checkpoint,
            BackboneError,
            r"checkpoint .*plain\.ckpt was not written by a tlmodules module with a spec backbone",
        ),
        id="checkpoint-not-from-tlmodules",
    ),
    # -- output locations ------------------------------------------------------------------------------------
    pytest.param(
        Bad(log_folder_under_a_file, NotADirectoryError, r"Not a directory: .*blocker\.txt/runs"),
        id="log-folder-under-a-regular-file",
    ),
    pytest.param(
        Bad(truncated_checkpoint_to_resume, SystemExit, r"ckpt_path: cannot read checkpoint .*cut\.ckpt.*truncated"),
        id="checkpoint-truncated-as-cli-ckpt-path",
    ),
    pytest.param(
        Bad(
            checkpoint_folder_under_a_file,
            OutputFolderError,
            r"checkpoint folder .*blocker\.txt/checkpoints cannot be created: .*blocker\.txt is a file",
        ),
        id="checkpoint-folder-under-a-regular-file",
    ),
    pytest.param(
        Bad(
            predictions_under_a_file,
            SystemExit,  # through train.py: the OutputFolderError as one line
            r"^error: the predictions folder .*blocker\.txt cannot be created: .*blocker\.txt is a file, not a folder",
        ),
        id="predictions-under-a-regular-file",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_training_and_keeps_earlier_outputs(
    case: Bad,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    lenet_checkpoint: Path,  # trained here, before the training tripwire is set
) -> None:
    out = tmp_path / "out"
    for name, data in SENTINELS.items():
        write_bytes(out / name, data)
    before = snapshot(out)
    batches: list[int] = []
    original = TransferModule.on_train_batch_start

    def record(self: TransferModule, batch: Any, batch_idx: int) -> None:
        batches.append(batch_idx)
        original(self, batch, batch_idx)

    monkeypatch.setattr(TransferModule, "on_train_batch_start", record)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = Env(tmp=scratch, out=out, request=request, lenet_checkpoint=lenet_checkpoint)

    if case.error is SystemExit:
        with pytest.raises(SystemExit) as exited:
            case.trigger(env)
        assert exited.value.code == 2, "a usage error, reported by the CLI's parser"
        assert re.search(case.match, capsys.readouterr().err, flags=re.DOTALL)
    else:
        with pytest.raises(case.error, match=re.compile(case.match, flags=re.DOTALL)):
            case.trigger(env)

    assert batches == [], "a training batch started before the error"
    after = snapshot(out)
    assert {name: after.get(name) for name in before} == before, "an earlier result was overwritten or removed"
    # Lightning opens the TensorBoard writer before the setup hooks run, so a fit that fails in setup still
    # leaves a new log version holding an events file; never a checkpoint, predictions or a summary
    added = sorted(set(after) - set(before))
    assert all(re.fullmatch(r"runs/tlmodules/version_\d+(/events\.out\.tfevents\.[^/]+)?", p) for p in added), added
