"""The image-guided refinement of the foreground: sharper outlines where the image has them, the
radius chosen on validation images, the same refinement in predict as in evaluate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from textdiff.errors import TextDiffError
from textdiff.model.nuclei import NucleusRule, choose_rule
from textdiff.model.refine import guided_filter, hematoxylin_guide, refine_probability

PINK = (235, 180, 215)  # eosin-stained background
PURPLE = (70, 40, 140)  # a hematoxylin-stained nucleus


def _tile(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(an RGB tile of two touching dark nuclei on pink, their per-nucleus labels)."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    labels[(yy - 48) ** 2 + (xx - 33) ** 2 <= 14**2] = 1
    labels[(yy - 48) ** 2 + (xx - 62) ** 2 <= 14**2] = 2
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PINK
    image[labels > 0] = PURPLE
    return image, labels


def _blurred(labels: np.ndarray, sigma: float = 3.0, grow: int = 2) -> np.ndarray:
    """The foreground as a model at a quarter of the resolution gives it: soft edges, and its 0.5
    outline `grow` px off the true one."""
    mask = ndimage.binary_dilation(labels > 0, iterations=grow) if grow else labels > 0
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_the_guide_is_bright_on_nuclei_and_stretched_to_unit_range():
    image, labels = _tile()
    guide = hematoxylin_guide(image)
    assert guide.dtype == np.float32 and guide.min() >= 0 and guide.max() <= 1
    assert guide[labels > 0].mean() > 0.9 and guide[labels == 0].mean() < 0.1
    assert not hematoxylin_guide(np.full((8, 8, 3), 200, np.uint8)).any()  # flat: no edge to follow


def test_refinement_pulls_soft_outlines_onto_the_image_edges():
    image, labels = _tile()
    truth = labels > 0
    soft = _blurred(labels)
    sharp = refine_probability(soft, image, radius_um=0.75, mpp=0.25)  # 3 px
    assert sharp.dtype == np.float32 and sharp.min() >= 0 and sharp.max() <= 1
    assert _dice(sharp > 0.5, truth) > _dice(soft > 0.5, truth) + 0.05  # 0.97 against 0.89
    # the saddle between the touching nuclei is not invented away: the image has no edge there
    assert sharp[48, 47] > 0.5


def test_a_zero_or_subpixel_radius_leaves_the_map_as_it_is():
    image, labels = _tile()
    soft = _blurred(labels)
    assert np.array_equal(refine_probability(soft, image, 0.0, 0.25), soft)
    assert np.array_equal(refine_probability(soft, image, 0.1, 0.25), soft)  # 0.4 px
    with pytest.raises(ValueError, match="differ in size"):
        refine_probability(soft, image[:50], 0.75, 0.25)


def test_guided_filter_keeps_a_map_that_already_follows_its_guide():
    guide = np.zeros((40, 40), np.float32)
    guide[10:30, 10:30] = 1.0
    out = guided_filter(guide, guide, radius=3, eps=1e-6)
    assert np.abs(out - guide).max() < 1e-3


def test_val_chooses_the_refinement_when_it_scores_better_and_never_without_images():
    image, labels = _tile()
    soft = _blurred(labels)
    with_images = choose_rule([soft], [None], [labels], mpp=0.25, images=[image])
    assert with_images.rule.refine_um > 0
    tried = {r.refine_um for r, _, _ in with_images.tried}
    assert {0.5, 0.75, 1.0} <= tried
    without = choose_rule([soft], [None], [labels], mpp=0.25)
    assert without.rule.refine_um == 0 and {r.refine_um for r, _, _ in without.tried} == {0.0}
    assert with_images.score > without.score


def test_a_rule_with_a_negative_radius_is_refused_and_old_rules_load_without_one():
    with pytest.raises(TextDiffError, match="invalid nucleus rule"):
        NucleusRule("edt", 0.5, refine_um=-1.0)
    old = {"seeds": "distance", "marker": 0.08, "min_area_um2": 4.0, "foreground": 0.5}  # a model.json before
    assert NucleusRule.from_json(old).refine_um == 0.0
