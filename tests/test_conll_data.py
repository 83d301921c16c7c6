"""ConllDataModule and word-label alignment on hand-written CoNLL files, with the tiny and the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MINILM_SPEC

from datamodules import ConllDataModule, DataError, align_word_labels
from datamodules.conll import word_start_mask
from datamodules.text import PadCollator
from tlmodules.entities import tags_from_logits
from tlmodules.labels import IGNORE_INDEX

# CoNLL-2003 layout: word, POS, chunk, NER. Lines: 1 DOCSTART, 2 blank, 3-7 sentence 0, 8 blank,
# 9-12 sentence 1 (all words in the tiny vocab), 13-14 blanks, 15 DOCSTART, 16 blank, 17-18 sentence 2,
# 19 blank, 20-21 sentence 3 (no blank line at the end of the file).
CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

the DT B-NP O
food NN I-NP O
was VBD B-VP O
good JJ B-ADJP O


-DOCSTART- -X- -X- O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O"""

NER_TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]
IGN = IGNORE_INDEX


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def conll_module(tiny_hf_dir: Path, **kwargs) -> ConllDataModule:
    kwargs.setdefault("tokenizer", str(tiny_hf_dir))
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("val_fraction", 0)
    return ConllDataModule(**kwargs)


@pytest.fixture
def conll_file(tmp_path: Path) -> Path:
    return write(tmp_path / "train.txt", CONLL)


def tag_index(*tags: str) -> list[int]:
    return [NER_TAGS.index(t) for t in tags]


# -- align_word_labels ------------------------------------------------------------------------------
def test_align_word_labels_first_sub_token_only():
    # [CLS] johan ##son visited ak ##ure ##yr ##i . [SEP]
    word_ids = [None, 0, 0, 1, 2, 2, 2, 2, 3, None]
    assert align_word_labels(word_ids, [4, 0, 1, 0]) == [IGN, 4, IGN, 0, 1, IGN, IGN, IGN, 0, IGN]
    assert align_word_labels(word_ids, [4, 0, 1, 0], ignore_index=-1) == [-1, 4, -1, 0, 1, -1, -1, -1, 0, -1]
    with pytest.raises(ValueError, match="word id 3 has no label: word_labels has 3 entries"):
        align_word_labels(word_ids, [4, 0, 1])


def test_word_start_mask_marks_the_labelled_positions():
    # [CLS] johan ##son visited ak ##ure ##yr ##i . [SEP]
    word_ids = [None, 0, 0, 1, 2, 2, 2, 2, 3, None]
    starts = word_start_mask(word_ids)
    assert starts == [False, True, False, True, True, False, False, False, True, False]
    assert starts == [label != IGN for label in align_word_labels(word_ids, [4, 0, 1, 0])]
    assert word_start_mask([None, 0, 2, 2, None]) == [False, True, True, False, False]  # word 1 has no token


def test_align_word_labels_with_the_minilm_tokenizer():
    from transformers import AutoTokenizer

    from tlmodules.backbones import package_folder

    tokenizer = AutoTokenizer.from_pretrained(package_folder(MINILM_SPEC.removeprefix("pkg:")))
    encoding = tokenizer(["Johanson", "visited", "Akureyri", "."], is_split_into_words=True)
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokens == ["[CLS]", "johan", "##son", "visited", "ak", "##ure", "##yr", "##i", ".", "[SEP]"]
    assert encoding.word_ids() == [None, 0, 0, 1, 2, 2, 2, 2, 3, None]
    labels = align_word_labels(encoding.word_ids(), tag_index("B-PER", "O", "B-LOC", "O"))
    assert labels == [IGN, 4, IGN, 0, 1, IGN, IGN, IGN, 0, IGN]
    assert word_start_mask(encoding.word_ids()) == [False, True, False, True, True, False, False, False, True, False]


def test_minilm_backbone_through_the_datamodule(tmp_path):
    path = write(tmp_path / "t.txt", "Johanson B-PER\nvisited O\nAkureyri B-LOC\n. O\n\nHe O\nleft O\n")
    dm = ConllDataModule(train_file=str(path), backbone=MINILM_SPEC, val_fraction=0)
    assert dm.class_names == ["O", "B-LOC", "B-PER"]
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert item["labels"] == [IGN, 2, IGN, 0, 1, IGN, IGN, IGN, 0, IGN]
    assert item["word_starts"] == [False, True, False, True, True, False, False, False, True, False]


