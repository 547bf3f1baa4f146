"""Magnification: data.mpp -> model.json's working resolution -> predict scales every input to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.magnification import tiff_mpp, working_mpp

runner = CliRunner()


def test_working_resolution_of_each_protocol():
    assert working_mpp(0.25, "resize", 256, 1000) == pytest.approx(0.9765625)
    assert working_mpp(0.25, "tiles", 256, 1000) == 0.25
    assert working_mpp(0.25, "resize", 256, 0) == 0.0  # sources of several sizes: unknown


def test_tiff_resolution_tags_are_read_when_a_microscope_could_have_them(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    tifffile.imwrite(tmp_path / "40x.tif", image, resolution=(40_000, 40_000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", image, resolution=(101_600, 101_600), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "screen.tif", image, resolution=(72, 72), resolutionunit="INCH")
    Image.fromarray(image).save(tmp_path / "plain.png")
    assert tiff_mpp(tmp_path / "40x.tif") == pytest.approx(0.25)
    assert tiff_mpp(tmp_path / "inch.tif") == pytest.approx(0.25)
    assert tiff_mpp(tmp_path / "screen.tif") is None  # 72 dpi = 353 µm/px: a screen default, ignored
    assert tiff_mpp(tmp_path / "plain.png") is None


def test_predict_brings_every_image_to_the_working_resolution(trained, tmp_path, monkeypatch):
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["source_mpp"] == 0.25 and card["working_mpp"] == pytest.approx(0.25 * 40 / 32)  # 40 px -> 32 px

    import textdiff.predict.images as segmenter_module

    seen = []
    real = segmenter_module.sliding_window

    def spy(image, tile, stride, predict_windows, batch_size=1):
        seen.append((tuple(image.shape[1:]), tile, stride))
        return real(image, tile, stride, predict_windows, batch_size)

    monkeypatch.setattr(segmenter_module, "sliding_window", spy)
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "small.png")
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(folder / "large.png")
    tifffile.imwrite(folder / "tagged.tif", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
                     resolution=(20_000, 20_000), resolutionunit="CENTIMETER")  # 0.5 µm/px: 20x

    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "o1"), "--text", "x"])
    assert result.exit_code == 0, result.output
    sizes = {shape for shape, _, _ in seen}
    # large (120 px at the assumed 0.25) -> 96 px, slid in 32-px windows; small -> 32; 20x tif -> 64
    assert sizes == {(96, 96), (32, 32), (64, 64)}
    assert "2 image(s) with no usable resolution tags" in result.output and "0.25 µm/px" in result.output

    seen.clear()
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "o2"),
                                "--text", "x", "--resize-whole"])
    assert result.exit_code == 0 and {shape for shape, _, _ in seen} == {(32, 32)}
    seen.clear()
    result = runner.invoke(app, ["predict", str(folder / "small.png"), "--out", str(tmp_path / "o3"), "--text", "x",
                                 "--mpp", "0.125"])
    assert result.exit_code == 0 and {shape for shape, _, _ in seen} == {(16, 16)}  # padded up to one window

    bad = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "o4"), "--text", "x", "--mpp", "353"])
    assert bad.exit_code == 1 and "--mpp is micrometres per pixel" in bad.output and "Traceback" not in bad.output
    both = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "o5"), "--text", "x", "--mpp", "0.25",
                               "--scale", "0.5"])
    assert both.exit_code == 1 and "one of --scale, --mpp and --resize-whole" in both.output
