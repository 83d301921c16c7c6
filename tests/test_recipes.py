"""Every recipe in ``configs/`` as a user runs it: ``python train.py`` in a process of its own, from the project
folder, on the data the recipe names (``../shared/data``, or the example files under ``configs/data``).

Each recipe is fitted for two batches (plus a short validation), then evaluated (``test`` where it has test data,
else ``validate``) and used to ``predict`` from the checkpoint the fit wrote. Only the outputs are redirected to a
scratch folder (log folder, feature cache, predictions file); the data paths and every other setting stay as
written. The checks: the checkpoint holds the weights and tlmodules' metadata (label set, backbone, the random
state for an exact resume), the run summary names the data files, evaluation logs into the fitted run and
reports metrics in range, prediction writes one well-formed row per input without opening a run folder, and
``train.py export`` writes an ONNX file that reproduces the module.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TrainPy
from PIL import Image

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SHARED = "../shared/data"  # as the recipes write it: relative to the project folder
PREDICT_BATCHES = 3

TINY = [
    "--trainer.min_steps",  # a recipe's floor on steps would outlast the two batches
    "null",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@dataclass
class Plan:
    """How a recipe is evaluated after its fit, and where its predictions read from."""

    evaluate: str  # "test" (the recipe has test data) or "validate"
    predict: list[str] = field(default_factory=list)  # extra arguments naming the data to predict
    torchvision_weights: tuple[str, str] | None = None  # (model, weights) to place where torchvision looks


PLANS: dict[str, Plan] = {
    "camvid_multitask": Plan("test", ["--data.init_args.predict_dir", f"{SHARED}/camvid/test/images"]),
    "dann_folders": Plan("validate", ["--data.init_args.target.init_args.predict_dir", f"{SHARED}/digits/usps/test"]),
    "dann_text": Plan(
        "validate", ["--data.init_args.target.init_args.predict_file", f"{SHARED}/text/uci_sentences/imdb_labelled.txt"]
    ),
    "digits_finetune": Plan("test"),
    "energy_multitask": Plan(
        "validate", ["--data.init_args.predict_file", f"{SHARED}/tabular/energy_efficiency/ENB2012_data.csv"]
    ),
    "minilm_finetune": Plan(
        "validate", ["--data.init_args.predict_file", f"{SHARED}/text/uci_sentences/amazon_cells_labelled.txt"]
    ),
    "minilm_few_shot": Plan(
        "validate", ["--data.init_args.predict_file", f"{SHARED}/text/uci_sentences/amazon_cells_labelled.txt"]
    ),
    "minilm_probe": Plan("validate", ["--data.init_args.predict_file", f"{SHARED}/text/sms_spam/SMSSpamCollection"]),
    "ner_probe": Plan("validate", ["--data.init_args.predict_file", "configs/data/ner_example/valid.conll"]),
    "quickstart": Plan("test"),
    "resnet18_finetune": Plan(
        "test", ["--data.init_args.predict_dir", f"{SHARED}/digits/usps/test"], ("resnet18", "IMAGENET1K_V1")
    ),
}


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def event_scalars(folder: Path, newest_only: bool = False) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    tags: set[str] = set()
    for events in files[-1:] if newest_only else files:
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def check_ran(done: Any, what: str) -> None:
    assert done.returncode == 0, f"{what} failed:\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-4000:]


def check_predictions(path: Path, meta: dict[str, Any], recipe: dict[str, Any]) -> None:
    """One row per input, ids unique, a label of the label set with probabilities that sum to 1 (per task for a
    multi-task model, per word for a tagger)."""
    header, rows = read_csv(path)
    assert rows, "no prediction rows"
    class_names = meta.get("class_names") or []
    if "word" in header:  # a tagger: one row per word
        tag, prob = header.index("tag"), header.index("prob")
        scored = [row for row in rows if row[tag]]
        assert scored and all(row[tag] in class_names for row in scored)
        assert all(0.0 < float(row[prob]) <= 1.0 for row in scored)
        return
    assert header[0] == "id" and len({row[0] for row in rows}) == len(rows)
    if meta.get("tasks"):  # multi-task: a column per task
        for task in meta["tasks"]:
            cells = [row[header.index(task["name"])] for row in rows]
            if task["kind"] in ("segmentation", "mask"):  # the path of a mask PNG of the image's size
                for cell in cells:
                    with Image.open(path.parent / cell) as mask:
                        values = np.asarray(mask)
                    assert values.ndim == 2 and values.max() < task["num_outputs"] + (task["kind"] == "mask")
            elif task["kind"] == "regression":
                assert np.isfinite(np.array([float(cell) for cell in cells])).all()
            else:
                assert all(set(cell.split("|")) <= {"", *task["class_names"]} for cell in cells)
        return
    assert header == ["id", "label", *(f"prob_{name}" for name in class_names)]
    probs = np.array([[float(p) for p in row[2:]] for row in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [row[1] for row in rows] == [class_names[i] for i in probs.argmax(axis=1)]


def data_paths_named_in(recipe: dict[str, Any]) -> set[str]:
    """Every value of the recipe's data section that is a path of the shared data or the example files."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, str) and value.startswith((SHARED, "configs/data")):
            found.add(value)

    walk(recipe["data"])
    return found


