"""What the hardware does fast: a warning where ``bf16`` precision would slow a run down instead of speeding it up.

bf16 autocast pays on CPUs with bf16 matrix instructions (x86 AVX512-BF16 or AMX; torch reports them through
``torch.cpu``). Without them, as on AVX2-only CPUs, torch converts and multiplies in software, many times slower
than float32 (bench/README.md, "Speed", has the measured figures).
"""

from __future__ import annotations

import platform
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

BF16_PRECISIONS = ("bf16", "bf16-mixed", "bf16-true")


def cpu_has_native_bf16() -> bool | None:
    """``True``/``False`` on x86 CPUs (AVX512-BF16 or AMX present or not); ``None`` where torch cannot tell
    (other architectures, or a torch without the probes)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


class PrecisionHardwareCheck(pl.Callback):
    """Warns at the start of ``fit`` when a bf16 precision runs on a CPU that only emulates bf16."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warning = bf16_warning(str(trainer.precision), pl_module.device)
        if warning:
            rank_zero_warn(warning)


def bf16_warning(precision: str, device: Any) -> str | None:
    """The warning text for ``precision`` on ``device``, or ``None`` when there is nothing to warn about."""
    if precision not in BF16_PRECISIONS or torch.device(device).type != "cpu" or cpu_has_native_bf16() is not False:
        return None
    return (
        f"precision={precision!r} on a CPU without bf16 instructions (torch reports "
        f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX): bf16 matrix products are emulated "
        "and run many times slower than float32 here; use precision='32-true' on this machine (bf16-mixed pays "
        "on recent GPUs and on CPUs with AVX512-BF16/AMX)"
    )
