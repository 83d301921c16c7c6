"""One vocabulary across the four techniques: the same head options build the same head, bad ones fail the
same way, parameter groups carry the same names, and only the classification modules carry classification
hooks."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

from tlmodules import DANNModule, FeatureProbeModule, FineTuneModule, MultiTaskModule
from tlmodules.base import TransferModule
from tlmodules.classification import ClassificationMixin
from tlmodules.errors import ConfigError

WIDTH = 12
TASKS = [{"name": "kind", "kind": "multiclass", "num_outputs": 3}]


class Features(nn.Module):
    num_features = WIDTH

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(cls: type[TransferModule], **kwargs: Any) -> TransferModule:
    if cls is MultiTaskModule:
        return MultiTaskModule(backbone=Features(), tasks=TASKS, **kwargs)
    return cls(backbone=Features(), num_classes=3, **kwargs)


def heads_of(model: TransferModule) -> list[nn.Module]:
    return list(model.heads.values()) if isinstance(model, MultiTaskModule) else [model.head]


MODULES = [FineTuneModule, FeatureProbeModule, DANNModule, MultiTaskModule]
SHARED_ARGUMENTS = {
    "backbone", "weights", "pooling", "trust_remote_code", "num_features", "pretrained",
    "head", "head_hidden", "dropout",
    "lr", "weight_decay", "optimizer", "momentum", "lr_schedule", "warmup_fraction",
}  # fmt: skip


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_every_module_takes_the_shared_arguments_with_the_same_head_defaults(cls: type[TransferModule]) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    assert SHARED_ARGUMENTS <= set(parameters)
    assert (parameters["head"].default, parameters["head_hidden"].default, parameters["dropout"].default) == (
        "linear",
        256,
        0.0,
    )


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_head_mlp_builds_one_hidden_layer_of_head_hidden_units(cls: type[TransferModule]) -> None:
    linear = heads_of(build(cls))[0]
    mlp = heads_of(build(cls, head="mlp", head_hidden=7, dropout=0.2))[0]
    layers = [m for m in linear.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(WIDTH, 3)]
    layers = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(WIDTH, 7), (7, 3)]
    assert [m.p for m in mlp.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"head": "mpl"}, "unknown head 'mpl'"), ({"head": "mlp", "head_hidden": 0}, "head_hidden >= 1")],
)
def test_bad_head_options_fail_at_construction(cls: type[TransferModule], kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(cls, **kwargs)


def test_checking_the_head_options_draws_no_random_numbers() -> None:
    """Constructing a module must not shift the random stream its weights are drawn from (a checked argument
    that built a throwaway layer would)."""
    torch.manual_seed(0)
    first = build(FineTuneModule).head.net[-1].weight.clone()
    torch.manual_seed(0)
    Features()  # the same draws as build()'s backbone, then the head
    expected = nn.Linear(WIDTH, 3).weight
    torch.testing.assert_close(first, expected)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_parameter_groups_use_the_shared_names(cls: type[TransferModule]) -> None:
    model = build(cls, head="mlp", head_hidden=4)
    names = {g.name for g in model.parameter_groups()}
    assert "head" in names and names <= {"head", "backbone", "discriminator", "weighting"} | {
        f"backbone.{i}" for i in range(8)
    }
    head_params = {id(p) for g in model.parameter_groups() if g.name == "head" for p in g.params}
    assert {id(p) for h in heads_of(model) for p in h.parameters()} <= head_params


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_features_returns_the_tensor_the_head_reads(cls: type[TransferModule]) -> None:
    model = build(cls).eval()
    x = torch.randn(4, 5)
    features = model.features(x)
    assert isinstance(features, torch.Tensor) and features.shape == (4, WIDTH)
    logits = model(x)["kind"] if cls is MultiTaskModule else model(x)
    torch.testing.assert_close(logits, heads_of(model)[0](features))


def test_only_the_classification_modules_carry_classification_hooks() -> None:
    for cls in (FineTuneModule, FeatureProbeModule, DANNModule):
        assert issubclass(cls, ClassificationMixin)
    assert not issubclass(MultiTaskModule, ClassificationMixin)
    core = {name for name in vars(TransferModule)}
    assert not {"num_classes", "class_names", "classification_loss", "on_validation_start"} & core
    # MultiTaskModule overrides no hook just to switch a classification one off
    assert "on_validation_start" not in vars(MultiTaskModule) and "on_test_start" not in vars(MultiTaskModule)