# -- reading --------------------------------------------------------------------------------------
def test_reads_sentences_tags_and_class_names(conll_file, tiny_hf_dir):
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file))
    assert dm.sentences["train"] == [
        ["EU", "rejects", "German", "call", "."],
        ["the", "food", "was", "good"],
        ["Peter", "Blackburn"],
        ["BRUSSELS", "1996-08-22"],
    ]
    assert dm.tags["train"][2] == ["B-PER", "I-PER"]
    assert dm.class_names == NER_TAGS and dm.num_classes == 6  # sorted, "O" first
    assert dm.data["train"].lines[1] == [9, 10, 11, 12]


def test_tag_column_picks_the_chunk_tags(conll_file, tiny_hf_dir):
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file), tag_column=2)
    assert dm.class_names == ["O", "B-ADJP", "B-NP", "B-VP", "I-NP"]
    assert dm.tags["train"][0] == ["B-NP", "B-VP", "B-NP", "I-NP", "O"]


def test_word_and_tag_columns_of_a_two_column_file(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "two.tsv", "B-PER\tPeter\nO\tleft\n")
    dm = conll_module(tiny_hf_dir, train_file=str(path), token_column=1, tag_column=0)
    assert dm.sentences["train"] == [["Peter", "left"]] and dm.class_names == ["O", "B-PER"]


# -- batches --------------------------------------------------------------------------------------
def test_batch_shapes_and_aligned_labels(conll_file, tiny_hf_dir):
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file), test_file=str(conll_file))
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    ids, mask, labels = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"], batch["labels"]
    # "1996-08-22" is 5 tokens (BERT splits punctuation): the longest sentence is [CLS] + 6 + [SEP] = 8
    assert ids.shape == mask.shape == labels.shape == batch["inputs"]["token_type_ids"].shape == (4, 8)
    assert labels.dtype == torch.long and batch["index"].tolist() == [0, 1, 2, 3]
    assert mask.sum(dim=1).tolist() == [7, 6, 4, 8]
    o, loc, misc, org, per, i_per = range(6)
    assert labels.tolist() == [
        [IGN, org, o, misc, o, o, IGN, IGN],  # [CLS] 5 words [SEP] pad
        [IGN, o, o, o, o, IGN, IGN, IGN],
        [IGN, per, i_per, IGN, IGN, IGN, IGN, IGN],
        [IGN, loc, o, IGN, IGN, IGN, IGN, IGN],  # the date's 4 later sub-tokens are not labelled
    ]
    assert (labels[mask == 0] == IGN).all()
    starts = batch["word_starts"]
    assert starts.dtype == torch.bool and starts.shape == (4, 8)
    assert starts.tolist() == [
        [False, True, True, True, True, True, False, False],  # [CLS] 5 words [SEP] pad
        [False, True, True, True, True, False, False, False],
        [False, True, True, False, False, False, False, False],
        [False, True, True, False, False, False, False, False],  # the date's 4 later sub-tokens are not starts
    ]
    assert torch.equal(starts, labels != IGN)  # a tag exactly where a word starts
    vocab = [line.strip() for line in (tiny_hf_dir / "vocab.txt").read_text().splitlines()]
    assert [vocab[i] for i in ids[1, :6].tolist()] == ["[CLS]", "the", "food", "was", "good", "[SEP]"]
    assert [vocab[i] for i in ids[0, 1:6].tolist()] == ["[UNK]"] * 5  # words outside the tiny vocab
    logits = torch.nn.functional.one_hot(labels.clamp(min=0), 6).float()
    predicted, gold = tags_from_logits(logits, labels, dm.class_names)
    assert gold == predicted == dm.tags["test"]


def test_truncation_drops_labels_past_max_length(conll_file, tiny_hf_dir):
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file), max_length=4)
    dm.setup("fit")
    first = dm.datasets["train"][0]
    assert len(first["features"]["input_ids"]) == 4
    assert first["labels"] == [IGN, *tag_index("B-ORG", "O"), IGN]  # [CLS] EU rejects [SEP]: 3 words unscored
    assert first["word_starts"] == [False, True, True, False]  # words cut off by truncation do not start
    batch = dm.collate_fn([first])
    _, gold = tags_from_logits(torch.zeros(1, 4, 6), batch["labels"], dm.class_names)
    assert gold == [["B-ORG", "O"]]


