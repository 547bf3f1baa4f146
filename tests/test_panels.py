"""Error panels and the summary plot's data: the colours mean what the legend says."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from textdiff.evaluation.panels import FN_COLOUR, FP_COLOUR, TN_COLOUR, TP_COLOUR, error_map, panel

runner = CliRunner()


def test_error_map_colours_exactly_the_known_pixels():
    gt = np.zeros((6, 6), np.uint8)
    pred = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:3] = 1  # 4 nucleus pixels
    pred[2:4, 2:4] = 1  # overlaps gt at (2, 2) only
    out = error_map(pred, gt)
    expected = {(2, 2): TP_COLOUR, (1, 1): FN_COLOUR, (1, 2): FN_COLOUR, (2, 1): FN_COLOUR,
                (2, 3): FP_COLOUR, (3, 2): FP_COLOUR, (3, 3): FP_COLOUR}
    for y in range(6):
        for x in range(6):
            assert tuple(out[y, x]) == expected.get((y, x), TN_COLOUR), (y, x)
    assert len({TP_COLOUR, FP_COLOUR, FN_COLOUR, TN_COLOUR}) == 4
    with pytest.raises(ValueError):
        error_map(pred[:5], gt)


def test_panel_shows_the_error_map_crisp_and_upscaled():
    gt = np.zeros((8, 8), np.uint8)
    pred = np.zeros((8, 8), np.uint8)
    gt[0:4, 0:4] = 1
    pred[2:6, 2:6] = 1
    image = np.full((8, 8, 3), 200, np.uint8)
    out = panel(image, gt, pred, "img   Dice 0.250   AJI 0.143", scale=2)
    from textdiff.evaluation.panels import _mask_rgb, tile_origin

    for k, expected in enumerate([image, _mask_rgb(gt), _mask_rgb(pred), error_map(pred, gt)]):
        x0, y0 = tile_origin(k, (16, 16))
        tile = out[y0 : y0 + 16, x0 : x0 + 16]
        np.testing.assert_array_equal(tile, expected.repeat(2, axis=0).repeat(2, axis=1))  # nearest x2, no blending


@pytest.fixture
def evaluated(tiny_project):
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(train={"epochs": 1, "d_model": 16, "heads": 2}, evaluate={"panels": 1})
    assert runner.invoke(app, ["train"]).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    return tiny_project


def test_summary_data_is_one_row_per_image_and_metric(evaluated):
    per_image = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    with open("metrics/summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(per_image)
    for image in per_image:
        dice = [float(r["value"]) for r in rows if r["id"] == image["id"] and r["metric"] == "dice"]
        aji = [float(r["value"]) for r in rows if r["id"] == image["id"] and r["metric"] == "aji"]
        assert dice == [pytest.approx(image["dice"], abs=1e-6)] and aji == [pytest.approx(image["aji"], abs=1e-6)]
    assert [p.name for p in Path("metrics/panels").iterdir()] == ["img_test_0.png"]  # evaluate.panels = 1


def test_predict_with_masks_draws_scored_panels(evaluated, tmp_path):
    root = evaluated.data_root / "Test_Folder"
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(root / "img"), "--out", str(out), "--text", "Many nuclei.",
                                 "--masks", str(root / "labelcol")])
    assert result.exit_code == 0, result.output
    assert "Dice" in result.output and (out / "img_test_0_panel.png").is_file()
    assert not (out / "img_test_0_overlay.png").exists()
    assert np.asarray(Image.open(out / "img_test_0_panel.png")).shape[1] > 4 * 40
    bad = runner.invoke(app, ["predict", str(root / "img"), "--out", str(out), "--text", "x", "--masks",
                              str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and "--masks" in bad.output and "Traceback" not in bad.output
