"""scikit-learn classifiers fitted on cached feature tensors, and how their state is stored.

A feature probe fits a classical classifier on features ``(N, F)`` taken from a frozen backbone.
Two storage paths keep its checkpoint safe to load:

* **Linear estimators** (logistic regression, linear SVM, ridge, SGD, ...) become a weight
  ``(C, F)`` and a bias ``(C,)`` (:func:`linear_head_parameters`) that reproduce the estimator as
  ``logits = x @ weight.T + bias``. The checkpoint then holds only tensors and loads with
  ``torch.load(weights_only=True)``; no scikit-learn object is needed at inference.
* **Other estimators** (random forest, RBF SVM, ...) cannot be written as tensors. They are
  pickled next to the checkpoint (:func:`save_pickled_estimator`) and the checkpoint records the
  file's SHA-256. Unpickling runs code chosen by whoever wrote the file, so
  :func:`load_pickled_estimator` refuses unless the caller opts in (``allow_pickle=True``; the probe
  module's ``trust_pickled_estimator``), and even then it refuses a file whose hash differs from the
  recorded one, checking the bytes it is about to unpickle.

Labels are class indices ``0..C-1``. An estimator fitted on data that misses some classes has
``classes_`` a subset of ``range(C)``; the helpers here map its outputs back onto all ``C`` columns.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import is_classifier
from sklearn.linear_model._base import LinearClassifierMixin  # private module, stable since 0.22
from torch import Tensor

from tlmodules.errors import ConfigError, MissingFileError

ESTIMATORS: dict[str, str] = {
    "logistic_regression": "sklearn.linear_model.LogisticRegression",
    "linear_svm": "sklearn.svm.LinearSVC",
    "rbf_svm": "sklearn.svm.SVC",
    "random_forest": "sklearn.ensemble.RandomForestClassifier",
}

# Defaults by class path (so they also apply when the class is named by its full path); ``args`` override them.
DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    # lbfgs's default 100 iterations rarely converge on unscaled backbone features
    "sklearn.linear_model.LogisticRegression": {"max_iter": 2000},
    # "auto" picks the primal or dual problem from the data's shape (no FutureWarning, faster on N >> F)
    "sklearn.svm.LinearSVC": {"dual": "auto", "max_iter": 5000},
    # break_ties: predict then equals the argmax of decision_function, which estimator_scores softmaxes
    "sklearn.svm.SVC": {"kernel": "rbf", "break_ties": True},
}

MISSING_CLASS_BIAS = -1e4  # bias of a class absent from the training labels: never predicted, ~0 probability
PICKLE_PREFIX = "estimator-"


def _import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"estimator class path {path!r} is not of the form 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import module {module_name!r} for estimator {path!r} ({error}); install it or fix the path"
        ) from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"module {module_name!r} has no class {class_name!r}; check the estimator path {path!r}")
    if not isinstance(cls, type):
        raise ConfigError(f"estimator {path!r} is a {type(cls).__name__}, not a class")
    return cls


def make_estimator(name: str, args: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """An unfitted classifier from a short name in :data:`ESTIMATORS` or a class path ``"pkg.module.Class"``.

    ``args`` are keyword arguments for the constructor, applied over :data:`DEFAULT_ARGS`;
    ``random_state=seed`` is set when the class accepts it and ``args`` does not set it.
    """
    args = dict(args or {})
    if name in ESTIMATORS:
        path = ESTIMATORS[name]
    elif "." in name:
        path = name
    else:
        raise ConfigError(
            f"unknown estimator {name!r}; use one of {sorted(ESTIMATORS)} or a class path such as "
            "'sklearn.linear_model.RidgeClassifier'"
        )
    cls = _import_class(path)
    defaults = next((dict(v) for k, v in DEFAULT_ARGS.items() if k == path or _import_class(k) is cls), {})
    if args.get("decision_function_shape") == "ovo":  # SVC refuses break_ties with one-vs-one scores
        defaults.pop("break_ties", None)
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = {**defaults, **args}
    if "random_state" in parameters and "random_state" not in args:
        kwargs["random_state"] = seed
    try:
        estimator = cls(**kwargs)
    except TypeError as error:
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [key for key in args if parameters and not takes_any and key not in parameters]
        if unknown:
            accepted = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
            raise ConfigError(
                f"{cls.__name__} ({path}) does not accept argument(s) {unknown}; its arguments are: {accepted}"
            ) from error
        raise ConfigError(f"cannot build {cls.__name__} ({path}) with arguments {kwargs}: {error}") from error
    if not is_classifier(estimator):
        raise ConfigError(
            f"{path} is not a scikit-learn classifier (sklearn.base.is_classifier is false); a probe needs a "
            f"classifier, e.g. one of {sorted(ESTIMATORS)}"
        )
    return estimator


def _to_numpy_features(features: Tensor) -> np.ndarray:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {tuple(features.shape)}")
    return features.detach().to("cpu", torch.float64).numpy()


def fit_estimator(estimator: Any, features: Tensor, labels: Tensor) -> Any:
    """Fit ``estimator`` on features ``(N, F)`` (float, passed as float64) and labels ``(N,)`` (class indices).

    Returns the fitted estimator (the same object).
    """
    x = _to_numpy_features(features)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be (N,) = ({x.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{bad} of {x.shape[0]} feature rows contain NaN or inf; check the backbone's outputs")
    y = labels.detach().to("cpu", torch.int64).numpy()
    present = np.unique(y)
    if present.size < 2:
        found = f"only class {int(present[0])}" if present.size else "no samples"
        raise ValueError(
            f"cannot fit a classifier: the training labels hold {found}; a classifier needs at least 2 classes "
            "(check the training split and its label column)"
        )
    return estimator.fit(x, y)


def _class_indices(estimator: Any, num_classes: int) -> np.ndarray:
    """``estimator.classes_`` as integer column indices in ``range(num_classes)``."""
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise ValueError(f"{type(estimator).__name__} is not fitted (no classes_); fit it with fit_estimator first")
    classes = np.asarray(classes)
    if not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(
            f"{type(estimator).__name__}.classes_ = {classes.tolist()} are not class indices in range({num_classes}); "
            "fit it on integer labels 0..num_classes-1"
        )
    return classes.astype(np.int64)


def is_linear(estimator: Any) -> bool:
    """Whether a fitted ``estimator`` predicts ``argmax(x @ coef_.T + intercept_)`` (one row per class, or
    one row for two classes): LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier, ...

    That is scikit-learn's ``LinearClassifierMixin`` contract; only its subclasses qualify. Having ``coef_``
    is not enough: a multiclass ``SVC(kernel="linear")`` has one row per class *pair* (one-vs-one voting).
    """
    if not isinstance(estimator, LinearClassifierMixin):
        return False
    try:
        coef, intercept, classes = estimator.coef_, estimator.intercept_, estimator.classes_
    except AttributeError:  # unfitted, or e.g. SVC(kernel="rbf") whose coef_ property raises
        return False
    if not isinstance(coef, np.ndarray) or coef.ndim not in (1, 2):  # e.g. sparsified coef_
        return False
    coef = coef.reshape(1, -1) if coef.ndim == 1 else coef  # binary RidgeClassifier keeps a 1-d coef_
    rows = 1 if len(classes) == 2 else len(classes)
    return coef.shape[0] == rows and np.shape(intercept) in ((rows,), ())


def linear_head_parameters(estimator: Any, num_classes: int) -> tuple[Tensor, Tensor]:
    """Weight ``(num_classes, F)`` and bias ``(num_classes,)`` (float32) with ``logits = x @ weight.T + bias``.

    ``argmax(logits)`` equals ``estimator.predict(x)`` (up to float32 rounding at exact ties) and, for a
    multinomial LogisticRegression (scikit-learn's default), ``softmax(logits)`` equals ``predict_proba(x)``.
    Binary estimators (``coef_`` ``(1, F)``) get rows ``[0, w]`` and biases ``[0, b]``, so softmax gives the
    sigmoid. Classes absent from ``estimator.classes_`` get weight 0 and bias :data:`MISSING_CLASS_BIAS`.
    """
    if not is_linear(estimator):
        raise ValueError(
            f"{type(estimator).__name__} is not a fitted linear classifier (needs coef_ with one row per class and "
            "intercept_); store it with save_pickled_estimator instead"
        )
    classes = _class_indices(estimator, num_classes)
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.broadcast_to(np.asarray(estimator.intercept_, dtype=np.float64), (coef.shape[0],))
    if len(classes) == 2:
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, MISSING_CLASS_BIAS)
    weight[classes] = coef
    bias[classes] = intercept
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def estimator_scores(estimator: Any, features: Tensor, num_classes: int) -> Tensor:
    """Class probabilities ``(N, num_classes)`` (float32, rows sum to 1) for features ``(N, F)``.

    ``predict_proba`` when the estimator offers it (scikit-learn hides it where unusable, e.g. on an SVC
    without probability estimates); otherwise the softmax of ``decision_function`` (binary scores ``s``
    become ``[-s/2, s/2]``); otherwise one-hot ``predict``. Columns of classes the estimator never saw are 0.
    """
    classes = _class_indices(estimator, num_classes)
    x = _to_numpy_features(features)
    if hasattr(estimator, "predict_proba"):
        present = np.asarray(estimator.predict_proba(x), dtype=np.float64)
    elif hasattr(estimator, "decision_function"):
        scores = np.asarray(estimator.decision_function(x), dtype=np.float64)
        if scores.ndim == 1:
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        present = np.exp(scores)
        present /= present.sum(axis=1, keepdims=True)
    else:
        predicted = np.asarray(estimator.predict(x))
        present = (predicted[:, None] == np.asarray(estimator.classes_)[None, :]).astype(np.float64)
    if present.shape != (x.shape[0], len(classes)):
        raise ValueError(
            f"{type(estimator).__name__} returned scores of shape {present.shape}, expected "
            f"({x.shape[0]}, {len(classes)}) (one column per class in classes_)"
        )
    probs = np.zeros((x.shape[0], num_classes))
    probs[:, classes] = present
    return torch.from_numpy(probs).float()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_pickled_estimator(estimator: Any, folder: str | Path) -> tuple[Path, str]:
    """Pickle ``estimator`` (for those that are not :func:`is_linear`) to ``folder/estimator-<sha256[:12]>.pkl``.

    The file is written under a temporary name and renamed, so a crash never leaves a half-written
    estimator file. Returns ``(path, sha256 hex of the file)``; record both in the checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{PICKLE_PREFIX}", suffix=".tmp", delete=False)
    temp = Path(handle.name)
    try:
        with handle:
            pickle.dump(estimator, handle, protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        sha256 = _sha256_file(temp)
        path = folder / f"{PICKLE_PREFIX}{sha256[:12]}.pkl"
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path, sha256


def load_pickled_estimator(path: str | Path, sha256: str, allow_pickle: bool = False) -> Any:
    """Unpickle an estimator written by :func:`save_pickled_estimator`, only when the caller trusts it.

    Raises ``PermissionError`` unless ``allow_pickle`` (before reading the file), ``FileNotFoundError``
    when the file is missing, and ``ValueError`` when its SHA-256 is not ``sha256`` (checked on the
    very bytes that are then unpickled).
    """
    path = Path(path)
    if not allow_pickle:
        raise PermissionError(
            f"refusing to unpickle estimator {path}: unpickling runs code chosen by whoever wrote the file. "
            "Load it only if you trust its source, with allow_pickle=True (on the probe module: "
            "trust_pickled_estimator=True)"
        )
    if not path.is_file():
        raise MissingFileError(
            f"pickled estimator {path} not found; it is saved next to the checkpoint and must be copied with it"
        )
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise ConfigError(
            f"pickled estimator {path} has sha256 {actual}, but the checkpoint recorded {sha256}: the file changed "
            "since the checkpoint was written; refusing to unpickle it (restore the original file or refit)"
        )
    return pickle.loads(data)
