"""The domain alignment losses of tlmodules.alignment: DANN's DomainAdversarialLoss and CDAN's (CDAN+E's)
ConditionalDomainAdversarialLoss against a direct computation written here, their gradient reversal, CDAN's
conditioning on detached predictions and CDAN+E's sample weights; MCC's class confusion and FixMatch-style
self-training against loops written here, their gradients, and the strong augmentation of image batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.alignment import (
    ConditionalDomainAdversarialLoss,
    ConfidenceThresholdedSelfTraining,
    DomainAdversarialLoss,
    MinimumClassConfusionLoss,
    StrongAugmentBatch,
)
from tlmodules.heads import DomainDiscriminator
from tlmodules.schedules import linear_ramp

WIDTH, NUM_CLASSES, B_S, B_T = 6, 3, 5, 7
METHODS = ["dann", "cdan", "cdan+e"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one OpenMP thread


def make_loss(method: str, discriminator: nn.Module | None = None) -> nn.Module:
    """The loss module of ``method`` around ``discriminator`` (default: a BatchNorm ``DomainDiscriminator``)."""
    width = WIDTH * (1 if method == "dann" else NUM_CLASSES)
    disc = discriminator if discriminator is not None else DomainDiscriminator(width, hidden=8, layers=2)
    if method == "dann":
        return DomainAdversarialLoss(disc)
    return ConditionalDomainAdversarialLoss(disc, entropy_conditioning=method == "cdan+e")


def call(loss: nn.Module, f_s: Tensor, f_t: Tensor, logits_s: Tensor, logits_t: Tensor, coefficient: float):
    if isinstance(loss, ConditionalDomainAdversarialLoss):
        return loss(f_s, f_t, logits_s, logits_t, coefficient)
    return loss(f_s, f_t, coefficient)


def random_inputs(seed: int = 0, requires_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(B_S, WIDTH, generator=g)
    f_t = torch.randn(B_T, WIDTH, generator=g) + 0.5
    logits_s = torch.randn(B_S, NUM_CLASSES, generator=g) * 2
    logits_t = torch.randn(B_T, NUM_CLASSES, generator=g) * 2
    return f_s.requires_grad_(requires_grad), f_t.requires_grad_(requires_grad), logits_s, logits_t


def direct(
    method: str, disc: nn.Module, f_s: Tensor, f_t: Tensor, logits_s: Tensor, logits_t: Tensor
) -> tuple[Tensor, Tensor]:
    """The loss and accuracy written out: no gradient reversal, per-sample BCE from the sigmoid, explicit
    per-domain weights. The discriminator sees both domains as one batch (its BatchNorm statistics)."""
    if method == "dann":
        x_s, x_t = f_s, f_t
    else:
        p_s, p_t = logits_s.softmax(-1), logits_t.softmax(-1)
        x_s = torch.einsum("bc,bw->bcw", p_s, f_s).reshape(len(f_s), -1)
        x_t = torch.einsum("bc,bw->bcw", p_t, f_t).reshape(len(f_t), -1)
    d = disc(torch.cat([x_s, x_t]))
    d_s, d_t = d[: len(f_s)], d[len(f_s) :]
    bce_s = F.binary_cross_entropy(torch.sigmoid(d_s), torch.ones(len(f_s)), reduction="none")
    bce_t = F.binary_cross_entropy(torch.sigmoid(d_t), torch.zeros(len(f_t)), reduction="none")
    if method == "cdan+e":
        terms = []
        for bce, p in ((bce_s, p_s), (bce_t, p_t)):
            h = -(p * p.log()).sum(-1)
            w = 1 + torch.exp(-h)
            terms.append(sum(bce[i] * w[i] for i in range(len(bce))) / w.sum())
        loss = 0.5 * (terms[0] + terms[1])
    else:
        loss = 0.5 * (bce_s.sum() / len(bce_s) + bce_t.sum() / len(bce_t))
    correct_s = sum(float(v) > 0 for v in d_s.detach()) / len(d_s)
    correct_t = sum(float(v) <= 0 for v in d_t.detach()) / len(d_t)
    return loss, torch.tensor(0.5 * (correct_s + correct_t))


class Recording(nn.Module):
    """Wraps a discriminator (default: logit 0 for every sample, a zero bias) and keeps its inputs and its
    logits, the latter with their gradient."""

    def __init__(self, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.inputs = x
        self.logits = (self.inner(x) if self.inner is not None else x.sum(-1) * 0.0) + self.bias
        self.logits.retain_grad()
        return self.logits


@pytest.mark.parametrize("method", METHODS)
def test_loss_and_accuracy_equal_a_direct_computation(method: str) -> None:
    torch.manual_seed(1)
    loss_module = make_loss(method)
    f_s, f_t, logits_s, logits_t = random_inputs()
    loss, accuracy = call(loss_module, f_s, f_t, logits_s, logits_t, 0.7)
    expected_loss, expected_accuracy = direct(method, loss_module.discriminator, f_s, f_t, logits_s, logits_t)
    assert loss.shape == accuracy.shape == ()
    assert loss.dtype == accuracy.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(accuracy, expected_accuracy)
    assert not accuracy.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_accuracy_counts_each_domain_separately(method: str) -> None:
    """Known logits: 3 of 5 source samples above 0, 2 of 7 target samples at or below 0 → (3/5 + 2/7) / 2."""
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0] + [0.0, -3.0, 1.0, 2.0, 3.0, 4.0, 5.0])

    class Fixed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return logits + x.sum(-1) * 0.0

    f_s, f_t, logits_s, logits_t = random_inputs()
    _, accuracy = call(make_loss(method, Fixed()), f_s, f_t, logits_s, logits_t, 1.0)
    assert float(accuracy) == pytest.approx(0.5 * (3 / 5 + 2 / 7))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coefficient", [1.0, 0.3])
def test_features_get_the_reversed_gradient_and_the_discriminator_the_plain_one(
    method: str, coefficient: float
) -> None:
    """Through the gradient reversal layer the features get ``-coefficient`` times the gradient of the direct
    (unreversed) loss; the discriminator's parameters get that gradient unchanged, whatever the coefficient."""
    torch.manual_seed(2)
    loss_module = make_loss(method)
    disc_params = list(loss_module.discriminator.parameters())
    f_s, f_t, logits_s, logits_t = random_inputs(3)
    loss, _ = call(loss_module, f_s, f_t, logits_s, logits_t, coefficient)
    adversarial = torch.autograd.grad(loss, [f_s, f_t, *disc_params])
    plain_loss, _ = direct(method, loss_module.discriminator, f_s, f_t, logits_s, logits_t)
    plain = torch.autograd.grad(plain_loss, [f_s, f_t, *disc_params])
    for got, want in zip(adversarial[:2], plain[:2]):
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(got, -coefficient * want)
    for got, want in zip(adversarial[2:], plain[2:]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["cdan", "cdan+e"])
