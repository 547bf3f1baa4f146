"""The out-of-depth check of `textdiff predict`: nucleus size against the training nuclei's, and
stain against the training reference."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.stain import StainShift, apply_shift, fit_reference
from textdiff.model import depth

runner = CliRunner()


def test_the_median_area_counts_every_nucleus_of_every_map_in_square_micrometres():
    a = np.zeros((10, 10), np.int32)
    a[0:2, 0:2] = 1  # 4 px
    a[5:8, 5:8] = 2  # 9 px
    b = np.zeros((10, 10), np.int32)
    b[0:4, 0:4] = 7  # 16 px (labels need not be consecutive)
    assert depth.median_nucleus_area([a, b], mpp=0.5) == pytest.approx(9 * 0.25)
    assert depth.median_nucleus_area([np.zeros((4, 4), np.int32)], mpp=0.5) == 0.0


def _tissue(seed: int = 0) -> np.ndarray:
    """Purple nuclei on pink stroma: two stains, as Macenko expects."""
    rng = np.random.default_rng(seed)
    image = np.empty((128, 128, 3), np.float64)
    image[:] = [225, 150, 190]
    yy, xx = np.mgrid[:128, :128]
    for cy, cx in rng.integers(8, 120, (40, 2)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = [95, 55, 150]
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def test_the_stain_angle_is_small_for_the_training_stain_and_large_for_another():
    image = _tissue()
    reference = fit_reference("macenko", [image])
    assert depth.stain_angle(_tissue(seed=1), reference) < 5
    other = np.ascontiguousarray(image[..., [1, 2, 0]])  # the dyes' colours swapped round
    assert depth.stain_angle(other, reference) > depth.STAIN_ANGLE_LIMIT
    assert depth.stain_angle(image, {}) is None  # no Macenko reference: not measurable
    assert depth.stain_angle(np.full((64, 64, 3), 240, np.uint8), reference) is None  # glass


def test_a_shift_of_the_size_measured_harmless_stays_under_the_limit():
    image = _tissue()
    reference = fit_reference("macenko", [image])
    shifted = apply_shift(image, StainShift((0.2, -0.2, 0.0), (0.0, 0.0, 0.0)))  # HED ±0.2 scale, as measured
    assert depth.stain_angle(shifted, reference) < depth.STAIN_ANGLE_LIMIT


def test_the_warning_names_the_magnification_or_the_stain_and_is_one_line():
    low, high = depth.SIZE_RATIO_LIMITS
    assert depth.Familiarity(1.0, 5.0).warning("a", 0.25, False) is None
    small = depth.Familiarity(low / 2, None).warning("a", 0.25, True)
    assert "--mpp" in small and "assumed 0.25" in small and "\n" not in small
    assert "given" in depth.Familiarity(high * 2, None).warning("a", 0.5, False)
    stain = depth.Familiarity(None, depth.STAIN_ANGLE_LIMIT + 1).warning("a", 0.25, False)
    assert "stain" in stain and "--mpp" not in stain


def test_predict_records_the_check_and_warns_beyond_the_limits(trained, tmp_path, monkeypatch):
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["nucleus_area_um2"] > 0  # train recorded the training nuclei's median area
    image = sorted((trained.data_root / "Test_Folder" / "img").iterdir())[0]
    monkeypatch.setattr(depth, "MIN_NUCLEI", 1)
    monkeypatch.setattr(depth, "SIZE_RATIO_LIMITS", (0.0, float("inf")))  # a tiny random model: any size is fine
    calm = runner.invoke(app, ["predict", str(image), "--out", str(tmp_path / "calm"), "--text", "nuclei"])
    assert calm.exit_code == 0, calm.output
    monkeypatch.setattr(depth, "SIZE_RATIO_LIMITS", (1e6, 2e6))  # nothing is that big: every image warns
    loud = runner.invoke(app, ["predict", str(image), "--out", str(tmp_path / "loud"), "--text", "nuclei"])
    assert loud.exit_code == 0, loud.output
    assert "warning:" not in calm.output and f"warning: {image.stem} looks unlike the training images" in loud.output
    assert "1 image(s) look unlike the training images" in loud.output
    with h5py.File(tmp_path / "loud" / "predictions.h5") as h5:
        attrs = h5[image.stem].attrs
        assert attrs["size_ratio"] > 0 and "--mpp" in attrs["warning"]
