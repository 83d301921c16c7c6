"""Timing helpers shared by the speed benchmarks (``bench/speed.py`` and its ``bench/speed_*.py`` figures).

Protocol: a step's time is the wall time from one training iteration's start (its batch in hand) to the
next one's, so loading, augmentation, hooks, logging and the optimizer step all count, in the Trainer and in
hand-written loops alike. Each variant runs ``warmup`` untimed steps, then ``steps`` timed ones; the variants
of a figure alternate within each of ``repeats`` rounds (ABAB…, so drift on a shared machine hits both) and a
figure reports the median over rounds of each round's median step time.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


class StepTimes(pl.Callback):
    """Per-step wall times inside ``Trainer.fit``: from one ``on_train_batch_start`` to the next, after ``warmup``
    steps; the last step runs until its ``on_train_batch_end``. ``synchronize``: wait for the GPU at each mark
    (CUDA runs asynchronously; without it a step's time is its launch time)."""

    def __init__(self, warmup: int, synchronize: bool = False) -> None:
        self.warmup = warmup
        self.synchronize = synchronize
        self.times: list[float] = []
        self._last: float | None = None
        self._count = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        now = clock(self.synchronize)
        if self._last is not None and self._count > self.warmup:
            self.times.append(now - self._last)
        self._last = now
        self._count += 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= trainer.max_steps > 0 and self._last is not None and self._count > self.warmup:
            self.times.append(clock(self.synchronize) - self._last)


def clock(synchronize: bool = False) -> float:
    """``time.perf_counter()``, after waiting for the GPU's queued work when ``synchronize``."""
    if synchronize and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_loop(
    batches: Iterable[Any], step: Callable[[Any], None], warmup: int, steps: int, synchronize: bool = False
) -> list[float]:
    """A hand-written loop's per-step wall times, measured as :class:`StepTimes` does (``step(batch)`` per batch,
    ``warmup`` untimed steps first, cycling ``batches`` if it runs out)."""
    times: list[float] = []
    done, last = 0, None
    while done < warmup + steps:
        for batch in batches:
            now = clock(synchronize)
            if last is not None and done > warmup:
                times.append(now - last)
            last = now
            step(batch)
            done += 1
            if done >= warmup + steps:
                break
    times.append(clock(synchronize) - last)  # the last step, to its end
    return times[-steps:]


def median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def alternate(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every variant (each returns one round's median ms) ``repeats`` times, alternating their order."""
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            rounds[name].append(variants[name]())
    return rounds


def ratio_summary(rounds: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """Median ms of both variants, their ratio (of the medians) and each round's ratio."""
    num, den = statistics.median(rounds[numerator]), statistics.median(rounds[denominator])
    return {
        f"{numerator}_ms": round(num, 2),
        f"{denominator}_ms": round(den, 2),
        "ratio": round(num / den, 3),
        "round_ratios": [round(a / b, 3) for a, b in zip(rounds[numerator], rounds[denominator])],
    }


def set_threads(threads: int) -> int:
    """Fix torch's intra-op thread count (set deliberately: on 2 shared cores 2 threads can be slower than 1)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
