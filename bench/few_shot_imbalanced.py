"""Few labels, unequal classes: the contrastive recipe's fitted head with and without balanced class weights.

A user's few labelled examples are seldom balanced: 8 of a rare class (spam, a complaint, an intent) among 56 of
a common one. Each draw takes ``--rare`` examples of the set's rare class and ``--common`` of the other
(``random.Random(seed)``), fits ``configs/minilm_few_shot.yaml`` once (``strategy: contrastive``; only the data
file changed), and fits the logistic-regression head (:func:`tlmodules.contrastive.fit_logistic_head`) on its
tuned training features twice: ``balanced`` class weights (the library's default) and unweighted (``none``,
SetFit's). The backbone's training never reads the head, so the two heads sit on exactly the same features. The
same two heads on the untuned MiniLM's features stand for the probe (``FeatureProbeModule`` with
``estimator_args: {class_weight: balanced}`` or without).

Sets (``--sets``): ``sst2`` (rare class: negative; test = SST-2's 872 ``test.tsv`` sentences, 49 % negative),
``yelp`` and ``amazon`` (rare: negative; test = the file's last 200 lines, 76 % and 55 % negative) and ``sms``
(rare: spam; test = the SMS Spam Collection's last 1,000 messages, 13 % spam). Metrics on the test set: accuracy,
macro F1 and the rare class's recall.

    python bench/few_shot_imbalanced.py --threads 1                      # 4 sets × seeds 0-4, about half an hour
    python bench/few_shot_imbalanced.py --sets sms --seeds 0 1 --rare 4 --common 60

Each run appends a line to ``bench/results/few_shot_imbalanced.runs.jsonl``; the report (latest run per set, counts
and seed) is ``bench/results/few_shot_imbalanced.json``: ``{"results": {"<set>": {"<rare>:<common>": {"<features>/
<weights>": {"accuracy": {"mean", "std"}, "macro_f1": {...}, "rare_recall": {...}}}}}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
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
    recipe_arguments,
    start_offline_runs,
    write_tsv,
)

RECIPE = ROOT / "configs" / "minilm_few_shot.yaml"
RUNS = RESULTS / "few_shot_imbalanced.runs.jsonl"
REPORT = RESULTS / "few_shot_imbalanced.json"
RARE_CLASS = {"sst2": "0", "yelp": "0", "amazon": "0", "sms": "spam"}
WEIGHTS = {"balanced": "balanced", "none": None}
SMS_TEST_SIZE = 1000


def pool_and_test(name: str) -> tuple[list[Row], list[Row]]:
    if name == "sms":
        lines = (SHARED / "text" / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
        rows = [(text, label) for label, text in (line.split("\t", 1) for line in lines if line.strip())]
        return rows[:-SMS_TEST_SIZE], rows[-SMS_TEST_SIZE:]
    from bench.few_shot import pool_and_test as balanced_sets

    return balanced_sets(name)


def draw(pool: list[Row], rare_class: str, rare: int, common: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    rare_rows = rng.sample([row for row in pool if row[1] == rare_class], rare)
    common_rows = rng.sample([row for row in pool if row[1] != rare_class], common)
    return rare_rows + common_rows


def scores(predicted: Any, labels: Any, rare_index: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "rare_recall": float(recall_score(labels, predicted, labels=[rare_index], average="macro")),
    }


def run(name: str, train: list[Row], test: list[Row], scratch: Path) -> dict[str, dict[str, float]]:
    """Fit the recipe on ``train``; the test scores of both heads on the tuned and on the untuned features."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    from datamodules import TextClassificationDataModule
    from tlmodules import FineTuneModule
    from tlmodules.contrastive import embed_split, fit_logistic_head

    model_args, data_args, trainer_args = recipe_arguments(RECIPE)
    pl.seed_everything(0, workers=True)
    data = TextClassificationDataModule(
        train_file=str(write_tsv(train, scratch / "train.tsv")),
        test_file=str(write_tsv(test, scratch / "test.tsv")),
        text_column=0,
        label_column=1,
        **{**data_args, "quoting": False, "backbone": MINILM},
    )
    tuned = FineTuneModule(**{**model_args, "backbone": MINILM})
    untuned = FineTuneModule(**{**model_args, "backbone": MINILM})
    quiet_trainer(**trainer_args).fit(tuned, datamodule=data)
    data.setup("test")
    rare_index = data.class_names.index(RARE_CLASS[name])
    results = {}
    for features_name, model in (("tuned", tuned), ("untuned", untuned)):
        model.eval()
        train_x, train_y, _ = embed_split(model.backbone, data.ordered_dataloader("train", 0, 1))
        test_x, test_y, _ = embed_split(model.backbone, data.ordered_dataloader("test", 0, 1))
        for weights_name, class_weight in WEIGHTS.items():
            layer = nn.Linear(train_x.shape[1], data.num_classes)
            with torch.no_grad():
                fit_logistic_head(layer, train_x, train_y, data.num_classes, seed=0, class_weight=class_weight)
                predicted = layer(F.normalize(test_x, dim=-1)).argmax(-1)
            results[f"{features_name}/{weights_name}"] = scores(predicted.numpy(), test_y.numpy(), rare_index)
    return results


