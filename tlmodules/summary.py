"""A closing summary of each run: its final validation metrics next to those of the earlier runs it compares with."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

SUMMARY_FILE = "summary.json"


class RunSummary(pl.Callback):
    """At the end of ``fit``, write ``summary.json`` (the data files, chosen hyperparameters and final ``val/…``
    metrics) into the run's log folder and print a table of this run and its sibling runs (the other versions
    under the same logger name, each with the data it trained on), so that e.g. a source-only and a DANN run of
    one recipe are compared at a glance, and runs on different data are not mistaken for each other.

    Args:
        hparams: hyperparameters shown as columns (those the model has), after what the module's own
            ``describe()`` returns, if it has one (DANNModule: ``{"method": "source-only" | "dann" | "cdan+e"}``).
        metrics: metric names shown as columns, in order, each followed by the text baseline's counterpart
            where the run logged one (``val/target/acc`` → ``val/target/baseline/acc``,
            :mod:`tlmodules.baseline`); ``None``: every ``val/…`` scalar, the baseline's included.
        compare: also list the sibling runs.
    """

    def __init__(
        self,
        hparams: list[str] | None = None,
        metrics: list[str] | None = None,
        compare: bool = True,
    ) -> None:
        self.hparams = hparams if hparams is not None else ["strategy", "head"]
        self.metrics = metrics
        self.compare = compare

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        hp = dict(pl_module.hparams)
        describe = getattr(pl_module, "describe", None)
        described = describe() if callable(describe) else {}
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1
        }
        if self.metrics is not None:
            chosen = dict.fromkeys(shown for name in self.metrics for shown in (name, baseline_counterpart(name)))
            metrics = {name: metrics[name] for name in chosen if name in metrics}
        sources = getattr(trainer.datamodule, "data_sources", None)
        note = getattr(trainer.datamodule, "validation_note", None)
        return {
            "module": type(pl_module).__name__,
            "data": sources() if callable(sources) else {},
            "validation_note": note() if callable(note) else None,
            "hparams": {
                **described,
                **{name: hp[name] for name in self.hparams if name in hp and name not in described},
            },
            "metrics": metrics,
            "steps": trainer.global_step,
        }

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        summary = self.summary(trainer, pl_module)
        # the logger's own folder: Trainer.log_dir broadcasts from rank 0 under DDP, a collective that would
        # wait forever here (only rank 0 runs this hook) for the other ranks
        folder = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        log_dir = Path(folder) if folder else None
        rows = [(str(log_dir) if log_dir else "this run", summary)]
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            if self.compare:
                rows = sibling_summaries(log_dir, summary["module"])
        print(format_table(rows, current=str(log_dir) if log_dir else "this run"), flush=True)
        if summary["validation_note"]:
            print(f"Note: {summary['validation_note']}.", flush=True)


def baseline_counterpart(metric: str) -> str:
    """The text baseline's name for a metric: ``val/acc`` → ``val/baseline/acc``, ``val/target/f1_macro`` →
    ``val/target/baseline/f1_macro``."""
    head, _, last = metric.rpartition("/")
    return f"{head}/baseline/{last}"


def sibling_summaries(log_dir: Path, module: str) -> list[tuple[str, dict[str, Any]]]:
    """``(folder, summary)`` of every run of the same module under ``log_dir``'s parent, oldest first."""
    rows = []
    for path in sorted(log_dir.parent.glob(f"*/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run that died while writing its summary
        if summary.get("module") == module:
            rows.append((str(path.parent), summary))
    return rows


def short_path(path: str) -> str:
    """The last two parts of a path (``usps/train``): enough to tell data sets apart in a table."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def training_data(sources: dict[str, str]) -> str:
    """What a run trained on, in a few characters: ``yelp_labelled.txt``, or ``usps/train → mnist_t10k`` for a
    domain pair (``source.train`` → ``target.train``); ``all`` marks data that every split is drawn from."""

    def pick(prefix: str) -> str | None:
        found = sources.get(f"{prefix}train") or sources.get(f"{prefix}all")
        return short_path(found) if found else None

    source, target = pick("source."), pick("target.")
    if source or target:
        return f"{source or '?'} → {target or '?'}"
    return pick("") or ", ".join(short_path(p) for p in sources.values())


def format_table(rows: list[tuple[str, dict[str, Any]]], current: str) -> str:
    """A plain-text table: one row per run, its training data, hyperparameter and metric columns; ``*`` marks the
    current run."""
    hp_names = list(dict.fromkeys(name for _, s in rows for name in s["hparams"]))
    metric_names = list(dict.fromkeys(name for _, s in rows for name in s["metrics"]))
    header = ["run", "data", *hp_names, "steps", *metric_names]
    body = []
    for folder, s in rows:
        values = [s["metrics"].get(name) for name in metric_names]
        body.append(
            [
                ("* " if folder == current else "  ") + folder,
                training_data(s.get("data") or {}),
                *(str(s["hparams"].get(name, "")) for name in hp_names),
                str(s.get("steps", "")),
                *("" if v is None or math.isnan(v) else f"{v:.4f}" for v in values),
            ]
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *body]]
    return "\n".join(["", "Run summary (final validation metrics; * = this run):", *lines, ""])
