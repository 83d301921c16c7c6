"""Domain-adversarial adaptation: gradient reversal, DANN's schedules, the domain discriminator, the
information-maximisation signals, and DANNModule's training steps, logging, checkpoints and mixed
precision, on tiny tensors and on the embedded digits → digits-on-photos pair; the MCC and self-training terms
on the target's predictions, alone and beside DANN/CDAN."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

import tlmodules.alignment.dann as dann_alignment
from datamodules import DigitsDomainDataModule
from tlmodules import DANNModule
from tlmodules.alignment import (
    ConditionalDomainAdversarialLoss,
    ConfidenceThresholdedSelfTraining,
    DomainAdversarialLoss,
    MinimumClassConfusionLoss,
    TargetBatchNormStatistics,
)
from tlmodules.errors import ConfigError
from tlmodules.grl import GradientReversalLayer, grad_reverse
from tlmodules.heads import DomainDiscriminator
from tlmodules.information import InformationMaximization, SoftNeighborhoodDensity, soft_neighborhood_density
from tlmodules.schedules import dann_lambda, dann_lr_factor, lr_shape

IN_FEATURES, WIDTH, NUM_CLASSES = 4, 6, 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one OpenMP thread


def plain_path(inputs: Tensor, coefficient: float = 1.0) -> Tensor:
    """Stands in for ``grad_reverse``: the same graph without the reversal."""
    return inputs


# ---------------------------------------------------------------------------------------------
# gradient reversal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4), (2, 0, 3), (1, 3, 8, 8)])
def test_grl_forward_is_the_identity(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    y = grad_reverse(x, 3.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x)
    assert torch.equal(GradientReversalLayer()(x, 3.0), x)


@pytest.mark.parametrize("coefficient", [0.0, 0.5, 2.0])
def test_grl_backward_multiplies_the_gradient_by_minus_lambda(coefficient: float) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    weights = torch.randn(3, 4)
    (grad,) = torch.autograd.grad((grad_reverse(x, coefficient) * weights).sum(), x)
    assert torch.equal(grad, -coefficient * weights)
    # through a module below it as well: the upstream parameters get the reversed gradient
    layer = nn.Linear(4, 2)
    upstream = torch.randn(5, 4)
    out_weights = torch.randn(5, 2)
    plain = torch.autograd.grad((layer(upstream) * out_weights).sum(), layer.weight)[0]
    reversed_ = torch.autograd.grad((grad_reverse(layer(upstream), coefficient) * out_weights).sum(), layer.weight)[0]
    torch.testing.assert_close(reversed_, -coefficient * plain)


def test_grl_jacobian_in_float64_is_minus_lambda_times_the_true_one() -> None:
    """Gradcheck-style: the analytic Jacobian of ``sin(grl(x²))`` is ``-λ`` times the finite-difference one;
    ``gradcheck`` itself passes for ``λ = -1`` (the true derivative) and fails for ``λ = 1``."""
    coefficient = 0.7
    x = torch.randn(5, dtype=torch.float64)

    def f(inputs: Tensor, c: float = coefficient) -> Tensor:
        return torch.sin(grad_reverse(inputs * inputs, c))

    analytic = torch.autograd.functional.jacobian(f, x)
    eps = 1e-6
    numeric = torch.stack([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in torch.eye(5, dtype=torch.float64)], 1)
    torch.testing.assert_close(numeric, torch.diag(2 * x * torch.cos(x * x)), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(analytic, -coefficient * numeric, rtol=1e-7, atol=1e-8)

    leaf = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: f(v, -1.0), (leaf,))
    assert not torch.autograd.gradcheck(lambda v: f(v, 1.0), (leaf,), raise_exception=False)


def test_grl_under_bf16_autocast() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    weights = torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = layer(x)
        out = grad_reverse(hidden, 2.0)
        assert hidden.dtype == out.dtype == torch.bfloat16
        assert torch.equal(out, hidden)
        reversed_ = torch.autograd.grad((out.float() * weights).sum(), layer.weight)[0]
        plain = torch.autograd.grad((layer(x).float() * weights).sum(), layer.weight)[0]
    assert reversed_.dtype == torch.float32 and torch.isfinite(reversed_).all()
    torch.testing.assert_close(reversed_, -2.0 * plain)  # a power of two: exact even in bf16


def test_grl_module_form_matches_the_function() -> None:
    module = GradientReversalLayer()
    assert list(module.parameters()) == []
    x = torch.randn(4, 5, requires_grad=True)
    weights = torch.randn(4, 5)
    for coefficient in (None, 0.25):
        args = () if coefficient is None else (coefficient,)
        by_module = torch.autograd.grad((module(x, *args) * weights).sum(), x)[0]
        by_function = torch.autograd.grad((grad_reverse(x, *args) * weights).sum(), x)[0]
        assert torch.equal(by_module, by_function)
        assert torch.equal(by_module, -(1.0 if coefficient is None else coefficient) * weights)


# ---------------------------------------------------------------------------------------------
# DANN's schedules
# ---------------------------------------------------------------------------------------------
def test_dann_lambda_rises_from_zero_to_its_maximum() -> None:
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(1.0, lambda_max=0.3, gamma=4.0) == pytest.approx(0.3 * (2 / (1 + math.exp(-4)) - 1))
    assert dann_lambda(0.25, 2.0, 10.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-2.5)) - 1))
    grid = [dann_lambda(p / 50) for p in range(51)]
    assert all(b > a for a, b in zip(grid, grid[1:]))
    # progress outside [0, 1] is clamped
    assert dann_lambda(-0.5) == 0.0
    assert dann_lambda(1.7, 0.5, 3.0) == dann_lambda(1.0, 0.5, 3.0)


@pytest.mark.parametrize("progress", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_dann_lr_factor_formula(progress: float) -> None:
    assert dann_lr_factor(progress) == pytest.approx((1 + 10 * progress) ** -0.75)
    assert lr_shape("dann", progress) == pytest.approx(dann_lr_factor(progress))


def test_dann_lr_factor_clamps_and_decays() -> None:
    assert dann_lr_factor(0.0) == 1.0
    assert dann_lr_factor(-1.0) == 1.0
    assert dann_lr_factor(2.0) == dann_lr_factor(1.0) == pytest.approx(11**-0.75)
    grid = [dann_lr_factor(p / 20) for p in range(21)]
    assert all(b < a for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.2, 0.35, 0.6, 1.0])
def test_lr_shape_dann_after_warmup(progress: float) -> None:
    """Linear warm-up over the first 20 %, then DANN's annealing of the progress made after the warm-up."""
    warmup = 0.2
    expected = progress / warmup if progress < warmup else dann_lr_factor((progress - warmup) / (1 - warmup))
    assert lr_shape("dann", progress, warmup) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# the domain discriminator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_norm", [True, False])
def test_discriminator_returns_unbounded_logits_per_sample(batch_norm: bool) -> None:
    disc = DomainDiscriminator(5, hidden=8, batch_norm=batch_norm)
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == (2 if batch_norm else 0)
    assert [m.in_features for m in disc.modules() if isinstance(m, nn.Linear)] == [5, 8, 8]
    x = torch.randn(7, 5)
    assert disc(x).shape == (7,)
    with torch.no_grad():
        disc.net[-1].bias.fill_(6.0)
    assert (disc(x) > 1.0).all()  # no sigmoid
    with torch.no_grad():
        disc.net[-1].bias.fill_(-6.0)
    assert (disc(x) < 0.0).all()
    disc.eval()
    assert disc(x[:1]).shape == (1,)


