"""baseline.kind: classic and unet through the same train/evaluate stages and the same cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from stages.cli import app
from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.baselines.unet import UNetConfig, build_unet, predict_pixels, unet_outputs, view_pixels
from textdiff.cache.store import FeatureCache
from textdiff.data.prepared import load_prepared
from textdiff.data.views import apply_view, undo_view
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
    tiny_project.write_params(extract={"eval_views": 2})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(baseline={"kind": "unet", "channels": [4, 8, 16], "res_units": 1},
                              train={"steps": 4, "val_every": 2, "num_labeled": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["kind"] == "unet" and len(card["train_ids"]) == 2 and card["best_step"] in (2, 4)
    assert json.loads(Path("metrics/train.json").read_text())["steps"] == 4
    assert card["unet"]["distance_head"] is True  # train.target auto + instances: the classifier's target
    assert card["nuclei"]["seeds"] in ("distance", "edt")
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = _metrics()
    assert 0 <= metrics["dice"] <= 1 and metrics["num_images"] == 2
    split = FeatureCache(Path("cache/features.zarr")).split("test")
    assert metrics["views"] == split.scored_views == 2 and "aji_instance" in metrics


def test_unet_binary_target_has_two_outputs(tiny_project):
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(baseline={"kind": "unet", "channels": [4, 8, 16], "res_units": 1},
                              train={"steps": 2, "val_every": 2, "target": "binary"})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["unet"]["distance_head"] is False and card["nuclei"]["seeds"] == "edt"


def test_unet_test_time_views_are_the_mean_of_the_turned_back_maps(tiny_project):
    """predict_pixels with 8 views: each dihedral view of the pixels through the U-Net, its maps
    turned back onto the image and averaged; one view is the argmax of the image itself."""
    assert runner.invoke(app, ["extract"]).exit_code == 0
    split = FeatureCache(Path("cache/features.zarr")).split("test")
    torch.manual_seed(0)
    model = build_unet(UNetConfig((4, 8, 16), 1, distance_head=True)).eval()
    distances: list = []
    preds, _, probs = predict_pixels(model, split, torch.device("cpu"), views=8, distances=distances)
    x = images_to_model_range(split.image(0)[None])
    with torch.no_grad():
        outs = [unet_outputs(model(apply_view(x, v))) for v in range(8)]
    prob = torch.stack([undo_view(torch.softmax(o["logits"], 1)[0, 1], v) for v, o in enumerate(outs)]).mean(0)
    dist = torch.stack([undo_view(torch.sigmoid(o["distance_logits"])[0, 0], v) for v, o in enumerate(outs)]).mean(0)
    np.testing.assert_allclose(probs[0], prob.numpy(), atol=1e-6)
    np.testing.assert_allclose(distances[0], dist.numpy(), atol=1e-6)
    np.testing.assert_array_equal(preds[0], (prob > 0.5).numpy().astype(np.uint8))
    one, _, _ = predict_pixels(model, split, torch.device("cpu"), views=1)
    np.testing.assert_array_equal(one[0], outs[0]["logits"].argmax(1)[0].numpy().astype(np.uint8))
    assert not np.array_equal(probs[0], torch.softmax(outs[0]["logits"], 1)[0, 1].numpy())


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
