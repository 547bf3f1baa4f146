"""Random training crops for the teacher, drawn where the model trains.

A GPU trains a 20 M-parameter ADM at hundreds of crops per second; a Python loop of per-crop
slicing on the CPU (the old sampler: 4.5 ms per batch of 32) and a host-to-device copy per step
cannot keep up. Here the whole image stack lives on the training device, every random number comes
from one seeded generator on that device, and a batch is built with a handful of batched tensor
operations: no per-crop Python, no host synchronisation.

Two paths:
- exact crops (no scale jitter, images already at the working resolution): integer windows
  gathered by index, bit-identical pixels, then one of the 8 dihedral views;
- scale jitter: each crop gets its own zoom ``scale * 2**U(-jitter, jitter)`` around the image's
  working scale (working pixels per source pixel, e.g. 256/1000 for MoNuSeg), and is resampled from
  the *source-resolution* images, so a zoomed-in crop is sharp rather than an upsampled 256² image.
  Downsampling is mip-mapped: a pyramid of the source (antialiased halvings) is built once; each
  crop is sampled bilinearly from every level and the level whose residual zoom lies in (1/2, 1]
  is kept, so no crop is ever decimated by more than 2x without a low-pass (aliasing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from textdiff.data.stain import jitter_batch
from textdiff.data.views import NUM_VIEWS, apply_view
from textdiff.errors import TextDiffError


def _as_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """A stack [N, H, W, 3] or a list of [H, W, 3] images (sizes may differ) as a checked list."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise TextDiffError(f"pretrain needs [N, H, W, 3] images or a list of [H, W, 3] ones, got shape {images.shape}")
    items = list(images)
    if not items:
        raise TextDiffError("pretrain needs at least one image, got none")
    for k, image in enumerate(items):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise TextDiffError(f"pretrain image {k}: expected [H, W, 3] uint8, got {image.shape} {image.dtype}")
    return items


