"""Unfreezing under DDP: late-unfrozen parameters are averaged across processes, and resume works.

``strategy="ddp"`` starts the second process by re-running ``sys.argv``, so the two-process run
lives in ``tests/scripts/ddp_finetune.py`` and each test runs it in a subprocess (CPU, gloo).
The script trains ``freeze_unfreeze`` (backbone frozen in epoch 0, unfrozen from epoch 1) for 3
epochs of 4 steps and every rank saves what it ended with.

Feature probing under DDP: ``tests/scripts/ddp_probe.py`` fits a linear-head probe and a
logistic-regression probe on two processes; each rank extracts only its own shard, once, and then
holds every feature: during the first epoch, or (data with lengths) in a length-ordered extraction pass
before training.

Validation under DDP: every script validates on an odd number of samples, which the datamodules shard
without Lightning's padded repeat (``datamodules.samplers.evaluation_sampler``), and the tests compare the
synchronised metrics with the final model's scores over the whole validation set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from datamodules.samplers import ClassGroupedSampler

SCRIPT = Path(__file__).parent / "scripts" / "ddp_finetune.py"
NUM_SAMPLES = 64  # as in the script
NUM_CLASSES = 3  # tests/scripts/pattern_data.py
PATTERN_SEED = 1234  # the script's PatternDataModule seed, which seeds its training sampler
NUM_VAL = 13
STEPS_PER_EPOCH = NUM_SAMPLES // 2 // 8  # two ranks, batches of 8
BACKBONE_PARAMS = 10  # SmallBackbone: 3 Linear (weight, bias) + 2 BatchNorm (weight, bias)

pytestmark = pytest.mark.slow


def run_ddp(out: Path, *flags: str, script: Path = SCRIPT) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a two-process DDP script (tests/scripts/) and load what each rank saved."""
    env = {k: v for k, v in os.environ.items() if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"}}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(script), str(out), *flags],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"DDP run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    if "rank" in ranks[0]:  # scripts that save one record per rank (the probe script nests them per run)
        assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
        assert ranks[0]["pid"] != ranks[1]["pid"], "both results came from one process"
    return ranks[0], ranks[1]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and keys == [k for k in b if k.startswith(prefix)]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


@pytest.fixture(scope="module")
def synced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The run with LateParameterSync; it also writes a checkpoint after step 8 (end of epoch 1)."""
    out = tmp_path_factory.mktemp("ddp") / "synced"
    return (out, *run_ddp(out, "--save-at-step", str(2 * STEPS_PER_EPOCH)))


def test_unfrozen_backbone_stays_identical_across_ranks(synced_run) -> None:
    _, r0, r1 = synced_run

    # the ranks trained on disjoint halves of the data that together cover it, in every epoch
    assert sorted(r0["seen"]) == sorted(r1["seen"]) == [0, 1, 2]
    for epoch in range(3):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == NUM_SAMPLES // 2
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(NUM_SAMPLES))

    # every backbone parameter was frozen when DDP wrapped the model, and was synced by hand
    # at every step after the unfreeze (and at none before)
    backbone = [n for n in r0["initial"] if n.startswith("backbone.")]
    assert len(backbone) == BACKBONE_PARAMS
    assert r0["outside"] == r1["outside"] == backbone
    assert r0["synced"] == [(e, 0 if e == 0 else BACKBONE_PARAMS) for e in range(3) for _ in range(STEPS_PER_EPOCH)]

    # the backbone trained after the unfreeze ...
    assert max_diff(r0["initial"], r1["initial"]) == 0.0
    moved = max_diff(r0["final"], r0["initial"], "backbone.")
    assert moved > 1e-2, f"backbone barely moved ({moved})"
    # ... and every parameter is bit-identical on both ranks
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"


def assert_whole_split_validated_once(validated: tuple[list[int], list[int]], size: int, offset: int = 1000) -> None:
    """The two ranks' validation indices are disjoint and together the whole split, each sample once."""
    a, b = validated
    assert len(a) == len(set(a)) and len(b) == len(set(b)), "a rank validated a sample twice (padding)"
    assert not set(a) & set(b), "both ranks validated the same sample"
    assert sorted(a + b) == list(range(offset, offset + size))


def test_finetune_validation_metrics_are_those_of_the_whole_validation_set(synced_run) -> None:
    """13 validation samples on 2 ranks (7 + 6, no padded repeat); the logged loss and accuracy, synchronised,
    equal the final model's over the whole set: a mean of the two ranks' means would give another loss."""
    _, r0, r1 = synced_run
    for epoch in range(3):
        assert_whole_split_validated_once((r0["validated"][epoch], r1["validated"][epoch]), NUM_VAL)
    for key in ("val/acc", "val/loss", "val/f1_macro", "hp_metric"):
        assert r0["metrics"][key] == r1["metrics"][key], key
    assert r0["metrics"]["val/acc"] == pytest.approx(r0["whole_val"]["acc"], abs=1e-6)
    assert r0["metrics"]["val/loss"] == pytest.approx(r0["whole_val"]["loss"], rel=1e-5)
    assert 0.4 < r0["whole_val"]["acc"] < 1.0  # neither chance nor perfect: the comparison can fail


def test_length_grouped_batches_shard_the_training_data_under_ddp(tmp_path: Path) -> None:
    """Lightning keeps the datamodule's LengthGroupedSampler (no DistributedSampler on top): each epoch the
    two ranks train on disjoint halves that cover the data, in batches of alike lengths, reshuffled."""
    r0, r1 = run_ddp(tmp_path / "grouped", "--group-by-length")
    lengths = r0["lengths"]
    assert r0["train_sampler"] == r1["train_sampler"] == "LengthGroupedSampler"
    for epoch in range(3):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == NUM_SAMPLES // 2 and not set(a) & set(b)
        assert sorted(a + b) == list(range(NUM_SAMPLES))
        for order in (a, b):  # each batch of 8 spans a narrow band of the lengths 1..61
            spans = [max(lengths[i] for i in order[s : s + 8]) - min(lengths[i] for i in order[s : s + 8])
                     for s in range(0, len(order), 8)]  # fmt: skip
            assert max(spans) <= 20, spans
    assert r0["seen"][0] != r0["seen"][1], "the batches were not reshuffled between epochs"
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"


def test_without_late_sync_ranks_drift_apart(tmp_path: Path) -> None:
    """Control: with LateParameterSync disabled DDP does not average the unfrozen backbone."""
    r0, r1 = run_ddp(tmp_path / "control", "--no-late-sync")
    assert {n for _, n in r0["synced"]} == {0}
    moved = max_diff(r0["final"], r0["initial"], "backbone.")
    assert moved > 1e-2
    drift = max_diff(r0["final"], r1["final"], "backbone.")
    assert drift > 1e-3, f"ranks did not drift apart without the sync ({drift}): the test cannot fail"
    # the head was trainable when DDP wrapped the model, so the reducer averages it anyway
    assert max_diff(r0["final"], r1["final"], "head.") == 0.0


def test_resume_after_unfreeze_wraps_the_unfrozen_backbone(synced_run, tmp_path: Path) -> None:
    """Resuming from a checkpoint written after the unfreeze: the backbone is trainable before DDP
    wraps the model (so the reducer averages it), and the run ends where the uninterrupted one did."""
    out, full0, _ = synced_run
    ckpt = out / f"step{2 * STEPS_PER_EPOCH}.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["tlmodules"]["trainable_epoch"] == 1
    assert saved["tlmodules"]["trainable_top_groups"] == 3

    r0, r1 = run_ddp(tmp_path / "resumed", "--resume", str(ckpt))
    assert r0["outside"] == r1["outside"] == [], "unfrozen parameters were left outside DDP's reducer"
    assert {n for _, n in r0["synced"]} == {0}
    assert sorted(r0["seen"]) == [2]
    assert r0["seen"][2] == full0["seen"][2]
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"
    resumed_vs_full = max_diff(r0["final"], full0["final"])
    assert resumed_vs_full <= 1e-6, f"resumed run ends {resumed_vs_full} away from the uninterrupted one"


# -- feature probe: each rank extracts its own shard once, then every rank holds every feature ------
PROBE_SCRIPT = Path(__file__).parent / "scripts" / "ddp_probe.py"
PROBE_SAMPLES, PROBE_VAL, PROBE_BATCH = 64, 13, 8  # as in the script


def probe_length(position: int) -> int:
    return (7 * position) % 11  # as the script's LengthPatternDataModule


def test_feature_probe_extracts_each_shard_once_and_shares_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    r0, r1 = run_ddp(out, script=PROBE_SCRIPT)
    assert r0["pid"] != r1["pid"] and [r0["linear"]["rank"], r1["linear"]["rank"]] == [0, 1]
    shard_batches = PROBE_SAMPLES // 2 // PROBE_BATCH

    for run, epochs in (("linear", 3), ("logistic_regression", 1), ("linear_length_ordered", 3)):
        a, b = r0[run], r1[run]
        assert a["world_size"] == 2
        for rank in (a, b):
            assert sorted(rank["seen"]) == list(range(epochs))
            # ... although the sampler gave it other samples in later epochs
            for epoch in range(1, epochs):
                assert set(rank["seen"][epoch]) != set(rank["seen"][0]), "the shards did not change: the test is moot"
            assert rank["train_cached"] == PROBE_SAMPLES  # every rank holds every training feature
            assert rank["train_cached_indices"] == list(range(PROBE_SAMPLES))
            assert rank["backbone_unchanged"], f"{run}: the frozen backbone's parameters or buffers changed"
        if run == "linear_length_ordered":
            # before training, each rank computed its share of each split, longest first; then the ranks
            # exchanged them, and no training or validation batch ran the backbone
            for split, first, count in (("train", 0, PROBE_SAMPLES), ("val", 1000, PROBE_VAL)):
                shares = [a["extracted"][split], b["extracted"][split]]
                assert not set(shares[0]) & set(shares[1]), f"both ranks extracted the same {split} samples"
                assert sorted(shares[0] + shares[1]) == list(range(first, first + count))
                for share in shares:
                    lengths = [probe_length(i - first) for i in share]
                    assert lengths == sorted(lengths, reverse=True), f"{split} not extracted in length order"
            assert [len(a["extracted"]["train"]), len(b["extracted"]["train"])] == [PROBE_SAMPLES // 2] * 2
            assert [len(a["extracted"]["val"]), len(b["extracted"]["val"])] == [PROBE_BATCH, PROBE_VAL - PROBE_BATCH]
            for rank in (a, b):
                assert rank["train_calls"] == rank["val_calls"] == 0 and rank["computed"] == {}
                assert rank["val_cached"] == PROBE_VAL
            # the same features and the same batches as the run that extracted during its first epoch
            for name in a["head"]:
                torch.testing.assert_close(a["head"][name], r0["linear"]["head"][name], atol=1e-5, rtol=0)
        else:
            for rank in (a, b):
                # the backbone ran on this rank's own shard of epoch 0, one call per batch, and never again
                assert rank["train_calls"] == shard_batches, f"{run}: {rank['train_calls']} backbone calls on training"
                assert sorted(rank["computed"]) == [0]
                assert sorted(rank["computed"][0]) == sorted(rank["seen"][0])
                assert rank["val_calls"] == 1  # 7 or 6 validation samples: one batch
                assert rank["extracted"] == {}
            assert not set(a["computed"][0]) & set(b["computed"][0]), "both ranks extracted the same samples"
            assert sorted(a["computed"][0] + b["computed"][0]) == list(range(PROBE_SAMPLES))
            # validation features stay per shard: 13 samples sharded 7 + 6 without a padded repeat
            assert sorted([a["val_cached"], b["val_cached"]]) == [PROBE_VAL // 2, PROBE_VAL - PROBE_VAL // 2]

        # the head is the same on both ranks, and it learned something
        assert a["head_initial"].keys() == a["head"].keys() == b["head"].keys()
        for name in a["head"]:
            assert torch.equal(a["head"][name], b["head"][name]), f"{run}: head {name} differs between ranks"
        assert max_diff(a["head"], a["head_initial"]) > 1e-2, f"{run}: the head did not move"
        # validation: the synchronised metrics are the whole set's (the estimator's loss is the cross-entropy
        # of its predicted probabilities)
        for key in ("val/acc", "val/loss", "hp_metric"):
            assert a["metrics"][key] == b["metrics"][key], f"{run}: {key}"
        assert a["metrics"]["val/acc"] == pytest.approx(a["whole_val"]["acc"], abs=1e-6)
        assert a["metrics"]["val/loss"] == pytest.approx(a["whole_val"]["loss"], rel=1e-5)
        assert 0.5 < a["whole_val"]["acc"] < 1.0  # three classes: chance is 1/3

    # the estimator was fitted once per rank, each time on all 64 training samples (every rank's shard)
    assert r0["linear"]["estimator_fits"] == []
    assert r0["logistic_regression"]["estimator_fits"] == r1["logistic_regression"]["estimator_fits"] == [64]


# -- DANN: DomainAdaptationDataModule shards both domains, and the ranks stay in step ------------
DOMAIN_SCRIPT = Path(__file__).parent / "scripts" / "ddp_domain.py"
SOURCE_TRAIN, TARGET_TRAIN, DOMAIN_VAL, DOMAIN_BATCH = 48, 32, 15, 8  # as in the script


def test_domain_adaptation_shards_source_and_target_and_keeps_ranks_identical(tmp_path: Path) -> None:
    out = tmp_path / "domain"
    r0, r1 = run_ddp(out, script=DOMAIN_SCRIPT)
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["world_size"] == 2 and r0["pid"] != r1["pid"]

    steps = SOURCE_TRAIN // 2 // DOMAIN_BATCH  # the longer (source) side's batches per rank
    for rank in (r0, r1):
        assert rank["global_step"] == steps
        assert rank["target_batches"] == [DOMAIN_BATCH] * steps
        # one pass over this rank's source shard, without repeats
        assert len(rank["source"]) == len(set(rank["source"])) == SOURCE_TRAIN // 2
        # the target shard (2 batches) is used whole, then cycled from its start
        shard = TARGET_TRAIN // 2
        assert len(set(rank["target"][:shard])) == shard
        assert set(rank["target"][shard:]) <= set(rank["target"][:shard])
        assert rank["val_domains"] == ["source", "target"]
    for loader in (0, 1):  # source, target: 15 validation samples each, 8 + 7, none repeated
        assert_whole_split_validated_once((r0["validated"][loader], r1["validated"][loader]), DOMAIN_VAL)
    # disjoint shards that together cover each side
    assert not set(r0["source"]) & set(r1["source"])
    assert sorted(r0["source"] + r1["source"]) == list(range(SOURCE_TRAIN))
    assert not set(r0["target"]) & set(r1["target"])
    assert set(r0["target"]) | set(r1["target"]) == set(range(TARGET_TRAIN))

    # the model (discriminator included) moved, and identically on both ranks
    assert any(n.startswith("alignment.discriminator.") for n in r0["final"])
    assert max_diff(r0["final"], r0["initial"], "alignment.discriminator.") > 1e-4
    assert max_diff(r0["final"], r0["initial"], "backbone.") > 1e-4
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"
    # validation metrics are synchronised: the same on both ranks, and over each domain's whole validation set
    for key in ("val/source/acc", "val/target/acc", "val/target/im_score", "val/target/snd", "hp_metric"):
        assert r0["metrics"][key] == r1["metrics"][key], key
    for domain in ("source", "target"):
        assert r0["metrics"][f"val/{domain}/acc"] == pytest.approx(r0["full_val_acc"][domain])


def test_target_batchnorm_statistics_are_averaged_over_both_ranks_shards(tmp_path: Path) -> None:
    """AdaBN's pass under DDP: each rank reads its own shard of the target training split, and the ranks' estimates
    are averaged, so both hold the same target statistics, whose mean is that of every target batch of both
    shards (equal-sized batches: the mean of the batch means is the mean over all of them)."""
    r0, r1 = run_ddp(tmp_path / "adabn", "--target-batchnorm", script=DOMAIN_SCRIPT)
    torch.testing.assert_close(r0["target_mean"], r1["target_mean"])
    torch.testing.assert_close(r0["target_var"], r1["target_var"])
    weights = r0["first_layer"]
    batches = [x @ weights["weight"].T + weights["bias"] for x in (*r0["target_shard"], *r1["target_shard"])]
    assert len(batches) == TARGET_TRAIN // DOMAIN_BATCH and all(len(b) == DOMAIN_BATCH for b in batches)
    torch.testing.assert_close(r0["target_mean"], torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(r0["target_var"], torch.stack([b.var(0) for b in batches]).mean(0))
    assert not torch.allclose(r0["target_mean"], r0["shared_mean"], atol=1e-2)  # the target is shifted


# -- MultiTaskModule: one rank never sees one task's labels; DDP still keeps the ranks identical --------
MULTITASK_SCRIPT = Path(__file__).parent / "scripts" / "ddp_multitask.py"


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa"])
def test_multitask_ranks_stay_identical_with_partial_labels(tmp_path: Path, weighting: str) -> None:
    r0, r1 = run_ddp(tmp_path / "multitask", weighting, script=MULTITASK_SCRIPT)
    # in-order sampler: rank 0 the even samples (all labelled), rank 1 the odd ones (no "kind" labels)
    assert sorted(set(r0["indices"])) == list(range(0, 64, 2))
    assert sorted(set(r1["indices"])) == list(range(1, 64, 2))
    # trunk, heads and the weighting's state moved, identically on both ranks
    assert max_diff(r0["final"], r0["initial"], "heads.kind.") > 1e-4
    assert max_diff(r0["final"], r0["initial"], "backbone.") > 1e-4
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"
    assert r0["weights"] == r1["weights"]
    if weighting == "uncertainty":
        assert max_diff(r0["final"], r0["initial"], "weighting.log_vars") > 1e-4
    else:  # two epochs: DWA has seen both epochs' means (summed over ranks) and left uniform weights
        assert int(r0["final"]["weighting.num_epochs"]) == 2
        assert len(set(r0["weights"].values())) == 2
    # validation metrics are synchronised over the whole validation set
    for key, value in r0["full_val"].items():
        assert r0["metrics"][key] == r1["metrics"][key] == pytest.approx(value, abs=1e-5), key
    # a mid-epoch checkpoint (step 2: two batches of 8 per rank) holds both ranks' running loss sums:
    # 16 "kind" labels (rank 0's; rank 1 has none) and 32 "size" labels
    mid = torch.load(tmp_path / "multitask" / "ckpt" / "epoch=0-step=2.ckpt", map_location="cpu", weights_only=True)
    sums = mid["epoch_mean_sums"]
    assert [float(sums[f"train/{task}/loss_epoch"][1]) for task in ("kind", "size")] == [16.0, 32.0]


def test_train_py_under_torchrun_ends_with_the_same_weights_on_both_ranks(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 train.py fit`` on the quickstart recipe (4 DANN steps, CPU, gloo)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "scripts"), str(root)]))
    weights = tmp_path / "weights"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(root / "train.py"), "fit", "--config", str(root / "configs" / "quickstart.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--trainer.callbacks+=rank_weights.SaveRankWeights", "--trainer.callbacks.folder", str(weights),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [torch.load(weights / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"] and all(r["global_step"] == 4 for r in ranks)
    assert max_diff(ranks[0]["state"], ranks[1]["state"]) == 0.0  # DDP kept the replicas identical
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert max_diff({k: saved[k] for k in ranks[0]["state"]}, ranks[0]["state"]) == 0.0  # the checkpoint holds them


def test_contrastive_strategy_shards_batches_and_fits_the_head_on_every_rank_s_samples(tmp_path: Path) -> None:
    """``strategy="contrastive"`` on two processes, with class-grouped batches: each rank's contrastive loss reads
    its own half of every epoch (so a pair is seen once) in batches where (nearly) every sample has a same-class
    partner, the backbone stays identical across ranks, and the head, fitted from both ranks' shards, equals a
    logistic regression fitted in one process on all 64 training samples."""
    r0, r1 = run_ddp(tmp_path / "contrastive", "--contrastive", "--group-by-class")
    assert r0["train_sampler"] == r1["train_sampler"] == "ClassGroupedSampler"  # Lightning kept it
    labels, alone = r0["train_labels"], 0
    for epoch in range(3):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(NUM_SAMPLES))
        for rank, shard in enumerate((a, b)):  # each rank read its share of the class-grouped pass
            sampler = ClassGroupedSampler(labels, 8, num_replicas=2, rank=rank, seed=PATTERN_SEED)
            sampler.set_epoch(epoch)
            assert shard == list(sampler)
            for start in range(0, len(shard), 8):
                counts = Counter(labels[i] for i in shard[start : start + 8])
                alone += sum(1 for c in counts.values() if c == 1)
    # only a class's odd run of three, cut by a batch's edge, can leave a sample alone; random batches of 8 from
    # 3 classes of about 21 leave C(42, 7) / C(63, 7) = 5 % alone: about 9 of the 3 epochs' 192 samples
    assert alone <= NUM_CLASSES, f"{alone} samples without a same-class partner in their batch"
    assert r0["head_fit_samples"] == r1["head_fit_samples"] == NUM_SAMPLES
    assert r0["head_fitted_step"] == r0["global_step"] == 3 * STEPS_PER_EPOCH
    # the gap a contrastive_stop_gap reads is averaged over both ranks' batches: every rank sees one value
    assert r0["metrics"]["train/contrastive_gap"] == r1["metrics"]["train/contrastive_gap"] > 0
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"
    # the head was fitted on features of one network: rank 0's BatchNorm statistics went to rank 1 first
    for name in r0["buffers"]:
        assert torch.equal(r0["buffers"][name], r1["buffers"][name]), f"{name} differs between ranks"
    moved = [n for n in r0["final"] if n.startswith("backbone") and not torch.equal(r0["final"][n], r0["initial"][n])]
    assert len(moved) == BACKBONE_PARAMS, "the contrastive loss did not train every backbone parameter"
    for key in ("weight", "bias"):
        assert torch.allclose(r0["final"][f"head.net.2.{key}"], r0["reference_head"][key], atol=1e-4)


# -- MultiTaskModule with per-pixel tasks: sharded frames, metrics of the whole validation set ------------------
SEGMENTATION_SCRIPT = Path(__file__).parent / "scripts" / "ddp_segmentation.py"


def test_dense_multitask_metrics_under_ddp_equal_one_process_on_the_same_frames(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from test_multitask_dense import write_split

    from tlmodules import MultiTaskModule

    write_split(tmp_path / "scenes" / "train", 8, seed=0)
    write_split(tmp_path / "scenes" / "val", 5, seed=100)  # odd: one rank validates 3 frames, the other 2
    r0, r1 = run_ddp(tmp_path / "dense", str(tmp_path / "scenes"), script=SEGMENTATION_SCRIPT)
    assert r0["steps"] == r1["steps"] == 2  # 8 frames, 2 ranks, batches of 2
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs between ranks"
    sys.path.insert(0, str(SEGMENTATION_SCRIPT.parent))
    from ddp_segmentation import TASKS, data

    datamodule = data(tmp_path / "scenes")
    model = MultiTaskModule(
        backbone="torchvision:resnet18", weights="none", tasks=datamodule.tasks, decoder_channels=16,
        weighting="uncertainty",
    )  # fmt: skip
    model.load_state_dict(r0["final"])
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    full = single.validate(model, datamodule=datamodule, verbose=False)[0]
    keys = {"val/scene/miou", "val/scene/pixel_acc", "val/drivable/iou", "val/objects/acc", "val/road_share/r2"}
    assert keys <= set(r0["metrics"]) and len(TASKS) == 4
    for key in sorted(k for k in full if k.startswith("val/")):
        assert r0["metrics"][key] == r1["metrics"][key] == pytest.approx(full[key], abs=1e-5), key
