"""Native-resolution tiling: where windows go, and how overlapping window predictions blend.

The paper resizes MoNuSeg's 1000x1000 tiles to 256x256, which shrinks a nucleus to a few pixels.
In `data.mode: tiles` the teacher instead sees `data.tile`-sized crops at native scale, placed
every `data.stride` pixels with one more window flush with the far edge, so every pixel is seen.
Overlapping predictions are averaged with a Gaussian weight (sigma = tile/8, as nnU-Net does) that
trusts window centres, where the UNet and the decoder have full context, over window borders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TileLayout:
    """Tiles mode: which source image each cached window comes from, and where it sits."""

    image_ids: list[str]
    image_texts: list[str]
    image_index: list[int]  # per window
    origins: list[tuple[int, int]]  # per window, (y, x)
    full_size: int  # the source images' (square) side




def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window origins covering [0, length): every `stride`, plus one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) origins of every window of an image, row by row."""
    return [(y, x) for y in window_starts(height, tile, stride) for x in window_starts(width, tile, stride)]


def gaussian_window(size: int, sigma_fraction: float = 0.125) -> torch.Tensor:
    """[size, size] weights, 1 at the centre, floored above 0 so every pixel keeps a weight."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * (sigma_fraction * size) ** 2))
    w = torch.outer(g, g)
    return (w / w.max()).clamp(min=1e-3).float()


def blend_tiles(probs: list[torch.Tensor | None], origins: list[tuple[int, int]], height: int, width: int,
                tile: int | None = None) -> torch.Tensor:
    """Gaussian-weighted mean of window predictions [..., tile, tile] placed at `origins` -> [..., H, W]
    (leading dims, e.g. a probability and a distance map, are blended alike). A window given as
    None (glass, not segmented) has no weight; pixels only such windows cover get probability 0."""
    if not probs:
        raise ValueError("blend_tiles needs at least one window")
    tile = tile or next(p.shape[-1] for p in probs if p is not None)
    lead = next((tuple(p.shape[:-2]) for p in probs if p is not None), ())
    weight = gaussian_window(tile)
    acc = torch.zeros(*lead, height, width)
    norm = torch.zeros(height, width)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for prob, (y, x) in zip(probs, origins):
        covered[y : y + tile, x : x + tile] = True
        if prob is not None:
            acc[..., y : y + tile, x : x + tile] += weight * prob.float().cpu()
            norm[y : y + tile, x : x + tile] += weight
    if not covered.all():
        raise ValueError("the windows do not cover the whole image")
    return torch.where(norm > 0, acc / norm.clamp_min(1e-12), torch.zeros(()))


def paste_tiles(tiles: list[np.ndarray], origins: list[tuple[int, int]], height: int, width: int) -> np.ndarray:
    """Rebuild an image [H, W, ...] from its windows (overlaps take the later window's pixels)."""
    out = np.zeros((height, width, *tiles[0].shape[2:]), tiles[0].dtype)
    for tile, (y, x) in zip(tiles, origins):
        out[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return out


@dataclass
class Windows:
    """Native-resolution windows of a split: pixels, masks, per-window ids and texts, the layout."""

    images: np.ndarray  # [N, tile, tile, 3] uint8
    masks: np.ndarray  # [N, tile, tile] uint8
    ids: list[str]  # `<image>@<y>,<x>`
    texts: list[str]  # the source image's report
    layout: TileLayout


def cut_tiles(images: np.ndarray, masks: np.ndarray, ids: list[str], texts: list[str], tile: int,
              stride: int) -> Windows:
    """Every window of square images [M, S, S, 3] (and their masks), image by image, row by row."""
    size = images.shape[1]
    grid = tile_grid(size, size, tile, stride)
    tiles, tile_masks, index, origins, tile_ids, tile_texts = [], [], [], [], [], []
    for k in range(len(images)):
        for y, x in grid:
            tiles.append(images[k, y : y + tile, x : x + tile])
            tile_masks.append(masks[k, y : y + tile, x : x + tile])
            index.append(k)
            origins.append((y, x))
            tile_ids.append(f"{ids[k]}@{y},{x}")
            tile_texts.append(texts[k])
    layout = TileLayout(image_ids=list(ids), image_texts=list(texts), image_index=index, origins=origins,
                        full_size=size)
    empty = np.zeros((0, tile, tile, 3), np.uint8)
    return Windows(np.stack(tiles) if tiles else empty, np.stack(tile_masks) if tiles else empty[..., 0],
                   tile_ids, tile_texts, layout)
