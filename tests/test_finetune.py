"""FineTuneModule under real Lightning Trainers on tiny in-memory data: strategies, rates, L2-SP,
mixed precision, logging, checkpoints and prediction."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from conftest import digit_like_image, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datamodules import ImageFolderDataModule
from tlmodules import FineTuneModule


def samples(n: int, num_classes: int = 3, size: int = 28, seed: int = 0, index: bool = False) -> list[dict]:
    """Learnable images (a bright bar whose position is the label), normalised to [-1, 1], as 3 channels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % num_classes
        x = torch.from_numpy(np.asarray(digit_like_image(label, size, rng), dtype=np.float32) / 127.5 - 1.0)
        sample = {"inputs": x.expand(3, size, size).clone(), "labels": label}
        if index:
            sample["index"] = 100 + i
        out.append(sample)
    return out


def loader(data: list[dict], batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def bn_net(width: int = 4, dropout: float = 0.5) -> nn.Sequential:
    """Three conv-BN-ReLU-dropout blocks: three layer groups, each with BatchNorm statistics and dropout."""

    def block(c_in: int, last: bool = False) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(dropout),
        ]
        if last:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers)

    return nn.Sequential(block(3), block(width), block(width, last=True))


def bn_model(**kwargs: Any) -> FineTuneModule:
    return FineTuneModule(bn_net(), num_features=4, num_classes=3, **kwargs)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers (BatchNorm running_mean/var/num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def group_keys(model: FineTuneModule, i: int) -> list[str]:
    """State-dict keys of ``model.backbone`` that belong to layer group ``i`` (parameters and the
    buffers of the same submodules)."""
    prefixes = {"body." + n.rsplit(".", 1)[0] + "." for n in model.backbone.group_names(i)}
    return [k for k in model.backbone.state_dict() if any(k.startswith(p) for p in prefixes)]


class Probe(pl.Callback):
    """Records, for every training step, the train/eval mode each module had during its forward pass
    (forward pre-hooks), the optimizer's rates and group structure, and a snapshot after each epoch."""

    def __init__(self) -> None:
        self.modes: list[tuple[int, str, bool]] = []  # (epoch, module name, training)
        self.steps: list[dict[str, Any]] = []
        self.epoch_end: list[dict[str, Tensor]] = []
        self.logged: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.start: dict[str, Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: FineTuneModule) -> None:
        self.start = snapshot(pl_module.backbone)

        def hook(name: str) -> Callable:
            def record(module: nn.Module, args: Any) -> None:
                if trainer.training:
                    self.modes.append((trainer.current_epoch, name, module.training))

            return record

        for name, module in pl_module.named_modules():
            if isinstance(module, nn.BatchNorm2d | nn.Dropout | nn.Linear | nn.Conv2d):
                module.register_forward_pre_hook(hook(name))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: FineTuneModule, batch: Any, idx: int) -> None:
        optimizer = trainer.optimizers[0]
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "groups": [(g["name"], [id(p) for p in g["params"]]) for g in optimizer.param_groups],
                "backbone_requires_grad": [p.requires_grad for p in pl_module.backbone.parameters()],
            }
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: FineTuneModule, out: Any, batch: Any, i: int) -> None:
        self.losses.append(float(out["loss"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: FineTuneModule) -> None:
        self.epoch_end.append(snapshot(pl_module.backbone))
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def modes_in(self, epoch: int, prefix: str) -> set[bool]:
        return {training for e, name, training in self.modes if e == epoch and name.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "partial"}, "unknown strategy 'partial'"),
        ({"unfreeze_epoch": -1}, "unfreeze_epoch must be >= 0"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"backbone_lr_ratio": -0.1}, "backbone_lr_ratio >= 0"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FineTuneModule("builtin:lenet", num_classes=3, **kwargs)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------
def test_freeze_keeps_backbone_and_batchnorm_statistics_bit_identical() -> None:
    model = bn_model(strategy="freeze", lr=0.5, weight_decay=10.0)
    head_before = snapshot(model.head)
    probe = Probe()
    trainer = make_trainer(callbacks=[probe])
    trainer.fit(model, loader(samples(12, size=8)), loader(samples(6, size=8, seed=1)))

    after = snapshot(model.backbone)
    assert any(k.endswith("running_mean") for k in after) and any(k.endswith("num_batches_tracked") for k in after)
    assert changed(probe.start, after) == set(), "a frozen backbone (weights or BatchNorm statistics) moved"
    assert changed(head_before, snapshot(model.head)) == set(head_before), "the head did not train"
    # frozen BatchNorm/dropout/conv ran in eval mode inside every training step; the head in train mode
    assert probe.modes_in(0, "backbone.") == {False}
    assert probe.modes_in(0, "head.") == {True}
    assert model.training and model.head.training  # the module itself is back in train mode after fit
    for p in model.backbone.parameters():
        assert not p.requires_grad and p.grad is None
    # the frozen parameters are in the optimizer (fixed structure) but AdamW never touched them
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in model.backbone.parameters())
    assert all(not optimizer.state[p] for p in model.backbone.parameters())
    assert trainer.callback_metrics["train/trainable/backbone_groups"] == 0
    assert trainer.callback_metrics["train/trainable/fraction"] == pytest.approx(
        sum(p.numel() for p in model.head.parameters()) / sum(p.numel() for p in model.parameters())
    )


