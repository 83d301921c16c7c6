"""``timm:<model name>`` backbones and the registry of backbone kinds.

timm's tiny test models (``test_resnet``, ``test_vit``: a few hundred thousand parameters) stand in for
real ones. Everything is offline: weights come from files the tests write themselves (a weights file
passed as ``weights=<file>``, or the Hugging Face cache layout timm reads), and loading never unpickles
code (a "malicious" file would touch a marker file if it were unpickled with ``weights_only=False``).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, TrainPy, make_trainer
from test_backbones import Evil, all_groups
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tlmodules.backbones import (
    Backbone,
    BackboneError,
    BackboneKind,
    BackboneOrigin,
    BackboneSettings,
    Preprocessing,
    accepted_forms,
    backbone_kinds,
    build_backbone,
    register_backbone_kind,
    resolve_preprocessing,
    unregister_backbone_kind,
)
from tlmodules.finetune import FineTuneModule

if importlib.util.find_spec("timm") is not None:
    import timm
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (pip install timm)")

CNN = "test_resnet"  # stem + 4 stages, BatchNorm; any input size
VIT = "test_vit"  # stem (tokens, patch embedding) + 6 blocks; 160×160 inputs only


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: timm finds only what a test puts there."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def reference(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """The timm model itself, seeded (``num_classes=1000`` unless given: a hub weights file has the head)."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs)


def assert_loaded(backbone: Backbone, saved: dict[str, Tensor]) -> None:
    """Every tensor of the backbone equals the saved one (the saved classifier, if any, is dropped)."""
    state = backbone.body.state_dict()
    assert set(state) <= set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# features, preprocessing, layer groups
# ---------------------------------------------------------------------------------------------
@needs_timm
@pytest.mark.parametrize(("name", "size"), [(CNN, 64), (VIT, 160)])
def test_features_are_pooled_with_the_models_width(name: str, size: int) -> None:
    backbone = build_backbone(f"timm:{name}", weights="none").eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)
    assert backbone.num_features == backbone.body.num_features
    assert backbone.origin == BackboneOrigin(spec=f"timm:{name}", weights=None)


@needs_timm
def test_width_is_the_pooled_output_not_the_last_feature_map() -> None:
    """MobileNetV3's head has a hidden layer after pooling: the features are ``head_hidden_size`` wide (1024),
    not ``num_features`` (288, the last feature map's channels)."""
    with torch.device("meta"):
        backbone = build_backbone("timm:mobilenetv3_small_050", weights="none")
        features = backbone(torch.empty(2, 3, 64, 64))
    assert backbone.num_features == backbone.body.head_hidden_size == 1024 != backbone.body.num_features
    assert features.shape == (2, 1024)


