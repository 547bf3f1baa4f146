"""Whether an input looks like the images a model was trained on: its nuclei's size and its stain.

A model trained on 24 TCGA tiles at 40x meets images from other labs. Two things move it off its
training distribution without any error being raised:

- **magnification**. Told the wrong µm/px, a 20x image is taken for 40x and every nucleus looks half
  its size (`benchmarks/generalise.py`: AJI 59 -> 32). The image itself shows it: the median area
  (µm², at the mpp predict was told) of the nuclei the model separates, over the training nuclei's
  median (recorded in model.json at training). On the 14 MoNuSeg test images told their true mpp
  it is 0.77-1.80 under every condition of the benchmark (scale 0.5x-2x, JPEG, blur, noise, stain,
  256² crops); told the wrong mpp by 2x, 0.47-0.77 (20x read as 40x; the model does not shrink its
  nuclei the full 4x in area) and 1.53-3.53 (80x read as 40x). `SIZE_RATIO_LIMITS` (0.7, 2.0) warn
  on 26 of those 28 images and on none of the 126 told the truth: "is --mpp right?".
- **stain**. The input's own Macenko stain vectors (hematoxylin, eosin; optical density), against
  the reference fitted on the training images (`data.stain: macenko`): the larger of the two angles
  between them, in degrees. Normalisation removes most of a stain difference, and the HED shifts
  measured in `benchmarks/generalise.py` cost nothing. The 44 MoNuSeg images lie 2-13° from the
  reference, the benchmark's degraded test images up to 17.9° (noise of sigma 16 upsets the fit);
  beyond `STAIN_ANGLE_LIMIT` (20°) is beyond every image measured, so the user is told the result
  is not vouched for.

Both limits were set by `benchmarks/out_of_depth.py` (docs/generalise.md#out-of-depth).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from textdiff.data.stain import has_tissue

SIZE_RATIO_LIMITS = (0.7, 2.0)  # median nucleus area / the training nuclei's; measured, see module doc
STAIN_ANGLE_LIMIT = 20.0  # degrees between the input's and the reference's H or E vector; measured
MIN_NUCLEI = 20  # the median size of fewer nuclei says little: no size check below it


def median_nucleus_area(label_maps: Iterable[np.ndarray], mpp: float) -> float:
    """Median area in µm² over every nucleus of every label map (0 = background); 0.0 if none."""
    areas = [np.bincount(np.asarray(m).ravel())[1:] for m in label_maps]
    areas = np.concatenate([a[a > 0] for a in areas]) if areas else np.zeros(0)
    return float(np.median(areas) * mpp**2) if len(areas) else 0.0


def stain_vectors(image: np.ndarray) -> np.ndarray | None:
    """The image's own Macenko stain matrix (3 x 2: the optical-density directions of hematoxylin and
    eosin), as `data.stain: macenko` fits the training images'; None without enough tissue."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3 or not has_tissue(image):
        return None
    try:
        with np.errstate(all="ignore"):
            normalizer = NumpyMacenkoNormalizer()
            normalizer.fit(image)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError, IndexError):
        return None
    vectors = np.asarray(normalizer.HERef, np.float64)
    return vectors if vectors.shape == (3, 2) and np.all(np.isfinite(vectors)) else None


def stain_angle(image: np.ndarray, reference: dict) -> float | None:
    """Degrees between the image's H (and E) vector and the reference's, the larger of the two;
    None when the model has no Macenko reference or the image too little tissue."""
    if reference.get("method") != "macenko":
        return None
    own = stain_vectors(image)
    if own is None:
        return None
    ref = np.asarray(reference["stain_matrix"], np.float64)
    cos = np.sum(own * ref, axis=0) / (np.linalg.norm(own, axis=0) * np.linalg.norm(ref, axis=0))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).max())


@dataclass(frozen=True)
class Familiarity:
    """How far one input is from the training images (None: not measurable for it)."""

    size_ratio: float | None  # median nucleus area (µm², at the mpp it was given) / the training median
    stain_angle: float | None  # degrees, see `stain_angle`

    def warning(self, name: str, mpp: float, mpp_assumed: bool) -> str | None:
        """One line for the user when the input is beyond the measured limits, else None."""
        problems = []
        low, high = SIZE_RATIO_LIMITS
        if self.size_ratio is not None and not low <= self.size_ratio <= high:
            told = "assumed" if mpp_assumed else "given"
            problems.append(f"its nuclei are {self.size_ratio:.2f}x the training nuclei's area at the {told} "
                            f"{mpp:g} µm/px: is --mpp right?")
        if self.stain_angle is not None and self.stain_angle > STAIN_ANGLE_LIMIT:
            problems.append(f"its stain is {self.stain_angle:.0f}° from the training images' (beyond the "
                            f"{STAIN_ANGLE_LIMIT:g}° measured)")
        if not problems:
            return None
        return f"warning: {name} looks unlike the training images: " + "; ".join(problems)

    def to_json(self) -> dict:
        return {"size_ratio": self.size_ratio, "stain_angle": self.stain_angle}


def assess(image: np.ndarray, labels: np.ndarray, mpp: float, training_area_um2: float,
           stain_reference: dict) -> Familiarity:
    """The familiarity of one input image (RGB uint8) and the nuclei separated in it at `mpp`."""
    ratio = None
    if training_area_um2 > 0 and labels.max() >= MIN_NUCLEI:
        ratio = median_nucleus_area([labels], mpp) / training_area_um2
    return Familiarity(ratio, stain_angle(image, stain_reference))


__all__ = ["SIZE_RATIO_LIMITS", "STAIN_ANGLE_LIMIT", "Familiarity", "assess", "median_nucleus_area", "stain_angle",
           "stain_vectors"]