def test_full_strategy_control_updates_weights_and_batchnorm_statistics() -> None:
    """The same run with strategy=full moves everything: the freeze test above can fail."""
    model = bn_model(strategy="full", lr=0.5, weight_decay=10.0)
    probe = Probe()
    make_trainer(callbacks=[probe]).fit(model, loader(samples(12, size=8)))
    moved = changed(probe.start, snapshot(model.backbone))
    assert moved == set(probe.start)  # every weight, running statistic and batch counter
    assert probe.modes_in(0, "backbone.") == {True}


def test_freeze_with_torchvision_resnet18_keeps_batchnorm_statistics() -> None:
    model = FineTuneModule("torchvision:resnet18", weights="none", num_classes=3, strategy="freeze", lr=0.1)
    bn_names = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == 20
    probe = Probe()
    make_trainer(callbacks=[probe], max_steps=2).fit(model, loader(samples(8, size=32)))
    assert changed(probe.start, snapshot(model.backbone)) == set()
    bn_modes = {t for _, name, t in probe.modes if name in {f"backbone.{n}" for n in bn_names}}
    assert bn_modes == {False}
    assert all(p.grad is None for p in model.backbone.parameters())


def test_freeze_unfreeze_switches_at_unfreeze_epoch_with_a_fixed_optimizer_structure() -> None:
    model = bn_model(strategy="freeze_unfreeze", unfreeze_epoch=1, lr=0.05)
    probe = Probe()
    trainer = make_trainer(callbacks=[probe], max_epochs=2)
    trainer.fit(model, loader(samples(8, size=8)))

    assert changed(probe.start, probe.epoch_end[0]) == set(), "the backbone moved while frozen (epoch 0)"
    assert changed(probe.epoch_end[0], probe.epoch_end[1]) == set(probe.start), "not everything trained in epoch 1"
    # BatchNorm/dropout are in eval mode while frozen, back in train mode once unfrozen
    assert probe.modes_in(0, "backbone.") == {False}
    assert probe.modes_in(1, "backbone.") == {True}
    epoch0 = [s for s in probe.steps if s["epoch"] == 0]
    epoch1 = [s for s in probe.steps if s["epoch"] == 1]
    assert not any(any(s["backbone_requires_grad"]) for s in epoch0)
    assert all(all(s["backbone_requires_grad"]) for s in epoch1)
    # the optimizer's groups (names and parameters) never change
    assert epoch0[0]["groups"] == epoch1[-1]["groups"]
    names = [name for name, _ in epoch0[0]["groups"]]
    assert names == [
        "backbone.0",
        "backbone.0.no_decay",
        "backbone.1",
        "backbone.1.no_decay",
        "backbone.2",
        "backbone.2.no_decay",
        "head",
        "head.no_decay",
    ]
    assert [log["train/trainable/backbone_groups"] for log in probe.logged] == [0.0, 3.0]


