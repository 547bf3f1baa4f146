"""baseline.kind: classic and unet through the same train/evaluate stages and the same cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from stages.cli import app
from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.baselines.unet import view_pixels
from textdiff.cache.store import FeatureCache
from textdiff.data.prepared import load_prepared
from textdiff.encoders.image import images_to_model_range
from textdiff.evaluation.metrics import aji, iou_dice_textdiff

runner = CliRunner()


def _metrics() -> dict:
    return json.loads(Path("metrics/test.json").read_text())


def test_classic_baseline_is_scored_on_the_prepared_test_masks(tiny_project):
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(baseline={"kind": "classic"})
    for stage in ("train", "evaluate"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, result.output
    test = load_prepared("data/prepared", "test")
    preds = [hematoxylin_otsu(im) for im in test.images]
    dice = np.mean([iou_dice_textdiff(p, g)[0] for p, g in zip(preds, test.masks)])
    ajis = np.mean([aji(p, g) for p, g in zip(preds, test.masks)])
    metrics = _metrics()
    assert metrics["dice"] == dice and metrics["aji"] == ajis
    # scored against these masks and not, e.g., the dilated release masks or another split
    wrong = np.mean([iou_dice_textdiff(p, g)[0] for p, g in zip(preds, test.release_masks)])
    assert wrong != dice
    per_image = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    assert [row["id"] for row in per_image] == list(test.ids)
    # predict refuses a baseline in one line
    result = runner.invoke(app, ["predict", str(tiny_project.data_root / "Test_Folder" / "img"), "--out", "out"])
    assert result.exit_code != 0 and "classic baseline" in result.output and "Traceback" not in result.output


def test_unet_baseline_trains_on_the_labelled_pixels_and_is_evaluated(tiny_project):
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(baseline={"kind": "unet", "channels": [4, 8, 16], "res_units": 1},
                              train={"steps": 4, "val_every": 2, "num_labeled": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["kind"] == "unet" and len(card["train_ids"]) == 2 and card["best_step"] in (2, 4)
    assert json.loads(Path("metrics/train.json").read_text())["steps"] == 4
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = _metrics()
    assert 0 <= metrics["dice"] <= 1 and metrics["num_images"] == 2


def test_unet_views_are_the_pixels_the_teacher_saw(tiny_project):
    """The RGB control caches the model-range pixels of every view: the U-Net's rebuilt views must
    be exactly those (dihedral, rotated, stain copies)."""
    tiny_project.write_params(teacher={"kind": "rgb", "checkpoint": ""},
                              extract={"views": 8, "rotations": 1, "stain_views": 1, "batch_size": 2})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    split = FeatureCache(Path("cache/features.zarr")).split("train")
    assert split.spec.total_views == 10
    for i in range(len(split)):
        for v in range(10):
            (cached,) = split.features(i, v)
            rebuilt = images_to_model_range(view_pixels(split, i, v)[None])[0]
            torch.testing.assert_close(cached[0].float(), rebuilt, atol=1e-2, rtol=0)
