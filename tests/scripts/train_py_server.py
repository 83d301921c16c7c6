"""Runs ``train.py`` command lines, each in a process of its own, without paying the imports each time.

The tests run ``python train.py ...`` dozens of times (every recipe, every bad command line); importing torch,
Lightning and transformers takes several seconds per process here. This server imports them once, then for
each request forks a child that runs ``train.py`` as ``__main__`` with the request's argv, working directory
and environment, its stdout and stderr going to files, and reports the child's exit status. Nothing runs a
thread or touches torch's thread pools before the fork. ``tests/conftest.py`` (``train_py``) talks to it;
``TLMODULES_TEST_FRESH_PROCESS=1`` makes that fixture start a fresh interpreter per command instead.

Protocol: one JSON object per line on stdin ``{"argv", "cwd", "env", "stdout", "stderr"}``; one JSON object per
line on stdout ``{"returncode", "timed_out"}`` (a child still running after the request's ``timeout`` seconds is
killed).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"


def child(request: dict) -> None:
    """In the forked child: become ``python train.py <argv>`` and exit with its status."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the child never reads the server's requests
        sys.argv = [str(TRAIN_PY), *request["argv"]]
        # as `python train.py` would have it: the script's folder first, then PYTHONPATH
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:1] = [str(TRAIN_PY.parent), *extra]
        try:
            runpy.run_path(str(TRAIN_PY), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int | None):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then status 1
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    import tlmodules.cli  # noqa: F401 - the slow imports, paid once

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline = time.monotonic() + request.get("timeout", 600)
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    main()
