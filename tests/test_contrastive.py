"""FineTuneModule's ``contrastive`` strategy (SetFit-style few-label training) and its pieces.

The two-process run lives in tests/test_distributed.py (``--contrastive``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from sklearn.linear_model import LogisticRegression
from torch import nn

from datamodules import TextClassificationDataModule
from tlmodules import FineTuneModule
from tlmodules.contrastive import SupervisedContrastiveLoss, fit_logistic_head
from tlmodules.errors import ConfigError


def supcon_by_hand(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. 2020, eq. 2 (L_out): the mean over anchors with a positive of
    ``-1/|P(i)| Σ_p log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )`` on unit-length ``z``."""
    z = F.normalize(embeddings, dim=-1)
    logits = z @ z.T / temperature
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = torch.logsumexp(logits[i, others], dim=0)
        losses.append(-torch.stack([logits[i, p] - log_denominator for p in positives]).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supervised_contrastive_loss_is_khosla_et_al_eq_2(temperature: float) -> None:
    torch.manual_seed(0)
    embeddings = torch.randn(10, 6) * 3
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3, 1])  # class 3 has no partner: that anchor adds nothing
    loss = SupervisedContrastiveLoss(temperature)(embeddings, labels)
    assert torch.allclose(loss, supcon_by_hand(embeddings, labels, temperature), rtol=1e-4)


