"""Per-nucleus ground truth (`data.instances`): one uint16 label map per image, 0 = background.

Layout (MoNuSeg-instances): `<root>/{Train,Val,Test}/<image id>.png`, the image's size, every
nucleus one id; optionally `<root>/manifest.csv` whose `source` column starts with `APPROX` for maps
that are not a true annotation (MoNuSeg's seven "bonus" images: a watershed of the binary mask).
Those may be training targets but are never scored as ground truth.

A map must agree with the binary mask pixel for pixel (`label > 0` == mask): the binary metrics and
the instance metrics then describe the same nuclei, and a map of another image is caught.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from textdiff.data.images import describe, read_file_bytes
from textdiff.errors import TextDiffError

FOLDERS = {"train": "Train", "val": "Val", "test": "Test"}
SUFFIX = ".png"
MANIFEST = "manifest.csv"
MAX_LABEL = 65535  # what a uint16 PNG holds


def instance_path(root: Path, split: str, image_id: str) -> Path:
    return Path(root) / FOLDERS[split] / f"{image_id}{SUFFIX}"


def read_instance_map(path: Path) -> np.ndarray:
    """The label map in `path` as uint16, refused (one line naming the file) when it is not one."""
    return decode_instance_map(path, read_file_bytes(path, "instance map"))


def decode_instance_map(path: Path, data: bytes) -> np.ndarray:
    """`read_instance_map` on bytes already read from `path` (a caller that also hashes them)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            array = np.array(im)
    except Exception as err:  # pillow raises many types for a bad file
        raise TextDiffError(f"{path}: cannot read instance map ({describe(err)})") from None
    if array.ndim != 2:
        raise TextDiffError(f"{path}: instance map has {array.shape[2] if array.ndim == 3 else array.ndim} channels; "
                            "expected one channel of integer labels (a colour rendering is not a label map)")
    if array.dtype.kind == "f":
        raise TextDiffError(f"{path}: instance map holds non-integer values ({array.dtype}); expected integer labels")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.size and array.min() < 0:
        raise TextDiffError(f"{path}: instance map has negative labels (min {int(array.min())})")
    if array.size and int(array.max()) > MAX_LABEL:
        raise TextDiffError(f"{path}: instance map has labels up to {int(array.max())}, above {MAX_LABEL}")
    return array.astype(np.uint16)


def checked_instance_map(path: Path, mask: np.ndarray) -> np.ndarray:
    """The label map of an image whose binary mask is `mask`, checked to describe the same nuclei."""
    labels = read_instance_map(path)
    if labels.shape != mask.shape:
        raise TextDiffError(f"{path}: instance map is {labels.shape[1]}x{labels.shape[0]} but the mask is "
                            f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
    fg, truth = labels > 0, mask > 0
    if not np.array_equal(fg, truth):
        extra, missing = int((fg & ~truth).sum()), int((truth & ~fg).sum())
        raise TextDiffError(f"{path}: the instance map's foreground differs from the mask on {extra + missing} pixels "
                            f"({extra} labelled where the mask is background, {missing} mask pixels unlabelled)")
    return labels


def approximate_ids(root: Path) -> set[str]:
    """Ids whose map is an approximation (manifest.csv `source` starting with APPROX); none
    without a manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return set()
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise TextDiffError(f"{path}: unreadable instance manifest ({describe(err)})") from None
    if rows and not {"id", "source"} <= set(rows[0]):
        raise TextDiffError(f"{path}: instance manifest needs columns 'id' and 'source'")
    return {row["id"] for row in rows if str(row.get("source", "")).startswith("APPROX")}


def nucleus_distance(labels: np.ndarray) -> np.ndarray:
    """Each nucleus' distance to its own border, divided by its largest: 1 at every nucleus' centre,
    falling to ~0 at its edge and where it touches another, 0 outside. The instance target
    (`train.target: distance`, after DIST): its peaks are one per nucleus, so touching nuclei
    that merge in a binary mask keep two seeds. float32, labels' shape."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    inside = (labels > 0) & ~find_boundaries(labels, mode="inner")
    dist = ndimage.distance_transform_edt(inside).astype(np.float32)
    dist[labels > 0] += 1.0  # border pixels 1, so a thin nucleus still has a positive peak
    peak = ndimage.maximum(dist, labels, index=np.arange(int(labels.max()) + 1)).astype(np.float32)
    peak[0] = 1.0
    return np.where(labels > 0, dist / peak[labels], 0.0).astype(np.float32)


def distance_target(labels: np.ndarray, size: int) -> np.ndarray:
    """`nucleus_distance` at the working size (area-averaged, so a nucleus of a few working pixels
    keeps its peak where its centre is). float32 [size, size]."""
    import cv2

    dist = nucleus_distance(labels)
    if dist.shape == (size, size):
        return dist
    return cv2.resize(dist, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
