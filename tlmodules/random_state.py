"""The training stream's random state in checkpoints, per process, so a resumed run equals the uninterrupted one.

What a checkpoint must carry besides weights and optimizer: the global generators that training draws from
(torch on the CPU and on the training GPU, numpy's legacy global ``RandomState``, Python's ``random``), for
dropout and anything else ``training_step`` draws. Data order and augmentation draw from generators of
their own, which the datamodules carry (``datamodules.loaders``, ``datamodules.augment``).

*When* matters as much as *what*. Between a checkpoint and the next training step the uninterrupted run and
the resumed run do different things: sanity validation, validation loops, new loader iterators (each draws a
seed from torch's global generator). :class:`TrainingRandomState` therefore keeps training on a stream of its
own: it captures the generators at the end of every training batch and puts them back at the start of the
next, so whatever runs between two batches never shifts the stream, in both runs alike. The checkpoint holds
the state captured after the last trained batch, which the resumed run puts back before its first batch.

Under DDP each process has its own generators; every process runs ``dump_checkpoint`` (only rank 0 writes
the file), so :func:`gather_per_process` collects every rank's states there with ``strategy.all_gather``,
and each rank restores its own entry (:func:`select_process`). States are tensors, ints and floats, so a
checkpoint loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

RawState = dict[str, Any]  # the generators' states as their own APIs return them (cheap to take and restore)


def capture_rng(cuda_device: torch.device | None = None) -> RawState:
    """The global generators' states: torch's CPU generator, the generator of ``cuda_device`` (when given),
    numpy's legacy global ``RandomState`` and Python's ``random``.

    Only the training device's CUDA generator: asking for every device's would create a CUDA context on each.
    Reading a CUDA generator's state copies its seed and offset on the host, without synchronising the device.
    """
    state: RawState = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if cuda_device is not None and cuda_device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore_rng(state: RawState, cuda_device: torch.device | None = None) -> None:
    """Put back a :func:`capture_rng` state (a CUDA state only where training runs on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and cuda_device is not None and cuda_device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], cuda_device)


def pack_rng(state: RawState) -> dict[str, Tensor]:
    """A :func:`capture_rng` state as tensors only (``weights_only``-loadable, and gatherable across processes):
    numpy's ``(name, keys, pos, has_gauss, cached_gaussian)`` and Python's ``(version, internal, gauss_next)``
    become an int64 tensor and a float64 ``[has value, value]`` pair each."""
    _, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    packed = {
        "torch": state["torch"].clone(),
        "numpy": torch.tensor([pos, has_gauss, *keys.tolist()], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(cached)], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
    }
    if "cuda" in state:
        packed["cuda"] = state["cuda"].clone()
    return packed


def unpack_rng(packed: Mapping[str, Tensor]) -> RawState:
    """The inverse of :func:`pack_rng`."""
    numpy_ints = packed["numpy"].tolist()
    python_ints = packed["python"].tolist()
    has_gauss, gauss = packed["python_gauss"].tolist()
    state: RawState = {
        "torch": packed["torch"].to(torch.uint8).cpu(),
        "numpy": (
            "MT19937",
            np.asarray(numpy_ints[2:], dtype=np.uint32),
            int(numpy_ints[0]),
            int(numpy_ints[1]),
            float(packed["numpy_gauss"][0]),
        ),
        "python": (int(python_ints[0]), tuple(int(v) for v in python_ints[1:]), gauss if has_gauss else None),
    }
    if "cuda" in packed:
        state["cuda"] = packed["cuda"].to(torch.uint8).cpu()
    return state