def report(runs_file: Path = RUNS) -> dict[str, Any]:
    latest: dict[tuple, dict] = {}
    for line in runs_file.read_text().splitlines() if runs_file.exists() else []:
        run_ = json.loads(line)
        latest[(run_["set"], run_["counts"], run_["seed"])] = run_
    grouped: dict[tuple, list[dict]] = {}
    for (name, counts, _), run_ in sorted(latest.items()):
        grouped.setdefault((name, counts), []).append(run_)
    results: dict[str, Any] = {}
    for (name, counts), runs in grouped.items():
        heads = results.setdefault(name, {}).setdefault(counts, {})
        for head in runs[0]["scores"]:
            heads[head] = {
                metric: {
                    "mean": round(statistics.fmean(r["scores"][head][metric] for r in runs), 4),
                    "std": round(statistics.pstdev(r["scores"][head][metric] for r in runs), 4),
                }
                for metric in runs[0]["scores"][head]
            }
        heads["seeds"] = sorted(r["seed"] for r in runs)
    meta = {
        "threads": sorted({r["threads"] for r in latest.values()}),
        "dates": sorted({r["date"] for r in latest.values()}),
        "commits": sorted({r["commit"] for r in latest.values()}),
        "cpu": cpu_model(),
    }
    return {"results": results, "meta": meta}


def print_table(summary: dict[str, Any]) -> None:
    print("\n| set | rare:common | features | weights | accuracy | macro F1 | rare recall |")
    print("|---|---|---|---|---|---|---|")
    for name, by_counts in summary["results"].items():
        for counts, heads in by_counts.items():
            for head, metrics in heads.items():
                if head == "seeds":
                    continue
                features, weights = head.split("/")
                cells = [
                    f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}"
                    for m in ("accuracy", "macro_f1", "rare_recall")
                ]
                print(f"| {name} | {counts} | {features} | {weights} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(RARE_CLASS), choices=list(RARE_CLASS))
    parser.add_argument("--rare", type=int, default=8, help="examples of the rare class per draw")
    parser.add_argument("--common", type=int, default=56, help="examples of the other class per draw")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    args = parser.parse_args()
    if not args.report:
        stamp = start_offline_runs(args.threads)
        for name in args.sets:
            pool, test = pool_and_test(name)
            for seed in args.seeds:
                train = draw(pool, RARE_CLASS[name], args.rare, args.common, seed)
                with tempfile.TemporaryDirectory() as scratch:
                    result = run(name, train, test, Path(scratch))
                rounded = {head: {m: round(v, 4) for m, v in metrics.items()} for head, metrics in result.items()}
                line = {"set": name, "counts": f"{args.rare}:{args.common}", "seed": seed, "scores": rounded, **stamp}
                append_run(RUNS, line)
    summary = report()
    REPORT.write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)


if __name__ == "__main__":
    main()