def test_gradual_unfreezes_one_more_top_group_per_epoch() -> None:
    model = bn_model(strategy="gradual", unfreeze_epoch=1, lr=0.05)
    assert model.backbone.num_groups == 3
    groups = [group_keys(model, i) for i in range(3)]
    assert all(groups) and sorted(k for g in groups for k in g) == sorted(model.backbone.state_dict())
    probe = Probe()
    make_trainer(callbacks=[probe], max_epochs=3).fit(model, loader(samples(8, size=8)))

    for epoch, moved_groups in enumerate([set(), {2}, {1, 2}]):
        moved = changed(probe.start, probe.epoch_end[epoch])
        for i in range(3):
            if i in moved_groups:
                assert set(groups[i]) <= moved, f"group {i} did not train by the end of epoch {epoch}"
            else:
                assert not set(groups[i]) & moved, f"group {i} moved by the end of epoch {epoch}"
    assert [log["train/trainable/backbone_groups"] for log in probe.logged] == [0.0, 1.0, 2.0]
    # in epoch 2 the bottom block (frozen) ran in eval mode, the two top blocks in train mode
    assert probe.modes_in(2, "backbone.body.0.") == {False}
    assert probe.modes_in(2, "backbone.body.1.") == {True}
    assert probe.modes_in(2, "backbone.body.2.") == {True}


def test_lp_ft_head_rate_drops_to_backbone_rate_from_the_first_fine_tuning_step() -> None:
    model = FineTuneModule(
        "builtin:lenet",
        num_classes=3,
        strategy="lp_ft",
        unfreeze_epoch=1,
        lr=0.1,
        backbone_lr_ratio=0.1,
        lr_schedule="constant",
    )
    probe = Probe()
    trainer = make_trainer(callbacks=[probe], max_epochs=2, log_every_n_steps=1)
    trainer.fit(model, loader(samples(12)))

    assert [s["epoch"] for s in probe.steps] == [0, 0, 0, 1, 1, 1]
    for step in probe.steps:
        head_lr = 0.1 if step["epoch"] == 0 else 0.1 * 0.1
        assert step["lr"]["head"] == pytest.approx(head_lr), step
        assert step["lr"]["head.no_decay"] == pytest.approx(head_lr)
        assert step["lr"]["backbone.0"] == pytest.approx(0.01)
        assert step["lr"]["backbone.1"] == pytest.approx(0.01)
        assert all(step["backbone_requires_grad"]) == (step["epoch"] == 1)
    assert changed(probe.start, probe.epoch_end[0]) == set()
    assert changed(probe.epoch_end[0], probe.epoch_end[1]) == set(probe.start)
    # the logged rate is the one the step used
    assert trainer.callback_metrics["train/lr/head"] == pytest.approx(0.01)
    assert probe.logged[0]["train/lr/head"] == pytest.approx(0.1)


def test_lp_ft_phase_switch_composes_with_the_cosine_shape() -> None:
    model = FineTuneModule(
        "builtin:lenet", num_classes=3, strategy="lp_ft", lr=0.1, backbone_lr_ratio=0.5, lr_schedule="cosine"
    )
    probe = Probe()
    make_trainer(callbacks=[probe], max_epochs=2).fit(model, loader(samples(8)))
    total = len(probe.steps)
    assert total == 4
    for step_index, step in enumerate(probe.steps):
        shape = 0.5 * (1 + math.cos(math.pi * step_index / total))
        phase = 1.0 if step["epoch"] == 0 else 0.5
        assert step["lr"]["head"] == pytest.approx(0.1 * shape * phase)
        assert step["lr"]["backbone.1"] == pytest.approx(0.1 * 0.5 * shape)


