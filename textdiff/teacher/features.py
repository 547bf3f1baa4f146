"""Decoder activations of the frozen diffusion UNet, used as per-pixel image features.

For each image and each chosen timestep t, the image is noised to x_t = q_sample(x, t, noise)
and run through the UNet; the outputs of selected ``output_blocks`` are kept at their native
resolution (no upsampling here; the classifier decides how to fuse scales).

Why these defaults
------------------
``blocks=(6, 8, 12, 16)``: for guided-diffusion's 256x256 unconditional model the decoder's 18
blocks go 1024@8² ... 256@256² (see `block_shapes`). Blocks 6, 8, 12, 16 give
512@32², 512@64², 256@128² and 256@256², a 32²→256² span: coarse blocks carry semantics,
fine ones boundaries, as found by Baranchuk et al. (DDPM-Seg) for label-efficient
segmentation. The project's brief words this as "4, 6, 8, 12" but describes the same 32²→256²
span; the indices here are the ones that produce it with upstream's block numbering.
``steps=(50, 150, 250)``: small-to-moderate noise; the image content is still readable, and
DDPM-Seg found these timesteps the most informative.

Noise: ONE [3, H, W] tensor drawn from ``torch.Generator().manual_seed(noise_seed)`` is shared by
every image and every step (TextDiff's share_noise), so features are a deterministic function
of the image: the same image always gets the same features, across batches and runs.

Cost: the forward stops as soon as the deepest tapped block has run (`UNetModel.decoder_features`),
which skips the remaining high-resolution decoder blocks and the head.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from textdiff.data.tiles import window_starts
from textdiff.errors import TextDiffError
from textdiff.teacher.adm import normalize_config, resolved_channel_mult
from textdiff.teacher.diffusion import Diffusion

DEFAULT_STEPS: tuple[int, ...] = (50, 150, 250)
DEFAULT_BLOCKS: tuple[int, ...] = (6, 8, 12, 16)
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


WINDOW_BATCH = 16  # windows per teacher forward in windowed extraction (bounds memory, not results)


def _bump(side: int, device: torch.device) -> torch.Tensor:
    """[side, side] raised-cosine weights, highest in the centre, never zero."""
    ramp = torch.sin(torch.pi * (torch.arange(side, dtype=torch.float32) + 0.5) / side) ** 2
    return (torch.outer(ramp, ramp) + 1e-3).to(device)


def block_shapes(config: Mapping[str, Any], blocks: Iterable[int],
                 image_size: int | Sequence[int] | None = None) -> dict[int, tuple[int, int, int]]:
    """(C, H, W) of ``output_blocks[b]`` for each b, from the config alone (no model needed).

    Decoder level `l` (deepest first) has num_res_blocks + 1 blocks with
    int(channel_mult[l] * num_channels) channels at H / 2^l, except that the last block of
    every level but the top one ends with a 2x upsample. `image_size` defaults to the config's
    (an int or (H, W)).
    """
    cfg = normalize_config(config)
    mults = resolved_channel_mult(cfg)
    h, w = _hw(cfg["image_size"] if image_size is None else image_size)
    nrb, nc = cfg["num_res_blocks"], cfg["num_channels"]
    table: list[tuple[int, int, int]] = []
    for level in reversed(range(len(mults))):
        ch = int(mults[level] * nc)
        for i in range(nrb + 1):
            factor = 2 ** (level - 1) if (level > 0 and i == nrb) else 2**level
            table.append((ch, h // factor, w // factor))
    out = {}
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(table):
            raise TextDiffError(f"blocks: {b!r} is not an output block index in [0, {len(table)})")
        out[b] = table[b]
    return out


def resolved_window_stride(window: int, stride: int) -> int:
    """extract.window_stride as used: 0 means half a window; no windows, no stride."""
    return (stride or window // 2) if window else 0


def config_factor(config: Mapping[str, Any], blocks: Iterable[int]) -> list[int]:
    """How many input pixels one feature pixel of each block spans (1, 2, 4, ...)."""
    side = 2 ** 12
    return [side // hb for _, hb, _ in block_shapes(config, blocks, side).values()]


class PendingFeatures:
    """Features on their way to host memory: `wait()` returns {block: [B, S, C, h, w]} on the CPU.

    On a GPU the copy runs on a side stream into pinned buffers, so the next batch's forward
    overlaps it; call `release()` once the arrays are written so their buffers are reused (a buffer
    is never handed out twice while in use). On a CPU the features are ready at once."""

    def __init__(self, host: dict[int, torch.Tensor], done: Any = None, pool: _PinnedPool | None = None):
        self._host, self._done, self._pool = host, done, pool

    def wait(self) -> dict[int, torch.Tensor]:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._host

    def release(self) -> None:
        if self._pool is not None:
            self._pool.give_back(self._host.values())
            self._pool = None

    def owned(self) -> dict[int, torch.Tensor]:
        """The features as tensors of the caller's own (pinned buffers copied out and released)."""
        host = self.wait()
        if self._pool is None:
            return host
        out = {blk: f.clone() for blk, f in host.items()}
        self.release()
        return out


