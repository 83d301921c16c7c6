"""A cache of frozen-backbone features, addressed by split and sample index.

A feature probe computes each sample's features once and reuses them every epoch: the module
asks :meth:`FeatureCache.lookup` with the batch's sample indices and runs the backbone only on a
miss. The cache lives in memory; with a ``folder`` it is also written to disk under a key built
from the backbone (spec, weights, preprocessing, a hash of every weight), the data (its
datamodule's fingerprint of the split) and the feature level, so a later run with the same backbone
and data does not recompute, and any change to them selects a different file. Files are read with
``torch.load(weights_only=True)`` and written to a temporary name, then renamed. Each file records a
SHA-256 of its tensors: a file that fails it, or whose tensors do not fit together, is ignored and
its samples are recomputed (``torch.load`` itself does not notice flipped bytes in tensor data).

Under DDP each process extracts the samples of its own shard (of a length-ordered extraction pass, or of the
first epoch's batches); :meth:`share` exchanges them so that every process holds every sample (shards change
between epochs when the sampler shuffles).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _update_digest(digest: Any, name: str, tensor: Tensor) -> None:
    data = tensor.detach().cpu().contiguous()
    digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
    # flattened first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def tensor_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes) of ``module``."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        _update_digest(digest, name, tensor)
    return digest.hexdigest()


def _payload_digest(index: Tensor, lengths: Tensor, features: Tensor) -> str:
    """SHA-256 of a cache file's tensors."""
    digest = hashlib.sha256()
    for name, tensor in (("index", index), ("lengths", lengths), ("features", features)):
        _update_digest(digest, name, tensor)
    return digest.hexdigest()


def cache_key(*parts: Any) -> str:
    """A short stable key from JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """Per-split maps from sample index to a feature tensor (``(F,)``, or ``(n, F)`` per token).

    Args:
        folder: where to persist features (``None``: memory only).
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.store_: dict[str, dict[int, Tensor]] = {}
        self.keys: dict[str, str] = {}
        self.persistent: dict[str, bool] = {}
        self.dirty: set[str] = set()

    # -- addressing ---------------------------------------------------------------------------
    def bind(self, split: str, key: str, persistent: bool = True) -> int:
        """Use ``key`` for ``split``; a new key drops what memory held for it and loads its files.

        ``persistent=False`` keeps the split in memory only (data without a stable fingerprint).
        Returns the number of samples available after loading.
        """
        if self.keys.get(split) != key:
            self.store_[split] = {}
            self.dirty.discard(split)
            self.keys[split] = key
            self.persistent[split] = persistent
            if self.folder is not None and persistent:
                for path in sorted(self.folder.glob(f"{key}.*.pt")):
                    self.store_[split].update(self._read(path))
        return len(self.store_.setdefault(split, {}))

    def __len__(self) -> int:
        return sum(len(v) for v in self.store_.values())

    def size(self, split: str) -> int:
        return len(self.store_.get(split, {}))

    def lookup(self, split: str, indices: Sequence[int]) -> list[Tensor] | None:
        """The cached features of ``indices``, or ``None`` when any of them is missing."""
        table = self.store_.get(split)
        if not table:
            return None
        try:
            return [table[int(i)] for i in indices]
        except KeyError:
            return None

    def add(self, split: str, indices: Sequence[int], features: Iterable[Tensor]) -> None:
        table = self.store_.setdefault(split, {})
        for index, feature in zip(indices, features):
            table[int(index)] = feature.detach().to("cpu", torch.float32).clone()
        self.dirty.add(split)

    def items(self, split: str) -> tuple[list[int], list[Tensor]]:
        """All cached samples of ``split``, sorted by index."""
        table = self.store_.get(split, {})
        order = sorted(table)
        return order, [table[i] for i in order]

    # -- disk ---------------------------------------------------------------------------------
    def flush(self, split: str, rank: int = 0) -> Path | None:
        """Write what this process holds for ``split`` to ``<folder>/<key>.rank<r>.pt`` (atomically)."""
        key = self.keys.get(split)
        if self.folder is None or key is None or not self.persistent.get(split) or split not in self.dirty:
            return None
        indices, features = self.items(split)
        # rows per sample: -1 for a vector (F,) (one row); n >= 0 for a matrix (n, F), e.g. a sentence's
        # words (none at all when every word was truncated or tokenized to nothing)
        lengths = torch.tensor([f.shape[0] if f.ndim > 1 else -1 for f in features], dtype=torch.long)
        flat = torch.cat([f if f.ndim > 1 else f.unsqueeze(0) for f in features]) if features else torch.empty(0)
        index = torch.tensor(indices, dtype=torch.long)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.rank{rank}.pt"
        partial = path.with_name(path.name + ".partial")
        payload = {"index": index, "lengths": lengths, "features": flat}
        torch.save({**payload, "sha256": _payload_digest(index, lengths, flat)}, partial)
        partial.replace(path)
        self.dirty.discard(split)
        return path

    @staticmethod
    def _read(path: Path) -> dict[int, Tensor]:
        """The samples of one file; none from a file that is unreadable, inconsistent or fails its SHA-256."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            index, lengths, flat = saved["index"], saved["lengths"], saved["features"]
            if saved.get("sha256") != _payload_digest(index, lengths, flat):
                return {}
            rows = torch.where(lengths < 0, 1, lengths)
            if (
                index.ndim != 1
                or lengths.shape != index.shape
                or not len(index)
                or bool((lengths < -1).any())
                or flat.ndim != 2
                or not flat.is_floating_point()
                or flat.shape[0] != int(rows.sum())
            ):
                return {}
        except Exception:  # noqa: BLE001 - an unreadable cache file is recomputed, never trusted
            return {}
        table: dict[int, Tensor] = {}
        row = 0
        for i, n in zip(index.tolist(), lengths.tolist()):
            if n < 0:
                table[i] = flat[row]
                row += 1
            else:
                table[i] = flat[row : row + n]
                row += n
        return table

    def mark_saved(self, split: str) -> None:
        """What this process holds for ``split`` is on disk already (another process wrote the same samples):
        :meth:`flush` has nothing to write."""
        self.dirty.discard(split)

    # -- processes ----------------------------------------------------------------------------
    def share(self, split: str) -> None:
        """Give every process the samples that any process extracted (a collective call: all ranks)."""
        merge_across_processes(self.store_.setdefault(split, {}))


def merge_across_processes(table: dict[int, Any]) -> None:
    """Update ``table`` in place with the entries every other process holds (collective; no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, table)
    for other in gathered:
        for index, value in other.items():
            table.setdefault(index, value)
