"""Random state in checkpoints: generators round-trip, training keeps its own stream, data order resumes
mid-pass, augmentation is a function of (seed, epoch, index), and each process keeps its own states.

The CLI runs (quickstart with augmentation, MiniLM text) are in ``tests/test_cli_resume.py``; the
two-process run in ``tests/scripts/ddp_random_state.py`` (the last test here).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from scripts.ddp_random_state import Flat, Patterns
from torch.utils.data import Dataset, DistributedSampler

from datamodules import DigitsDomainDataModule, DomainAdaptationDataModule, ImageFolderDataModule, RandomAffineBatch
from datamodules.augment import seed_for_process
from datamodules.base import ClassificationDataModule
from datamodules.loaders import ResumableLoader
from datamodules.samplers import ClassGroupedSampler, LengthGroupedSampler, ShuffledSampler
from tlmodules import FineTuneModule
from tlmodules.random_state import (
    TrainingRandomState,
    capture_rng,
    gather_per_process,
    pack_rng,
    restore_rng,
    select_process,
    unpack_rng,
)


def draws() -> list[float]:
    """One draw from each global generator (numpy's normal uses its cached second Gaussian, Python's too)."""
    return [
        float(torch.rand(1)),
        float(torch.randn(1)),
        float(np.random.rand()),
        float(np.random.randn()),
        random.random(),
        random.gauss(0, 1),
    ]


def weights_only_round_trip(value: Any, path: Path) -> Any:
    torch.save(value, path)
    return torch.load(path, map_location="cpu", weights_only=True)


# -- the global generators ------------------------------------------------------------------------------------


def test_global_generator_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    draws()  # leaves a cached Gaussian in numpy (has_gauss) and in Python (gauss_next)
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None
    saved = weights_only_round_trip(pack_rng(capture_rng()), tmp_path / "rng.pt")
    expected = draws()
    draws(), draws()  # move every generator on
    restore_rng(unpack_rng(saved))
    assert draws() == expected


def test_training_keeps_its_stream_whatever_runs_between_batches_and_a_restored_callback_continues_it(
    tmp_path: Path,
) -> None:
    trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))

    def run(callback: TrainingRandomState, batches: int, noise_between: bool) -> list[list[float]]:
        """Before the first batch of a fresh run the stream is whatever the run starts with; after it (or after a
        restore) it is the callback's."""
        seen = []
        for _ in range(batches):
            if noise_between and (seen or callback._loaded is not None):  # validation, loader iterators, ...
                draws(), torch.randperm(100)
            callback.on_train_batch_start(trainer, None, None, 0)
            seen.append(draws())  # dropout and friends
            callback.on_train_batch_end(trainer, None, None, None, 0)
        return seen

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    quiet = TrainingRandomState()
    quiet.setup(trainer, None, "fit")
    plain = run(quiet, 4, noise_between=False)

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    first = TrainingRandomState()
    first.setup(trainer, None, "fit")
    noisy = run(first, 2, noise_between=True)
    assert noisy[0] == plain[0]
    assert noisy[1] == plain[1], "what ran between two batches shifted the training stream"

    state = weights_only_round_trip(first.state_dict(), tmp_path / "callback.pt")
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # a new process: other generators
    resumed = TrainingRandomState()
    resumed.setup(trainer, None, "fit")
    resumed.load_state_dict(state)
    assert resumed.state_dict()["processes"][0]["torch"].equal(state["processes"][0]["torch"])  # before a batch
    assert run(resumed, 2, noise_between=True) == plain[2:]


class FakeStrategy:
    """``all_gather`` of two processes: this process's tensor and the other's, in rank order."""

    def __init__(self, rank: int, other: dict[str, torch.Tensor]) -> None:
        self.rank, self.other, self.root_device = rank, other, torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        other = next(v for v in self.other.values() if v.shape == tensor.shape and v.dtype == tensor.dtype)
        return torch.stack([tensor, other] if self.rank == 0 else [other, tensor])