def world_and_rank(trainer: Any) -> tuple[int, int]:
    """``(world_size, global_rank)`` of ``trainer``; one process without a trainer."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))


def gather_per_process(trainer: Any, tensors: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every process's ``tensors`` (same keys and shapes on all of them), in rank order, on the CPU.

    A collective under DDP: every process must call it, as every process runs ``dump_checkpoint``. Tensors
    travel on the strategy's device (NCCL gathers CUDA tensors only).
    """
    world_size, _ = world_and_rank(trainer)
    local = [{k: v.detach().cpu().clone() for k, v in tensors.items()}]
    if world_size <= 1:
        return local
    device = trainer.strategy.root_device
    gathered = {k: trainer.strategy.all_gather(v.to(device)).cpu() for k, v in sorted(tensors.items())}
    if any(g.shape != (world_size, *tensors[k].shape) for k, g in gathered.items()):
        return local  # no process group (e.g. after teardown): this process's only; loading it warns
    return [{k: v[rank].clone() for k, v in gathered.items()} for rank in range(world_size)]


def select_process(trainer: Any, states: list[Any], what: str) -> Any | None:
    """This process's entry of a :func:`gather_per_process` list; ``None`` (with a warning) when the checkpoint
    was written by another number of processes, whose streams cannot be continued bit for bit."""
    world_size, rank = world_and_rank(trainer)
    if len(states) != world_size:
        warnings.warn(
            f"the checkpoint holds {what} of {len(states)} process(es) but this run has {world_size}; "
            f"{'continuing' if rank < len(states) else 'not restoring'} it on rank {rank}, so the resumed run "
            "will not repeat the uninterrupted one exactly",
            stacklevel=2,
        )
    return states[rank] if rank < len(states) else None


def _cuda_device(trainer: Any) -> torch.device | None:
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


class TrainingRandomState(pl.Callback):
    """Keeps training on its own random stream and carries it, per process, in checkpoints.

    The stream is captured at the end of every training batch and put back at the start of the next one (and,
    after a resume, the checkpoint's state before the first one), so validation, sanity checks and loader
    iterators in between draw without shifting it. What it covers: every draw from the global generators in
    ``training_step`` and the hooks around it after this callback's ``on_train_batch_start``. Not covered:
    draws in ``on_train_epoch_start`` or in callbacks that run before this one (they see the stream as
    validation left it), and draws while a batch is moved to the device (``on_after_batch_transfer``, before
    ``on_train_batch_start``), which is why batch augmentations own their generator.

    Cost per step: one capture and one restore of four small states (the CPU generator's is 5 KB), host-only.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._stream: RawState | None = None  # captured after the last trained batch
        self._loaded: list[dict[str, Tensor]] | None = None  # a checkpoint's states, all processes

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._loaded is not None:
            mine = select_process(trainer, self._loaded, "training random states")
            self._loaded = None
            if mine is not None:
                self._stream = unpack_rng(mine)
        if self._stream is not None:
            restore_rng(self._stream, _cuda_device(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stream = capture_rng(_cuda_device(trainer))

    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:  # restored but no batch trained since: the checkpoint's states as they were
            return {"processes": self._loaded}
        stream = self._stream if self._stream is not None else capture_rng(_cuda_device(self._trainer))
        return {"processes": gather_per_process(self._trainer, pack_rng(stream))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("processes") or []) or None


class SeededBatchTransform(torch.nn.Module):
    """Base of the random transforms of whole batches: they draw from torch's global CPU generator, or, after
    :meth:`manual_seed`, from a CPU generator of their own (:attr:`generator`), whose state a datamodule or a
    checkpoint can carry (:meth:`get_rng_state` / :meth:`set_rng_state`)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator: torch.Generator | None = None  # None: torch's global CPU generator

    def manual_seed(self, seed: int) -> SeededBatchTransform:
        """Draw from a CPU generator of its own, seeded with ``seed``, from now on."""
        self.generator = torch.Generator().manual_seed(seed)
        return self

    def get_rng_state(self) -> torch.Tensor | None:
        """Its own generator's state (a uint8 tensor); ``None`` while it draws from the global generator."""
        return None if self.generator is None else self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Continue from a :meth:`get_rng_state` state (with a generator of its own from now on)."""
        if self.generator is None:
            self.generator = torch.Generator()
        self.generator.set_state(state.to(torch.uint8).cpu())
