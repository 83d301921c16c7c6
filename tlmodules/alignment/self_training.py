"""Self-training on the unlabelled target: FixMatch's confidence-thresholded pseudo-labels (Sohn et al.,
"FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020), the strong
augmentation of a whole image batch that gives its second view, and the linear ramp of its weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.errors import ConfigError
from tlmodules.random_state import SeededBatchTransform


class ConfidenceThresholdedSelfTraining(nn.Module):
    """FixMatch's unlabelled loss (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency
    and Confidence", NeurIPS 2020, eq. 4), here on the target domain of an adaptation pair.

    The prediction on a weakly augmented view becomes a pseudo-label when it is confident enough, and the
    prediction on a strongly augmented view of the same sample is trained towards it:

        ``p_i = softmax(weak_i)`` (no gradient), ``ŷ_i = argmax p_i``, ``m_i = [max p_i ≥ τ]``,
        ``loss = (1 / B) Σ_i m_i · CE(strong_i, ŷ_i)``.

    The sum is divided by the batch size ``B``, not by the number of confident samples, as in FixMatch: the
    loss grows with the share of confident samples (few at the start, when pseudo-labels are poor), and one
    confident sample in an otherwise unconfident batch does not get the weight of a whole batch. The weak
    logits get no gradient (the pseudo-labels are targets, not predictions to move).

    Args:
        threshold: the confidence ``τ ∈ (0, 1]`` a pseudo-label needs (FixMatch: 0.95; 0.9 by default here).
    """

    def __init__(self, threshold: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"the self-training threshold must be in (0, 1] (e.g. 0.9), got {threshold}")
        self.threshold = threshold

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"

    def forward(self, weak_logits: Tensor, strong_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the weak ``(B, C)`` and of the strong view ``(B, C)`` of the same samples → ``(loss, mask
        ratio)``, float32 scalars: the loss above and the share of samples with a pseudo-label (no gradient)."""
        with torch.no_grad():
            confidence, pseudo_labels = weak_logits.float().softmax(-1).max(-1)
            mask = (confidence >= self.threshold).float()
        losses = F.cross_entropy(strong_logits.float(), pseudo_labels, reduction="none")
        return (losses * mask).mean(), mask.mean()