@needs_timm
@pytest.mark.parametrize("name", [CNN, VIT, "resnet10t"])
def test_preprocessing_is_the_pretrained_configs_eval_recipe(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = timm.models.get_pretrained_cfg(name)
    channels, _, crop = cfg.input_size
    expected = Preprocessing(
        kind="image",
        in_channels=channels,
        resize_size=math.floor(crop / cfg.crop_pct),  # timm's eval transform, crop mode "center"
        crop_size=crop,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("resolving the preprocessing must not build the model or fetch weights")

    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", forbidden)
        assert resolve_preprocessing(f"timm:{name}") == expected
        # without weights the architecture keeps its input size (a ViT's position embeddings fix it)
        assert resolve_preprocessing(f"timm:{name}", "none") == expected
    with torch.device("meta"):
        assert build_backbone(f"timm:{name}", weights="none").preprocessing == expected


@needs_timm
@pytest.mark.parametrize("name", [CNN, VIT])
def test_groups_follow_timms_group_matcher_input_side_first(name: str) -> None:
    backbone = build_backbone(f"timm:{name}", weights="none")
    groups = all_groups(backbone)
    names = [n for n, _ in backbone.body.named_parameters()]
    flat = [n for g in groups for n in g]
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(names), "every parameter in exactly one group"
    expected = timm.models.group_parameters(backbone.body, backbone.body.group_matcher(coarse=True))
    assert groups == [expected[k] for k in sorted(expected)]
    if name == CNN:  # stem, then the four stages
        assert len(groups) == 5 and all(n.startswith("conv1.") or n.startswith("bn1.") for n in groups[0])
        for i, group in enumerate(groups[1:], start=1):
            assert all(n.startswith(f"layer{i}.") for n in group)
    else:  # tokens and patch embedding, then one group per block; the final norm joins the last block
        assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(groups[0])
        assert len(groups) == 1 + 6
        for i, group in enumerate(groups[1:]):
            assert all(n.startswith(f"blocks.{i}.") for n in group if not n.startswith("norm."))
        assert {"norm.weight", "norm.bias"} <= set(groups[-1])


@needs_timm
def test_gradual_fine_tuning_trains_the_top_group_and_the_head_first() -> None:
    torch.manual_seed(0)
    model = FineTuneModule(
        backbone=f"timm:{CNN}", weights="none", num_classes=3, strategy="gradual", unfreeze_epoch=0, lr=0.05
    )
    assert model.backbone.num_groups == 5
    top = {n.rsplit(".", 1)[0] for n in model.backbone.group_names(4)}  # modules of the top group (layer4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4) % 3), batch_size=4)
    make_trainer(max_steps=1).fit(model, loader)

    moved = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    backbone_moved = {k for k in moved if k.startswith("backbone.")}
    assert {k for k in moved if k.startswith("head.")}, "the head did not train"
    assert backbone_moved, "the top group did not train"
    # parameters and BatchNorm statistics of the top group only: the frozen groups ran in eval mode
    assert all(k.removeprefix("backbone.body.").rsplit(".", 1)[0] in top for k in backbone_moved), backbone_moved


# ---------------------------------------------------------------------------------------------
# weights: files, the hub cache, no network, no code
# ---------------------------------------------------------------------------------------------
@needs_timm
def test_weights_file_safetensors_loads_its_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    saved = reference(CNN, num_classes=0).state_dict()
    path = tmp_path / "weights.safetensors"
    save_file(saved, path)
    backbone = build_backbone(f"timm:{CNN}", weights=str(path))
    assert_loaded(backbone, saved)
    assert set(backbone.body.state_dict()) == set(saved)
    assert backbone.origin.weights == str(path.resolve())
    assert backbone.preprocessing == resolve_preprocessing(f"timm:{CNN}", str(path))


@needs_timm
def test_weights_file_pth_with_classifier_loads_all_but_the_classifier(tmp_path: Path) -> None:
    saved = reference(VIT, seed=3).state_dict()
    path = tmp_path / "vit.pth"
    torch.save(saved, path)
    backbone = build_backbone(f"timm:{VIT}", weights=str(path))
    assert_loaded(backbone, saved)
    assert {k for k in saved if k not in backbone.body.state_dict()} == {"head.weight", "head.bias"}


@needs_timm
def test_weights_file_of_another_model_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(reference(VIT, num_classes=0).state_dict(), path)
    with pytest.raises(BackboneError, match=r"weights file .*vit\.safetensors does not fit timm:test_resnet"):
        build_backbone(f"timm:{CNN}", weights=str(path))


@needs_timm
def test_weights_file_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = reference(CNN).state_dict()
    state["fc.bias"] = Evil(marker)
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match="not a plain state dict of timm:test_resnet"):
        build_backbone(f"timm:{CNN}", weights=str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the file really runs code
    assert marker.exists()


@needs_timm
def test_corrupt_or_missing_weights_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"<html>404 not found</html>\n")
    with pytest.raises(BackboneError, match=r"corrupt\.safetensors is not a plain state dict"):
        build_backbone(f"timm:{CNN}", weights=str(corrupt))
    with pytest.raises(FileNotFoundError, match=r"timm weights file .*gone\.pth does not exist"):
        build_backbone(f"timm:{CNN}", weights=str(tmp_path / "gone.pth"))


@needs_timm
def test_default_weights_come_from_the_hugging_face_cache(hub_cache: Path) -> None:
    """The layout ``hf download timm/<model>.<tag>`` leaves: ``refs/main`` names the snapshot."""
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(CNN)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    saved = reference(CNN, seed=5).state_dict()
    save_file(saved, repo / "snapshots" / revision / "model.safetensors")

    backbone = build_backbone(f"timm:{CNN}")
    assert_loaded(backbone, saved)
    assert backbone.origin.weights == cfg.tag  # DEFAULT is recorded as the concrete tag
    assert build_backbone(f"timm:{CNN}.{cfg.tag}").origin.weights == cfg.tag


@needs_timm
def test_no_network_and_no_file_says_where_to_put_the_weights(hub_cache: Path) -> None:
    cfg = timm.models.get_pretrained_cfg(CNN)
    with pytest.raises(BackboneError) as info:
        build_backbone(f"timm:{CNN}")
    message = str(info.value)
    for part in (f"hf download {cfg.hf_hub_id}", str(hub_cache), "HF_HOME", "weights=<path", "weights=none"):
        assert part in message, part
    assert isinstance(info.value.__cause__, OSError)


@needs_timm
def test_pretrained_false_builds_the_architecture_and_keeps_the_preprocessing(hub_cache: Path) -> None:
    backbone = build_backbone(f"timm:{CNN}", pretrained=False)  # nothing cached: loading would fail
    assert backbone.origin.weights == timm.models.get_pretrained_cfg(CNN).tag
    assert backbone.preprocessing == resolve_preprocessing(f"timm:{CNN}")


@needs_timm
def test_unknown_names_tags_and_weights() -> None:
    with pytest.raises(BackboneError, match=r"timm has no model 'test_resnt'\. Did you mean timm:test_resnet"):
        build_backbone("timm:test_resnt", weights="none")
    with pytest.raises(BackboneError, match=r"timm has no model 'test_resnt'"):
        resolve_preprocessing("timm:test_resnt")
    with pytest.raises(BackboneError, match=r"timm:resnet10t has no pretrained tag 'nope'; its tags: c3_in1k"):
        build_backbone("timm:resnet10t.nope", weights="none")
    with pytest.raises(BackboneError, match=r"unknown weights 'IMAGENET1K_V1' for timm:resnet10t; .*c3_in1k.*none"):
        resolve_preprocessing("timm:resnet10t", "IMAGENET1K_V1")
    with pytest.raises(BackboneError, match=r"needs a model name"):
        build_backbone("timm:", weights="none")


def test_without_timm_installed_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(BackboneError, match=r"timm:resnet50 needs the timm package: pip install timm"):
        build_backbone("timm:resnet50")
    with pytest.raises(BackboneError, match=r"tlmodules\[timm\]"):
        resolve_preprocessing("timm:resnet50")


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def fit_and_save(module: pl.LightningModule, path: Path) -> Path:
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 2), batch_size=4)
    trainer = make_trainer(max_steps=2, default_root_dir=path.parent)
    trainer.fit(module, loader)
    trainer.save_checkpoint(path)
    return path


