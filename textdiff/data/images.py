"""Decoding one image or mask file, with one-line errors that name the file.

Every reader of pixels goes through here (the dataset reader, pretraining's extra images,
`textdiff predict`), so a 16-bit scan, a truncated TIFF or a colour mask is refused the same way
everywhere instead of being silently converted.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from textdiff.errors import TextDiffError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")

# PIL modes that convert to RGB without inventing or losing colour information (alpha is dropped).
_RGB_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"}


def image_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files directly in `folder`, sorted by name; hidden files and other suffixes are
    skipped. The one folder scan of the dataset reader, pretraining's extra images and predict."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))



def read_file_bytes(path: Path, what: str) -> bytes:
    """The bytes of one file, refused in one line when unreadable or empty."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextDiffError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not data:
        raise TextDiffError(f"{path}: {what} file is empty (0 bytes)")
    return data


def describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _decode(path: Path, data: bytes, what: str) -> Image.Image:
    """Fully decode an image file with pillow (so truncation shows up now, not later)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            deep = _sixteen_bit_colour(im)
            im.load()  # the first frame of a multi-page TIFF
            decoded = im.copy()
    except Exception as err:  # pillow raises many types for bad files: OSError, ValueError, SyntaxError...
        pil_error = err
    else:
        if deep and what == "image":
            raise TextDiffError(f"{path}: 16-bit-per-channel colour image (expected 8-bit RGB; pillow would keep "
                                "only the high byte, so convert it to 8 bits yourself)")
        return decoded
    if path.suffix.lower() in (".tif", ".tiff"):
        # Some TIFF encodings pillow cannot decode; tifffile can.
        try:
            import tifffile

            array = tifffile.imread(io.BytesIO(data), key=0)
            return _array_to_pil(path, array, what)
        except TextDiffError:
            raise
        except Exception:
            pass
    if isinstance(pil_error, UnidentifiedImageError):
        raise TextDiffError(f"{path}: cannot read {what} (not a PNG/TIFF or other image file pillow knows)") from None
    raise TextDiffError(f"{path}: cannot read {what} ({describe(pil_error)})") from None


def _sixteen_bit_colour(im: Image.Image) -> bool:
    """Pillow opens 16-bit RGB PNG/TIFF files as mode RGB and silently drops the low byte (a 12-bit
    scan comes out nearly black); only the undecoded tiles' raw mode ("RGB;16L") tells."""
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode and rawmode.startswith(("RGB", "BGR")):
            return True
    return False


def _array_to_pil(path: Path, array: np.ndarray, what: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise TextDiffError(f"{path}: unsupported {what} data type {array.dtype} (expected 8-bit)")
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
    raise TextDiffError(f"{path}: unsupported {what} shape {array.shape}")


def read_image(path: str | Path) -> tuple[np.ndarray, str]:
    """One image file as (H, W, 3) uint8 RGB, and the sha256 of its bytes. Grayscale and palette
    images are converted to RGB, an alpha channel is dropped; 16-bit or float images are refused."""
    path = Path(path)
    data = read_file_bytes(path, "image")
    im = _decode(path, data, "image")
    if im.mode not in _RGB_MODES:
        raise TextDiffError(
            f"{path}: unsupported image mode {im.mode} (expected 8-bit RGB, RGBA, grayscale or palette)"
        )
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")  # the alpha channel is dropped below, not composited
    array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if array.size == 0:
        raise TextDiffError(f"{path}: image has no pixels ({im.size[0]}x{im.size[1]})")
    return np.ascontiguousarray(array), hashlib.sha256(data).hexdigest()


def read_mask(path: str | Path) -> tuple[np.ndarray, str]:
    """One mask file as (H, W) uint8 in {0, 1}, and the sha256 of its bytes. Values must be a subset
    of {0, 255} or of {0, 1}; a colour mask is accepted only when its channels agree."""
    path = Path(path)
    data = read_file_bytes(path, "mask")
    im = _decode(path, data, "mask")
    if im.mode in ("P", "PA"):
        im = im.convert("RGB")  # palette indices mean nothing; the colours do
    elif im.mode == "LA":
        im = im.getchannel("L")
    if im.mode == "1":
        array = np.asarray(im, dtype=np.uint8)
    else:
        array = np.asarray(im)
    if array.ndim == 3:
        channels = array[..., : min(3, array.shape[2])]
        if not all(np.array_equal(channels[..., 0], channels[..., c]) for c in range(1, channels.shape[2])):
            raise TextDiffError(f"{path}: mask has colour (its channels differ); expected a binary grayscale mask")
        array = channels[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise TextDiffError(f"{path}: unsupported mask shape {array.shape}")
    if array.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        values = np.unique(array)
    found = {int(v) for v in values}
    if found <= {0, 1}:
        mask = array.astype(np.uint8)
    elif found <= {0, 255}:
        mask = (array == 255).astype(np.uint8)
    else:
        shown = ", ".join(str(v) for v in sorted(found)[:8]) + (", ..." if len(found) > 8 else "")
        raise TextDiffError(
            f"{path}: mask is not binary: found values {shown} ({len(found)} distinct); "
            "expected 0/255 or 0/1"
        )
    return np.ascontiguousarray(mask), hashlib.sha256(data).hexdigest()
