"""MultiTaskModule on tiny numeric data: partial labels, weighting strategies in the optimizer, per-task
metrics and logging, epoch-level DWA updates, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader

from tlmodules.multitask import MultiTaskModule

TASKS = [
    {"name": "digit", "kind": "multiclass", "num_outputs": 3},
    {"name": "load", "kind": "regression", "num_outputs": 1},
    {"name": "flag", "kind": "binary", "num_outputs": 1},
]
IN_FEATURES = 6

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one OpenMP thread


def samples(n: int, seed: int = 0, missing: float = 0.0) -> list[dict[str, Any]]:
    """Features ``(6,)``; digit = argmax of the first three, load = 2·x3 + x4, flag = x5 > 0; a ``missing``
    share of each task's labels is absent (-100 / NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    digit = x[:, :3].argmax(1)
    load = 2 * x[:, 3] + x[:, 4]
    flag = (x[:, 5] > 0).float()
    drop = torch.rand(3, n, generator=g) < missing
    digit[drop[0]] = -100
    load[drop[1]] = math.nan
    flag[drop[2]] = math.nan
    return [
        {"inputs": x[i], "labels": {"digit": digit[i], "load": load[i], "flag": flag[i]}, "index": i} for i in range(n)
    ]


def make_model(**kwargs: Any) -> MultiTaskModule:
    settings = {"tasks": TASKS, "in_features": IN_FEATURES, "trunk_hidden": 16, "lr": 0.01, "weight_decay": 0.0}
    return MultiTaskModule(**{**settings, **kwargs})


def trainer(**kwargs: Any) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**settings, **kwargs})


def grads_of(model: MultiTaskModule, batch: dict[str, Any]) -> dict[str, Tensor]:
    model.zero_grad()
    model.trainer = None
    outputs = model(batch["inputs"])
    losses = {t["name"]: model.task_loss(t, outputs[t["name"]], batch["labels"][t["name"]]) for t in model.tasks}
    total, _ = model.weighting(losses)
    total = total + 0.0 * sum(o.sum() for o in outputs.values())
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return next(iter(DataLoader(items, batch_size=len(items))))


def test_missing_labels_add_nothing_to_the_gradient() -> None:
    torch.manual_seed(0)
    model = make_model()
    batch = collate(samples(8))
    batch["labels"]["load"][:3] = math.nan  # three samples lack the regression label
    reference = grads_of(model, batch)
    # the regression head's gradient depends only on the five labelled samples: drop the others entirely
    labelled = {
        k: v[3:] if k == "inputs" else {t: y[3:] for t, y in v.items()} for k, v in batch.items() if k != "index"
    }
    kept = grads_of(model, labelled)
    torch.testing.assert_close(reference["heads.load.net.1.weight"], kept["heads.load.net.1.weight"])
    assert all(torch.isfinite(g).all() for g in reference.values())


def test_a_task_without_any_label_in_the_batch_gets_zero_gradient_and_no_nan() -> None:
    torch.manual_seed(0)
    model = make_model()
    batch = collate(samples(8))
    batch["labels"]["digit"][:] = -100
    grads = grads_of(model, batch)
    assert torch.count_nonzero(grads["heads.digit.net.1.weight"]) == 0
    assert torch.count_nonzero(grads["heads.load.net.1.weight"]) > 0
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_regression_heads_learn_standardised_targets_and_answer_in_the_targets_units() -> None:
    scaled = [{**t, "target_mean": 50.0, "target_std": 10.0} if t["kind"] == "regression" else t for t in TASKS]
    torch.manual_seed(0)
    plain = make_model()
    torch.manual_seed(0)
    model = make_model(tasks=scaled)
    batch = DataLoader(samples(8), batch_size=8).__iter__().__next__()
    raw = plain(batch["inputs"])["load"]  # the same head without statistics: its standardised output
    out = model(batch["inputs"])
    assert torch.allclose(out["load"], raw * 10.0 + 50.0)
    assert torch.allclose(out["digit"], plain(batch["inputs"])["digit"])  # classification untouched
    labels = batch["labels"]["load"] * 10.0 + 50.0
    loss = model.task_loss(model.tasks[1], out["load"], labels)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(raw, batch["labels"]["load"]))  # standard units
    with pytest.raises(ValueError, match="target_std"):
        make_model(tasks=[{**TASKS[1], "target_std": 0.0}])


