"""Multi-task learning for driving scenes on CamVid (issue 18): a segmentation-only model against one shared
spatial trunk serving segmentation plus mask-derived tasks, with every loss weighting.

Data: ``../shared/data/camvid`` (SegNet's 367 / 101 / 233 split at 240×180, 11 classes, void ignored). Every model
is the recipe ``configs/camvid_multitask.yaml`` as it ships (ResNet-18 trunk with **no pretrained weights**:
ImageNet weights cannot be downloaded on the benchmark machine; FPN decoder; median-frequency class weights;
random scale-crop, flip and colour jitter), trained on the 367 training frames and tested on the 233 full test
frames; only the task list and the weighting change:

- ``segmentation_only``: the segmentation task alone;
- ``multitask_<weighting>``: segmentation + ``drivable`` (a per-pixel mask of Road) + ``objects`` (which of Car,
  Pedestrian, Bicyclist, SignSymbol cover more than 0.1 % of the frame: multilabel) + ``road_share`` (the share
  of Road pixels: regression), for ``equal``, ``static`` (auxiliary tasks at 0.5), ``uncertainty``, ``dwa`` and
  ``rlw``, and ``multitask_static_low`` (auxiliary tasks at 0.1).

Reported per model: test mIoU, per-class IoU, pixel accuracy, presence F1 (macro over the four objects) read
from the ``objects`` head and, for every model, from the predicted segmentation (a class is present where it
covers more than 0.1 % of the predicted frame), parameters, and seconds per training epoch. ``separate_models``
is the parameter count of one model per task (segmentation, drivable, objects, road share), each with its own
trunk: what the multi-task model saves.

    python bench/multitask_camvid.py --methods segmentation_only multitask_equal --threads 1
    python bench/multitask_camvid.py --report            # the table and bench/results/multitask_camvid.json

Each run appends a line to ``bench/results/multitask_camvid.runs.jsonl``; ``--report`` keeps the newest run per
(method, seed) and writes ``bench/results/multitask_camvid.json`` as ``{"results": {"segmentation_only":
{"miou": …, "per_class_iou": […], …}, "multitask_<weighting>": {…}}, "meta": {…}}`` (means over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from bench.common import RESULTS, ROOT, SHARED, commit, cpu_model, quiet_trainer, recipe_arguments  # noqa: E402

CAMVID = SHARED / "camvid"
RECIPE = ROOT / "configs" / "camvid_multitask.yaml"
RUNS = RESULTS / "multitask_camvid.runs.jsonl"
OUTPUT = RESULTS / "multitask_camvid.json"
OBJECTS = ["Car", "Pedestrian", "Bicyclist", "SignSymbol"]
MIN_SHARE = 0.001
WEIGHTINGS = ("equal", "static", "uncertainty", "dwa", "rlw")
METHODS = ("segmentation_only", *(f"multitask_{w}" for w in WEIGHTINGS), "multitask_static_low")
LOW_AUXILIARY_WEIGHT = 0.1  # multitask_static_low: the auxiliary tasks at 0.1, segmentation at 1
SEGMENTATION_TASK = {"name": "scene", "kind": "segmentation", "class_weights": "median_frequency"}
AUXILIARY_TASKS = [
    {"name": "drivable", "kind": "mask", "classes": ["Road"], "weight": 0.5},
    {"name": "objects", "kind": "multilabel", "classes": OBJECTS, "min_share": MIN_SHARE, "weight": 0.5},
    {"name": "road_share", "kind": "regression", "classes": ["Road"], "weight": 0.5},
]


def tasks_of(method: str) -> list[dict[str, Any]]:
    return [SEGMENTATION_TASK] if method == "segmentation_only" else [SEGMENTATION_TASK, *AUXILIARY_TASKS]


def build(method: str, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """The recipe's model and datamodule for ``method`` (its task list and weighting), and its trainer budget."""
    from datamodules import SegmentationDataModule
    from tlmodules import MultiTaskModule

    model_args, data_args, trainer_args = recipe_arguments(RECIPE)
    data_args = {k: v for k, v in data_args.items() if not k.endswith("_dir") and k not in ("tasks", "class_names")}
    data = SegmentationDataModule(
        train_dir=str(CAMVID / "train"),
        test_dir=str(CAMVID / "test"),
        class_names=str(CAMVID / "classes.txt"),
        tasks=tasks_of(method),
        **{**data_args, "val_fraction": 0.0, "seed": seed, "num_workers": 0},
    )
    weighting = "equal" if method == "segmentation_only" else method.removeprefix("multitask_")
    if weighting == "static_low":
        weighting = "static"
        model_args["weighting_args"] = {"weights": {t["name"]: LOW_AUXILIARY_WEIGHT for t in AUXILIARY_TASKS}}
    model = MultiTaskModule(**{**model_args, "weighting": weighting})
    return model, data, trainer_args


def presence_f1(masks: list[torch.Tensor], truth: list[torch.Tensor], class_indices: list[int]) -> float:
    """Macro F1 over ``class_indices`` of "the class covers more than MIN_SHARE of the frame", predicted masks
    against true masks (void pixels of the truth left out of both)."""
    from sklearn.metrics import f1_score

    predicted, actual = [], []
    for mask, labels in zip(masks, truth):
        known = labels >= 0
        total = max(int(known.sum()), 1)
        predicted.append([float((mask[known] == c).sum()) / total > MIN_SHARE for c in class_indices])
        actual.append([float((labels[known] == c).sum()) / total > MIN_SHARE for c in class_indices])
    return float(f1_score(actual, predicted, average="macro", zero_division=0))


