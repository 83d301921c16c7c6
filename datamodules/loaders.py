"""The training loader whose position Lightning saves in a checkpoint and restores on resume.

Lightning's fit loop calls ``state_dict()`` of every training loader that has ``state_dict``/``load_state_dict``
when it writes a checkpoint, and ``load_state_dict()`` before it creates the loader's first iterator of a
resumed run (``FitLoop.setup_data``). It fetches a sized loader's batches one at a time, without reading
ahead, so the batches this loader has handed out are the batches training has consumed; worker processes
may have read further ahead, which is why the count is kept here and not in the sampler.

Lightning drops the saved position when the training loader was created before the checkpoint was restored
(e.g. ``trainer.estimated_stepping_batches`` asked for in ``configure_optimizers``, Lightning issue #20550);
``TransferModule.training_progress`` avoids asking that early.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from datamodules.samplers import ResumableSampler

POSITION_KEYS = ("epoch", "cycle", "consumed")


def nested_datasets(dataset: Any) -> Iterator[Any]:
    """``dataset`` and every dataset it wraps (``Subset.dataset``, ``ConcatDataset.datasets``)."""
    seen: set[int] = set()
    stack = [dataset]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.append(getattr(current, "dataset", None))
        stack.extend(getattr(current, "datasets", None) or [])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`datamodules.samplers.ResumableSampler` that resumes mid-pass.

    Its position is ``{"epoch", "cycle", "consumed"}``: the pass being read (the sampler's epoch, and how many
    times the loader was iterated before in that epoch, e.g. the shorter side of a ``max_size_cycle`` pair)
    and the batches of it handed out. After :meth:`load_state_dict`, the next iteration in that same epoch
    continues that pass after its ``consumed`` batches; in another epoch (the checkpoint was written at an
    epoch's end) the position is stale and the epoch starts afresh, as the uninterrupted run does.

    Every pass tells the datasets (and those they wrap) that have ``set_pass(key)`` its key, so random per-item
    transforms are a function of ``(seed, epoch, cycle, index)``, in worker processes too.

    The pass is chosen when the first batch is asked for, not at ``iter()``: Lightning creates a resumed run's
    iterator before it calls ``set_epoch`` of the epoch being resumed. If Lightning replaces the sampler (e.g.
    ``overfit_batches``), this is a plain ``DataLoader``.
    """

    _position: dict[str, int] | None = None  # the pass being read, with the batches handed out
    _resume: dict[str, int] | None = None  # a loaded position that the next pass continues

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not isinstance(self.sampler, ResumableSampler):
            return super().__iter__()
        return self._read_pass(self.sampler)

    def _read_pass(self, sampler: ResumableSampler) -> Iterator[Any]:
        cycle, consumed = self._next_pass(sampler.epoch)
        sampler.start_pass(cycle, consumed * (self.batch_size or 1))
        key = sampler.pass_key()
        for dataset in nested_datasets(self.dataset):
            if callable(getattr(dataset, "set_pass", None)):
                dataset.set_pass(key)
        position = {"epoch": sampler.epoch, "cycle": cycle, "consumed": consumed}
        self._position = position
        for batch in super().__iter__():
            position["consumed"] += 1
            yield batch

    def _next_pass(self, epoch: int) -> tuple[int, int]:
        """``(cycle, batches to skip)`` of the pass that starts now."""
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            return resume["cycle"], resume["consumed"]
        if self._position is not None and self._position["epoch"] == epoch:
            return self._position["cycle"] + 1, 0
        return 0, 0

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # loaded, not read yet: still the position
            return dict(self._resume)
        if self._position is not None:
            return dict(self._position)
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "cycle": 0, "consumed": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if all(key in state_dict for key in POSITION_KEYS):
            self._resume = {key: int(state_dict[key]) for key in POSITION_KEYS}
