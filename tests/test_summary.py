"""RunSummary: each fit leaves summary.json in its log folder and prints itself beside its sibling runs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from test_dann import domain_pairs, tiny_dann
from torch.utils.data import DataLoader

from tlmodules.summary import SUMMARY_FILE, RunSummary, format_table, sibling_summaries, training_data


def fit_tiny(save_dir: Path, adversarial: bool) -> tuple[Path, pl.Trainer]:
    torch.manual_seed(0)
    model = tiny_dann(adversarial=adversarial)
    data = domain_pairs(16)
    val = [d["target"] for d in data]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=TensorBoardLogger(save_dir, name="pair"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RunSummary(metrics=["val/source/acc", "val/target/acc", "val/target/im_score"])],
    )
    # validation: the target set twice (as "source" and "target" loaders), labels known
    trainer.fit(model, DataLoader(data, batch_size=8), [DataLoader(val, batch_size=8), DataLoader(val, batch_size=8)])
    return Path(trainer.log_dir), trainer


def test_summary_file_holds_the_method_steps_and_final_validation_metrics(tmp_path: Path) -> None:
    log_dir, trainer = fit_tiny(tmp_path, adversarial=True)
    summary = json.loads((log_dir / SUMMARY_FILE).read_text())
    assert summary["module"] == "DANNModule"
    assert summary["hparams"] == {"method": "dann", "head": "linear"}  # describe() first, then strategy and head
    assert summary["steps"] == 4
    assert list(summary["metrics"]) == ["val/source/acc", "val/target/acc", "val/target/im_score"]
    for name, value in summary["metrics"].items():
        assert value == pytest.approx(float(trainer.callback_metrics[name]))


def test_the_printed_table_compares_this_run_with_its_siblings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = fit_tiny(tmp_path, adversarial=False)
    capsys.readouterr()
    second, trainer = fit_tiny(tmp_path, adversarial=True)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if str(tmp_path) in line]
    assert len(rows) == 2
    assert rows[0].startswith(f"  {first}") and "source-only" in rows[0]
    assert rows[1].startswith(f"* {second}") and "dann" in rows[1]
    assert f"{float(trainer.callback_metrics['val/target/acc']):.4f}" in rows[1]


def test_siblings_skip_other_modules_and_unreadable_summaries(tmp_path: Path) -> None:
    def write(folder: str, text: str) -> None:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / SUMMARY_FILE).write_text(text)

    write("a", json.dumps({"module": "DANNModule", "hparams": {}, "metrics": {"val/target/acc": 0.5}}))
    write("b", json.dumps({"module": "FineTuneModule", "hparams": {}, "metrics": {}}))
    write("c", '{"module": "DANNMod')  # a run killed while writing
    rows = sibling_summaries(tmp_path / "a", "DANNModule")
    assert [Path(folder).name for folder, _ in rows] == ["a"]


def test_table_leaves_missing_and_nan_metrics_blank() -> None:
    data = {"train": "/data/a.tsv"}
    rows = [
        ("x", {"data": data, "hparams": {"method": "dann"}, "metrics": {"val/target/acc": float("nan")}, "steps": 3}),
        ("y", {"data": data, "hparams": {"method": "cdan"}, "metrics": {"val/target/im_score": 1.23456}, "steps": 5}),
    ]
    lines = format_table(rows, current="y").splitlines()
    header = lines[2].split()
    assert header == ["run", "data", "method", "steps", "val/target/acc", "val/target/im_score"]
    assert lines[3].split() == ["x", "data/a.tsv", "dann", "3"]
    assert lines[4].split() == ["*", "y", "data/a.tsv", "cdan", "5", "1.2346"]


def test_the_data_column_names_each_runs_training_files() -> None:
    """Runs of one recipe on different data are told apart: the train file, a domain pair, embedded data."""
    assert training_data({"train": "/home/me/reviews/train.tsv", "val": "/home/me/reviews/val.tsv"}) == (
        "reviews/train.tsv"
    )
    pair = {"source.train": "../shared/data/digits/usps/train", "target.train": "../shared/data/digits/mnist_t10k"}
    assert training_data(pair) == "usps/train → digits/mnist_t10k"
    assert training_data({"source.all": "digits", "target.all": "digits-on-photos"}) == "digits → digits-on-photos"
    assert training_data({"test": "/x/y/test.tsv"}) == "y/test.tsv"
    assert training_data({}) == ""
