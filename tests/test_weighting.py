"""Multi-task loss weighting: each strategy's total against its formula worked by hand, missing tasks,
gradients, the learned / per-epoch / per-step state, and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tlmodules.weighting import (
    DynamicWeightAverage,
    EqualWeighting,
    LossWeighting,
    RandomLossWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
)

TASKS = ["a", "b", "c"]
LOSSES = {"a": 2.0, "b": 0.5, "c": 3.0}
KINDS = {"a": "regression", "b": "multiclass", "c": "binary"}
STATIC = {"a": 2.0, "c": 0.1}  # b gets 1.0
LOG_VARS = [0.3, -0.2, 1.1]
# Two DWA epochs of means, so its weights are no longer all 1.
DWA_EPOCHS = [{"a": 2.0, "b": 1.0, "c": 4.0}, {"a": 1.0, "b": 1.0, "c": 5.0}]
NAMES = ["equal", "static", "uncertainty", "dwa", "rlw"]
STEP = 7


def tensors(values: dict[str, float], requires_grad: bool = False, dtype: torch.dtype = torch.float32):
    return {k: torch.tensor(v, dtype=dtype, requires_grad=requires_grad) for k, v in values.items()}


def make(name: str) -> LossWeighting:
    """Each strategy in a state where its weights are not all 1 (except 'equal')."""
    if name == "equal":
        return build_weighting("equal", TASKS)
    if name == "static":
        return build_weighting("static", TASKS, weights=STATIC)
    if name == "uncertainty":
        module = build_weighting("uncertainty", TASKS, kinds=KINDS)
        with torch.no_grad():
            module.log_vars.copy_(torch.tensor(LOG_VARS))
        return module
    if name == "dwa":
        module = build_weighting("dwa", TASKS, temperature=2.0)
        for epoch in DWA_EPOCHS:
            module.end_epoch(epoch)
        return module
    return build_weighting("rlw", TASKS, seed=3)


def uncertainty_term(kind: str, s: float, loss: float) -> float:
    factor = 0.5 if kind == "regression" else 1.0
    return factor * math.exp(-s) * loss + 0.5 * s


def rlw_by_hand(seed: int, step: int, k: int) -> list[float]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    z = torch.randn(k, generator=g).tolist()
    exps = [math.exp(v) for v in z]
    return [e / sum(exps) for e in exps]


def dwa_by_hand(older: dict[str, float], last: dict[str, float], temperature: float) -> dict[str, float]:
    r = {t: last[t] / older[t] for t in TASKS}
    exps = {t: math.exp(r[t] / temperature) for t in TASKS}
    return {t: len(TASKS) * exps[t] / sum(exps.values()) for t in TASKS}


def expected_weights(name: str) -> dict[str, float]:
    """The multiplier of each L_t, worked out from the papers' formulas (not from the module)."""
    if name == "equal":
        return {"a": 1.0, "b": 1.0, "c": 1.0}
    if name == "static":
        return {"a": 2.0, "b": 1.0, "c": 0.1}
    if name == "uncertainty":
        return {t: (0.5 if KINDS[t] == "regression" else 1.0) * math.exp(-s) for t, s in zip(TASKS, LOG_VARS)}
    if name == "dwa":
        return dwa_by_hand(DWA_EPOCHS[0], DWA_EPOCHS[1], 2.0)
    return dict(zip(TASKS, rlw_by_hand(3, STEP, 3)))


def expected_total(name: str, losses: dict[str, float]) -> float:
    if name == "uncertainty":
        return sum(uncertainty_term(KINDS[t], s, losses[t]) for t, s in zip(TASKS, LOG_VARS) if t in losses)
    w = expected_weights(name)
    return sum(w[t] * losses[t] for t in losses)


# --- totals against the formulas ---------------------------------------------------------------------------------


def test_equal_total_is_the_plain_sum() -> None:
    total, logged = EqualWeighting(TASKS)(tensors(LOSSES))
    assert_close(total, torch.tensor(5.5))
    assert logged == {"weight/a": 1.0, "weight/b": 1.0, "weight/c": 1.0}


def test_static_total_and_default_weight_one() -> None:
    total, logged = StaticWeighting(TASKS, STATIC)(tensors(LOSSES))
    assert_close(total, torch.tensor(2.0 * 2.0 + 1.0 * 0.5 + 0.1 * 3.0))
    assert logged == {"weight/a": 2.0, "weight/b": 1.0, "weight/c": pytest.approx(0.1)}