def test_predict_file_marks_word_starts(tmp_path, tiny_hf_dir, conll_file):
    path = write(tmp_path / "predict.txt", "-DOCSTART-\n\nthe\nfood\n\n1996-08-22\n")
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file), predict_file=str(path))
    dm.setup("predict")
    assert dm.sentences["predict"] == [["the", "food"], ["1996-08-22"]]
    item = dm.datasets["predict"][1]  # [CLS] 1996 - 08 - 22 [SEP]
    assert item["labels"] == [IGN] * 7  # no tags to predict from
    assert item["word_starts"] == [False, True, False, False, False, False, False]
    assert [dm.prediction_id(i) for i in range(2)] == ["1", "2"]


@pytest.mark.parametrize("max_length", [None, 5])
def test_word_starts_are_the_first_sub_tokens_and_the_same_for_predict(conll_file, tiny_hf_dir, max_length):
    """The tokenizer's word_ids say where each word's first sub-token is; labelled and predict batches of the
    same sentences mark the same positions, and predict batches carry no label anywhere."""
    from transformers import AutoTokenizer

    dm = conll_module(
        tiny_hf_dir, test_file=str(conll_file), predict_file=str(conll_file), max_length=max_length, batch_size=8
    )
    dm.setup()
    test = next(iter(dm.test_dataloader()))  # the predict loader reads in length order: the same rows in file order
    predict = next(iter(torch.utils.data.DataLoader(dm.datasets["predict"], batch_size=8, collate_fn=dm.collate_fn)))
    assert torch.equal(test["inputs"]["input_ids"], predict["inputs"]["input_ids"])
    assert predict["word_starts"].dtype == torch.bool and torch.equal(predict["word_starts"], test["word_starts"])
    assert (predict["labels"] == IGN).all() and predict["labels"].shape == test["labels"].shape
    assert torch.equal(test["word_starts"], test["labels"] != IGN)

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    encodings = tokenizer(dm.sentences["test"], is_split_into_words=True, truncation=True, max_length=dm.max_length)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # [UNK] can start a word
    seen_later = 0
    for row in range(len(dm.sentences["test"])):
        word_ids = encodings.word_ids(row)
        firsts = [t for t, w in enumerate(word_ids) if w is not None and w not in word_ids[:t]]
        starts = predict["word_starts"][row]
        assert starts.nonzero().flatten().tolist() == firsts
        assert len(firsts) == len(dm.prediction_words(row)[1])  # one start per predicted word
        ids = predict["inputs"]["input_ids"][row]
        padding = predict["inputs"]["attention_mask"][row] == 0
        assert not starts[padding].any()
        assert not any(starts[t] for t, i in enumerate(ids.tolist()) if i in special)  # [CLS], [SEP], [PAD]
        later = [t for t, w in enumerate(word_ids) if w is not None and w in word_ids[:t]]
        assert not starts[later].any()
        seen_later += len(later)
    assert seen_later > 0  # "1996-08-22" is split into sub-tokens


