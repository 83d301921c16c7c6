"""Long documents: IMDB reviews (230 words on average, many beyond 512 word pieces) with TF-IDF + logistic
regression against tlmodules' probe and fine-tuning under each ``long_text`` setting.

Data: ``../shared/data/text/imdb_reviews/imdb_reviews_3179.csv``; a seeded, stratified split of 2,000 training
and 1,179 test reviews, and a 200-review stratified subset of that training split (same test set). The reviews'
HTML line breaks (``<br />``) become spaces for every method alike.

Rows (``--methods``):

- ``tfidf_lr``: scikit-learn TF-IDF (word 1–2-grams, sublinear tf) + logistic regression, the classic baseline;
- ``probe_<long_text>_lr``: frozen MiniLM features (mean pooling, L2-normalised) + logistic regression;
- ``probe_<long_text>_linear``: the same features + a linear head trained for 30 epochs on the cached features;
- ``probe_<long_text>_layers4_lr``: the probe on MiniLM's last four hidden layers side by side
  (``hidden_layers: 4``, the BERT paper's feature-based approach) + logistic regression;
- ``finetune_<long_text>``: MiniLM fine-tuned (the benchmarks' recipe, ``bench/common.py``) for at least
  ``--min-steps`` optimizer steps (3 epochs at 2,000 reviews, more epochs at 200).

``long_text`` is ``truncate`` (the first ``max_length`` tokens), ``head_tail`` (Sun et al. 2019) or ``chunks``
(overlapping windows pooled per document). Accuracy on the test set, wall seconds of fit + test, and documents
per second over all the documents the method read. Results merge into ``bench/results/long_text.json`` as
``{"results": {"2000": {"<method>": {"accuracy": …, "seconds": …, …}}, "200": {…}}, "meta": {…}}``.

    python bench/long_text.py --threads 1                       # every row (hours on one core)
    python bench/long_text.py --sizes 200 --methods tfidf_lr probe_chunks_lr finetune_head_tail
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
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
    sample,
    stratified_split,
)

DATA = SHARED / "text" / "imdb_reviews" / "imdb_reviews_3179.csv"
OUTPUT = RESULTS / "long_text.json"
TEST_SIZE = 1179
SEED = 0
LONG_TEXT = ("truncate", "head_tail", "chunks")
METHODS = (
    "tfidf_lr",
    *(f"probe_{mode}_lr" for mode in LONG_TEXT),
    *(f"probe_{mode}_linear" for mode in LONG_TEXT),
    *(f"probe_{mode}_layers4_lr" for mode in ("truncate", "chunks")),
    *(f"finetune_{mode}" for mode in LONG_TEXT),
)


def reviews() -> list[Row]:
    return [(" ".join(text.replace("<br />", " ").split()), label) for text, label in read_csv(DATA, 0, 1)]


def write_csv(rows: list[Row], path: Path) -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def tfidf_lr(train: list[Row], test: list[Row]) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    start = time.perf_counter()
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2), LogisticRegression(C=10.0, max_iter=3000)
    )
    model.fit([t for t, _ in train], [y for _, y in train])
    accuracy = float((model.predict([t for t, _ in test]) == [y for _, y in test]).mean())
    seconds = time.perf_counter() - start
    return {"accuracy": round(accuracy, 4), "seconds": round(seconds, 1)}


def datamodule(files: tuple[Path, Path], long_text: str, max_length: int, batch_size: int) -> Any:
    from datamodules import TextClassificationDataModule

    return TextClassificationDataModule(
        train_file=str(files[0]),
        test_file=str(files[1]),
        backbone=MINILM,
        max_length=max_length,
        long_text=long_text,
        baseline="none",  # the tfidf_lr row is the baseline here
        group_by_length=True,
        val_fraction=0.0,
        batch_size=batch_size,
        num_workers=0,
    )


def fit_and_test(model: Any, data: Any, epochs: int) -> tuple[dict[str, Any], float]:
    """Fit for ``epochs`` and test: (test metrics, wall seconds of both)."""
    start = time.perf_counter()
    trainer = quiet_trainer(epochs)
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    return result, time.perf_counter() - start


def probe(
    files: tuple[Path, Path], long_text: str, head: str, max_length: int, documents: int, hidden_layers: int = 1
) -> dict[str, float]:
    from tlmodules import FeatureProbeModule

    pl.seed_everything(SEED, workers=True)
    data = datamodule(files, long_text, max_length, batch_size=32)
    linear = head == "linear"
    model = FeatureProbeModule(
        backbone=MINILM,
        head=head,
        lr=1e-2 if linear else 1e-3,
        normalize_features=True,
        hidden_layers=hidden_layers,
        num_classes=data.num_classes,
        class_names=data.class_names,
        projection_samples=0,
    )

    result, seconds = fit_and_test(model, data, 30 if linear else 1)
    return {
        "accuracy": round(result["test/acc"], 4),
        "seconds": round(seconds, 1),
        "documents_per_second": round(documents / seconds, 2),
    }


def finetune(
    files: tuple[Path, Path], long_text: str, max_length: int, train_size: int, min_steps: int, documents: int
) -> dict[str, float]:
    pl.seed_everything(SEED, workers=True)
    batch_size = 16
    data = datamodule(files, long_text, max_length, batch_size=batch_size)
    model = minilm_finetune_module(data.num_classes, data.class_names)
    epochs = max(3, math.ceil(min_steps / math.ceil(train_size / batch_size)))

    result, seconds = fit_and_test(model, data, epochs)
    return {
        "accuracy": round(result["test/acc"], 4),
        "seconds": round(seconds, 1),
        "epochs": epochs,
        "documents_per_second": round(documents * epochs / seconds, 2),
    }


def run_method(method: str, train: list[Row], test: list[Row], args: argparse.Namespace, folder: Path) -> dict:
    if method == "tfidf_lr":
        return tfidf_lr(train, test)
    files = (write_csv(train, folder / "train.csv"), write_csv(test, folder / "test.csv"))
    documents = len(train) + len(test)
    kind, _, rest = method.partition("_")
    if kind == "probe":
        long_text, _, head = rest.rpartition("_")
        long_text, _, layers = long_text.partition("_layers")
        return probe(
            files,
            long_text,
            "logistic_regression" if head == "lr" else head,
            args.max_length,
            documents,
            hidden_layers=int(layers) if layers else 1,
        )
    return finetune(files, rest, args.max_length, len(train), args.min_steps, len(train))


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    print("| training reviews | method | accuracy | seconds | documents/s |")
    print("|---|---|---|---|---|")
    for size, rows in results.items():
        for method, row in rows.items():
            speed = row.get("documents_per_second", "")
            print(f"| {size} | {method} | {row['accuracy']:.4f} | {row['seconds']} | {speed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2000", "200"], choices=["2000", "200"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-length", type=int, default=256, help="tokens per input or window (MiniLM: 256)")
    parser.add_argument("--min-steps", type=int, default=150, help="fine-tuning: at least this many steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = reviews()
    train, test = stratified_split(rows, TEST_SIZE, SEED)  # an int: exactly that many test reviews
    splits = {"2000": train, "200": sample(train, 200, SEED)}
    saved = json.loads(args.output.read_text()) if args.output.exists() else {}
    results: dict[str, dict[str, Any]] = saved.get("results", {})
    for size in args.sizes:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as folder:
                row = run_method(method, splits[size], test, args, Path(folder))
            row.update(commit=commit(), date=date.today().isoformat(), threads=args.threads)
            results.setdefault(size, {})[method] = row
            print(f"{size} {method}: {row}", flush=True)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            meta = {
                "commit": commit(),
                "date": date.today().isoformat(),
                "cpu": cpu_model(),
                "threads": args.threads,
                "max_length": args.max_length,
                "train_sizes": {k: len(v) for k, v in splits.items()},
                "test_size": len(test),
            }
            args.output.write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    print_table({size: results[size] for size in args.sizes if size in results})


if __name__ == "__main__":
    main()
