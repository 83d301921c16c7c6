"""A cheap baseline beside every text run: TF-IDF word n-grams and a logistic regression fitted on the run's own
training split, so a user sees on their own data whether transfer pays."""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline

BASELINE = "tfidf"  # the datamodule's ``baseline`` value that asks for this callback

# Every process fits the same texts deterministically, so the values agree without a reduction; Lightning's
# advice to synchronise epoch-level values under DDP does not apply to them.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('[^']*baseline/", category=PossibleUserWarning
)


def asks_for_baseline(datamodule: Any) -> bool:
    """Whether a datamodule has raw texts (``split_texts``) and asks for the baseline (``baseline: tfidf``)."""
    hparams = getattr(datamodule, "hparams", None) or {}
    return hparams.get("baseline") == BASELINE and callable(getattr(datamodule, "split_texts", None))


def baseline_plan(datamodule: Any) -> tuple[Any | None, list[tuple[str, Any]]]:
    """``(the datamodule whose training split is fitted, [(metric prefix, datamodule evaluated), ...])``.

    A text datamodule is fitted on and evaluated with no prefix (``val/baseline/acc``). A domain pair (a
    datamodule with ``sides()``) is fitted on its source's training split and evaluated on each side that asks
    for the baseline (``val/source/baseline/acc``, ``val/target/baseline/acc``); the target's training split is
    never read. ``(None, [])`` when nothing asks for a baseline (image data, token-level data, multi-task data,
    ``baseline: none``)."""
    sides = getattr(datamodule, "sides", None)
    if callable(sides):
        pairs = dict(sides())
        source = pairs.get("source")
        if not asks_for_baseline(source):
            return None, []
        return source, [(f"{role}/", side) for role, side in pairs.items() if asks_for_baseline(side)]
    if asks_for_baseline(datamodule):
        return datamodule, [("", datamodule)]
    return None, []


def wants_baseline(datamodule: Any) -> bool:
    """Whether a run on ``datamodule`` gets a :class:`TfidfBaseline`."""
    return baseline_plan(datamodule)[0] is not None