def test_each_process_keeps_its_own_entry_and_another_process_count_warns() -> None:
    mine = {"generator": torch.arange(4, dtype=torch.uint8), "count": torch.tensor([7])}
    theirs = {"generator": torch.arange(4, 8, dtype=torch.uint8), "count": torch.tensor([9])}
    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=FakeStrategy(1, theirs))
    gathered = gather_per_process(trainer, mine)
    assert [g["count"].item() for g in gathered] == [9, 7]  # rank order: the other process is rank 0
    assert select_process(trainer, gathered, "states")["generator"].equal(mine["generator"])
    assert gather_per_process(None, mine)[0]["count"].item() == 7  # one process: no collective
    with pytest.warns(UserWarning, match="2 process"):
        assert select_process(SimpleNamespace(world_size=1, global_rank=0), gathered, "states") is gathered[0]
    with pytest.warns(UserWarning, match="not restoring"):
        assert select_process(SimpleNamespace(world_size=3, global_rank=2), gathered, "states") is None


# -- data order -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [23, 24])
def test_shuffled_sampler_shards_like_distributed_sampler_and_cycles_reshuffle_within_the_shard(n: int) -> None:
    for epoch in (0, 3):
        shards = []
        for rank in (0, 1):
            sampler = ShuffledSampler(n, num_replicas=2, rank=rank, seed=4)
            reference = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=4)
            sampler.set_epoch(epoch), reference.set_epoch(epoch)
            first = list(sampler)
            assert first == list(reference)  # cycle 0 is DistributedSampler's shard, in its order
            sampler.start_pass(cycle=1, skip=0)
            again = list(sampler)
            assert sorted(again) == sorted(first) and again != first  # a re-read: same shard, fresh order
            sampler.start_pass(cycle=1, skip=5)
            assert list(sampler) == again[5:]
            shards.append(first)
        counts = Counter(shards[0] + shards[1])
        assert set(counts) == set(range(n)) and sum(c - 1 for c in counts.values()) == n % 2  # only padding repeats


@pytest.mark.parametrize("grouping", ["length", "class"])
def test_grouped_samplers_resume_and_cycles_keep_the_batches(grouping: str) -> None:
    """Both batch-grouping samplers (they share ``ResumableSampler.shard_batches``): a pass resumed part-way reads
    the rest of it, and a re-read in the same epoch reshuffles whole batches, the short one staying last."""
    if grouping == "length":
        lengths = [random.Random(i).randint(3, 60) for i in range(70)]
        sampler = LengthGroupedSampler(lengths, batch_size=8, num_replicas=2, rank=1, seed=2, group_batches=2)
    else:
        sampler = ClassGroupedSampler([i % 3 for i in range(70)], batch_size=8, num_replicas=2, rank=1, seed=2)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.start_pass(cycle=0, skip=16)
    assert list(sampler) == first[16:]
    sampler.start_pass(cycle=2, skip=0)
    again = list(sampler)
    as_batches = [sorted(first[s : s + 8]) for s in range(0, len(first), 8)]
    again_batches = [sorted(again[s : s + 8]) for s in range(0, len(again), 8)]
    assert again_batches != as_batches and sorted(map(tuple, again_batches)) == sorted(map(tuple, as_batches))
    assert again_batches[-1] == as_batches[-1]  # the one short batch stays last


class Items(Dataset):
    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": torch.full((1, 4, 4), float(i)), "labels": i % 3, "index": self.offset + i}


def indices(batches: list[dict[str, Any]]) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_after_the_batches_training_consumed(num_workers: int) -> None:
    """With a worker process the loader reads ahead of training; the position counts batches handed out."""

    def loader() -> ResumableLoader:
        return ResumableLoader(Items(30), batch_size=4, sampler=ShuffledSampler(30, seed=1), num_workers=num_workers)

    whole = loader()
    whole.sampler.set_epoch(2)
    expected = indices(list(whole))
    partial = loader()
    partial.sampler.set_epoch(2)
    iterator = iter(partial)
    seen = [next(iterator) for _ in range(3)]
    state = partial.state_dict()
    assert state == {"epoch": 2, "cycle": 0, "consumed": 3}
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning creates the iterator first, then sets the epoch: the pass starts lazily
    assert indices(seen) + indices(list(resumed)) == expected
    stale = loader()  # a position from another epoch (written at an epoch's end): the new epoch starts afresh
    stale.load_state_dict({"epoch": 1, "cycle": 0, "consumed": 7})
    stale.sampler.set_epoch(2)
    assert indices(list(stale)) == expected