def test_layer_decay_initial_rates_and_no_decay_groups() -> None:
    lr, ratio, decay, wd = 0.1, 0.5, 0.6, 0.05
    model = bn_model(lr=lr, backbone_lr_ratio=ratio, layer_decay=decay, weight_decay=wd)
    seen: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["groups"] = [dict(g) for g in trainer.optimizers[0].param_groups]

    make_trainer(callbacks=[Capture()], max_steps=1).fit(model, loader(samples(4, size=8)))
    groups = {g["name"]: g for g in seen["groups"]}
    num_groups = model.backbone.num_groups
    assert num_groups == 3
    for i in range(num_groups):
        expected = lr * ratio * decay ** (num_groups - 1 - i)
        for name in (f"backbone.{i}", f"backbone.{i}.no_decay"):
            assert groups[name]["initial_lr"] == pytest.approx(expected)
            assert groups[name]["lr"] == pytest.approx(expected)  # cosine starts at 1
    assert groups["head"]["lr"] == pytest.approx(lr)
    assert groups["backbone.0"]["lr"] < groups["backbone.1"]["lr"] < groups["backbone.2"]["lr"] < groups["head"]["lr"]
    # biases and BatchNorm weights are exempt from weight decay; conv/linear weights are not
    for name, group in groups.items():
        ndims = {p.ndim for p in group["params"]}
        if name.endswith(".no_decay"):
            assert group["weight_decay"] == 0.0 and ndims == {1}
        else:
            assert group["weight_decay"] == wd and min(ndims) > 1
    bn_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    no_decay = {id(p) for name, g in groups.items() if name.endswith("no_decay") for p in g["params"]}
    assert bn_weights and bn_weights <= no_decay
    # every parameter is in exactly one group
    ids = [id(p) for g in seen["groups"] for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# L2-SP
# ---------------------------------------------------------------------------------------------
def test_l2sp_penalty_matches_the_formula() -> None:
    alpha, beta = 0.3, 0.2
    model = FineTuneModule("builtin:lenet", num_classes=3, l2sp_alpha=alpha, l2sp_beta=beta)
    anchor = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head_sq = sum(p.detach().pow(2).sum() for p in model.head.parameters())
    at_start = model.l2sp.penalty(model.backbone.named_parameters(), model.head.parameters()).detach()
    assert float(at_start) == pytest.approx(beta / 2 * float(head_sq), rel=1e-5)

    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model.head.parameters():
            p.mul_(1.5)
    distance = sum((p.detach() - anchor[n]).pow(2).sum() for n, p in model.backbone.named_parameters())
    head_sq = sum(p.detach().pow(2).sum() for p in model.head.parameters())
    expected = alpha / 2 * float(distance) + beta / 2 * float(head_sq)
    got = model.l2sp.penalty(model.backbone.named_parameters(), model.head.parameters())
    assert float(distance) > 0
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the penalty is differentiable and pulls the weights back toward the anchor
    got.backward()
    name, param = next(iter(model.backbone.named_parameters()))
    torch.testing.assert_close(param.grad, alpha * (param.detach() - anchor[name]))


def test_l2sp_anchor_travels_in_the_checkpoint(tmp_path: Path) -> None:
    model = FineTuneModule("builtin:lenet", num_classes=3, l2sp_alpha=1.0, l2sp_beta=0.1, lr=0.05)
    anchor = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = make_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(model, loader(samples(8)))
    assert trainer.callback_metrics["train/l2sp"] > 0
    path = tmp_path / "l2sp.ckpt"
    trainer.save_checkpoint(path)
    assert set(torch.load(path, weights_only=True)["l2sp_anchor"]) == set(anchor)

    torch.manual_seed(1234)  # the new module's random backbone (and thus its fresh anchor) differs
    fresh = FineTuneModule("builtin:lenet", num_classes=3, l2sp_alpha=1.0, l2sp_beta=0.1)
    assert not all(torch.equal(fresh.l2sp.anchor[n], anchor[n]) for n in anchor)
    torch.manual_seed(1234)
    loaded = FineTuneModule.load_from_checkpoint(path)
    for name, value in anchor.items():
        assert torch.equal(loaded.l2sp.anchor[name], value), name
    # the trained weights were loaded, and they differ from the anchor
    for name, p in loaded.backbone.named_parameters():
        assert torch.equal(p, dict(model.backbone.named_parameters())[name])
    assert not all(torch.equal(p, anchor[n]) for n, p in loaded.backbone.named_parameters())
    penalty = model.l2sp.penalty(model.backbone.named_parameters(), model.head.parameters())
    reloaded = loaded.l2sp.penalty(loaded.backbone.named_parameters(), loaded.head.parameters())
    assert float(reloaded) == pytest.approx(float(penalty))


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------
def test_bf16_mixed_trains_like_fp32() -> None:
    """lenet on the bar images, 2 epochs of 3 steps: bf16-mixed losses are finite, fall, track the
    fp32 run within 0.05 per step, and the validation accuracy is within 0.1 of fp32's."""
    train, val = samples(24), samples(12, seed=1)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        model = FineTuneModule("builtin:lenet", num_classes=3, lr=3e-3, lr_schedule="constant")
        dtypes: list[torch.dtype] = []
        model.head.register_forward_hook(lambda m, args, out, seen=dtypes: seen.append(out.dtype))
        probe = Probe()
        trainer = make_trainer(callbacks=[probe], max_epochs=2, precision=precision)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # bf16 kernels are slow on CPUs without bf16 instructions; threads add contention
        try:
            trainer.fit(model, loader(train, 8, shuffle=True), loader(val, 12))
        finally:
            torch.set_num_threads(threads)
        results[precision] = (probe.losses, float(trainer.callback_metrics["val/acc"]), set(dtypes))
    losses32, acc32, dtypes32 = results["32-true"]
    losses16, acc16, dtypes16 = results["bf16-mixed"]
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}  # autocast really ran
    assert len(losses16) == 6 and all(math.isfinite(v) for v in losses16)
    assert sum(losses16[-2:]) < 0.5 * sum(losses16[:2])
    assert losses16 == pytest.approx(losses32, abs=0.05)
    assert acc32 >= 0.9
    assert abs(acc16 - acc32) <= 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


