"""LoRA adapters (through peft) on a tiny BERT: placement in layer groups, what trains, what stays fixed."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from tlmodules.backbones import BackboneError, build_backbone
from tlmodules.finetune import FineTuneModule

pytest.importorskip("peft")

ADAPTER = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(\w+)\.lora_([AB])\.default\.weight")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def text_loader(folder: Path) -> DataLoader:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = ["the food was good", "it was awful", "really nice phone", "the service was poor"] * 2
    enc = tokenizer(texts, padding="max_length", max_length=8, return_tensors="pt")
    rows = [
        {"inputs": {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}, "labels": i % 2}
        for i in range(len(texts))
    ]
    return DataLoader(rows, batch_size=4)


def group_index(module: FineTuneModule) -> dict[str, int]:
    backbone = module.backbone
    return {n: i for i in range(backbone.num_groups) for n in backbone.group_names(i)}


def test_lora_adapters_sit_in_the_group_of_their_layer(tiny_hf_dir):
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    plain = build_backbone(f"hf:{tiny_hf_dir}")
    module = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, lora_rank=4)
    backbone = module.backbone
    params = dict(backbone.body.named_parameters())
    adapters = backbone.adapter_names

    targets = set(defaults["bert"])
    expected = {(layer, target, ab) for layer in ("0", "1") for target in targets for ab in "AB"}
    found = {ADAPTER.fullmatch(n).groups() for n in adapters if ADAPTER.fullmatch(n)}
    assert found == expected and len(adapters) == len(expected)
    for name in adapters:
        rank_dim = 0 if ".lora_A." in name else 1
        assert params[name].shape[rank_dim] == 4

    where = group_index(module)
    assert sorted(where) == sorted(params)  # every parameter, adapters included, in exactly one group
    assert sum(len(backbone.group_names(i)) for i in range(backbone.num_groups)) == len(params)
    assert backbone.num_groups == plain.num_groups == 3
    for name in adapters:
        layer = int(ADAPTER.fullmatch(name).group(1))
        base = name.split(".lora_")[0] + ".base_layer.weight"
        assert where[name] == where[base] == layer + 1, name
    # the base weights keep their groups under their peft names
    for name in params:
        if name not in adapters:
            original = name.replace(".base_layer.", ".")
            assert where[name] == next(i for i in range(plain.num_groups) if original in plain.group_names(i))

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    head = {n for n, _ in module.named_parameters() if n.startswith("head.")}
    assert head and trainable == {f"backbone.body.{n}" for n in adapters} | head
    assert backbone.origin.extra["lora_rank"] == 4


def test_lora_training_moves_only_adapters_and_head(tiny_hf_dir, tmp_path):
    module = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, lora_rank=4, lr=0.01)
    adapters = module.backbone.adapter_names
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lora_b = [f"backbone.body.{n}" for n in adapters if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(before[n]) == 0 for n in lora_b)  # LoRA starts as a no-op

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, text_loader(tiny_hf_dir))
    assert trainer.global_step == 3
    after = dict(module.named_parameters())

    base = [n for n in before if n.startswith("backbone.") and n.removeprefix("backbone.body.") not in adapters]
    assert len(base) > len(adapters)
    unchanged = [n for n in base if torch.equal(before[n], after[n])]
    assert unchanged == base  # bit-identical pretrained weights
    assert all(not torch.equal(before[n], after[n]) for n in lora_b)
    assert all(not torch.equal(before[n], after[n]) for n in before if n.startswith("head."))

    # a LoRA run's checkpoint is refused as a backbone, with a reason
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(BackboneError, match="LoRA-adapted backbone"):
        build_backbone(f"ckpt:{path}")


def test_lora_needs_a_transformer_backbone():
    with pytest.raises(ValueError, match=r"LoRA \(lora_rank > 0\) is offered for transformer backbones"):
        FineTuneModule(backbone="builtin:lenet", num_classes=2, lora_rank=4)


def test_lora_targets_that_match_nothing(tiny_hf_dir):
    with pytest.raises(ValueError, match="no_such_layer"):
        FineTuneModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, lora_rank=4, lora_targets=["no_such_layer"])