def small_side(n: int, seed: int, offset: int) -> ClassificationDataModule:
    side = ClassificationDataModule(batch_size=4, num_workers=0, val_fraction=0.0, seed=seed)
    side.class_names = ["0", "1", "2"]
    side.datasets = {"train": Items(n, offset)}
    return side


def test_domain_pair_cycles_the_shorter_side_in_fresh_orders_and_resumes_mid_cycle() -> None:
    """Source 24 samples (6 batches), target 10 (3 batches, the last short): the target is read twice per epoch."""

    def combined(state: list[dict[str, int]] | None = None) -> CombinedLoader:
        pair = DomainAdaptationDataModule(small_side(24, 0, 0), small_side(10, 0, 100))
        loader = pair.train_dataloader()
        for side, side_state in zip(loader.flattened, state or [None, None]):
            if side_state is not None:
                side.load_state_dict(side_state)
        iter(loader)
        for side in loader.flattened:
            side.sampler.set_epoch(1)
        return loader

    loader = combined()
    batches = [next(loader)[0] for _ in range(6)]
    target = [b["target"]["index"].tolist() for b in batches]
    cycle0, cycle1 = sum(target[:3], []), sum(target[3:], [])
    assert sorted(cycle0) == sorted(cycle1) == list(range(100, 110))
    assert cycle0 != cycle1, "the re-read target repeated the same order"

    loader = combined()
    first = [next(loader)[0] for _ in range(4)]  # the target is one batch into its second pass
    state = [side.state_dict() for side in loader.flattened]
    assert state == [{"epoch": 1, "cycle": 0, "consumed": 4}, {"epoch": 1, "cycle": 1, "consumed": 1}]
    resumed = combined(state)
    rest = [next(resumed)[0] for _ in range(2)]
    for got, want in zip(first + rest, batches):
        assert got["source"]["index"].tolist() == want["source"]["index"].tolist()
        assert got["target"]["index"].tolist() == want["target"]["index"].tolist()


# -- augmentation ---------------------------------------------------------------------------------------------


def test_per_image_augmentation_is_a_function_of_seed_epoch_and_index(make_image_folder) -> None:
    root = make_image_folder(per_class=6, size=20)

    def images(epoch: int, num_workers: int, state: dict[str, int] | None = None) -> dict[int, torch.Tensor]:
        data = ImageFolderDataModule(
            train_dir=str(root), image_size=16, augment=True, hflip=True, val_fraction=0.0, seed=7,
            batch_size=4, num_workers=num_workers, verify_images=False,
        )  # fmt: skip
        data.setup("fit")
        loader = data.train_dataloader()
        if state is not None:
            loader.load_state_dict(state)
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100 * num_workers)  # the global generator must not matter
        return {int(i): x for b in loader for i, x in zip(b["index"], b["inputs"])}

    epoch1 = images(1, num_workers=0)
    assert len(epoch1) == 18
    in_worker = images(1, num_workers=1)
    assert all(torch.equal(epoch1[i], in_worker[i]) for i in epoch1), "a worker process augmented differently"
    resumed = images(1, num_workers=0, state={"epoch": 1, "cycle": 0, "consumed": 2})
    assert len(resumed) == 10 and all(torch.equal(epoch1[i], resumed[i]) for i in resumed)
    epoch2 = images(2, num_workers=0)
    assert sum(not torch.equal(epoch1[i], epoch2[i]) for i in epoch1) >= 12, "epochs repeat the same augmentation"