@pytest.mark.parametrize(("layers", "widths"), [(1, [5, 8]), (3, [5, 8, 8, 8])])
def test_discriminator_depth(layers: int, widths: list[int]) -> None:
    disc = DomainDiscriminator(5, hidden=8, layers=layers)
    assert [m.in_features for m in disc.modules() if isinstance(m, nn.Linear)] == widths
    assert sum(isinstance(m, nn.BatchNorm1d) for m in disc.modules()) == layers
    assert disc(torch.randn(6, 5)).shape == (6,)


def test_discriminator_size_follows_width_and_depth() -> None:
    """2 × 256 (the digits recipe) against the default 2 × 1024 on a 256-wide bottleneck."""

    def size(**kwargs: int) -> int:
        model = DANNModule("builtin:lenet", num_classes=10, bottleneck=256, projection_samples=0, **kwargs)
        return sum(p.numel() for p in model.discriminator.parameters())

    small, default = size(discriminator_hidden=256, discriminator_layers=2), size()
    assert small == 2 * (256 * 256 + 256 + 2 * 256) + 256 + 1  # two linear + batch-norm layers, one output
    assert default == (256 + 1024) * 1024 + 2 * (1024 + 2 * 1024) + 1024 + 1
    assert size(discriminator_hidden=100, discriminator_layers=1) == 256 * 100 + 100 + 2 * 100 + 100 + 1


@pytest.mark.parametrize("bad", [{"discriminator_layers": 0}, {"discriminator_hidden": 0}])
def test_discriminator_without_hidden_layers_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="discriminator_layers >= 1 and discriminator_hidden >= 1"):
        DANNModule("builtin:lenet", num_classes=10, **bad)
    DANNModule("builtin:lenet", num_classes=10, adversarial=False, **bad)  # source-only: no discriminator


def test_discriminator_loss_is_finite_under_bf16_autocast() -> None:
    disc = DomainDiscriminator(5, hidden=8)
    with torch.no_grad():
        disc.net[-1].bias.fill_(60.0)  # saturated: a sigmoid then log would give inf in bf16
    x = torch.randn(8, 5)
    labels = torch.cat([torch.ones(4), torch.zeros(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = disc(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss) and loss > 10  # the target half is confidently wrong
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in disc.parameters())


# ---------------------------------------------------------------------------------------------
# information maximisation
# ---------------------------------------------------------------------------------------------
def im_scores(logits: Tensor) -> dict[str, float]:
    metric = InformationMaximization(logits.shape[1])
    metric.update(logits)
    return {k: float(v) for k, v in metric.compute().items()}


def by_hand(logits: np.ndarray) -> dict[str, float]:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    mean_entropy = float(np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in probs]))
    mean = probs.mean(0)
    diversity = float(-sum(p * math.log(p) for p in mean if p > 0))
    return {"entropy": mean_entropy, "diversity": diversity, "score": diversity - mean_entropy}


def test_information_maximization_limits() -> None:
    c = 5
    uniform = im_scores(torch.zeros(4, c))
    assert uniform["entropy"] == pytest.approx(math.log(c)) and uniform["diversity"] == pytest.approx(math.log(c))
    assert uniform["score"] == pytest.approx(0.0, abs=1e-6)

    collapsed = im_scores(F.one_hot(torch.full((6,), 2), c).float() * 40)
    assert collapsed["entropy"] == pytest.approx(0.0, abs=1e-5)
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-5)

    balanced = im_scores(F.one_hot(torch.arange(2 * c) % c, c).float() * 40)
    assert balanced["entropy"] == pytest.approx(0.0, abs=1e-5)
    assert balanced["diversity"] == pytest.approx(math.log(c), abs=1e-5)
    assert balanced["score"] == pytest.approx(math.log(c), abs=1e-5)


def test_information_maximization_matches_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-3.0, 1.0, 4.0], [0.0, 0.0, 0.0]])
    expected = by_hand(logits.double().numpy())
    got = im_scores(logits)
    for key in ("entropy", "diversity", "score"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5)
    assert im_scores(logits.bfloat16())["entropy"] == pytest.approx(expected["entropy"], rel=2e-2)


def test_information_maximization_accumulates_and_merges() -> None:
    a, b = torch.randn(5, 4) * 3, torch.randn(9, 4) * 3
    whole = InformationMaximization(4)
    whole.update(torch.cat([a, b]))
    expected = whole.compute()
    assert float(expected["entropy"]) == pytest.approx(by_hand(torch.cat([a, b]).double().numpy())["entropy"], rel=1e-5)

    two = InformationMaximization(4)
    two.update(a)
    two.update(b)
    for key, value in two.compute().items():
        torch.testing.assert_close(value, expected[key])

    first, second = InformationMaximization(4), InformationMaximization(4)
    first.update(a)
    second.update(b)
    first.merge_state(second)
    for key, value in first.compute().items():
        torch.testing.assert_close(value, expected[key])
    # a merge is not an average: the halves' own scores differ from the whole's
    assert not torch.allclose(InformationMaximization(4).forward(a)["diversity"], expected["diversity"])


def snd_by_hand(probs: np.ndarray, temperature: float = 0.05) -> float:
    rows = probs / np.linalg.norm(probs, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(rows)):
        sims = [float(rows[i] @ rows[j]) / temperature for j in range(len(rows)) if j != i]
        weights = np.exp(np.array(sims) - max(sims))
        weights /= weights.sum()
        total += -float(sum(w * math.log(w) for w in weights if w > 0))
    return total / len(rows)


def test_soft_neighborhood_density_matches_a_hand_computation() -> None:
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)) * 2
    probs = logits.softmax(-1)
    expected = snd_by_hand(probs.double().numpy())
    assert float(soft_neighborhood_density(probs)) == pytest.approx(expected, rel=1e-5)
    assert float(SoftNeighborhoodDensity().forward(logits)) == pytest.approx(expected, rel=1e-5)


def test_soft_neighborhood_density_ranks_clusters_above_scattered_predictions() -> None:
    generator = torch.Generator().manual_seed(0)
    c, n = 5, 8
    labels = torch.arange(c * n) % c
    clustered = F.one_hot(labels, c).float() * 6 + torch.randn(c * n, c, generator=generator) * 0.3
    scattered = torch.randn(c * n, c, generator=generator) * 3
    tight, loose = (float(SoftNeighborhoodDensity().forward(x)) for x in (clustered, scattered))
    assert tight > loose
    # one-hot clusters of n: each sample's neighbours are the n - 1 others of its cluster
    assert float(soft_neighborhood_density(F.one_hot(labels, c).float())) == pytest.approx(math.log(n - 1), abs=1e-3)
    # the known degenerate case: one prediction for every sample is the densest neighbourhood of all
    assert float(soft_neighborhood_density(torch.full((c * n, c), 1.0 / c))) == pytest.approx(math.log(c * n - 1))


def test_soft_neighborhood_density_accumulates_merges_and_caps() -> None:
    a, b = torch.randn(5, 4) * 3, torch.randn(9, 4) * 3
    expected = float(soft_neighborhood_density(torch.cat([a, b]).softmax(-1)))
    two = SoftNeighborhoodDensity()
    two.update(a)
    two.update(b)
    assert float(two.compute()) == pytest.approx(expected, rel=1e-5)
    first, second = SoftNeighborhoodDensity(), SoftNeighborhoodDensity()
    first.update(a)
    second.update(b)
    first.merge_state(second)
    assert float(first.compute()) == pytest.approx(expected, rel=1e-5)
    capped = SoftNeighborhoodDensity(max_samples=6)
    capped.update(a)
    capped.update(b)  # one row of b still fits
    assert float(capped.compute()) == pytest.approx(float(soft_neighborhood_density(torch.cat([a, b[:1]]).softmax(-1))))
    assert math.isnan(float(SoftNeighborhoodDensity().forward(a[:1])))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SoftNeighborhoodDensity(temperature=0.0)


