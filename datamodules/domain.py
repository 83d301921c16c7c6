"""Paired source and target data for domain adaptation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from datamodules.base import no_validation
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


def pass_backbone(side: Any, role: str, backbone: str, weights: str | None) -> None:
    """Give one side of a domain pair the model's backbone; a side set to another backbone is an error."""
    own = getattr(side, "backbone_spec", None)
    if own is not None and own != backbone:
        raise DataError(
            f"the {role} datamodule has backbone {own!r} but the model's is {backbone!r}; leave the {role}'s "
            "backbone unset: the model's backbone reaches both sides"
        )
    use_backbone = getattr(side, "use_backbone", None)
    if callable(use_backbone):
        use_backbone(backbone, weights)


class DomainAdaptationDataModule(pl.LightningDataModule):
    """Compose a labelled source datamodule and a target datamodule that share one label space.

    Training batches are ``{"source": <source batch>, "target": <target batch>}`` from a combined
    loader that cycles the shorter side (``max_size_cycle``); target labels, if the target data has
    any, are not used for training. Validation and test return one loader per domain that has the
    split (names in :attr:`val_domains` / :attr:`test_domains`): target labels serve evaluation only.
    Under DDP Lightning shards both sides across processes.

    Each side is any datamodule with its own arguments (class folders, text files, ...), in Python or in
    YAML (``source: {class_path: ..., init_args: ...}``). ``backbone``/``weights`` (linked from the model in
    the CLI) reach both sides, which derive their preprocessing or tokenizer from them; leave the sides'
    own ``backbone`` unset.

    Evaluation and prediction need only one side: ``None`` for the other (``train.py test``/``predict`` drop a
    side that has no data of the split they read).

    Args:
        source: a datamodule of labelled source data (its ``train`` and ``val`` splits are used).
        target: a datamodule of target data (``train`` for adaptation, ``val``/``test`` for evaluation,
            ``predict`` for prediction).
        backbone, weights: the model's backbone spec and weights, passed on to both sides.
    """

    def __init__(
        self,
        source: pl.LightningDataModule | None,
        target: pl.LightningDataModule | None,
        backbone: str | None = None,
        weights: str | None = "DEFAULT",
    ) -> None:
        super().__init__()
        self.source = source
        self.target = target
        self.backbone_spec, self.backbone_weights = backbone, weights
        if source is None and target is None:
            raise DataError("a domain pair needs a source and a target datamodule (one of them to evaluate)")
        if backbone is not None:
            for role, side in self.sides():
                pass_backbone(side, role, backbone, weights)
        self.class_names = check_same_label_space(source, target) if source is not None else target.class_names
        self.val_domains: list[str] = []
        self.test_domains: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sides(self) -> list[tuple[str, pl.LightningDataModule]]:
        """``("source", datamodule)`` and ``("target", datamodule)``, for the sides that are there."""
        return [(role, side) for role, side in (("source", self.source), ("target", self.target)) if side is not None]

    def has_split(self, stage: str) -> bool:
        """Whether either side has ``stage`` (training needs both; :meth:`train_dataloader` says so)."""
        return any(getattr(side, "has_split", lambda _: True)(stage) for _, side in self.sides())

    def data_sources(self) -> dict[str, str]:
        """Each side's files or folders, as ``source.train``, ``target.val``, ..."""
        return {
            f"{role}.{stage}": path
            for role, side in self.sides()
            for stage, path in getattr(side, "data_sources", dict)().items()
        }

    def prepare_data(self) -> None:
        for _, side in self.sides():
            side.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for _, side in self.sides():
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
        missing = [role for role in ("source", "target") if getattr(self, role) is None]
        if missing:
            raise DataError(f"training on a domain pair needs both sides; give the {missing[0]} datamodule")
        return CombinedLoader(
            {"source": self.source.train_dataloader(), "target": self.target.train_dataloader()}, "max_size_cycle"
        )

    def _per_domain(self, split: str, required: bool = True) -> tuple[list[DataLoader], list[str]]:
        loaders, names = [], []
        for name, side in self.sides():
            loader = self._side_loader(side, split)
            if loader is not None and loader != []:
                loaders.append(loader)
                names.append(name)
        if not loaders and required:
            raise DataError(f"neither the source nor the target data has a {split} split")
        return loaders, names

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per domain with validation data; none (no validation loop) when neither side has any."""
        loaders, self.val_domains = self._per_domain("val", required=False)
        return loaders or no_validation()

    def test_dataloader(self) -> list[DataLoader]:
        loaders, self.test_domains = self._per_domain("test")
        return loaders

    def predict_dataloader(self) -> DataLoader:
        if self.target is None:
            raise DataError("prediction reads the target datamodule's predict split; give the target datamodule")
        return self.target.predict_dataloader()

    def prediction_id(self, index: int) -> str:
        return getattr(self.target, "prediction_id", str)(index)

    def state_dict(self) -> dict[str, Any]:
        """The label set and each side's own state (e.g. its ``batch_augment`` generator), so a resumed run
        continues both sides' random streams."""
        return {
            "class_names": list(self.class_names),
            **{role: side.state_dict() for role, side in self.sides()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for role, side in self.sides():
            if state_dict.get(role) is not None:
                side.load_state_dict(state_dict[role])