def test_uncertainty_log_variances_are_optimised_and_receive_gradients() -> None:
    torch.manual_seed(0)
    model = make_model(weighting="uncertainty")
    optimizer = model.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.weighting.log_vars) in in_optimizer
    before = model.weighting.log_vars.detach().clone()
    trainer(max_steps=5).fit(model, DataLoader(samples(40, missing=0.3), batch_size=8))
    assert not torch.equal(model.weighting.log_vars.detach(), before)


@pytest.mark.parametrize("weighting", ["equal", "static", "uncertainty", "dwa", "rlw"])
def test_every_weighting_trains_all_tasks_and_logs_per_task_metrics(weighting: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    tasks = [dict(t, weight=2.0) if t["name"] == "load" else t for t in TASKS]
    model = make_model(weighting=weighting, tasks=tasks, lr=0.03)
    run = trainer(max_epochs=12, logger=TensorBoardLogger(tmp_path), log_every_n_steps=1)
    train, val = samples(192, seed=1, missing=0.2), samples(96, seed=2)
    run.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=48))
    metrics = run.callback_metrics
    for name in ("val/digit/acc", "val/digit/f1_macro", "val/flag/acc", "val/load/mae", "val/load/rmse", "val/load/r2"):
        assert name in metrics, name
    assert float(metrics["val/digit/acc"]) > 0.6 and float(metrics["val/flag/acc"]) > 0.75
    assert float(metrics["val/load/r2"]) > 0.5
    assert float(metrics["val/score"]) == pytest.approx(
        (float(metrics["val/digit/acc"]) + float(metrics["val/flag/acc"]) + float(metrics["val/load/r2"])) / 3,
        abs=1e-5,
    )
    assert {f"train/weight/{t['name']}" for t in TASKS} <= set(metrics)
    if weighting == "static":
        assert float(metrics["train/weight/load"]) == 2.0 and float(metrics["train/weight/digit"]) == 1.0


def test_dwa_gets_each_epochs_mean_task_losses() -> None:
    pl.seed_everything(0)
    model = make_model(weighting="dwa")
    seen: list[dict[str, float]] = []
    original = model.weighting.end_epoch
    model.weighting.end_epoch = lambda means: (seen.append(dict(means)), original(means))[1]
    train = samples(64, seed=3, missing=0.25)
    trainer(max_epochs=3).fit(model, DataLoader(train, batch_size=16))
    assert len(seen) == 3 and all(set(m) == {"digit", "load", "flag"} for m in seen)
    assert int(model.weighting.num_epochs) == 3
    weights = model.weighting.weights()
    assert sum(weights.values()) == pytest.approx(3.0) and len(set(weights.values())) == 3  # no longer all 1


def test_checkpoint_round_trip_and_mismatched_tasks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = make_model(weighting="uncertainty")
    run = trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(model, DataLoader(samples(32), batch_size=8))
    path = tmp_path / "mt.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert [t["name"] for t in checkpoint["tlmodules"]["tasks"]] == ["digit", "load", "flag"]
    restored = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    other = make_model(tasks=TASKS[:2])
    with pytest.raises(ValueError, match="tasks"):
        other.on_load_checkpoint(checkpoint)


def test_the_checkpoints_target_scaling_replaces_the_datas(tmp_path: Path) -> None:
    """A model built from other data (other statistics) answers with the trained heads' scaling once loaded."""
    trained = make_model(
        tasks=[{**t, "target_mean": 5.0, "target_std": 2.0} if t["name"] == "load" else t for t in TASKS]
    )
    checkpoint = {"tlmodules": trained.checkpoint_meta()}
    rebuilt = make_model(
        tasks=[{**t, "target_mean": 9.0, "target_std": 4.0} if t["name"] == "load" else t for t in TASKS]
    )
    rebuilt.load_state_dict(trained.state_dict())
    rebuilt.on_load_checkpoint(checkpoint)
    x = torch.randn(4, IN_FEATURES)
    assert torch.allclose(rebuilt(x)["load"], trained(x)["load"])
    assert rebuilt.tasks[1]["target_mean"] == 5.0 and rebuilt.tasks[1]["target_std"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "tasks is empty"),
        ({"tasks": [{"name": "a", "kind": "ordinal", "num_outputs": 3}]}, "kind"),
        ({"tasks": [{"name": "a", "kind": "multiclass", "num_outputs": 1}]}, "num_outputs"),
        ({"tasks": [TASKS[0], TASKS[0]]}, "unique"),
        ({"in_features": None}, "in_features"),
        ({"weighting": "gradnorm"}, "unknown loss weighting"),
    ],
)
def test_invalid_configurations_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_model(**kwargs)


