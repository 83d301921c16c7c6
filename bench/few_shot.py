"""Few labels: K labelled sentences per class, tlmodules' recipes side by side with SetFit.

Sets (``--sets``): ``sst2`` (K per class drawn from SST-2's ``train.tsv``; test = its 872 ``test.tsv``
sentences), ``yelp`` and ``amazon`` (the UCI sentences: test = the file's last 200 lines, K per class drawn from
the rest). K ∈ ``--ks`` (8, 16, 64), seeds ``--seeds`` (0–4): seed ``s`` draws the K sentences of each class
with ``random.Random(s)``, the same sentences for every method.

Methods (``--methods``), the shipped recipes with only their data file changed, on all 2K sentences (none held
out: below 500 training texts the datamodules take no validation split unless asked):

- ``probe``: ``configs/minilm_probe.yaml``, frozen MiniLM features + logistic regression;
- ``finetune``: ``configs/minilm_finetune.yaml``, full fine-tuning (its ``min_steps`` floor included);
- ``contrastive``: ``configs/minilm_few_shot.yaml``, FineTuneModule ``strategy: contrastive`` (supervised
  contrastive steps on the backbone, then a logistic-regression head);
- ``setfit``: SetFit (Tunstall et al. 2022) on the same all-MiniLM-L6-v2 folder: ``num_iterations=20``,
  ``num_epochs=1``, batch 16 and its other defaults (body 2e-5, logistic-regression head). SetFit is a
  benchmark-only dependency (``pip install -e '.[bench]'``); the library never imports it.

``seconds`` is the training wall time per run (the fit: for tlmodules' methods ``Trainer.fit``, tokenisation and
the probe's extraction included; for SetFit ``Trainer.train``), in this process with ``--threads`` torch threads.
Each finished run appends one line to ``bench/results/few_shot.runs.jsonl``; the report, rebuilt from every run
there (``--report`` alone rebuilds it), is ``bench/results/few_shot.json``:
``{"results": {"<set>": {"<K>": {"<method>": {"mean": …, "std": …, "seconds": …, "runs": n}}}}, "meta": {…}}``
(mean and std of test accuracy over the seeds, std with ``ddof=0``; seconds = mean per run).

    python bench/few_shot.py --threads 1                                    # everything (hours on one core)
    python bench/few_shot.py --sets sst2 --ks 8 64 --seeds 0 1 2 --methods contrastive setfit
    python bench/few_shot.py --report

Ablations: ``--recipe`` takes JSON overrides of the recipes' ``model`` / ``data`` / ``trainer`` arguments and
``--tag`` names the variant; its runs go to ``bench/results/few_shot_ablations.runs.jsonl`` as
``<method>@<tag>`` (report ``few_shot_ablations.json``), so they never enter the shipped recipes' table:

    python bench/few_shot.py --ks 64 --methods contrastive --tag batch64 --recipe '{"data": {"batch_size": 64}}'

More seeds of a row, SetFit included, outside the table's seeds 0–4: ``--runs-name NAME`` stores the runs as
``few_shot_<NAME>.runs.jsonl`` (report ``few_shot_<NAME>.json``):

    python bench/few_shot.py --sets sst2 --ks 64 --seeds 5 6 7 8 9 --methods contrastive setfit --runs-name seeds5to9
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (  # noqa: E402
    MINILM,
    RESULTS,
    ROOT,
    SHARED,
    Row,
    append_run,
    cpu_model,
    quiet_trainer,
    read_tsv,
    recipe_arguments,
    start_offline_runs,
    write_tsv,
)

TEXT = SHARED / "text"
RUNS = RESULTS / "few_shot.runs.jsonl"
REPORT = RESULTS / "few_shot.json"
ABLATION_RUNS = RESULTS / "few_shot_ablations.runs.jsonl"  # --tag: variants of the recipes, kept out of the table
ABLATION_REPORT = RESULTS / "few_shot_ablations.json"
RECIPES = {
    "probe": ROOT / "configs" / "minilm_probe.yaml",
    "finetune": ROOT / "configs" / "minilm_finetune.yaml",
    "contrastive": ROOT / "configs" / "minilm_few_shot.yaml",
}
METHODS = (*RECIPES, "setfit")
UCI_TEST_SIZE = 200


def pool_and_test(name: str) -> tuple[list[Row], list[Row]]:
    """The sentences K are drawn from, and the test sentences."""
    if name == "sst2":
        return (
            read_tsv(TEXT / "sst2" / "train.tsv", 0, 1, header=True),
            read_tsv(TEXT / "sst2" / "test.tsv", 0, 1, header=True),
        )
    rows = read_tsv(TEXT / "uci_sentences" / f"{'amazon_cells' if name == 'amazon' else name}_labelled.txt", 0, 1)
    return rows[:-UCI_TEST_SIZE], rows[-UCI_TEST_SIZE:]


def draw(pool: list[Row], k: int, seed: int) -> list[Row]:
    """K sentences of each class, drawn with ``random.Random(seed)`` (classes in sorted order)."""
    rng = random.Random(seed)
    chosen: list[Row] = []
    for label in sorted({y for _, y in pool}):
        chosen += rng.sample([row for row in pool if row[1] == label], k)
    return chosen


def run_recipe(
    method: str, train: Path, test: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> tuple[float, float]:
    """Fit the method's recipe on ``train``, its ``model`` / ``data`` / ``trainer`` arguments updated by
    ``overrides`` (an ablation's variant); (test accuracy, fit seconds)."""
    import lightning.pytorch as pl

    from datamodules import TextClassificationDataModule
    from tlmodules import FeatureProbeModule, FineTuneModule

    model_args, data_args, trainer_args = recipe_arguments(RECIPES[method])
    overrides = overrides or {}
    model_args.update(overrides.get("model", {}))
    data_args.update(overrides.get("data", {}))
    trainer_args.update(overrides.get("trainer", {}))
    pl.seed_everything(0, workers=True)
    # write_tsv's files: no header, sentences with quote marks; the CLI links the backbone, here it is passed
    data_args = {**data_args, "quoting": False, "backbone": MINILM}
    data = TextClassificationDataModule(
        train_file=str(train), test_file=str(test), text_column=0, label_column=1, **data_args
    )
    model_args = {**model_args, "backbone": MINILM}
    model = FeatureProbeModule(**model_args) if method == "probe" else FineTuneModule(**model_args)
    trainer = quiet_trainer(**trainer_args)  # the recipe's budget (max_epochs, min_steps, ...) and precision
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return float(accuracy), seconds


def run_setfit(train: list[Row], test: list[Row], scratch: Path) -> tuple[float, float]:
    """SetFit 1 epoch of 20 pair iterations on ``train``; (test accuracy, training seconds)."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from bench.speed_extraction import model_folder

    model = SetFitModel.from_pretrained(model_folder())
    arguments = TrainingArguments(
        output_dir=str(scratch / "setfit"), num_iterations=20, num_epochs=1, batch_size=16, seed=0, report_to="none"
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Dataset.from_dict({"text": [t for t, _ in train], "label": [y for _, y in train]}),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    predicted = model.predict([t for t, _ in test])
    accuracy = sum(str(p) == y for p, (_, y) in zip(predicted, test)) / len(test)
    return float(accuracy), seconds


def report(runs_file: Path = RUNS) -> dict[str, Any]:
    """Mean ± std over seeds per set, K and method, from every run in the runs file (the latest run of a
    (set, K, method, seed) counts)."""
    latest: dict[tuple, dict] = {}
    for line in runs_file.read_text().splitlines() if runs_file.exists() else []:
        run = json.loads(line)
        latest[(run["set"], run["k"], run["method"], run["seed"])] = run
    grouped: dict[tuple, list[dict]] = {}
    for (name, k, method, _), run in sorted(latest.items()):
        grouped.setdefault((name, k, method), []).append(run)
    results: dict[str, Any] = {}
    for (name, k, method), runs in grouped.items():
        accuracies = [r["accuracy"] for r in runs]
        results.setdefault(name, {}).setdefault(str(k), {})[method] = {
            "mean": round(statistics.fmean(accuracies), 4),
            "std": round(statistics.pstdev(accuracies), 4),
            "seconds": round(statistics.fmean(r["seconds"] for r in runs), 1),
            "runs": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "commits": sorted({r["commit"] for r in runs}),
        }
    meta = {
        "threads": sorted({r["threads"] for r in latest.values()}),
        "dates": sorted({r["date"] for r in latest.values()}),
    }
    return {"results": results, "meta": {**meta, "cpu": cpu_model()}}


def print_table(summary: dict[str, Any]) -> None:
    present = {m for by_k in summary["results"].values() for rows in by_k.values() for m in rows}
    columns = [m for m in METHODS if m in present] + sorted(present - set(METHODS))  # then tagged variants
    print("\n| set | K | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, by_k in summary["results"].items():
        for k, rows in sorted(by_k.items(), key=lambda item: int(item[0])):
            cells = [
                f"{rows[m]['mean']:.3f} ± {rows[m]['std']:.3f} ({rows[m]['seconds']:.0f} s, {rows[m]['runs']})"
                if m in rows
                else "—"
                for m in columns
            ]
            print(f"| {name} | {k} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["sst2", "yelp", "amazon"], choices=["sst2", "yelp", "amazon"])
    parser.add_argument("--ks", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="default: all (with --tag: tlmodules' recipes)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    parser.add_argument(
        "--recipe",
        default="{}",
        help='JSON overrides of the recipes\' arguments, e.g. \'{"data": {"batch_size": 64}}\' (ablations; with --tag)',
    )
    parser.add_argument(
        "--tag",
        help="name this invocation's variant: its runs are stored as <method>@<tag> in few_shot_ablations.runs.jsonl "
        "(report: few_shot_ablations.json), apart from the shipped recipes' table",
    )
    parser.add_argument(
        "--runs-name",
        help="store this invocation's runs as few_shot_<NAME>.runs.jsonl (report few_shot_<NAME>.json), apart from "
        "the table's seeds 0-4: e.g. more seeds of one row, both methods",
    )
    args = parser.parse_args()
    overrides = json.loads(args.recipe)
    if overrides and not args.tag:
        parser.error("--recipe changes the recipes: name the variant with --tag, so its runs stay apart")
    if args.tag and args.methods and "setfit" in args.methods:
        parser.error("--tag is for variants of tlmodules' recipes: leave setfit out of --methods")
    methods = args.methods or list(RECIPES if args.tag else METHODS)
    runs_file, report_file = (ABLATION_RUNS, ABLATION_REPORT) if args.tag else (RUNS, REPORT)
    if args.runs_name:
        if args.tag:
            parser.error("--runs-name and --tag both choose where runs go: give one")
        runs_file, report_file = (
            RESULTS / f"few_shot_{args.runs_name}.runs.jsonl",
            RESULTS / f"few_shot_{args.runs_name}.json",
        )
    if not args.report:
        stamp = start_offline_runs(args.threads)
        for name in args.sets:
            pool, test = pool_and_test(name)
            for k in args.ks:
                for seed in args.seeds:
                    train = draw(pool, k, seed)
                    with tempfile.TemporaryDirectory() as scratch:
                        files = (
                            write_tsv(train, Path(scratch) / "train.tsv"),
                            write_tsv(test, Path(scratch) / "test.tsv"),
                        )
                        for method in methods:
                            accuracy, seconds = (
                                run_setfit(train, test, Path(scratch))
                                if method == "setfit"
                                else run_recipe(method, *files, overrides)
                            )
                            label = f"{method}@{args.tag}" if args.tag else method
                            run = {"set": name, "k": k, "seed": seed, "method": label, "accuracy": round(accuracy, 4),
                                   "seconds": round(seconds, 1), **stamp}  # fmt: skip
                            if overrides:
                                run["recipe"] = overrides
                            append_run(runs_file, run)
    summary = report(runs_file)
    report_file.write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)


if __name__ == "__main__":
    main()
