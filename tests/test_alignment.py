"""The domain alignment losses of tlmodules.alignment: DANN's DomainAdversarialLoss and CDAN's (CDAN+E's)
ConditionalDomainAdversarialLoss against a direct computation written here, their gradient reversal, CDAN's
conditioning on detached predictions and CDAN+E's sample weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.alignment import ConditionalDomainAdversarialLoss, DomainAdversarialLoss
from tlmodules.heads import DomainDiscriminator

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
