"""RandomAffineBatch: geometry of the random maps, what it does to images, and that datamodules apply it to
training batches only (both sides of a domain pair)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from datamodules import DigitsDomainDataModule, RandomAffineBatch
from tlmodules import DANNModule


def test_identity_settings_return_the_images_unchanged() -> None:
    images = torch.randn(5, 3, 28, 28)
    out = RandomAffineBatch(degrees=0.0, translate=0.0, scale=(1.0, 1.0))(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    torch.testing.assert_close(out, images, atol=1e-4, rtol=0)  # float32 grid rounding


def test_random_maps_stay_within_the_requested_ranges() -> None:
    torch.manual_seed(0)
    augment = RandomAffineBatch(degrees=15.0, translate=0.1, scale=(0.8, 1.25))
    theta = augment.matrices(4000, torch.device("cpu"))
    linear, shift = theta[:, :, :2], theta[:, :, 2]
    zoom = 1.0 / torch.linalg.det(linear).sqrt()  # the inverse map scales by 1/zoom in both axes
    assert float(zoom.min()) >= 0.8 - 1e-5 and float(zoom.max()) <= 1.25 + 1e-5
    angle = torch.atan2(linear[:, 1, 0], linear[:, 0, 0]).rad2deg()
    assert float(angle.abs().max()) <= 15.0 + 1e-4 and float(angle.abs().max()) > 14.0
    assert float(shift.abs().max()) <= 0.2 + 1e-6 and float(shift.abs().max()) > 0.19
    # a rotation times a scale: orthogonal up to the zoom
    gram = linear @ linear.transpose(1, 2) * zoom[:, None, None] ** 2
    torch.testing.assert_close(gram, torch.eye(2).expand_as(gram), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("zoom", "grows"), [(2.0, True), (0.5, False)])
def test_scale_above_one_enlarges_the_content(zoom: float, grows: bool) -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[..., 12:20, 12:20] = 1.0  # an 8×8 bright square in the middle: 64 pixels
    out = RandomAffineBatch(degrees=0.0, translate=0.0, scale=(zoom, zoom), padding_mode="zeros")(image)
    area = float(out.sum())
    assert area == pytest.approx(64 * zoom**2, rel=0.1)
    assert (area > 64) is grows


def test_each_image_gets_its_own_transform_and_seeds_repeat() -> None:
    images = torch.rand(1, 3, 16, 16).repeat(6, 1, 1, 1)
    augment = RandomAffineBatch(degrees=20.0, translate=0.1, scale=(0.9, 1.1))
    torch.manual_seed(3)
    first = augment(images)
    assert all(not torch.allclose(first[0], first[i]) for i in range(1, 6))
    torch.manual_seed(3)
    torch.testing.assert_close(augment(images), first)


def test_rejects_non_batches_and_bad_ranges() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        RandomAffineBatch()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        RandomAffineBatch(scale=(1.2, 0.8))


class InputsSeen(pl.Callback):
    """The inputs of every training and validation batch as the module receives them, with their indices."""

    def __init__(self) -> None:
        self.train: list[dict[str, Any]] = []
        self.val: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.train.append({side: dict(batch[side]) for side in ("source", "target")})

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self.val.append(dict(batch))


@pytest.mark.parametrize("augmented", [True, False])
def test_domain_pair_augments_training_batches_of_both_sides_only(augmented: bool) -> None:
    pl.seed_everything(0)
    augment = RandomAffineBatch(degrees=10.0, translate=0.1, scale=(0.9, 1.1)) if augmented else None
    data = DigitsDomainDataModule(batch_size=16, batch_augment=augment)
    seen = InputsSeen()
    model = DANNModule(num_classes=10, bottleneck=8, discriminator_hidden=8, projection_samples=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    trainer.fit(model, data)

    def raw(side: Any, split: str, indices: torch.Tensor) -> torch.Tensor:
        """The prepared images by their ``index`` (an index into the whole prepared set, not the split)."""
        prepared = side.datasets[split].dataset
        return torch.stack([prepared[int(i)]["inputs"] for i in indices])

    assert len(seen.train) == 2 and seen.val
    for batch in seen.train:
        for name, side in (("source", data.source), ("target", data.target)):
            original = raw(side, "train", batch[name]["index"])
            assert batch[name]["inputs"].shape == original.shape
            assert torch.equal(batch[name]["inputs"], original) is not augmented, name
            labels = [side.datasets["train"].dataset[int(i)]["labels"] for i in batch[name]["index"]]
            assert batch[name]["labels"].tolist() == labels  # labels travel with their images
    for batch in seen.val:  # one domain's loader each: unchanged
        sources = [raw(side, "val", batch["index"]) for side in (data.source, data.target)]
        assert any(torch.equal(batch["inputs"], s) for s in sources)