def tfidf_pipeline(min_df: int = 2) -> Pipeline:
    """TF-IDF of word 1- and 2-grams (sublinear term frequencies; n-grams in fewer than ``min_df`` training texts
    dropped) feeding a multinomial logistic regression (L2, ``C=1``).

    ``min_df=2``: an n-gram seen in one training text is no evidence about others, and dropping them shrinks the
    vocabulary several times over (a faster fit) at no cost in accuracy from a few thousand texts up
    (bench/README.md, "Text baseline", has the comparison with ``min_df=1``)."""
    return Pipeline(
        [
            ("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df)),
            ("classifier", LogisticRegression(max_iter=1000)),
        ]
    )


def labelled_texts(datamodule: Any, split: str) -> tuple[list[str], list[int]]:
    """The texts of ``split`` that carry a label and their label indices; empty when the datamodule has no such
    split (``has_split``) or none of its texts is labelled."""
    has_split = getattr(datamodule, "has_split", None)
    if callable(has_split) and not has_split(split):
        return [], []
    texts, labels = datamodule.split_texts(split)
    kept = [(text, int(label)) for text, label in zip(texts, labels) if int(label) >= 0]
    return [t for t, _ in kept], [y for _, y in kept]


def fit_baseline(texts: list[str], labels: list[int]) -> Pipeline:
    """:func:`tfidf_pipeline` fitted on ``texts``; a training set so small that no n-gram occurs in two texts
    keeps every n-gram instead (``min_df=1``)."""
    try:
        return tfidf_pipeline(min_df=2).fit(texts, labels)
    except ValueError as error:  # "After pruning, no terms remain" / "empty vocabulary"
        if "terms remain" not in str(error) and "empty vocabulary" not in str(error):
            raise
        return tfidf_pipeline(min_df=1).fit(texts, labels)


def baseline_scores(pipeline: Pipeline, texts: list[str], labels: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in the labels or the predictions, as the modules'
    ``f1_macro``) of the fitted pipeline on ``texts``."""
    predicted = pipeline.predict(texts)
    return {
        "acc": float(accuracy_score(labels, predicted)),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


class TfidfBaseline(pl.Callback):
    """A TF-IDF + logistic-regression baseline logged next to the model's metrics.

    **Why.** Transfer learning is worth its cost only where it beats a cheap classical model; on short, keyword
    driven texts a bag of n-grams is often close. This callback puts that answer in every text run.

    **What.** At the first evaluation end of a ``fit`` / ``validate`` / ``test`` call (never during the sanity
    check) it fits :func:`tfidf_pipeline` (word 1- and 2-gram TF-IDF, sublinear term frequencies, ``min_df=2``,
    or 1 when no n-gram occurs twice, and a logistic regression) on the training split the model trains on
    (``split_texts("train")``, the seeded validation share held out). It then logs ``val/baseline/acc`` and
    ``val/baseline/f1_macro`` at each validation end, ``test/baseline/acc`` and ``test/baseline/f1_macro`` at the
    test end, and, in ``fit``, ``train/baseline/fit_seconds`` once. The values cover the whole split
    (``limit_val_batches`` does not apply to them). A domain pair is fitted on the source's training texts and
    labels only and logs ``val/source/baseline/…`` and ``val/target/baseline/…``: the target's training split is
    never read. Every process fits the same data deterministically, so the values agree under DDP and are logged
    without synchronisation. The model, its weights, its random stream and its metrics are untouched.

    **When.** :class:`tlmodules.base.TransferModule` adds it (``configure_callbacks``) when the datamodule, or the
    source side of a domain pair, has ``split_texts`` and ``baseline: tfidf`` (the text datamodule's default);
    ``baseline: none`` turns it off. ``validate`` and ``test`` fit it when the datamodule has training texts
    (``trainer.validate`` / ``trainer.test`` in Python on a datamodule with a ``train_file``); a call without a
    training split (``train.py test`` of a checkpoint drops the training data) skips it silently, and so does
    training data of a single class (with a warning).

    **Cost.** One scikit-learn fit per ``fit`` / ``validate`` / ``test`` call, on the CPU, in the process that
    trains, before the first validation's values are logged: under a second for ten thousand sentences, a few
    seconds for thousands of long reviews. Each evaluated split is predicted once and its scores cached, so later
    validations cost nothing.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.pipeline: Pipeline | None = None
        self._fitted = False  # tried, whether or not there was anything to fit
        self._fit_seconds: float | None = None  # logged once, then None
        self._scores: dict[tuple[str, str], dict[str, float] | None] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reset()

    def fit(self, trainer: pl.Trainer) -> Pipeline | None:
        """The fitted pipeline, fitted on first use; ``None`` when there are no labelled training texts or they
        hold a single class."""
        if self._fitted:
            return self.pipeline
        self._fitted = True
        datamodule, _ = baseline_plan(trainer.datamodule)
        texts, labels = labelled_texts(datamodule, "train") if datamodule is not None else ([], [])
        if not texts:
            return None
        if len(set(labels)) < 2:
            rank_zero_warn(
                "the TF-IDF baseline needs two or more classes in the training split; it is not logged",
                category=PossibleUserWarning,
            )
            return None
        start = time.perf_counter()
        self.pipeline = fit_baseline(texts, labels)
        self._fit_seconds = time.perf_counter() - start
        return self.pipeline

    def scores(self, stage: str, prefix: str, datamodule: Any) -> dict[str, float] | None:
        """The baseline's metrics on ``datamodule``'s ``stage`` split, computed once and cached."""
        key = (stage, prefix)
        if key not in self._scores:
            texts, labels = labelled_texts(datamodule, stage)
            self._scores[key] = baseline_scores(self.pipeline, texts, labels) if texts else None
        return self._scores[key]

    def log_baseline(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.fit(trainer) is None:
            return
        if trainer.state.fn == TrainerFn.FITTING and self._fit_seconds is not None:
            pl_module.log("train/baseline/fit_seconds", self._fit_seconds, sync_dist=False)
            self._fit_seconds = None
        for prefix, datamodule in baseline_plan(trainer.datamodule)[1]:
            for name, value in (self.scores(stage, prefix, datamodule) or {}).items():
                pl_module.log(f"{stage}/{prefix}baseline/{name}", value, sync_dist=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_baseline(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_baseline(trainer, pl_module, "test")
