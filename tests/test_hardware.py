"""The bf16 hardware check: which CPUs multiply bf16 natively, and the warning at fit start where they do not."""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlmodules import FineTuneModule, hardware

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="reads x86 Linux CPU flags"
)
def test_native_bf16_matches_the_cpu_flags() -> None:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert hardware.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize(
    ("precision", "device", "native", "warned"),
    [
        ("bf16-mixed", "cpu", False, True),
        ("bf16-true", "cpu", False, True),
        ("bf16-mixed", "cpu", True, False),
        ("bf16-mixed", "cpu", None, False),  # cannot tell: no warning
        ("32-true", "cpu", False, False),
        ("bf16-mixed", "cuda", False, False),  # the GPU's own bf16 units, not the CPU's, do the work
    ],
)
def test_bf16_warning_only_where_bf16_is_emulated(
    monkeypatch: pytest.MonkeyPatch, precision: str, device: str, native: bool | None, warned: bool
) -> None:
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    text = hardware.bf16_warning(precision, device)
    assert (text is not None) == warned
    if warned:
        assert precision in text and "32-true" in text


def fit_one_step(precision: str) -> list[str]:
    images, labels = torch.rand(4, 3, 28, 28), torch.tensor([0, 1, 0, 1])
    model = FineTuneModule("builtin:lenet", num_classes=2)
    trainer = pl.Trainer(
        max_steps=1, precision=precision, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    assert trainer.global_step == 1  # a warning, not a refusal: the run goes on
    return [str(w.message) for w in caught if "without bf16 instructions" in str(w.message)]


def test_fit_warns_about_emulated_bf16_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert len(fit_one_step("bf16-mixed")) == 1
    assert fit_one_step("32-true") == []
