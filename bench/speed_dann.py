"""``dann_step_ratio``: one DANNModule training step against one source-only step, same batch per domain.

Variants (each a fresh ``DANNModule`` under the Trainer, alternating over the rounds of ``bench/timing.py``):

- ``source_only``: the source batch alone through backbone and classifier (``adversarial=False``).
- ``two_batches``: source and target batches through the backbone together, no discriminator
  (``target_statistics=True``): the "two batches through the backbone" floor of the ratio.
- ``dann``: ``two_batches`` plus the domain discriminator behind the gradient reversal layer.
- ``dann_2x1024`` (digits only): ``dann`` with DANNModule's default discriminator (Transfer-Learning-Library's).
- ``dann_plain`` (digits only): the same DANN step written by hand in plain PyTorch on the same modules,
  optimizer and batches; ``dann / dann_plain`` is what the Lightning module adds over that loop.

``dann_step_ratio`` is the digits recipe of ``bench/dann_digits.py`` (LeNet, 256-wide bottleneck, 64 + 64
augmented 28×28 images, a discriminator of two hidden layers of 256). The 2 × 1024
discriminator of ``dann_2x1024`` (1.3 M parameters, five times the LeNet, bottleneck and classifier together)
costs a real share of the step beyond the two-batch floor there. ``dann_step_ratio_resnet`` is the same
comparison with a ResNet-18 backbone on 64×64 images (32 + 32 per step, random data) and the 2 × 1024
discriminator, where the backbone dominates as it does in practice.

    python bench/speed.py --figures dann_step_ratio dann_step_ratio_resnet --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

from bench.timing import QUIET_TRAINER, StepTimes, alternate, median_ms, ratio_summary, timed_loop
from tlmodules import DANNModule
from tlmodules.schedules import dann_lambda

VARIANTS: dict[str, dict[str, Any]] = {
    "source_only": {"adversarial": False, "target_statistics": False},
    "two_batches": {"adversarial": False, "target_statistics": True},
    "dann": {"adversarial": True, "method": "dann"},
}
GOAL = 2.2
DIGITS_ROUNDS = 15


def trainer_round(make_model: Callable[[dict], DANNModule], data: Callable[[], Any], arguments: dict, steps: tuple):
    """One round of a variant under the Trainer: its median step in ms."""

    def run() -> float:
        warmup, timed = steps
        pl.seed_everything(0)
        timer = StepTimes(warmup)
        trainer = pl.Trainer(max_steps=warmup + timed, accelerator="cpu", devices=1, callbacks=[timer], **QUIET_TRAINER)
        trainer.fit(make_model(arguments), data())
        return median_ms(timer.times)

    return run


def plain_dann_round(
    make_model: Callable[[dict], DANNModule], arguments: dict, batches: Callable[[], Any], steps: tuple
):
    """One round of the DANN step written by hand: the module's own layers and loss terms, its optimizer and
    schedule (``configure_optimizers``), the same batches, no Trainer."""

    def run() -> float:
        warmup, timed = steps
        pl.seed_everything(0)
        model = make_model(arguments)
        model.train()
        configured = model.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        total = warmup + timed
        done = 0

        def step(batch: dict) -> None:
            nonlocal done
            source, target, labels = batch
            feats = model.features(torch.cat([source, target]))
            feats_s, feats_t = feats[: len(source)], feats[len(source) :]
            logits_s = model.head(feats_s)
            coefficient = dann_lambda(done / total, model.hparams.lambda_max, model.hparams.gamma)
            domain_loss, _ = model.alignment(feats_s, feats_t, coefficient)
            loss = F.cross_entropy(logits_s, labels) + domain_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1

        return median_ms(timed_loop(batches(), step, warmup, timed))

    return run


def summarise(rounds: dict[str, list[float]], setting: dict[str, Any]) -> dict[str, Any]:
    main = ratio_summary(rounds, "dann", "source_only")
    details: dict[str, Any] = {
        **setting,
        "rounds_ms": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()},
        "dann_vs_source_only": main,
        "two_batches_vs_source_only": ratio_summary(rounds, "two_batches", "source_only"),
        "dann_vs_two_batches": ratio_summary(rounds, "dann", "two_batches"),
    }
    if "dann_2x1024" in rounds:
        details["dann_2x1024_vs_source_only"] = ratio_summary(rounds, "dann_2x1024", "source_only")
    if "dann_plain" in rounds:
        details["dann_vs_plain_pytorch"] = ratio_summary(rounds, "dann", "dann_plain")
        details["plain_dann_vs_source_only"] = ratio_summary(rounds, "dann_plain", "source_only")
    return {"value": main["ratio"], "goal": f"<= {GOAL}", "met": main["ratio"] <= GOAL, "details": details}


def dann_step_ratio(args: argparse.Namespace) -> dict[str, Any]:
    from bench.dann_digits import DIGITS, RECIPE, Domains, method_arguments
    from datamodules import RandomAffineBatch

    steps = (1, 2) if args.quick else (10, 40)
    # at least 15 rounds: a step is ~40 ms and single rounds on the 2-core build machine scatter by ±20 %
    repeats = 1 if args.quick else max(args.repeats, DIGITS_ROUNDS)
    domains = Domains(DIGITS)
    recipe = {k: v for k, v in RECIPE.items() if k != "augment"}
    augment = RandomAffineBatch(**RECIPE["augment"])

    def make_model(arguments: dict) -> DANNModule:
        return DANNModule(backbone="builtin:lenet", num_classes=10, projection_samples=0, **recipe, **arguments)

    def data() -> Any:
        return domains.pair("usps2mnist", "dann", 64, augment)

    def plain_batches() -> Any:
        module = data()
        module.setup("fit")
        for batch, _, _ in module.train_dataloader():
            yield augment(batch["source"]["inputs"]), augment(batch["target"]["inputs"]), batch["source"]["labels"]

    arguments_of = {**VARIANTS, "dann": method_arguments("dann"), "dann_2x1024": VARIANTS["dann"]}
    variants = {name: trainer_round(make_model, data, arguments, steps) for name, arguments in arguments_of.items()}
    variants["dann_plain"] = plain_dann_round(make_model, arguments_of["dann"], plain_batches, steps)
    rounds = alternate(variants, repeats)
    setting = {"backbone": "builtin:lenet", "images": "28x28 digits, augmented", "batch_per_domain": 64,
               "warmup": steps[0], "steps": steps[1], "rounds": repeats}  # fmt: skip
    return {"figure": "dann_step_ratio", **summarise(rounds, setting)}


def dann_step_ratio_resnet(args: argparse.Namespace) -> dict[str, Any]:
    steps = (1, 2) if args.quick else (3, 12)
    repeats = 1 if args.quick else args.repeats
    batch, size = (4, 32) if args.quick else (32, 64)
    generator = torch.Generator().manual_seed(0)
    images = {side: torch.rand(batch * 8, 3, size, size, generator=generator) for side in ("source", "target")}
    labels = torch.randint(0, 10, (batch * 8,), generator=generator)

    def data() -> CombinedLoader:
        loaders = {
            side: DataLoader(TensorDataset(images[side], labels), batch_size=batch, shuffle=True, collate_fn=as_dicts)
            for side in ("source", "target")
        }
        return CombinedLoader(loaders, "max_size_cycle")

    def make_model(arguments: dict) -> DANNModule:
        return DANNModule(backbone="torchvision:resnet18", weights="none", num_classes=10, projection_samples=0,
                          bottleneck=256, **arguments)  # fmt: skip

    variants = {name: trainer_round(make_model, data, arguments, steps) for name, arguments in VARIANTS.items()}
    rounds = alternate(variants, repeats)
    setting = {"backbone": "torchvision:resnet18 (random init)", "images": f"{size}x{size} random",
               "batch_per_domain": batch, "warmup": steps[0], "steps": steps[1], "rounds": repeats}  # fmt: skip
    return {"figure": "dann_step_ratio_resnet", **summarise(rounds, setting)}


def as_dicts(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"inputs": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}
