"""The shared fixtures produce what the other tests rely on."""

from tlmodules.backbones import build_backbone


def test_tiny_hf_and_torchvision_cache_load_offline(tiny_hf_dir, torchvision_cache):
    backbone = build_backbone(f"hf:{tiny_hf_dir}")
    assert backbone.num_features == 32
    path = torchvision_cache("resnet18")
    loaded = build_backbone("torchvision:resnet18", weights="IMAGENET1K_V1")
    import torch

    saved = torch.load(path, weights_only=True)
    assert torch.equal(loaded.body.conv1.weight, saved["conv1.weight"])