@needs_timm
def test_checkpoint_of_a_timm_run_rebuilds_the_backbone(tmp_path: Path) -> None:
    """Weights from a file the checkpoint then outlives: the rebuild takes the checkpoint's tensors only."""
    weights = tmp_path / "start.pth"
    torch.save(reference(CNN, seed=1).state_dict(), weights)
    module = FineTuneModule(backbone=f"timm:{CNN}", weights=str(weights), num_classes=2, lr=0.05)
    path = fit_and_save(module, tmp_path / "timm.ckpt")
    weights.unlink()

    torch.manual_seed(99)  # the rebuilt architecture starts from other random weights
    loaded = build_backbone(f"ckpt:{path}")
    module_state, loaded_state = module.backbone.state_dict(), loaded.state_dict()
    assert module_state.keys() == loaded_state.keys()
    assert all(torch.equal(module_state[k], loaded_state[k]) for k in module_state)  # BatchNorm statistics too
    assert loaded.origin.spec == f"timm:{CNN}" and loaded.origin.weights == str(weights.resolve())
    assert loaded.preprocessing == module.backbone.preprocessing == resolve_preprocessing(f"ckpt:{path}")
    assert all_groups(loaded) == all_groups(module.backbone)
    module.eval()
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.backbone(x))


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
def test_accepted_forms_lists_every_registered_kind() -> None:
    names = [kind.name for kind in backbone_kinds()]
    assert names == ["torchvision", "hf", "pkg", "ckpt", "builtin", "timm"]
    text = accepted_forms()
    assert text.startswith("accepted backbone specs: 'torchvision:<model name>'")
    for kind in backbone_kinds():
        assert f"'{kind.form}' ({kind.description})" in text
    assert "'timm:<model name>'" in text and "['lenet']" in text
    with pytest.raises(BackboneError, match="'timm:<model name>'.*; got 'toy:8'"):
        build_backbone("toy:8")


