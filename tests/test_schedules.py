"""The pure schedule functions: unfreezing per strategy, learning-rate shapes, layer-wise multipliers."""

from __future__ import annotations

import math

import pytest

from tlmodules.schedules import FINETUNE_STRATEGIES, layer_lr_multipliers, lr_shape, trainable_top_groups

# Hand-derived from the docstring of trainable_top_groups, 3 groups, epochs 0..4.
EXPECTED_TOP_GROUPS = {
    # unfreeze_epoch = 1 (the default)
    ("full", 1): [3, 3, 3, 3, 3],
    ("freeze", 1): [0, 0, 0, 0, 0],
    ("freeze_unfreeze", 1): [0, 3, 3, 3, 3],
    ("lp_ft", 1): [0, 3, 3, 3, 3],
    ("gradual", 1): [0, 1, 2, 3, 3],
    ("contrastive", 1): [3, 3, 3, 3, 3],  # the whole backbone under the contrastive loss; the head is fitted
    # unfreeze_epoch = 2: the switch moves one epoch later; full/freeze ignore it
    ("full", 2): [3, 3, 3, 3, 3],
    ("freeze", 2): [0, 0, 0, 0, 0],
    ("freeze_unfreeze", 2): [0, 0, 3, 3, 3],
    ("lp_ft", 2): [0, 0, 3, 3, 3],
    ("gradual", 2): [0, 0, 1, 2, 3],
    ("contrastive", 2): [3, 3, 3, 3, 3],
    # unfreeze_epoch = 0: gradual starts with the top group in epoch 0
    ("freeze_unfreeze", 0): [3, 3, 3, 3, 3],
    ("gradual", 0): [1, 2, 3, 3, 3],
}


@pytest.mark.parametrize(("strategy", "unfreeze_epoch"), sorted(EXPECTED_TOP_GROUPS))
def test_trainable_top_groups_per_strategy(strategy: str, unfreeze_epoch: int) -> None:
    got = [trainable_top_groups(strategy, epoch, 3, unfreeze_epoch) for epoch in range(5)]
    assert got == EXPECTED_TOP_GROUPS[(strategy, unfreeze_epoch)]


def test_every_strategy_is_covered_and_default_unfreeze_epoch_is_one() -> None:
    assert {s for s, _ in EXPECTED_TOP_GROUPS} == set(FINETUNE_STRATEGIES)
    for strategy in FINETUNE_STRATEGIES:
        assert [trainable_top_groups(strategy, e, 3) for e in range(5)] == EXPECTED_TOP_GROUPS[(strategy, 1)]


def test_gradual_never_exceeds_the_number_of_groups() -> None:
    assert [trainable_top_groups("gradual", e, 2, 1) for e in range(6)] == [0, 1, 2, 2, 2, 2]
    assert trainable_top_groups("gradual", 100, 1, 0) == 1


def test_unknown_strategy_raises_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'partial'") as err:
        trainable_top_groups("partial", 0, 3)
    for name in FINETUNE_STRATEGIES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("schedule", "progress", "warmup", "expected"),
    [
        # no warm-up
        ("constant", 0.0, 0.0, 1.0),
        ("constant", 0.7, 0.0, 1.0),
        ("cosine", 0.0, 0.0, 1.0),
        ("cosine", 0.25, 0.0, 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 0.5, 0.0, 0.5),
        ("cosine", 1.0, 0.0, 0.0),
        ("linear", 0.0, 0.0, 1.0),
        ("linear", 0.25, 0.0, 0.75),
        ("linear", 1.0, 0.0, 0.0),
        # linear warm-up over the first 20 %, the same for every shape
        ("constant", 0.0, 0.2, 0.0),
        ("cosine", 0.05, 0.2, 0.25),
        ("linear", 0.1, 0.2, 0.5),
        ("constant", 0.1, 0.2, 0.5),
        # after the warm-up the decay runs over the remaining 80 %
        ("constant", 0.2, 0.2, 1.0),
        ("constant", 0.9, 0.2, 1.0),
        ("cosine", 0.2, 0.2, 1.0),
        ("cosine", 0.6, 0.2, 0.5),
        ("cosine", 0.4, 0.2, 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 1.0, 0.2, 0.0),
        ("linear", 0.2, 0.2, 1.0),
        ("linear", 0.6, 0.2, 0.5),
        ("linear", 1.0, 0.2, 0.0),
        # progress is clamped to [0, 1]
        ("linear", -0.5, 0.0, 1.0),
        ("linear", 1.5, 0.0, 0.0),
        ("cosine", 2.0, 0.1, 0.0),
    ],
)
def test_lr_shape_values(schedule: str, progress: float, warmup: float, expected: float) -> None:
    assert lr_shape(schedule, progress, warmup) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_shape_decays_monotonically_after_warmup(schedule: str) -> None:
    values = [lr_shape(schedule, i / 20, 0.1) for i in range(21)]
    assert values[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


@pytest.mark.parametrize("warmup", [0.0, 0.5])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_lr_shape_unknown_schedule_raises_even_during_warmup(progress: float, warmup: float) -> None:
    # An unknown name must fail at the first call (step 0), not only once warm-up is over.
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        lr_shape("step", progress, warmup)


def test_layer_lr_multipliers_formula() -> None:
    assert layer_lr_multipliers(4, 0.5, None) == [0.5, 0.5, 0.5, 0.5]
    got = layer_lr_multipliers(4, 0.5, 0.8)
    assert got == pytest.approx([0.5 * 0.8**3, 0.5 * 0.8**2, 0.5 * 0.8, 0.5])
    # the top (output-side) group gets backbone_lr_ratio; each group below it layer_decay times less
    assert got[-1] == pytest.approx(0.5)
    assert all(lower / upper == pytest.approx(0.8) for lower, upper in zip(got, got[1:]))
    assert layer_lr_multipliers(3, 1.0, 1.0) == [1.0, 1.0, 1.0]
    assert layer_lr_multipliers(1, 0.1, 0.5) == pytest.approx([0.1])
    assert layer_lr_multipliers(3, 0.0, 0.5) == [0.0, 0.0, 0.0]
