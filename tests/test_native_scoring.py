"""Every model is scored at native resolution too: a resize model's probabilities are upsampled the
way `textdiff predict` does and compared with the source masks, kept from prepare to evaluate."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.images import read_mask
from textdiff.data.prepared import load_prepared, read_manifest
from textdiff.evaluation.metrics import aji, boundary_f1, iou_dice_textdiff
from textdiff.model.nuclei import NucleusRule
from textdiff.model.refine import refine_probability

runner = CliRunner()


def test_prepare_keeps_the_source_masks_and_the_cache_carries_them(tiny_project):
    test = load_prepared("data/prepared", "test")
    assert test.images.shape[1:3] == (32, 32) and test.native_masks.shape == (2, 40, 40)
    files = read_manifest("data/prepared")["splits"]["test"]["files"]
    for k, image_id in enumerate(test.ids):
        source, _ = read_mask(tiny_project.data_root / files[image_id]["mask"])
        assert np.array_equal(test.native_masks[k], source)
    assert runner.invoke(app, ["extract"]).exit_code == 0
    from textdiff.cache.store import FeatureCache

    cache = FeatureCache("cache/features.zarr")
    assert cache.spec.full_size == 40 and cache.spec.mode == "resize"
    assert np.array_equal(cache.split("test").full_mask(1), test.native_masks[1])


def test_evaluate_scores_at_native_resolution_as_predict_upsamples(tiny_project):
    tiny_project.write_params(train={"epochs": 1, "d_model": 16, "heads": 2})
    for stage in ("extract", "train", "evaluate"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/test.json").read_text())
    rows = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    for key in ("dice_native", "iou_native", "aji_native", "pq_native", "bf1_native"):
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in rows])), key
    native = load_prepared("data/prepared", "test").native_masks
    card = json.loads(Path("models/classifier/model.json").read_text())
    rule = NucleusRule.from_json(card["nuclei"])  # refine_um: chosen on val, maybe 0
    with h5py.File("metrics/predictions.h5") as h5:
        for k, row in enumerate(rows):  # recomputed here from the stored 32-px probabilities
            prob = torch.from_numpy(h5[row["id"]][:])[None, None]
            up = F.interpolate(prob, size=(40, 40), mode="bilinear", align_corners=False)[0, 0].numpy()
            image = np.asarray(Image.open(tiny_project.data_root / "Test_Folder" / "img" / f"{row['id']}.tif")
                               .convert("RGB"))
            up = refine_probability(up, image, rule.refine_um, card["source_mpp"])  # as predict refines
            pred = (up > 0.5).astype(np.uint8)
            dice, iou = iou_dice_textdiff(pred, native[k])
            assert row["dice_native"] == pytest.approx(dice) and row["iou_native"] == pytest.approx(iou)
            assert row["aji_native"] == pytest.approx(aji(pred, native[k]))
            assert row["bf1_native"] == pytest.approx(boundary_f1(pred, native[k], 2.0))


def test_predict_and_evaluate_share_one_upsampling(tiny_project):
    from textdiff.model.inference import resize_probability

    prob = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(prob)[None, None], size=(20, 20), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    assert np.allclose(resize_probability(prob, (20, 20)), expected)
    assert resize_probability(prob, (8, 8)) is not prob and np.array_equal(resize_probability(prob, (8, 8)), prob)
    import inspect

    import textdiff.predict.images as segmenter

    assert "resize_probability(" in inspect.getsource(segmenter.Segmenter)  # predict uses it too
