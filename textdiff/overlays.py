"""Pictures a person checks first: the image with ground-truth and predicted nucleus contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 255)


def overlay(image: np.ndarray, pred: np.ndarray | None = None, gt: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image with GT contours in green and predicted contours in magenta."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if gt is not None:
        out[find_boundaries(gt.astype(bool), mode="inner")] = GT_COLOUR
    if pred is not None:
        out[find_boundaries(pred.astype(bool), mode="inner")] = PRED_COLOUR
    return out


def save_png(path: Path, array: np.ndarray, format: str | None = None) -> None:
    """`format` for paths without a .png suffix (atomic temp files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)