def test_pad_collator_keeps_sentence_labels_and_pads_token_labels():
    items = [{"features": {"input_ids": [5, 6, 7]}, "labels": 1, "index": 0}]
    items.append({"features": {"input_ids": [5]}, "labels": 0, "index": 1})
    batch = PadCollator(0)(items)
    assert batch["labels"].tolist() == [1, 0] and batch["inputs"]["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    items[0]["labels"], items[1]["labels"] = [IGN, 2, IGN], [IGN]
    assert PadCollator(0)(items)["labels"].tolist() == [[IGN, 2, IGN], [IGN, IGN, IGN]]


def test_seeded_validation_split(tmp_path, tiny_hf_dir):
    text = "\n\n".join(f"the B-X\nfood O\n{'good' if i % 2 else 'bad'} O" for i in range(10))
    path = write(tmp_path / "ten.txt", text)

    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = conll_module(tiny_hf_dir, train_file=str(path), val_fraction=0.2, seed=seed)
        dm.setup("fit")
        train, val = dm.datasets["train"], dm.datasets["val"]
        assert dm.sentences["val"] is dm.sentences["train"]  # val items index the training sentences
        return [train[i]["index"] for i in range(len(train))], [val[i]["index"] for i in range(len(val))]

    train, val = split(0)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_state_dict_gives_predict_only_data_its_tags(tmp_path, tiny_hf_dir, conll_file):
    trained = conll_module(tiny_hf_dir, train_file=str(conll_file))
    predict = conll_module(tiny_hf_dir, predict_file=str(write(tmp_path / "p.txt", "the\nfood\n")))
    assert predict.class_names == []
    predict.load_state_dict(trained.state_dict())
    assert predict.class_names == NER_TAGS


def test_backbone_spec_and_hparams(conll_file, tiny_hf_dir):
    dm = ConllDataModule(train_file=str(conll_file), backbone=f"hf:{tiny_hf_dir}", val_fraction=0)
    assert dm.tokenizer_source == str(tiny_hf_dir) and dm.backbone_spec == f"hf:{tiny_hf_dir}"
    assert "backbone" not in dm.hparams and dm.hparams.tag_column == -1 and dm.hparams.batch_size == 16


# -- errors ---------------------------------------------------------------------------------------
def test_short_line_is_named_with_file_and_line(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "short.txt", "EU NNP B-NP B-ORG\nrejects VBZ\n")
    with pytest.raises(DataError, match=r"short.txt line 2 has 2 column\(s\) \['rejects', 'VBZ'\] but tag_column=3"):
        conll_module(tiny_hf_dir, train_file=str(path), tag_column=3)
    path = write(tmp_path / "bare.txt", "EU B-ORG\n\nrejects\n")
    with pytest.raises(DataError, match=r"bare.txt line 3: token_column=0 and tag_column=-1 are the same column"):
        conll_module(tiny_hf_dir, train_file=str(path))


def test_unknown_tag_in_val_file(tmp_path, tiny_hf_dir, conll_file):
    val = write(tmp_path / "val.txt", "-DOCSTART- O\n\nthe O\nfood B-FOOD\n")
    with pytest.raises(DataError, match=r"tag 'B-FOOD' in .*val.txt line 4 is not in the tag set \['O', 'B-LOC'"):
        conll_module(tiny_hf_dir, train_file=str(conll_file), val_file=str(val))


def test_explicit_labels_must_cover_the_training_tags(tiny_hf_dir, conll_file):
    with pytest.raises(DataError, match=r"tag 'B-MISC' in .*train.txt line 5 is not in the tag set"):
        conll_module(tiny_hf_dir, train_file=str(conll_file), labels=["O", "B-LOC", "B-ORG", "B-PER", "I-PER"])
    dm = conll_module(tiny_hf_dir, train_file=str(conll_file), labels=[*NER_TAGS, "I-ORG"])
    assert dm.class_names == [*NER_TAGS, "I-ORG"]


def test_missing_and_empty_files(tmp_path, tiny_hf_dir):
    with pytest.raises(DataError, match=r"train file .*nope.txt does not exist"):
        conll_module(tiny_hf_dir, train_file=str(tmp_path / "nope.txt"))
    empty = write(tmp_path / "empty.txt", "-DOCSTART- -X- -X- O\n\n\n")
    with pytest.raises(DataError, match=r"train file .*empty.txt has no sentences"):
        conll_module(tiny_hf_dir, train_file=str(empty))


@pytest.mark.parametrize("max_length", [0, -3])
def test_bad_max_length(conll_file, tiny_hf_dir, max_length):
    with pytest.raises(DataError, match=rf"max_length must be a positive integer, got {max_length}"):
        conll_module(tiny_hf_dir, train_file=str(conll_file), max_length=max_length)


def test_image_backbone_is_refused(conll_file):
    with pytest.raises(DataError, match=r"torchvision:resnet18 is an image model; text data needs a text backbone"):
        ConllDataModule(train_file=str(conll_file), backbone="torchvision:resnet18")


def test_single_tag_training_file(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "o.txt", "the O\nfood O\n")
    with pytest.raises(DataError, match=r"fewer than two distinct tags \(\['O'\]\) in tag_column=-1"):
        conll_module(tiny_hf_dir, train_file=str(path))
