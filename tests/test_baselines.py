"""The colour-deconvolution baseline finds hematoxylin-stained blobs, not eosin, and survives blank tiles."""

import numpy as np

from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.evaluation.metrics import iou_dice_textdiff


def _synthetic_he(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink (eosin-like) background with purple-blue (hematoxylin-like) discs and a few pink
    'cytoplasm' patches that a wrong channel would pick up."""
    rng = np.random.default_rng(seed)
    image = np.empty((96, 96, 3), np.float64)
    image[:] = (235, 170, 200)  # eosin pink
    yy, xx = np.mgrid[0:96, 0:96]
    truth = np.zeros((96, 96), np.uint8)
    for _ in range(12):
        cy, cx, r = rng.integers(8, 88), rng.integers(8, 88), rng.integers(3, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        truth[disc] = 1
        image[disc] = (70, 50, 140)  # hematoxylin purple-blue
    for _ in range(4):
        cy, cx = rng.integers(8, 88), rng.integers(8, 88)
        patch = (np.abs(yy - cy) < 5) & (np.abs(xx - cx) < 5) & (truth == 0)
        image[patch] = (200, 90, 150)  # a darker eosin patch: not a nucleus
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_the_hematoxylin_channel_finds_the_nuclei_not_the_eosin():
    image, truth = _synthetic_he()
    mask = hematoxylin_otsu(image)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    dice, _ = iou_dice_textdiff(mask, truth)
    assert dice > 0.9, dice
    assert np.array_equal(hematoxylin_otsu(np.ascontiguousarray(image[..., ::-1]), bgr=True), mask)


def test_a_blank_tile_gives_an_empty_mask():
    assert hematoxylin_otsu(np.full((16, 16, 3), 240, np.uint8)).sum() == 0
