"""Bringing an image to the size the teacher works at, as our protocol or the released code does.

prepare and `textdiff predict` both go through `to_working_size`, so a model meets new images
exactly as it met its training images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from textdiff.data.dataset import Sample

PROTOCOLS = ("project", "release")


def release_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The released code's ground truth: the 0/255 mask resized bilinearly (OpenCV's default
    INTER_LINEAR), then every non-zero pixel taken as nucleus, which dilates the nuclei by up to a
    pixel. The paper's Dice was scored against these masks."""
    import cv2

    resized = cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8) * 255, (size, size))
    return (resized > 0).astype(np.uint8)


def release_image(image: np.ndarray, size: int) -> np.ndarray:
    """The released code's teacher input: `cv2.imread` order (BGR, never converted) resized with
    OpenCV's default bilinear interpolation, no antialiasing."""
    return to_working_size(image, (size, size), "release")


def to_working_size(image: np.ndarray, size: tuple[int, int], protocol: str = "project") -> np.ndarray:
    """An RGB uint8 image as the teacher sees it at `size` (height, width): `project` resizes it
    bicubic (PIL); `release` turns it into `cv2.imread`'s BGR order and resizes it bilinear
    (OpenCV's default), as the released code does. prepare and `textdiff predict` both use this,
    so a model meets new images exactly as it met its training images."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    height, width = size
    if protocol == "release":
        import cv2

        bgr = np.ascontiguousarray(image[..., ::-1])
        return bgr if bgr.shape[:2] == (height, width) else cv2.resize(bgr, (width, height))
    if image.shape[:2] == (height, width):
        return np.array(image, dtype=np.uint8, copy=True)
    # np.array, not asarray: PIL's buffer is read-only, and torch.from_numpy warns on it.
    return np.array(Image.fromarray(image, "RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def resize_sample(sample: Sample, size: int, protocol: str = "project") -> Sample:
    """A copy of `sample` at size x size, with its release ground truth.

    `project`: the image bicubic RGB (PIL), the mask nearest (stays {0,1}). `release`: image and
    mask exactly as the released TextDiff code prepares them (`release_image`, `release_mask`).
    Non-square images are squashed, as the published 256x256 protocol does."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    image = to_working_size(sample.image, (size, size), protocol)
    dilated = release_mask(sample.mask, size)
    if protocol == "release":
        mask = dilated
    else:
        mask = np.asarray(Image.fromarray(sample.mask, "L").resize((size, size), Image.Resampling.NEAREST))
    return Sample(
        id=sample.id,
        image=np.asarray(image, dtype=np.uint8).copy(),
        mask=np.asarray(mask, dtype=np.uint8).copy(),
        release_mask=dilated,
        native_mask=sample.mask,
        text=sample.text,
        image_path=sample.image_path,
        mask_path=sample.mask_path,
        image_sha256=sample.image_sha256,
        mask_sha256=sample.mask_sha256,
        instances=sample.instances,
        approximate=sample.approximate,
    )
