"""The generalisation benchmark's own parts: its degradations and its detection score."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from generalise import central_crop, degradations, detection_f1, resize_labels  # noqa: E402


def _discs(centres, size=64, r=5):
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for k, (y, x) in enumerate(centres, start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = k
    return labels


def test_detection_pairs_centroids_one_to_one_within_the_radius():
    truth = _discs([(15, 15), (15, 45), (45, 30)])
    assert detection_f1(truth, truth, 3.0) == 1.0
    shifted = _discs([(17, 15), (15, 52), (45, 30)])  # one 2 px off (found), one 7 px off (missed)
    assert detection_f1(shifted, truth, 3.0) == pytest.approx(2 * 2 / 6)
    merged = _discs([(15, 30)], r=16)  # one blob for two nuclei: its centroid is near neither
    assert detection_f1(merged, truth[:30], 3.0) == 0.0
    assert detection_f1(np.zeros_like(truth), truth, 3.0) == 0.0
    assert detection_f1(np.zeros_like(truth), np.zeros_like(truth), 3.0) == 1.0
    assert detection_f1(truth, np.where(truth == 1, 0, truth), 3.0) == pytest.approx(2 * 2 / 5)  # labels 2, 3


def test_degradations_change_the_pixels_and_say_the_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (40, 60, 3), dtype=np.uint8)
    by_name = {d.name: d for d in degradations()}
    assert np.array_equal(by_name["none"].transform(image, 0), image)
    half = by_name["scale0.5"]
    assert half.transform(image, 0).shape == (20, 30, 3) and half.factor == 0.5 and half.told_true_mpp
    assert not by_name["scale2-wrong-mpp"].told_true_mpp
    for name in ("jpeg50", "blur2", "noise16", "HED ±0.2", "pale"):
        out = by_name[name].transform(image, 0)
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image), name
    noisy = by_name["noise8"]
    assert np.array_equal(noisy.transform(image, 3), noisy.transform(image, 3))  # seeded per image


def test_labels_are_resized_as_labels():
    labels = _discs([(15, 15), (40, 40)])
    small = resize_labels(labels, (32, 32))
    assert small.shape == (32, 32) and set(np.unique(small)) == {0, 1, 2}


def test_crops_are_central_and_never_larger_than_the_image():
    a = np.arange(100).reshape(10, 10)
    assert np.array_equal(central_crop(a, 4), a[3:7, 3:7])
    assert central_crop(a, 20).shape == (10, 10) and central_crop(a, 0) is a
