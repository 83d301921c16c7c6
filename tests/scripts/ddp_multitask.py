"""A two-process DDP run of MultiTaskModule on the CPU (gloo), for ``tests/test_distributed.py``.

64 training samples in order (a distributed sampler without shuffling), batches of 8: rank 0 gets the even
and rank 1 the odd samples. Every odd sample lacks the ``kind`` label, so rank 1 never sees a
label of that task: its head gets a zero gradient there and a real one on rank 0, and DDP must still
average them. Two epochs, then one validation.

Usage: ``python ddp_multitask.py OUT_DIR WEIGHTING``. Every rank writes ``OUT_DIR/rank<r>.pt``: the
sample indices it trained on, its initial and final parameters and buffers, the task weights, and the
metrics it logged, with the final model's metrics on the whole validation set.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tlmodules.multitask import MultiTaskModule

IN_FEATURES, TRAIN, VAL, BATCH = 6, 64, 24, 8
TASKS = [
    {"name": "kind", "kind": "multiclass", "num_outputs": 3},
    {"name": "size", "kind": "regression", "num_outputs": 1},
]


def samples(n: int, seed: int, drop_odd_kind: bool) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    kind = x[:, :3].argmax(1)
    size = 2 * x[:, 3] - x[:, 4]
    if drop_odd_kind:
        kind[1::2] = -100
    return [{"inputs": x[i], "labels": {"kind": kind[i], "size": size[i]}, "index": i} for i in range(n)]


class InOrder(pl.LightningDataModule):
    """Rank r gets samples r, r + 2, r + 4, ... of both splits (a DistributedSampler without shuffling)."""

    def __init__(self, train: list[dict], val: list[dict]) -> None:
        super().__init__()
        self.train, self.val = train, val

    def _loader(self, items: list[dict]) -> DataLoader:
        sampler = DistributedSampler(items, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(items, batch_size=BATCH, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.indices: list[int] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.extend(batch["index"].tolist())


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("weighting")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    model = MultiTaskModule(
        tasks=TASKS, weighting=args.weighting, in_features=IN_FEATURES, trunk_hidden=16, lr=0.05, weight_decay=0.0
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # a checkpoint after step 2, mid-epoch 0: it holds the running epoch's loss sums of both ranks
        callbacks=[record, ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=2, save_top_k=-1)],
        use_distributed_sampler=False,  # InOrder shards the data itself, without shuffling
    )
    val_samples = samples(VAL, 1, drop_odd_kind=False)
    trainer.fit(model, datamodule=InOrder(samples(TRAIN, 0, drop_odd_kind=True), val_samples))
    model.eval()
    with torch.no_grad():
        x = torch.stack([s["inputs"] for s in val_samples])
        out = model(x)
        kind = torch.stack([s["labels"]["kind"] for s in val_samples])
        size = torch.stack([s["labels"]["size"] for s in val_samples])
        full = {
            "val/kind/acc": float((out["kind"].argmax(-1) == kind).float().mean()),
            "val/size/rmse": math.sqrt(float(((out["size"] - size) ** 2).mean())),
        }
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "indices": record.indices,
            "initial": record.initial,
            "final": state(model),
            "weights": model.weighting.weights(trainer.global_step),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "full_val": full,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
