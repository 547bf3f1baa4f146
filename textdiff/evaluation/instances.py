"""Instance scoring's plumbing on a cached split: a model's maps brought to the source images'
resolution, the per-nucleus truths that may be scored, and the nucleus rule chosen on validation.

Instances are scored at the source resolution (the MoNuSeg challenge's protocol): a resize model's
maps are upsampled as `textdiff predict` upsamples them (`inference.resize_probability`); a tiles
model's windows are blended as predict blends them (`tiles.blend_tiles`). Images whose label map is
approximate (`data.instances` manifest: APPROX) are never scored, neither on val nor on test.
"""

from __future__ import annotations

import numpy as np
import torch

from textdiff.cache.store import CachedSplit
from textdiff.data.tiles import blend_tiles
from textdiff.model.inference import resize_probability
from textdiff.model.nuclei import RuleChoice, choose_rule


def native_maps(split: CachedSplit, maps: list[np.ndarray]) -> list[np.ndarray]:
    """Per source image, a per-item map (probabilities, distances) at the source resolution."""
    if split.spec.tiled:
        image_ids, index, origins = split.tile_layout()
        full = split.spec.full_size
        out = []
        for k in range(len(image_ids)):
            windows = np.flatnonzero(index == k)
            where = [tuple(map(int, origins[w])) for w in windows]
            out.append(blend_tiles([torch.from_numpy(np.asarray(maps[w], np.float32)) for w in windows], where,
                                   full, full).numpy().astype(np.float32))
        return out
    full = split.spec.full_size
    return [resize_probability(m, (full, full)).astype(np.float32) for m in maps]


def scored_truths(split: CachedSplit) -> list[np.ndarray | None]:
    """Per source image its per-nucleus labels, or None where there are none to score against (a
    cache without instances, an approximate map)."""
    n = len(split.tile_layout()[0]) if split.spec.tiled else len(split)
    if not split.has_instances:
        return [None] * n
    approximate = split.approximate()
    return [None if approximate[k] else split.full_instances(k) for k in range(n)]


def choose_val_rule(val: CachedSplit, probs: list[np.ndarray], distances: list[np.ndarray | None],
                    mpp: float, images: list[np.ndarray] | None = None) -> RuleChoice | None:
    """The nucleus rule of best mean validation AJI (None when val has no true instances);
    `images`, the source images (RGB, their own size) in the order of `native_maps`, let the search
    try the image-guided refinement of the foreground."""
    truths = scored_truths(val)
    keep = [k for k, t in enumerate(truths) if t is not None]
    if not keep or not val.spec.full_size:
        return None
    native_probs = native_maps(val, probs)
    has_head = all(d is not None for d in distances)
    native_dist = native_maps(val, distances) if has_head else [None] * len(native_probs)
    return choose_rule([native_probs[k] for k in keep], [native_dist[k] for k in keep], [truths[k] for k in keep],
                       mpp, [images[k] for k in keep] if images is not None else None)


def source_ids(split: CachedSplit) -> list[str]:
    """The ids of the source images behind a split's items, in the order of `native_maps`."""
    return split.tile_layout()[0] if split.spec.tiled else list(split.ids)