class TaskData(pl.LightningDataModule):
    def __init__(self, tasks: list[dict[str, Any]], in_features: int = IN_FEATURES) -> None:
        super().__init__()
        self.tasks, self.in_features = tasks, in_features

    def train_dataloader(self) -> DataLoader:
        return DataLoader(samples(16), batch_size=8)


def test_a_model_without_tasks_takes_the_datamodules_in_setup() -> None:
    pl.seed_everything(0)
    model = MultiTaskModule(weighting="uncertainty", trunk_hidden=8)
    assert not model.built
    trainer(max_steps=2).fit(model, datamodule=TaskData(TASKS))
    assert model.task_names == ["digit", "load", "flag"] and model.hparams.in_features == IN_FEATURES
    assert model.hparams.tasks == model.tasks  # saved, so load_from_checkpoint rebuilds the same model


def test_data_with_other_tasks_than_the_model_is_refused() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="differ"):
        trainer(max_steps=1).fit(model, datamodule=TaskData(TASKS[:2]))
    with pytest.raises(ValueError, match="no tasks"):
        trainer(max_steps=1).fit(MultiTaskModule(), DataLoader(samples(8), batch_size=4))


def test_predictions_are_written_per_task_in_the_targets_units(tmp_path: Path) -> None:
    import csv

    from datamodules import MultiTaskDataModule
    from tlmodules.predictions import PredictionWriter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g)
    lines = ["a,b,c,colour,flag,price,tags"]
    for i, row in enumerate(x.tolist()):
        tags = "|".join(t for t, v in zip("uvw", row) if v > 0)
        cells = f",{'rgb'[i % 3]},{'yes' if row[0] > 0 else 'no'},{100 + i},{tags or '|'}"
        lines.append(",".join(f"{v:.4f}" for v in row) + cells)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "new.csv").write_text("a,b,c\n" + "\n".join(",".join(f"{v:.4f}" for v in r) for r in x[:5].tolist()))
    tasks = [
        {"name": "colour", "kind": "multiclass", "column": "colour"},
        {"name": "flag", "kind": "binary", "column": "flag"},
        {"name": "price", "kind": "regression", "column": "price"},
        {"name": "tags", "kind": "multilabel", "column": "tags"},
    ]
    data = MultiTaskDataModule(
        train_file=str(tmp_path / "train.csv"),
        predict_file=str(tmp_path / "new.csv"),
        tasks=tasks,
        val_fraction=0.0,
        batch_size=8,
    )
    pl.seed_everything(0)
    model = MultiTaskModule(trunk_hidden=8, lr=0.01)
    trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=data)
    target = tmp_path / "predictions.csv"
    trainer(callbacks=[PredictionWriter(str(target))]).predict(model, datamodule=data, return_predictions=False)

    with target.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    colour = ["colour", "colour_prob_b", "colour_prob_g", "colour_prob_r"]
    assert header == [
        "id",
        *colour,
        "flag",
        "flag_prob_yes",
        "price",
        "tags",
        "tags_prob_u",
        "tags_prob_v",
        "tags_prob_w",
    ]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]  # data rows of the predict file
    model.eval()
    with torch.no_grad():
        out = model(torch.stack([data.datasets["predict"][i]["inputs"] for i in range(5)]))
    probs = torch.tensor([[float(v) for v in r[2:5]] for r in rows])
    torch.testing.assert_close(probs, out["colour"].softmax(-1), atol=1e-5, rtol=1e-5)
    assert [r[1] for r in rows] == [["b", "g", "r"][i] for i in out["colour"].argmax(-1).tolist()]
    flag = torch.tensor([float(r[6]) for r in rows])
    torch.testing.assert_close(flag, out["flag"].sigmoid(), atol=1e-5, rtol=1e-5)
    assert [r[5] for r in rows] == [["no", "yes"][int(p >= 0.5)] for p in flag.tolist()]
    price = torch.tensor([float(r[7]) for r in rows])
    torch.testing.assert_close(price, out["price"], atol=1e-3, rtol=1e-5)
    assert price.min() > 50  # in the column's units (mean 114.5), not standardised
    tags = torch.tensor([[float(v) for v in r[9:12]] for r in rows])
    torch.testing.assert_close(tags, out["tags"].sigmoid(), atol=1e-5, rtol=1e-5)
    assert [r[8] for r in rows] == ["|".join(t for t, p in zip("uvw", probs) if p >= 0.5) for probs in tags.tolist()]