def test_every_recipe_has_a_plan() -> None:
    assert {path.stem for path in RECIPES} == set(PLANS), "add the new recipe to PLANS in tests/test_recipes.py"


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_evaluates_and_predicts_as_written(
    recipe_path: Path, tmp_path: Path, train_py: TrainPy, request: pytest.FixtureRequest
) -> None:
    recipe = yaml.safe_load(recipe_path.read_text())
    plan = PLANS[recipe_path.stem]
    env = {}
    if plan.torchvision_weights:
        request.getfixturevalue("torchvision_cache")(*plan.torchvision_weights)
        env["TORCH_HOME"] = str(tmp_path / "torch_home")  # where the fixture placed the weights
    name = recipe["trainer"]["logger"]["init_args"]["name"]
    runs = tmp_path / "runs"
    outputs = ["--trainer.logger.init_args.save_dir", str(runs)]
    if "cache_dir" in recipe["model"].get("init_args", {}):
        outputs += ["--model.init_args.cache_dir", str(tmp_path / "feature_cache")]
    config = ["--config", str(recipe_path.relative_to(ROOT))]

    # fit: a checkpoint with the weights, tlmodules' metadata and the random state; a summary naming the data
    check_ran(train_py(["fit", *config, *TINY, *outputs], cwd=ROOT, env=env), "fit")
    run = runs / name / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and list(run.glob("checkpoints/best-*.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    meta = checkpoint["tlmodules"]
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]
    assert meta["module"] == recipe["model"]["class_path"].rsplit(".", 1)[-1]
    random_state = checkpoint["callbacks"]["TrainingRandomState"]["processes"]
    assert len(random_state) == 1 and {"torch", "numpy", "python"} <= set(random_state[0])
    if not meta.get("tasks"):
        assert len(meta["class_names"]) >= 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] and data_paths_named_in(recipe) <= set(summary["data"].values())

    # evaluate the checkpoint: metrics logged into the fitted run, not a new run folder
    monitored = (recipe.get("checkpoint") or {}).get("monitor", "val/acc")
    done = train_py([plan.evaluate, *config, *outputs, "--ckpt_path", str(last), *TINY[-4:]], cwd=ROOT, env=env)
    check_ran(done, plan.evaluate)
    assert sorted(p.name for p in (runs / name).iterdir()) == ["version_0"]
    scalars = event_scalars(run, newest_only=True)
    stage = "test" if plan.evaluate == "test" else "val"
    assert any(tag.startswith(f"{stage}/") for tag in scalars), scalars
    if plan.evaluate == "validate":
        assert monitored in scalars

    # predict from the checkpoint: one row per input, into the predictions file only
    predictions = tmp_path / "predictions.csv"
    predict = ["--predictions.output_path", str(predictions), "--trainer.limit_predict_batches", str(PREDICT_BATCHES)]
    predict += ["--ckpt_path", str(last), *plan.predict]
    done = train_py(["predict", *config, *outputs, *predict], cwd=ROOT, env=env)
    check_ran(done, "predict")
    check_predictions(predictions, meta, recipe)
    assert sorted(p.name for p in (runs / name).iterdir()) == ["version_0"], "predict opened a run folder"

    # export the checkpoint as ONNX: the file reproduces the module (checked by the export itself, on inputs of
    # another size than traced), and its sidecar names the outputs the predictions file has
    exported = tmp_path / "onnx"
    done = train_py(
        ["export", "--ckpt_path", str(last), "--format", "onnx", "--output", str(exported)], cwd=ROOT, env=env
    )
    check_ran(done, "export")
    sidecar = json.loads((exported / "preprocessing.json").read_text())
    assert (exported / "model.onnx").is_file() and sidecar["written"]["max_abs_difference"] <= 1e-4
    names = [t["name"] for t in meta["tasks"]] if meta.get("tasks") else ["probs"]
    assert [o["name"] for o in sidecar["outputs"]] == names
    if not meta.get("tasks"):
        assert sidecar["outputs"][0]["labels"] == meta["class_names"]