class CropSampler:
    """Batches of random ``crop``² training crops in the model's [-1, 1] range, on `device`.

    `scales[i]`: working pixels per source pixel of image i (1.0 = already at working size).
    `jitter`: half-width, in octaves, of the random zoom around that scale (0 = none).
    `stain_jitter`: HED stain jitter sigma of every crop (`stain.jitter_batch`; 0 = none).
    The generator `gen` also serves the training loop's timesteps and noise, so one saved state
    resumes the whole random stream.
    """

    def __init__(self, images: np.ndarray | Sequence[np.ndarray], crop: int, seed: int,
                 device: torch.device | str = "cpu", scales: Sequence[float] | None = None,
                 jitter: float = 0.0, stain_jitter: float = 0.0):
        items = _as_list(images)
        self.stain_jitter = float(stain_jitter)
        self.device = torch.device(device)
        self.crop = int(crop)
        self.jitter = float(jitter)
        scales = [1.0] * len(items) if scales is None else [float(s) for s in scales]
        if len(scales) != len(items) or any(not s > 0 for s in scales):
            raise TextDiffError(f"pretrain: need one positive scale per image, got {len(scales)} for {len(items)}")
        if self.jitter < 0:
            raise TextDiffError(f"pretrain.scale_jitter must be >= 0, got {jitter}")
        self.exact = self.jitter == 0 and all(s == 1.0 for s in scales)
        sizes = np.array([im.shape[:2] for im in items])
        for k, ((h, w), s) in enumerate(zip(sizes, scales)):
            if min(h, w) * s < self.crop:
                raise TextDiffError(
                    f"pretrain image {k} ({h}x{w} at scale {s:.3g}) is smaller than the {self.crop}px crops "
                    "(pretrain.config image_size is the crop size)")
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))
        self.sizes = torch.as_tensor(sizes, dtype=torch.float32, device=self.device)  # [N, 2] (h, w)
        self.scales = torch.as_tensor(scales, dtype=torch.float32, device=self.device)
        height, width = sizes.max(axis=0)
        if self.exact:
            stack = np.zeros((len(items), height, width, 3), np.uint8)
            for k, image in enumerate(items):
                stack[k, : image.shape[0], : image.shape[1]] = image
            self.stack = torch.from_numpy(stack).to(self.device)
            self.offsets = torch.arange(self.crop, device=self.device)
        else:
            self.levels = self._pyramid(items, int(height), int(width), min(scales) * 2 ** -self.jitter)

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def _pyramid(self, items: list[np.ndarray], height: int, width: int, min_zoom: float) -> list[torch.Tensor]:
        """Level k: the source at 1/2**k, as one [1, 3, N, H_k, W_k] float volume (images padded by
        edge replication, so bilinear taps at a border never mix in black)."""
        padded = []
        for image in items:
            t = torch.tensor(image).permute(2, 0, 1).float()[None]  # a copy: the input may be read-only
            t = F.pad(t, (0, width - image.shape[1], 0, height - image.shape[0]), mode="replicate") \
                if (height, width) != image.shape[:2] else t
            padded.append(t[0])
        level = torch.stack(padded).to(self.device)  # [N, 3, H, W]
        count = max(1, int(math.floor(math.log2(1.0 / min_zoom))) + 1) if min_zoom < 1 else 1
        levels = [level]
        for _ in range(count - 1):
            level = F.interpolate(level, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
            levels.append(level)
        return [lv.permute(1, 0, 2, 3)[None].contiguous() for lv in levels]

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.gen, device=self.device)

    def _exact(self, index: torch.Tensor) -> torch.Tensor:
        b, c = index.shape[0], self.crop
        h, w = self.sizes[index, 0], self.sizes[index, 1]
        y = (self._uniform(b) * (h - c + 1)).floor().long()
        x = (self._uniform(b) * (w - c + 1)).floor().long()
        rows = (y[:, None] + self.offsets)[:, :, None]
        cols = (x[:, None] + self.offsets)[:, None, :]
        crops = self.stack[index[:, None, None], rows, cols]  # [B, c, c, 3] uint8
        return crops.permute(0, 3, 1, 2).float()

    def _jittered(self, index: torch.Tensor) -> torch.Tensor:
        b, c = index.shape[0], self.crop
        h, w = self.sizes[index, 0], self.sizes[index, 1]
        zoom = self.scales[index] * torch.exp2((self._uniform(b) * 2 - 1) * self.jitter)
        zoom = torch.maximum(zoom, c / torch.minimum(h, w))  # the window must fit the image
        side = c / zoom  # window side in source pixels
        cy = side / 2 + self._uniform(b) * (h - side)
        cx = side / 2 + self._uniform(b) * (w - side)
        # The level whose residual zoom lies in (1/2, 1] (level 0 also takes zooms above 1).
        want = torch.floor(torch.log2(1.0 / zoom)).clamp(0, len(self.levels) - 1).long()
        offsets = torch.arange(c, device=self.device, dtype=torch.float32) - (c - 1) / 2
        depth = len(self)
        z = ((2 * index.float() + 1) / depth - 1)[:, None, None].expand(b, c, c)
        out = torch.zeros(b, 3, c, c, device=self.device)
        for k, volume in enumerate(self.levels):
            hk, wk = volume.shape[-2:]
            f = 2.0**k
            v = (cy[:, None] + offsets[None] / zoom[:, None]) / f  # level-k pixel coordinates
            u = (cx[:, None] + offsets[None] / zoom[:, None]) / f
            grid = torch.stack([(2 * u / wk - 1)[:, None, :].expand(b, c, c),
                                (2 * v / hk - 1)[:, :, None].expand(b, c, c), z], dim=-1)
            sampled = F.grid_sample(volume, grid[None], mode="bilinear", padding_mode="border",
                                    align_corners=False)  # [1, 3, B, c, c]
            keep = (want == k).float()[:, None, None, None]
            out = out + keep * sampled[0].permute(1, 0, 2, 3)
        return out

    def sample(self, batch: int) -> torch.Tensor:
        """[batch, 3, crop, crop] float32 in [-1, 1] on the sampler's device."""
        index = torch.randint(len(self), (batch,), generator=self.gen, device=self.device)
        pixels = self._exact(index) if self.exact else self._jittered(index)
        view = torch.randint(NUM_VIEWS, (batch,), generator=self.gen, device=self.device)
        views = torch.stack([apply_view(pixels, v) for v in range(NUM_VIEWS)])  # [8, B, 3, c, c]
        chosen = views[view, torch.arange(batch, device=self.device)]
        if self.stain_jitter > 0:  # drawn from the same generator, after the crop: resumes exactly
            chosen = jitter_batch(chosen, self.stain_jitter, self.gen)
        return chosen / 127.5 - 1.0

    def get_state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