# ---------------------------------------------------------------------------------------------
# DANNModule on tiny tensors
# ---------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """``(B, 4) → (B, 6)``; BatchNorm only when asked."""

    num_features = WIDTH

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        norm: list[nn.Module] = [nn.BatchNorm1d(WIDTH)] if batch_norm else []
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), *norm, nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def tiny_dann(batch_norm: bool = False, net: nn.Module | None = None, **kwargs: Any) -> DANNModule:
    settings = {  # pinned: the tests below must not move when DANN's defaults are tuned
        "num_classes": NUM_CLASSES,
        "bottleneck": 0,
        "head": "linear",
        "dropout": 0.0,
        "optimizer": "sgd",
        "lr_schedule": "dann",
        "warmup_fraction": 0.0,
        "lambda_max": 1.0,
        "gamma": 10.0,
        "entropy_conditioning": True,
        "discriminator_hidden": 8,
        "lr": 0.1,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "projection_samples": 0,
        **kwargs,
    }
    return DANNModule(net if net is not None else TinyNet(batch_norm), **settings)


def domain_pairs(n: int, seed: int = 0, shift: float = 1.5) -> list[dict]:
    """``{"source": {inputs, labels, index}, "target": {...}}`` samples; the target is shifted."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    source = torch.randn(n, IN_FEATURES, generator=g) * 0.5
    source[torch.arange(n), labels] += 2.0
    target = torch.randn(n, IN_FEATURES, generator=g) * 0.5 + shift
    return [
        {
            "source": {"inputs": source[i], "labels": labels[i], "index": i},
            "target": {"inputs": target[i], "labels": labels[i], "index": i},
        }
        for i in range(n)
    ]


class GradCapture(pl.Callback):
    """The gradients each optimizer step is about to apply."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def first_step_grads(model: DANNModule, data: list[dict], coefficient: float | None = None) -> dict[str, Tensor]:
    """One real optimisation step (a Trainer, a batch dict); ``coefficient`` fixes λ (0 at step 0 otherwise)."""
    if coefficient is not None:
        model.adaptation_weight = lambda: coefficient
    capture = GradCapture()
    make_trainer(max_steps=1, callbacks=[capture]).fit(model, DataLoader(data, batch_size=len(data)))
    assert len(capture.grads) == 1
    return capture.grads[0]


def test_domain_loss_gradient_on_the_features_is_reversed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The domain loss alone: through the gradient reversal layer the features get ``-λ`` times the gradient
    of the very same computation without it; the discriminator's own gradients are untouched."""
    model = tiny_dann()
    feats_s = torch.randn(5, WIDTH, requires_grad=True)
    feats_t = (torch.randn(7, WIDTH) + 1.0).requires_grad_(True)
    disc_params = list(model.discriminator.parameters())

    def grads(coefficient: float) -> list[Tensor]:
        loss, _ = model.alignment(feats_s, feats_t, coefficient)
        return list(torch.autograd.grad(loss, [feats_s, feats_t, *disc_params]))

    reversed_one, reversed_half = grads(1.0), grads(0.5)
    monkeypatch.setattr(dann_alignment, "grad_reverse", plain_path)
    plain = grads(1.0)
    for i in (0, 1):
        assert plain[i].abs().max() > 1e-4
        torch.testing.assert_close(reversed_one[i], -plain[i])
        torch.testing.assert_close(reversed_half[i], -0.5 * plain[i])
        assert (reversed_one[i] * plain[i]).sum() < 0  # opposite directions
    for r, p in zip(reversed_one[2:], plain[2:]):
        torch.testing.assert_close(r, p)


def test_adversarial_step_trains_the_discriminator_and_reverses_its_gradient_into_the_backbone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = tiny_dann()
    data = domain_pairs(8)
    ce_only = first_step_grads(copy.deepcopy(base), data, 0.0)  # λ = 0: the classification gradient alone
    adversarial = first_step_grads(copy.deepcopy(base), data, 1.0)
    monkeypatch.setattr(dann_alignment, "grad_reverse", plain_path)
    cooperative = first_step_grads(copy.deepcopy(base), data, 1.0)  # the discriminator's gradient, not reversed

    disc = [n for n, _ in base.named_parameters() if n.startswith("alignment.discriminator.")]
    assert disc and set(disc) <= set(adversarial)
    assert all(adversarial[n].abs().max() > 0 for n in disc)
    for n in disc:  # the reversal sits below the discriminator: its own gradient does not depend on λ
        torch.testing.assert_close(adversarial[n], cooperative[n])
        torch.testing.assert_close(adversarial[n], ce_only[n])
    for n in [n for n, _ in base.named_parameters() if n.startswith("head.")]:
        torch.testing.assert_close(adversarial[n], ce_only[n])  # the label classifier is not on the domain path
    backbone = [n for n, _ in base.named_parameters() if n.startswith("backbone.")]
    assert backbone
    for n in backbone:
        from_domain = adversarial[n] - ce_only[n]
        plain = cooperative[n] - ce_only[n]
        assert plain.abs().max() > 1e-5, f"{n}: the domain loss sent no gradient into the backbone"
        torch.testing.assert_close(from_domain, -plain, rtol=1e-4, atol=1e-7)


def test_discriminator_sees_both_domains_in_one_batch() -> None:
    """In training mode the discriminator's BatchNorm must normalise source and target together: features
    that differ only by a constant shift are told apart. Normalising each domain's batch on its own would
    erase the shift after the first layer and pin the discriminator at chance (accuracy exactly 0.5)."""
    model = tiny_dann(discriminator_hidden=16)
    feats = torch.randn(16, WIDTH)
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=0.02)
    for _ in range(40):
        loss, accuracy = model.alignment(feats, feats + 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(accuracy) >= 0.9
    assert float(loss.detach()) < 0.5


def test_source_only_baseline_has_no_discriminator_and_ignores_the_target() -> None:
    base = tiny_dann(adversarial=False)
    assert base.discriminator is None
    assert [g.name for g in base.parameter_groups()] == ["backbone", "head"]
    data = domain_pairs(8)
    other = domain_pairs(8, seed=5, shift=-3.0)
    moved = [{"source": a["source"], "target": b["target"]} for a, b in zip(data, other)]
    g1 = first_step_grads(copy.deepcopy(base), data, 1.0)
    g2 = first_step_grads(copy.deepcopy(base), moved, 1.0)
    assert set(g1) == set(g2) == {n for n, _ in base.named_parameters()}
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n

    # control: with the discriminator the same change of target inputs changes the backbone's gradient
    adversarial = tiny_dann(adversarial=True)
    a1 = first_step_grads(copy.deepcopy(adversarial), data, 1.0)
    a2 = first_step_grads(copy.deepcopy(adversarial), moved, 1.0)
    assert not torch.allclose(a1["backbone.body.net.0.weight"], a2["backbone.body.net.0.weight"])


def test_joint_batch_shares_batch_norm_statistics_between_the_domains() -> None:
    """With a BatchNorm backbone ``joint_batch=True`` normalises source and target together (so even the
    source-only baseline's gradient depends on the target batch); ``joint_batch=False`` keeps them apart."""
    data = domain_pairs(8)
    other = domain_pairs(8, seed=5, shift=-3.0)
    moved = [{"source": a["source"], "target": b["target"]} for a, b in zip(data, other)]
    separate = tiny_dann(batch_norm=True, adversarial=False, joint_batch=False)
    s1, s2 = (first_step_grads(copy.deepcopy(separate), d) for d in (data, moved))
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    joint = tiny_dann(batch_norm=True, adversarial=False, joint_batch=True)
    j1, j2 = (first_step_grads(copy.deepcopy(joint), d) for d in (data, moved))
    assert not torch.allclose(j1["backbone.body.net.0.weight"], j2["backbone.body.net.0.weight"])


def test_source_only_target_statistics_decides_whether_the_target_batch_is_computed() -> None:
    """``target_statistics=True``: the target batch goes through the network (joint BatchNorm statistics,
    exactly as in the adversarial runs); ``False``: only the source batch is computed, and BatchNorm's
    running statistics then come from the source alone."""
    data = domain_pairs(8)
    source = torch.stack([d["source"]["inputs"] for d in data])
    both = torch.cat([source, torch.stack([d["target"]["inputs"] for d in data])])
    base = tiny_dann(batch_norm=True, adversarial=False)
    for keep, inputs in ((True, both), (False, source)):
        model = copy.deepcopy(base)
        model.hparams.target_statistics = keep
        calls: list[int] = []
        model.backbone.register_forward_hook(lambda m, args, out, calls=calls: calls.append(len(args[0])))
        first_step_grads(model, data)
        assert calls == [len(inputs)]
        # after one step BatchNorm's running mean is 0.1 × the batch mean of the first layer's output
        norm = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm1d))
        with torch.no_grad():
            expected = 0.1 * base.backbone.body.net[0](inputs).mean(0)
        torch.testing.assert_close(norm.running_mean, expected, rtol=1e-4, atol=1e-6)