def test_uncertainty_total_at_init_and_after_learning() -> None:
    module = UncertaintyWeighting(TASKS, KINDS)
    total, logged = module(tensors(LOSSES))
    # s = 0: 0.5·L for regression, L for classification; the 0.5·s terms vanish.
    assert_close(total, torch.tensor(0.5 * 2.0 + 0.5 + 3.0))
    assert logged["weight/a"] == 0.5 and logged["weight/b"] == 1.0 and logged["weight/c"] == 1.0
    assert all(logged[f"log_var/{t}"] == 0.0 for t in TASKS)

    with torch.no_grad():
        module.log_vars.copy_(torch.tensor(LOG_VARS))
    total, logged = module(tensors(LOSSES))
    by_hand = (
        0.5 * math.exp(-0.3) * 2.0 + 0.5 * 0.3 + math.exp(0.2) * 0.5 + 0.5 * -0.2 + math.exp(-1.1) * 3.0 + 0.5 * 1.1
    )
    assert_close(total, torch.tensor(by_hand))
    assert logged["weight/a"] == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)
    assert logged["weight/b"] == pytest.approx(math.exp(0.2), rel=1e-6)
    assert logged["weight/c"] == pytest.approx(math.exp(-1.1), rel=1e-6)
    assert [logged[f"log_var/{t}"] for t in TASKS] == pytest.approx(LOG_VARS, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_total_matches_formula_and_logs_every_weight(name: str) -> None:
    module = make(name)
    total, logged = module(tensors(LOSSES), step=STEP)
    assert total.shape == () and total.dtype == torch.float32
    assert_close(total, torch.tensor(expected_total(name, LOSSES)))
    expected = expected_weights(name)
    for task in TASKS:
        assert isinstance(logged[f"weight/{task}"], float)
        assert logged[f"weight/{task}"] == pytest.approx(expected[task], rel=1e-5)
    assert module.weights(STEP) == pytest.approx(expected, rel=1e-5)


def test_build_weighting_returns_each_class() -> None:
    assert type(make("equal")) is EqualWeighting
    assert type(make("static")) is StaticWeighting
    assert type(make("uncertainty")) is UncertaintyWeighting
    assert type(make("dwa")) is DynamicWeightAverage
    assert type(make("rlw")) is RandomLossWeighting
    assert make("dwa").temperature == 2.0 and make("rlw").seed == 3


# --- tasks without a loss in the batch ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["none", "omitted"])
def test_task_without_loss_contributes_nothing(name: str, how: str) -> None:
    module = make(name)
    losses = tensors(LOSSES)
    if how == "none":
        losses["b"] = None
    else:
        del losses["b"]
    total, logged = module(losses, step=STEP)
    assert torch.isfinite(total)
    assert_close(total, torch.tensor(expected_total(name, {"a": 2.0, "c": 3.0})))
    assert set(logged) >= {"weight/a", "weight/b", "weight/c"}
    assert all(math.isfinite(v) for v in logged.values())


@pytest.mark.parametrize("name", NAMES)
def test_no_loss_at_all_gives_zero(name: str) -> None:
    module = make(name)
    for losses in ({}, {"a": None, "b": None, "c": None}):
        total, logged = module(losses, step=STEP)
        assert total.shape == () and total.dtype == torch.float32 and total.device.type == "cpu"
        assert total.item() == 0.0
        assert {f"weight/{t}" for t in TASKS} <= set(logged)


# --- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_gradient_of_each_loss_is_its_reported_weight(name: str) -> None:
    module = make(name)
    losses = tensors(LOSSES, requires_grad=True)
    total, logged = module(losses, step=STEP)
    total.backward()
    for task in TASKS:
        assert losses[task].grad is not None
        assert_close(losses[task].grad, torch.tensor(logged[f"weight/{task}"]))
        assert logged[f"weight/{task}"] == pytest.approx(expected_weights(name)[task], rel=1e-5)


def test_uncertainty_log_vars_are_parameters_with_analytic_gradients() -> None:
    module = UncertaintyWeighting(TASKS, KINDS)
    assert any(p is module.log_vars for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == len(TASKS)
    with torch.no_grad():
        module.log_vars.copy_(torch.tensor(LOG_VARS))
    losses = tensors(LOSSES)
    losses["b"] = None  # b adds neither term: its log-variance gets no gradient
    total, _ = module(losses)
    total.backward()
    s_a, s_b, s_c = LOG_VARS
    expected = torch.tensor(
        [
            -0.5 * math.exp(-s_a) * LOSSES["a"] + 0.5,  # regression
            0.0,  # missing
            -math.exp(-s_c) * LOSSES["c"] + 0.5,  # classification
        ]
    )
    assert_close(module.log_vars.grad, expected)


def test_uncertainty_sgd_moves_log_vars_to_their_optimum() -> None:
    # Regression optimum s* = log L, classification optimum s* = log 2L.
    losses = {"a": 4.0, "b": 0.2, "c": 1.0}
    optimum = torch.tensor([math.log(4.0), math.log(0.4), math.log(2.0)])
    module = UncertaintyWeighting(TASKS, KINDS)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.2)
    distance = (module.log_vars.detach() - optimum).abs()
    for _ in range(3):
        optimizer.zero_grad()
        module(tensors(losses))[0].backward()
        optimizer.step()
        new_distance = (module.log_vars.detach() - optimum).abs()
        assert (new_distance < distance).all()
        distance = new_distance
    # a (regression, L=4) rises towards log 4; b (classification, L=0.2) falls towards log 0.4.
    assert module.log_vars[0] > 0 and module.log_vars[1] < 0
    for _ in range(400):
        optimizer.zero_grad()
        module(tensors(losses))[0].backward()
        optimizer.step()
    assert_close(module.log_vars.detach(), optimum, atol=1e-4, rtol=0)


# --- DWA -------------------------------------------------------------------------------------------------------


def test_dwa_weights_are_one_until_two_epochs_then_follow_the_formula() -> None:
    module = DynamicWeightAverage(TASKS, temperature=2.0)
    assert module.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    module.end_epoch(DWA_EPOCHS[0])
    assert module.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    total, _ = module(tensors(LOSSES))
    assert_close(total, torch.tensor(5.5))

    module.end_epoch(DWA_EPOCHS[1])  # r = (0.5, 1, 1.25)
    expected = dwa_by_hand(DWA_EPOCHS[0], DWA_EPOCHS[1], 2.0)
    assert module.weights() == pytest.approx(expected, rel=1e-6)
    assert sum(module.weights().values()) == pytest.approx(3.0)
    assert module.weights()["c"] > module.weights()["b"] > module.weights()["a"]  # slowest-falling loss gains

    third = {"a": 0.5, "b": 2.0, "c": 5.0}  # the window slides: r = (0.5, 2, 1)
    module.end_epoch(third)
    expected = dwa_by_hand(DWA_EPOCHS[1], third, 2.0)
    assert module.weights() == pytest.approx(expected, rel=1e-6)
    assert sum(module.weights().values()) == pytest.approx(3.0)
    total, _ = module(tensors(LOSSES), step=123)  # the step does not matter for DWA
    assert_close(total, torch.tensor(sum(expected[t] * LOSSES[t] for t in TASKS)))


def test_dwa_temperature_controls_spread() -> None:
    hot, cold = DynamicWeightAverage(TASKS, temperature=100.0), DynamicWeightAverage(TASKS, temperature=0.5)
    for module in (hot, cold):
        for epoch in DWA_EPOCHS:
            module.end_epoch(epoch)
    assert max(hot.weights().values()) - min(hot.weights().values()) < 0.02
    assert max(cold.weights().values()) - min(cold.weights().values()) > 0.5
    assert cold.weights() == pytest.approx(dwa_by_hand(DWA_EPOCHS[0], DWA_EPOCHS[1], 0.5), rel=1e-6)


def test_dwa_missing_task_or_zero_previous_loss_keeps_ratio_one() -> None:
    module = DynamicWeightAverage(TASKS, temperature=2.0)
    module.end_epoch({"a": 2.0, "b": 0.0, "c": 4.0})
    module.end_epoch({"a": 1.0, "b": 3.0})  # c missing; b's previous loss is 0
    assert module.ratios() == pytest.approx({"a": 0.5, "b": 1.0, "c": 1.0})
    expected = dwa_by_hand({"a": 2.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, 2.0)
    assert module.weights() == pytest.approx(expected, rel=1e-6)
    module.end_epoch({"a": 1.0, "b": 6.0, "c": 2.0})  # c's previous epoch is missing: still r = 1
    assert module.ratios() == pytest.approx({"a": 1.0, "b": 2.0, "c": 1.0})
    assert all(math.isfinite(w) for w in module.weights().values())


def test_dwa_state_dict_round_trip() -> None:
    module = DynamicWeightAverage(TASKS, temperature=2.0)
    for epoch in DWA_EPOCHS:
        module.end_epoch(epoch)
    state = module.state_dict()
    assert {"history", "num_epochs"} <= set(state)

    fresh = DynamicWeightAverage(TASKS, temperature=2.0)
    assert fresh.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    fresh.load_state_dict(state)
    assert fresh.weights() == module.weights()
    # The history itself came along, not only the count: the next epoch gives the same weights too.
    for m in (module, fresh):
        m.end_epoch({"a": 0.5, "b": 2.0, "c": 5.0})
    assert fresh.weights() == module.weights()
    assert fresh.weights() == pytest.approx(dwa_by_hand(DWA_EPOCHS[1], {"a": 0.5, "b": 2.0, "c": 5.0}, 2.0))


# --- RLW -------------------------------------------------------------------------------------------------------


def test_rlw_weights_are_a_positive_simplex_point_per_step() -> None:
    module = RandomLossWeighting(TASKS, seed=0)
    for step in range(20):
        w = module.weights(step)
        assert list(w) == TASKS
        assert all(v > 0 for v in w.values())
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-6)


def test_rlw_is_a_pure_function_of_seed_and_step() -> None:
    one, two = RandomLossWeighting(TASKS, seed=5), RandomLossWeighting(TASKS, seed=5)
    torch.manual_seed(123)
    first = one.weights(10)
    torch.manual_seed(999)  # the global RNG plays no part ...
    assert two.weights(10) == first
    state = torch.get_rng_state()
    one.weights(11)
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    assert one.weights(11) != first
    assert RandomLossWeighting(TASKS, seed=6).weights(10) != first
    assert list(first.values()) == pytest.approx(rlw_by_hand(5, 10, 3))


def test_rlw_forward_uses_the_weights_of_its_step() -> None:
    module = RandomLossWeighting(TASKS, seed=1)
    for step in (0, 1, 42):
        losses = tensors(LOSSES, requires_grad=True)
        total, logged = module(losses, step=step)
        total.backward()
        w = module.weights(step)
        assert {t: logged[f"weight/{t}"] for t in TASKS} == w
        for task in TASKS:
            assert_close(losses[task].grad, torch.tensor(w[task]))
        assert_close(total, torch.tensor(sum(w[t] * LOSSES[t] for t in TASKS)))


# --- dtypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bf16_losses_give_a_float32_total(name: str) -> None:
    module = make(name)
    losses = tensors({"a": 2.0, "b": 0.5, "c": 3.0}, dtype=torch.bfloat16)  # all exact in bf16
    total, _ = module(losses, step=STEP)
    assert total.dtype == torch.float32
    assert_close(total, torch.tensor(expected_total(name, LOSSES)))


# --- invalid arguments ------------------------------------------------------------------------------------------


def test_unknown_task_in_losses_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown task.*'z'.*known tasks.*'a', 'b', 'c'"):
        EqualWeighting(TASKS)({"a": torch.tensor(1.0), "z": torch.tensor(1.0)})


@pytest.mark.parametrize("name", NAMES)
def test_unknown_task_in_losses_for_every_strategy(name: str) -> None:
    with pytest.raises(ValueError, match="'z'"):
        make(name)({"z": None})


def test_non_scalar_loss_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'a' must be a scalar.*\(2,\)"):
        EqualWeighting(TASKS)({"a": torch.ones(2)})


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ([], "empty"),
        (["a", "b", "a"], r"duplicate task names \['a'\]"),
        (["a", ""], "non-empty strings"),
        ("abc", "single string"),
    ],
)
def test_invalid_task_lists(tasks, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EqualWeighting(tasks)


def test_static_rejects_negative_or_unknown_weights() -> None:
    with pytest.raises(ValueError, match=r"non-negative.*'b': -0.5"):
        StaticWeighting(TASKS, {"b": -0.5})
    with pytest.raises(ValueError, match="non-negative"):
        StaticWeighting(TASKS, {"b": math.nan})
    with pytest.raises(ValueError, match=r"unknown task.*'d'"):
        StaticWeighting(TASKS, {"d": 1.0})


def test_uncertainty_rejects_bad_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown kind.*'ordinal'.*accepted kinds"):
        UncertaintyWeighting(TASKS, {**KINDS, "b": "ordinal"})
    with pytest.raises(ValueError, match=r"lacks task.*'c'"):
        UncertaintyWeighting(TASKS, {"a": "regression", "b": "binary"})
    with pytest.raises(ValueError, match=r"unknown task.*'d'"):
        UncertaintyWeighting(TASKS, {**KINDS, "d": "regression"})


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf])
def test_dwa_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DynamicWeightAverage(TASKS, temperature=temperature)


def test_dwa_rejects_unknown_task_in_epoch_losses() -> None:
    module = DynamicWeightAverage(TASKS)
    with pytest.raises(ValueError, match=r"unknown task.*'z'.*epoch_losses"):
        module.end_epoch({"a": 1.0, "z": 2.0})
    assert int(module.num_epochs) == 0  # nothing was recorded


def test_unknown_strategy_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match=r"unknown loss weighting 'gradnorm'.*'equal'.*'static'.*'dwa'.*'rlw'"):
        build_weighting("gradnorm", TASKS)