# ---------------------------------------------------------------------------------------------
# data wiring, logging
# ---------------------------------------------------------------------------------------------
def image_datamodule(root: Path, **kwargs: Any) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        train_dir=str(root),
        backbone="builtin:lenet",
        val_fraction=0.34,
        batch_size=6,
        num_workers=0,
        **kwargs,
    )


def test_tensorboard_logging_and_class_names_from_the_datamodule(tmp_path: Path, make_image_folder) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_image_folder(classes=("cat", "dog", "eel"), per_class=6, size=28)
    model = FineTuneModule("builtin:lenet", lr=0.01, backbone_lr_ratio=0.5, lr_schedule="constant")
    assert model.head is None  # num_classes comes from the data
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(logger=logger, max_epochs=2, log_every_n_steps=1)
    trainer.fit(model, datamodule=image_datamodule(root))

    assert model.head.num_classes == 3
    assert model.hparams.class_names == ["cat", "dog", "eel"]
    assert model.class_names == ["cat", "dog", "eel"]
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["strategy"] == "full"
    assert hparams["num_classes"] == 3
    assert hparams["class_names"] == ["cat", "dog", "eel"]

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss_step",
        "train/loss_epoch",
        "train/acc",
        "val/acc",
        "val/f1_macro",
        "val/loss",
        "train/lr/head",
        "train/lr/backbone.0",
        "train/lr/backbone.1",
        "train/trainable/backbone_groups",
        "train/trainable/fraction",
        "hp_metric",
    ):
        assert tag in scalars, f"{tag} not logged; have {sorted(scalars)}"
    assert not any(t.endswith("no_decay") for t in scalars)
    assert "val/confusion_matrix" in events.Tags()["images"]
    assert len(events.Images("val/confusion_matrix")) == 2  # one per validation epoch
    assert [e.value for e in events.Scalars("train/lr/head")] == pytest.approx([0.01] * 4)
    assert [e.value for e in events.Scalars("train/lr/backbone.0")] == pytest.approx([0.005] * 4)
    assert len(events.Scalars("val/acc")) == 2
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("val/acc"))


