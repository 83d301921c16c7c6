"""The TF-IDF + logistic-regression baseline beside text runs (tlmodules/baseline.py).

Most tests use ``BaselineText``: the text datamodule with the baseline protocol (a ``baseline`` hyperparameter and
``split_texts``) of its own, so they test the callback whatever the real datamodule's state; the tests marked
``real`` run the real ``TextClassificationDataModule`` and are skipped while it has no ``split_texts``. Every
logged value is compared with a scikit-learn fit written out here, on the split the datamodule reports.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import Subset

from datamodules import DomainAdaptationDataModule, TextClassificationDataModule
from tlmodules import DANNModule, FeatureProbeModule, FineTuneModule
from tlmodules.baseline import TfidfBaseline, baseline_plan, baseline_scores, fit_baseline, wants_baseline
from tlmodules.classification import classification_metrics
from tlmodules.summary import SUMMARY_FILE, RunSummary, format_table

BASELINE_NAMES = {"val/baseline/acc", "val/baseline/f1_macro", "train/baseline/fit_seconds"}
HAS_REAL_SPLIT_TEXTS = callable(getattr(TextClassificationDataModule, "split_texts", None))
real = pytest.mark.skipif(not HAS_REAL_SPLIT_TEXTS, reason="TextClassificationDataModule has no split_texts yet")


# -- data ----------------------------------------------------------------------------------------------------------
def write_texts(path: Path, n: int, seed: int, flip: float = 0.3, permute_labels: bool = False) -> Path:
    """``text,label`` rows whose cue word ("good"… / "bad"…) agrees with the label in ``1 - flip`` of them, so that
    no classifier is perfect and two different fits rarely score alike; ``permute_labels`` shuffles the label
    column (same texts, same label counts)."""
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    texts = []
    for label in labels:
        cue = POSITIVE if (label == 1) != (rng.random() < flip) else NEGATIVE
        words = [*rng.sample(FILLER, 3), rng.choice(cue), rng.choice(POSITIVE + NEGATIVE + FILLER)]
        rng.shuffle(words)
        texts.append(" ".join(words))
    if permute_labels:
        random.Random(seed + 1).shuffle(labels)
    rows = [f"{text},{('neg', 'pos')[label]}" for text, label in zip(texts, labels)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


class BaselineText(TextClassificationDataModule):
    """The text datamodule with a baseline protocol of its own: ``hparams["baseline"]`` and ``split_texts`` (the
    texts and label indices of a split after ``setup``, the seeded validation share taken out of ``train``)."""

    def __init__(self, baseline: str = "tfidf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hparams["baseline"] = baseline

    def split_texts(self, split: str) -> tuple[list[str], list[int]]:
        dataset = self.datasets[split]
        base, rows = (
            (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, range(len(dataset)))
        )
        table = self.tables["train" if split == "val" and "val" not in self.tables else split]
        texts = table.column(self.hparams.text_column, "text")
        return [str(texts[i]) for i in rows], [base.labels[i] for i in rows]


def text_data(model_dir: Path, cls: type = BaselineText, **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"backbone": f"hf:{model_dir}", "batch_size": 8, "val_fraction": 0.25, "max_length": 16, **kwargs}
    return cls(**{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})


def finetune(model_dir: Path) -> FineTuneModule:
    pl.seed_everything(0)
    return FineTuneModule(backbone=f"hf:{model_dir}", num_classes=2, lr=1e-3)


def independent_scores(train: tuple[list[str], list[int]], evaluated: tuple[list[str], list[int]]) -> dict:
    """The documented baseline, written out: word 1-2-gram TF-IDF (sublinear, min_df=2) and a logistic
    regression fitted on ``train``, scored on ``evaluated``."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    classifier = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform(train[0]), train[1])
    predicted = classifier.predict(vectorizer.transform(evaluated[0]))
    return {
        "acc": accuracy_score(evaluated[1], predicted),
        "f1_macro": f1_score(evaluated[1], predicted, average="macro", zero_division=0),
    }


