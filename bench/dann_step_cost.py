"""What one DANNModule training step costs, per method, against the source-only step (USPS→MNIST batches).

Each method trains ``--warmup`` steps, then ``--steps`` timed steps (median of per-step wall times,
from one batch-end hook to the next, so data loading, augmentation and the optimizer step are included);
64 source + 64 target images per step, the recipe of ``bench/dann_digits.py``.
Run it on an otherwise idle machine: a second busy process on 2 cores distorts every figure.

    python bench/dann_step_cost.py --threads 1 2

Writes ``bench/results/dann_step_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from bench.dann_digits import DIGITS, RECIPE, RESULTS, Domains  # noqa: E402
from datamodules import RandomAffineBatch  # noqa: E402
from tlmodules import DANNModule  # noqa: E402

VARIANTS = {  # name: DANNModule arguments on top of the benchmark's recipe
    "source-only, source batch alone": {"adversarial": False, "target_statistics": False},
    "source-only, target statistics": {"adversarial": False, "target_statistics": True},
    "dann": {"adversarial": True, "method": "dann"},
    "cdan+e": {"adversarial": True, "method": "cdan"},
}
BASELINE = "source-only, source batch alone"


class StepTimer(pl.Callback):
    """Wall time of every training step after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        now = time.perf_counter()  # from one step's end to the next: loading, augmentation, step, optimizer
        if trainer.global_step > self.warmup:
            self.times.append(now - self._start)
        self._start = now


def step_ms(domains: Domains, arguments: dict, warmup: int, steps: int) -> float:
    pl.seed_everything(0)
    timer = StepTimer(warmup)
    recipe = {k: v for k, v in RECIPE.items() if k != "augment"}
    augment = RandomAffineBatch(**RECIPE["augment"]) if RECIPE.get("augment") else None
    model = DANNModule(backbone="builtin:lenet", num_classes=10, projection_samples=0, **recipe, **arguments)
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, domains.pair("usps2mnist", "dann", 64, augment))
    return 1000 * statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output", default=str(RESULTS / "dann_step_cost.json"))
    args = parser.parse_args()
    domains = Domains(DIGITS)
    results: dict = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        ms = {name: step_ms(domains, arguments, args.warmup, args.steps) for name, arguments in VARIANTS.items()}
        results[str(threads)] = {name: {"ms_per_step": v, "ratio": v / ms[BASELINE]} for name, v in ms.items()}
    lines = ["| torch threads | step | ms/step (median) | × source-only step |", "|---|---|---|---|"]
    for threads, row in results.items():
        for name, r in row.items():
            lines.append(f"| {threads} | {name} | {r['ms_per_step']:.1f} | {r['ratio']:.2f} |")
    table = "\n".join(lines) + "\n"
    output = Path(args.output)
    output.write_text(json.dumps({"recipe": RECIPE, "steps": args.steps, "results": results}, indent=2))
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
