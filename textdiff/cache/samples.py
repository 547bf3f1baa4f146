"""Training's view of a cached split: one image's features, mask and report embedding, held in
RAM when the split is small enough, and stacked into batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textdiff.cache.store import CachedSplit
from textdiff.data.views import apply_view


@dataclass
class FeatureSample:
    """One cached image as training reads it."""

    features: list[torch.Tensor]  # per block [views, steps, C, H, W]
    mask: torch.Tensor  # [views, H, W] uint8
    tokens: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor
    distance: torch.Tensor | None = None  # [views, H, W] float16, the instance target (caches with instances)


PRELOAD_BYTES = 6 * 2**30  # keep a split in RAM below this: zarr decompression would dominate an epoch


class SampleStore:
    """One split's samples, in RAM when small enough, else read from zarr on demand.

    `views` holds only an image's first views (None: all it has): training's per-epoch validation
    reads view 0 of val images that also hold 8 test-time views, and must not keep 8x their
    features in RAM for nothing."""

    def __init__(self, split: CachedSplit, indices: list[int] | None = None, views: int | None = None):
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)
        self.views = views
        total = split.view_layout.total  # a selection's layout is training's: its estimate stays whole
        per_image = split.feature_bytes() * min(views or total, total) // total
        self.cached: dict[int, FeatureSample] | None = {} if per_image * len(self.indices) < PRELOAD_BYTES else None

    def __len__(self) -> int:
        return len(self.indices)

    def _check_view(self, view: int) -> None:
        if self.views is not None and view >= self.views:
            raise IndexError(f"view {view} is beyond the {self.views} this store holds")

    def get_view(self, position: int, view: int) -> FeatureSample:
        """One view of one image, as a one-view sample: a split too large for RAM reads only that
        view from zarr (with 8 dihedral views and rotated copies, an image is 12x its own size)."""
        self._check_view(view)
        if self.cached is not None:
            full = self.get(position)
            return FeatureSample([f[view : view + 1] for f in full.features], full.mask[view : view + 1],
                                 full.tokens, full.text_mask, full.pooled,
                                 full.distance[view : view + 1] if full.distance is not None else None)
        i = self.indices[position]
        tokens, text_mask, pooled = self.split.text(i)
        distance = self.split.distance(i, view)[None] if self.split.has_instances else None
        return FeatureSample([f[None] for f in self.split.features(i, view)], self.split.mask(i, view)[None],
                             tokens, text_mask, pooled, distance)

    def mask(self, position: int, view: int = 0) -> torch.Tensor:
        """One view's mask [H, W] alone: a split too large for RAM reads no features for it."""
        self._check_view(view)
        if self.cached is not None:
            return self.get(position).mask[view]
        return self.split.mask(self.indices[position], view)

    def get(self, position: int) -> FeatureSample:
        i = self.indices[position]
        if self.cached is not None and i in self.cached:
            return self.cached[i]
        tokens, text_mask, pooled = self.split.text(i)
        held = None if self.views is None else slice(0, self.views)
        distance = self.split.distance(i, held) if self.split.has_instances else None
        sample = FeatureSample(self.split.features(i, held), self.split.mask(i, held), tokens, text_mask, pooled,
                               distance)
        if self.cached is not None:
            self.cached[i] = sample
        return sample


def batch_of(samples: list[FeatureSample], views: list[int], jitter: list[int], device: torch.device):
    """Stack samples (one chosen cached view each, then an optional tensor-level dihedral op)."""
    feats = []
    for k in range(len(samples[0].features)):
        per = [apply_view(s.features[k][v], j) for s, v, j in zip(samples, views, jitter)]
        feats.append(torch.stack(per).to(device, non_blocking=True))
    mask = torch.stack([apply_view(s.mask[v], j) for s, v, j in zip(samples, views, jitter)])
    tokens = torch.stack([s.tokens for s in samples]).to(device)
    text_mask = torch.stack([s.text_mask for s in samples]).to(device)
    pooled = torch.stack([s.pooled for s in samples]).to(device)
    return feats, mask.long().to(device), tokens, text_mask, pooled


def distance_batch(samples: list[FeatureSample], views: list[int], jitter: list[int],
                   device: torch.device) -> torch.Tensor | None:
    """The instance targets [B, H, W] float32 of the samples, viewed as `batch_of` views their masks
    (None when the cache has none)."""
    if any(s.distance is None for s in samples):
        return None
    return torch.stack([apply_view(s.distance[v], j) for s, v, j in zip(samples, views, jitter)]).float().to(device)