def test_num_classes_disagreeing_with_the_datamodule_fails_at_setup(make_image_folder) -> None:
    root = make_image_folder(per_class=3, size=28)
    model = FineTuneModule("builtin:lenet", num_classes=5)
    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    with pytest.raises(ValueError, match=r"num_classes=5 .* 3 classes") as err:
        make_trainer(callbacks=[Count()]).fit(model, datamodule=image_datamodule(root))
    assert "['a', 'b', 'c']" in str(err.value)
    assert steps == []


def test_num_classes_unknown_without_a_datamodule_is_a_clear_error() -> None:
    model = FineTuneModule("builtin:lenet")
    with pytest.raises(ValueError, match="num_classes is unknown: pass num_classes"):
        make_trainer().fit(model, loader(samples(4)))


def test_explicit_class_names_are_not_replaced_by_the_datamodule(make_image_folder) -> None:
    root = make_image_folder(per_class=3, size=28)
    model = FineTuneModule("builtin:lenet", num_classes=3, class_names=["x", "y", "z"])
    make_trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=image_datamodule(root))
    assert model.class_names == ["x", "y", "z"]


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def unfrozen_checkpoint(tmp_path: Path) -> tuple[Path, FineTuneModule]:
    """A freeze_unfreeze run saved after its unfreeze epoch."""
    model = FineTuneModule(
        "builtin:lenet", num_classes=3, class_names=["x", "y", "z"], strategy="freeze_unfreeze", lr=0.05
    )
    trainer = make_trainer(max_epochs=2, limit_train_batches=1)
    trainer.fit(model, loader(samples(8)))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_checkpoint_records_module_backbone_and_trainable_state(unfrozen_checkpoint) -> None:
    path, model = unfrozen_checkpoint
    checkpoint = torch.load(path, weights_only=True)  # plain data: loadable without unpickling code
    meta = checkpoint["tlmodules"]
    assert meta["module"] == "FineTuneModule"
    assert meta["backbone"]["spec"] == "builtin:lenet"
    assert meta["num_classes"] == 3
    assert meta["class_names"] == ["x", "y", "z"]
    assert meta["trainable_epoch"] == 1
    assert meta["trainable_top_groups"] == 2

    loaded = FineTuneModule.load_from_checkpoint(path)
    assert loaded.class_names == ["x", "y", "z"]
    assert loaded.head.num_classes == 3
    assert all(p.requires_grad for p in loaded.backbone.parameters())  # unfrozen state re-applied
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.stack([s["inputs"] for s in samples(4)])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x))


def test_loading_into_a_different_num_classes_names_both(unfrozen_checkpoint) -> None:
    path, _ = unfrozen_checkpoint
    with pytest.raises(ValueError, match=r"checkpoint's head has 3 classes but this model has 5"):
        FineTuneModule.load_from_checkpoint(path, num_classes=5)
    other = FineTuneModule("builtin:lenet", num_classes=5, strategy="freeze_unfreeze")
    with pytest.raises(ValueError, match=r"3 classes but this model has 5.*backbone='ckpt:<path>'"):
        make_trainer(max_epochs=3).fit(other, loader(samples(8)), ckpt_path=path)


def test_checkpoint_of_another_module_type_is_refused(unfrozen_checkpoint, tmp_path: Path) -> None:
    path, _ = unfrozen_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["tlmodules"]["module"] = "DANNModule"
    dann = tmp_path / "dann.ckpt"
    torch.save(checkpoint, dann)
    with pytest.raises(ValueError, match="written by DANNModule, not FineTuneModule"):
        FineTuneModule.load_from_checkpoint(dann)

    del checkpoint["tlmodules"]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(ValueError, match="not written by tlmodules"):
        FineTuneModule.load_from_checkpoint(foreign)