def test_bf16_mixed_reaches_the_fp32_validation_metrics() -> None:
    """Uncertainty weighting, 12 epochs on the three-task problem, seeds 0–2: under bf16-mixed autocast really
    runs, the weights and log-variances stay fp32, and every task's validation metric, averaged over the seeds,
    is within a stated tolerance of fp32's (accuracy ±0.05, RMSE ±15 %). One seed alone is not enough: bf16's
    rounding sends a 12-epoch run down another path, and single seeds differ by up to 6 of the 96 samples."""
    train, val = samples(192, seed=1, missing=0.2), samples(96, seed=2)
    results: dict[str, list[dict[str, float]]] = {"32-true": [], "bf16-mixed": []}
    for seed in range(3):
        for precision in results:
            pl.seed_everything(seed)
            model = make_model(weighting="uncertainty", lr=0.03)
            dtypes: list[torch.dtype] = []
            model.heads["load"].register_forward_hook(lambda m, args, out, seen=dtypes: seen.append(out.dtype))
            run = trainer(max_epochs=12, precision=precision)
            run.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=96))
            expected = torch.float32 if precision == "32-true" else torch.bfloat16
            assert set(dtypes) == {expected}
            assert all(p.dtype == torch.float32 for p in model.parameters())
            results[precision].append({k: float(v) for k, v in run.callback_metrics.items() if k.startswith("val/")})

    def mean(precision: str, name: str) -> float:
        return sum(r[name] for r in results[precision]) / len(results[precision])

    assert mean("32-true", "val/digit/acc") >= 0.8 and mean("32-true", "val/flag/acc") >= 0.8
    assert mean("32-true", "val/load/r2") >= 0.8
    assert abs(mean("bf16-mixed", "val/digit/acc") - mean("32-true", "val/digit/acc")) <= 0.05
    assert abs(mean("bf16-mixed", "val/flag/acc") - mean("32-true", "val/flag/acc")) <= 0.05
    assert mean("bf16-mixed", "val/load/rmse") == pytest.approx(mean("32-true", "val/load/rmse"), rel=0.15)


def multilabel_samples(n: int, seed: int, missing: float = 0.0) -> list[dict[str, Any]]:
    """Features ``(6,)``; tags = which of the first three features are positive (0/1 per label); a ``missing``
    share of rows lacks its tags (a row of NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    tags = (x[:, :3] > 0).float()
    tags[torch.rand(n, generator=g) < missing] = math.nan
    load = 2 * x[:, 3] + x[:, 4]
    return [{"inputs": x[i], "labels": {"tags": tags[i], "load": load[i]}, "index": i} for i in range(n)]


MULTILABEL_TASKS = [
    {"name": "tags", "kind": "multilabel", "num_outputs": 3},
    {"name": "load", "kind": "regression", "num_outputs": 1},
]


def test_multilabel_task_learns_each_label_and_ignores_missing_rows() -> None:
    pl.seed_everything(0)
    model = make_model(tasks=MULTILABEL_TASKS, weighting="uncertainty", lr=0.03)
    batch = collate(multilabel_samples(8, seed=0))
    assert model(batch["inputs"])["tags"].shape == (8, 3)
    # a row without tags changes nothing in the tags head's gradient
    full = grads_of(model, batch)
    partial = {**batch, "labels": {**batch["labels"], "tags": batch["labels"]["tags"].clone()}}
    partial["labels"]["tags"][:3] = math.nan
    kept = collate(multilabel_samples(8, seed=0)[3:])
    masked, reference = grads_of(model, partial), grads_of(model, kept)
    for name in reference:
        if name.startswith("heads.tags"):
            assert torch.allclose(masked[name], reference[name], atol=1e-6), name
    assert not torch.allclose(masked["heads.tags.net.1.weight"], full["heads.tags.net.1.weight"])
    # it learns: per-label accuracy and macro-F1 on held-out rows
    run = trainer(max_epochs=20)
    train, val = multilabel_samples(256, seed=1, missing=0.2), multilabel_samples(128, seed=2)
    run.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=128))
    metrics = run.callback_metrics
    assert float(metrics["val/tags/acc"]) >= 0.9 and float(metrics["val/tags/f1_macro"]) >= 0.9
    probs = torch.sigmoid(model(collate(val)["inputs"])["tags"])
    expected = float(((probs >= 0.5).float() == collate(val)["labels"]["tags"]).float().mean())
    assert float(metrics["val/tags/acc"]) == pytest.approx(expected, abs=1e-6)  # the mean over labels and rows