def test_describe_names_the_method_for_run_summaries() -> None:
    assert tiny_dann(adversarial=False).describe() == {"method": "source-only"}
    assert tiny_dann().describe() == {"method": "dann"}
    assert tiny_dann(method="cdan").describe() == {"method": "cdan+e"}
    assert tiny_dann(method="cdan", entropy_conditioning=False).describe() == {"method": "cdan"}


def test_joint_and_separate_batches_give_the_same_features_without_batch_norm() -> None:
    joint = tiny_dann(joint_batch=True)
    separate = tiny_dann(joint_batch=False)
    separate.load_state_dict(joint.state_dict())
    calls: list[int] = []
    for model in (joint, separate):
        model.backbone.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
        model.eval()
    x_s, x_t = torch.randn(5, IN_FEATURES), torch.randn(3, IN_FEATURES) + 2
    with torch.no_grad():
        fj = joint._domain_features(x_s, x_t)
        assert calls == [8]  # one pass over both domains
        fs = separate._domain_features(x_s, x_t)
        assert calls == [8, 5, 3]
        expected = (joint.features(x_s), joint.features(x_t))
    for a, b, c in zip(fj, fs, expected):
        assert a.shape == c.shape
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)

    # control: a BatchNorm backbone in training mode gives other features when the domains share a batch
    bn_joint, bn_separate = tiny_dann(batch_norm=True), tiny_dann(batch_norm=True, joint_batch=False)
    bn_separate.load_state_dict(bn_joint.state_dict())
    assert not torch.allclose(bn_joint._domain_features(x_s, x_t)[0], bn_separate._domain_features(x_s, x_t)[0])


@pytest.mark.parametrize(
    ("method", "entropy_conditioning", "kind"),
    [
        ("dann", True, DomainAdversarialLoss),
        ("cdan", True, ConditionalDomainAdversarialLoss),
        ("cdan", False, ConditionalDomainAdversarialLoss),
    ],
)
def test_the_method_builds_its_alignment_loss(method: str, entropy_conditioning: bool, kind: type) -> None:
    """DANN and CDAN(+E) get their own loss module (its numerics: tests/test_alignment.py), which owns the
    discriminator: CDAN's sees ``p ⊗ f`` ``(B, W·C)``; checkpoints hold it under ``alignment.discriminator.``."""
    model = tiny_dann(method=method, entropy_conditioning=entropy_conditioning)
    assert type(model.alignment) is kind
    assert model.discriminator is model.alignment.discriminator
    assert model.discriminator.net[0].in_features == WIDTH * (NUM_CLASSES if method == "cdan" else 1)
    if method == "cdan":
        assert model.alignment.entropy_conditioning is entropy_conditioning
    keys = [k for k in model.state_dict() if "discriminator" in k]
    assert keys and all(k.startswith("alignment.discriminator.") for k in keys)
    disc_group = [g for g in model.parameter_groups() if g.name == "discriminator"]
    assert len(disc_group) == 1
    assert {id(p) for p in disc_group[0].params} == {id(p) for p in model.alignment.parameters()}


def test_cdan_trains_end_to_end() -> None:
    model = tiny_dann(method="cdan")
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(max_steps=3, callbacks=[Losses()], log_every_n_steps=1)
    trainer.fit(model, DataLoader(domain_pairs(12), batch_size=4))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert {"train/domain/loss", "train/domain/acc", "train/lambda"} <= set(trainer.callback_metrics)


class ScheduleRecorder(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rates: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)
        self.rates.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.logged.append({k: float(metrics[k]) for k in ("train/lambda", "train/lr/head", "train/lr/backbone")})


