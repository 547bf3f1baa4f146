"""The foreground probability sharpened by the image itself at its own resolution.

The classifier's maps live at the working size (256² for a 1000² MoNuSeg tile, a nucleus about
5 px across) and are upsampled bilinearly to the image, so every outline is a smooth ramp four
source pixels wide. A guided filter (He, Sun & Tang, ECCV 2010) re-fits the probability, window by
window, as a linear function of the image's hematoxylin density: where the map is uncertain at an
outline, the dark edge of the nucleus in the source pixels decides. No learning; the radius (in
micrometres, so one rule holds at any magnification) is chosen on validation images with the rest
of the nucleus rule (`model.nuclei.choose_rule`), 0 = off.

Written here rather than taken from a library: OpenCV's `ximgproc.guidedFilter` lives in the
opencv-contrib build, which conflicts with the opencv-python wheel the project installs; the filter
is four box filters (OpenCV's `boxFilter`).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-3  # the filter's regulariser, on a guide stretched to [0, 1] (1e-4 and 1e-3 scored alike on val)
GUIDE_PERCENTILES = (1.0, 99.0)  # the hematoxylin density stretched between these, per image


def hematoxylin_guide(image: np.ndarray) -> np.ndarray:
    """[H, W] float32 in [0, 1]: the hematoxylin optical density (Ruifrok & Johnston's deconvolution,
    `skimage.color.rgb2hed`) of an RGB uint8 image, stretched between its own percentiles so a
    paler or darker stain gives the same guide (the filter is local and linear in it)."""
    from skimage.color import rgb2hed

    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got {image.shape}")
    h = rgb2hed(np.ascontiguousarray(image[..., :3]))[..., 0].astype(np.float32)
    lo, hi = np.percentile(h, GUIDE_PERCENTILES)
    if hi - lo <= 1e-6:  # a flat tile: no edge to follow
        return np.zeros(h.shape, np.float32)
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float = EPS) -> np.ndarray:
    """He et al.'s guided filter of `source` by the grey `guide` (same [H, W]), window (2r+1)²."""
    import cv2

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)

    guide = np.asarray(guide, np.float32)
    source = np.asarray(source, np.float32)
    mean_i, mean_p = box(guide), box(source)
    a = (box(guide * source) - mean_i * mean_p) / (box(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def refine_probability(prob: np.ndarray, image: np.ndarray, radius_um: float, mpp: float) -> np.ndarray:
    """`prob` ([H, W], the image's own size) refined by the image's hematoxylin edges within
    `radius_um` micrometres (`mpp`: micrometres per pixel of both); unchanged when the radius is 0
    or under half a pixel. Pixels the model left at exactly 0 stay 0: a softmax never gives 0, so
    they are glass that `textdiff predict` kept from the classifier, and the filter must not spread
    the tissue's probability onto them."""
    radius = round(radius_um / mpp) if radius_um > 0 and mpp > 0 else 0
    prob = np.asarray(prob, np.float32)
    if radius < 1:
        return prob
    if image.shape[:2] != prob.shape:
        raise ValueError(f"image {image.shape[:2]} and probability map {prob.shape} differ in size")
    refined = np.clip(guided_filter(hematoxylin_guide(image), prob, radius), 0.0, 1.0)
    return np.where(prob == 0.0, 0.0, refined).astype(np.float32)


__all__ = ["guided_filter", "hematoxylin_guide", "refine_probability"]
