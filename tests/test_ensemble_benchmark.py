"""The ensemble benchmark's averaging: members' maps meet exactly as a model's views do."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ensemble import averaged  # noqa: E402


def _member(probs, distances):
    return {"maps": {"val": (probs, distances)}}


def test_the_ensemble_is_the_pixelwise_mean_of_its_members():
    rng = np.random.default_rng(0)
    a = [rng.random((8, 8), dtype=np.float32) for _ in range(2)]
    b = [rng.random((8, 8), dtype=np.float32) for _ in range(2)]
    da = [rng.random((8, 8), dtype=np.float32) for _ in range(2)]
    db = [rng.random((8, 8), dtype=np.float32) for _ in range(2)]
    probs, distances = averaged([_member(a, da), _member(b, db)], "val")
    for k in range(2):
        np.testing.assert_allclose(probs[k], (a[k] + b[k]) / 2, rtol=1e-6)
        np.testing.assert_allclose(distances[k], (da[k] + db[k]) / 2, rtol=1e-6)


def test_one_member_is_itself_and_a_model_without_the_head_has_no_distances():
    p = [np.full((4, 4), 0.3, np.float32)]
    probs, distances = averaged([_member(p, [None])], "val")
    assert probs[0] == pytest.approx(p[0])
    assert distances == [None]
