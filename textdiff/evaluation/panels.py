"""Pictures a person can read: where a segmentation is right and where it is wrong.

One panel per image: image, ground truth, prediction and error map in a 2x2 grid, each upscaled x2 with nearest
neighbours (a nucleus at the 256-px working size is a few pixels: smoothing would hide exactly the
errors one looks for), captioned with the image id and its scores, with a legend. The error map
colours come from the Okabe-Ito palette, which stays distinguishable under the common colour-vision
deficiencies: true positives bluish green, false positives (extra) orange, false negatives
(missed) blue, true negatives black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from textdiff.atomic import atomic_file

TP_COLOUR = (0, 158, 115)  # bluish green
FP_COLOUR = (230, 159, 0)  # orange
FN_COLOUR = (0, 114, 178)  # blue
TN_COLOUR = (0, 0, 0)
PRED_CONTOUR = (255, 0, 255)  # predict's plain overlay (no ground truth)
OUTLINE = (110, 110, 110)  # each nucleus' border on the white masks: a merge shows as one outline round two
LEGEND = (("true positive", TP_COLOUR), ("false positive (extra)", FP_COLOUR), ("false negative (missed)", FN_COLOUR))
COLUMNS = ("image", "ground truth", "prediction", "errors")
_GAP, _HEADER, _LABELS, _FOOTER = 6, 30, 22, 28


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3]: each pixel coloured by TP / FP / FN / TN."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    p, g = pred.astype(bool), gt.astype(bool)
    out = np.zeros((*p.shape, 3), np.uint8)
    out[...] = TN_COLOUR
    out[p & g] = TP_COLOUR
    out[p & ~g] = FP_COLOUR
    out[~p & g] = FN_COLOUR
    return out


def overlay(image: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image with predicted nucleus contours in magenta (when there is no ground truth); `pred`
    a binary mask or a label map (then every separated nucleus has its own contour)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    labels = pred if pred.dtype.kind in "iu" and pred.max(initial=0) > 1 else pred.astype(bool)
    out[find_boundaries(labels, mode="inner")] = PRED_CONTOUR
    return out


def _outlined(tile: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """A mask tile with each labelled nucleus' border drawn on it (labels resized nearest to the tile)."""
    if labels is None:
        return tile
    h, w = tile.shape[:2]
    if labels.shape != (h, w):
        rows = (np.arange(h) * labels.shape[0] // h).clip(0, labels.shape[0] - 1)
        cols = (np.arange(w) * labels.shape[1] // w).clip(0, labels.shape[1] - 1)
        labels = labels[rows][:, cols]
    out = tile.copy()
    out[find_boundaries(labels, mode="inner")] = OUTLINE
    return out


def panel_caption(image_id: str, scores: dict) -> str:
    """The panel's caption: which image, and how good the prediction is (by nuclei when it was
    scored against a per-nucleus truth)."""
    caption = f"{image_id}   Dice {scores['dice']:.3f}   AJI {scores['aji']:.3f}"
    if "aji_instance" in scores:
        caption += (f"   nuclei: AJI {scores['aji_instance']:.3f}  PQ {scores['pq_instance']:.3f}  "
                    f"{scores['nuclei']} found / {scores['nuclei_true']} true")
    return caption


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(bool) * 255).astype(np.uint8)[..., None], 3, axis=2)


def tile_origin(k: int, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) of tile k in the 2x2 grid (image, truth / prediction, errors) of tiles of `size` (h, w)."""
    h, w = size
    row, col = divmod(k, 2)
    return _GAP + col * (w + _GAP), _HEADER + row * (_LABELS + h) + _LABELS


def panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, caption: str, scale: int | None = None,
          gt_labels: np.ndarray | None = None, pred_labels: np.ndarray | None = None) -> np.ndarray:
    """image | ground truth over prediction | error map, upscaled by `scale`, captioned, with a
    legend. A 2x2 grid: at x2 a 256-px image makes a 1,042-px-wide panel that fits a screen.
    `scale=None`: x2 up to 512 px (crisp pixels), x1 above (a page that still fits a screen).
    With label maps (any size: drawn at the panel's), the truth and the prediction show each
    nucleus' outline, so a merge or a split is visible."""
    if scale is None:
        scale = 2 if max(image.shape[:2]) <= 512 else 1
    tiles = [np.asarray(image, np.uint8), _mask_rgb(gt), _mask_rgb(pred), error_map(pred, gt)]
    tiles = [t.repeat(scale, axis=0).repeat(scale, axis=1) for t in tiles]
    tiles[1], tiles[2] = _outlined(tiles[1], gt_labels), _outlined(tiles[2], pred_labels)
    h, w = tiles[0].shape[:2]
    canvas = Image.new("RGB", (2 * w + 3 * _GAP, _HEADER + 2 * (_LABELS + h) + _FOOTER + _GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_GAP, 6), caption, fill=(0, 0, 0), font=_font(16))
    for k, (tile, label) in enumerate(zip(tiles, COLUMNS)):
        x, y = tile_origin(k, (h, w))
        draw.text((x, y - _LABELS + 3), label, fill=(60, 60, 60), font=_font(13))
        canvas.paste(Image.fromarray(tile), (x, y))
    x, y = _GAP, _HEADER + 2 * (_LABELS + h) + 8
    for label, colour in LEGEND:
        draw.rectangle((x, y, x + 12, y + 12), fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, y - 1), label, fill=(0, 0, 0), font=_font(12))
        x += 16 + int(draw.textlength(label, font=_font(12))) + 14
    return np.asarray(canvas)


def save_png(path: Path, array: np.ndarray, format: str | None = None) -> None:
    """Written whole or not at all (a temp file moved in), so a kill never leaves a torn picture
    that looks finished. `format` for paths without an image suffix."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format=format or Image.registered_extensions().get(path.suffix.lower(), "PNG"))