class StrongAugmentBatch(SeededBatchTransform):
    """A strong random augmentation of each image of a batch, on the batch's device, in a few whole-batch torch
    ops: ``(B, C, H, W) → (B, C, H, W)``, same dtype and device. FixMatch's strong view (there RandAugment and
    Cutout on each PIL image), for images that arrive as tensor batches.

    Each image gets its own draw of, in this order:

    1. an affine map: rotation in ``[-degrees, degrees]``, shear ``[-shear, shear]`` (tangent of the angle),
       zoom in ``scale`` and shift in ``[-translate, translate]`` of the width / height (one ``grid_sample``);
    2. colour jitter relative to the image's own statistics, so it works on raw and on normalised inputs alike:
       saturation (3-channel images: blend with the channel mean by a factor in ``1 ± saturation``), contrast
       (blend with the image mean by a factor in ``1 ± contrast``) and brightness (a shift of ``±brightness``
       times the image's standard deviation). Values are not clipped, since their range is the caller's;
    3. random erasing (Cutout): a rectangle of ``u · erase`` of the height and of the width, ``u ~ U(0, 1)``,
       centred anywhere in the image, filled with the image mean (FixMatch fills with grey).

    Why it lives beside the self-training loss and not in ``datamodules/augment.py`` with
    ``RandomAffineBatch``: a datamodule's ``batch_augment`` makes *the* training view that every loss sees (the
    weak view here), while the strong view is a second view that only the self-training term uses, so the
    module makes it in ``training_step``. There it draws from torch's global CPU generator, which
    ``tlmodules.random_state.TrainingRandomState`` keeps as the training stream and saves in checkpoints (as it
    does for dropout), so a resumed run draws the same strong views without a generator state of its own. And
    ``tlmodules`` does not import ``datamodules`` (which imports ``tlmodules``).

    For standalone use :meth:`manual_seed` gives it a CPU generator of its own (the same interface as
    ``RandomAffineBatch``). Parameters are drawn on the CPU as one ``(B, 11)`` tensor and moved to the images'
    device once.

    Args:
        degrees, translate, scale, shear: the affine map's ranges (above).
        brightness, contrast, saturation: colour jitter strengths, each in ``[0, 1]`` (0: off).
        erase: the largest erased fraction of the height and of the width, in ``[0, 1]`` (0: off).
        padding_mode: what fills the area the image leaves after the affine map (``grid_sample``'s).
    """

    def __init__(
        self,
        degrees: float = 30.0,
        translate: float = 0.2,
        scale: tuple[float, float] = (0.8, 1.2),
        shear: float = 0.3,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        erase: float = 0.5,
        padding_mode: str = "border",
    ) -> None:
        super().__init__()
        strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "erase": erase}
        bad = [f"{name}={value}" for name, value in strengths.items() if not 0.0 <= value <= 1.0]
        if degrees < 0 or not 0 <= translate < 1 or not 0 < scale[0] <= scale[1] or shear < 0 or bad:
            raise ConfigError(
                "need degrees >= 0, 0 <= translate < 1, 0 < scale[0] <= scale[1], shear >= 0 and brightness, "
                f"contrast, saturation, erase in [0, 1]; got degrees={degrees}, translate={translate}, "
                f"scale={scale}, shear={shear}" + (", " + ", ".join(bad) if bad else "")
            )
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, tuple(scale), shear
        self.brightness, self.contrast, self.saturation, self.erase = brightness, contrast, saturation, erase
        self.padding_mode = padding_mode

    def draw(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        """Each image's parameters, ``(B,)`` each (``theta``: the sampling grids' affine maps ``(B, 2, 3)``, output
        → input coordinates in ``[-1, 1]``), drawn on the CPU and moved to ``device`` in one copy."""
        u = torch.rand(batch, 11, generator=self.generator).to(device)

        def symmetric(column: int, half_width: float) -> Tensor:
            return (2.0 * u[:, column] - 1.0) * half_width

        angle = symmetric(0, self.degrees) * (math.pi / 180.0)
        zoom = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        shear = symmetric(2, self.shear)
        shift_x, shift_y = symmetric(3, 2.0 * self.translate), symmetric(4, 2.0 * self.translate)  # [-1, 1] is 2 wide
        cos, sin = torch.cos(angle), torch.sin(angle)
        # the inverse map R(θ) · [[1, s], [0, 1]] / zoom, plus the shift
        theta = torch.stack(
            [
                torch.stack([cos / zoom, (cos * shear - sin) / zoom, shift_x], -1),
                torch.stack([sin / zoom, (sin * shear + cos) / zoom, shift_y], -1),
            ],
            dim=1,
        )
        return {
            "theta": theta,
            "saturation": 1.0 + symmetric(5, self.saturation),
            "contrast": 1.0 + symmetric(6, self.contrast),
            "brightness": symmetric(7, self.brightness),
            "erase": u[:, 8] * self.erase,
            "erase_y": u[:, 9],
            "erase_x": u[:, 10],
        }

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"StrongAugmentBatch takes image batches (B, C, H, W), got shape {tuple(images.shape)}")
        batch, channels, height, width = images.shape
        if batch == 0:
            return images
        p = self.draw(batch, images.device)
        x = images.float()
        grid = F.affine_grid(p["theta"], [batch, channels, height, width], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)

        def per_image(values: Tensor) -> Tensor:
            return values.view(batch, 1, 1, 1)

        if channels == 3 and self.saturation > 0:
            grey = x.mean(1, keepdim=True)
            x = grey + per_image(p["saturation"]) * (x - grey)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + per_image(p["contrast"]) * (x - mean)
        std = x.flatten(1).std(1, unbiased=False).view(batch, 1, 1, 1)
        x = x + per_image(p["brightness"]) * std
        if self.erase > 0:
            rows = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height  # pixel centres in (0, 1)
            cols = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) / width
            half = p["erase"][:, None] / 2
            inside_y = (rows[None, :] - p["erase_y"][:, None]).abs() < half  # (B, H)
            inside_x = (cols[None, :] - p["erase_x"][:, None]).abs() < half  # (B, W)
            box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (B, 1, H, W)
            x = torch.where(box, x.mean((1, 2, 3), keepdim=True), x)
        return x.to(images.dtype)

    def extra_repr(self) -> str:
        return (
            f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, shear={self.shear}, "
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"erase={self.erase}, padding_mode={self.padding_mode!r}"
        )
