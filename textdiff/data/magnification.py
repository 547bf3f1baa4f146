"""Magnification: micrometres per pixel (mpp) of the data, of the model, and of a new image.

A nucleus is ~5-10 µm across whatever the image's size, so a model must meet new images at the
resolution it was trained at, not squeezed to its training size: a 3000² crop of a 40× slide holds
9× the nuclei of a 1000² one. `data.mpp` says what the source images are (MoNuSeg, 40×: 0.25);
train records it with the model's **working** resolution (resize protocol: 0.25 × 1000 / 256 =
0.977 µm/px; tiles: 0.25); `textdiff predict` scales every input by input mpp / working mpp.

An image's own mpp comes from `--mpp`, else its TIFF resolution tags when they are plausible for a
microscope (many files carry a screen default of 72 dpi, i.e. 353 µm/px, which is ignored), else the
training source's mpp, which predict says once.
"""

from __future__ import annotations

from pathlib import Path

from textdiff.params import MPP_RANGE  # the range data.mpp is checked against, too

MICRONS_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 = inch, 3 = centimetre


def plausible(mpp: float) -> bool:
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def tiff_mpp(path: Path) -> float | None:
    """µm per pixel from a TIFF's XResolution / ResolutionUnit tags (None: not a TIFF, no tags, or
    a value no microscope gives, such as the 72 dpi screen default)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is None or unit is None:
                return None
            num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
            per_unit = MICRONS_PER_UNIT.get(int(unit.value))
            if per_unit is None or not num or not den:
                return None
            mpp = per_unit * den / num
    except Exception:  # noqa: BLE001 - an unreadable tag is just no information; the image reader reports bad files
        return None
    return mpp if plausible(mpp) else None


def working_mpp(source_mpp: float, mode: str, image_size: int, full_size: int) -> float:
    """The model's working resolution: the source's in tiles mode, the source's times the resize
    factor (full_size / image_size) in resize mode; 0 when unknown (a source of several sizes)."""
    if source_mpp <= 0:
        return 0.0
    if mode == "tiles":
        return source_mpp
    return source_mpp * full_size / image_size if full_size else 0.0


__all__ = ["MPP_RANGE", "plausible", "tiff_mpp", "working_mpp"]