# ---------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------
def test_predict_returns_probabilities_and_sample_indices() -> None:
    model = FineTuneModule("builtin:lenet", num_classes=3)
    data = samples(10)
    for item in data:
        del item["labels"]
    trainer = make_trainer()
    for _ in range(2):  # a second predict run numbers its samples from 0 again
        batches = trainer.predict(model, loader(data, batch_size=4))
        assert [len(b["index"]) for b in batches] == [4, 4, 2]
        index = torch.cat([b["index"] for b in batches])
        assert index.tolist() == list(range(10))  # the short last batch is numbered 8, 9
        probs = torch.cat([b["probs"] for b in batches])
        assert probs.shape == (10, 3) and probs.dtype == torch.float32
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([s["inputs"] for s in data]))
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_predict_with_a_prediction_only_datamodule(make_image_folder) -> None:
    """A datamodule with only predict_dir knows no label set (num_classes 0): that is no disagreement."""
    root = make_image_folder(per_class=3, size=28)
    datamodule = ImageFolderDataModule(predict_dir=str(root), backbone="builtin:lenet", batch_size=4, num_workers=0)
    assert datamodule.num_classes == 0
    model = FineTuneModule("builtin:lenet", num_classes=3, class_names=["x", "y", "z"])
    batches = make_trainer().predict(model, datamodule=datamodule)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(9))
    torch.testing.assert_close(torch.cat([b["probs"] for b in batches]).sum(-1), torch.ones(9))
    assert model.class_names == ["x", "y", "z"]
    unnamed = FineTuneModule("builtin:lenet", num_classes=3)
    make_trainer().predict(unnamed, datamodule=datamodule)
    assert unnamed.hparams.class_names is None and unnamed.class_names == ["0", "1", "2"]


def test_predict_keeps_the_batch_index_and_accepts_tuples() -> None:
    model = FineTuneModule("builtin:lenet", num_classes=3)
    trainer = make_trainer()
    batches = trainer.predict(model, loader(samples(6, index=True), batch_size=4))
    assert torch.cat([b["index"] for b in batches]).tolist() == [100 + i for i in range(6)]
    tensors = torch.stack([s["inputs"] for s in samples(5)])
    batches = trainer.predict(model, DataLoader(torch.utils.data.TensorDataset(tensors), batch_size=2))
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.cat([b["probs"] for b in batches]).sum(-1), torch.ones(5))


def test_a_label_outside_the_heads_classes_is_named_before_the_first_update() -> None:
    """A plain loader (no datamodule to check labels at setup) with label 5 for a 3-class head: a clear error
    naming the label and the fix in the first step, and no weight changed (on a GPU cross-entropy would fail
    with a device-side assert)."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 8))
    backbone.num_features = 8
    model = FineTuneModule(backbone=backbone, num_classes=3, strategy="full")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"inputs": torch.randn(4, 4), "labels": torch.tensor([0, 1, 5, 2])}]
    with pytest.raises(ValueError, match=r"label 5 is outside the model's 3 classes \(0 … 2\); give num_classes"):
        make_trainer(max_steps=1).fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_step_values_are_logged_only_on_the_steps_the_logger_writes() -> None:
    """Learning rates (per-step values) go through ``self.log`` every ``log_every_n_steps`` steps only, with the
    rate of that step; the loss is logged every step (its epoch mean needs them all)."""
    model = FineTuneModule("builtin:lenet", num_classes=3, strategy="full", lr=0.1, lr_schedule="linear")
    seen: list[tuple[float | None, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rate = trainer.callback_metrics.get("train/lr/head")
            seen.append((None if rate is None else float(rate), float(trainer.callback_metrics["train/loss_step"])))

    make_trainer(max_steps=6, log_every_n_steps=3, callbacks=[Record()]).fit(model, loader(samples(24)))
    rates = [r for r, _ in seen]
    assert rates[:2] == [None, None] and rates[2] == rates[3] == rates[4] and rates[5] != rates[2]
    assert rates[5] == pytest.approx(0.1 * (1 - 5 / 6))  # the linear schedule's rate at step 5
    assert len({loss for _, loss in seen}) == 6  # the loss: every step
