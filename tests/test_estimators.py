"""scikit-learn estimators for the feature probe: construction, tensor heads, scores, guarded pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.svm import SVC, LinearSVC

from tlmodules.estimators import (
    ESTIMATORS,
    estimator_scores,
    fit_estimator,
    is_linear,
    linear_head_parameters,
    load_pickled_estimator,
    make_estimator,
    save_pickled_estimator,
)


def make_data(num_classes: int, keep: list[int] | None = None, n: int = 400, features: int = 8):
    """Seeded train/test tensors; ``keep`` drops the other classes from the training split only."""
    x, y = make_classification(
        n_samples=n,
        n_features=features,
        n_informative=5,
        n_redundant=0,
        n_classes=num_classes,
        n_clusters_per_class=1,
        random_state=0,
    )
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    x_train, y_train, x_test = x[: n // 2], y[: n // 2], x[n // 2 :]
    if keep is not None:
        mask = torch.isin(y_train, torch.tensor(keep))
        x_train, y_train = x_train[mask], y_train[mask]
    return x_train, y_train, x_test


def sk_predict(estimator, x: torch.Tensor) -> np.ndarray:
    return np.asarray(estimator.predict(x.double().numpy()))


# -- make_estimator ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("logistic_regression", LogisticRegression),
        ("linear_svm", LinearSVC),
        ("rbf_svm", SVC),
        ("random_forest", RandomForestClassifier),
    ],
)
def test_short_names_build_their_class_with_the_seed(name: str, cls: type) -> None:
    assert ESTIMATORS[name] == f"{cls.__module__.split('._')[0]}.{cls.__name__}"
    estimator = make_estimator(name, seed=7)
    assert type(estimator) is cls
    assert estimator.random_state == 7
    if name == "rbf_svm":
        assert estimator.kernel == "rbf"


def test_class_path_defaults_and_overrides() -> None:
    ridge = make_estimator("sklearn.linear_model.RidgeClassifier", {"alpha": 3.0}, seed=5)
    assert type(ridge) is RidgeClassifier and ridge.alpha == 3.0 and ridge.random_state == 5
    assert make_estimator("logistic_regression").max_iter == 2000
    # defaults follow the class, also when it is named by its full path; args override defaults and the seed
    lr = make_estimator("sklearn.linear_model.LogisticRegression", {"max_iter": 50, "random_state": 1}, seed=9)
    assert lr.max_iter == 50 and lr.random_state == 1
    assert make_estimator("sklearn.linear_model.LogisticRegression").max_iter == 2000
    assert make_estimator("linear_svm").dual == "auto"


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unknown estimator 'xgboost'") as info:
        make_estimator("xgboost")
    for name in ESTIMATORS:
        assert name in str(info.value)


def test_unimportable_path_and_non_classifier_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot import module 'nosuchpkg.mod'"):
        make_estimator("nosuchpkg.mod.Classifier")
    with pytest.raises(ValueError, match="has no class 'NoSuchClassifier'"):
        make_estimator("sklearn.linear_model.NoSuchClassifier")
    with pytest.raises(ValueError, match="LinearRegression is not a scikit-learn classifier"):
        make_estimator("sklearn.linear_model.LinearRegression")


def test_bad_argument_is_named_with_the_class() -> None:
    with pytest.raises(ValueError, match=r"LogisticRegression .* does not accept argument\(s\) \['n_trees'\]"):
        make_estimator("logistic_regression", {"n_trees": 10, "C": 0.5})


# -- fit_estimator -------------------------------------------------------------------------------------------
def test_fit_refuses_a_single_class_and_bad_shapes() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="only class 2.*at least 2 classes"):
        fit_estimator(make_estimator("logistic_regression"), x, torch.full((10,), 2))
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        fit_estimator(make_estimator("logistic_regression"), x, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features must be \(N, F\)"):
        fit_estimator(make_estimator("logistic_regression"), x[0], torch.zeros(4, dtype=torch.long))
    fitted = fit_estimator(make_estimator("logistic_regression"), x, torch.arange(10) % 2)
    assert fitted.classes_.tolist() == [0, 1]


# -- linear heads --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "num_classes", "keep"),
    [
        ("logistic_regression", 4, None),
        ("logistic_regression", 2, None),
        ("logistic_regression", 4, [0, 1, 3]),  # class 2 missing from the training labels
        ("logistic_regression", 3, [0, 2]),  # binary fit inside a 3-class problem
        ("linear_svm", 3, None),
        ("linear_svm", 2, None),
        ("sklearn.linear_model.RidgeClassifier", 3, None),
        ("sklearn.linear_model.SGDClassifier", 3, [1, 2]),
    ],
)
def test_linear_head_reproduces_the_estimator(name: str, num_classes: int, keep: list[int] | None) -> None:
    x_train, y_train, x_test = make_data(num_classes, keep)
    estimator = fit_estimator(make_estimator(name), x_train, y_train)
    assert is_linear(estimator)
    weight, bias = linear_head_parameters(estimator, num_classes)
    assert weight.shape == (num_classes, x_train.shape[1]) and bias.shape == (num_classes,)
    assert weight.dtype == bias.dtype == torch.float32
    logits = x_test @ weight.T + bias
    predicted = sk_predict(estimator, x_test)
    assert len(set(predicted.tolist())) > 1
    np.testing.assert_array_equal(logits.argmax(dim=1).numpy(), predicted)
    missing = sorted(set(range(num_classes)) - set(estimator.classes_.tolist()))
    assert all(weight[c].abs().sum() == 0 and bias[c] == -1e4 for c in missing)
    if isinstance(estimator, LogisticRegression):
        probs = torch.softmax(logits, dim=1)
        expected = np.zeros((len(x_test), num_classes))
        expected[:, estimator.classes_] = estimator.predict_proba(x_test.double().numpy())
        np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
        assert all(probs[:, c].max() < 1e-6 for c in missing)


def test_non_linear_estimators_are_not_linear() -> None:
    x_train, y_train, _ = make_data(3)
    assert not is_linear(make_estimator("logistic_regression"))  # not fitted
    forest = fit_estimator(make_estimator("random_forest", {"n_estimators": 5}), x_train, y_train)
    assert not is_linear(forest)
    assert not is_linear(fit_estimator(make_estimator("rbf_svm"), x_train, y_train))
    # a multiclass linear-kernel SVC has one coef_ row per class pair (one-vs-one), not a linear head
    assert not is_linear(fit_estimator(make_estimator("rbf_svm", {"kernel": "linear"}), x_train, y_train))
    with pytest.raises(ValueError, match="not a fitted linear classifier.*save_pickled_estimator"):
        linear_head_parameters(forest, 3)


def test_linear_head_refuses_classes_out_of_range() -> None:
    x_train, y_train, _ = make_data(4)
    estimator = fit_estimator(make_estimator("logistic_regression"), x_train, y_train)
    with pytest.raises(ValueError, match=r"not class indices in range\(3\)"):
        linear_head_parameters(estimator, 3)


# -- scores --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "args", "num_classes", "keep"),
    [
        ("random_forest", {"n_estimators": 20}, 4, [0, 1, 3]),
        ("rbf_svm", {}, 4, [0, 1, 3]),  # no predict_proba: softmax of decision_function
        ("rbf_svm", {}, 3, [0, 2]),  # binary decision_function scores s -> [-s/2, s/2]
        ("linear_svm", {}, 3, None),
    ],
)
def test_estimator_scores(name: str, args: dict, num_classes: int, keep: list[int] | None) -> None:
    x_train, y_train, x_test = make_data(num_classes, keep)
    estimator = fit_estimator(make_estimator(name, args), x_train, y_train)
    if name == "rbf_svm":
        assert not hasattr(estimator, "predict_proba")
    scores = estimator_scores(estimator, x_test, num_classes)
    assert scores.shape == (len(x_test), num_classes) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(len(x_test)))
    np.testing.assert_array_equal(scores.argmax(dim=1).numpy(), sk_predict(estimator, x_test))
    for c in set(range(num_classes)) - set(keep or range(num_classes)):
        assert scores[:, c].abs().max() == 0
    if isinstance(estimator, RandomForestClassifier):
        expected = estimator.predict_proba(x_test.double().numpy())
        np.testing.assert_allclose(scores[:, estimator.classes_].numpy(), expected, atol=1e-6)


# -- pickles -------------------------------------------------------------------------------------------------
class Malicious:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def write_malicious(path: Path, marker: Path) -> str:
    data = pickle.dumps(Malicious(marker))
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def forest() -> tuple[RandomForestClassifier, torch.Tensor]:
    x_train, y_train, x_test = make_data(3)
    return fit_estimator(make_estimator("random_forest", {"n_estimators": 5}), x_train, y_train), x_test


def test_pickle_round_trip(tmp_path: Path, forest) -> None:
    estimator, x_test = forest
    path, sha256 = save_pickled_estimator(estimator, tmp_path / "ckpt")
    assert path.name == f"estimator-{sha256[:12]}.pkl" and len(sha256) == 64
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(tmp_path / "ckpt") == [path.name]  # no temporary file left behind
    loaded = load_pickled_estimator(path, sha256, allow_pickle=True)
    np.testing.assert_array_equal(sk_predict(loaded, x_test), sk_predict(estimator, x_test))


def test_failed_save_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_pickled_estimator({"not picklable": lambda: 0}, tmp_path)
    assert os.listdir(tmp_path) == []


def test_malicious_pickle_does_not_run_without_opt_in(tmp_path: Path) -> None:
    path, marker = tmp_path / "estimator-0123456789ab.pkl", tmp_path / "pwned"
    sha256 = write_malicious(path, marker)
    with pytest.raises(PermissionError, match="unpickling runs code.*allow_pickle=True.*trust_pickled_estimator"):
        load_pickled_estimator(path, sha256)
    assert not marker.exists()
    load_pickled_estimator(path, sha256, allow_pickle=True)  # control: the file really does run code
    assert marker.exists()


def test_changed_file_is_refused_even_with_opt_in(tmp_path: Path, forest) -> None:
    path, sha256 = save_pickled_estimator(forest[0], tmp_path)
    marker = tmp_path / "pwned"
    write_malicious(path, marker)  # replaced after the checkpoint recorded its hash
    with pytest.raises(ValueError, match="the file changed since the checkpoint"):
        load_pickled_estimator(path, sha256, allow_pickle=True)
    assert not marker.exists()


def test_missing_pickle_is_named(tmp_path: Path) -> None:
    path = tmp_path / "estimator-000000000000.pkl"
    with pytest.raises(FileNotFoundError, match="estimator-000000000000.pkl"):
        load_pickled_estimator(path, "0" * 64, allow_pickle=True)