class _PinnedPool:
    """Page-locked host buffers by (shape, dtype), reused: pinning memory is slow, copying into it is fast."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give_back(self, tensors: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class FeatureExtractor:
    """Callable: images [B, 3, H, W] in [-1, 1] -> {block: Tensor[B, len(steps), C, H_b, W_b]}.

    The model is moved to `device`, put in eval mode (and channels_last if asked) in place.
    `autocast_dtype` (torch.float16 / torch.bfloat16, or their names) runs the UNet under
    torch.autocast on the device. Results come back on the CPU as `out_dtype` (float32 by default;
    extract asks for its storage dtype, so the cast runs on the device and half the bytes cross
    the bus).

    Speed on a GPU (`submit`): `fuse_steps` runs all timesteps as one forward of B x steps
    images (default: on CUDA only; on a CPU per-step batches keep the cache bit-identical to the
    one made before fusing existed, and a bigger batch buys a CPU nothing); `compile` wraps the
    truncated decoder in torch.compile.
    """

    def __init__(self, model: torch.nn.Module, diffusion: Diffusion, steps: Sequence[int] = DEFAULT_STEPS,
                 blocks: Sequence[int] = DEFAULT_BLOCKS, noise_seed: int = 0, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | str | None = None, channels_last: bool = False,
                 out_dtype: torch.dtype = torch.float32, fuse_steps: bool | None = None, compile: bool = False,
                 window: int = 0, window_stride: int = 0):
        config = getattr(model, "config", None)
        if not isinstance(config, dict) or not hasattr(model, "output_blocks"):
            raise TextDiffError("teacher: expected a UNet built by build_adm (with .config and .output_blocks)")
        n_blocks = len(model.output_blocks)
        blocks, steps = list(blocks), list(steps)
        if not blocks:
            raise TextDiffError("blocks: must not be empty")
        if not steps:
            raise TextDiffError("steps: must not be empty")
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_blocks:
                raise TextDiffError(f"blocks: {b!r} is not an output block index in [0, {n_blocks})")
        if len(set(blocks)) != len(blocks):
            raise TextDiffError(f"blocks: duplicate indices in {blocks}")
        for t in steps:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < diffusion.num_timesteps:
                raise TextDiffError(f"steps: {t!r} is not a timestep in [0, {diffusion.num_timesteps})")
        if isinstance(autocast_dtype, str):
            if autocast_dtype not in _AUTOCAST:
                raise TextDiffError(f"autocast_dtype: expected one of {', '.join(_AUTOCAST)}, got {autocast_dtype!r}")
            autocast_dtype = _AUTOCAST[autocast_dtype]
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise TextDiffError(f"autocast_dtype: expected torch.float16, torch.bfloat16 or None, got {autocast_dtype}")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise TextDiffError(f"noise_seed: expected an integer, got {noise_seed!r}")

        multiple = 2 ** (len(resolved_channel_mult(config)) - 1)  # what _check asks of an input's sides
        window_stride = resolved_window_stride(window, window_stride)
        if window:
            deepest = max(config_factor(config, blocks))
            if window % multiple or window_stride % deepest or not 0 < window_stride <= window:
                raise TextDiffError(f"extract.window {window} / window_stride {window_stride}: the window must be "
                                    f"a multiple of {multiple} and the stride a multiple of {deepest}, at most "
                                    "the window")
        self.window, self.window_stride = int(window), int(window_stride)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.diffusion = diffusion
        self.steps = steps
        self.blocks = blocks
        self.noise_seed = noise_seed
        self.autocast_dtype = autocast_dtype
        self.config = config
        self._levels = len(resolved_channel_mult(config))
        self._noise: dict[tuple[int, int], torch.Tensor] = {}
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TextDiffError(f"out_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
        self.out_dtype = out_dtype
        self.fuse_steps = self.device.type == "cuda" if fuse_steps is None else bool(fuse_steps)
        self._decoder = torch.compile(self.model.decoder_features) if compile else self.model.decoder_features
        self._pool = _PinnedPool() if self.device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def noise(self, height: int, width: int) -> torch.Tensor:
        """The shared [3, H, W] noise for this seed (drawn on the CPU, so device-independent)."""
        key = (height, width)
        if key not in self._noise:
            gen = torch.Generator().manual_seed(self.noise_seed)
            self._noise[key] = torch.randn(3, height, width, generator=gen).to(self.device)
        return self._noise[key]

    def shapes(self, height: int, width: int) -> dict[int, tuple[int, int, int]]:
        """(C, H_b, W_b) per tapped block for an H x W input."""
        return block_shapes(self.config, self.blocks, (height, width))

    def _check(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise TextDiffError(f"images: expected a [B, 3, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise TextDiffError(f"images: expected floats in [-1, 1], got dtype {images.dtype}")
        multiple = 2 ** (self._levels - 1)
        h, w = images.shape[-2:]
        if h % multiple or w % multiple:
            raise TextDiffError(f"images: height and width must be multiples of {multiple}, got {h}x{w}")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise TextDiffError(
                f"images: values must lie in [-1, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]"
            )

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self._decoder(x_t, t, tuple(self.blocks))

    def on_device(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block: [B, S, C, h, w]} as `out_dtype`, left on the device."""
        self._check(images)
        b, _, h, w = images.shape
        if self.window and (h > self.window or w > self.window):
            return self._windowed(images)
        x = images.to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        noise = self.noise(h, w)
        n_steps = len(self.steps)
        if self.fuse_steps:
            t = torch.tensor(self.steps, dtype=torch.long, device=self.device).repeat_interleave(b)
            x_t = self.diffusion.q_sample(x.repeat(n_steps, 1, 1, 1), t, noise)
            taps = self._forward(x_t, t)  # outside inference mode the copies below are ordinary tensors
            return {blk: f.unflatten(0, (n_steps, b)).transpose(0, 1).to(self.out_dtype, copy=True,
                                                                           memory_format=torch.contiguous_format)
                    for blk, f in zip(self.blocks, taps)}
        per_step: dict[int, list[torch.Tensor]] = {blk: [] for blk in self.blocks}
        for step in self.steps:
            t = torch.full((b,), step, dtype=torch.long, device=self.device)
            for blk, f in zip(self.blocks, self._forward(self.diffusion.q_sample(x, t, noise), t)):
                per_step[blk].append(f.to(self.out_dtype))
        return {blk: torch.stack(fs, dim=1) for blk, fs in per_step.items()}

    def _windowed(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """The teacher on overlapping windows of its training size, features blended back.

        The image is noised whole (the same noise as without windows), then each `window`-pixel
        square every `window_stride` pixels goes through the UNet on its own, so every attention
        layer and GroupNorm sees what it saw in training; a window's features are weighted by a
        raised-cosine bump (its border, where zero padding shows, counts least) and the weighted
        mean over the windows covering a position is the feature there."""
        b, _, h, w = images.shape
        x = images.to(self.device, torch.float32)
        noise = self.noise(h, w)
        win, stride = self.window, self.window_stride
        tops, lefts = window_starts(h, win, stride), window_starts(w, win, stride)
        shapes = self.shapes(h, w)
        out: dict[int, torch.Tensor] = {}
        for blk, (c, hb, wb) in shapes.items():
            out[blk] = torch.zeros(b, len(self.steps), c, hb, wb, dtype=torch.float32, device=self.device)
        weights = {blk: torch.zeros(hb, wb, dtype=torch.float32, device=self.device)
                   for blk, (_, hb, wb) in shapes.items()}
        bumps = {blk: _bump(win * hb // h, self.device) for blk, (_, hb, _) in shapes.items()}
        corners = [(top, left) for top in tops for left in lefts]
        for si, step in enumerate(self.steps):
            x_t = self.diffusion.q_sample(x, torch.full((b,), step, dtype=torch.long, device=self.device), noise)
            for first in range(0, len(corners), WINDOW_BATCH):
                group = corners[first : first + WINDOW_BATCH]
                crops = torch.cat([x_t[:, :, top : top + win, left : left + win] for top, left in group])
                t = torch.full((crops.shape[0],), step, dtype=torch.long, device=self.device)
                for blk, f in zip(self.blocks, self._forward(crops, t)):
                    f = f.float().unflatten(0, (len(group), b))
                    scale, side = shapes[blk][1] / h, f.shape[-1]
                    for k, (top, left) in enumerate(group):
                        tb, lb = int(top * scale), int(left * scale)
                        out[blk][:, si, :, tb : tb + side, lb : lb + side] += f[k] * bumps[blk]
                        if si == 0:
                            weights[blk][tb : tb + side, lb : lb + side] += bumps[blk]
        return {blk: (out[blk] / weights[blk]).to(self.out_dtype) for blk in self.blocks}

    def submit(self, images: torch.Tensor) -> PendingFeatures:
        """Start the features of a batch; on a GPU the device-to-host copy is left running."""
        feats = self.on_device(images)
        if self._copy_stream is None:
            return PendingFeatures({blk: f.cpu() for blk, f in feats.items()})
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self._copy_stream):
            for blk, f in feats.items():
                host[blk] = self._pool.take(f.shape, f.dtype)
                host[blk].copy_(f, non_blocking=True)
                f.record_stream(self._copy_stream)  # its memory is not reused before the copy ends
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return PendingFeatures(host, done, self._pool)

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.submit(images).owned()
