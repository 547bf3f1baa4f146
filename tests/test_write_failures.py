"""A full disk, a file size limit and a read-only folder: one line naming the output, exit 1, and
nothing half-written that a later stage or a resumed run would trust.

The file size limit (RLIMIT_FSIZE, `ulimit -f`) works everywhere; Python ignores SIGXFSZ, so a write
past it fails with EFBIG as a full disk fails with ENOSPC. The full disk and the read-only folder
are real tmpfs mounts, where the machine lets us mount (root with CAP_SYS_ADMIN, as in CI); as root
a chmod does not stop a write, so only a read-only mount is a read-only folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from stages.cli import app
from textdiff.atomic import atomic_dir, atomic_file
from textdiff.errors import WriteRefused

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _big() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(64 * 1024, dtype=torch.float32)}  # 256 KiB


WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda p: p.write_text("x" * 300_000),
    "torch.save": lambda p: torch.save(_big(), p),
    "safetensors": lambda p: save_file(_big(), str(p)),
    "h5py": lambda p: _h5(p),
    "png": lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)).save(
        p, format="PNG"),
    "npz": lambda p: _savez(p),
}


def _h5(path: Path) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("a", data=np.arange(100_000))


def _savez(path: Path) -> None:
    with open(path, "wb") as f:  # as predict's records write it (np.savez would add ".npz" to a name)
        np.savez(f, a=np.arange(100_000))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_file_past_the_size_limit_is_one_error_naming_it_and_leaves_nothing(tmp_path, writer):
    final = tmp_path / "out.bin"
    with file_size_limit(64 * 1024), pytest.raises(WriteRefused) as caught:
        with atomic_file(final, "the test output") as tmp:
            WRITERS[writer](tmp)
    message = str(caught.value)
    assert str(final) in message and "(the test output)" in message and "file too large" in message, message
    assert "\n" not in message
    assert _leftovers(tmp_path) == []


def test_a_folder_that_fails_half_way_keeps_the_previous_one_whole(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "model.json").write_text('{"old": true}')
    with file_size_limit(64 * 1024), pytest.raises(WriteRefused, match="file too large"):
        with atomic_dir(final) as tmp:
            (tmp / "model.json").write_text('{"new": true}')
            torch.save(_big(), tmp / "model.pt")
    assert _leftovers(tmp_path) == ["model"] and _leftovers(final) == ["model.json"]
    assert json.loads((final / "model.json").read_text()) == {"old": True}


def test_a_bug_inside_a_write_keeps_its_own_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_file(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            _ = 1 / 0
    assert _leftovers(tmp_path) == []


def _cli(args: list[str], limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The textdiff command in a fresh process (so a file size limit stays there)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))) if limit else None
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec)


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def test_train_past_the_size_limit_says_so_and_leaves_no_model(trained):
    """The tiny project's model folder exists from `trained`; a retrain that cannot write keeps it whole."""
    before = {p.name: p.read_bytes() for p in Path("models/classifier").iterdir()}
    trained.write_params(train={"epochs": 1, "d_model": 24, "heads": 2})  # other params: really trains
    done = _cli(["train"], limit=16 * 1024, cwd=trained.root)
    _one_error_line(done, "cannot write models/classifier", "file too large")
    assert {p.name: p.read_bytes() for p in Path("models/classifier").iterdir()} == before
    assert not [p for p in Path("models").iterdir() if p.name.startswith(".")]  # no temporaries


# --- real mounts: a full disk and a read-only folder -------------------------------------------------


def _mount_tmpfs(target: Path, size: str, read_only: bool = False) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"textdiff-test-{uuid.uuid4().hex[:6]}",
                           str(target)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def mounts() -> Iterator[Callable[..., None]]:
    mounted: list[Path] = []

    def mount(target: Path, size: str = "1m", read_only: bool = False) -> None:
        if not _mount_tmpfs(target, size, read_only):
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_full_disk_under_the_cache_is_one_line_and_a_rerun_on_space_continues(tiny_project, mounts):
    cache = tiny_project.root / "cache"
    mounts(cache, size="96k")
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cache/features.zarr" in lines[0] and "no space left" in lines[0], result.output
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 1  # nothing a later stage would trust

    subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
    again = runner.invoke(app, ["extract"])
    assert again.exit_code == 0, again.output
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0


def test_a_read_only_metrics_folder_is_one_line(trained, mounts):
    mounts(trained.root / "metrics", read_only=True)
    done = _cli(["evaluate"], cwd=trained.root)
    _one_error_line(done, "metrics", "read-only file system")


def test_predict_into_a_full_disk_stops_in_one_line_and_resumes_with_space(trained, mounts, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    src = sorted((trained.data_root / "Test_Folder" / "img").iterdir())
    for path in src:
        (images / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "full"
    mounts(out, size="12k")
    done = _cli(["predict", str(images), "--out", str(out), "--text", "nuclei"], cwd=trained.root)
    print(_one_error_line(done, str(out), "no space left"))
    assert not (out / "predictions.h5").exists() and not (out / "nuclei.csv").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
    again = _cli(["predict", str(images), "--out", str(out), "--text", "nuclei"], cwd=trained.root)
    assert again.returncode == 0, again.stdout + again.stderr
    with h5py.File(out / "predictions.h5") as h5:
        assert sorted(h5) == sorted(p.stem for p in src)
