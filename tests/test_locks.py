"""One writer per output: a second run on the same cache, model folder or --out refuses in one
line naming the first; the lock of a killed run is taken over and said so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from textdiff.locks import hold, lock_path

runner = CliRunner()


@pytest.fixture
def holder(tmp_path):
    """Another live process holding a lock file, as a first run would."""
    started = []

    def start(path: Path) -> subprocess.Popen:
        ready = tmp_path / f"ready-{len(started)}"
        code = ("import sys, time, pathlib; from textdiff.locks import hold\n"
                f"with hold(pathlib.Path({str(path)!r}), 'x'):\n"
                f"    pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")
        process = subprocess.Popen([sys.executable, "-c", code])
        started.append(process)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_second_train_on_the_same_model_folder_is_refused(trained, holder):
    before = Path("models/classifier/model.pt").read_bytes()
    first = holder(lock_path(Path("models/classifier")))
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "models/classifier.lock: the model folder models/classifier is being written by " \
        f"another run (pid {first.pid}" in line
    assert Path("models/classifier/model.pt").read_bytes() == before  # nothing touched


def test_a_second_predict_into_the_same_folder_is_refused(trained, holder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder(out / ".textdiff.lock")
    image = next((trained.data_root / "Test_Folder" / "img").iterdir())
    result = runner.invoke(app, ["predict", str(image), "--out", str(out), "--text", "x"])
    assert result.exit_code == 1 and "is being written by another run" in result.output
    assert not (out / "predictions.h5").exists()


def test_the_lock_of_a_killed_run_is_taken_over_and_released(trained):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = lock_path(Path("cache/features.zarr"))
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "textdiff extract",
                                "started": "earlier"}))
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of pid {dead.pid} (`textdiff extract`, since earlier)" in result.output
    assert not lock.exists()


def test_a_process_tree_holds_its_own_lock_once(tmp_path):
    lock = tmp_path / "out.lock"
    with hold(lock, "x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with hold(lock, "x"):  # what a torchrun rank of this job sees: held by its launcher
            assert lock.exists()
        assert lock.exists()
    assert not lock.exists()