def test_lambda_and_learning_rate_follow_training_progress() -> None:
    model = tiny_dann(lr=0.2, backbone_lr_ratio=0.5, discriminator_lr_ratio=3.0, lambda_max=0.8, gamma=5.0)
    recorder = ScheduleRecorder()
    trainer = make_trainer(max_epochs=2, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(model, DataLoader(domain_pairs(16), batch_size=4, shuffle=True))
    total = 8  # 2 epochs of 4 steps
    assert recorder.steps == list(range(total))
    for step, rates, logged in zip(recorder.steps, recorder.rates, recorder.logged):
        progress = step / total
        assert logged["train/lambda"] == pytest.approx(dann_lambda(progress, 0.8, 5.0))
        factor = dann_lr_factor(progress)
        assert rates["head"] == pytest.approx(0.2 * factor) == logged["train/lr/head"]
        assert rates["discriminator"] == pytest.approx(0.6 * factor)
        assert rates["backbone"] == pytest.approx(0.1 * factor) == logged["train/lr/backbone"]
    lambdas = [r["train/lambda"] for r in recorder.logged]
    assert lambdas[0] == 0.0 and all(b > a for a, b in zip(lambdas, lambdas[1:]))


def test_training_needs_a_source_and_target_batch() -> None:
    model = tiny_dann()
    plain = [{"inputs": torch.randn(IN_FEATURES), "labels": 0} for _ in range(4)]
    with pytest.raises(ValueError, match="DomainAdaptationDataModule"):
        make_trainer(max_steps=1).fit(model, DataLoader(plain, batch_size=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "mmd"}, "unknown method 'mmd'"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lambda_max": -1.0}, ">= 0"),
        ({"discriminator_lr_ratio": 0.0}, "discriminator_lr_ratio must be positive"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_dann(**kwargs)


# ---------------------------------------------------------------------------------------------
# the digits → digits-on-photos pair: logging, projector, checkpoints, mixed precision
# ---------------------------------------------------------------------------------------------
PROJECTION_SAMPLES = 40


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20 steps of DANN (lenet) on the embedded pair, validated twice on 2 batches per domain, with TensorBoard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("dann_digits")
    data = DigitsDomainDataModule(batch_size=32)
    model = DANNModule(
        "builtin:lenet",
        lr=0.01,
        optimizer="sgd",
        momentum=0.9,
        lr_schedule="dann",
        projection_samples=PROJECTION_SAMPLES,
    )
    logger = TensorBoardLogger(tmp, name="dann")
    trainer = make_trainer(logger=logger, max_steps=20, limit_val_batches=2, val_check_interval=10, log_every_n_steps=5)
    trainer.fit(model, datamodule=data)
    path = tmp / "dann.ckpt"
    trainer.save_checkpoint(path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.set_num_threads(threads)
    return {"model": model, "data": data, "log_dir": Path(logger.log_dir), "ckpt": path, "metrics": metrics}


def test_digits_fit_logs_both_domains_and_the_label_free_signals(digits_run: dict[str, Any]) -> None:
    metrics = digits_run["metrics"]
    for key in (
        "val/source/acc",
        "val/source/f1_macro",
        "val/target/acc",
        "val/target/entropy",
        "val/target/diversity",
        "val/target/im_score",
        "val/target/snd",
        "hp_metric",
        "train/source/loss_epoch",
        "train/domain/loss_step",
        "train/domain/acc",
        "train/lambda",
        "train/lr/discriminator",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["hp_metric"] == metrics["val/target/acc"]
    assert metrics["val/target/im_score"] == pytest.approx(
        metrics["val/target/diversity"] - metrics["val/target/entropy"], abs=1e-5
    )
    assert 0 <= metrics["val/target/entropy"] <= math.log(10) + 1e-5
    assert 0 <= metrics["val/target/diversity"] <= math.log(10) + 1e-5
    assert 0 < metrics["val/target/snd"] < math.log(len(digits_run["data"].target.datasets["val"]))
    assert metrics["val/source/acc"] > 0.2  # ten classes, 20 steps: above chance on the source
    model = digits_run["model"]
    assert model.num_classes == 10 and model.class_names == [str(d) for d in range(10)]
    assert model.discriminator.net[0].in_features == model.feature_width


def test_digits_fit_writes_projection_confusion_matrix_and_projector(digits_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = digits_run["log_dir"]
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"val/feature_projection", "val/target/confusion_matrix"} <= images
    assert [e.step for e in events.Images("val/feature_projection")] == [10, 20]
    scalars = set(events.Tags()["scalars"])
    assert {"val/target/acc", "val/target/im_score", "train/lambda", "train/lr/backbone", "hp_metric"} <= scalars

    assert (log_dir / "projector_config.pbtxt").is_file()
    metadata = sorted(log_dir.rglob("metadata.tsv"))
    assert len(metadata) == 2  # one embedding per validation
    rows = [line.split("\t") for line in metadata[-1].read_text().splitlines()]
    assert rows[0] == ["domain", "label"]
    body = rows[1:]
    # at most projection_samples per domain, source first, labelled by class name
    assert [d for d, _ in body] == ["source"] * PROJECTION_SAMPLES + ["target"] * PROJECTION_SAMPLES
    assert {label for _, label in body} <= {str(d) for d in range(10)}
    data = digits_run["data"]
    val = data.target.datasets["val"]
    expected_target = [str(val.dataset[i]["labels"]) for i in val.indices[:PROJECTION_SAMPLES]]
    assert [label for d, label in body if d == "target"] == expected_target
    tensors = (metadata[-1].parent / "tensors.tsv").read_text().splitlines()
    assert len(tensors) == len(body) and len(tensors[0].split("\t")) == digits_run["model"].feature_width


def test_digits_checkpoint_round_trips(digits_run: dict[str, Any]) -> None:
    model, path = digits_run["model"], digits_run["ckpt"]
    meta = torch.load(path, weights_only=True)["tlmodules"]
    assert meta["module"] == "DANNModule"
    assert meta["backbone"]["spec"] == "builtin:lenet"
    assert meta["num_classes"] == 10 and meta["class_names"] == [str(d) for d in range(10)]

    torch.manual_seed(99)  # a different random initialisation, which loading must overwrite
    loaded = DANNModule.load_from_checkpoint(path)
    assert loaded.discriminator is not None and loaded.hparams.method == "dann"
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    batch = next(iter(digits_run["data"].target.val_dataloader()))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(batch["inputs"]), loaded(batch["inputs"]))


@pytest.mark.parametrize("method", ["dann", "cdan"])
def test_bf16_mixed_runs_with_finite_losses(method: str) -> None:
    torch.manual_seed(0)
    data = DigitsDomainDataModule(batch_size=16)
    model = DANNModule("builtin:lenet", num_classes=10, method=method, discriminator_hidden=64, projection_samples=0)
    dtypes: list[torch.dtype] = []
    model.discriminator.net[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(
        max_steps=3, limit_val_batches=1, val_check_interval=3, precision="bf16-mixed", callbacks=[Record()]
    )
    trainer.fit(model, datamodule=data)
    assert set(dtypes) == {torch.bfloat16}  # autocast really ran
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    metrics = trainer.callback_metrics
    for key in ("train/domain/loss_step", "train/source/loss_step", "val/target/entropy", "val/source/acc"):
        assert math.isfinite(float(metrics[key])), key
    assert all(p.dtype == torch.float32 for p in model.parameters())


def shifted_domain_pairs(n: int, seed: int, shift: float = 1.0) -> tuple[list[dict], list[dict], list[dict]]:
    """Training pairs and a labelled validation set per domain: a bump at the label's position under noise as
    large (both domains), the target scaled by 1.5 and shifted by ``shift``. Classes overlap: accuracy stays
    below 1 (0.8-0.95 over seeds), so the comparison is not made at the ceiling."""
    g = torch.Generator().manual_seed(seed)

    def side(count: int, target: bool) -> list[dict]:
        labels = torch.arange(count) % NUM_CLASSES
        inputs = torch.randn(count, IN_FEATURES, generator=g)
        inputs[torch.arange(count), labels] += 2.0
        if target:
            inputs = inputs * 1.5 + shift
        return [{"inputs": inputs[i], "labels": labels[i], "index": i} for i in range(count)]

    source, target = side(n, False), side(n, True)
    pairs = [{"source": s, "target": t} for s, t in zip(source, target)]
    return pairs, side(n, False), side(n, True)


def test_bf16_mixed_reaches_the_fp32_target_accuracy() -> None:
    """DANN (BatchNorm backbone) on a shifted 3-class problem, the same seed and the same 60 steps in 32-true and
    bf16-mixed: autocast really runs, the weights stay fp32, every logged loss is finite, both runs beat chance
    (1/3) clearly on the target validation set (accuracy >= 0.7; 0.83 here), and bf16's target accuracy is within
    0.05 of fp32's (over six seeds the two differed by at most 0.021)."""
    pairs, val_source, val_target = shifted_domain_pairs(96, seed=3)
    results: dict[str, dict[str, float]] = {}
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0)
        model = tiny_dann(batch_norm=True, lr=0.05, momentum=0.9, discriminator_hidden=16)
        dtypes: list[torch.dtype] = []
        model.discriminator.net[0].register_forward_hook(lambda m, args, out, seen=dtypes: seen.append(out.dtype))
        losses: list[float] = []

        class Losses(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, seen=losses) -> None:
                seen.append(float(outputs["loss"]))
                seen.extend(float(v) for k, v in trainer.callback_metrics.items() if "loss" in k)

        trainer = make_trainer(max_epochs=10, precision=precision, callbacks=[Losses()])
        val = [DataLoader(val_source, batch_size=96), DataLoader(val_target, batch_size=96)]
        trainer.fit(model, DataLoader(pairs, batch_size=16, shuffle=True), val)
        assert trainer.global_step == 60
        assert set(dtypes) == {torch.float32 if precision == "32-true" else torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert len(losses) > 60 and all(math.isfinite(v) for v in losses)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        assert all(math.isfinite(v) for k, v in metrics.items() if "loss" in k)
        results[precision] = metrics
    fp32, bf16 = results["32-true"], results["bf16-mixed"]
    assert fp32["val/target/acc"] >= 0.7 and bf16["val/target/acc"] >= 0.7
    assert abs(bf16["val/target/acc"] - fp32["val/target/acc"]) <= 0.05


def test_epoch_training_accuracies_are_sample_weighted_means_of_the_steps() -> None:
    """train/source/acc and train/domain/acc are accumulated per step without a sync and logged once per epoch:
    the logged value is the mean over the epoch's samples (batches of 4, 4 and 2: an unweighted mean of the
    steps would differ)."""
    model = tiny_dann()
    recorded: dict[str, list[tuple[float, int]]] = {}
    original = model.accumulate_epoch_mean

    def record(name: str, value: Tensor, weight: int) -> None:
        recorded.setdefault(name, []).append((float(value), weight))
        original(name, value, weight)

    model.accumulate_epoch_mean = record
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, DataLoader(domain_pairs(10), batch_size=4))
    for name in ("train/source/acc", "train/domain/acc"):
        steps = recorded[name]
        assert [w for _, w in steps] == [4, 4, 2]
        weighted = sum(v * w for v, w in steps) / 10
        assert float(trainer.callback_metrics[name]) == pytest.approx(weighted, abs=1e-6)
    # here the steps' accuracies differ, so the weighting is visible: an unweighted mean would be logged otherwise
    values = [v for v, _ in recorded["train/source/acc"]]
    assert abs(float(trainer.callback_metrics["train/source/acc"]) - sum(values) / 3) > 1e-3


# ---------------------------------------------------------------------------------------------
# the target terms: MCC and self-training (their numerics: tests/test_alignment.py)
# ---------------------------------------------------------------------------------------------
class TinyImageNet(nn.Module):
    """``(B, 1, 4, 4)`` images → ``(B, 6)``, no BatchNorm (each sample's features do not depend on the batch)."""

    num_features = WIDTH

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, WIDTH), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def image_pairs(n: int, seed: int = 0) -> list[dict]:
    """:func:`domain_pairs` as ``(1, 4, 4)`` images: a bright pixel at the label's position, the target shifted."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    source = torch.randn(n, 16, generator=g) * 0.5
    source[torch.arange(n), labels * 5] += 2.0
    target = torch.randn(n, 16, generator=g) * 0.5 + 1.0
    target[torch.arange(n), labels * 5] += 2.0
    return [
        {
            "source": {"inputs": source[i].view(1, 4, 4), "labels": labels[i], "index": i},
            "target": {"inputs": target[i].view(1, 4, 4), "labels": labels[i], "index": i},
        }
        for i in range(n)
    ]


def stacked(data: list[dict], side: str) -> Tensor:
    return torch.stack([d[side]["inputs"] for d in data])


def term_gradients(model: DANNModule, loss: Tensor) -> dict[str, Tensor]:
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(model.named_parameters(), grads)}


@pytest.mark.parametrize("adversarial", [False, True])
def test_mcc_adds_its_gradient_from_the_target_batch(adversarial: bool) -> None:
    """One real step with ``mcc_weight=0.7`` against the same model and batch without MCC: the gradients differ by
    exactly ``0.7 ·`` the gradient of MCC on the target batch's logits (written here), which reaches the head
    and the backbone; the logged ``train/mcc/loss`` is that MCC value. Alone (source-only) and beside DANN."""
    data = domain_pairs(8)
    with_mcc = tiny_dann(adversarial=adversarial, mcc_weight=0.7, mcc_temperature=2.0)
    without = tiny_dann(adversarial=adversarial)
    without.load_state_dict(with_mcc.state_dict())  # MCC has no parameters: the same state dict
    reference = copy.deepcopy(with_mcc)
    capture = GradCapture()
    trainer = make_trainer(max_steps=1, callbacks=[capture], log_every_n_steps=1)
    trainer.fit(with_mcc, DataLoader(data, batch_size=len(data)))
    g_mcc = capture.grads[0]
    g_plain = first_step_grads(without, data)

    mcc = MinimumClassConfusionLoss(2.0)(reference(stacked(data, "target")))
    expected = term_gradients(reference, 0.7 * mcc)
    assert float(trainer.callback_metrics["train/mcc/loss_step"]) == pytest.approx(float(mcc.detach()), rel=1e-5)
    for name in ("head.net.1.weight", "backbone.body.net.0.weight"):
        assert expected[name].abs().max() > 1e-5, name
    for name, grad in g_mcc.items():
        torch.testing.assert_close(grad - g_plain[name], expected[name], rtol=1e-4, atol=1e-6)


def test_mcc_needs_the_target_batch_even_without_target_statistics() -> None:
    """Source-only with ``target_statistics=False`` skips the target batch, unless a target term needs it."""
    data = domain_pairs(8)
    for mcc_weight, seen in ((0.0, [8]), (1.0, [16])):
        model = tiny_dann(adversarial=False, target_statistics=False, mcc_weight=mcc_weight)
        calls: list[int] = []
        model.backbone.register_forward_hook(lambda m, args, out, calls=calls: calls.append(len(args[0])))
        first_step_grads(model, data)
        assert calls == seen


def test_self_training_trains_the_strong_view_towards_confident_pseudo_labels() -> None:
    """With the strong augmentation replaced by the identity (so the expected gradient can be written here) and a
    threshold every prediction passes, the step's gradient differs from the one without self-training by the
    weight times the gradient of ``mean CE(logits, argmax logits)`` with the pseudo-labels held fixed. With
    threshold 1 no prediction passes: the gradients are those without self-training."""
    data = image_pairs(8)
    plain = tiny_dann(net=TinyImageNet(), adversarial=False)
    g_plain = first_step_grads(copy.deepcopy(plain), data)
    ratios: dict[float, float] = {}
    for threshold in (0.05, 1.0):
        model = tiny_dann(net=TinyImageNet(), adversarial=False, self_training_weight=0.5)
        model.hparams.self_training_threshold = threshold
        model.self_training = ConfidenceThresholdedSelfTraining(threshold)
        model.load_state_dict(plain.state_dict())
        model.strong_augment = nn.Identity()
        capture = GradCapture()
        trainer = make_trainer(max_steps=1, callbacks=[capture], log_every_n_steps=1)
        trainer.fit(model, DataLoader(data, batch_size=len(data)))
        ratios[threshold] = float(trainer.callback_metrics["train/self_training/mask_ratio_step"])
        assert float(trainer.callback_metrics["train/self_training/threshold"]) == pytest.approx(threshold)
        reference = copy.deepcopy(plain)
        logits = reference(stacked(data, "target"))
        pseudo_labels = logits.detach().argmax(-1)
        kept = float(threshold <= 0.05)
        expected = term_gradients(reference, 0.5 * kept * F.cross_entropy(logits, pseudo_labels))
        assert (expected["head.net.1.weight"].abs().max() > 1e-5) == bool(kept)
        for name, grad in capture.grads[0].items():
            torch.testing.assert_close(grad - g_plain[name], expected[name], rtol=1e-4, atol=1e-6)
    assert ratios == {0.05: 1.0, 1.0: 0.0}


class TargetTermsRecorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        keys = [k for k in metrics if k.startswith("train/self_training/") and not k.endswith("_epoch")]
        self.rows.append({"step": trainer.global_step - 1, **{k: float(metrics[k]) for k in keys}})


def test_self_training_weight_ramps_with_training_progress() -> None:
    """``self_training_warmup=0.5`` over 6 steps: the logged weight is ``0.8 · min(1, (step / 6) / 0.5)``, a pure
    function of progress; the mask ratio, loss and threshold are logged at every step, the strong view being
    StrongAugmentBatch's (beside CDAN+E, with MCC as well)."""
    recorder = TargetTermsRecorder()
    model = tiny_dann(
        net=TinyImageNet(),
        method="cdan",
        mcc_weight=1.0,
        self_training_weight=0.8,
        self_training_threshold=0.4,
        self_training_warmup=0.5,
    )
    trainer = make_trainer(max_steps=6, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(model, DataLoader(image_pairs(24), batch_size=4))
    assert [r["step"] for r in recorder.rows] == list(range(6))
    for row in recorder.rows:
        assert row["train/self_training/weight"] == pytest.approx(0.8 * min(1.0, row["step"] / 6 / 0.5))
        assert row["train/self_training/threshold"] == pytest.approx(0.4)
        assert 0.0 <= row["train/self_training/mask_ratio_step"] <= 1.0
        assert math.isfinite(row["train/self_training/loss_step"]) and row["train/self_training/loss_step"] >= 0
    assert any(r["train/self_training/mask_ratio_step"] > 0 for r in recorder.rows)
    metrics = trainer.callback_metrics
    for key in ("train/mcc/loss_epoch", "train/domain/loss_epoch", "train/self_training/mask_ratio_epoch"):
        assert math.isfinite(float(metrics[key])), key
    assert model.describe() == {"method": "cdan+e+mcc+self-training"}


def test_self_training_resumes_its_strong_views_and_ramp(tmp_path: Path) -> None:
    """The strong view draws from the training stream, which checkpoints carry (``TrainingRandomState``), and the
    ramp is a function of progress: 6 steps uninterrupted equal 3 steps, a checkpoint mid-epoch, and 3 resumed
    steps in a module of another initialisation (resumable loaders as in tests/test_resume_dann_probe.py)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import CombinedLoader
    from test_resume import ResumableLoader, StopAt

    pairs = image_pairs(8)

    def module(seed: int) -> DANNModule:
        torch.manual_seed(seed)
        return tiny_dann(
            net=TinyImageNet(), self_training_weight=1.0, self_training_threshold=0.05, self_training_warmup=0.5
        )

    def loader() -> CombinedLoader:  # 2 steps per epoch
        sides = {side: ResumableLoader([p[side] for p in pairs], batch_size=4) for side in ("source", "target")}
        return CombinedLoader(sides, "max_size_cycle")

    settings = {"max_steps": 6, "max_epochs": -1, "log_every_n_steps": 1}
    recorder = TargetTermsRecorder()
    uninterrupted = module(0)
    make_trainer(**settings, callbacks=[recorder]).fit(uninterrupted, loader())
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    make_trainer(**settings, enable_checkpointing=True, callbacks=[StopAt(3), saver]).fit(module(0), loader())
    [ckpt] = sorted(tmp_path.glob("*.ckpt"))
    resumed_recorder = TargetTermsRecorder()
    resumed = module(1)
    make_trainer(**settings, callbacks=[resumed_recorder]).fit(resumed, loader(), ckpt_path=ckpt, weights_only=True)
    assert [r["step"] for r in resumed_recorder.rows] == [3, 4, 5]
    assert resumed_recorder.rows == recorder.rows[3:]  # the same losses, mask ratios and ramped weights
    assert recorder.rows[3]["train/self_training/loss_step"] > 0  # the strong view matters to the step
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_self_training_refuses_inputs_it_cannot_augment() -> None:
    model = tiny_dann(self_training_weight=1.0)  # TinyNet: (B, 4) vectors, not images
    with pytest.raises(ValueError, match=r"image batches \(B, C, H, W\) only.*self_training_weight: 0"):
        make_trainer(max_steps=1).fit(model, DataLoader(domain_pairs(8), batch_size=4))


def test_describe_names_the_target_terms() -> None:
    assert tiny_dann(mcc_weight=1.0).describe() == {"method": "dann+mcc"}
    assert tiny_dann(adversarial=False, mcc_weight=1.0).describe() == {"method": "source-only+mcc"}
    assert tiny_dann(adversarial=False, self_training_weight=1.0).describe() == {"method": "source-only+self-training"}
    both = tiny_dann(method="cdan", entropy_conditioning=False, self_training_weight=0.5, mcc_weight=0.1)
    assert both.describe() == {"method": "cdan+mcc+self-training"}
    off = tiny_dann(mcc_weight=0.0, self_training_weight=0.0)
    assert off.mcc is None and off.self_training is None and off.describe() == {"method": "dann"}
    # no parameters: the state dict is the same with or without the target terms
    assert tiny_dann(mcc_weight=1.0, self_training_weight=1.0).state_dict().keys() == off.state_dict().keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mcc_weight": -0.1}, "mcc_weight and self_training_weight must be finite and >= 0"),
        ({"self_training_weight": -1.0}, "must be finite and >= 0"),
        ({"mcc_weight": float("nan")}, "must be finite and >= 0"),
        ({"mcc_weight": 1.0, "mcc_temperature": 0.0}, "mcc_temperature must be positive"),
        ({"mcc_temperature": -2.0}, "mcc_temperature must be positive"),
        ({"self_training_threshold": 0.0}, r"self_training_threshold must be in \(0, 1\]"),
        ({"self_training_threshold": 1.2}, r"self_training_threshold must be in \(0, 1\]"),
        ({"self_training_warmup": -0.1}, r"self_training_warmup must be in \[0, 1\]"),
        ({"self_training_warmup": 1.5}, r"self_training_warmup must be in \[0, 1\]"),
    ],
)
def test_invalid_target_term_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    from tlmodules.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_dann(**kwargs)


def test_digits_with_cdan_mcc_and_self_training_under_bf16() -> None:
    """LeNet on the embedded pair (1×28×28 images, the strong view on real image batches) with CDAN+E, MCC and
    self-training, 3 steps in bf16-mixed: every logged training value is finite."""
    torch.manual_seed(0)
    data = DigitsDomainDataModule(batch_size=16)
    model = DANNModule(
        "builtin:lenet",
        num_classes=10,
        method="cdan",
        discriminator_hidden=32,
        projection_samples=0,
        mcc_weight=1.0,
        self_training_weight=1.0,
        self_training_threshold=0.5,
    )
    trainer = make_trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    for key in (
        "train/source/loss_step",
        "train/domain/loss_step",
        "train/mcc/loss_step",
        "train/self_training/loss_step",
        "train/self_training/mask_ratio_step",
        "train/self_training/weight",
    ):
        assert math.isfinite(float(metrics[key])), key


# ---------------------------------------------------------------------------------------------
# target BatchNorm statistics (AdaBN)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(10, 6), (10, 6, 5, 5)])
def test_target_statistics_follow_the_target_rows_only(shape: tuple[int, ...]) -> None:
    norm = nn.BatchNorm1d(6) if len(shape) == 2 else nn.BatchNorm2d(6)
    stats = TargetBatchNormStatistics([norm])
    x = torch.randn(*shape) * 3 + 1
    dims = [0, *range(2, len(shape))]
    norm.train()
    with stats.collecting(slice(6, 10)):
        norm(x)
    torch.testing.assert_close(norm.target_running_mean, 0.1 * x[6:].mean(dims))
    torch.testing.assert_close(norm.target_running_var, 0.9 + 0.1 * x[6:].var(dims, unbiased=True))
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean(dims))  # the shared statistics see every row
    before = norm.target_running_mean.clone()
    norm(x)  # outside collecting: the target statistics stay
    norm.eval()
    with stats.collecting(slice(0, 10)):
        norm(x)  # eval mode: nothing is gathered
    torch.testing.assert_close(norm.target_running_mean, before)


def test_target_statistics_are_applied_in_the_block_and_restored_after() -> None:
    norm = nn.BatchNorm1d(3).eval()
    stats = TargetBatchNormStatistics([norm])
    norm.target_running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    norm.target_running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(5, 3)
    shared = norm(x)
    with stats.applied():
        adapted = norm(x)
    expected = (x - norm.target_running_mean) / torch.sqrt(norm.target_running_var + norm.eps)
    torch.testing.assert_close(adapted, expected)
    torch.testing.assert_close(norm(x), shared)  # the shared statistics are back
    stats.adopt()
    torch.testing.assert_close(norm(x), expected)


def test_dann_target_batchnorm_evaluates_and_predicts_the_target_with_its_own_statistics(tmp_path: Path) -> None:
    data = domain_pairs(16, shift=3.0)
    model = tiny_dann(batch_norm=True, target_batchnorm=True)
    trainer = make_trainer(max_epochs=3)  # 6 steps
    trainer.fit(model, DataLoader(data, batch_size=8))
    norm = model.backbone.body.net[1]
    target = torch.stack([d["target"]["inputs"] for d in data])
    source = torch.stack([d["source"]["inputs"] for d in data])
    hidden = model.backbone.body.net[0]
    # the target statistics are those of the target rows (shifted by 3), the shared ones of both domains
    with torch.no_grad():
        gap = (norm.target_running_mean - norm.running_mean).abs().max()
        assert gap > 0.3, "the target statistics did not separate from the shared ones"
        assert (norm.target_running_mean - hidden(target).mean(0)).abs().max() < (
            norm.running_mean - hidden(target).mean(0)
        ).abs().max()
    model.eval()
    with torch.no_grad():
        shared_logits = model(target)
        with model.target_bn.applied():
            target_logits = model(target)
    assert not torch.allclose(shared_logits, target_logits)
    predicted = model.predict_step({"inputs": target, "index": torch.arange(len(target))}, 0)
    torch.testing.assert_close(predicted["probs"], target_logits.softmax(-1))
    loader = DataLoader([{"inputs": x, "labels": torch.tensor(0)} for x in source], batch_size=16)
    model._evaluate(next(iter(loader)), "val", 0)  # dataloader 0: the source keeps the shared statistics
    path = tmp_path / "adabn.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.testing.assert_close(state["backbone.body.net.1.target_running_mean"], norm.target_running_mean)
    assert model.describe()["method"] == "dann+target-bn"


def test_target_batchnorm_needs_the_target_batch() -> None:
    with pytest.raises(ConfigError, match="target_batchnorm gathers BatchNorm statistics .* set target_statistics"):
        tiny_dann(batch_norm=True, adversarial=False, target_statistics=False, target_batchnorm=True)


def test_export_of_a_target_batchnorm_dann_carries_the_target_statistics(tmp_path: Path) -> None:
    from tlmodules.export import export_module

    g = torch.Generator().manual_seed(0)
    pairs = [
        {
            "source": {"inputs": torch.randn(3, 28, 28, generator=g), "labels": torch.tensor(i % 3), "index": i},
            "target": {"inputs": torch.randn(3, 28, 28, generator=g) + 2.0, "labels": torch.tensor(0), "index": i},
        }
        for i in range(16)
    ]
    model = DANNModule(backbone="builtin:lenet", weights=None, num_classes=3, bottleneck=8, target_batchnorm=True)
    make_trainer(max_epochs=2).fit(model, DataLoader(pairs, batch_size=8))
    model.eval()
    images = torch.randn(5, 3, 28, 28, generator=g) + 2.0
    with torch.no_grad(), model.target_bn.applied():
        expected = model(images).softmax(-1)
    with torch.no_grad():
        assert not torch.allclose(model(images).softmax(-1), expected, atol=1e-4)
    shared_mean = model.bottleneck[1].running_mean.clone()
    folder = export_module(model, "torchscript", tmp_path / "ts")
    (got,) = torch.jit.load(str(folder / "model.pt"))(images)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.bottleneck[1].running_mean, shared_mean)  # the caller's model is kept


def test_target_batchnorm_estimates_adabn_statistics_over_the_target_training_split() -> None:
    from datamodules import DigitsOnPhotosDataModule

    digits = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits" / "mnist_t10k"
    data = DigitsOnPhotosDataModule(digits_dir=str(digits), source_size=200, target_size=150, batch_size=32)
    model = DANNModule(backbone="builtin:lenet", weights=None, bottleneck=8, target_batchnorm=True, lr=0.01)
    make_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=data)  # no validation: at train end
    norm = model.bottleneck[1]
    # AdaBN by hand: every target training image once, dropout off, the mean of the batch statistics
    inputs = [b["inputs"] for b in data.target.ordered_dataloader("train")]
    model.eval()
    with torch.no_grad():
        hidden = [model.bottleneck[0](model.backbone(x)) for x in inputs]
    means = torch.stack([h.mean(0) for h in hidden])
    variances = torch.stack([h.var(0, unbiased=True) for h in hidden])
    torch.testing.assert_close(norm.target_running_mean, means.mean(0))
    torch.testing.assert_close(norm.target_running_var, variances.mean(0))
    assert not torch.allclose(norm.running_mean, norm.target_running_mean, atol=1e-3)
    assert norm.momentum == 0.1 and norm.num_batches_tracked == 3  # the layer's own statistics were restored
    # evaluation on the target uses them: the target accuracy equals the one computed with them by hand
    metrics = make_trainer().test(model, datamodule=data, verbose=False)[0]
    loader = data.target.test_dataloader()
    with torch.no_grad(), model.target_bn.applied():
        correct = sum(int((model(b["inputs"]).argmax(-1) == b["labels"]).sum()) for b in loader)
    assert metrics["test/target/acc"] == pytest.approx(correct / sum(len(b["labels"]) for b in loader))


def test_target_batchnorm_passes_once_per_validation_and_not_again_at_train_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datamodules import DigitsOnPhotosDataModule

    digits = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits" / "mnist_t10k"
    data = DigitsOnPhotosDataModule(digits_dir=str(digits), source_size=64, target_size=64, batch_size=16)
    model = DANNModule(backbone="builtin:lenet", weights=None, bottleneck=8, target_batchnorm=True, lr=0.01)
    passes: list[int] = []
    estimate = model.target_bn.estimate
    monkeypatch.setattr(model.target_bn, "estimate", lambda *a: passes.append(estimate(*a)) or passes[-1])
    # 2 epochs of 2 steps, a validation after each: the last one follows the last step
    make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=data)
    assert len(passes) == 2 and all(n > 0 for n in passes)
    # validating only every other epoch leaves steps after the last validation: train end estimates again
    passes.clear()
    model = DANNModule(backbone="builtin:lenet", weights=None, bottleneck=8, target_batchnorm=True, lr=0.01)
    estimate = model.target_bn.estimate
    monkeypatch.setattr(model.target_bn, "estimate", lambda *a: passes.append(estimate(*a)) or passes[-1])
    make_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=2).fit(
        model, datamodule=data
    )
    assert len(passes) == 2  # after epoch 2, and at the end (epoch 3 trained after it)
