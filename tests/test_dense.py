"""Backbones as spatial trunks for dense prediction: stage plans, multi-scale maps, the FPN decoder, the head."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.backbones import Backbone, build_backbone
from tlmodules.dense import (
    DenseHead,
    FPNDecoder,
    StagePlan,
    multi_scale_features,
    plan_stages,
    pooled_features,
)
from tlmodules.errors import ConfigError
from tlmodules.nets import MLPFeatures

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet18() -> Backbone:
    return build_backbone("torchvision:resnet18", weights="none")


def images(batch: int = 2, height: int = 48, width: int = 64, channels: int = 3) -> Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, channels, height, width)


def test_resnet18_plan_taps_layer1_to_layer4() -> None:
    backbone = resnet18()
    plan = plan_stages(backbone.body)
    assert plan.strides == (4, 8, 16, 32)
    assert plan.channels == (64, 128, 256, 512)
    assert plan.paths[-1] == "layer4"
    assert [plan.paths[i] for i in plan.taps] == ["layer1", "layer2", "layer3", "layer4"]
    assert plan.paths[:4] == ("conv1", "bn1", "relu", "maxpool")
    assert "avgpool" not in plan.paths and "fc" not in plan.paths


def test_resnet18_maps_and_pooled_features_match_the_classification_body() -> None:
    backbone = resnet18().eval()
    plan = plan_stages(backbone.body)
    x = images(2, 48, 64)
    with torch.no_grad():
        maps = multi_scale_features(backbone.body, plan, x)
        expected = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 12, 16), (2, 128, 6, 8), (2, 256, 3, 4), (2, 512, 2, 2)]
    pooled = pooled_features(maps)
    assert pooled.shape == expected.shape == (2, 512)
    assert torch.allclose(pooled, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_features_backbones_plan_matches_their_maps(name: str) -> None:
    backbone = build_backbone(f"torchvision:{name}", weights="none").eval()
    plan = plan_stages(backbone.body)
    assert all(path.startswith("features.") for path in plan.paths)
    assert plan.strides == (4, 8, 16, 32)
    assert all(a < b for a, b in zip(plan.strides, plan.strides[1:]))
    assert list(plan.taps) == sorted(set(plan.taps)) and plan.taps[-1] == len(plan.paths) - 1
    with torch.no_grad():
        maps = multi_scale_features(backbone.body, plan, images(1, 64, 96))
    assert tuple(m.shape[1] for m in maps) == plan.channels
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // s, 96 // s) for s in plan.strides]


def test_lenet_plan() -> None:
    backbone = build_backbone("builtin:lenet").eval()
    plan = plan_stages(backbone.body)
    # 64×64 probe: conv1 → 30×30 (stride 2, dropped: finer than 4), conv2 → 13×13 (stride 64/13 ≈ 5)
    assert plan == StagePlan(paths=("conv1", "conv2"), taps=(1,), channels=(48,), strides=(5,))
    with torch.no_grad():
        maps = multi_scale_features(backbone.body, plan, images(2, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 48, 4, 4)]
    assert torch.allclose(maps[0].flatten(1), backbone(images(2, 28, 28)), atol=1e-5)  # channels-last numerics


class Tokens(nn.Module):
    """A stage giving (B, C, H*W) token sequences, not a map."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2)


class ChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    "body",
    [
        nn.Sequential(nn.Linear(8, 4)),  # classifier-like from the start: no stages
        MLPFeatures(8),  # its one child is an nn.Sequential of Linear layers
        nn.Sequential(nn.Conv2d(5, 8, 3)),  # the stage fails on an image batch
        nn.Sequential(nn.Conv2d(3, 8, 3), Tokens()),  # 3-D output
        nn.Sequential(nn.Conv2d(3, 96, 4, stride=4), ChannelsLast()),  # (B, H, W, C), as Swin
    ],
    ids=["linear", "mlp", "fails", "tokens", "channels-last"],
)
def test_non_spatial_bodies_are_config_errors(body: nn.Module) -> None:
    message = "no 2-D feature map.*use a convolutional backbone such as torchvision:resnet18"
    with pytest.raises(ConfigError, match=message):
        plan_stages(body)


def test_text_encoder_is_a_config_error() -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(ConfigError, match="no 2-D feature map"):
        plan_stages(BertModel(config))


def test_plan_leaves_modes_parameters_and_batchnorm_statistics_alone() -> None:
    body = resnet18().body.train()
    body.layer1[0].bn1.eval()  # a frozen BatchNorm inside a training body stays frozen
    before = {k: v.clone() for k, v in body.state_dict().items()}
    modes = {name: m.training for name, m in body.named_modules()}
    plan_stages(body)
    assert {name: m.training for name, m in body.named_modules()} == modes
    after = body.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a parameter or BatchNorm statistic changed"

    body.eval()
    plan_stages(body)
    assert not any(m.training for m in body.modules())