def test_cdan_conditions_the_discriminator_on_detached_predictions(method: str) -> None:
    """The discriminator sees one batch of ``p ⊗ f`` flattened to ``(B_s + B_t, W·C)`` (class-major), and the
    logits get no gradient: the predictions condition the discriminator but are not trained by it."""
    torch.manual_seed(4)
    disc = Recording(DomainDiscriminator(WIDTH * NUM_CLASSES, hidden=8))
    loss_module = make_loss(method, disc)
    f_s, f_t, logits_s, logits_t = random_inputs(5)
    logits_s.requires_grad_(True)
    logits_t.requires_grad_(True)
    loss, _ = loss_module(f_s, f_t, logits_s, logits_t, 1.0)
    assert disc.inputs.shape == (B_S + B_T, WIDTH * NUM_CLASSES)
    probs = torch.cat([logits_s, logits_t]).detach().softmax(-1)
    feats = torch.cat([f_s, f_t]).detach()
    expected = torch.stack([torch.outer(p, f).flatten() for p, f in zip(probs, feats)])
    torch.testing.assert_close(disc.inputs.detach(), expected)
    grads = torch.autograd.grad(loss, [logits_s, logits_t, f_s, f_t], allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2] is not None and grads[3] is not None  # the features are on the path


def test_cdan_e_weighs_confident_samples_more() -> None:
    """At equal discriminator logits the loss's gradient on each sample's logit is proportional to its weight
    ``1 + exp(-H(p))``: a one-hot prediction weighs 2, a uniform one ``1 + 1/C``. Plain CDAN weighs them alike."""
    f_s = torch.randn(2, WIDTH)
    f_t = torch.randn(4, WIDTH)
    logits_s = torch.tensor([[40.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # one-hot, uniform
    logits_t = torch.randn(4, NUM_CLASSES)

    def sample_grads(method: str) -> Tensor:
        disc = Recording()
        loss, _ = make_loss(method, disc)(f_s, f_t, logits_s, logits_t, 1.0)
        loss.backward()
        return disc.logits.grad[:2].abs()

    confident, uniform = sample_grads("cdan+e")
    assert confident > uniform
    assert float(confident / uniform) == pytest.approx(2.0 / (1.0 + 1.0 / NUM_CLASSES), rel=1e-5)
    confident, uniform = sample_grads("cdan")
    assert float(confident) == pytest.approx(float(uniform))


@pytest.mark.parametrize("sizes", [(2, 9), (7, 3)])
def test_cdan_e_weights_sum_to_one_per_domain(sizes: tuple[int, int]) -> None:
    """A discriminator at logit 0 everywhere gives ``log 2`` whatever the batch sizes and the predictions."""
    b_s, b_t = sizes
    loss, accuracy = make_loss("cdan+e", Recording())(
        torch.randn(b_s, WIDTH), torch.randn(b_t, WIDTH), torch.randn(b_s, NUM_CLASSES) * 3, torch.randn(b_t, 3), 1.0
    )
    assert float(loss.detach()) == pytest.approx(math.log(2.0))
    assert float(accuracy) == pytest.approx(0.5)  # every target sample right (logit <= 0), no source sample


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_owns_its_discriminator(method: str) -> None:
    disc = DomainDiscriminator(WIDTH * (1 if method == "dann" else NUM_CLASSES), hidden=8)
    loss_module = make_loss(method, disc)
    assert loss_module.discriminator is disc
    assert list(loss_module.parameters()) == list(disc.parameters())
    assert all(k.startswith("discriminator.") for k in loss_module.state_dict())
    if method != "dann":
        assert f"entropy_conditioning={method == 'cdan+e'}" in repr(loss_module)


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_is_float32_under_bf16_autocast(method: str) -> None:
    torch.manual_seed(6)
    loss_module = make_loss(method)
    f_s, f_t, logits_s, logits_t = random_inputs(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, accuracy = call(loss_module, f_s.bfloat16(), f_t.bfloat16(), logits_s.bfloat16(), logits_t, 1.0)
    assert loss.dtype == accuracy.dtype == torch.float32
    assert math.isfinite(float(loss.detach()))
    (grad,) = torch.autograd.grad(loss, f_s)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# MCC: minimum class confusion
# ---------------------------------------------------------------------------------------------
def mcc_by_hand(logits: np.ndarray, temperature: float) -> float:
    """MCC (Jin et al., ECCV 2020) written out in float64 loops: softmax(z / T), entropy weights
    ``B (1 + e^{-H_i}) / Σ_j (1 + e^{-H_j})``, confusion ``Σ_i w_i ŷ_ij ŷ_ik``, rows divided by their sums, the
    off-diagonal mass divided by C."""
    batch, classes = logits.shape
    probs = []
    for row in logits / temperature:
        e = [math.exp(v - max(row)) for v in row]
        probs.append([v / sum(e) for v in e])
    raw = [1 + math.exp(sum(p * math.log(p) for p in row if p > 0)) for row in probs]  # 1 + exp(-H)
    weights = [batch * r / sum(raw) for r in raw]
    confusion = [
        [sum(weights[i] * probs[i][j] * probs[i][k] for i in range(batch)) for k in range(classes)]
        for j in range(classes)
    ]
    normalised = [[confusion[j][k] / sum(confusion[j]) for k in range(classes)] for j in range(classes)]
    off_diagonal = sum(normalised[j][k] for j in range(classes) for k in range(classes) if j != k)
    return off_diagonal / classes


@pytest.mark.parametrize(("batch", "classes", "temperature"), [(8, 3, 2.5), (5, 7, 1.0), (16, 4, 0.5)])
def test_mcc_equals_a_direct_computation(batch: int, classes: int, temperature: float) -> None:
    logits = torch.randn(batch, classes, generator=torch.Generator().manual_seed(batch)) * 3
    loss = MinimumClassConfusionLoss(temperature)(logits)
    assert loss.shape == () and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(mcc_by_hand(logits.double().numpy(), temperature), rel=1e-5)
    # the confusion matrix is symmetric, so dividing by the column sums (the authors' broadcast) is the same
    probs = (logits.double() / temperature).softmax(-1)
    h = -(probs * probs.log()).sum(-1)
    w = batch * (1 + torch.exp(-h)) / (1 + torch.exp(-h)).sum()
    confusion = (probs * w[:, None]).t() @ probs
    by_columns = confusion / confusion.sum(1)  # broadcast over the last dimension: column j divided by sum j
    assert float(loss) == pytest.approx(float((by_columns.sum() - by_columns.trace()) / classes), rel=1e-5)


def test_mcc_is_zero_for_confident_distinct_predictions_and_largest_for_uniform_ones() -> None:
    classes = 4
    confident = F.one_hot(torch.arange(2 * classes) % classes, classes).float() * 60
    assert float(MinimumClassConfusionLoss()(confident)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(6, classes)
    assert float(MinimumClassConfusionLoss()(uniform)) == pytest.approx((classes - 1) / classes, rel=1e-6)
    middling = float(MinimumClassConfusionLoss()(torch.randn(6, classes)))
    assert 0.0 < middling < (classes - 1) / classes
    # a class no sample predicts has a zero row (not 0 / 0)
    no_class_three = F.one_hot(torch.arange(6) % 3, classes).float() * 60 - 300 * F.one_hot(torch.full((6,), 3), 4)
    loss = MinimumClassConfusionLoss(1.0)(no_class_three)
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(0.0, abs=1e-6)


def test_mcc_gradient_reaches_the_logits_through_the_probabilities_not_the_weights() -> None:
    """The entropy weights are constants (as in the authors' code and TLlib): the gradient equals that of the
    same computation with the weights detached, and differs from the one that differentiates them too."""
    temperature = 2.0
    logits = (torch.randn(10, 5, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(MinimumClassConfusionLoss(temperature)(logits), logits)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-4

    def written_out(detach: bool) -> Tensor:
        probs = (logits / temperature).softmax(-1)
        raw = 1 + torch.exp((probs * probs.log()).sum(-1))
        raw = raw.detach() if detach else raw
        w = len(logits) * raw / raw.sum()
        confusion = (probs * w[:, None]).t() @ probs
        confusion = confusion / confusion.sum(1, keepdim=True)
        (g,) = torch.autograd.grad((confusion.sum() - confusion.trace()) / logits.shape[1], logits)
        return g

    torch.testing.assert_close(grad, written_out(detach=True))
    assert not torch.allclose(grad, written_out(detach=False), atol=1e-6)


def test_mcc_is_float32_under_bf16_and_refuses_a_non_positive_temperature() -> None:
    logits = torch.randn(6, 3).bfloat16().requires_grad_(True)
    loss = MinimumClassConfusionLoss()(logits)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be positive"):
            MinimumClassConfusionLoss(bad)
    assert "temperature=2.5" in repr(MinimumClassConfusionLoss())


# ---------------------------------------------------------------------------------------------
# self-training: confidence-thresholded pseudo-labels
# ---------------------------------------------------------------------------------------------
def self_training_by_hand(weak: Tensor, strong: Tensor, threshold: float) -> tuple[float, float]:
    total, kept = 0.0, 0
    for w_row, s_row in zip(weak.double().tolist(), strong.double().tolist()):
        e = [math.exp(v - max(w_row)) for v in w_row]
        probs = [v / sum(e) for v in e]
        label = max(range(len(probs)), key=probs.__getitem__)
        if probs[label] >= threshold:
            kept += 1
            log_norm = max(s_row) + math.log(sum(math.exp(v - max(s_row)) for v in s_row))
            total += log_norm - s_row[label]
    return total / len(weak), kept / len(weak)  # divided by B, not by the number kept


@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_self_training_equals_a_direct_computation(threshold: float) -> None:
    g = torch.Generator().manual_seed(7)
    weak = torch.randn(12, 4, generator=g) * 4
    strong = torch.randn(12, 4, generator=g) * 2
    loss, ratio = ConfidenceThresholdedSelfTraining(threshold)(weak, strong)
    expected_loss, expected_ratio = self_training_by_hand(weak, strong, threshold)
    assert loss.shape == ratio.shape == () and loss.dtype == ratio.dtype == torch.float32
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    assert float(ratio) == pytest.approx(expected_ratio)
    assert not ratio.requires_grad


def test_self_training_mask_ratio_and_normalisation_by_the_batch_size() -> None:
    """Confidences 0.97, 0.5, 1/3, 0.9 (exactly at the threshold: kept): a mask ratio of 2/4, and the loss is the
    kept samples' cross-entropy summed and divided by 4."""
    weak = torch.tensor(
        [[math.log(0.97), math.log(0.03)], [0.0, 0.0], [0.0, 0.0], [math.log(0.1), math.log(0.9)]]
    ).double()
    weak = torch.cat([weak, torch.full((4, 1), -1e9, dtype=torch.float64)], 1)  # a third, impossible class
    weak[2] = torch.zeros(3, dtype=torch.float64)  # uniform over three
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]])
    loss, ratio = ConfidenceThresholdedSelfTraining(0.9)(weak, strong)
    assert float(ratio) == pytest.approx(0.5)
    kept = F.cross_entropy(strong[[0, 3]], torch.tensor([0, 1]), reduction="sum")
    assert float(loss) == pytest.approx(float(kept) / 4)
    nothing, none_kept = ConfidenceThresholdedSelfTraining(0.99)(weak, strong)
    assert float(none_kept) == 0.0 and float(nothing) == 0.0


def test_self_training_trains_the_strong_view_and_not_the_weak_one() -> None:
    g = torch.Generator().manual_seed(8)
    weak = (torch.randn(10, 3, generator=g) * 3).requires_grad_(True)
    strong = torch.randn(10, 3, generator=g).requires_grad_(True)
    loss, ratio = ConfidenceThresholdedSelfTraining(0.8)(weak, strong)
    assert 0.0 < float(ratio) < 1.0
    grad_weak, grad_strong = torch.autograd.grad(loss, [weak, strong], allow_unused=True)
    assert grad_weak is None  # the pseudo-labels are targets: no gradient reaches the weak logits
    confident = weak.detach().softmax(-1).max(-1).values >= 0.8
    assert (grad_strong[confident].abs().sum(-1) > 0).all()
    assert (grad_strong[~confident] == 0).all()  # unconfident samples are masked out
    # the gradient of (1/B) Σ_kept CE: softmax minus the one-hot pseudo-label, over B
    labels = weak.detach().argmax(-1)
    expected = (strong.detach().softmax(-1) - F.one_hot(labels, 3)) / len(weak) * confident[:, None]
    torch.testing.assert_close(grad_strong, expected)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_self_training_refuses_a_threshold_outside_zero_one(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        ConfidenceThresholdedSelfTraining(threshold)


@pytest.mark.parametrize(
    ("progress", "warmup", "expected"),
    [(0.0, 0.0, 1.0), (0.3, 0.0, 1.0), (0.0, 0.4, 0.0), (0.1, 0.4, 0.25), (0.4, 0.4, 1.0), (0.9, 0.4, 1.0)],
)
def test_linear_ramp(progress: float, warmup: float, expected: float) -> None:
    assert linear_ramp(progress, warmup) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# the strong view: StrongAugmentBatch
# ---------------------------------------------------------------------------------------------
OFF = {"degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0), "shear": 0.0}
NO_COLOUR = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "erase": 0.0}


def test_strong_augment_with_every_strength_at_zero_is_the_identity() -> None:
    images = torch.randn(4, 3, 12, 10)
    out = StrongAugmentBatch(**OFF, **NO_COLOUR)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    torch.testing.assert_close(out, images, atol=1e-4, rtol=0)  # float32 grid rounding


def test_strong_augment_gives_each_image_its_own_draw_and_repeats_with_a_seed() -> None:
    images = torch.rand(1, 3, 16, 16).repeat(6, 1, 1, 1)
    augment = StrongAugmentBatch()
    torch.manual_seed(3)
    first = augment(images)
    assert all(not torch.allclose(first[0], first[i]) for i in range(1, 6))
    torch.manual_seed(3)
    torch.testing.assert_close(augment(images), first)  # the global generator: the training stream
    own = StrongAugmentBatch().manual_seed(5)
    state = own.get_rng_state()
    a = own(images)
    other = StrongAugmentBatch()
    other.set_rng_state(state)
    torch.testing.assert_close(other(images), a)
    assert other.get_rng_state() is not None and StrongAugmentBatch().get_rng_state() is None
    assert augment(images.bfloat16()).dtype == torch.bfloat16


def test_strong_augment_colour_jitter_is_relative_to_each_image() -> None:
    """Contrast alone scales each image's deviations from its mean by a factor in ``1 ± contrast``; brightness
    alone shifts each image by at most ``brightness`` times its standard deviation."""
    torch.manual_seed(0)
    images = torch.randn(8, 1, 9, 9) * torch.linspace(0.5, 3, 8).view(8, 1, 1, 1) + 4
    mean = images.mean((1, 2, 3), keepdim=True)
    out = StrongAugmentBatch(**OFF, **{**NO_COLOUR, "contrast": 0.4})(images)
    factor = ((out - mean) / (images - mean)).flatten(1)
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor), atol=1e-3, rtol=1e-3)
    assert ((factor[:, 0] >= 0.6 - 1e-4) & (factor[:, 0] <= 1.4 + 1e-4)).all() and factor[:, 0].std() > 0.01
    out = StrongAugmentBatch(**OFF, **{**NO_COLOUR, "brightness": 0.5})(images)
    shift = (out - images).flatten(1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-4, rtol=0)
    std = images.flatten(1).std(1, unbiased=False)
    assert (shift[:, 0].abs() <= 0.5 * std + 1e-4).all() and shift[:, 0].abs().max() > 0.05


def test_strong_augment_erases_a_box_filled_with_the_image_mean() -> None:
    torch.manual_seed(1)
    images = torch.rand(32, 2, 20, 20) + torch.arange(32).view(32, 1, 1, 1)  # no pixel equals an image's mean
    out = StrongAugmentBatch(**OFF, **{**NO_COLOUR, "erase": 0.5})(images)
    changed = ((out - images).abs() > 1e-3).any(1)  # (B, H, W); elsewhere only the identity grid's rounding
    mean = images.mean((1, 2, 3))
    largest = 0
    for b in range(len(images)):
        rows, cols = changed[b].any(1).nonzero().flatten(), changed[b].any(0).nonzero().flatten()
        if len(rows) == 0:
            continue
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(changed[b].sum()) == height * width  # a rectangle
        assert height <= 10 and width <= 10  # at most half the height and half the width
        erased = out[b][:, changed[b]]
        torch.testing.assert_close(erased, torch.full_like(erased, float(mean[b])), atol=1e-4, rtol=0)
        largest = max(largest, height * width)
    assert largest >= 25


def test_strong_augment_refuses_non_batches_and_bad_ranges() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        StrongAugmentBatch()(torch.zeros(3, 8, 8))
    for bad in ({"erase": 1.5}, {"contrast": -0.1}, {"scale": (1.2, 0.8)}, {"translate": 1.0}, {"shear": -1.0}):
        with pytest.raises(ValueError, match="need degrees >= 0"):
            StrongAugmentBatch(**bad)