def test_batch_augmentation_generator_travels_in_the_domain_pairs_state(tmp_path: Path) -> None:
    images = torch.rand(6, 3, 28, 28)

    def pair() -> DigitsDomainDataModule:
        return DigitsDomainDataModule(batch_size=8, batch_augment=RandomAffineBatch(degrees=20.0))

    data = pair()
    data.train_dataloader()  # the datamodule gives its augmentation a generator of its own
    augment = data.source.batch_augment
    assert augment.generator is not None and augment is data.target.batch_augment
    augment(images)
    state = weights_only_round_trip(data.state_dict(), tmp_path / "datamodule.pt")
    expected = augment(images)

    resumed = pair()
    resumed.load_state_dict(state)
    resumed.train_dataloader()  # keeps the restored generator
    torch.manual_seed(99)  # the global generator does not matter
    torch.testing.assert_close(resumed.source.batch_augment(images), expected, rtol=0, atol=0)
    fresh = pair()
    fresh.train_dataloader()
    assert not torch.equal(fresh.source.batch_augment(images), expected)  # the state did carry something


def test_processes_seed_their_augmentation_apart() -> None:
    per_rank = []
    for rank in (0, 1):
        augment = RandomAffineBatch()
        seed_for_process(augment, 0, SimpleNamespace(global_rank=rank, world_size=2))
        per_rank.append(augment.matrices(4, torch.device("cpu")))
    assert not torch.equal(*per_rank)


# -- through Lightning, in the Python API ---------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:The dirpath has changed")
def test_python_api_resume_with_dropout_augmentation_and_validation_is_bit_identical(tmp_path: Path) -> None:
    """5 batches per epoch, 13 steps, validation after every epoch; run B resumes run A's step-7 checkpoint."""

    def fit(folder: Path, ckpt: Path | None = None, init_seed: int = 0) -> FineTuneModule:
        pl.seed_everything(init_seed)
        model = FineTuneModule(backbone=Flat(), num_classes=3, dropout=0.5, lr=0.05, lr_schedule="cosine")
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=13, check_val_every_n_epoch=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, deterministic=True,
            callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=7, save_top_k=-1, filename="{step}")],
        )  # fmt: skip
        trainer.fit(model, datamodule=Patterns(batch_size=8), ckpt_path=ckpt, weights_only=True if ckpt else None)
        return model

    whole = fit(tmp_path / "a")
    resumed = fit(tmp_path / "b", ckpt=tmp_path / "a" / "step=7.ckpt", init_seed=1)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    ckpt = torch.load(tmp_path / "a" / "step=7.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["callbacks"]["TrainingRandomState"]["processes"]) == 1
    assert len(ckpt["Patterns"]["batch_augment"]) == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "cycle": 0, "consumed": 2}]


# -- two processes --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_under_ddp_each_process_saves_and_restores_its_own_streams(tmp_path: Path) -> None:
    """Two CPU processes whose streams differ (dropout, augmentation); run B resumes run A's mid-epoch checkpoint."""
    script = Path(__file__).parent / "scripts" / "ddp_random_state.py"
    env = {k: v for k, v in os.environ.items() if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"}}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, f"DDP run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ckpt = torch.load(tmp_path / "a" / "step=7.ckpt", map_location="cpu", weights_only=True)
    streams = ckpt["callbacks"]["TrainingRandomState"]["processes"]
    augment = ckpt["Patterns"]["batch_augment"]
    assert len(streams) == len(augment) == 2
    assert not streams[0]["torch"].equal(streams[1]["torch"]), "the processes' streams were not different"
    assert not augment[0]["generator"].equal(augment[1]["generator"])
    for rank in ranks:
        assert rank["world_size"] == 2
        # what each process held when it wrote the checkpoint is its entry
        assert rank["stream_at_checkpoint"].equal(streams[rank["rank"]]["torch"])
        for name, value in rank["whole"].items():
            assert torch.equal(value, rank["resumed"][name]), f"rank {rank['rank']}: {name} differs after resume"
