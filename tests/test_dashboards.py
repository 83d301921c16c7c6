"""What a finished run shows in TensorBoard, read back through a real TensorBoard server's HTTP data API.

Two tiny CLI runs (the DANN quickstart recipe and the digits fine-tuning recipe, two training steps and one
validation each) write their event files to one log folder; a ``tensorboard`` subprocess serves it on a free
loopback port, and the tests read the scalars, images, projector and HParams plugins the way the browser does.
The server is stopped when the module's tests are done.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from test_cli import TINY_FIT

from tlmodules.cli import TransferCLI, main

# in-process runs pass args= while pytest's own arguments sit in sys.argv; LightningCLI warns about that
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
DIGITS = ROOT / "configs" / "digits_finetune.yaml"
DANN_RUN = "quickstart/version_0"  # <logger name>/<version>, as TensorBoard names runs under --logdir
FINETUNE_RUN = "digits_finetune/version_0"
# test_cli's one-epoch, two-batch run, validating every epoch and logging every step
TINY = [*TINY_FIT, "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1"]
# The only names outside train/, val/ and test/: the final validation metric for the HParams tab and
# Lightning's own epoch counter.
OTHER_NAMES = re.compile(r"hp_metric|epoch")
SCHEME = re.compile(r"(train|val|test)/.+")
SERVER_START_S = 60.0


# -- the runs and the server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log folder holding one finished tiny DANN run and one finished tiny fine-tuning run."""
    root = tmp_path_factory.mktemp("dashboards")
    runs = root / "runs"
    for recipe, name in ((QUICKSTART, "dann"), (DIGITS, "finetune")):
        main(
            args=[
                "fit",
                "--config",
                str(recipe),
                *TINY,
                "--trainer.logger.init_args.save_dir",
                str(runs),
                "--checkpoint.dirpath",
                str(root / f"checkpoints_{name}"),
            ]
        )
    assert {p.parent.relative_to(runs).as_posix() for p in runs.rglob("events.out.tfevents.*")} == {
        DANN_RUN,
        FINETUNE_RUN,
    }
    return runs


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>/
    process: subprocess.Popen[bytes]
    log: Path

    def request(self, path: str, query: dict[str, Any] | None = None, body: Any = None) -> bytes:
        """GET ``path`` (POST with a JSON ``body``) and return the response's bytes."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=20) as response:
            return response.read()

    def json(self, path: str, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        return json.loads(self.request(path, query, body))


def wait_for_server(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The URL TensorBoard printed once it answers HTTP; fails with its output if it exits or never answers."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tensorboard exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if url is None:
            found = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+/)", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                Server(url, process, log).request("data/runs")
                return url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.25)
    pytest.fail(f"tensorboard did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def port_of(url: str) -> int:
    return int(urllib.parse.urlparse(url).port)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(logdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``tensorboard --logdir <runs> --port 0`` on the loopback interface (the OS picks a free port and
    TensorBoard prints it). ``--load_fast false`` keeps to the Python data loader (no Rust data server
    offline); ``--reload_interval 0 --reload_task blocking`` reads every event file once, before serving,
    so the first answer already holds all of the finished runs."""
    log = tmp_path_factory.mktemp("tensorboard") / "server.log"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--load_fast",
        "false",
        "--reload_interval",
        "0",
        "--reload_task",
        "blocking",
    ]
    with log.open("wb") as output:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = None
    try:
        url = wait_for_server(process, log, SERVER_START_S)
        yield Server(url, process, log)
    finally:
        stop(process)
    assert process.poll() is not None, "tensorboard is still running"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port_of(url)), timeout=2):
        pass  # nothing answers on its port any more


def scalar_tags(server: Server) -> dict[str, set[str]]:
    return {run: set(tags) for run, tags in server.json("data/plugin/scalars/tags").items()}


def series(server: Server, run: str, tag: str) -> list[tuple[float, int, float]]:
    """``[(wall_time, step, value), ...]`` of one scalar."""
    return [tuple(point) for point in server.json("data/plugin/scalars/scalars", {"run": run, "tag": tag})]


# -- the rich progress bar ------------------------------------------------------------------------
def progress_bars(args: list[str]) -> list[ProgressBar]:
    cli = TransferCLI(args=["--config", str(DIGITS), "--trainer.logger", "false", *args], run=False)
    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_cli_shows_a_rich_progress_bar_unless_turned_off_or_replaced() -> None:
    assert [type(bar) for bar in progress_bars([])] == [RichProgressBar]
    assert progress_bars(["--trainer.enable_progress_bar", "false"]) == []
    assert [type(bar) for bar in progress_bars(["--trainer.callbacks+=TQDMProgressBar"])] == [TQDMProgressBar]


# -- the dashboards of the finished runs ----------------------------------------------------------
def test_tensorboard_lists_both_runs(server: Server) -> None:
    assert set(server.json("data/runs")) == {DANN_RUN, FINETUNE_RUN}


