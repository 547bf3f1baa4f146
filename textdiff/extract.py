"""Stage one's work: run the teacher once per image, view and timestep into the zarr cache.

The expensive part of TextDiff is the UNet forward pass; the release recomputes it every epoch. Here
it runs exactly once per (image, view, step): an image's arrays are written, then its `complete`
flag, so an interrupted run resumes at the first unflagged image and never recomputes a finished one.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import zarr
from tqdm import tqdm

from textdiff.cache import SplitSpec, TileLayout, to_storage
from textdiff.views import apply_view


def data_fingerprint(ids: list[str], texts: list[str], images: np.ndarray, masks: np.ndarray) -> str:
    """sha256 of exactly what the teacher and the text encoder will see for one split."""
    h = hashlib.sha256()
    for value in (*ids, "\0", *texts):
        h.update(value.encode() + b"\0")
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(masks).tobytes())
    return h.hexdigest()


def images_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the range the DDPM was trained on."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def write_text(group: zarr.Group, tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray,
               spec: SplitSpec | None = None, full_masks: np.ndarray | None = None) -> None:
    """The per-split arrays written once (text; in tiles mode also the window layout), then the
    flag that says they are complete."""
    group["text_tokens"][:] = tokens
    group["text_mask"][:] = mask
    group["text_pooled"][:] = pooled
    if spec is not None and spec.tiles is not None:
        group["tile_image"][:] = np.asarray(spec.tiles.image_index, np.int32)
        group["tile_origin"][:] = np.asarray(spec.tiles.origins, np.int32).reshape(-1, 2)
        group["full_masks"][:] = full_masks
    group.attrs["text_complete"] = True


def cut_tiles(images: np.ndarray, masks: np.ndarray, ids: list[str], texts: list[str], tile: int,
              stride: int) -> tuple[np.ndarray, np.ndarray, TileLayout, list[str], list[str]]:
    """Native-resolution windows of square images [N, S, S, 3]: tiles, their masks, the layout,
    and per-window ids (`<image>@<y>,<x>`) and texts (the image's report)."""
    from textdiff.tiles import tile_grid

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
    return (np.stack(tiles) if tiles else empty, np.stack(tile_masks) if tiles else empty[..., 0],
            layout, tile_ids, tile_texts)


def extract_split(
    group: zarr.Group,
    spec: SplitSpec,
    images: np.ndarray,
    masks: np.ndarray,
    extractor,
    batch_size: int,
    device: torch.device,
    desc: str = "",
) -> dict:
    """Fill every unflagged image of one split; returns counts and timing for the summary."""
    todo = np.flatnonzero(group["complete"][:] == 0)
    views = spec.views
    started = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc=desc, dynamic_ncols=True, disable=len(todo) == 0) as bar:
        for start in range(0, len(todo), batch_size):
            index = todo[start : start + batch_size]
            x = images_to_model_range(images[index])
            m = torch.from_numpy(np.ascontiguousarray(masks[index]))
            x_views = torch.stack([apply_view(x, v) for v in range(views)], dim=1)
            m_views = torch.stack([apply_view(m, v) for v in range(views)], dim=1)
            feats = extractor(x_views.flatten(0, 1).to(device))
            for j, i in enumerate(index):
                for b, f in feats.items():
                    per_image = f.unflatten(0, (len(index), views))[j]
                    group[f"block_{b}"][int(i)] = to_storage(per_image, spec.dtype)
                group["masks"][int(i)] = m_views[j].numpy()
                group["images"][int(i)] = images[i]
                group["complete"][int(i)] = 1  # last: image i now counts
            bar.update(len(index))
    seconds = time.perf_counter() - started
    return {"done": int(len(todo)), "skipped": int(spec.n - len(todo)), "seconds": seconds}
