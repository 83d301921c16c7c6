"""Paired source and target data for domain adaptation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from datamodules.tables import DataError


def check_same_label_space(source: Any, target: Any) -> list[str]:
    """The shared class names; a clear error naming the classes each side lacks when they differ."""
    names_s = list(getattr(source, "class_names", []) or [])
    names_t = list(getattr(target, "class_names", []) or [])
    if names_t and names_s != names_t:
        only_s = sorted(set(names_s) - set(names_t))
        only_t = sorted(set(names_t) - set(names_s))
        detail = (
            f"only in source: {only_s}; only in target: {only_t}" if only_s or only_t else "same names, other order"
        )
        raise DataError(
            f"source and target have different label spaces ({detail}); domain adaptation needs one label set: "
            "give both datamodules the same classes (e.g. the same 'labels' list or class folders)"
        )
    return names_s


class DomainAdaptationDataModule(pl.LightningDataModule):
    """Compose a labelled source datamodule and a target datamodule that share one label space.

    Training batches are ``{"source": <source batch>, "target": <target batch>}`` from a combined
    loader that cycles the shorter side (``max_size_cycle``); target labels, if the target data has
    any, are not used for training. Validation and test return one loader per domain that has the
    split (names in :attr:`val_domains` / :attr:`test_domains`): target labels serve evaluation only.
    Under DDP Lightning shards both sides across processes.

    Args:
        source: a datamodule of labelled source data (its ``train`` and ``val`` splits are used).
        target: a datamodule of target data (``train`` for adaptation, ``val``/``test`` for evaluation).
    """

    def __init__(self, source: pl.LightningDataModule, target: pl.LightningDataModule) -> None:
        super().__init__()
        self.source = source
        self.target = target
        self.class_names = check_same_label_space(source, target)
        self.val_domains: list[str] = []
        self.test_domains: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for side in (self.source, self.target):
            if getattr(side, "trainer", None) is None and self.trainer is not None:
                side.trainer = self.trainer
            side.setup(stage)

    def _side_loader(self, side: pl.LightningDataModule, split: str) -> DataLoader | None:
        if split not in getattr(side, "datasets", {split: None}):
            return None
        return getattr(side, f"{split}_dataloader")()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Each side's own ``on_after_batch_transfer`` (e.g. its ``batch_augment``) on its half of a training
        batch; evaluation batches (one domain's loader each) pass unchanged."""
        if isinstance(batch, dict) and "source" in batch and "target" in batch:
            return {
                "source": self.source.on_after_batch_transfer(batch["source"], dataloader_idx),
                "target": self.target.on_after_batch_transfer(batch["target"], dataloader_idx),
                **{k: v for k, v in batch.items() if k not in ("source", "target")},
            }
        return batch

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader(
            {"source": self.source.train_dataloader(), "target": self.target.train_dataloader()}, "max_size_cycle"
        )

    def _per_domain(self, split: str) -> tuple[list[DataLoader], list[str]]:
        loaders, names = [], []
        for name, side in (("source", self.source), ("target", self.target)):
            loader = self._side_loader(side, split)
            if loader is not None:
                loaders.append(loader)
                names.append(name)
        if not loaders:
            raise DataError(f"neither the source nor the target data has a {split} split")
        return loaders, names

    def val_dataloader(self) -> list[DataLoader]:
        loaders, self.val_domains = self._per_domain("val")
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        loaders, self.test_domains = self._per_domain("test")
        return loaders

    def predict_dataloader(self) -> DataLoader:
        return self.target.predict_dataloader()

    def prediction_id(self, index: int) -> str:
        return getattr(self.target, "prediction_id", str)(index)

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}
