"""Resumable training: a run stopped after any validation round and started again trains exactly
what an uninterrupted run trains (weights, curves, chosen epoch), for the classifier and the U-Net."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_tree
from typer.testing import CliRunner

from stages.cli import app
from textdiff.train import resume

runner = CliRunner()
CHECKPOINT = Path("models/classifier.resume.pt")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs, no handler catches it."""


@pytest.fixture
def extracted(tiny_project):
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    return tiny_project


def _outputs() -> tuple[dict, dict, list]:
    weights = torch.load("models/classifier/model.pt", map_location="cpu", weights_only=True)
    card = json.loads(Path("models/classifier/model.json").read_text())
    with open("dvclive/train/plots/metrics/val/dice.tsv") as f:
        curve = [(row["step"], row["dice"]) for row in csv.DictReader(f, delimiter="\t")]
    return weights, card, curve


def _kill_after_round(monkeypatch, kill_at: int) -> None:
    """The process dies right after the checkpoint of round `kill_at` is on disk."""
    save = resume.Checkpoint.save

    def save_then_die(self, blob):
        save(self, blob)
        if blob["round"] == kill_at:
            raise Killed

    monkeypatch.setattr(resume.Checkpoint, "save", save_then_die)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["none", "unet"])
def test_a_run_killed_after_a_round_resumes_to_the_uninterrupted_weights(extracted, monkeypatch, kind):
    params = {"train": {"epochs": 3, "d_model": 16, "heads": 2, "seed": 3},
              "baseline": {"kind": kind, "channels": [4, 8], "res_units": 1}}
    extracted.write_params(**params)
    assert runner.invoke(app, ["train"]).exit_code == 0
    reference = _outputs()
    assert not CHECKPOINT.exists()  # removed once the model is written

    with monkeypatch.context() as m:
        _kill_after_round(m, 2)
        with pytest.raises(Killed):
            runner.invoke(app, ["train"], catch_exceptions=False)
    assert CHECKPOINT.is_file()
    resumed = runner.invoke(app, ["train"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 2/3 (step" in resumed.output
    weights, card, curve = _outputs()
    _assert_same_weights(weights, reference[0])
    assert card["best_epoch"] == reference[1]["best_epoch"]
    assert card["best_val_dice"] == reference[1]["best_val_dice"]
    assert curve == reference[2] and len(curve) == 3  # the curve is whole, each round once
    assert not CHECKPOINT.exists()
    assert json.loads(Path("metrics/train.json").read_text())["resumed_from_step"] == 2 * 3  # 2 epochs of 3


def test_a_checkpoint_of_other_params_is_not_used(extracted, monkeypatch):
    extracted.write_params(train={"epochs": 2, "d_model": 16, "heads": 2})
    with monkeypatch.context() as m:
        _kill_after_round(m, 1)
        with pytest.raises(Killed):
            runner.invoke(app, ["train"], catch_exceptions=False)
    extracted.write_params(train={"epochs": 2, "d_model": 16, "heads": 2, "lr": 0.0003})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "not resuming from models/classifier.resume.pt: it was made with other train.lr" in result.output
    assert "resuming after" not in result.output


def test_a_torn_checkpoint_starts_over_and_says_so(extracted):
    extracted.write_params(train={"epochs": 1, "d_model": 16, "heads": 2})
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    CHECKPOINT.write_bytes(b"PK\x03\x04 half a zip")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "is not a readable checkpoint" in result.output and not CHECKPOINT.exists()


def test_the_identity_names_what_changed():
    base = resume.training_identity({"lr": 1e-4, "device": "auto"}, {"kind": "none"}, {"a": 1}, 1, "cpu")
    assert base == resume.training_identity({"lr": 1e-4, "device": "cpu"}, {"kind": "none", "lr": 5}, {"a": 1}, 1,
                                            "cpu")  # where it runs and an unused baseline section do not count
    other = resume.training_identity({"lr": 2e-4}, {"kind": "none"}, {"a": 2}, 2, "cpu")
    words = resume._identity_difference(base, other)
    assert "train.lr" in words and "the feature cache" in words and "the number of processes" in words


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `process` and every process under it as soon as `ready()` holds, as a scheduler ends a
    job (torchrun starts its workers in sessions of their own: killing its group alone orphans them)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the point to kill at"
        time.sleep(0.02)
    kill_tree(process)


def _saved_round() -> int:
    try:
        return int(torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["round"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return 0


def test_two_ranks_killed_by_sigkill_resume_the_same_step(extracted):
    """Under torchrun every rank loads the one checkpoint rank 0 wrote: the resumed job's weights
    equal an uninterrupted two-process job's."""
    train = {"epochs": 3, "d_model": 16, "heads": 2, "batch_size": 2, "nproc": 2, "autocast": "float32"}
    extracted.write_params(train=train)
    command = [sys.executable, "-m", "stages.cli", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = _outputs()

    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    _kill_when(killed, lambda: _saved_round() >= 1)
    assert CHECKPOINT.is_file()
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    weights, card, curve = _outputs()
    _assert_same_weights(weights, reference[0])
    assert curve == reference[2] and card["best_epoch"] == reference[1]["best_epoch"]
