"""Bad command lines end as one ``error:`` line: ``python train.py`` run as a user runs it, in a process of its own.

Each case is one mistake a user makes (an unknown key, a wrong type, a malformed YAML file, a bad backbone spec or
value, missing or broken data, an unreadable checkpoint, an output path under a file). The checks: exit status 2,
stderr is a single line ``error: <message>`` that names the culprit (the key, the file, the value), no traceback
and none of jsonargparse's Union report or Namespace dump, and the output folder (an earlier run's checkpoints,
predictions, run summary) byte for byte as it was, with no run folder added. ``TLMODULES_DEBUG=1`` brings the
traceback back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TrainPy, make_trainer, sentence
from torch.utils.data import DataLoader, TensorDataset

from tlmodules import FineTuneModule

pytestmark = pytest.mark.slow

DIGITS = "configs/digits_finetune.yaml"  # FineTuneModule(builtin:lenet) + SklearnDigitsDataModule
MINILM = "configs/minilm_finetune.yaml"  # FineTuneModule(MiniLM) + TextClassificationDataModule (headerless TSV)
PROBE = "configs/minilm_probe.yaml"  # FeatureProbeModule + TextClassificationDataModule
FEW_SHOT = "configs/minilm_few_shot.yaml"  # FineTuneModule(strategy=contrastive, MiniLM) + TextClassificationDataModule
RESNET = "configs/resnet18_finetune.yaml"  # FineTuneModule(torchvision:resnet18) + ImageFolderDataModule
QUICKSTART = "configs/quickstart.yaml"  # DANNModule + DigitsDomainDataModule
FOLDERS = "configs/dann_folders.yaml"  # DANNModule + DomainAdaptationDataModule of two ImageFolderDataModules
TEXT_PAIR = "configs/dann_text.yaml"  # DANNModule(MiniLM) + DomainAdaptationDataModule of two text datamodules
ENERGY = "configs/energy_multitask.yaml"  # MultiTaskModule + MultiTaskDataModule
NER = "configs/ner_probe.yaml"  # FeatureProbeModule(level=token) + ConllDataModule
CAMVID = "configs/camvid_multitask.yaml"  # MultiTaskModule(torchvision:resnet18, dense tasks) + SegmentationDataModule

SENTINELS = {  # what the output folder holds before each command; it must be unchanged afterwards
    "checkpoints/last.ckpt": b"an earlier run's last checkpoint\n",
    "checkpoints/best-epoch03-acc0.9100.ckpt": b"an earlier run's best checkpoint\n",
    "predictions.csv": b"id,label,prob_a,prob_b\n1,a,0.9,0.1\n",
    "runs/earlier/version_0/summary.json": b'{"module": "FineTuneModule", "metrics": {"val/acc": 0.91}}\n',
    "blocker.txt": b"a file where a folder is expected\n",
}


@dataclass
class Env:
    """Where a case writes its bad input (``tmp``) and where every output of the command goes (``out``)."""

    tmp: Path
    out: Path

    def write(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def sentences(self, name: str = "train.tsv", n: int = 12, labels: tuple[str, str] = ("neg", "pos")) -> str:
        """A headerless ``sentence<TAB>label`` file, as the MiniLM recipes read."""
        import random

        rng = random.Random(0)
        return self.write(name, "".join(f"{sentence(i % 2, rng)}\t{labels[i % 2]}\n" for i in range(n)))

    def images(
        self, name: str, classes: tuple[str, ...] = ("a", "b"), per_class: int = 2, corrupt: bool = False
    ) -> str:
        """Class folders of small grey PNGs; ``corrupt`` adds ``broken.png``, which is not an image."""
        from PIL import Image

        for cls in classes:
            (self.tmp / name / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("L", (16, 16), 40 * i).save(self.tmp / name / cls / f"{i}.png")
        if corrupt:
            self.write(f"{name}/{classes[-1]}/broken.png", b"not a png at all")
        return str(self.tmp / name)

    def flat_folder(self) -> str:
        """Images without class folders."""
        self.write("flat/0.png", b"")
        return str(self.tmp / "flat")

    def scenes(self, name: str, frames: int = 3, without_mask: int | None = None) -> str:
        """``<name>/images/*.png`` and ``<name>/labels/*.png`` (class indices 0–10) of 24×32 frames; the frame
        ``without_mask`` has no mask."""
        from PIL import Image

        for folder in ("images", "labels"):
            (self.tmp / name / folder).mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            Image.new("RGB", (32, 24), (30 * i, 90, 160)).save(self.tmp / name / "images" / f"frame{i}.png")
            if i != without_mask:
                Image.new("L", (32, 24), i % 11).save(self.tmp / name / "labels" / f"frame{i}.png")
        return str(self.tmp / name)

    def checkpoint(self) -> str:
        """A real FineTuneModule checkpoint (LeNet, 10 classes), written by one training step."""
        path = self.tmp / "finetune.ckpt"
        if not path.exists():
            loader = DataLoader(TensorDataset(torch.randn(4, 3, 28, 28), torch.arange(4)), batch_size=4)
            trainer = make_trainer(max_steps=1, default_root_dir=self.tmp)
            trainer.fit(FineTuneModule(backbone="builtin:lenet", num_classes=10), loader)
            trainer.save_checkpoint(path)
        return str(path)

    def truncated_checkpoint(self) -> str:
        data = Path(self.checkpoint()).read_bytes()
        return self.write("cut.ckpt", data[: len(data) // 2])


@dataclass(frozen=True)
class Bad:
    """``python train.py <args(env)>`` must fail with one ``error:`` line matching ``culprit``."""

    args: Callable[[Env], list[str]]
    culprit: str


def fit(config: str, *extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["fit", "--config", config, *extra]


def fit_with(config: str, build: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    return lambda env: ["fit", "--config", config, *build(env)]


def text_file(content: str | bytes) -> Callable[[Env], list[str]]:
    return lambda env: ["--data.init_args.train_file", env.write("train.tsv", content)]


CASES = [
    # -- keys, types and YAML ---------------------------------------------------------------------------------
    pytest.param(
        Bad(fit(DIGITS, "--model.init_args.lrr", "0.1"), r"model\.init_args\.lrr: .*did you mean 'lr'"),
        id="unknown-model-key",
    ),
    pytest.param(
        Bad(fit(DIGITS, "--data.init_args.batchsize", "8"), r"data\.init_args\.batchsize: .*did you mean 'batch_size'"),
        id="unknown-data-key",
    ),
    pytest.param(
        Bad(
            fit(DIGITS, "--data.init_args.batch_size", "abc"),
            r"data\.init_args\.batch_size: got 'abc', expected an integer",
        ),
        id="batch-size-not-a-number",
    ),
    pytest.param(
        Bad(
            fit(DIGITS, "--model.init_args.strategy", "unfreeze_all"),
            r"model\.init_args\.strategy: got 'unfreeze_all', expected one of .*'lp_ft'",
        ),
        id="unknown-strategy",
    ),
    pytest.param(Bad(fit(DIGITS, "--model", "tlmodules.FineTuneModul"), r"FineTuneModul"), id="unknown-model-class"),
    pytest.param(
        Bad(
            fit_with(DIGITS, lambda env: ["--config", env.write("extra.yaml", "trainr:\n  max_epochs: 2\n")]), r"trainr"
        ),
        id="unknown-top-level-key-in-yaml",
    ),
    pytest.param(
        Bad(
            lambda env: ["fit", "--config", env.write("bad.yaml", "model:\n  class_path: x\n   bad: [\n")],
            r"config file .*bad\.yaml is not valid YAML at line 3",
        ),
        id="malformed-yaml",
    ),
    pytest.param(
        Bad(lambda env: ["fit", "--config", str(env.tmp / "nope.yaml")], r"config file .*nope\.yaml does not exist"),
        id="missing-config-file",
    ),
    pytest.param(
        Bad(
            lambda env: ["fit", "--config", env.write("list.yaml", "- a\n- b\n")],
            r"config file .*list\.yaml holds a list, not a mapping",
        ),
        id="yaml-that-is-not-a-mapping",
    ),
    # -- backbones ----------------------------------------------------------------------------------------------
    pytest.param(
        Bad(fit(DIGITS, "--model.init_args.backbone", "resnet999"), r"'resnet999' has no kind"),
        id="backbone-without-a-kind",
    ),
    pytest.param(
        Bad(fit(DIGITS, "--model.init_args.backbone", "builtin:nope"), r"got builtin:nope"),
        id="unknown-builtin-backbone",
    ),
    pytest.param(
        Bad(fit(DIGITS, "--model.init_args.backbone", "torchvision:resnet999"), r"no classification model 'resnet999'"),
        id="unknown-torchvision-model",
    ),
    pytest.param(
        Bad(
            fit(RESNET, "--model.init_args.weights", "IMAGENET9K"),
            r"unknown weights 'IMAGENET9K' for torchvision:resnet18; choose one of",
        ),
        id="unknown-torchvision-weights",
    ),
    pytest.param(
        Bad(
            fit_with(MINILM, lambda env: ["--model.init_args.backbone", f"hf:{env.tmp / 'no_model'}"]),
            r"no_model.*save_pretrained",
        ),
        id="missing-hugging-face-folder",
    ),
    pytest.param(
        Bad(
            fit_with(DIGITS, lambda env: ["--model.init_args.backbone", f"ckpt:{env.truncated_checkpoint()}"]),
            r"cannot read checkpoint .*cut\.ckpt.*truncated",
        ),
        id="truncated-checkpoint-as-backbone",
    ),
    # -- checkpoints --------------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            fit_with(DIGITS, lambda env: ["--ckpt_path", str(env.tmp / "gone.ckpt")]),
            r"ckpt_path: checkpoint .*gone\.ckpt does not exist",
        ),
        id="missing-ckpt-path",
    ),
    pytest.param(
        Bad(
            fit_with(DIGITS, lambda env: ["--ckpt_path", env.truncated_checkpoint()]),
            r"ckpt_path: cannot read checkpoint .*cut\.ckpt",
        ),
        id="truncated-ckpt-path",
    ),
    pytest.param(
        Bad(
            lambda env: ["test", "--config", QUICKSTART, "--ckpt_path", env.checkpoint()],
            r"written by FineTuneModule, not DANNModule",
        ),
        id="checkpoint-of-another-module",
    ),
    # -- values ---------------------------------------------------------------------------------------------------
    pytest.param(
        Bad(fit(DIGITS, "--model.init_args.lr", "-1"), r"FineTuneModule: lr must be positive.*-1"), id="negative-lr"
    ),
    pytest.param(
        Bad(
            fit(FEW_SHOT, "--model.init_args.head", "mlp"),
            r"FineTuneModule: strategy 'contrastive' fits a .*head: linear",
        ),
        id="contrastive-with-an-mlp-head",
    ),
    pytest.param(
        Bad(
            fit(FEW_SHOT, "--data.init_args.group_by_length", "true", "--data.init_args.group_by_class", "true"),
            r"group_by_length and group_by_class both set: .*keep group_by_class for a contrastive loss",
        ),
        id="batches-grouped-by-length-and-by-class",
    ),
    pytest.param(
        Bad(
            fit(FEW_SHOT, "--model.init_args.contrastive_class_weight", "inverse"),
            r"contrastive_class_weight: got 'inverse', expected one of 'balanced' or null",
        ),
        id="optional-choice-on-the-command-line",
    ),
    pytest.param(
        Bad(
            fit_with(
                FEW_SHOT,
                lambda env: ["--config", env.write("mine.yaml", "model:\n  init_args:\n    layer_decay: steep\n")],
            ),
            r"layer_decay: got 'steep', expected a number or null",
        ),
        id="optional-number-in-yaml",
    ),
    pytest.param(
        Bad(fit(DIGITS, "--data.init_args.val_fraction", "1.5"), r"val_fraction must be in \[0, 1\), got 1\.5"),
        id="val-fraction-above-one",
    ),
    pytest.param(
        Bad(
            fit_with(CAMVID, lambda env: ["--data.init_args.train_dir", env.scenes("scenes", without_mask=1)]),
            r"image\(s\) without a mask \['frame1'\]",
        ),
        id="segmentation-image-without-a-mask",
    ),
    pytest.param(
        Bad(
            fit(
                CAMVID,
                "--data.init_args.tasks",
                "[{name: scene, kind: segmentation}, {name: x, kind: mask, classes: [Lorry]}]",
            ),
            r"Lorry",
        ),
        id="segmentation-task-names-an-unknown-class",
    ),
    pytest.param(
        Bad(fit(CAMVID, "--model.init_args.backbone", "builtin:nope"), r"builtin:nope"),
        id="segmentation-unknown-backbone",
    ),
    pytest.param(
        Bad(fit(CAMVID, "--model.init_args.backbone", "torchvision:vit_b_16"), r"no 2-D feature map .*resnet18"),
        id="segmentation-on-a-vision-transformer",
    ),
    pytest.param(
        Bad(fit(DIGITS, "--data.init_args.batch_size", "0"), r"batch_size must be a positive integer, got 0"),
        id="batch-size-zero",
    ),
    pytest.param(
        Bad(fit(MINILM, "--data.init_args.max_length", "100000"), r"max_length 100000 is above the 512 positions"),
        id="max-length-above-the-model",
    ),
    pytest.param(
        Bad(fit(RESNET, "--data.init_args.image_size", "0"), r"image_size must be positive, got 0"),
        id="image-size-zero",
    ),
    pytest.param(
        Bad(fit(QUICKSTART, "--model.init_args.method", "mmd"), r"method: got 'mmd', expected one of"),
        id="unknown-dann-method",
    ),
    # -- text data ------------------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            fit_with(MINILM, lambda env: ["--data.init_args.train_file", str(env.tmp / "missing.tsv")]),
            r"train file .*missing\.tsv does not exist",
        ),
        id="missing-train-file",
    ),
    pytest.param(
        Bad(fit_with(MINILM, text_file("")), r"train file .*train\.tsv has no data rows"), id="empty-train-file"
    ),
    pytest.param(
        Bad(
            fit_with(
                MINILM,
                lambda env: ["--data.init_args.train_file", env.sentences(), "--data.init_args.label_column", "5"],
            ),
            r"label column 5 is out of range in .*train\.tsv",
        ),
        id="absent-label-column",
    ),
    pytest.param(
        Bad(
            fit_with(MINILM, text_file("good food\tpos\nnice place\tpos\n")),
            r"train\.tsv has fewer than two distinct labels",
        ),
        id="single-class",
    ),
    pytest.param(
        Bad(fit_with(MINILM, text_file("caf\xe9 ok\t1\nbad\t0\n".encode("latin-1"))), r"cannot parse .*train\.tsv"),
        id="undecodable-bytes",
    ),
    pytest.param(
        Bad(
            fit_with(MINILM, text_file("good food\tpos\nbad\tneg\textra\nok\tpos\n")), r"train\.tsv line 2 has 3 fields"
        ),
        id="ragged-row",
    ),
    pytest.param(
        Bad(
            fit_with(
                MINILM,
                lambda env: [
                    "--data.init_args.train_file",
                    env.sentences(),
                    "--data.init_args.val_file",
                    env.write("val.tsv", "meh\tmaybe\n"),
                ],
            ),
            r"label 'maybe' in .*val\.tsv .*not in the label set",
        ),
        id="val-label-outside-the-label-set",
    ),
    # -- image folders and domain pairs ------------------------------------------------------------------------
    pytest.param(
        Bad(
            fit_with(RESNET, lambda env: ["--data.init_args.train_dir", str(env.tmp / "nowhere")]),
            r"train_dir .*nowhere is not a folder",
        ),
        id="missing-image-folder",
    ),
    pytest.param(
        Bad(
            fit_with(RESNET, lambda env: ["--data.init_args.train_dir", env.flat_folder()]),
            r"train_dir .*flat has no class sub-folders",
        ),
        id="folder-without-class-folders",
    ),
    pytest.param(
        Bad(
            fit_with(
                FOLDERS,
                lambda env: [
                    "--data.init_args.source.init_args.train_dir",
                    env.images("src", corrupt=True),
                    "--data.init_args.target.init_args.train_dir",
                    env.images("tgt"),
                ],
            ),
            r"unreadable image file\(s\): .*broken\.png",
        ),
        id="corrupt-image",
    ),
    pytest.param(
        Bad(
            fit_with(
                FOLDERS,
                lambda env: [
                    "--data.init_args.source.init_args.train_dir",
                    env.images("src", ("a", "b", "c")),
                    "--data.init_args.target.init_args.train_dir",
                    env.images("tgt", ("b", "c", "d")),
                ],
            ),
            r"source and target have different label spaces \(only in source: \['a'\]; only in target: \['d'\]\)",
        ),
        id="domain-label-spaces-differ",
    ),
    pytest.param(
        Bad(
            fit_with(
                TEXT_PAIR,
                lambda env: [
                    "--data.init_args.source.init_args.train_file",
                    env.sentences("source.tsv"),
                    "--data.init_args.target.init_args.train_file",
                    env.sentences("target.tsv", labels=("0", "1")),
                ],
            ),
            r"source and target have different label spaces \(only in source: \['neg', 'pos'\]; only in target",
        ),
        id="text-pair-label-spaces-differ",
    ),
    # -- multi-task and tagging data ----------------------------------------------------------------------------
    pytest.param(
        Bad(
            fit_with(
                ENERGY, lambda env: ["--data.init_args.train_file", env.write("energy.csv", "x,heatload\n1,2\n3,4\n")]
            ),
            r"task 'cooling': label column 'coolload' is not in .*energy\.csv",
        ),
        id="multitask-absent-column",
    ),
    pytest.param(
        Bad(
            fit_with(
                ENERGY,
                lambda env: [
                    "--data.init_args.train_file",
                    env.write("energy.csv", "x,heatload,coolload\n1,2,3\n3,warm,5\n"),
                ],
            ),
            r"value 'warm' in .*energy\.csv .*is not a number",
        ),
        id="multitask-regression-value-not-a-number",
    ),
    pytest.param(
        Bad(
            fit_with(
                NER,
                lambda env: ["--data.init_args.val_file", env.write("val.conll", "Paris B-LOC\nis O\nbig B-SIZE\n")],
            ),
            r"tag 'B-SIZE' in .*val\.conll line 3 is not in the tag set",
        ),
        id="tag-outside-the-tag-set",
    ),
    # -- outputs --------------------------------------------------------------------------------------------------
    pytest.param(
        Bad(
            lambda env: [
                "predict",
                "--config",
                DIGITS,
                "--predictions.output_path",
                str(env.out / "blocker.txt" / "p.csv"),
                "--ckpt_path",
                env.checkpoint(),
            ],
            r"predictions folder .*blocker\.txt.* is a file, not a folder",
        ),
        id="predictions-under-a-file",
    ),
    pytest.param(
        Bad(
            fit_with(DIGITS, lambda env: ["--checkpoint.dirpath", str(env.out / "blocker.txt" / "ckpts")]),
            r"checkpoint folder .*blocker\.txt/ckpts cannot be created",
        ),
        id="checkpoints-under-a-file",
    ),
]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    out = tmp_path / "out"
    for name, data in SENTINELS.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (tmp_path / "scratch").mkdir()
    yield Env(tmp=tmp_path / "scratch", out=out)


def outputs_into(out: Path, args: list[str]) -> list[str]:
    """Every output of the command into ``out`` (unless the case points one elsewhere on purpose)."""
    extra = ["--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.enable_progress_bar", "false"]
    if args[0] == "fit" and "--checkpoint.dirpath" not in args:
        extra += ["--checkpoint.dirpath", str(out / "checkpoints")]
    if "--predictions.output_path" not in args:
        extra += ["--predictions.output_path", str(out / "predictions.csv")]
    return extra


def test_the_table_holds_thirty_command_lines_or_more() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES)
def test_a_bad_command_line_ends_in_one_error_line(case: Bad, env: Env, train_py: TrainPy) -> None:
    args = case.args(env)
    before = snapshot(env.out)
    done = train_py([*args, *outputs_into(env.out, args)], cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert re.search(case.culprit, lines[0]), lines[0]
    for noise in ("Traceback", "Union subtypes", "Namespace(", "Given value"):
        assert noise not in done.stderr
    assert snapshot(env.out) == before, "an earlier output was changed, or a run folder was left behind"


def test_tlmodules_debug_brings_the_traceback_back(env: Env, train_py: TrainPy) -> None:
    args = ["fit", "--config", MINILM, "--data.init_args.train_file", str(env.tmp / "missing.tsv")]
    done = train_py([*args, *outputs_into(env.out, args)], cwd=ROOT, env={"TLMODULES_DEBUG": "1"})
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "missing.tsv does not exist" in done.stderr


def test_a_bug_is_not_dressed_as_a_user_error(env: Env, train_py: TrainPy) -> None:
    """An exception that is not a user's mistake keeps its traceback (here: a broken datamodule class)."""
    module = env.write(
        "broken_data.py",
        (
            "from datamodules import SklearnDigitsDataModule\n"
            "class Broken(SklearnDigitsDataModule):\n"
            "    def setup(self, stage=None):\n"
            "        raise KeyError('a bug in setup')\n"
        ),
    )
    args = ["fit", "--config", DIGITS, "--data", "broken_data.Broken"]
    done = train_py([*args, *outputs_into(env.out, args)], cwd=ROOT, env={"PYTHONPATH": str(Path(module).parent)})
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'a bug in setup'" in done.stderr
    assert not (env.out / "runs" / "digits_finetune").exists(), "the failed run left an empty run folder"
