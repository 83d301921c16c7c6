"""Resuming a DANN/CDAN run or a feature-probe run mid-epoch gives the run that was never interrupted.

Same setup as ``test_resume.py`` (whose loader and helpers this reuses): run A trains uninterrupted for
3 epochs of 6 steps; run B trains the same configuration, writes a checkpoint after optimizer step 9
(mid-epoch 1) and stops; a fresh module with another random initialisation then resumes it with
``trainer.fit(..., ckpt_path=..., weights_only=True)``. Every loader is a ``ResumableLoader`` (mid-epoch
restart through Lightning's ``state_dict`` protocol, a permutation seeded by the epoch), so A and the
resumed B see the same batches.

DANN: a ``CombinedLoader`` of a source and a (shifted) target ``ResumableLoader``, as
``DomainAdaptationDataModule`` builds it; Lightning saves and restores both loaders' states. The reversal
coefficient ``λ_p = λ_max (2 / (1 + exp(-γ p)) - 1)`` and DANN's learning-rate annealing are pure functions
of ``p = global_step / trainer.estimated_stepping_batches`` (18 here, in both runs, since the resumed
Trainer has the same ``max_epochs``), so they continue where they stopped. ``γ = 5`` keeps λ visibly
rising across the stop (0.85 at step 9, 0.98 at step 17).

Feature probe: a frozen ``SmallBackbone`` (the same weights in every run, as a pretrained backbone would
have; only the head's initialisation differs) and a linear head. The feature cache is not part of the
checkpoint: with the in-memory cache (data without a fingerprint, the default here) the resumed run
re-extracts features, running the backbone on every batch that holds a sample it has not cached yet (here
all 9 remaining batches: the rest of epoch 1 and all of epoch 2), while run A ran it on the 6 batches of
epoch 0 only. With ``cache_dir`` and a
datamodule that fingerprints its data, the cache written at the end of epoch 0 is read back and the
resumed run never runs the backbone. Either way the features are the same numbers, so the head ends as
in run A.

Tolerances: every parameter and buffer within ``atol=1e-6`` of run A (in practice bit-identical on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from test_resume import ResumableLoader, SmallBackbone, StopAt, max_abs_diff, state
from torch import nn
from torch.utils.data import Dataset

from datamodules.base import ClassificationDataModule
from tlmodules import DANNModule, FeatureProbeModule
from tlmodules.schedules import dann_lambda

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*modules? in eval mode.*"),  # the probe's frozen backbone, on purpose
]

NUM_SAMPLES, BATCH_SIZE, MAX_EPOCHS = 48, 8, 3
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH_SIZE  # 6: steps 0-5 are epoch 0, 6-11 epoch 1, 12-17 epoch 2
TOTAL_STEPS = MAX_EPOCHS * STEPS_PER_EPOCH
STOP = 9  # mid-epoch 1, after the probe's cache was filled in epoch 0 and after λ started rising
NUM_CLASSES, IN_FEATURES = 3, 8
GAMMA = 5.0
ATOL = 1e-6


class DomainPatternData(Dataset):
    """Label ``i % 3``: a bump at position ``2 · label`` over noise, all shifted by ``shift`` (the domain gap)."""

    def __init__(self, seed: int, shift: float, n: int = NUM_SAMPLES) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.inputs = torch.randn(n, IN_FEATURES, generator=g) * 0.5 + shift
        self.inputs[torch.arange(n), self.labels * 2] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": i}


def make_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "max_epochs": MAX_EPOCHS, "logger": False, "log_every_n_steps": 1}
    return pl.Trainer(
        **settings,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def run_and_resume(
    make_module: Callable[[int], pl.LightningModule],
    fit_data: Callable[[], dict[str, Any]],
    folder: Path,
    recorder: pl.Callback,
) -> tuple[pl.LightningModule, dict[str, Any]]:
    """Run B: stop after optimizer step ``STOP`` with a checkpoint, then resume in ``make_module(1)``.

    ``fit_data()`` gives ``trainer.fit``'s data keywords (fresh loaders for each fit); ``recorder`` watches the
    resumed fit. Returns the resumed module and the checkpoint (read with ``weights_only=True``).
    """
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=STOP, save_top_k=-1)
    make_trainer([StopAt(STOP), saver]).fit(make_module(0), **fit_data())
    [ckpt] = sorted(folder.glob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == STOP, "run B did not stop where it was told to"

    resumed = make_module(1)
    fresh = state(resumed)
    assert any(not torch.equal(fresh[k], v) for k, v in saved["state_dict"].items()), "no other initialisation"
    make_trainer([recorder], enable_checkpointing=False).fit(resumed, **fit_data(), ckpt_path=ckpt, weights_only=True)
    return resumed, saved


# ---------------------------------------------------------------------------------------------
# DANN and CDAN
# ---------------------------------------------------------------------------------------------
def make_dann(method: str, seed: int) -> DANNModule:
    torch.manual_seed(seed)
    return DANNModule(
        SmallBackbone(),
        num_classes=NUM_CLASSES,
        method=method,
        bottleneck=8,
        discriminator_hidden=16,
        gamma=GAMMA,
        lr=0.05,
        weight_decay=5e-4,
        optimizer="sgd",
        momentum=0.9,
        lr_schedule="dann",
        projection_samples=0,
    )


def domain_loader() -> CombinedLoader:
    """What ``DomainAdaptationDataModule.train_dataloader`` builds, from two resumable loaders."""
    source = ResumableLoader(DomainPatternData(seed=1, shift=0.0), BATCH_SIZE)
    target = ResumableLoader(DomainPatternData(seed=2, shift=1.0), BATCH_SIZE)
    return CombinedLoader({"source": source, "target": target}, "max_size_cycle")


class DomainRecorder(pl.Callback):
    """Per step: the source and target sample indices, and the λ and head learning rate the step logged."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[list[int], list[int]]] = {}
        self.lambdas: dict[int, float] = {}
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        self.batches[self.step] = (batch["source"]["index"].tolist(), batch["target"]["index"].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lambdas[self.step] = float(trainer.callback_metrics["train/lambda"])
        self.rates[self.step] = float(trainer.callback_metrics["train/lr/head"])


_DANN_A: dict[str, tuple[dict[str, torch.Tensor], DomainRecorder]] = {}


def uninterrupted_dann(method: str) -> tuple[dict[str, torch.Tensor], DomainRecorder]:
    """Run A (cached per method): the final state dict and what it recorded."""
    if method not in _DANN_A:
        recorder = DomainRecorder()
        model = make_dann(method, seed=0)
        make_trainer([recorder], enable_checkpointing=False).fit(model, train_dataloaders=domain_loader())
        assert sorted(recorder.batches) == list(range(TOTAL_STEPS))
        _DANN_A[method] = (state(model), recorder)
    return _DANN_A[method]


@pytest.mark.parametrize("method", ["dann", "cdan"])
def test_dann_resumed_mid_epoch_matches_the_uninterrupted_run(method: str, tmp_path: Path) -> None:
    final_a, a = uninterrupted_dann(method)
    b = DomainRecorder()
    resumed, saved = run_and_resume(
        lambda seed: make_dann(method, seed), lambda: {"train_dataloaders": domain_loader()}, tmp_path, b
    )

    # the resumed run trained exactly the remaining steps, on the same source and target batches as run A
    assert sorted(b.batches) == list(range(STOP, TOTAL_STEPS))
    for step, batches in b.batches.items():
        assert batches == a.batches[step], f"different batches at step {step}"

    # λ and the learning rate continue the schedule: the same values at every resumed step, the last included
    for step in b.lambdas:
        assert b.lambdas[step] == a.lambdas[step], f"λ differs at step {step}"
        assert b.rates[step] == a.rates[step], f"learning rate differs at step {step}"
        assert b.lambdas[step] == pytest.approx(dann_lambda(step / TOTAL_STEPS, 1.0, GAMMA))
    last = TOTAL_STEPS - 1
    assert b.lambdas[last] == a.lambdas[last]
    lambdas = [a.lambdas[s] for s in range(TOTAL_STEPS)]
    assert lambdas[0] == 0.0 and all(y > x for x, y in zip(lambdas, lambdas[1:]))  # still rising
    assert 0.5 < a.lambdas[STOP] < a.lambdas[last] < 1.0

    # the test can fail: every part of the network moved after the stop
    at_stop = saved["state_dict"]
    for part in ("backbone.", "bottleneck.", "head.", "alignment.discriminator."):
        moved = max((final_a[k] - at_stop[k]).abs().max().item() for k in final_a if k.startswith(part))
        assert moved > 1e-3, f"{part} did not move after step {STOP}"

    # and the resumed run ends with run A's parameters and BatchNorm statistics
    final_b = state(resumed)
    assert {k.split(".")[0] for k in final_b} >= {"backbone", "bottleneck", "head", "alignment"}
    diff = max_abs_diff(final_b, final_a)
    assert diff <= ATOL, f"resumed run differs from the uninterrupted one by {diff}"


# ---------------------------------------------------------------------------------------------
# feature probe
# ---------------------------------------------------------------------------------------------
def make_probe(seed: int, head: str = "linear", **kwargs: Any) -> FeatureProbeModule:
    torch.manual_seed(0)  # the frozen backbone: the same "pretrained" weights in every run
    backbone = SmallBackbone()
    torch.manual_seed(seed)  # the head: another initialisation in the resumed module
    return FeatureProbeModule(
        backbone=backbone, num_classes=NUM_CLASSES, head=head, lr=0.05, projection_samples=0, **kwargs
    )


class PatternDataModule(ClassificationDataModule):
    """Training data in a ``ResumableLoader``; ``fingerprint`` lets the probe keep its cache on disk."""

    def __init__(self) -> None:
        super().__init__(batch_size=BATCH_SIZE, num_workers=0, val_fraction=0.0, seed=0)
        self.class_names = [str(c) for c in range(NUM_CLASSES)]
        self.datasets = {"train": DomainPatternData(seed=3, shift=0.0)}

    def setup(self, stage: str | None = None) -> None:
        return None

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.datasets["train"], BATCH_SIZE)

    def val_dataloader(self) -> list:
        return []  # training only, as with the bare loader

    def fingerprint(self, stage: str) -> str | None:
        return f"pattern-{stage}"


