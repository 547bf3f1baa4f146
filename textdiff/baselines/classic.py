"""The baselines a pathologist would think of first, scored by the same evaluate code.

`classic`: colour deconvolution + Otsu, no learning and no labels. Hematoxylin stains nuclei, so
the hematoxylin channel of Ruifrok & Johnston's deconvolution (`skimage.color.rgb2hed`) thresholded
by Otsu's method (`skimage.filters.threshold_otsu`, per image) is the textbook nucleus mask. The
one clean-up kept fills holes of up to 15 pixels (`skimage.morphology.remove_small_holes`): chromatin
texture leaves pale specks inside nuclei. Chosen on the train and val splits, never on test
(Dice / AJI %, 256 px): none 75.15 / 28.32 (train), 70.74 / 21.91 (val); holes filled 76.00 / 28.55,
71.72 / 22.55; removing objects under 8 px or an opening with a 1-px disk lowered val Dice.
"""

from __future__ import annotations

import numpy as np

HOLE_MAX_PIXELS = 15


def hematoxylin_otsu(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """A binary nucleus mask (uint8 {0, 1}) of an RGB uint8 image [H, W, 3] (`bgr`: channels in
    OpenCV's order, as the release protocol stores them)."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes

    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got {image.shape}")
    rgb = image[..., ::-1] if bgr else image
    hematoxylin = rgb2hed(rgb)[..., 0]
    if np.ptp(hematoxylin) == 0:  # a blank tile: nothing to threshold
        return np.zeros(image.shape[:2], np.uint8)
    mask = hematoxylin > threshold_otsu(hematoxylin)
    return remove_small_holes(mask, max_size=HOLE_MAX_PIXELS).astype(np.uint8)