def run(method: str, seed: int, epochs: int | None, threads: int) -> dict[str, Any]:
    """Train one model on the training frames, test it on the test frames."""
    import lightning.pytorch as pl

    torch.set_num_threads(threads)
    pl.seed_everything(seed, workers=True)
    model, data, budget = build(method, seed)
    trainer = quiet_trainer(epochs or budget["max_epochs"], limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    tested = {k: float(v) for d in trainer.test(model, datamodule=data, verbose=False) for k, v in d.items()}
    scene = next(t for t in model.tasks if t["name"] == "scene")
    names = scene["class_names"]
    # presence read from the predicted segmentation, for every model
    masks, truth = [], []
    model.eval()
    with torch.inference_mode():
        for batch in data.test_dataloader():
            masks += list(model(batch["inputs"])["scene"].argmax(1))
            truth += list(batch["labels"]["scene"])
    indices = [names.index(name) for name in OBJECTS]
    result = {
        "method": method,
        "seed": seed,
        "epochs": trainer.current_epoch,
        "miou": tested["test/scene/miou"],
        "pixel_acc": tested["test/scene/pixel_acc"],
        "per_class_iou": [tested[f"test/scene/iou/{name}"] for name in names],
        "class_names": names,
        "presence_f1_from_segmentation": presence_f1(masks, truth, indices),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(trainer.current_epoch, 1),
        "threads": threads,
        "commit": commit(),
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
    }
    if "test/objects/f1_macro" in tested:
        result["presence_f1"] = tested["test/objects/f1_macro"]
        result["drivable_iou"] = tested["test/drivable/iou"]
        result["road_share_r2"] = tested["test/road_share/r2"]
    return result


def separate_parameters() -> int:
    """Parameters of one model per task (segmentation, drivable mask, objects, road share), each with its own
    trunk, as the recipe builds them."""
    from tlmodules import MultiTaskModule

    model_args = recipe_arguments(RECIPE)[0]
    total = 0
    for task in data_tasks([SEGMENTATION_TASK, *AUXILIARY_TASKS]):  # the training masks are read once
        model = MultiTaskModule(**{**model_args, "tasks": [task]})
        total += sum(p.numel() for p in model.parameters())
    return total


def data_tasks(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed task dicts (num_outputs, class names, statistics) the datamodule gives for ``tasks``."""
    from datamodules import SegmentationDataModule

    data = SegmentationDataModule(
        train_dir=str(CAMVID / "train"), class_names=str(CAMVID / "classes.txt"), ignore_value=11, tasks=tasks
    )
    return data.tasks


def report() -> None:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for line in RUNS.read_text().splitlines():
        row = json.loads(line)
        runs[(row["method"], row["seed"])] = row  # the newest run of each (method, seed)
    results: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        rows = [r for (m, _), r in sorted(runs.items()) if m == method]
        if not rows:
            continue
        mean = {}
        for key in ("miou", "pixel_acc", "presence_f1", "presence_f1_from_segmentation", "drivable_iou",
                    "road_share_r2", "seconds_per_epoch"):  # fmt: skip
            values = [r[key] for r in rows if key in r]
            if values:
                mean[key] = round(statistics.fmean(values), 4)
                if len(values) > 1:
                    mean[f"{key}_std"] = round(statistics.stdev(values), 4)
        mean["per_class_iou"] = [round(statistics.fmean(v), 4) for v in zip(*(r["per_class_iou"] for r in rows))]
        mean.update(parameters=rows[0]["parameters"], seeds=[r["seed"] for r in rows], epochs=rows[0]["epochs"])
        mean.update(commits=sorted({r["commit"] for r in rows}), threads=rows[0]["threads"])
        results[method] = mean
    names = next(iter(runs.values()))["class_names"]
    meta = {
        "date": date.today().isoformat(), "cpu": cpu_model(), "class_names": names,
        "separate_models_parameters": separate_parameters(),
        "trunk": "torchvision:resnet18, weights none (random initialisation)",
    }  # fmt: skip
    OUTPUT.write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    print("| model | mIoU | pixel acc | presence F1 (head) | presence F1 (from masks) | parameters | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        head = f"{r['presence_f1']:.3f}" if "presence_f1" in r else "—"
        print(
            f"| {method} | {r['miou']:.3f} | {r['pixel_acc']:.3f} | {head} | "
            f"{r['presence_f1_from_segmentation']:.3f} | {r['parameters'] / 1e6:.2f} M | {r['seconds_per_epoch']:.0f} |"
        )
    print("\n| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for method, r in results.items():
        print(f"| {method} | " + " | ".join(f"{v:.3f}" for v in r["per_class_iou"]) + " |")
    print(f"\nseparate models (one trunk per task): {meta['separate_models_parameters'] / 1e6:.2f} M parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's max_epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    parser.add_argument("--report", action="store_true", help="only aggregate the runs file")
    args = parser.parse_args()
    if args.report:
        report()
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            result = run(method, seed, args.epochs, args.threads)
            with RUNS.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(f"{method} seed {seed}: mIoU {result['miou']:.4f} in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
