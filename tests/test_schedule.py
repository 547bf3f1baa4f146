"""train.steps: a fixed optimisation budget whatever the number of labels (label-efficiency curves)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.params import TrainParams, load_params
from textdiff.train.training import schedule_for, train_classifier

runner = CliRunner()


def test_schedule_in_epochs_and_in_steps():
    epochs = schedule_for(TrainParams(epochs=20), 24)
    assert (epochs.total_steps, epochs.val_every, epochs.rounds, epochs.unit) == (480, 24, 20, "epoch")
    assert schedule_for(TrainParams(epochs=3, batch_size=2), 5).total_steps == 9  # 3 batches a pass
    steps = schedule_for(TrainParams(steps=100, val_every=24), 1)
    assert (steps.total_steps, steps.val_every, steps.rounds, steps.unit) == (100, 24, 5, "round")
    assert schedule_for(TrainParams(steps=10, val_every=24), 1).val_every == 10


def test_milestones_count_validation_rounds_in_steps_mode():
    TrainParams(steps=100, val_every=24, milestones=(4,)).check()
    with pytest.raises(ValueError, match="validation round"):
        TrainParams(steps=100, val_every=24, milestones=(5,)).check()


def _train(tiny_project, **train) -> tuple[dict, list]:
    tiny_project.write_params(train={"d_model": 16, "heads": 2, **train})
    params = load_params(Path("params.yaml"))
    records = []
    result = train_classifier(FeatureCache(Path("cache/features.zarr")), params.train, torch.device("cpu"),
                              on_epoch=records.append, progress=False)
    return result, records


def test_steps_equal_to_epochs_train_the_same_weights_and_one_label_gets_the_full_budget(tiny_project):
    assert runner.invoke(app, ["extract"]).exit_code == 0
    by_epochs, _ = _train(tiny_project, epochs=2)  # 3 labelled images, batch 1: 6 steps, validated after 3
    by_steps, records = _train(tiny_project, steps=6, val_every=3)
    assert [r.step for r in records] == [3, 6]
    for key, value in by_epochs.state.items():
        assert torch.equal(value, by_steps.state[key]), key
    assert by_epochs.best_epoch == by_steps.best_epoch

    one, records = _train(tiny_project, steps=5, val_every=2, num_labeled=1)
    assert one.num_train == 1 and [r.step for r in records] == [2, 4, 5]  # 5 steps on one image, not 2 epochs
    assert one.best_step in (2, 4, 5)

    tiny_project.write_params(train={"d_model": 16, "heads": 2, "steps": 4, "val_every": 2, "num_labeled": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    import json

    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["steps"] == 4 and metrics["num_train"] == 2 and metrics["best_step"] in (2, 4)