class Toy(nn.Module):
    """A linear map of flat inputs ``(B, 4)`` to ``(B, width)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


TOY_PREPROCESSING = Preprocessing(kind="image", in_channels=1, resize_size=4)


@pytest.fixture
def toy_kind() -> Iterator[tuple[BackboneKind, list[BackboneSettings]]]:
    """A kind registered for one test only (``toy:<width>``), removed afterwards whatever happens; with the
    settings each of its builds received."""
    seen: list[BackboneSettings] = []

    def build(rest: str, settings: BackboneSettings) -> Backbone:
        seen.append(settings)
        return Backbone(
            Toy(int(rest)), int(rest), preprocessing=TOY_PREPROCESSING, origin=BackboneOrigin(f"toy:{rest}")
        )

    kind = register_backbone_kind(
        BackboneKind(
            name="toy",
            form="toy:<width>",
            description="a linear map, for the registry's test",
            build=build,
            preprocessing=lambda rest, settings: TOY_PREPROCESSING,
        )
    )
    try:
        yield kind, seen
    finally:
        unregister_backbone_kind("toy")


def test_a_registered_kind_is_accepted_everywhere_with_no_other_edit(toy_kind) -> None:
    _, seen = toy_kind
    backbone = build_backbone("toy:8", weights="none", pooling="max", pretrained=False)
    assert backbone(torch.randn(2, 4)).shape == (2, 8)
    assert seen == [BackboneSettings(weights="none", pooling="max", trust_remote_code=False, pretrained=False)]
    assert resolve_preprocessing("toy:8") == TOY_PREPROCESSING
    assert "'toy:<width>' (a linear map, for the registry's test)" in accepted_forms()
    model = FineTuneModule(backbone="toy:6", num_classes=3)
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_the_registry_refuses_clashing_or_malformed_kinds(toy_kind) -> None:
    toy_kind, _ = toy_kind
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_backbone_kind(toy_kind)
    assert register_backbone_kind(toy_kind, replace=True) is toy_kind
    with pytest.raises(ValueError, match="must start with 'bad:'"):
        register_backbone_kind(BackboneKind("bad", "other:<x>", "", toy_kind.build, toy_kind.preprocessing))
    with pytest.raises(KeyError, match="no backbone kind 'nothing'"):
        unregister_backbone_kind("nothing")


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "culprit"),
    [
        ("xx:y", r"model\.init_args\.backbone: 'xx:y' has an unknown kind 'xx'; accepted backbone specs: .*'timm:"),
        pytest.param(
            "timm:test_resnt",
            r"model\.init_args\.backbone: timm has no model 'test_resnt'\. Did you mean timm:test_",
            marks=needs_timm,
        ),
    ],
    ids=["unknown-kind", "unknown-timm-model"],
)
def test_train_py_refuses_a_bad_spec_in_one_error_line(
    backbone: str, culprit: str, tmp_path: Path, train_py: TrainPy
) -> None:
    args = ["fit", "--config", "configs/digits_finetune.yaml", "--model.init_args.backbone", backbone]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--checkpoint.dirpath", str(tmp_path)]
    done = train_py(args, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert re.search(culprit, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()
