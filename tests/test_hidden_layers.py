"""Frozen features from the last few hidden layers of a transformer (``hidden_layers``; the BERT paper's
feature-based approach): what each layer contributes, the widths, the cache key, windows and bad values."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer

from datamodules import TextClassificationDataModule
from tlmodules import FeatureProbeModule
from tlmodules.backbones import build_backbone
from tlmodules.errors import ConfigError

WORDS = "good bad fine awful the a movie film plot actor".split()


def tokens(tiny_hf_dir, texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).float()
    return (states * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("count", [2, 3])
def test_each_layer_is_pooled_and_normalised_side_by_side(tiny_hf_dir, count):
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling="mean").eval()
    width = backbone.num_features
    batch = tokens(tiny_hf_dir, ["good movie", "the plot was awful and the actor bad"])
    with torch.no_grad():
        states = backbone.body(**batch, output_hidden_states=True).hidden_states
        last = backbone(batch)
        backbone.use_hidden_layers(count)
        features = backbone(batch)
        per_token = backbone.forward_tokens(batch)
    assert backbone.num_features == count * width
    assert features.shape == (2, count * width)
    expected = torch.cat(
        [torch.nn.functional.normalize(masked_mean(s, batch["attention_mask"]), dim=-1) for s in states[-count:]], -1
    )
    torch.testing.assert_close(features, expected)
    # the last block is the one-layer feature, normalised; each block has unit length
    torch.testing.assert_close(features[:, -width:], torch.nn.functional.normalize(last, dim=-1))
    torch.testing.assert_close(features.view(2, count, width).norm(dim=-1), torch.ones(2, count))
    # token states are the layers side by side, unnormalised
    torch.testing.assert_close(per_token, torch.cat(states[-count:], -1))


def test_windows_of_a_document_combine_the_layered_features(tiny_hf_dir):
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling="mean").eval()
    backbone.use_hidden_layers(2)
    batch = tokens(tiny_hf_dir, ["good movie film", "the plot", "awful actor"])
    batch["document"] = torch.tensor([0, 0, 1])
    with torch.no_grad():
        documents = backbone(batch)
        rows = backbone.pooled_windows(batch)
    assert documents.shape == (2, 2 * backbone.hidden_size)
    # the windows' raw layers are combined (token-weighted mean), then each layer is normalised once per document
    counts = batch["attention_mask"].sum(1).float()
    width = backbone.hidden_size

    def per_layer_unit(vector: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(v, dim=-1) for v in vector.split(width, dim=-1)], -1)

    torch.testing.assert_close(
        documents[0], per_layer_unit((rows[0] * counts[0] + rows[1] * counts[1]) / counts[:2].sum())
    )
    torch.testing.assert_close(documents[1], per_layer_unit(rows[2]))
    assert not torch.allclose(rows[0].norm(), torch.tensor(2.0).sqrt())  # the windows themselves stay unnormalised


@pytest.mark.parametrize("count", [0, 4])  # the tiny BERT has 2 layers + embeddings = 3
def test_hidden_layers_beyond_the_model_fail_with_the_range(tiny_hf_dir, count):
    with pytest.raises(ConfigError, match="hidden_layers must be between 1 and 3"):
        FeatureProbeModule(backbone=f"hf:{tiny_hf_dir}", hidden_layers=count)


def test_hidden_layers_need_a_transformer_backbone():
    with pytest.raises(ConfigError, match="needs a transformer backbone"):
        FeatureProbeModule(backbone="builtin:lenet", weights=None, hidden_layers=4)


def test_probe_trains_a_head_on_the_wider_features_and_caches_them_apart(tmp_path, tiny_hf_dir, make_text_file):
    train = make_text_file("train.tsv", n=24)
    spec = f"hf:{tiny_hf_dir}"

    def fitted(count: int) -> FeatureProbeModule:
        data = TextClassificationDataModule(
            train_file=str(train), backbone=spec, val_fraction=0.25, batch_size=8, baseline="none"
        )
        model = FeatureProbeModule(
            backbone=spec, hidden_layers=count, cache_dir=str(tmp_path / "cache"), projection_samples=0
        )
        make_trainer(max_epochs=1, default_root_dir=str(tmp_path)).fit(model, data)
        return model

    one, three = fitted(1), fitted(3)
    width = one.backbone.num_features
    assert one.head.in_features == width and three.head.in_features == 3 * width
    # the disk cache keeps both: a second run with 3 layers does not read the 1-layer features
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # train and val splits, for each setting