class BackboneRecorder(pl.Callback):
    """Per step the sample indices, and the steps whose batch made the frozen backbone run."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.backbone_steps: list[int] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.backbone.body.register_forward_hook(self.on_backbone_forward)

    def on_backbone_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self.backbone_steps.append(self.step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        self.batches[self.step] = batch["index"].tolist()


def first_sightings(batches: dict[int, list[int]]) -> list[int]:
    """The steps whose batch holds a sample no earlier batch held (an in-memory cache misses there)."""
    seen: set[int] = set()
    steps = []
    for step in sorted(batches):
        if not set(batches[step]) <= seen:
            steps.append(step)
        seen |= set(batches[step])
    return steps


def probe_data(cache: str) -> dict[str, Any]:
    """``trainer.fit`` keywords: a bare loader (in-memory cache) or the fingerprinting datamodule (disk cache)."""
    if cache == "disk":
        return {"datamodule": PatternDataModule()}
    return {"train_dataloaders": ResumableLoader(DomainPatternData(seed=3, shift=0.0), BATCH_SIZE)}


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_probe_resumed_mid_epoch_matches_the_uninterrupted_run(cache: str, tmp_path: Path) -> None:
    def make_module(seed: int, folder: str = "cache") -> FeatureProbeModule:
        return make_probe(seed, cache_dir=str(tmp_path / folder) if cache == "disk" else None)

    backbone_init = state(make_probe(seed=0).backbone)

    # run A (with a cache folder of its own)
    a = BackboneRecorder()
    model_a = make_module(seed=0, folder="cache_a")
    make_trainer([a], enable_checkpointing=False).fit(model_a, **probe_data(cache))
    assert sorted(a.batches) == list(range(TOTAL_STEPS))
    assert a.backbone_steps == list(range(STEPS_PER_EPOCH))  # epoch 0 only: later epochs read the cache
    final_a = state(model_a.head)

    # run B: stopped after step 9, resumed in a fresh module (same backbone, another head initialisation)
    b = BackboneRecorder()
    resumed, saved = run_and_resume(make_module, lambda: probe_data(cache), tmp_path / "ckpt", b)
    assert not any(k.startswith("backbone.") for k in saved["state_dict"])  # the frozen backbone is not saved

    assert sorted(b.batches) == list(range(STOP, TOTAL_STEPS))
    for step, batch in b.batches.items():
        assert batch == a.batches[step], f"different batch at step {step}"
    if cache == "memory":
        # the cache is not in the checkpoint: the resumed run re-extracts features on every batch that holds a
        # sample it has not cached yet (a lookup is all or nothing per batch). Half the samples are cached by the
        # end of epoch 1, and every batch of epoch 2 still holds another one: the backbone runs on all 9 batches
        assert b.backbone_steps == first_sightings(b.batches) == list(range(STOP, TOTAL_STEPS))
    else:
        assert b.backbone_steps == []  # every feature came from the cache files written after epoch 0

    # the head moved after the stop (the test can fail) and ends as run A's; the backbone never changed
    head_at_stop = {k.removeprefix("head."): v for k, v in saved["state_dict"].items() if k.startswith("head.")}
    assert max_abs_diff(final_a, head_at_stop) > 1e-3
    diff = max_abs_diff(state(resumed.head), final_a)
    assert diff <= ATOL, f"resumed head differs from the uninterrupted one by {diff}"
    for model in (model_a, resumed):
        assert max_abs_diff(state(model.backbone), backbone_init) == 0.0
        assert not model.backbone.training


def test_an_estimator_probe_stopped_before_its_fit_refuses_to_resume(tmp_path: Path) -> None:
    """A scikit-learn probe fits once, on epoch 0's features, which checkpoints do not hold: a checkpoint
    written mid-epoch 0 would resume into a fit on the remaining samples only, so loading it is refused
    (before any training batch) with the fix."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    make_trainer([StopAt(2), saver]).fit(make_probe(0, head="logistic_regression"), **probe_data("memory"))
    [ckpt] = sorted(tmp_path.glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["tlmodules"]["head"]["fitted"] is False

    recorder = BackboneRecorder()
    resumed = make_probe(1, head="logistic_regression")
    with pytest.raises(ValueError, match="before the estimator was fitted.*start the run again without ckpt_path"):
        make_trainer([recorder], enable_checkpointing=False).fit(
            resumed, **probe_data("memory"), ckpt_path=ckpt, weights_only=True
        )
    assert recorder.batches == {} and not resumed.estimator_fitted
