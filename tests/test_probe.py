"""FeatureProbeModule under real Lightning Trainers on tiny data: a frozen backbone that runs once per
split, the feature cache in memory and on disk, trained heads and scikit-learn classifiers, checkpoints,
token-level tagging, prediction and the projector, and bad input.

Text runs use the tiny random BERT of ``tiny_hf_dir`` on three-word sentences whose label word ("good" /
"bad" words) decides the class; image runs use a small BatchNorm network on in-memory digit-like images.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, VOCAB, digit_like_image, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

import tlmodules.feature_cache
import tlmodules.probe
from datamodules import ConllDataModule, ImageFolderDataModule, TextClassificationDataModule
from tlmodules import BackboneError, FeatureProbeModule, build_backbone
from tlmodules.entities import tags_from_logits
from tlmodules.predictions import PredictionWriter

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*modules? in eval mode.*",  # the frozen backbone is in eval mode on purpose
    "ignore:.*sync_dist=True.*",
)

NUM_SENTENCES, BATCH, VAL_FRACTION = 240, 32, 0.25
TRAIN_BATCHES, VAL_BATCHES = 6, 2  # 180 and 60 sentences in batches of 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread is as fast, and far faster when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Trainer's default_root_dir is the working directory: pickled estimators land in tmp_path."""
    monkeypatch.chdir(tmp_path)