def test_fpn_decoder_shape_and_gradients_reach_decoder_and_backbone() -> None:
    backbone = resnet18().train()
    plan = plan_stages(backbone.body)
    decoder = FPNDecoder(plan.channels, channels=32)
    head = DenseHead(32, num_outputs=3)
    x = images(2, 90, 120)
    maps = multi_scale_features(backbone.body, plan, x)
    decoded = decoder(maps)
    assert [tuple(m.shape[-2:]) for m in maps] == [(23, 30), (12, 15), (6, 8), (3, 4)]
    assert decoded.shape == (2, 32, *maps[0].shape[-2:])
    logits = head(decoded, (90, 120))
    assert logits.shape == (2, 3, 90, 120)
    target = torch.randint(0, 3, (2, 90, 120))
    F.cross_entropy(logits, target).backward()
    for name, p in [*decoder.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None for g in grads)
    assert all(backbone.body.get_submodule(f"layer{i}")[0].conv1.weight.grad.abs().sum() > 0 for i in range(1, 5))
    assert backbone.body.conv1.weight.grad.abs().sum() > 0


def test_fpn_decoder_on_odd_sizes() -> None:
    decoder = FPNDecoder([8, 16, 32], channels=8).eval()
    maps = [torch.randn(1, 8, 45, 60), torch.randn(1, 16, 23, 30), torch.randn(1, 32, 12, 15)]
    assert decoder(maps).shape == (1, 8, 45, 60)
    with pytest.raises(ValueError, match="expects 3 maps"):
        decoder(maps[:2])


@pytest.mark.parametrize("size", [(37, 51), (90, 120), (6, 8), (1, 3)])
def test_dense_head_output_size_is_exact(size: tuple[int, int]) -> None:
    head = DenseHead(16, num_outputs=5)
    out = head(torch.randn(2, 16, 6, 8), size)
    assert out.shape == (2, 5, *size)
    # 1×1 conv then bilinear: at the decoded size itself, plain per-pixel logits
    decoded = torch.randn(1, 16, 6, 8)
    assert torch.allclose(head(decoded, (6, 8)), head.classifier(decoded))


def test_trunk_decoder_head_under_bfloat16_autocast() -> None:
    backbone = resnet18().eval()
    plan = plan_stages(backbone.body)
    decoder = FPNDecoder(plan.channels, channels=16).eval()
    head = DenseHead(16, num_outputs=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(decoder(multi_scale_features(backbone.body, plan, images(1, 45, 61))), (45, 61))
    assert out.shape == (1, 2, 45, 61)
    assert torch.isfinite(out.float()).all()


def test_plan_registers_nothing_and_trunk_parameters_are_not_duplicated() -> None:
    backbone = resnet18()
    count = len(list(backbone.body.named_parameters()))
    plan = plan_stages(backbone.body)
    assert len(list(backbone.body.named_parameters())) == count
    assert not any(isinstance(getattr(plan, f.name), nn.Module) for f in dataclasses.fields(plan))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.taps = ()  # type: ignore[misc]

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.plan = plan
            self.decoder = FPNDecoder(plan.channels, channels=16)

    model = Dense()
    params = list(model.parameters())
    assert len(params) == count + len(list(model.decoder.parameters()))
    assert sum(p.numel() for p in params) == sum(p.numel() for p in backbone.body.parameters()) + sum(
        p.numel() for p in model.decoder.parameters()
    )


def test_sequential_stage_spanning_several_resolutions_is_split() -> None:
    """RegNet-style: a stem then one nn.Sequential holding all four stages, then pooling and a classifier."""
    body = nn.Module()
    body.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    body.trunk = nn.Sequential(*(nn.Conv2d(4 * 2**i, 8 * 2**i, 3, stride=2, padding=1) for i in range(4)))
    body.pool = nn.AdaptiveAvgPool2d(1)
    body.fc = nn.Linear(64, 10)
    plan = plan_stages(body)
    assert plan.paths == ("stem", "trunk.0", "trunk.1", "trunk.2", "trunk.3")
    assert plan.taps == (1, 2, 3, 4)
    assert plan.strides == (4, 8, 16, 32)
    assert plan.channels == (8, 16, 32, 64)


def test_tap_overwritten_in_place_by_the_next_stage_is_copied() -> None:
    body = nn.Module()
    body.conv = nn.Conv2d(3, 4, 4, stride=4)  # stride 4: a tap
    body.down = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2))  # would clamp the tap in place
    plan = plan_stages(body)
    assert plan.taps == (0, 1) and plan.clone == (0,)
    x = images(1, 32, 32)
    maps = multi_scale_features(body, plan, x)
    assert torch.equal(maps[0], body.conv(x))
    assert (maps[0] < 0).any()
