"""Feature extraction and prediction in length order: a frozen pass does not depend on the order of its samples,
so the probe computes its features in batches sorted by length before training (whatever the training sampler
draws), and ``predict`` reads text in length order, while the outputs stay those of the data's order.

Text runs use the tiny random BERT of ``tiny_hf_dir`` on sentences of 1 to 12 words (so batches in random order
are mostly padding); the label word decides the class.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from datamodules import ConllDataModule, DomainAdaptationDataModule, TextClassificationDataModule
from datamodules.base import ClassificationDataModule
from datamodules.samplers import LengthOrderedSampler
from tlmodules import DANNModule, FeatureProbeModule, FineTuneModule
from tlmodules.predictions import PredictionWriter, in_index_order

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*modules? in eval mode.*", "ignore:.*sync_dist=True.*"),
]

NUM_SENTENCES, BATCH, VAL_FRACTION = 120, 16, 0.25  # 90 training and 30 validation sentences
TRAIN_BATCHES, VAL_BATCHES = 6, 2


def varied_sentence(label: int, rng: random.Random) -> str:
    """1 to 12 words: fillers and one label word, shuffled."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(0, 11))] + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A labelled training file and an unlabelled prediction file."""
    folder = tmp_path_factory.mktemp("varied")
    rng = random.Random(0)
    train = folder / "train.tsv"
    train.write_text(
        "text\tlabel\n"
        + "".join(f"{varied_sentence(i % 2, rng)}\t{('neg', 'pos')[i % 2]}\n" for i in range(NUM_SENTENCES))
    )
    unlabelled = folder / "unlabelled.tsv"
    unlabelled.write_text("text\n" + "".join(f"{varied_sentence(i % 2, rng)}\n" for i in range(37)))
    return train, unlabelled


def text_data(files: tuple[Path, Path], model_dir: Path, **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"batch_size": BATCH, "val_fraction": VAL_FRACTION, "num_workers": 0, **kwargs}
    return TextClassificationDataModule(
        train_file=str(files[0]), predict_file=str(files[1]), backbone=f"hf:{model_dir}", **kwargs
    )


def probe(model_dir: Path, **kwargs: Any) -> FeatureProbeModule:
    pl.seed_everything(0)
    return FeatureProbeModule(backbone=f"hf:{model_dir}", **{"num_classes": 2, "lr": 0.05, **kwargs})


class BackboneCalls(pl.Callback):
    """Every forward call of the probe's backbone: where it ran (the extraction pass of a split, a training step,
    a validation step) and the token count of each sentence of its batch."""

    def __init__(self, model: FeatureProbeModule) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.stage = "outside"
        model.backbone.body.register_forward_hook(self.on_forward, with_kwargs=True)
        extract = model.extract

        def recording_extract(loader: Any, split: str) -> int:
            self.stage = f"extract:{split}"
            try:
                return extract(loader, split)
            finally:
                self.stage = "outside"

        model.extract = recording_extract  # type: ignore[method-assign]

    def on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((self.stage, kwargs["attention_mask"].sum(1).tolist()))

    def at(self, stage: str) -> list[list[int]]:
        return [lengths for where, lengths in self.calls if where == stage]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stage = f"train:{trainer.current_epoch}"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.stage = "val"

    def on_train_batch_end(self, *args: Any) -> None:
        self.stage = "outside"

    def on_validation_batch_end(self, *args: Any) -> None:
        self.stage = "outside"


def padding(batches: list[list[int]]) -> float:
    """The share of padding tokens in batches of the given sentence lengths."""
    total = sum(max(b) * len(b) for b in batches)
    return 1.0 - sum(sum(b) for b in batches) / total


def fresh_features(model: FeatureProbeModule, loader: Any) -> dict[int, Tensor]:
    """Features computed batch by batch in the loader's order, without the cache."""
    out: dict[int, Tensor] = {}
    for batch in loader:
        feats = model.features(batch["inputs"])
        out.update(zip(batch["index"].tolist(), feats))
    return out


