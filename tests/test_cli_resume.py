"""A CLI run resumed from a mid-epoch checkpoint ends bit for bit where the uninterrupted run ends.

Each recipe runs twice through ``train.py``, each run a process of its own (the ``train_py`` fixture). Run A trains
uninterrupted and an extra ``ModelCheckpoint`` (``every_n_train_steps``) writes a mid-epoch checkpoint and one at
the last step; run B resumes A's mid-epoch checkpoint with ``--ckpt_path`` and the same ``max_steps`` (the learning-
rate schedules read ``trainer.estimated_stepping_batches``). Both runs validate between the mid-epoch checkpoint and
the end; A also ran the sanity check and the validations before the checkpoint, which B never runs. Every tensor of
the final weights and of the optimizer state must be equal.

* quickstart (DANN on the embedded digits pair): LeNet's dropout, ``RandomAffineBatch`` on both sides,
  shuffled source and target loaders; 10 steps an epoch, checkpoint after step 12, end after step 24.
* MiniLM fine-tuning on the UCI Yelp sentences: BERT dropout and length-grouped batches, epochs cut to 5
  steps (``limit_train_batches``), checkpoint after step 4, validation after step 5, end after step 8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, SHARED_DATA, TrainPy

pytestmark = pytest.mark.slow

YELP = SHARED_DATA / "text" / "uci_sentences" / "yelp_labelled.txt"


def train(train_py: TrainPy, folder: Path, args: list[str], every_n_steps: int, ckpt: Path | None = None) -> Path:
    """``train.py fit`` in ``folder`` with a checkpoint every ``every_n_steps`` steps; returns those checkpoints'
    folder."""
    folder.mkdir(parents=True)
    steps = folder / "steps"
    extra = folder / "step_checkpoints.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {steps}\n        every_n_train_steps: {every_n_steps}\n        save_top_k: -1\n"
        '        filename: "{step}"\n'
    )
    command = ["fit", *args, "--config", str(extra)]
    command += ["--trainer.logger.init_args.save_dir", str(folder / "runs"), "--trainer.enable_progress_bar", "false"]
    if ckpt is not None:
        command += ["--ckpt_path", str(ckpt)]
    result = train_py(command, cwd=folder, timeout=300)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return steps


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_equal_tree(a: Any, b: Any, where: str) -> None:
    """Equal nested dicts / lists of tensors and plain values (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_equal_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def resume_matches(train_py: TrainPy, tmp_path: Path, args: list[str], mid: int, end: int) -> dict[str, Any]:
    """Run A (checkpoints every ``mid`` steps up to ``end``), run B from A's step-``mid`` checkpoint; compare."""
    steps_a = train(train_py, tmp_path / "a", args, every_n_steps=mid)
    checkpoint = steps_a / f"step={mid}.ckpt"
    steps_b = train(train_py, tmp_path / "b", args, every_n_steps=mid, ckpt=checkpoint)
    final_a, final_b = load(steps_a / f"step={end}.ckpt"), load(steps_b / f"step={end}.ckpt")
    assert final_a["global_step"] == final_b["global_step"] == end
    assert_equal_tree(final_a["state_dict"], final_b["state_dict"], "state_dict")
    assert_equal_tree(final_a["optimizer_states"], final_b["optimizer_states"], "optimizer_states")
    assert_equal_tree(final_a["lr_schedulers"], final_b["lr_schedulers"], "lr_schedulers")
    return load(checkpoint)


def test_quickstart_with_augmentation_resumes_bit_for_bit(tmp_path: Path, train_py: TrainPy) -> None:
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    args += ["--trainer.max_steps", "24", "--trainer.check_val_every_n_epoch", "1"]
    mid = resume_matches(train_py, tmp_path, args, mid=12, end=24)
    # the checkpoint was written mid-epoch (10 steps an epoch), with both loaders' positions and both sides'
    # augmentation generator (one RandomAffineBatch shared by the two sides)
    assert mid["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "cycle": 0, "consumed": 2}] * 2
    sides = mid["DigitsDomainDataModule"]
    assert sides["source"]["batch_augment"][0]["generator"].equal(sides["target"]["batch_augment"][0]["generator"])
    assert len(mid["callbacks"]["TrainingRandomState"]["processes"]) == 1


def test_minilm_text_recipe_resumes_bit_for_bit(tmp_path: Path, train_py: TrainPy) -> None:
    if not YELP.is_file():
        pytest.skip(f"needs {YELP}")
    args = ["--config", str(ROOT / "configs" / "minilm_finetune.yaml"), "--data.init_args.train_file", str(YELP)]
    args += ["--data.init_args.batch_size", "8", "--data.init_args.max_length", "32", "--trainer.max_steps", "8"]
    args += ["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2"]
    args += ["--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]  # 270 MB each: only the step ones
    mid = resume_matches(train_py, tmp_path, args, mid=4, end=8)
    assert mid["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "cycle": 0, "consumed": 4}]
