"""``Trainer(min_steps=…)`` as a floor on a fit's optimizer steps (tlmodules/budget.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_trainer
from test_contrastive import sentences

from datamodules import TextClassificationDataModule
from tlmodules import FineTuneModule


@pytest.fixture
def sixteen_sentences(tiny_hf_dir: Path, make_text_file) -> TextClassificationDataModule:
    return sentences(tiny_hf_dir, make_text_file, n=16)


def lr_trace(model: FineTuneModule, trainer) -> list[float]:
    rates: list[float] = []
    original = model.on_train_batch_end

    def record(*args) -> None:
        rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        original(*args)

    model.on_train_batch_end = record
    return rates


@pytest.mark.parametrize(("min_steps", "epochs", "steps"), [(11, 6, 12), (3, 4, 8), (None, 4, 8)])
def test_min_steps_stretches_an_epoch_budget_and_its_schedule(
    tiny_hf_dir: Path, sixteen_sentences, tmp_path: Path, min_steps: int | None, epochs: int, steps: int
) -> None:
    """16 sentences at batch 8 are 2 steps per epoch: ``max_epochs=4`` gives 8 steps; ``min_steps=11`` asks for
    6 epochs (12 steps), and the cosine schedule then reaches its end at the last of them, not at step 8."""
    model = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", lr=1e-3, lr_schedule="linear")
    trainer = make_trainer(max_epochs=4, min_steps=min_steps, default_root_dir=tmp_path)
    rates = lr_trace(model, trainer)
    trainer.fit(model, datamodule=sixteen_sentences)
    assert trainer.current_epoch == epochs and trainer.global_step == steps
    assert trainer.estimated_stepping_batches == steps
    assert rates[0] == pytest.approx(1e-3 * (1 - 1 / steps)) and rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_max_steps_still_caps_a_min_steps_budget(tiny_hf_dir: Path, sixteen_sentences, tmp_path: Path) -> None:
    model = FineTuneModule(backbone=f"hf:{tiny_hf_dir}", lr=1e-3)
    trainer = make_trainer(max_epochs=1, min_steps=11, max_steps=5, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=sixteen_sentences)
    assert trainer.global_step == 5