# ---------------------------------------------------------------------------------------------
# the datamodule's length-ordered loaders
# ---------------------------------------------------------------------------------------------
def test_length_ordered_sampler_shards_batches_longest_first_without_repeats() -> None:
    lengths = [3, 9, 1, 9, 4, 7, 2, 8, 5, 6, 2]
    single = list(LengthOrderedSampler(lengths, batch_size=3))
    assert sorted(single) == list(range(len(lengths)))
    assert [lengths[i] for i in single] == sorted(lengths, reverse=True)
    assert single[:2] == [1, 3]  # ties keep the dataset's order
    shards = [list(LengthOrderedSampler(lengths, batch_size=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards == [single[0:3] + single[6:9], single[3:6] + single[9:]]
    assert [len(LengthOrderedSampler(lengths, 3, 2, r)) for r in (0, 1)] == [6, 5]


def test_extraction_dataloader_sorts_by_length_and_is_none_without_lengths(
    varied: tuple[Path, Path], tiny_hf_dir: Path
) -> None:
    data = text_data(varied, tiny_hf_dir)
    data.setup("fit")
    for split, count in (("train", 90), ("val", 30), ("predict", 37)):
        lengths = data.sample_lengths(split)
        batches = [b["inputs"]["attention_mask"].sum(1).tolist() for b in data.extraction_dataloader(split)]
        flat = [n for b in batches for n in b]
        assert flat == sorted(lengths, reverse=True) and len(flat) == count
        assert all(len(b) == BATCH for b in batches[:-1])
        shards = [list(data.extraction_dataloader(split, rank=r, world_size=2)) for r in (0, 1)]
        indices = [[i for b in shard for i in b["index"].tolist()] for shard in shards]
        assert not set(indices[0]) & set(indices[1])
        assert sorted(indices[0] + indices[1]) == sorted(
            b for batch in data.extraction_dataloader(split) for b in batch["index"].tolist()
        )
    assert data.extraction_dataloader("test") is None  # no such split

    class NoLengths(ClassificationDataModule):
        def __init__(self) -> None:
            super().__init__(batch_size=4, num_workers=0, val_fraction=0.0, seed=0)
            self.datasets = {"train": [{"inputs": torch.zeros(2), "labels": 0, "index": 0}]}

    assert NoLengths().extraction_dataloader("train") is None  # images: order does not matter


# ---------------------------------------------------------------------------------------------
# the probe's extraction pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["linear", "logistic_regression"])
def test_extraction_pass_runs_in_length_order_and_training_only_reads_the_cache(
    head: str, varied: tuple[Path, Path], tiny_hf_dir: Path
) -> None:
    model = probe(tiny_hf_dir, head=head)
    recorder = BackboneCalls(model)
    data = text_data(varied, tiny_hf_dir)
    epochs = 3 if head == "linear" else 1
    trainer = make_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(model, datamodule=data)

    # one pass per split, every batch longest first, before any training step
    for split, batches in (("train", TRAIN_BATCHES), ("val", VAL_BATCHES)):
        lengths = recorder.at(f"extract:{split}")
        assert len(lengths) == batches
        flat = [n for batch in lengths for n in batch]
        assert flat == sorted(flat, reverse=True), f"{split} features were not computed in length order"
        assert flat == sorted(data.sample_lengths(split), reverse=True)
    assert [where for where, _ in recorder.calls if not where.startswith("extract:")] == []  # all cache hits
    assert model.cache.size("train") == 90 and model.cache.size("val") == 30

    # the same features as a pass in the training sampler's random order; far less padding
    random_order = fresh_features(model, data.train_dataloader())
    indices, cached = model.cache.items("train")
    assert sorted(random_order) == indices
    torch.testing.assert_close(torch.stack(cached), torch.stack([random_order[i] for i in indices]), atol=1e-5, rtol=0)
    random_lengths = [b["inputs"]["attention_mask"].sum(1).tolist() for b in data.train_dataloader()]
    assert padding(recorder.at("extract:train")) < 0.5 * padding(random_lengths)
    assert "val/acc" in trainer.callback_metrics and (head == "linear" or model.estimator_fitted)


def test_a_fit_limited_to_part_of_an_epoch_or_without_the_cache_runs_no_pass(
    varied: tuple[Path, Path], tiny_hf_dir: Path
) -> None:
    limited = probe(tiny_hf_dir)
    recorder = BackboneCalls(limited)
    make_trainer(limit_train_batches=2, limit_val_batches=1, callbacks=[recorder]).fit(
        limited, datamodule=text_data(varied, tiny_hf_dir)
    )
    assert [where for where, _ in recorder.calls] == ["train:0", "train:0", "val"]

    uncached = probe(tiny_hf_dir, cache_features=False)
    recorder = BackboneCalls(uncached)
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(uncached, datamodule=text_data(varied, tiny_hf_dir))
    assert [where for where, _ in recorder.calls].count("train:1") == TRAIN_BATCHES
    assert not any(where.startswith("extract") for where, _ in recorder.calls) and len(uncached.cache) == 0

    short = probe(tiny_hf_dir)  # max_steps inside the first epoch: the training split is not read whole
    recorder = BackboneCalls(short)
    make_trainer(max_steps=3, callbacks=[recorder]).fit(short, datamodule=text_data(varied, tiny_hf_dir))
    assert [where for where, _ in recorder.calls].count("train:0") == 3
    assert len(recorder.at("extract:val")) == VAL_BATCHES


def test_token_level_extraction_pass_matches_features_in_random_order(tmp_path: Path, tiny_hf_dir: Path) -> None:
    rng = random.Random(3)
    tags = {**{w: "B-POS" for w in POSITIVE}, **{w: "B-NEG" for w in NEGATIVE}}
    blocks = []
    for _ in range(40):
        words = [rng.choice(FILLER) for _ in range(rng.randint(0, 9))] + [rng.choice(POSITIVE + NEGATIVE)]
        rng.shuffle(words)
        blocks.append("\n".join(f"{w} X {tags.get(w, 'O')}" for w in words))
    train = tmp_path / "train.conll"
    train.write_text("\n\n".join(blocks) + "\n")
    data = ConllDataModule(train_file=str(train), backbone=f"hf:{tiny_hf_dir}", batch_size=8, val_fraction=0.25)
    model = probe(tiny_hf_dir, level="token", num_classes=3)
    recorder = BackboneCalls(model)
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(model, datamodule=data)

    flat = [n for batch in recorder.at("extract:train") for n in batch]
    assert flat == sorted(flat, reverse=True) and len(flat) == 30
    assert [where for where, _ in recorder.calls if not where.startswith("extract:")] == []
    indices, cached = model.cache.items("train")
    for batch in data.train_dataloader():
        hidden = model.features(batch["inputs"])
        for row, index in enumerate(batch["index"].tolist()):
            expected = hidden[row][batch["word_starts"][row]]
            torch.testing.assert_close(cached[indices.index(index)], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
class StopAfter(pl.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_a_resumed_probe_extracts_again_and_ends_as_the_uninterrupted_run(
    varied: tuple[Path, Path], tiny_hf_dir: Path, tmp_path: Path
) -> None:
    epochs, stop = 3, TRAIN_BATCHES + 2  # stopped mid-epoch 1
    uninterrupted = probe(tiny_hf_dir)
    make_trainer(max_epochs=epochs).fit(uninterrupted, datamodule=text_data(varied, tiny_hf_dir))

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    stopped = probe(tiny_hf_dir)
    make_trainer(max_epochs=epochs, callbacks=[saver, StopAfter(stop)], enable_checkpointing=True).fit(
        stopped, datamodule=text_data(varied, tiny_hf_dir)
    )
    [ckpt] = sorted(tmp_path.glob("*.ckpt"))

    torch.manual_seed(1)  # another initialisation of the head: the checkpoint must replace it
    resumed = FeatureProbeModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, lr=0.05)
    recorder = BackboneCalls(resumed)
    trainer = make_trainer(max_epochs=epochs, callbacks=[recorder])
    trainer.fit(resumed, datamodule=text_data(varied, tiny_hf_dir), ckpt_path=ckpt, weights_only=True)
    assert trainer.global_step == epochs * TRAIN_BATCHES
    assert len(recorder.at("extract:train")) == TRAIN_BATCHES  # the cache is not in the checkpoint: again
    assert [where for where, _ in recorder.calls if not where.startswith("extract:")] == []
    for name, value in uninterrupted.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], value, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# predict: length order in, the data's order out
# ---------------------------------------------------------------------------------------------
def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def assert_same_csv(a: Path, b: Path, first_value_column: int) -> None:
    """The same header, ids and labels, and values within 1e-5."""
    (head_a, rows_a), (head_b, rows_b) = read_rows(a), read_rows(b)
    assert head_a == head_b and len(rows_a) == len(rows_b)
    assert [r[:first_value_column] for r in rows_a] == [r[:first_value_column] for r in rows_b]
    values_a = torch.tensor([[float(v) for v in r[first_value_column:]] for r in rows_a])
    values_b = torch.tensor([[float(v) for v in r[first_value_column:]] for r in rows_b])
    torch.testing.assert_close(values_a, values_b, atol=1e-5, rtol=0)


class PredictOrder(pl.Callback):
    """The token counts of each prediction batch's sentences."""

    def __init__(self) -> None:
        self.lengths: list[list[int]] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.lengths.append(batch["inputs"]["attention_mask"].sum(1).tolist())


def predict_both_ways(model: pl.LightningModule, make_data: Any, tmp_path: Path, inner: Any = None) -> list[Path]:
    """The predictions CSV with the length-ordered loader and with the loader in file order."""
    paths = []
    for ordered in (True, False):
        data = make_data()
        side = inner(data) if inner is not None else data
        if not ordered:
            side.extraction_dataloader = lambda *args, **kwargs: None  # type: ignore[method-assign]
        order = PredictOrder()

        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / f"predictions_{'sorted' if ordered else 'file'}.csv"
        make_trainer(callbacks=[PredictionWriter(str(path)), order]).predict(
            model, datamodule=data, return_predictions=False
        )
        flat = [n for batch in order.lengths for n in batch]
        assert (flat == sorted(flat, reverse=True)) == ordered, "the loader was not in the expected order"
        paths.append(path)
    return paths


@pytest.mark.parametrize("output", ["probabilities", "embeddings"])
def test_probe_predictions_are_the_same_in_length_order(
    output: str, varied: tuple[Path, Path], tiny_hf_dir: Path, tmp_path: Path
) -> None:
    model = probe(tiny_hf_dir, predict_output=output)
    make_trainer().fit(model, datamodule=text_data(varied, tiny_hf_dir))
    sorted_csv, file_csv = predict_both_ways(model, lambda: text_data(varied, tiny_hf_dir), tmp_path)
    assert_same_csv(sorted_csv, file_csv, 2 if output == "probabilities" else 1)
    assert [row[0] for row in read_rows(sorted_csv)[1]] == [str(i) for i in range(1, 38)]


def test_finetune_and_dann_predictions_are_the_same_in_length_order(
    varied: tuple[Path, Path], tiny_hf_dir: Path, tmp_path: Path
) -> None:
    finetune = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2)
    finetune.eval()
    paths = predict_both_ways(finetune, lambda: text_data(varied, tiny_hf_dir), tmp_path / "finetune")
    assert_same_csv(*paths, 2)

    def pair() -> DomainAdaptationDataModule:
        return DomainAdaptationDataModule(None, text_data(varied, tiny_hf_dir), backbone=f"hf:{tiny_hf_dir}")

    dann = DANNModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2)
    paths = predict_both_ways(dann, pair, tmp_path / "dann", inner=lambda d: d.target)
    assert_same_csv(*paths, 2)


def test_tagger_predictions_are_the_same_in_length_order(tmp_path: Path, tiny_hf_dir: Path) -> None:
    rng = random.Random(5)
    sentences = ["\n".join(f"{w} X O" for w in rng.sample(FILLER, rng.randint(1, 8))) for _ in range(21)]
    conll = tmp_path / "tag.conll"
    conll.write_text("\n\n".join(sentences) + "\n")
    model = probe(tiny_hf_dir, level="token", num_classes=3, class_names=["O", "B-NEG", "B-POS"])

    def data() -> ConllDataModule:
        return ConllDataModule(
            predict_file=str(conll), labels=["O", "B-NEG", "B-POS"], backbone=f"hf:{tiny_hf_dir}", batch_size=4
        )

    sorted_csv, file_csv = predict_both_ways(model, data, tmp_path)
    assert_same_csv(sorted_csv, file_csv, 4)
    assert [row[:2] for row in read_rows(sorted_csv)[1]][:2] == [["1", "1"], ["1", "2"]]


def test_in_index_order_moves_each_sentences_word_rows_with_it() -> None:
    def batch(index: list[int], counts: list[int], probs: list[float]) -> dict[str, Tensor]:
        return {"index": torch.tensor(index), "word_counts": torch.tensor(counts), "word_probs": torch.tensor(probs)}

    batches = [batch([3, 0], [2, 1], [[3.0], [3.1], [0.0]]), batch([2, 1], [0, 3], [[1.0], [1.1], [1.2]])]
    [merged] = in_index_order(batches)
    assert merged["index"].tolist() == [0, 1, 2, 3] and merged["word_counts"].tolist() == [1, 3, 0, 2]
    assert merged["word_probs"].view(-1).tolist() == pytest.approx([0.0, 1.0, 1.1, 1.2, 3.0, 3.1])
    in_order = [{"index": torch.tensor([0, 1]), "probs": torch.rand(2, 2)}]
    assert in_index_order(in_order)[0] is in_order[0]  # already in order: left as it is


def test_sentence_transformers_is_a_benchmark_only_dependency() -> None:
    """bench/speed_extraction.py compares against it (the ``bench`` extra); the library never imports it."""
    import ast

    from conftest import ROOT

    for path in [*(ROOT / "tlmodules").rglob("*.py"), *(ROOT / "datamodules").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "sentence_transformers" for n in names), f"{path} imports it"