def logged(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


# -- which runs get a baseline ---------------------------------------------------------------------------------------
def stub(baseline: str | None = "tfidf", texts: bool = True) -> SimpleNamespace:
    hparams = {} if baseline is None else {"baseline": baseline}
    return SimpleNamespace(hparams=hparams, **({"split_texts": lambda split: ([], [])} if texts else {}))


def test_only_text_data_that_asks_gets_a_baseline() -> None:
    text = stub()
    assert baseline_plan(text) == (text, [("", text)])
    assert not wants_baseline(stub("none"))
    assert not wants_baseline(stub(None))  # image, token-level (CoNLL) and multi-task data have no such argument
    assert not wants_baseline(stub(texts=False))  # asks, but has no raw texts
    assert not wants_baseline(None)  # Trainer.fit with dataloaders


def test_a_domain_pair_is_fitted_on_its_source_and_evaluated_on_each_side_that_asks() -> None:
    source, target = stub(), stub()
    pair = SimpleNamespace(sides=lambda: [("source", source), ("target", target)])
    assert baseline_plan(pair) == (source, [("source/", source), ("target/", target)])
    quiet_target = SimpleNamespace(sides=lambda: [("source", source), ("target", stub("none"))])
    assert baseline_plan(quiet_target) == (source, [("source/", source)])
    assert not wants_baseline(SimpleNamespace(sides=lambda: [("source", stub("none")), ("target", target)]))
    assert not wants_baseline(SimpleNamespace(sides=lambda: [("target", target)]))  # nothing labelled to fit on


def test_the_callback_is_added_only_for_data_that_asks(tiny_hf_dir: Path, make_text_file) -> None:
    model = finetune(tiny_hf_dir)
    for baseline, added in (("tfidf", True), ("none", False)):
        trainer = make_trainer()
        trainer.datamodule = text_data(tiny_hf_dir, baseline=baseline, train_file=make_text_file())
        model.trainer = trainer
        assert any(isinstance(c, TfidfBaseline) for c in model.configure_callbacks()) is added


# -- the fitted pipeline ---------------------------------------------------------------------------------------------
def test_scores_follow_the_modules_accuracy_and_macro_f1() -> None:
    """Macro-F1 over the classes present in the labels or the predictions, as the modules' torchmetrics value."""
    texts = ["good food", "bad food", "good phone", "bad phone", "nice movie", "awful movie"]
    labels = [0, 1, 0, 1, 0, 1]
    pipeline = fit_baseline(texts, labels)
    evaluated = ["good", "bad", "food", "nice", "awful"]
    truth = [0, 1, 2, 0, 1]  # class 2 is never predicted
    scores = baseline_scores(pipeline, evaluated, truth)
    metrics = classification_metrics(3, "val/")
    metrics.update(
        torch.nn.functional.one_hot(torch.as_tensor(pipeline.predict(evaluated)), 3).float(), torch.tensor(truth)
    )
    reference = {k.removeprefix("val/"): float(v) for k, v in metrics.compute().items()}
    assert scores == pytest.approx(reference)


def test_a_tiny_training_set_keeps_every_ngram() -> None:
    """With no n-gram in two texts, min_df=2 would leave nothing; the fit falls back to min_df=1."""
    pipeline = fit_baseline(["good food", "bad phone"], [1, 0])
    assert pipeline.named_steps["tfidf"].min_df == 1
    assert list(pipeline.predict(["good", "bad"])) == [1, 0]
    assert fit_baseline(["good food", "good phone", "bad phone"], [1, 1, 0]).named_steps["tfidf"].min_df == 2


def test_nothing_is_fitted_or_logged_during_the_sanity_check() -> None:
    calls = []
    datamodule = SimpleNamespace(hparams={"baseline": "tfidf"}, split_texts=lambda split: calls.append(split))
    trainer = SimpleNamespace(sanity_checking=True, datamodule=datamodule)
    module = SimpleNamespace(log=lambda *args, **kwargs: calls.append(args))
    TfidfBaseline().on_validation_epoch_end(trainer, module)
    assert calls == []


def test_a_single_class_training_split_is_skipped_with_a_warning() -> None:
    datamodule = SimpleNamespace(hparams={"baseline": "tfidf"}, split_texts=lambda split: (["good", "nice"], [1, 1]))
    trainer = SimpleNamespace(sanity_checking=False, datamodule=datamodule, state=SimpleNamespace(fn="fit"))
    calls = []
    with pytest.warns(UserWarning, match="two or more classes"):
        TfidfBaseline().on_validation_epoch_end(trainer, SimpleNamespace(log=lambda *a, **k: calls.append(a)))
    assert calls == []


# -- runs ----------------------------------------------------------------------------------------------------------
def test_a_run_logs_the_baseline_of_its_training_split_at_validation_and_test(
    tmp_path: Path, tiny_hf_dir: Path, one_thread: None
) -> None:
    data = text_data(
        tiny_hf_dir,
        train_file=write_texts(tmp_path / "train.csv", 96, 0),
        test_file=write_texts(tmp_path / "t.csv", 40, 1),
    )
    model = finetune(tiny_hf_dir)
    summary = RunSummary(compare=False)
    trainer = make_trainer(logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[summary])
    trainer.fit(model, datamodule=data)
    assert sum(isinstance(c, TfidfBaseline) for c in trainer.callbacks) == 1

    train, val = data.split_texts("train"), data.split_texts("val")
    assert len(train[0]) == len(data.datasets["train"]) == 72 and len(val[0]) == 24  # the seeded split
    expected = independent_scores(train, val)
    assert 0.5 < expected["acc"] < 1.0  # noisy data: a wrong split or wrong settings would show
    assert logged(trainer, "val/baseline/") == pytest.approx(expected)
    assert independent_scores((train[0] + val[0], train[1] + val[1]), val) != pytest.approx(expected)
    assert float(trainer.callback_metrics["train/baseline/fit_seconds"]) >= 0.0

    # the run summary (the CLI's closing table and summary.json) and TensorBoard hold it
    log_dir = Path(trainer.log_dir)
    metrics = summary.summary(trainer, model)["metrics"]
    assert metrics["val/baseline/acc"] == pytest.approx(expected["acc"])
    assert "val/baseline/acc" in format_table([("run", summary.summary(trainer, model))], "run")
    assert '"val/baseline/acc"' in (log_dir / SUMMARY_FILE).read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert BASELINE_NAMES <= set(events.Tags()["scalars"])
    assert events.Scalars("val/baseline/acc")[-1].value == pytest.approx(expected["acc"])

    results = trainer.test(model, datamodule=data, verbose=False)[0]
    expected_test = independent_scores(train, data.split_texts("test"))
    assert {k: results[f"test/baseline/{k}"] for k in expected_test} == pytest.approx(expected_test)
    assert "train/baseline/fit_seconds" not in results
    assert "test/acc" in results  # next to the model's own


def test_the_baseline_leaves_the_model_its_weights_and_its_metrics(
    tmp_path: Path, tiny_hf_dir: Path, one_thread: None
) -> None:
    train_file = write_texts(tmp_path / "train.csv", 64, 0)
    runs = {}
    for baseline in ("tfidf", "none"):
        data = text_data(tiny_hf_dir, baseline=baseline, train_file=train_file)
        model = finetune(tiny_hf_dir)
        trainer = make_trainer(max_epochs=2)
        trainer.fit(model, datamodule=data)
        runs[baseline] = (model.state_dict(), trainer)
    (with_weights, with_trainer), (without_weights, without_trainer) = runs["tfidf"], runs["none"]
    assert list(with_weights) == list(without_weights)
    for name, value in with_weights.items():
        assert torch.equal(value, without_weights[name]), name
    model_metrics = {k: float(v) for k, v in without_trainer.callback_metrics.items()}
    assert {k: float(with_trainer.callback_metrics[k]) for k in model_metrics} == model_metrics
    # baseline: none logs nothing, and the tfidf run logs its three names on top of the same metrics
    assert not any("baseline" in name for name in model_metrics)
    assert not any(isinstance(c, TfidfBaseline) for c in without_trainer.callbacks)
    assert set(with_trainer.callback_metrics) - set(model_metrics) == BASELINE_NAMES


def pair_run(tmp_path: Path, model_dir: Path, target_train: Path) -> tuple[pl.Trainer, list[str], BaselineText]:
    """One DANN epoch on a text pair; returns the trainer, the splits asked of the target, and the source."""
    spec = f"hf:{model_dir}"
    source = text_data(model_dir, train_file=write_texts(tmp_path / "source.csv", 64, 0))
    target = text_data(model_dir, train_file=target_train, val_file=write_texts(tmp_path / "target_val.csv", 24, 5))
    asked: list[str] = []
    split_texts = target.split_texts
    target.split_texts = lambda split: asked.append(split) or split_texts(split)
    data = DomainAdaptationDataModule(source, target, backbone=spec)
    pl.seed_everything(0)
    model = DANNModule(backbone=spec, num_classes=2, discriminator_hidden=16, projection_samples=0)
    trainer = make_trainer(limit_train_batches=4)
    trainer.fit(model, datamodule=data)
    return trainer, asked, source


def test_a_domain_pair_fits_on_the_source_and_never_reads_the_targets_training_labels(
    tmp_path: Path, tiny_hf_dir: Path, one_thread: None
) -> None:
    target_train = write_texts(tmp_path / "target_train.csv", 64, 3, flip=0.1)
    trainer, asked, source = pair_run(tmp_path, tiny_hf_dir, target_train)
    assert "train" not in asked and "val" in asked
    train = source.split_texts("train")
    target_val = trainer.datamodule.target.split_texts("val")
    for role, evaluated in (("source", source.split_texts("val")), ("target", target_val)):
        assert logged(trainer, f"val/{role}/baseline/") == pytest.approx(independent_scores(train, evaluated))
        assert f"val/{role}/acc" in trainer.callback_metrics  # next to the module's own per-domain metrics
    assert "val/baseline/acc" not in trainer.callback_metrics

    # the target's training labels shuffled: the same baseline values
    shuffled = write_texts(tmp_path / "target_train_shuffled.csv", 64, 3, flip=0.1, permute_labels=True)
    assert shuffled.read_text() != target_train.read_text()
    again, _, _ = pair_run(tmp_path, tiny_hf_dir, shuffled)
    for role in ("source", "target"):
        assert logged(again, f"val/{role}/baseline/") == logged(trainer, f"val/{role}/baseline/")


def test_the_summarys_chosen_metrics_bring_their_baseline_along() -> None:
    values = {"val/source/acc": 0.7, "val/target/acc": 0.6, "val/target/baseline/acc": 0.55, "val/loss": 0.3}
    trainer = SimpleNamespace(callback_metrics={k: torch.tensor(v) for k, v in values.items()}, datamodule=None)
    trainer.global_step = 3
    module = SimpleNamespace(hparams={})
    summary = RunSummary(metrics=["val/source/acc", "val/target/acc"]).summary(trainer, module)
    assert summary["metrics"] == pytest.approx(
        {"val/source/acc": 0.7, "val/target/acc": 0.6, "val/target/baseline/acc": 0.55}
    )
    assert list(summary["metrics"]) == ["val/source/acc", "val/target/acc", "val/target/baseline/acc"]


# -- the real text datamodule --------------------------------------------------------------------------------------
@real
@pytest.mark.parametrize("technique", ["finetune", "probe"])
def test_the_real_text_datamodule_gets_its_baseline(
    tmp_path: Path, tiny_hf_dir: Path, technique: str, one_thread: None
) -> None:
    data = text_data(
        tiny_hf_dir, cls=TextClassificationDataModule, train_file=write_texts(tmp_path / "train.csv", 96, 0)
    )
    assert data.hparams["baseline"] == "tfidf"  # the default
    if technique == "finetune":
        model = finetune(tiny_hf_dir)
    else:
        pl.seed_everything(0)
        model = FeatureProbeModule(backbone=f"hf:{tiny_hf_dir}", num_classes=2, cache_features=False)
    trainer = make_trainer()
    trainer.fit(model, datamodule=data)
    train, val = data.split_texts("train"), data.split_texts("val")
    assert len(train[0]) == len(data.datasets["train"]) and len(val[0]) == len(data.datasets["val"])
    assert logged(trainer, "val/baseline/") == pytest.approx(independent_scores(train, val))
    assert "val/acc" in trainer.callback_metrics


@real
def test_baseline_none_on_the_real_text_datamodule_logs_nothing(tmp_path: Path, tiny_hf_dir: Path) -> None:
    data = text_data(
        tiny_hf_dir,
        cls=TextClassificationDataModule,
        baseline="none",
        train_file=write_texts(tmp_path / "t.csv", 32, 0),
    )
    assert not wants_baseline(data)


@real
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_the_cli_summary_table_shows_the_baseline_and_test_of_a_checkpoint_skips_it(
    tmp_path: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlmodules.cli import main

    monkeypatch.chdir(tmp_path)
    common = [
        *("--model", "tlmodules.FineTuneModule", "--model.init_args.backbone", f"hf:{tiny_hf_dir}"),
        *("--data", "datamodules.TextClassificationDataModule", "--data.init_args.batch_size", "8"),
        *("--data.init_args.train_file", str(write_texts(tmp_path / "train.csv", 48, 0))),
        *("--data.init_args.test_file", str(write_texts(tmp_path / "test.csv", 16, 1))),
        *("--data.init_args.val_fraction", "0.25"),  # 48 texts: no validation split unless asked
        *("--trainer.accelerator", "cpu", "--trainer.max_epochs", "1"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
    ]
    cli = main(args=["fit", *common])
    table = capsys.readouterr().out.split("Run summary")[-1]
    header, row = [line for line in table.splitlines() if line.strip()][1:3]
    assert "val/baseline/acc" in header.split() and "val/baseline/f1_macro" in header.split()
    assert f"{float(cli.trainer.callback_metrics['val/baseline/acc']):.4f}" in row.split()

    # train.py test of the checkpoint drops the training data: no baseline, silently
    last = tmp_path / "runs" / "tlmodules" / "version_0" / "checkpoints" / "last.ckpt"
    cli = main(args=["test", *common, "--ckpt_path", str(last)])
    assert "test/acc" in cli.trainer.callback_metrics
    assert not any("baseline" in name for name in cli.trainer.callback_metrics)
