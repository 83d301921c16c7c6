"""Long documents, frozen features: does another way of pooling a review's windows close the gap to TF-IDF?

The same split as ``bench/long_text.py`` (IMDB reviews, 2,000 training / 1,179 test, and the 200-review subset),
the same windows (``TextClassificationDataModule(long_text="chunks")``: 256-token windows 127 text tokens apart)
and the same MiniLM (mean pooling over each window's tokens). Every window is embedded once; the windows of a
review are then pooled several ways and each pooling is scored with logistic regression (``C=1``, L2-normalised
features, as the probe's rows in ``long_text.py``):

- ``mean``: the windows averaged, weighted by their tokens (the library's ``pooling: mean`` under chunks);
- ``max``: the element-wise maximum over windows (``pooling: max``);
- ``first`` / ``last``: the first or the last window alone;
- ``first+last``, ``mean+max``: two poolings side by side (each L2-normalised, then concatenated).

Writes ``bench/results/long_text_pooling.json``: ``{"results": {"2000": {"<pooling>": accuracy}, "200": {…}},
"meta": {…}}``.

    python bench/long_text_pooling.py --threads 1        # about 8 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import MINILM, RESULTS, commit, cpu_model, sample, stratified_split  # noqa: E402
from bench.long_text import SEED, TEST_SIZE, reviews, write_csv  # noqa: E402

OUTPUT = RESULTS / "long_text_pooling.json"


Split = tuple[np.ndarray, np.ndarray, list[list[int]], list[int]]


def window_features(files: tuple[Path, Path], max_length: int) -> dict[str, Split]:
    """Per split: the features of every window ``(W, F)``, its real tokens ``(W,)``, each document's window rows
    in text order, and the documents' label indices (dataset order)."""
    from datamodules import TextClassificationDataModule
    from tlmodules.backbones import build_backbone

    data = TextClassificationDataModule(
        train_file=str(files[0]), test_file=str(files[1]), backbone=MINILM, max_length=max_length,
        long_text="chunks", val_fraction=0.0, baseline="none", batch_size=16,
    )  # fmt: skip
    data.setup("fit")
    data.setup("test")
    backbone = build_backbone(MINILM, pooling="mean").eval()
    out = {}
    for split in ("train", "test"):
        rows: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        windows: dict[int, list[int]] = {}
        with torch.inference_mode():
            for batch in data.extraction_dataloader(split):
                inputs = dict(batch["inputs"])
                document = inputs.pop("document")  # without it the backbone pools each window alone
                features = backbone(inputs)
                done = sum(len(r) for r in rows)
                for row, position in enumerate(document.tolist()):
                    windows.setdefault(int(batch["index"][position]), []).append(done + row)
                rows.append(features)
                tokens.append(inputs["attention_mask"].sum(1))
        _, labels = data.split_texts(split)
        features = torch.cat(rows).numpy()
        out[split] = (features, torch.cat(tokens).numpy(), [windows[i] for i in range(len(labels))], labels)
    return out


def pooled(features: np.ndarray, tokens: np.ndarray, windows: list[list[int]]) -> dict[str, np.ndarray]:
    from sklearn.preprocessing import normalize

    mean = np.stack([np.average(features[w], axis=0, weights=tokens[w]) for w in windows])
    largest = np.stack([features[w].max(axis=0) for w in windows])
    first = np.stack([features[w[0]] for w in windows])
    last = np.stack([features[w[-1]] for w in windows])
    return {
        "mean": mean,
        "max": largest,
        "first": first,
        "last": last,
        "first+last": np.hstack([normalize(first), normalize(last)]),
        "mean+max": np.hstack([normalize(mean), normalize(largest)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set deliberately)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    rows = reviews()
    train, test = stratified_split(rows, TEST_SIZE / len(rows), SEED)
    subset = {id(row) for row in sample(train, 200, SEED)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        files = (write_csv(train, Path(scratch) / "train.csv"), write_csv(test, Path(scratch) / "test.csv"))
        splits = window_features(files, args.max_length)
    extraction_seconds = time.perf_counter() - start
    results: dict[str, dict[str, float]] = {"2000": {}, "200": {}}
    pooled_train = pooled(*splits["train"][:3])
    pooled_test = pooled(*splits["test"][:3])
    y_train, y_test = np.array(splits["train"][3]), np.array(splits["test"][3])
    small = np.array([id(row) in subset for row in train])
    for name in pooled_train:
        x_train, x_test = normalize(pooled_train[name]), normalize(pooled_test[name])
        for size, mask in (("2000", np.ones(len(train), bool)), ("200", small)):
            model = LogisticRegression(C=1.0, max_iter=5000).fit(x_train[mask], y_train[mask])
            results[size][name] = round(float(model.score(x_test, y_test)), 4)
    report = {
        "results": results,
        "meta": {
            "commit": commit(), "date": date.today().isoformat(), "threads": args.threads, "cpu": cpu_model(),
            "windows": {split: len(values[0]) for split, values in splits.items()},
            "extraction_seconds": round(extraction_seconds, 1),
        },
    }  # fmt: skip
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    print("| pooling | 2,000 reviews | 200 reviews |\n|---|---|---|")
    for name in results["2000"]:
        print(f"| {name} | {results['2000'][name]:.3f} | {results['200'][name]:.3f} |")


if __name__ == "__main__":
    main()