def count_calls(module: nn.Module) -> list[int]:
    """A one-element list that counts ``module``'s forward calls."""
    calls = [0]

    def hook(*args: Any) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sentence(label: int, rng: random.Random) -> str:
    """Two filler words and one label word, shuffled."""
    words = [*rng.sample(FILLER, 2), rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_sentences(path: Path, n: int = NUM_SENTENCES, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["text\tlabel"] + [f"{sentence(i % 2, rng)}\t{('neg', 'pos')[i % 2]}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_bert(folder: Path, like: Path, seed: int) -> Path:
    """A BERT shaped like the one in ``like`` (and its tokenizer), with weights drawn from ``seed``."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    for item in like.iterdir():
        if "token" in item.name or item.name == "vocab.txt":
            shutil.copy(item, folder / item.name)
    torch.manual_seed(seed)
    BertModel(BertConfig.from_pretrained(like)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentences(tmp_path_factory.mktemp("sentences") / "train.tsv")


@pytest.fixture(scope="module")
def other_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("other_bert"), tiny_hf_dir, seed=1)


def text_data(train_file: Path, model_dir: Path | str, **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"batch_size": BATCH, "val_fraction": VAL_FRACTION, "num_workers": 0, **kwargs}
    backbone = model_dir if isinstance(model_dir, str) else f"hf:{model_dir}"
    return TextClassificationDataModule(train_file=str(train_file), backbone=backbone, **kwargs)


def text_probe(model_dir: Path | str, **kwargs: Any) -> FeatureProbeModule:
    pl.seed_everything(0)
    backbone = model_dir if isinstance(model_dir, str) else f"hf:{model_dir}"
    return FeatureProbeModule(backbone=backbone, **kwargs)


def val_batches(data: pl.LightningDataModule) -> list[dict[str, Any]]:
    return list(data.val_dataloader())


def backbone_features(model: FeatureProbeModule, loader: Any) -> tuple[list[int], Tensor]:
    """Sample indices and freshly computed backbone features, batch by batch (no cache)."""
    indices, feats = [], []
    with torch.no_grad():
        for batch in loader:
            indices += batch["index"].tolist()
            feats.append(model.backbone(batch["inputs"]).float())
    return indices, torch.cat(feats)


# -- images: a small frozen network with BatchNorm statistics and dropout ----------------------------
def bn_net(width: int = 8) -> nn.Sequential:
    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.5)]

    return nn.Sequential(*block(3), *block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def image_samples(n: int = 48, num_classes: int = 3, size: int = 16) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = np.asarray(digit_like_image(i % num_classes, size, rng), dtype=np.float32) / 127.5 - 1.0
        image = torch.from_numpy(pixels).expand(3, size, size).clone()
        out.append({"inputs": image, "labels": i % num_classes, "index": i})
    return out


# ---------------------------------------------------------------------------------------------
# 1. the backbone stays frozen
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["batchnorm_images", "bert_text"])
def test_backbone_stays_bit_identical_and_in_eval_mode_while_the_head_trains(
    kind: str, tiny_hf_dir: Path, sentences: Path
) -> None:
    pl.seed_everything(0)
    if kind == "batchnorm_images":
        model = FeatureProbeModule(backbone=bn_net(), num_features=8, num_classes=3, lr=0.05)
        samples = image_samples()
        fit_args: dict[str, Any] = {
            "train_dataloaders": DataLoader(samples[:36], batch_size=6, shuffle=True),
            "val_dataloaders": DataLoader(samples[36:], batch_size=6),
        }
    else:
        model = text_probe(tiny_hf_dir, lr=0.05, num_classes=2)
        fit_args = {"datamodule": text_data(sentences, tiny_hf_dir)}
    backbone_before = snapshot(model.backbone)
    assert any("running_mean" in k for k in backbone_before) or kind != "batchnorm_images"
    modes: list[tuple[set[bool], bool]] = []
    training_step = model.training_step

    def recording_step(batch: Any, batch_idx: int) -> Any:
        modes.append(({m.training for m in model.backbone.modules()}, model.head.training))
        return training_step(batch, batch_idx)

    model.training_step = recording_step
    head_before = snapshot(model.head) if model.head is not None else None
    make_trainer(max_epochs=3).fit(model, **fit_args)

    assert len(modes) >= 3 * 6
    assert all(backbone == {False} and head for backbone, head in modes), "backbone not in eval mode while training"
    after = model.backbone.state_dict()
    assert after.keys() == backbone_before.keys()
    changed = [k for k in after if not torch.equal(after[k], backbone_before[k])]
    assert not changed, f"frozen backbone tensors changed: {changed[:5]}"
    assert not any(p.requires_grad for p in model.backbone.parameters())
    if head_before is not None:
        moved = max((model.head.state_dict()[k] - v).abs().max().item() for k, v in head_before.items())
        assert moved > 1e-2, f"the head did not train ({moved})"


# ---------------------------------------------------------------------------------------------
# 2. the backbone runs once per split, however many epochs
# ---------------------------------------------------------------------------------------------
def test_backbone_runs_once_per_sample_while_the_head_runs_every_epoch(tiny_hf_dir: Path, sentences: Path) -> None:
    counts = {}
    for epochs in (1, 4):
        model = text_probe(tiny_hf_dir, lr=0.05)
        data = text_data(sentences, tiny_hf_dir)
        trainer = make_trainer(max_epochs=epochs, num_sanity_val_steps=2)
        model.size_classifier(2)
        backbone_calls, head_calls = count_calls(model.backbone.body), count_calls(model.head)
        trainer.fit(model, datamodule=data)
        assert (trainer.num_training_batches, trainer.num_val_batches[0]) == (TRAIN_BATCHES, VAL_BATCHES)
        counts[epochs] = (backbone_calls[0], head_calls[0])
        assert model.cache.size("train") == 180 and model.cache.size("val") == 60
    # one pass over the training and the validation batches; the sanity check's batches are not recomputed
    assert counts[1][0] == counts[4][0] == TRAIN_BATCHES + VAL_BATCHES
    # the head sees every batch of every epoch (and the two sanity-check batches)
    assert counts[1][1] == TRAIN_BATCHES + VAL_BATCHES + 2
    assert counts[4][1] == 4 * (TRAIN_BATCHES + VAL_BATCHES) + 2


def test_without_feature_caching_the_backbone_runs_every_epoch(tiny_hf_dir: Path, sentences: Path) -> None:
    model = text_probe(tiny_hf_dir, lr=0.05, cache_features=False, num_classes=2)
    backbone_calls = count_calls(model.backbone.body)
    make_trainer(max_epochs=3).fit(model, datamodule=text_data(sentences, tiny_hf_dir))
    assert backbone_calls[0] == 3 * (TRAIN_BATCHES + VAL_BATCHES)
    assert len(model.cache) == 0
    with pytest.raises(ValueError, match="cache_features"):
        text_probe(tiny_hf_dir, head="logistic_regression", cache_features=False)


def test_estimator_is_fitted_once_on_one_backbone_pass(
    tiny_hf_dir: Path, sentences: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fits: list[tuple[int, int]] = []
    original = tlmodules.probe.fit_estimator

    def counting_fit(estimator: Any, features: Tensor, labels: Tensor) -> Any:
        fits.append(tuple(features.shape))
        return original(estimator, features, labels)

    monkeypatch.setattr(tlmodules.probe, "fit_estimator", counting_fit)
    model = text_probe(tiny_hf_dir, head="logistic_regression")
    backbone_calls = count_calls(model.backbone.body)
    trainer = make_trainer(max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(model, datamodule=text_data(sentences, tiny_hf_dir))
    assert backbone_calls[0] == TRAIN_BATCHES + VAL_BATCHES
    assert fits == [(180, 32)], "the estimator should be fitted once, on every training sample"
    assert trainer.global_step == 3 * TRAIN_BATCHES  # one (no-op) optimizer step per batch
    assert float(trainer.callback_metrics["val/acc"]) >= 0.8


# ---------------------------------------------------------------------------------------------
# 3. the disk cache
# ---------------------------------------------------------------------------------------------
def fit_cached(
    model_dir: Path | str, train_file: Path, cache_dir: Path, epochs: int = 2, data_args: dict | None = None, **kwargs
) -> tuple[int, FeatureProbeModule, pl.Trainer]:
    """A fresh probe fitted with ``cache_dir``; returns its number of backbone calls, the module and the trainer."""
    model = text_probe(model_dir, lr=0.05, cache_dir=str(cache_dir), **kwargs)
    model.size_classifier(2)
    calls = count_calls(model.backbone.body)
    trainer = make_trainer(max_epochs=epochs)
    trainer.fit(model, datamodule=text_data(train_file, model_dir, **(data_args or {})))
    return calls[0], model, trainer


def cache_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.pt")}


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path, sentences: Path) -> dict[str, Any]:
    """A cache folder filled by one fit, and what that fit ended with."""
    folder = tmp_path_factory.mktemp("warm") / "cache"
    calls, model, trainer = fit_cached(tiny_hf_dir, sentences, folder)
    return {
        "folder": folder,
        "calls": calls,
        "files": cache_files(folder),
        "train": model.cache.items("train"),
        "val": model.cache.items("val"),
        "head": snapshot(model.head),
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }


def copy_cache(warm_cache: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(warm_cache["folder"], tmp_path / "cache"))


def test_second_fit_takes_every_feature_from_the_disk_cache(
    warm_cache: dict[str, Any], tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    assert warm_cache["calls"] == TRAIN_BATCHES + VAL_BATCHES
    assert len(warm_cache["files"]) == 2  # one file per split
    folder = copy_cache(warm_cache, tmp_path)
    for name in warm_cache["files"]:  # plain tensors: readable without unpickling code
        saved = torch.load(folder / name, weights_only=True)
        assert set(saved) == {"index", "lengths", "features", "sha256"}

    calls, model, trainer = fit_cached(tiny_hf_dir, sentences, folder)
    assert calls == 0, "the second fit ran the backbone although every feature was on disk"
    for split in ("train", "val"):
        indices, feats = model.cache.items(split)
        want_indices, want = warm_cache[split]
        assert indices == want_indices and len(indices) == (180 if split == "train" else 60)
        assert all(torch.equal(a, b) for a, b in zip(feats, want))
    assert all(torch.equal(v, warm_cache["head"][k]) for k, v in model.head.state_dict().items())
    assert float(trainer.callback_metrics["val/acc"]) == warm_cache["val_acc"]
    assert cache_files(folder) == warm_cache["files"]

    # the cached features are the backbone's
    data = text_data(sentences, tiny_hf_dir)
    data.setup("fit")
    indices, fresh = backbone_features(model, data.val_dataloader())
    table = dict(zip(*model.cache.items("val")))
    torch.testing.assert_close(torch.stack([table[i] for i in indices]), fresh, atol=1e-5, rtol=1e-5)


def edited_copy(train_file: Path, tmp_path: Path) -> Path:
    lines = train_file.read_text().splitlines()
    text, label = lines[5].split("\t")
    lines[5] = f"{text.replace(text.split()[0], 'really', 1)}\t{label}"  # one sentence, one word
    assert lines[5] != train_file.read_text().splitlines()[5]
    edited = tmp_path / "edited.tsv"
    edited.write_text("\n".join(lines) + "\n")
    return edited


@pytest.mark.parametrize("change", ["edited_sentence", "max_length", "pooling", "other_model_dir"])
def test_a_change_to_data_preprocessing_pooling_or_model_selects_another_cache_key(
    change: str, warm_cache: dict[str, Any], tiny_hf_dir: Path, other_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    folder = copy_cache(warm_cache, tmp_path)
    model_dir, train_file, data_args, kwargs = tiny_hf_dir, sentences, {}, {}
    if change == "edited_sentence":
        train_file = edited_copy(sentences, tmp_path)
    elif change == "max_length":
        data_args = {"max_length": 4}  # [CLS] w w [SEP]: the third word is cut
    elif change == "pooling":
        kwargs = {"pooling": "max"}
    else:
        model_dir = other_hf_dir
    calls, model, _ = fit_cached(model_dir, train_file, folder, data_args=data_args, **kwargs)
    assert calls == TRAIN_BATCHES + VAL_BATCHES, f"{change}: stale features were taken from the cache"
    new_files = cache_files(folder) - warm_cache["files"]
    assert len(new_files) == 2, f"{change}: expected a new file per split, got {sorted(new_files)}"
    assert warm_cache["files"] <= cache_files(folder)  # the other key's files are kept
    _, feats = model.cache.items("train")
    differs = not all(torch.equal(a, b) for a, b in zip(feats, warm_cache["train"][1]))
    assert differs or change == "edited_sentence"


def test_weights_that_change_under_the_same_spec_select_another_cache_key(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    """The same ``hf:<folder>`` whose weights were replaced, and two ``ckpt:`` files that differ in one tensor."""
    model_dir = save_tiny_bert(tmp_path / "bert", tiny_hf_dir, seed=0)
    folder = tmp_path / "cache"
    full = TRAIN_BATCHES + VAL_BATCHES
    assert fit_cached(model_dir, sentences, folder, epochs=1)[0] == full
    assert fit_cached(model_dir, sentences, folder, epochs=1)[0] == 0
    save_tiny_bert(model_dir, tiny_hf_dir, seed=5)  # same folder, same spec, other weights
    assert fit_cached(model_dir, sentences, folder, epochs=1)[0] == full

    # a checkpoint that stores its backbone, and a copy with one weight nudged
    _, model, trainer = fit_cached(tiny_hf_dir, sentences, tmp_path / "unused", epochs=1, save_backbone=True)
    first = tmp_path / "a.ckpt"
    trainer.save_checkpoint(first)
    state = torch.load(first, weights_only=True)
    key = "backbone.body.embeddings.word_embeddings.weight"
    state["state_dict"][key][VOCAB.index("good"), 0] += 1e-3
    second = tmp_path / "b.ckpt"
    torch.save(state, second)
    ckpt_cache = tmp_path / "ckpt_cache"
    assert fit_cached(f"ckpt:{first}", sentences, ckpt_cache, epochs=1)[0] == full
    assert fit_cached(f"ckpt:{first}", sentences, ckpt_cache, epochs=1)[0] == 0
    assert fit_cached(f"ckpt:{second}", sentences, ckpt_cache, epochs=1)[0] == full


def test_plain_module_weights_are_part_of_the_cache_key(tmp_path: Path, make_image_folder: Callable) -> None:
    root = make_image_folder(classes=("a", "b", "c"), per_class=6, size=16)
    torch.manual_seed(0)
    net = bn_net()
    perturbed = copy.deepcopy(net)
    with torch.no_grad():
        perturbed[0].weight[0, 0, 0, 0] += 1e-3
    calls, batches = [], []
    for backbone in (net, copy.deepcopy(net), perturbed):
        model = FeatureProbeModule(backbone=backbone, num_features=8, cache_dir=str(tmp_path / "cache"))
        model.size_classifier(3)
        counter = count_calls(model.backbone.body)
        data = ImageFolderDataModule(train_dir=str(root), image_size=16, val_fraction=0.25, batch_size=4, num_workers=0)
        trainer = make_trainer(max_epochs=2)
        trainer.fit(model, datamodule=data)
        calls.append(counter[0])
        batches.append(trainer.num_training_batches + trainer.num_val_batches[0])
    assert calls == [batches[0], 0, batches[2]]
    assert batches[0] == 5  # 14 training and 4 validation images in batches of 4


class WritesMarker:
    """Unpickling this calls ``Path.write_text``: proof that a file was unpickled with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped_byte", "pickled_code", "rows_missing"])
def test_a_damaged_cache_file_is_ignored_and_recomputed(
    damage: str, warm_cache: dict[str, Any], tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    folder = copy_cache(warm_cache, tmp_path)
    marker = tmp_path / "marker.txt"
    for name in warm_cache["files"]:
        path = folder / name
        saved = torch.load(path, weights_only=True)
        n = len(saved["index"])
        if damage == "garbage":
            path.write_bytes(b"\x00not a checkpoint" * 10)
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "flipped_byte":  # torch.load does not notice this; the file's SHA-256 does
            data = bytearray(path.read_bytes())
            where = bytes(data).find(saved["features"][3].numpy().tobytes())
            assert where > 0
            data[where + 5] ^= 0x40
            path.write_bytes(bytes(data))
            changed = torch.load(path, weights_only=True)["features"]
            assert not torch.equal(changed, saved["features"])
        elif damage == "pickled_code":
            torch.save({"index": saved["index"], "payload": WritesMarker(marker)}, path)
        else:  # tensors that do not fit together, under a matching checksum
            short = saved["features"][: n // 2]
            digest = tlmodules.feature_cache._payload_digest(saved["index"], saved["lengths"], short)
            torch.save({**saved, "features": short, "sha256": digest}, path)
    calls, model, trainer = fit_cached(tiny_hf_dir, sentences, folder)
    assert not marker.exists(), "a cache file was unpickled with code execution"
    assert calls == TRAIN_BATCHES + VAL_BATCHES, f"{damage}: a damaged cache file was trusted"
    for split in ("train", "val"):
        indices, feats = model.cache.items(split)
        assert indices == warm_cache[split][0]
        for a, b in zip(feats, warm_cache[split][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(warm_cache["val_acc"])
    # the files were rewritten whole
    for name in warm_cache["files"]:
        saved = torch.load(folder / name, weights_only=True)
        assert saved["features"].shape[0] == len(saved["index"]) in (180, 60)


# ---------------------------------------------------------------------------------------------
# 4. every classifier learns an easy task and logs the same metrics
# ---------------------------------------------------------------------------------------------
CLASSIFIERS = [  # (head, estimator_args, epochs, lr of a trained head)
    ("linear", None, 15, 0.3),
    ("mlp", None, 15, 0.02),
    ("logistic_regression", None, 1, 1e-3),
    ("linear_svm", None, 1, 1e-3),
    ("rbf_svm", {"C": 10.0}, 1, 1e-3),
    ("random_forest", {"n_estimators": 50}, 1, 1e-3),
    ("sklearn.linear_model.RidgeClassifier", None, 1, 1e-3),
]


@pytest.mark.parametrize(("classifier", "args", "epochs", "lr"), CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_every_classifier_beats_chance_logs_the_same_metrics_and_reloads(
    classifier: str, args: dict | None, epochs: int, lr: float, tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    model = text_probe(tiny_hf_dir, head=classifier, estimator_args=args, lr=lr, head_hidden=32)
    data = text_data(sentences, tiny_hf_dir)
    trainer = make_trainer(max_epochs=epochs)
    trainer.fit(model, datamodule=data)
    logged = trainer.callback_metrics
    assert {"val/acc", "val/f1_macro", "val/loss", "train/acc", "train/f1_macro"} <= set(logged)
    assert float(logged["val/acc"]) >= 0.8, f"{classifier}: val/acc {float(logged['val/acc'])} (chance 0.5)"

    # the logged metrics are those of the model's predictions on the validation set
    predicted, gold = [], []
    model.eval()
    for batch in val_batches(data):
        predicted += model(batch["inputs"]).argmax(-1).tolist()
        gold += batch["labels"].tolist()
    assert len(gold) == 60
    assert float(logged["val/acc"]) == pytest.approx(accuracy_score(gold, predicted), abs=1e-6)
    assert float(logged["val/f1_macro"]) == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-6)

    # and a checkpoint gives the same predictions back
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    meta = torch.load(tmp_path / "probe.ckpt", weights_only=True)["tlmodules"]["head"]
    kinds = {"linear": "head", "mlp": "head", "rbf_svm": "pickled", "random_forest": "pickled"}
    assert meta["kind"] == kinds.get(classifier, "linear_estimator")  # RidgeClassifier too: its 1-d binary coef_
    if meta["kind"] == "pickled":  # no logger: beside the run is the Trainer's default_root_dir (the cwd here)
        assert Path(meta["path"]).parent == tmp_path / "estimators"
    loaded = FeatureProbeModule.load_from_checkpoint(
        tmp_path / "probe.ckpt", map_location="cpu", weights_only=True, trust_pickled_estimator=True
    )
    batches = val_batches(data)
    torch.testing.assert_close(predictions(loaded, batches), predictions(model, batches))


# ---------------------------------------------------------------------------------------------
# 5. checkpoints
# ---------------------------------------------------------------------------------------------
def predictions(model: FeatureProbeModule, batches: list[dict[str, Any]]) -> Tensor:
    model.eval()
    return torch.cat([model(batch["inputs"]) for batch in batches])


def test_checkpoint_leaves_the_frozen_backbone_out_unless_asked(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    paths = {}
    for save_backbone in (False, True):
        model = text_probe(tiny_hf_dir, lr=0.05, save_backbone=save_backbone)
        data = text_data(sentences, tiny_hf_dir)
        trainer = make_trainer(max_epochs=2)
        trainer.fit(model, datamodule=data)
        paths[save_backbone] = tmp_path / f"save_backbone_{save_backbone}.ckpt"
        trainer.save_checkpoint(paths[save_backbone])
    backbone_keys = {f"backbone.{k}" for k in model.backbone.state_dict()}
    lean = torch.load(paths[False], weights_only=True)
    full = torch.load(paths[True], weights_only=True)
    assert not [k for k in lean["state_dict"] if k.startswith("backbone.")]
    assert {k for k in full["state_dict"] if k.startswith("backbone.")} == backbone_keys
    for key in backbone_keys:
        assert torch.equal(full["state_dict"][key], model.state_dict()[key])
    assert lean["tlmodules"]["backbone_saved"] is False and full["tlmodules"]["backbone_saved"] is True
    assert lean["tlmodules"]["backbone"]["spec"] == f"hf:{tiny_hf_dir}"
    backbone_bytes = sum(t.numel() * t.element_size() for t in model.backbone.state_dict().values())
    assert paths[True].stat().st_size - paths[False].stat().st_size >= 0.95 * backbone_bytes

    # both reload to the same predictions; the lean one rebuilds the backbone from its spec
    batches = val_batches(data)
    want = predictions(model, batches)
    for path in paths.values():
        loaded = FeatureProbeModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        torch.testing.assert_close(predictions(loaded, batches), want, atol=1e-6, rtol=1e-6)


def test_logistic_regression_checkpoint_holds_tensors_only_and_reproduces_the_estimator(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted: list[Any] = []
    original = tlmodules.probe.fit_estimator
    monkeypatch.setattr(tlmodules.probe, "fit_estimator", lambda *a: fitted.append(original(*a)) or fitted[-1])
    model = text_probe(tiny_hf_dir, head="logistic_regression")
    data = text_data(sentences, tiny_hf_dir)
    trainer = make_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "logreg.ckpt"
    trainer.save_checkpoint(path)

    saved = torch.load(path, weights_only=True)  # no scikit-learn object inside
    assert saved["tlmodules"]["head"] == {
        "name": "logistic_regression",
        "kind": "linear_estimator",
        "fitted": True,
    }
    assert not (tmp_path / "estimators").exists()
    loaded = FeatureProbeModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert loaded.estimator_fitted
    batches = val_batches(data)
    probs = predictions(loaded, batches).softmax(-1)
    torch.testing.assert_close(probs, predictions(model, batches).softmax(-1))
    _, feats = backbone_features(loaded, batches)
    expected = torch.from_numpy(fitted[0].predict_proba(feats.double().numpy())).float()
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_random_forest_is_pickled_beside_the_run_and_loads_only_when_trusted(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    model = text_probe(tiny_hf_dir, head="random_forest", estimator_args={"n_estimators": 20})
    data = text_data(sentences, tiny_hf_dir)
    logger = TensorBoardLogger(tmp_path, name="forest")
    trainer = make_trainer(logger=logger, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "forest.ckpt"
    trainer.save_checkpoint(path)

    pickles = list((Path(logger.log_dir) / "estimators").glob("*.pkl"))
    assert len(pickles) == 1
    meta = torch.load(path, weights_only=True)["tlmodules"]["head"]
    assert meta["kind"] == "pickled" and meta["fitted"] is True
    assert Path(meta["path"]) == pickles[0].resolve()
    assert meta["sha256"] == hashlib.sha256(pickles[0].read_bytes()).hexdigest()

    with pytest.raises(PermissionError, match="refusing to unpickle"):
        FeatureProbeModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    loaded = FeatureProbeModule.load_from_checkpoint(
        path, map_location="cpu", weights_only=True, trust_pickled_estimator=True
    )
    batches = val_batches(data)
    torch.testing.assert_close(predictions(loaded, batches), predictions(model, batches))

    pickles[0].write_bytes(pickles[0].read_bytes() + b"\x00")  # the file changed since: refused even when trusted
    with pytest.raises(ValueError, match="sha256"):
        FeatureProbeModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, trust_pickled_estimator=True
        )


def test_checkpoint_whose_backbone_now_resolves_to_other_weights_is_refused(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    model_dir = save_tiny_bert(tmp_path / "bert", tiny_hf_dir, seed=0)
    model = text_probe(model_dir, lr=0.05)
    data = text_data(sentences, model_dir)
    trainer = make_trainer()
    trainer.fit(model, datamodule=data)
    path = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(path)

    # a probe checkpoint without backbone tensors serves as a backbone: rebuilt from its spec
    rebuilt = build_backbone(f"ckpt:{path}")
    assert rebuilt.origin.spec == f"hf:{model_dir}"
    original = model.backbone.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in rebuilt.state_dict().items())

    save_tiny_bert(model_dir, tiny_hf_dir, seed=5)  # the folder now holds other weights
    with pytest.raises(ValueError, match="resolves to different weights"):
        FeatureProbeModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    with pytest.raises(BackboneError, match="weights differ"):
        build_backbone(f"ckpt:{path}")


# ---------------------------------------------------------------------------------------------
# 6. token level
# ---------------------------------------------------------------------------------------------
TAG_OF = {**{w: "B-POS" for w in POSITIVE}, **{w: "B-NEG" for w in NEGATIVE}}


def write_conll(path: Path, n: int, seed: int) -> Path:
    """Sentences of the tiny vocabulary; "good" words are B-POS, "bad" words B-NEG, the rest O."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE + NEGATIVE, 2)
        rng.shuffle(words)
        blocks.append("\n".join(f"{w} X {TAG_OF.get(w, 'O')}" for w in words))
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n")
    return path


@pytest.fixture(scope="module")
def conll_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("conll")
    return write_conll(folder / "train.txt", 48, seed=0), write_conll(folder / "val.txt", 24, seed=1)


def conll_data(conll_files: tuple[Path, Path], model_dir: Path) -> ConllDataModule:
    train, val = conll_files
    return ConllDataModule(train_file=str(train), val_file=str(val), backbone=f"hf:{model_dir}", batch_size=8)


def independent_entity_scores(model: FeatureProbeModule, data: ConllDataModule) -> dict[str, float]:
    """Entity precision / recall / F1 of the model's tags on the validation set, by seqeval."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    predicted, gold = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model.classify(model.backbone.forward_tokens(batch["inputs"]).flatten(0, 1))
            logits = logits.view(*batch["labels"].shape, -1)
            p, g = tags_from_logits(logits, batch["labels"], model.class_names)
            predicted += p
            gold += g
    assert gold == data.tags["val"]  # every word of every sentence, in order
    return {
        "precision": precision_score(gold, predicted),
        "recall": recall_score(gold, predicted),
        "f1": f1_score(gold, predicted),
    }


@pytest.mark.parametrize(
    ("classifier", "epochs", "lr"), [("linear", 1, 0.01), ("linear", 8, 0.05), ("logistic_regression", 1, 1e-3)]
)
def test_token_level_probe_tags_entities_with_one_backbone_pass(
    classifier: str, epochs: int, lr: float, conll_files: tuple[Path, Path], tiny_hf_dir: Path
) -> None:
    model = text_probe(tiny_hf_dir, level="token", head=classifier, lr=lr)
    data = conll_data(conll_files, tiny_hf_dir)
    model.size_classifier(3)
    backbone_calls = count_calls(model.backbone.body)
    trainer = make_trainer(max_epochs=epochs)
    trainer.fit(model, datamodule=data)
    assert model.class_names == ["O", "B-NEG", "B-POS"]
    assert backbone_calls[0] == 6 + 3  # 48 and 24 sentences in batches of 8, once
    assert model.cache.size("train") == 48 and model.cache.size("val") == 24
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in ("val/acc", "val/f1_macro", "val/entity_f1", "val/entity_precision", "val/entity_recall"):
        assert name in logged, f"{name} not logged; have {sorted(logged)}"
    scores = independent_entity_scores(model, data)
    for name, value in scores.items():
        assert logged[f"val/entity_{name}"] == pytest.approx(value, abs=1e-6), name
    if epochs > 1 or classifier != "linear":
        assert logged["val/acc"] >= 0.9 and logged["val/entity_f1"] >= 0.8, logged
    else:  # a partly trained head: the comparison above is not between two perfect scores
        assert 0.0 < scores["f1"] < 0.95, scores


def test_token_features_round_trip_through_the_disk_cache(
    conll_files: tuple[Path, Path], tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """Per-sentence features ``(words, F)`` come back from disk as they were, a sentence without any
    labelled token (its only word, a soft hyphen, tokenizes to nothing) included."""
    train = tmp_path / "train.txt"
    train.write_text(conll_files[0].read_text() + "\n\u00ad X O\n\nthe X O\ngood X B-POS\n")
    runs = []
    for _ in range(2):
        model = text_probe(tiny_hf_dir, level="token", lr=0.05, cache_dir=str(tmp_path / "cache"))
        data = conll_data((train, conll_files[1]), tiny_hf_dir)
        model.size_classifier(3)
        calls = count_calls(model.backbone.body)
        trainer = make_trainer(max_epochs=2)
        trainer.fit(model, datamodule=data)
        runs.append((calls[0], model.cache.items("train"), float(trainer.callback_metrics["val/entity_f1"])))
    (first_calls, (indices, feats), f1), (second_calls, (indices2, feats2), f1_2) = runs
    assert first_calls == 7 + 3 and second_calls == 0
    assert indices == indices2 == list(range(50))
    assert feats[48].shape == (0, 32) and feats[49].shape == (2, 32)
    assert [f.shape for f in feats] == [f.shape for f in feats2]
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2))
    assert f1 == f1_2


# ---------------------------------------------------------------------------------------------
# 7. predict and the projector
# ---------------------------------------------------------------------------------------------
def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


@pytest.mark.parametrize("output", ["embeddings", "probabilities"])
def test_predict_writes_embeddings_or_probabilities(
    output: str, tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    unlabelled = tmp_path / "unlabelled.tsv"
    rng = random.Random(7)
    unlabelled.write_text("text\n" + "\n".join(sentence(i % 2, rng) for i in range(11)) + "\n")
    model = text_probe(tiny_hf_dir, lr=0.05, predict_output=output)
    data = text_data(sentences, tiny_hf_dir, predict_file=str(unlabelled))
    make_trainer(max_epochs=2).fit(model, datamodule=data)
    target = tmp_path / "out" / "predictions.csv"
    make_trainer(callbacks=[PredictionWriter(str(target))]).predict(model, datamodule=data, return_predictions=False)

    header, rows = read_csv(target)
    assert [row[0] for row in rows] == [str(i) for i in range(1, 12)]  # file rows, 1-based
    indices, feats = backbone_features(model, data.predict_dataloader())  # read in length order
    feats = feats[torch.tensor(indices).argsort()]
    if output == "embeddings":
        assert header == ["id", *(f"f{i}" for i in range(32))]
        values = torch.tensor([[float(v) for v in row[1:]] for row in rows])
        torch.testing.assert_close(values, feats, atol=1e-5, rtol=1e-5)
    else:
        assert header == ["id", "label", "prob_neg", "prob_pos"]
        probs = torch.tensor([[float(v) for v in row[2:]] for row in rows])
        torch.testing.assert_close(probs, model.head(feats).softmax(-1), atol=1e-5, rtol=1e-5)
        assert [row[1] for row in rows] == [["neg", "pos"][i] for i in probs.argmax(-1).tolist()]


def test_validation_features_go_to_the_projector_labelled_by_class(
    tiny_hf_dir: Path, sentences: Path, tmp_path: Path
) -> None:
    model = text_probe(tiny_hf_dir, lr=0.05, projection_samples=50)
    data = text_data(sentences, tiny_hf_dir)
    logger = TensorBoardLogger(tmp_path, name="probe")
    make_trainer(max_epochs=2, logger=logger).fit(model, datamodule=data)

    log_dir = Path(logger.log_dir)
    assert (log_dir / "projector_config.pbtxt").is_file()
    metadata = list(log_dir.rglob("metadata.tsv"))
    assert len(metadata) == 1, "the projector should be written once per fit"
    val = data.datasets["val"]
    chosen = sorted(val.indices)[:50]
    expected = [data.class_names[val.dataset.labels[i]] for i in chosen]
    assert metadata[0].read_text().splitlines() == expected
    assert set(expected) == {"neg", "pos"}
    rows = (metadata[0].parent / "tensors.tsv").read_text().splitlines()
    logged = torch.tensor([[float(v) for v in row.split("\t")] for row in rows])
    indices, fresh = backbone_features(model, data.val_dataloader())
    torch.testing.assert_close(logged, fresh[[indices.index(i) for i in chosen]], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["augment", "hflip"])
def test_augmenting_datamodule_is_refused_at_setup(flag: str, make_image_folder: Callable) -> None:
    root = make_image_folder(per_class=4, size=16)
    data = ImageFolderDataModule(train_dir=str(root), image_size=16, batch_size=4, num_workers=0, **{flag: True})
    model = FeatureProbeModule(backbone=bn_net(), num_features=8)
    backbone_calls = count_calls(model.backbone.body)
    with pytest.raises(ValueError, match=f"augmentation.*{flag}: false"):
        make_trainer().fit(model, datamodule=data)
    assert backbone_calls[0] == 0


def test_unknown_classifier_is_refused_at_construction_with_the_names() -> None:
    with pytest.raises(ValueError, match="unknown") as err:
        FeatureProbeModule(backbone=bn_net(), num_features=8, head="linaer")
    message = str(err.value)
    for name in ("linear", "mlp", "logistic_regression", "linear_svm", "rbf_svm", "random_forest", "class path"):
        assert name in message, f"{name!r} missing from: {message}"


def test_token_level_needs_a_transformer_backbone() -> None:
    with pytest.raises(ValueError, match="level='token' needs a transformer backbone"):
        FeatureProbeModule(backbone="builtin:lenet", level="token")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_level_that_does_not_fit_the_labels_is_a_clear_error(
    level: str, tiny_hf_dir: Path, sentences: Path, conll_files: tuple[Path, Path]
) -> None:
    """Sentence labels with level='token', or CoNLL's per-token labels with level='sequence'."""
    data = text_data(sentences, tiny_hf_dir) if level == "token" else conll_data(conll_files, tiny_hf_dir)
    model = text_probe(tiny_hf_dir, level=level)
    other = "sequence" if level == "token" else "token"
    with pytest.raises(ValueError, match=rf"level='{level}'.*labels have shape.*level='{other}'"):
        make_trainer().fit(model, datamodule=data)


@pytest.mark.parametrize("classifier", ["linear", "logistic_regression"])
def test_normalize_features_feeds_unit_vectors_to_the_classifier(
    classifier: str, tiny_hf_dir: Path, sentences: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Tensor] = []
    original = tlmodules.probe.fit_estimator
    monkeypatch.setattr(tlmodules.probe, "fit_estimator", lambda est, x, y: seen.append(x) or original(est, x, y))
    model = text_probe(tiny_hf_dir, head=classifier, normalize_features=True, lr=1e-2)
    data = text_data(sentences, tiny_hf_dir)
    make_trainer(max_epochs=2).fit(model, datamodule=data)
    _, raw = backbone_features(model, data.val_dataloader())
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)))  # the backbone's own features are not unit
    # the classifier's logits are those of the normalised features, not of the raw ones
    with torch.no_grad():
        expected = model.head(nn.functional.normalize(raw, dim=-1))
        torch.testing.assert_close(model.classify(raw), expected)
        assert not torch.allclose(model.head(raw), expected)
    if classifier == "logistic_regression":
        assert len(seen) == 1
        torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(len(seen[0]), dtype=seen[0].dtype))


def test_bf16_mixed_probe_reaches_the_fp32_validation_accuracy(tiny_hf_dir: Path, sentences: Path) -> None:
    """The frozen backbone under bf16 autocast (features extracted in bf16, cached as float32) and the linear
    head: validation accuracy within 0.05 of fp32's after the same 30 epochs, features within bf16 rounding."""
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        model = text_probe(tiny_hf_dir, lr=0.05, num_classes=2)
        dtypes: list[torch.dtype] = []
        model.head.register_forward_hook(lambda m, args, out, seen=dtypes: seen.append(out.dtype))
        trainer = make_trainer(max_epochs=30, precision=precision)
        trainer.fit(model, datamodule=text_data(sentences, tiny_hf_dir))
        results[precision] = (float(trainer.callback_metrics["val/acc"]), set(dtypes), model.cache)
    acc32, dtypes32, cache32 = results["32-true"]
    acc16, dtypes16, cache16 = results["bf16-mixed"]
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}  # autocast really ran
    assert acc32 >= 0.8 and abs(acc16 - acc32) <= 0.05
    (order32, rows32), (order16, rows16) = cache32.items("train"), cache16.items("train")
    assert order32 == order16
    feats32, feats16 = torch.stack(rows32), torch.stack(rows16)
    assert feats16.dtype == torch.float32 and feats16.shape == feats32.shape
    assert torch.allclose(feats16, feats32, atol=0.05, rtol=0.05) and not torch.equal(feats16, feats32)