def test_supervised_contrastive_gradient_pulls_classes_together_and_apart() -> None:
    torch.manual_seed(0)
    embeddings = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(12) % 3
    loss_fn = SupervisedContrastiveLoss(0.1)

    def similarities(z: torch.Tensor) -> tuple[float, float]:
        cos = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(12, dtype=torch.bool)
        different = labels[:, None] != labels[None, :]
        return float(cos[same].mean()), float(cos[different].mean())

    before = similarities(embeddings.detach())
    optimizer = torch.optim.SGD([embeddings], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(embeddings, labels).backward()
        optimizer.step()
    after = similarities(embeddings.detach())
    assert after[0] > before[0] + 0.3 and after[1] < before[1] - 0.1, (before, after)


def test_a_batch_without_same_class_pairs_gives_zero_loss_with_a_graph() -> None:
    embeddings = torch.randn(4, 5, requires_grad=True)
    loss = SupervisedContrastiveLoss()(embeddings, torch.arange(4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(embeddings.grad) == 0


def simplex_embeddings(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each class at a vertex of a regular simplex centred at the origin: cosine 1 within a class and
    ``-1/(C-1)`` between classes."""
    vertices = torch.eye(classes) - 1.0 / classes
    return vertices[labels]


@pytest.mark.parametrize(("temperature", "classes"), [(0.1, 2), (0.2, 4), (1.0, 3)])
def test_supcon_floor_is_the_loss_of_a_class_simplex_and_lies_below_any_other_embedding(
    temperature: float, classes: int
) -> None:
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0] + list(range(classes)) * 3)
    loss_fn = SupervisedContrastiveLoss(temperature)
    floor = loss_fn.floor(labels, classes)
    assert torch.allclose(loss_fn(simplex_embeddings(labels, classes), labels), floor, atol=1e-5)
    torch.manual_seed(0)
    for _ in range(20):  # random, and the simplex nudged a little: every one scores above the floor
        assert loss_fn(torch.randn(len(labels), classes), labels) > floor
        nudged = simplex_embeddings(labels, classes) + 0.05 * torch.randn(len(labels), classes)
        assert loss_fn(nudged, labels) > floor
    if temperature <= 0.1:  # negatives then weigh nothing: the floor is the mean of log(positives per anchor)
        positives = (labels[:, None] == labels[None, :]).sum(1) - 1
        assert torch.allclose(floor, positives.float().log().mean(), atol=1e-3)


def test_supcon_floor_is_zero_where_the_loss_is() -> None:
    loss_fn = SupervisedContrastiveLoss(0.2)
    assert loss_fn.floor(torch.arange(4), 4) == 0.0  # no same-class pair
    assert loss_fn.floor(torch.zeros(4, dtype=torch.long), 2) == 0.0  # no different-class pair
    assert loss_fn(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)) == 0.0


def test_fitted_logistic_head_reproduces_scikit_learn_on_normalised_features() -> None:
    torch.manual_seed(0)
    features = torch.randn(60, 7) * 4 + torch.arange(60)[:, None] % 3
    labels = torch.arange(60) % 3
    layer = nn.Linear(7, 4)  # a fourth class the data lacks
    with torch.no_grad():
        fit_logistic_head(layer, features, labels, num_classes=4, seed=0)
    reference = LogisticRegression(max_iter=2000).fit(F.normalize(features, dim=-1).double().numpy(), labels.numpy())
    probs = layer(F.normalize(features, dim=-1)).softmax(-1)
    expected = reference.predict_proba(F.normalize(features, dim=-1).double().numpy())
    assert torch.allclose(probs[:, :3], torch.from_numpy(expected).float(), atol=1e-4)
    assert probs[:, 3].max() < 1e-6


def test_balanced_class_weights_change_nothing_on_balanced_labels() -> None:
    torch.manual_seed(0)
    features, labels = torch.randn(40, 6), torch.arange(40) % 2
    balanced, unweighted = nn.Linear(6, 2), nn.Linear(6, 2)
    with torch.no_grad():
        fit_logistic_head(balanced, features, labels, num_classes=2, seed=0)  # the default: "balanced"
        fit_logistic_head(unweighted, features, labels, num_classes=2, seed=0, class_weight=None)
    assert torch.allclose(balanced.weight, unweighted.weight, atol=1e-6)
    assert torch.allclose(balanced.bias, unweighted.bias, atol=1e-6)


def test_balanced_class_weights_keep_a_rare_class_from_being_swamped() -> None:
    """56 examples of one class, 8 of another, separable but not far apart on the unit sphere: the unweighted fit
    predicts the rare class for hardly any of its test examples, the balanced one for most."""
    g = torch.Generator().manual_seed(0)

    def draw(common: int, rare: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(common + rare, 16, generator=g) * 0.5
        x[:common, 0] += 1.0
        x[common:, 1] += 1.0
        return x, torch.tensor([0] * common + [1] * rare)

    (train_x, train_y), (test_x, test_y) = draw(56, 8), draw(200, 200)
    recall = {}
    for class_weight in ("balanced", None):
        layer = nn.Linear(16, 2)
        with torch.no_grad():
            fit_logistic_head(layer, train_x, train_y, num_classes=2, seed=0, class_weight=class_weight)
            predicted = layer(F.normalize(test_x, dim=-1)).argmax(-1)
        recall[class_weight] = [(predicted[test_y == c] == c).float().mean().item() for c in (0, 1)]
    assert recall[None][1] < 0.3 and recall["balanced"][1] > 0.7
    assert sum(recall["balanced"]) > sum(recall[None]) + 0.3  # balanced accuracy, doubled


# -- the strategy, end to end on the tiny BERT ------------------------------------------------------------------
def sentences(tiny_hf_dir: Path, make_text_file, n: int = 24, **files: Path) -> TextClassificationDataModule:
    """``n`` training sentences (half per class; below 500, so no validation split is taken unless asked) and
    ``files`` (``val_file=…``, ``test_file=…``), batches of 8."""
    return TextClassificationDataModule(
        train_file=str(make_text_file("train.tsv", n=n)),
        **{key: str(path) for key, path in files.items()},
        backbone=f"hf:{tiny_hf_dir}",
        max_length=16,
        batch_size=8,
        baseline="none",
    )


@pytest.fixture
def few_label_data(tiny_hf_dir: Path, make_text_file) -> TextClassificationDataModule:
    return sentences(tiny_hf_dir, make_text_file, test_file=make_text_file("test.tsv", n=16, seed=1))


def contrastive_model(tiny_hf_dir: Path) -> FineTuneModule:
    return FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", lr=1e-3, lr_schedule="constant")


def training_features(model: FineTuneModule, data: TextClassificationDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    features, labels = [], []
    with torch.no_grad():
        for batch in data.ordered_dataloader("train"):
            features.append(model.backbone(batch["inputs"]))
            labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def test_contrastive_trains_the_backbone_only_and_fits_the_head_on_the_final_features(
    tiny_hf_dir: Path, few_label_data: TextClassificationDataModule, tmp_path: Path
) -> None:
    model = contrastive_model(tiny_hf_dir)
    initial = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = make_trainer(max_steps=9, max_epochs=None, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(model, datamodule=few_label_data)

    assert not few_label_data.has_split("val") and few_label_data.validation_note() is not None
    assert trainer.global_step == 9 and model._head_fitted_step == 9 and model.head_fit_samples == 24
    assert not any(p.requires_grad for p in model.head.parameters()), "the head is fitted, not trained"
    moved = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, initial[n])]
    assert len(moved) > 0.9 * len(initial), "the contrastive loss did not reach the backbone"
    assert trainer.callback_metrics["train/contrastive_loss"] > 0

    # the head is a logistic regression on the final backbone's (normalised) training features
    features, labels = training_features(model, few_label_data)
    reference = LogisticRegression(max_iter=2000).fit(F.normalize(features, dim=-1).double().numpy(), labels.numpy())
    expected = torch.from_numpy(reference.predict_proba(F.normalize(features, dim=-1).double().numpy())).float()
    assert torch.allclose(model.head(features).softmax(-1), expected, atol=1e-4)

    # what the checkpoint holds predicts the same
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["tlmodules"]["head_fitted_step"] == 9
    restored = FineTuneModule.load_from_checkpoint(checkpoint, weights_only=True)
    restored.eval()
    few_label_data.setup("test")
    batch = next(iter(few_label_data.test_dataloader()))
    with torch.no_grad():
        assert torch.allclose(restored(batch["inputs"]), model.eval()(batch["inputs"]), atol=1e-5)


def test_contrastive_separates_the_classes_of_the_training_sentences(
    tiny_hf_dir: Path, few_label_data: TextClassificationDataModule, tmp_path: Path
) -> None:
    """The point of the stage: same-class training features end closer together than before, relative to
    different-class ones."""
    model = contrastive_model(tiny_hf_dir)
    few_label_data.setup("fit")

    def margin() -> float:
        features, labels = training_features(model, few_label_data)
        cos = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
        return float(cos[same].mean() - cos[labels[:, None] != labels[None, :]].mean())

    before = margin()
    make_trainer(max_steps=30, max_epochs=None, default_root_dir=tmp_path).fit(model, datamodule=few_label_data)
    assert margin() > before + 0.1, (before, margin())


def test_contrastive_stop_gap_ends_the_fit_once_the_training_loss_nears_its_floor(
    tiny_hf_dir: Path, few_label_data: TextClassificationDataModule, tmp_path: Path
) -> None:
    """24 sentences in batches of 8: three steps an epoch. The logged gap is the epoch's loss minus its floor; the
    fit stops after the first epoch whose gap is at most ``contrastive_stop_gap``, and not before."""

    def recording_gaps(model: FineTuneModule) -> list[float]:
        gaps: list[float] = []
        original = model.on_train_epoch_means

        def record(means: dict[str, torch.Tensor]) -> None:
            gaps.append(float(means["train/contrastive_gap"]))
            original(means)

        model.on_train_epoch_means = record
        return gaps

    torch.manual_seed(0)  # the same draws (dropout, batch order) for both runs
    free = contrastive_model(tiny_hf_dir)
    gaps = recording_gaps(free)
    floors: list[float] = []
    floor = free.contrastive_loss.floor

    def recording_floor(labels: torch.Tensor, classes: int) -> torch.Tensor:
        value = floor(labels, classes)
        floors.append(float(value))
        return value

    free.contrastive_loss.floor = recording_floor
    trainer = make_trainer(max_epochs=8, default_root_dir=tmp_path)
    trainer.fit(free, datamodule=few_label_data)
    assert len(gaps) == 8 and all(g > 0 for g in gaps) and gaps[-1] < gaps[0], gaps
    # the last epoch's gap: its mean loss minus the mean floor of its three (equal) batches, two classes each
    assert len(floors) == 24 and all(1.0 < f < math.log(7) + 1e-6 for f in floors[-3:]), floors[-3:]
    epoch_loss = float(trainer.callback_metrics["train/contrastive_loss_epoch"])
    assert gaps[-1] == pytest.approx(epoch_loss - sum(floors[-3:]) / 3, abs=1e-5)
    threshold = (gaps[2] + gaps[3]) / 2 if gaps[3] < gaps[2] else gaps[3]
    first_below = next(i for i, g in enumerate(gaps) if g <= threshold)

    torch.manual_seed(0)
    stopped = FineTuneModule(
        backbone=f"hf:{tiny_hf_dir}",
        strategy="contrastive",
        lr=1e-3,
        lr_schedule="constant",
        contrastive_stop_gap=threshold,
    )
    stopped_gaps = recording_gaps(stopped)
    trainer = make_trainer(max_epochs=8, default_root_dir=tmp_path)
    trainer.fit(stopped, datamodule=few_label_data)
    assert stopped_gaps == pytest.approx(gaps[: first_below + 1], abs=1e-6), "the same run, cut short"
    assert trainer.global_step == 3 * (first_below + 1)
    assert stopped._head_fitted_step == trainer.global_step, "the head is fitted on the backbone the stop leaves"

    # min_steps still holds the fit
    held = FineTuneModule(
        backbone=f"hf:{tiny_hf_dir}",
        strategy="contrastive",
        lr=1e-3,
        lr_schedule="constant",
        contrastive_stop_gap=1e6,
    )
    trainer = make_trainer(max_epochs=8, min_steps=5, default_root_dir=tmp_path)
    trainer.fit(held, datamodule=few_label_data)
    assert trainer.global_step == 5  # Lightning ends the fit mid-epoch once min_steps is met
    with pytest.raises(ConfigError, match="contrastive_stop_gap"):
        FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", contrastive_stop_gap=0.0)


def test_contrastive_refits_the_head_before_each_validation(tiny_hf_dir: Path, make_text_file, tmp_path: Path) -> None:
    data = sentences(tiny_hf_dir, make_text_file, val_file=make_text_file("val.tsv", n=10, seed=2))
    model = contrastive_model(tiny_hf_dir)
    fitted_at: list[int] = []
    original = model.fit_contrastive_head

    def recording() -> int:
        fitted_at.append(model.trainer.global_step)
        return original()

    model.fit_contrastive_head = recording
    make_trainer(max_epochs=2, num_sanity_val_steps=1, default_root_dir=tmp_path).fit(model, datamodule=data)
    # once per epoch (validation and the epoch's end share the fit); not for the sanity check
    assert fitted_at == [3, 6]


@pytest.mark.parametrize("class_weight", ["balanced", None])
def test_contrastive_head_follows_contrastive_class_weight(
    class_weight: str | None, tiny_hf_dir: Path, make_text_file, tmp_path: Path
) -> None:
    """On 18 sentences of one class and 4 of the other the head is scikit-learn's logistic regression with the
    module's class weights, on the final training features."""
    table = make_text_file("all.tsv", n=36).read_text().splitlines()
    rare = [line for line in table[1:] if line.endswith("\tpos")][:4]
    (tmp_path / "train.tsv").write_text("\n".join([table[0], *[x for x in table[1:] if x.endswith("\tneg")], *rare]))
    data = TextClassificationDataModule(
        train_file=str(tmp_path / "train.tsv"), backbone=f"hf:{tiny_hf_dir}", max_length=16, batch_size=8
    )
    model = FineTuneModule(
        backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", lr=1e-3, contrastive_class_weight=class_weight
    )
    make_trainer(max_steps=2, max_epochs=None, default_root_dir=tmp_path).fit(model, datamodule=data)
    features, labels = training_features(model, data)
    assert labels.tolist().count(1) == 4 and labels.tolist().count(0) == 18
    x = F.normalize(features, dim=-1).double().numpy()
    for weight in ("balanced", None):
        reference = LogisticRegression(max_iter=2000, class_weight=weight).fit(x, labels.numpy())
        expected = torch.from_numpy(reference.predict_proba(x)).float()
        matches = torch.allclose(model.head(features).softmax(-1), expected, atol=1e-4)
        assert matches == (weight == class_weight)


def test_contrastive_needs_a_linear_head_and_a_datamodule(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="head: linear"):
        FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", head="mlp")
    with pytest.raises(ConfigError, match="contrastive_temperature"):
        FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", contrastive_temperature=0.0)
    with pytest.raises(ConfigError, match="contrastive_class_weight must be 'balanced' or null"):
        FineTuneModule(backbone=f"hf:{tiny_hf_dir}", strategy="contrastive", contrastive_class_weight="inverse")
    model = FineTuneModule(backbone="builtin:lenet", weights="none", strategy="contrastive", num_classes=2)
    images = torch.randn(8, 3, 28, 28)
    loader = torch.utils.data.DataLoader([{"inputs": x, "labels": i % 2} for i, x in enumerate(images)], batch_size=4)
    with pytest.raises(ConfigError, match="datamodule"):
        make_trainer(max_steps=1, default_root_dir=tmp_path).fit(model, train_dataloaders=loader)


def test_contrastive_works_on_an_image_backbone(make_image_folder, tmp_path: Path) -> None:
    from datamodules import ImageFolderDataModule

    data = ImageFolderDataModule(
        train_dir=str(make_image_folder(per_class=6)), backbone="builtin:lenet", weights="none", batch_size=6
    )
    model = FineTuneModule(backbone="builtin:lenet", weights="none", strategy="contrastive", lr=1e-3)
    make_trainer(max_steps=4, max_epochs=None, default_root_dir=tmp_path).fit(model, datamodule=data)
    assert model.head_fit_samples == data.training_size() and model._head_fitted_step == 4
    assert math.isfinite(float(model.head.net[-1].weight.abs().sum()))


def test_the_run_summary_says_why_a_small_fit_has_no_validation(
    tiny_hf_dir: Path, few_label_data: TextClassificationDataModule, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from lightning.pytorch.loggers import TensorBoardLogger

    from tlmodules.summary import SUMMARY_FILE, RunSummary

    trainer = make_trainer(
        max_steps=2,
        logger=TensorBoardLogger(tmp_path, name="few"),
        callbacks=[RunSummary()],
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(contrastive_model(tiny_hf_dir), datamodule=few_label_data)
    note = json.loads((Path(trainer.log_dir) / SUMMARY_FILE).read_text())["validation_note"]
    assert "24 training samples" in note and "val_fraction" in note
    assert f"Note: {note}." in capsys.readouterr().out
    # the note says it once, with the fix; Lightning's "is this your intention?" about the empty loader list is not
    # repeated beside it, and no validation ran
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
    assert sum(trainer.num_val_batches) == 0