def test_scalar_tags_follow_the_naming_scheme(server: Server) -> None:
    tags = scalar_tags(server)
    # on_step and on_epoch together: Lightning writes <name>_step and <name>_epoch
    assert {
        "train/source/loss_step",
        "train/source/loss_epoch",
        "train/source/acc",
        "train/domain/loss_step",
        "train/domain/loss_epoch",
        "train/domain/acc",
        "train/lambda",
        "val/source/acc",
        "val/source/f1_macro",
        "val/target/acc",
        "val/target/f1_macro",
        "val/target/im_score",
        "hp_metric",
    } <= tags[DANN_RUN]
    assert {
        "train/loss_step",
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/f1_macro",
        "hp_metric",
    } <= tags[FINETUNE_RUN]
    for run, names in tags.items():
        outside = sorted(n for n in names if not SCHEME.fullmatch(n) and not OTHER_NAMES.fullmatch(n))
        assert not outside, f"{run} logs names outside train/, val/, test/: {outside}"


@pytest.mark.parametrize(
    ("run", "tags"),
    [
        (DANN_RUN, ["train/source/loss_step", "train/domain/loss_step", "train/lambda", "val/target/acc"]),
        (FINETUNE_RUN, ["train/loss_step", "val/loss", "val/acc"]),
    ],
)
def test_scalar_series_hold_finite_values(server: Server, run: str, tags: list[str]) -> None:
    for tag in tags:
        points = series(server, run, tag)
        assert points, f"{run}: {tag} has no values"
        assert all(math.isfinite(value) for _, _, value in points), f"{run}: {tag} = {points}"
    assert len(series(server, run, tags[0])) == 2  # log_every_n_steps=1: one point per training step


@pytest.mark.parametrize(("run", "metric"), [(DANN_RUN, "val/target/acc"), (FINETUNE_RUN, "val/acc")])
def test_hp_metric_ends_at_the_final_validation_metric(server: Server, run: str, metric: str) -> None:
    final = series(server, run, metric)[-1]
    assert series(server, run, "hp_metric")[-1][1:] == pytest.approx(final[1:])  # same step, same value


def test_images_hold_the_confusion_matrices_and_the_feature_projection(server: Server) -> None:
    tags = {run: set(t) for run, t in server.json("data/plugin/images/tags").items()}
    assert {"val/target/confusion_matrix", "val/feature_projection"} <= tags[DANN_RUN]
    assert "val/confusion_matrix" in tags[FINETUNE_RUN]
    for run, tag in ((DANN_RUN, "val/feature_projection"), (FINETUNE_RUN, "val/confusion_matrix")):
        entries = server.json("data/plugin/images/images", {"run": run, "tag": tag, "sample": 0})
        assert entries, f"{run}: no {tag} image"
        image = server.request("data/plugin/images/individualImage?" + entries[-1]["query"])
        assert image.startswith(b"\x89PNG"), f"{run}: {tag} is not a PNG image"


def test_projector_holds_both_domains_features(server: Server) -> None:
    assert server.json("data/plugin/projector/runs") == [DANN_RUN]  # fine-tuning writes no embedding
    embeddings = server.json("data/plugin/projector/info", {"run": DANN_RUN})["embeddings"]
    assert [e["tensorName"].split(":")[0] for e in embeddings] == ["val/feature_embedding"]
    rows, width = embeddings[0]["tensorShape"]
    assert rows > 0 and width == 256  # the recipe's bottleneck width
    metadata = server.request("data/plugin/projector/metadata", {"run": DANN_RUN, "name": embeddings[0]["tensorName"]})
    header, *lines = metadata.decode().strip().splitlines()
    assert header.split("\t") == ["domain", "label"] and len(lines) == rows
    assert {line.split("\t")[0] for line in lines} == {"source", "target"}


def test_hparams_tab_compares_runs_by_hp_metric(server: Server) -> None:
    experiment = server.json("data/plugin/hparams/experiment", body={"experimentName": ""})
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["hp_metric"]
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = {g["name"]: g for g in server.json("data/plugin/hparams/session_groups", body=request)["sessionGroups"]}
    assert set(groups) == {DANN_RUN, FINETUNE_RUN}
    assert groups[DANN_RUN]["hparams"]["method"] == "dann"
    assert groups[FINETUNE_RUN]["hparams"]["strategy"] == "full"
    for run, metric in ((DANN_RUN, "val/target/acc"), (FINETUNE_RUN, "val/acc")):
        hparams = groups[run]["hparams"]
        assert hparams["backbone"] == "builtin:lenet" and hparams["num_classes"] == 10  # num_classes: from the data
        assert hparams["batch_size"] == 64  # the datamodule's hyperparameters too
        values = {v["name"]["tag"]: v["value"] for v in groups[run]["metricValues"]}
        assert values == {"hp_metric": pytest.approx(series(server, run, metric)[-1][2])}
