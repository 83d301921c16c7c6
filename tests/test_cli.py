"""The LightningCLI behind ``train.py``: every recipe in ``configs/`` run in-process on tiny data.

Each recipe is fitted for two batches with its data paths pointed at fixture data (image folders,
a sentence file, or scikit-learn's digits as they are), keeping its real backbone. The tests check
what the CLI promises: the backbone is written once (the datamodule derives its preprocessing from
the model's spec), the label set flows back into the model's head, and a run leaves TensorBoard
logs and a ``last.ckpt`` with tlmodules' metadata.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import FILLER, NEGATIVE, POSITIVE
from PIL import Image
from torchvision import transforms as T

from tlmodules.backbones import package_folder, resolve_preprocessing
from tlmodules.cli import TransferCLI, main

# in-process runs pass args= while pytest's own arguments sit in sys.argv; LightningCLI warns about that
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
DIGITS = CONFIGS / "digits_finetune.yaml"
MINILM = CONFIGS / "minilm_finetune.yaml"

TINY_FIT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def load_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def model_args(recipe: dict[str, Any]) -> dict[str, Any]:
    return recipe["model"].get("init_args") or {}


def data_args(recipe: dict[str, Any]) -> dict[str, Any]:
    return recipe["data"].get("init_args") or {}


def backbone_of(recipe: dict[str, Any]) -> tuple[str, str]:
    """The recipe's backbone spec and weights (FineTuneModule's defaults where it leaves them out)."""
    init = model_args(recipe)
    return init.get("backbone", "builtin:lenet"), init.get("weights", "DEFAULT")


def monitored(recipe: dict[str, Any]) -> str:
    """The metric a recipe's best checkpoint is chosen by (``val/acc`` by the CLI's default)."""
    return (recipe.get("checkpoint") or {}).get("monitor", "val/acc")


def run_name(recipe: dict[str, Any]) -> str:
    """The TensorBoard run name a recipe logs under (``tlmodules`` by the CLI's default)."""
    logger = (recipe.get("trainer") or {}).get("logger") or {}
    return (logger.get("init_args") or {}).get("name", "tlmodules")


# -- tiny data for each datamodule class -----------------------------------------------------------
@dataclass
class DataCase:
    """CLI overrides pointing a recipe's datamodule at tiny data, and what that data holds."""

    args: list[str]
    num_classes: int
    max_length: int | None = None
    task_names: list[str] | None = None  # multi-task data
    num_features: int | None = None


def digits_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    return DataCase([], num_classes=10)  # scikit-learn's digits ship with the dependencies: used as they are


def image_folder_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    make_image_folder = request.getfixturevalue("make_image_folder")
    classes = ("a", "b", "c")
    args = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    init = data_args(recipe)
    for stage in ("train", "val", "test", "predict"):
        key = f"{stage}_dir"
        if stage == "train" or init.get(key):
            args += [f"--data.init_args.{key}", str(make_image_folder(stage, classes=classes, per_class=6, size=16))]
    return DataCase(args, num_classes=len(classes))


def text_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    make_text_file = request.getfixturevalue("make_text_file")
    init = data_args(recipe)
    by_position = isinstance(init.get("text_column", "text"), int)  # keep the recipe's header convention
    text_column, label_column = ("0", "1") if by_position else ("text", "label")
    args = [
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_length",
        "16",
        "--data.init_args.text_column",
        text_column,
        "--data.init_args.label_column",
        label_column,
        "--data.init_args.header",
        str(not by_position).lower(),
        "--data.init_args.file_format",
        "tsv",
    ]
    for stage in ("train", "val", "test", "predict"):
        key = f"{stage}_file"
        if stage == "train" or init.get(key):
            path = make_text_file(f"{stage}.tsv", n=40, header=not by_position, seed=len(stage))
            args += [f"--data.init_args.{key}", str(path)]
    if not init.get("val_file") and init.get("val_fraction") is None:
        # 40 texts stand in for the recipe's file, of which the automatic split would hold out a tenth
        args += ["--data.init_args.val_fraction", "0.2"]
    return DataCase(args, num_classes=2, max_length=16)


def write_conll(path: Path, sentences: int, seed: int) -> Path:
    """Tagged sentences of common English words: "good" words are B-POS, "bad" words B-NEG, the rest O."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(sentences):
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE), rng.choice(NEGATIVE)]
        rng.shuffle(words)
        tags = ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]
        blocks.append("\n".join(f"{word} X {tag}" for word, tag in zip(words, tags)))
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n")
    return path


def conll_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    tmp_path = request.getfixturevalue("tmp_path")
    init = data_args(recipe)
    args = ["--data.init_args.batch_size", "4", "--data.init_args.max_length", "16"]
    for stage in ("train", "val", "test", "predict"):
        key = f"{stage}_file"
        if stage == "train" or init.get(key):
            args += [f"--data.init_args.{key}", str(write_conll(tmp_path / f"{stage}.conll", 12, seed=len(stage)))]
    if model_args(recipe).get("cache_dir"):  # keep the feature cache of tiny data out of the working directory
        args += ["--model.init_args.cache_dir", str(tmp_path / "feature_cache")]
    return DataCase(args, num_classes=3, max_length=16)  # O, B-NEG, B-POS


def digits_domain_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    # embedded data, used as it is; validate after the one tiny epoch (the recipe validates every 10)
    return DataCase(["--trainer.check_val_every_n_epoch", "1"], num_classes=10)


def multitask_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    """A 40-row table with 4 numeric features and the recipe's label columns (missing labels included)."""
    tmp_path = request.getfixturevalue("tmp_path")
    tasks = data_args(recipe)["tasks"]
    rng = random.Random(0)
    header = ["f0", "f1", "f2", "f3", *(t["column"] for t in tasks)]
    rows = []
    for i in range(40):
        features = [f"{rng.gauss(0, 1):.4f}" for _ in range(4)]
        values = {"regression": f"{rng.uniform(5, 40):.2f}", "binary": str(i % 2), "multiclass": "abc"[i % 3]}
        rows.append(features + ["" if i % 7 == 0 else values[t["kind"]] for t in tasks])  # every 7th row unlabelled
    path = tmp_path / "multitask.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    args = ["--data.init_args.train_file", str(path), "--data.init_args.batch_size", "8"]
    args += ["--trainer.log_every_n_steps", "1"]  # task weights are logged per step
    return DataCase(args, num_classes=0, task_names=[t["name"] for t in tasks], num_features=4)


def segmentation_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    """Train and val folders of four 48×64 frames each, masks of the recipe's classes (CamVid's 11, value 11 void)."""
    import numpy as np
    from PIL import Image

    tmp_path = request.getfixturevalue("tmp_path")
    names = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian"]
    names.append("Bicyclist")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in ("images", "labels"):
            (tmp_path / "scenes" / split / folder).mkdir(parents=True)
        for i in range(4):
            mask = np.kron(rng.integers(0, 12, (6, 8)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
            Image.fromarray(mask).save(tmp_path / "scenes" / split / "labels" / f"f{i}.png")
            Image.fromarray((mask[..., None] * [20, 10, 5]).astype(np.uint8)).save(
                tmp_path / "scenes" / split / "images" / f"f{i}.png"
            )
    (tmp_path / "scenes" / "classes.txt").write_text("\n".join(names) + "\n")
    args = [f"--data.init_args.{s}_dir={tmp_path / 'scenes' / s}" for s in ("train", "val")]
    args += ["--data.init_args.test_dir=null", f"--data.init_args.class_names={tmp_path / 'scenes' / 'classes.txt'}"]
    args += ["--data.init_args.batch_size", "2", "--trainer.log_every_n_steps", "1"]
    tasks = data_args(recipe)["tasks"]
    return DataCase(args, num_classes=0, task_names=[t["name"] for t in tasks])


def domain_pair_case(recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    """Each side of a DomainAdaptationDataModule pointed at tiny data of its own datamodule class."""
    args: list[str] = []
    for role in ("source", "target"):
        side = data_args(recipe)[role]
        side_case = DATA_CASES[side["class_path"].rsplit(".", 1)[-1]]({"data": side}, request)
        prefix = f"--data.init_args.{role}.init_args."
        args += [prefix + a.removeprefix("--data.init_args.") if a.startswith("--data.") else a for a in side_case.args]
    # validate after the one tiny epoch, whatever the recipe's interval
    args += ["--trainer.check_val_every_n_epoch", "1"]
    return DataCase(args, num_classes=side_case.num_classes, max_length=side_case.max_length)


def is_multitask(recipe: dict[str, Any]) -> bool:
    return recipe["model"]["class_path"].endswith("MultiTaskModule")


def check_task_links(cli: Any, case: DataCase) -> None:
    """The data's completed task list and input width reached the model; one head per task."""
    assert [t["name"] for t in cli.model.tasks] == cli.datamodule.task_names == case.task_names
    assert cli.model.hparams.in_features == cli.datamodule.in_features == case.num_features
    assert set(cli.model.heads) == set(case.task_names)
    for task in cli.datamodule.tasks:
        assert cli.model.heads[task["name"]].num_classes == task["num_outputs"]


DATA_CASES: dict[str, Callable[[dict[str, Any], pytest.FixtureRequest], DataCase]] = {
    "MultiTaskDataModule": multitask_case,
    "SegmentationDataModule": segmentation_case,
    "SklearnDigitsDataModule": digits_case,
    "DigitsDomainDataModule": digits_domain_case,
    "DomainAdaptationDataModule": domain_pair_case,
    "ImageFolderDataModule": image_folder_case,
    "TextClassificationDataModule": text_case,
    "ConllDataModule": conll_case,
}


def data_case(recipe_path: Path, recipe: dict[str, Any], request: pytest.FixtureRequest) -> DataCase:
    """The tiny-data overrides for a recipe's datamodule; a datamodule without an entry fails the test by name."""
    class_name = recipe["data"]["class_path"].rsplit(".", 1)[-1]
    if class_name not in DATA_CASES:
        pytest.fail(
            f"{recipe_path.name} uses datamodule {recipe['data']['class_path']!r}, for which tests/test_cli.py has "
            f"no tiny-data overrides; add an entry for it to DATA_CASES (known: {sorted(DATA_CASES)})",
            pytrace=False,
        )
    return DATA_CASES[class_name](recipe, request)


def prepare_backbone(recipe: dict[str, Any], request: pytest.FixtureRequest) -> None:
    """Place seeded stand-in weights where torchvision looks for them (there is no download here)."""
    spec, weights = backbone_of(recipe)
    if spec.startswith("torchvision:") and weights not in (None, "none", "None"):
        request.getfixturevalue("torchvision_cache")(spec.partition(":")[2], weights)


def recipe_params() -> list[Any]:
    """Every recipe in configs/; those with a transformer backbone (the real MiniLM) are marked slow."""
    params = []
    for path in RECIPES:
        spec = backbone_of(load_recipe(path))[0]
        slow = spec.startswith(("hf:", "pkg:"))
        params.append(pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else []))
    return params


def test_recipes_are_found() -> None:
    assert DIGITS in RECIPES and MINILM in RECIPES


def test_a_datamodule_without_tiny_data_overrides_fails_by_name(request: pytest.FixtureRequest) -> None:
    recipe = {"data": {"class_path": "datamodules.AudioFolderDataModule"}}
    with pytest.raises(pytest.fail.Exception, match="AudioFolderDataModule.*add an entry for it to DATA_CASES"):
        data_case(Path("audio_finetune.yaml"), recipe, request)


@pytest.mark.parametrize("recipe_path", recipe_params())
def test_recipe_links_backbone_into_data_and_labels_into_model(
    recipe_path: Path, request: pytest.FixtureRequest
) -> None:
    """Right after instantiation (no trainer yet): the data got the model's backbone, the model the data's labels."""
    recipe = load_recipe(recipe_path)
    case = data_case(recipe_path, recipe, request)
    prepare_backbone(recipe, request)
    cli = TransferCLI(args=["--config", str(recipe_path), *case.args], run=False)
    spec, weights = backbone_of(recipe)
    assert cli.datamodule.backbone_spec == spec
    assert cli.datamodule.backbone_weights == weights
    if is_multitask(recipe):  # the model takes the data's task list in setup (checked after a fit below)
        assert not cli.model.built and cli.datamodule.task_names == case.task_names
        return
    assert cli.model.head is not None and cli.model.head.num_classes == case.num_classes
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == case.num_classes
    assert cli.model.hparams.class_names == cli.datamodule.class_names


# -- what a run must leave behind -----------------------------------------------------------------
def event_scalars(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def find_normalize(transform: Any) -> T.Normalize:
    return next(step for step in transform.transforms if isinstance(step, T.Normalize))


def check_preprocessing_matches_backbone(cli: Any, recipe: dict[str, Any], case: DataCase) -> None:
    spec, weights = backbone_of(recipe)
    expected = resolve_preprocessing(spec, weights)
    datamodule = cli.datamodule
    if hasattr(datamodule, "source"):  # a domain pair: both sides follow the backbone; check the source's
        datamodule = datamodule.source
    batch = next(iter(datamodule.val_dataloader()))
    if expected.kind == "text":
        assert datamodule.tokenizer_source == expected.tokenizer
        if spec.startswith("pkg:"):
            assert Path(datamodule.tokenizer_source) == package_folder(spec.partition(":")[2])
        ids = batch["inputs"]["input_ids"]
        assert ids.shape[1] <= case.max_length
        vocab_size = cli.model.backbone.body.config.vocab_size
        assert int(ids.max()) < vocab_size, "token ids outside the backbone's vocabulary: wrong tokenizer"
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(datamodule.tokenizer_source).vocab_size == vocab_size
        return
    init = data_args(recipe)
    channels = init.get("in_channels") or expected.in_channels or 3
    size = init.get("image_size") or expected.crop_size or expected.resize_size
    assert tuple(batch["inputs"].shape[1:]) == (channels, size, size)
    transform = getattr(datamodule, "eval_transform", None) or datamodule.transform
    if expected.mean is not None and len(expected.mean) == channels:
        normalize = find_normalize(transform)
        assert tuple(normalize.mean) == pytest.approx(expected.mean)
        assert tuple(normalize.std) == pytest.approx(expected.std)


@pytest.mark.parametrize("recipe_path", recipe_params())
def test_recipe_fits_on_tiny_data(recipe_path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    recipe = load_recipe(recipe_path)
    case = data_case(recipe_path, recipe, request)
    prepare_backbone(recipe, request)
    runs, checkpoints = tmp_path / "runs", tmp_path / "checkpoints"
    cli = main(
        args=[
            "fit",
            "--config",
            str(recipe_path),
            *TINY_FIT,
            "--trainer.logger.init_args.save_dir",
            str(runs),
            "--checkpoint.dirpath",
            str(checkpoints),
            *case.args,
        ]
    )
    spec, weights = backbone_of(recipe)
    if is_multitask(recipe):
        check_multitask_run(cli, recipe, case, runs, checkpoints)
        return

    # the label set flowed from the data into the model
    assert cli.datamodule.num_classes == case.num_classes
    assert cli.model.head.num_classes == case.num_classes
    assert cli.model.class_names == cli.datamodule.class_names
    # the backbone was written once, in the model, and the data follows it
    assert cli.model.backbone.origin.spec == spec
    check_preprocessing_matches_backbone(cli, recipe, case)

    last = checkpoints / "last.ckpt"
    assert last.is_file()
    assert list(checkpoints.glob("best-*.ckpt")), f"no best-by-{monitored(recipe)} checkpoint"
    meta = torch.load(last, map_location="cpu", weights_only=False)["tlmodules"]
    assert meta["backbone"]["spec"] == spec
    if spec.startswith("torchvision:"):
        assert meta["backbone"]["weights"] == weights
    assert meta["num_classes"] == case.num_classes
    assert meta["class_names"] == cli.datamodule.class_names

    assert list((runs / run_name(recipe)).rglob("events.out.tfevents.*")), "no TensorBoard event file"
    scalars = event_scalars(runs / run_name(recipe))
    assert monitored(recipe) in scalars
    if recipe["model"]["class_path"].endswith("DANNModule"):
        assert {"val/source/acc", "val/target/acc", "val/target/im_score", "train/domain/acc"} <= scalars
    else:
        assert "val/acc" in scalars
    if model_args(recipe).get("level") == "token":
        assert {"val/entity_f1", "val/entity_precision", "val/entity_recall"} <= scalars


def check_multitask_run(cli: Any, recipe: dict[str, Any], case: DataCase, runs: Path, checkpoints: Path) -> None:
    check_task_links(cli, case)
    assert list(checkpoints.glob("best-*.ckpt")), f"no best-by-{monitored(recipe)} checkpoint"
    meta = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["tlmodules"]
    assert [t["name"] for t in meta["tasks"]] == case.task_names
    scalars = event_scalars(runs / run_name(recipe))
    assert monitored(recipe) in scalars
    for task in cli.datamodule.tasks:
        metric = {"regression": "rmse", "segmentation": "miou", "mask": "iou"}.get(task["kind"], "acc")
        assert f"val/{task['name']}/{metric}" in scalars
        assert f"train/weight/{task['name']}" in scalars


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_print_config_shows_model_backbone_and_strategy(
    recipe_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = load_recipe(recipe_path)
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--config", str(recipe_path), "--print_config"])
    assert exited.value.code in (0, None)
    out, err = capsys.readouterr()
    assert "error" not in err.lower()
    printed = yaml.safe_load(out)
    init = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == recipe["model"]["class_path"]
    assert init["backbone"] == backbone_of(recipe)[0]
    if recipe["model"]["class_path"].endswith("FineTuneModule"):
        assert init["strategy"] == model_args(recipe).get("strategy", "full")
    else:  # every knob of the module is printed, set or not
        import importlib
        import inspect

        module_path, _, name = recipe["model"]["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_path), name)
        linked = {"self", "num_classes", "class_names"}  # filled from the data
        knobs = set(inspect.signature(cls.__init__).parameters) - linked
        assert knobs <= set(init)
        for key, value in model_args(recipe).items():
            assert init[key] == value
    assert printed["data"]["class_path"] == recipe["data"]["class_path"]
    assert printed["checkpoint"]["monitor"] == monitored(recipe) and printed["checkpoint"]["save_last"] is True
    assert "output_path" in printed["predictions"]
    assert "optimizer" not in printed and "lr_scheduler" not in printed  # the module builds its own

    # the printed config is a complete recipe: it parses back to itself
    saved = tmp_path / "printed.yaml"
    saved.write_text(out)
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == printed


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def check_prediction_rows(header: list[str], rows: list[list[str]], class_names: list[str]) -> None:
    assert header == ["id", "label", *(f"prob_{name}" for name in class_names)]
    probs = np.array([[float(p) for p in row[2:]] for row in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [row[1] for row in rows] == [class_names[i] for i in probs.argmax(axis=1)]


def test_digits_fit_validate_test_predict(tmp_path: Path) -> None:
    save_dir = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    checkpoints = tmp_path / "checkpoints"
    main(args=["fit", "--config", str(DIGITS), *TINY_FIT, *save_dir, "--checkpoint.dirpath", str(checkpoints)])
    last = checkpoints / "last.ckpt"
    assert last.is_file()
    saved_state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]

    for subcommand, metric in (("validate", "val/acc"), ("test", "test/acc")):
        cli = main(args=[subcommand, "--config", str(DIGITS), "--ckpt_path", str(last), *QUIET, *save_dir])
        assert metric in cli.trainer.callback_metrics
        assert 0.0 <= float(cli.trainer.callback_metrics[metric]) <= 1.0

    output = tmp_path / "out" / "digits_predictions.csv"
    cli = main(
        args=[
            "predict",
            "--config",
            str(DIGITS),
            "--ckpt_path",
            str(last),
            "--predictions.output_path",
            str(output),
            *QUIET,
            *save_dir,
        ]
    )
    state = cli.model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in saved_state.items()), "predict ignored ckpt_path"
    header, rows = read_predictions(output)
    check_prediction_rows(header, rows, cli.datamodule.class_names)
    predict_set = cli.datamodule.datasets["predict"]
    assert len(rows) == len(predict_set)
    assert [row[0] for row in rows] == [cli.datamodule.prediction_id(i) for i in predict_set.indices]
    assert rows[0][0].startswith("load_digits[")
    assert not list(output.parent.glob("*.partial"))


def test_image_folder_predict_ids_are_paths_relative_to_predict_dir(
    tmp_path: Path, make_image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No recipe at all: the CLI's own defaults log to runs/tlmodules and save best + last checkpoints."""
    monkeypatch.chdir(tmp_path)
    train = make_image_folder("train", classes=("cat", "dog"), per_class=5, size=12)
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "day2").mkdir(parents=True)
    for i, name in enumerate(["b.png", "a.png", "day2/c.png"]):
        Image.fromarray(np.full((12, 12), 40 * i, dtype=np.uint8), mode="L").save(unlabelled / name)
    common = [
        "--model",
        "tlmodules.FineTuneModule",
        "--model.init_args.backbone",
        "builtin:lenet",
        "--data",
        "datamodules.ImageFolderDataModule",
        "--data.init_args.train_dir",
        str(train),
        "--data.init_args.predict_dir",
        str(unlabelled),
        "--data.init_args.val_fraction",
        "0.2",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        *QUIET,
    ]
    main(args=["fit", *common, *TINY_FIT])
    run = tmp_path / "runs" / "tlmodules" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and list(run.glob("checkpoints/best-*.ckpt"))
    assert list(run.glob("events.out.tfevents.*"))

    cli = main(args=["predict", *common, "--ckpt_path", str(last)])
    header, rows = read_predictions(tmp_path / "predictions.csv")  # the default output_path, in the cwd
    check_prediction_rows(header, rows, ["cat", "dog"])
    assert cli.model.class_names == ["cat", "dog"]
    assert [row[0] for row in rows] == ["a.png", "b.png", "day2/c.png"]


def test_predict_with_only_a_predict_dir_takes_the_labels_from_the_checkpoint(
    tmp_path: Path, make_image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    train = make_image_folder("train", classes=("cat", "dog"), per_class=5, size=12)
    unlabelled = make_image_folder("unlabelled", classes=("x",), per_class=3, size=12)
    common = ["--model", "tlmodules.FineTuneModule", "--data", "datamodules.ImageFolderDataModule", *QUIET]
    common += ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2"]
    main(
        args=[
            "fit",
            *common,
            *TINY_FIT,
            "--data.init_args.train_dir",
            str(train),
            "--data.init_args.val_fraction",
            "0.2",
        ]
    )
    last = tmp_path / "runs" / "tlmodules" / "version_0" / "checkpoints" / "last.ckpt"
    main(args=["predict", *common, "--data.init_args.predict_dir", str(unlabelled), "--ckpt_path", str(last)])
    header, rows = read_predictions(tmp_path / "predictions.csv")
    check_prediction_rows(header, rows, ["cat", "dog"])
    assert [row[0] for row in rows] == ["x/000.png", "x/001.png", "x/002.png"]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_fit_into_the_same_log_folder_keeps_the_first_checkpoint(tmp_path: Path) -> None:
    args = ["fit", "--config", str(DIGITS), *TINY_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    runs = tmp_path / run_name(load_recipe(DIGITS))
    main(args=args)
    first = runs / "version_0" / "checkpoints" / "last.ckpt"
    assert first.is_file()
    digest = file_digest(first)
    main(args=args)
    second = runs / "version_1" / "checkpoints" / "last.ckpt"
    assert second.is_file()
    assert first.is_file() and file_digest(first) == digest, "the second run overwrote the first run's checkpoint"


@pytest.mark.slow
def test_train_py_runs_the_main_job_as_a_command(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(DIGITS), *TINY_FIT]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "runs" / "digits_finetune" / "version_0" / "checkpoints" / "last.ckpt").is_file()


# -- bad input fails before any training, with a message that says what to do ------------------------
def test_unknown_backbone_spec_lists_the_accepted_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(DIGITS), "--model.init_args.backbone", "foo:bar"]
    with pytest.raises(SystemExit) as exited:
        main(args=[*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert exited.value.code == 2  # a usage error, before anything is built
    message = capsys.readouterr().err
    assert "accepted backbone specs" in message and "'foo:bar'" in message
    for form in ("torchvision:", "hf:", "pkg:", "ckpt:", "builtin:"):
        assert form in message
    assert not (tmp_path / "runs").exists()


def test_unknown_strategy_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--config", str(DIGITS), "--model.init_args.strategy", "unfreeze_everything"])
    assert exited.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "strategy" in err and "unfreeze_everything" in err
    assert "freeze_unfreeze" in err and "lp_ft" in err  # the accepted choices


def test_optimizer_flags_are_not_offered(capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI's --optimizer would replace the module's parameter groups (backbone/head rates, layer decay)."""
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--config", str(DIGITS), "--optimizer", "torch.optim.SGD"])
    assert exited.value.code not in (0, None)
    assert "optimizer" in capsys.readouterr().err


def test_missing_train_file_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_sentences.tsv"
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--config", str(MINILM), "--data.init_args.train_file", str(missing)])
    assert exited.value.code == 2
    assert re.fullmatch(r"error: .*train file .*no_such_sentences\.tsv does not exist.*\n", capsys.readouterr().err)


def test_domain_pair_sides_keep_their_own_arguments_and_follow_the_model_backbone(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    """A DomainAdaptationDataModule of two ImageFolderDataModules from YAML: each side records its own arguments
    (LightningCLI used to hand every datamodule under ``data`` the outer config), and the model's backbone reaches
    both sides (the CLI's link only reaches the outer datamodule)."""
    source = make_image_folder("source", classes=("a", "b"), per_class=3, size=16)
    target = make_image_folder("target", classes=("a", "b"), per_class=5, size=16)
    args = [
        "--config",
        str(CONFIGS / "dann_folders.yaml"),
        "--data.init_args.source.init_args.train_dir",
        str(source),
        "--data.init_args.source.init_args.val_fraction",
        "0.34",
        "--data.init_args.target.init_args.train_dir",
        str(target),
        "--data.init_args.target.init_args.num_workers",
        "0",
    ]
    cli = TransferCLI(args=args, run=False)
    pair = cli.datamodule
    assert pair.source.hparams.train_dir == str(source) and pair.source.hparams.val_fraction == 0.34
    assert pair.target.hparams.train_dir == str(target) and pair.target.hparams.num_workers == 0
    assert "source" not in pair.source.hparams and "_class_path" not in pair.source.hparams
    expected = resolve_preprocessing("builtin:lenet", "DEFAULT")
    for side in (pair.source, pair.target):
        assert side.backbone_spec == "builtin:lenet"
        assert tuple(find_normalize(side.eval_transform).mean) == pytest.approx(expected.mean)
    pair.setup("fit")
    batch = next(iter(pair.target.train_dataloader()))
    assert tuple(batch["inputs"].shape[1:]) == (3, 28, 28)  # LeNet's input, from 16x16 grey images
    assert len(pair.target.datasets["val"]) == round(0.2 * 10)  # the recipe's fixed held-out share of the target


def test_fit_without_validation_data_keeps_the_last_checkpoint_without_a_monitor_warning(
    tmp_path: Path, make_image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``val_fraction: 0`` and no val folder: no validation loop, ``last.ckpt`` kept, no best-by-metric file, and
    no warning about the monitored key (the CLI's default monitor is val/acc)."""
    monkeypatch.chdir(tmp_path)
    train = make_image_folder("train", classes=("cat", "dog"), per_class=4, size=12)
    args = ["fit", "--model", "tlmodules.FineTuneModule", "--data", "datamodules.ImageFolderDataModule"]
    args += ["--data.init_args.train_dir", str(train), "--data.init_args.val_fraction", "0", *QUIET]
    args += ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", "--trainer.max_epochs", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(args=args)
    assert not [w for w in caught if "monitor" in str(w.message).lower()], [str(w.message) for w in caught]
    run = tmp_path / "runs" / "tlmodules" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert cli.trainer.global_step == 4 and len(cli.datamodule.datasets["train"]) == 8
    assert not [tag for tag in event_scalars(run) if tag.startswith("val/")]


def test_test_and_predict_read_only_their_own_split(
    tmp_path: Path, make_image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a fit, ``test`` with the training folder gone and a test folder that lacks a class: the training
    data is not read, the label set comes from the checkpoint, and the metrics log into the fitted run."""
    monkeypatch.chdir(tmp_path)
    train = make_image_folder("train", classes=("a", "b", "c"), per_class=4, size=12)
    common = ["--model", "tlmodules.FineTuneModule", "--data", "datamodules.ImageFolderDataModule", *QUIET]
    common += ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4"]
    main(args=["fit", *common, *TINY_FIT, "--data.init_args.train_dir", str(train)])
    last = tmp_path / "runs" / "tlmodules" / "version_0" / "checkpoints" / "last.ckpt"
    shutil.rmtree(train)
    test_only = make_image_folder("test", classes=("a", "c"), per_class=2, size=12)
    args = ["--data.init_args.train_dir", str(train), "--data.init_args.test_dir", str(test_only)]
    cli = main(args=["test", *common, *args, "--ckpt_path", str(last)])
    assert cli.datamodule.class_names == ["a", "b", "c"] and cli.model.class_names == ["a", "b", "c"]
    assert sorted(cli.datamodule.datasets) == ["test"]
    assert sorted(set(cli.datamodule.datasets["test"].labels)) == [0, 2]  # "c" is class 2 of the checkpoint
    assert "test/acc" in cli.trainer.callback_metrics
    assert sorted(p.name for p in (tmp_path / "runs" / "tlmodules").iterdir()) == ["version_0"]
    assert any(tag.startswith("test/") for tag in event_scalars(tmp_path / "runs" / "tlmodules" / "version_0"))
