"""H&E colour: stain shifts in optical-density space (augmentation, the stain-shift benchmark) and
stain normalisation to a reference fitted on the training images.

Why optical density, and why our own two matrix products: Beer-Lambert makes stain amounts add in
OD = -ln(I / 255), and Ruifrok & Johnston's deconvolution (`skimage.color.hed_from_rgb`, whose
constants we use) turns OD into hematoxylin / eosin / DAB concentrations. Tellez et al. (2018, 2019)
define HED augmentation in exactly these natural-log OD units (each concentration `c -> c * (1 + a)
+ b`, `a, b ~ U(-sigma, sigma)`; "HED-light" sigma = 0.05, "HED-strong" sigma = 0.2, the latter
chosen to span the colour variation between their 9 laboratories). `skimage.color.rgb2hed` has
rescaled its output by ln(10^-6) since 0.19, which would change what a given sigma means with the
library version; a transform the cache and the pretrain loop (on the GPU) must reproduce
exactly is better kept to two fixed matrix products here.

Normalisation uses torchstain's numpy Macenko and Reinhard normalisers (a maintained library that
needs nothing beyond numpy, unlike tiatoolbox's dependency stack); we only fit them on many images
and guard them against tiles with (almost) no tissue, where Macenko's eigen-analysis has too few
stained pixels and Reinhard would stretch glass noise into fake tissue: such tiles pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STAIN_METHODS = ("none", "macenko", "reinhard")
# Optical density that counts as stain: Macenko's fit uses pixels reaching it in ALL channels;
# tissue (not glass) is a pixel reaching it in SOME channel (slide tissue detection, glass windows).
OD_TISSUE = 0.15
MIN_TISSUE_FRACTION = 0.05  # below this share of stained pixels an image is left as it is
MIN_TISSUE_PIXELS = 256
FIT_PIXELS_PER_IMAGE = 100_000  # a reference is fitted on an equal random share of every image


def _matrices() -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import hed_from_rgb, rgb_from_hed

    return np.asarray(hed_from_rgb, np.float64), np.asarray(rgb_from_hed, np.float64)


def optical_density(image: np.ndarray) -> np.ndarray:
    """-ln(I / 255) of an RGB uint8 image (0 counted as 1, so OD stays finite)."""
    return -np.log(np.maximum(np.asarray(image, np.float64), 1.0) / 255.0)


def tissue_pixels(image: np.ndarray) -> np.ndarray:
    """Boolean [..., H, W]: pixels of an RGB uint8 image that are not glass (some channel's OD >= 0.15)."""
    return optical_density(image).max(axis=-1) >= OD_TISSUE


def to_hed(image: np.ndarray) -> np.ndarray:
    """Hematoxylin, eosin, DAB concentrations [..., 3] (natural-log OD units) of an RGB uint8 image."""
    hed_from_rgb, _ = _matrices()
    return optical_density(image) @ hed_from_rgb


def from_hed(hed: np.ndarray) -> np.ndarray:
    """The RGB uint8 image of stain concentrations [..., 3] (inverse of `to_hed` up to rounding)."""
    _, rgb_from_hed = _matrices()
    rgb = 255.0 * np.exp(-(hed @ rgb_from_hed))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class StainShift:
    """One stain perturbation: concentration c of stain k becomes c * (1 + scale[k]) + bias[k]."""

    scale: tuple[float, float, float]
    bias: tuple[float, float, float]

    def as_array(self) -> np.ndarray:
        return np.asarray([self.scale, self.bias], np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> StainShift:
        a = np.asarray(a, np.float64).reshape(2, 3)
        return cls(tuple(float(x) for x in a[0]), tuple(float(x) for x in a[1]))  # type: ignore[arg-type]


IDENTITY = StainShift((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


def draw_shift(rng: np.random.Generator, sigma: float) -> StainShift:
    """Tellez et al.'s HED draw: every scale and bias uniform in [-sigma, sigma]."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    values = rng.uniform(-sigma, sigma, size=(2, 3))
    return StainShift.from_array(values)


def apply_shift(image: np.ndarray, shift: StainShift) -> np.ndarray:
    """An RGB uint8 image with its stains perturbed (the identity shift returns a copy unchanged)."""
    if shift == IDENTITY:
        return np.array(image, np.uint8, copy=True)
    hed = to_hed(image)
    hed = hed * (1.0 + np.asarray(shift.scale)) + np.asarray(shift.bias)
    return from_hed(hed)


def jitter_batch(pixels: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """HED jitter of a batch [B, 3, H, W] in 0..255 (float, any device), one draw per image: the
    pretrain loop's on-the-fly version of `draw_shift` + `apply_shift`."""
    hed_from_rgb, rgb_from_hed = (torch.as_tensor(m, dtype=torch.float32, device=pixels.device) for m in _matrices())
    b = pixels.shape[0]
    draws = (torch.rand(b, 2, 3, generator=generator, device=pixels.device) * 2 - 1) * sigma
    od = -torch.log(pixels.clamp(min=1.0) / 255.0)  # [B, 3, H, W]
    hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    hed = hed * (1 + draws[:, 0, :, None, None]) + draws[:, 1, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed)
    return (255.0 * torch.exp(-od)).clamp(0, 255)


# ----------------------------------------------------------------------------------------------
# normalisation


def tissue_fraction(image: np.ndarray) -> float:
    """The share of pixels stained enough for Macenko's estimate (OD >= 0.15 in every channel)."""
    od = optical_density(image).reshape(-1, 3)
    return float(np.mean(np.all(od >= OD_TISSUE, axis=1))) if len(od) else 0.0


def has_tissue(image: np.ndarray) -> bool:
    n = image.shape[0] * image.shape[1]
    fraction = tissue_fraction(image)
    return fraction >= MIN_TISSUE_FRACTION and fraction * n >= MIN_TISSUE_PIXELS


def _pixel_mosaic(images: list[np.ndarray], seed: int) -> np.ndarray:
    """An equal random share of every image's pixels as one [1, n, 3] uint8 "image" to fit on."""
    rng = np.random.default_rng(seed)
    parts = []
    for image in images:
        flat = np.asarray(image, np.uint8).reshape(-1, 3)
        take = min(len(flat), FIT_PIXELS_PER_IMAGE)
        parts.append(flat[rng.choice(len(flat), size=take, replace=False)] if take < len(flat) else flat)
    return np.concatenate(parts)[None]


def method_problem(method: str) -> str | None:
    """data.stain's rule, as one line (None: fine); the prepare stage asks it before reading any image."""
    if method not in STAIN_METHODS:
        return f"data.stain must be one of {', '.join(STAIN_METHODS)}; got {method!r}"
    return None


def fit_reference(method: str, images: list[np.ndarray], seed: int = 0) -> dict:
    """The normalisation target of `method`, fitted on `images` (the training split), as JSON-able
    numbers that travel in the prepared manifest, the cache spec and model.json."""
    if method not in STAIN_METHODS:
        raise ValueError(f"stain method must be one of {STAIN_METHODS}, got {method!r}")
    if method == "none":
        return {}
    if not images:
        raise ValueError("fit_reference: no images")
    mosaic = _pixel_mosaic(images, seed)
    if method == "macenko":
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        normalizer = NumpyMacenkoNormalizer()
        normalizer.fit(mosaic)
        reference = {"stain_matrix": np.asarray(normalizer.HERef).tolist(),
                     "max_concentrations": np.asarray(normalizer.maxCRef).tolist()}
    else:
        from torchstain.numpy.normalizers import NumpyReinhardNormalizer

        normalizer = NumpyReinhardNormalizer()
        normalizer.fit(mosaic)
        reference = {"lab_means": np.asarray(normalizer.target_means).tolist(),
                     "lab_stds": np.asarray(normalizer.target_stds).tolist()}
    flat = np.asarray([x for v in reference.values() for x in np.ravel(v)], np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{method} reference is not finite (the training images hold too little stain)")
    return {"method": method, **reference}


def check_reference(reference: dict) -> str:
    """The method of a stored reference ("none" for {}), after checking that it has its numbers."""
    if not reference:
        return "none"
    method = reference.get("method")
    keys = {"macenko": ("stain_matrix", "max_concentrations"), "reinhard": ("lab_means", "lab_stds")}.get(method)
    if keys is None or any(k not in reference for k in keys):
        raise ValueError(f"not a stain reference: {sorted(reference)}")
    return method


def normalize(image: np.ndarray, reference: dict) -> np.ndarray:
    """An RGB uint8 image brought to the reference's stain appearance.

    Images with too little tissue (`has_tissue`) and any result that is not finite come back
    unchanged: a glass tile has no stain to normalise, and must not become NaNs or invented tissue.
    """
    method = check_reference(reference)
    image = np.asarray(image, np.uint8)
    if method == "none" or image.ndim != 3 or image.shape[-1] != 3 or not has_tissue(image):
        return np.array(image, copy=True)
    try:
        with np.errstate(all="ignore"):
            if method == "macenko":
                from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

                normalizer = NumpyMacenkoNormalizer()
                normalizer.HERef = np.asarray(reference["stain_matrix"], np.float64)
                normalizer.maxCRef = np.asarray(reference["max_concentrations"], np.float64)
                out, _, _ = normalizer.normalize(image, stains=False)
            else:
                from torchstain.numpy.normalizers import NumpyReinhardNormalizer

                normalizer = NumpyReinhardNormalizer()
                normalizer.target_means = np.asarray(reference["lab_means"], np.float64)
                normalizer.target_stds = np.asarray(reference["lab_stds"], np.float64)
                if min(float(np.std(c)) for c in np.moveaxis(image.astype(np.float32), -1, 0)) < 1e-3:
                    return np.array(image, copy=True)
                out = normalizer.normalize(image)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return np.array(image, copy=True)
    out = np.asarray(out)
    if out.shape != image.shape or not np.all(np.isfinite(out)):
        return np.array(image, copy=True)
    return out.astype(np.uint8)


def describe(reference: dict) -> str:
    method = check_reference(reference)
    return "raw colours" if method == "none" else f"{method} stain normalisation"


__all__ = ["IDENTITY", "STAIN_METHODS", "StainShift", "apply_shift", "check_reference", "describe", "draw_shift",
           "fit_reference", "from_hed", "has_tissue", "jitter_batch", "normalize", "tissue_fraction", "to_hed"]

