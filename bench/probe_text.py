"""Feature probing with the real MiniLM on the shared text sets, against TF-IDF and fine-tuning.

    python bench/probe_text.py                      # everything (about half an hour on 2 cores)
    python bench/probe_text.py --datasets yelp sms --no-finetune

For each dataset: TF-IDF + logistic regression (the classical baseline), the frozen MiniLM
(mean pooling) with a trained linear head, with logistic regression and with an SVM (RBF kernel up
to 20,000 training sentences, linear beyond: kernel SVMs cost n² and SST-2's 60k took over 20
minutes to fit), and full
fine-tuning (4 epochs) where it fits in time. Probe methods share one disk feature cache: the
first probe run pays the extraction (reported as ``extraction_seconds``), the others reuse it, as
a user's second run would. Also measures the cached probe against one that re-runs the frozen
backbone every epoch (10 epochs, same data, same process).

Writes bench/results/probe_text.json: ``results[dataset][method] = {accuracy, macro_f1, seconds}`` (and the
dataset's ``_stamp``: commit, date, threads, CPU),
``extraction_seconds[dataset]``, ``cache_speedup_10_epochs`` and the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from bench.common import (  # noqa: E402
    MINILM,
    RESULTS,
    SHARED,
    Row,
    commit,
    cpu_model,
    minilm_finetune_module,
    quiet_trainer,
    read_csv,
    read_tsv,
    sample,
    stratified_split,
    write_tsv,
)
from datamodules import TextClassificationDataModule  # noqa: E402
from tlmodules import FeatureProbeModule  # noqa: E402

TEXT = SHARED / "text"
UCI = TEXT / "uci_sentences"
AG_NAMES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
SEED = 0


def uci(name: str) -> Callable[[], tuple[list[Row], list[Row]]]:
    return lambda: stratified_split(read_tsv(UCI / f"{name}_labelled.txt", 0, 1), 0.2, SEED)


DATASETS: dict[str, Callable[[], tuple[list[Row], list[Row]]]] = {
    "amazon": uci("amazon_cells"),
    "imdb": uci("imdb"),
    "yelp": uci("yelp"),
    "sms": lambda: stratified_split(read_tsv(TEXT / "sms_spam" / "SMSSpamCollection", 1, 0), 0.2, SEED),
    "sst2_2000": lambda: (
        sample(read_tsv(TEXT / "sst2" / "train.tsv", 0, 1, header=True), 2000, SEED),
        read_tsv(TEXT / "sst2" / "test.tsv", 0, 1, header=True),
    ),
    "sst2_full": lambda: (
        read_tsv(TEXT / "sst2" / "train.tsv", 0, 1, header=True),
        read_tsv(TEXT / "sst2" / "test.tsv", 0, 1, header=True),
    ),
    "ag_news": lambda: (
        read_tsv(TEXT / "ag_news" / "alps_train_subset_dev.tsv", 0, 1),
        [(text, AG_NAMES[label]) for text, label in read_csv(TEXT / "ag_news" / "test.csv", 2, 0)],
    ),
}
FINETUNE_DATASETS = {"amazon", "imdb", "yelp", "sst2_2000"}
RBF_SVM_MAX_TRAIN = 20_000


def scores(truth: list, predicted: list, seconds: float) -> dict[str, float]:
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
        "seconds": round(seconds, 1),
    }


def tfidf_logreg(train: list[Row], test: list[Row]) -> dict[str, float]:
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform([t for t, _ in train])
    classifier = LogisticRegression(C=10.0, max_iter=3000).fit(x_train, [y for _, y in train])
    predicted = classifier.predict(vectorizer.transform([t for t, _ in test]))
    return scores([y for _, y in test], list(predicted), time.perf_counter() - start)


def datamodule(files: tuple[Path, Path], batch_size: int) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        train_file=str(files[0]),
        test_file=str(files[1]),
        text_column=0,
        label_column=1,
        quoting=False,
        backbone=MINILM,
        max_length=128,
        val_fraction=0.0,
        batch_size=batch_size,
        num_workers=0,
    )


def probe(files, classifier: str, cache_dir: str, epochs: int = 1, cache: bool = True, **kwargs) -> tuple:
    """Fit and test one probe; returns (test metrics, fit+test seconds, fit seconds)."""
    pl.seed_everything(SEED, workers=True)
    data = datamodule(files, batch_size=64)
    model = FeatureProbeModule(
        backbone=MINILM,
        head=classifier,
        cache_dir=cache_dir,
        cache_features=cache,
        num_classes=data.num_classes,
        class_names=data.class_names,
        **kwargs,
    )
    start = time.perf_counter()
    fit = quiet_trainer(epochs)
    fit.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    result = fit.test(model, datamodule=data, verbose=False)[0]
    return result, time.perf_counter() - start, fit_seconds


def finetune(files) -> dict[str, float]:
    pl.seed_everything(SEED, workers=True)
    data = datamodule(files, batch_size=16)
    model = minilm_finetune_module(data.num_classes, data.class_names)
    start = time.perf_counter()
    fit = quiet_trainer(4)
    fit.fit(model, datamodule=data)
    result = fit.test(model, datamodule=data, verbose=False)[0]
    return {
        "accuracy": round(result["test/acc"], 4),
        "macro_f1": round(result["test/f1_macro"], 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def from_result(result: dict, seconds: float) -> dict[str, float]:
    return {
        "accuracy": round(result["test/acc"], 4),
        "macro_f1": round(result["test/f1_macro"], 4),
        "seconds": round(seconds, 1),
    }


def cache_speedup(files, epochs: int = 10) -> dict[str, float]:
    """Linear head for ``epochs`` epochs, memory cache versus re-running the frozen backbone each epoch."""
    timings = {}
    for name, cache in (("rerun_backbone", False), ("cached", True)):
        pl.seed_everything(SEED, workers=True)
        data = datamodule(files, batch_size=64)
        model = FeatureProbeModule(backbone=MINILM, head="linear", lr=5e-3, cache_features=cache)
        start = time.perf_counter()
        quiet_trainer(epochs).fit(model, datamodule=data)
        timings[name] = time.perf_counter() - start
    return {
        "epochs": epochs,
        "rerun_backbone_seconds": round(timings["rerun_backbone"], 1),
        "cached_seconds": round(timings["cached"], 1),
        "speedup": round(timings["rerun_backbone"] / timings["cached"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--speedup-dataset", default="yelp")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set deliberately)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = RESULTS / "probe_text.json"
    report = json.loads(out.read_text()) if out.exists() else {"results": {}, "extraction_seconds": {}}
    report["torch_threads"] = args.threads
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in args.datasets:
            train, test = DATASETS[name]()
            folder = scratch / name
            folder.mkdir()
            files = (write_tsv(train, folder / "train.tsv"), write_tsv(test, folder / "test.tsv"))
            cache_dir = str(folder / "features")
            rows: dict[str, dict[str, float]] = {"tfidf_logreg": tfidf_logreg(train, test)}
            _, cold, _ = probe(files, "logistic_regression", cache_dir)  # pays the extraction
            result, warm, _ = probe(files, "logistic_regression", cache_dir)
            report["extraction_seconds"][name] = round(cold - warm, 1)
            rows["probe_logreg"] = from_result(result, warm)
            result, seconds, _ = probe(files, "linear", cache_dir, epochs=20, lr=5e-3, lr_schedule="cosine")
            rows["probe_linear"] = from_result(result, seconds)
            kernel = "rbf" if len(train) <= RBF_SVM_MAX_TRAIN else "linear"  # kernel SVMs scale as n²
            result, seconds, _ = probe(files, f"{kernel}_svm", cache_dir)
            rows["probe_svm"] = {**from_result(result, seconds), "kernel": kernel}
            if name in FINETUNE_DATASETS and not args.no_finetune:
                rows["finetune_full"] = finetune(files)
            rows["_sizes"] = {"train": len(train), "test": len(test)}
            rows["_stamp"] = {"commit": commit(), "date": date.today().isoformat(), "threads": args.threads}
            rows["_stamp"]["cpu"] = cpu_model()
            report["results"][name] = rows
            print(name, json.dumps(rows), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            if name == args.speedup_dataset:
                report["cache_speedup_10_epochs"] = {"dataset": name, **cache_speedup(files)}
                print("cache speedup", report["cache_speedup_10_epochs"], flush=True)
                out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    methods = ["tfidf_logreg", "probe_linear", "probe_logreg", "probe_svm", "finetune_full"]
    print("\n| dataset | train | " + " | ".join(methods) + " | extraction s |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for name, rows in report["results"].items():
        cells = []
        for method in methods:
            row = rows.get(method)
            cells.append("—" if row is None else f"{row['accuracy']:.3f} ({row['seconds']:.0f}s)")
        print(
            f"| {name} | {rows['_sizes']['train']} | "
            + " | ".join(cells)
            + f" | {report['extraction_seconds'].get(name, '—')} |"
        )
    if "cache_speedup_10_epochs" in report:
        print("\ncache speedup over 10 epochs:", report["cache_speedup_10_epochs"])


if __name__ == "__main__":
    main()
