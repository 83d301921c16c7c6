"""Augmentation of whole image batches on the device they are on, after the loader (cheap for small images
held in memory as prepared tensors, where a per-sample PIL transform would cost more than the model)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.samplers import mix_seed
from tlmodules.random_state import SeededBatchTransform, gather_per_process, select_process


class RandomAffineBatch(SeededBatchTransform):
    """An independent random rotation, scale and translation of each image of a batch, in one
    ``grid_sample`` call: ``(B, C, H, W) → (B, C, H, W)``, same dtype and device.

    Args:
        degrees: rotation drawn uniformly from ``[-degrees, degrees]``.
        translate: shift drawn uniformly from ``[-translate, translate]`` of the width / height.
        scale: zoom factor drawn uniformly from ``[scale[0], scale[1]]`` (> 1 enlarges the content).
        padding_mode: what fills the area the image leaves (``border`` repeats the edge pixels, which
            for digits is the background; see ``torch.nn.functional.grid_sample``).

    Draws its few parameters on the CPU and moves them to the images' device. Alone it draws from torch's
    global CPU generator (``seed_everything`` makes runs repeatable); a datamodule gives it a generator of its
    own (:meth:`manual_seed`, :func:`seed_for_process`), whose state the datamodule saves in checkpoints
    (:meth:`get_rng_state`): it runs in ``on_after_batch_transfer``, before the training stream's random state is
    restored (``tlmodules.random_state``), so the global generator would differ between an uninterrupted and a
    resumed run.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        padding_mode: str = "border",
    ) -> None:
        super().__init__()
        if degrees < 0 or not 0 <= translate < 1 or not 0 < scale[0] <= scale[1]:
            raise ValueError(
                "need degrees >= 0, 0 <= translate < 1 and 0 < scale[0] <= scale[1]; "
                f"got degrees={degrees}, translate={translate}, scale={scale}"
            )
        self.degrees, self.translate, self.scale, self.padding_mode = degrees, translate, tuple(scale), padding_mode

    def matrices(self, batch: int, device: torch.device) -> Tensor:
        """Sampling grids' affine maps ``(B, 2, 3)`` (output → input coordinates in ``[-1, 1]``), drawn on the
        CPU (from :attr:`generator`) and moved to ``device``."""

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(batch, generator=self.generator) * (high - low) + low

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        zoom = uniform(*self.scale)
        shift_x = uniform(-self.translate, self.translate) * 2.0  # a fraction of the width is 2× in [-1, 1]
        shift_y = uniform(-self.translate, self.translate) * 2.0
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], dim=1
        )  # the inverse map: sampling at R(θ)/s · x + t shows the content rotated by -θ, zoomed by s
        return theta.to(device)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"RandomAffineBatch takes image batches (B, C, H, W), got shape {tuple(images.shape)}")
        theta = self.matrices(len(images), images.device).to(torch.float32)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)
        return out.to(images.dtype)

    def extra_repr(self) -> str:
        return (
            f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
            f"padding_mode={self.padding_mode!r}"
        )


def seed_for_process(augment: Any, seed: int, trainer: Any) -> None:
    """Give a batch augmentation without a generator of its own one seeded by ``seed`` and this process's rank
    (under DDP each process augments its own samples differently); one that has a generator (seeded before,
    or restored from a checkpoint) keeps it."""
    if augment is None or not callable(getattr(augment, "manual_seed", None)) or augment.get_rng_state() is not None:
        return
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    augment.manual_seed(mix_seed(seed, "batch_augment", rank))


def augment_state(augment: Any, trainer: Any) -> list[dict[str, Tensor]] | None:
    """Every process's generator state of ``augment`` (a collective under DDP, see
    :func:`tlmodules.random_state.gather_per_process`); ``None`` when it has no generator of its own."""
    state = augment.get_rng_state() if callable(getattr(augment, "get_rng_state", None)) else None
    return None if state is None else gather_per_process(trainer, {"generator": state})


def load_augment_state(augment: Any, states: list[dict[str, Tensor]], trainer: Any) -> None:
    """Continue this process's generator of ``augment`` from an :func:`augment_state` list."""
    if not callable(getattr(augment, "set_rng_state", None)):
        return
    mine = select_process(trainer, states, "batch augmentation generators")
    if mine is not None:
        augment.set_rng_state(mine["generator"])
