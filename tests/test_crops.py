"""The pretraining crop sampler: exact pixels without jitter, correct geometry with it, and one
seeded random stream that a saved state resumes."""

import numpy as np
import pytest
import torch

from textdiff.data.views import NUM_VIEWS, apply_view
from textdiff.errors import TextDiffError
from textdiff.pretrain.crops import CropSampler


def _windows(images: np.ndarray, crop: int) -> list[torch.Tensor]:
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    n, _, h, w = t.shape
    return [apply_view(t[i, :, y:y + crop, x:x + crop], v)
            for i in range(n) for y in range(h - crop + 1) for x in range(w - crop + 1) for v in range(NUM_VIEWS)]


def test_exact_crops_are_dihedral_views_of_windows_and_cover_every_image_and_view():
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 14, 3), dtype=np.uint8)
    sampler = CropSampler(images, 8, seed=0)
    batch = sampler.sample(64)
    assert batch.shape == (64, 3, 8, 8) and batch.dtype == torch.float32
    windows = torch.stack(_windows(images, 8))
    n_pos = (12 - 8 + 1) * (14 - 8 + 1)
    found = []
    for crop in batch:
        hit = torch.nonzero((windows == crop).flatten(1).all(1))
        assert len(hit) >= 1  # bit-identical pixels: no resampling on the exact path
        found.append(int(hit[0]))
    assert len({k // (n_pos * NUM_VIEWS) for k in found}) == 3  # every image drawn
    assert len({k % NUM_VIEWS for k in found}) == NUM_VIEWS  # every dihedral view drawn


def test_images_of_different_sizes_are_cropped_inside_each_image():
    small = np.full((10, 10, 3), 50, np.uint8)
    large = np.full((30, 20, 3), 200, np.uint8)
    batch = CropSampler([small, large], 10, seed=1).sample(40)
    values = {round(float(v), 4) for v in batch.flatten(1).mean(1)}
    assert values == {round(50 / 127.5 - 1, 4), round(200 / 127.5 - 1, 4)}  # never the padding


def test_jittered_crops_resample_the_source_at_the_drawn_zoom():
    # A linear ramp stays a linear ramp under bilinear sampling and antialiased halving, so every
    # crop's slope says the zoom it was taken at: 1/zoom source pixels per crop pixel.
    h = w = 256
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ramp = np.stack([xx * 0.5 + 60, yy * 0.5 + 60, np.full_like(xx, 128)], -1).astype(np.uint8)
    scale, jitter, crop = 0.25, 0.5, 16
    sampler = CropSampler([ramp], crop, seed=0, scales=[scale], jitter=jitter)
    assert len(sampler.levels) == 3  # zooms down to 0.25 * 2**-0.5 need halvings to 1/4
    batch = (sampler.sample(32) + 1) * 127.5
    inner = batch[:, :2, 2:-2, 2:-2]
    slopes = []
    for crop_pixels in inner:
        gx = (crop_pixels[..., :, 1:] - crop_pixels[..., :, :-1]).abs().mean()
        gy = (crop_pixels[..., 1:, :] - crop_pixels[..., :-1, :]).abs().mean()
        # the ramp rises 0.5 per source pixel in one of the two channels averaged here: x4
        slopes.append(float(max(gx, gy)) * 4)
        second = crop_pixels[..., :, 2:] - 2 * crop_pixels[..., :, 1:-1] + crop_pixels[..., :, :-2]
        assert second.abs().mean() < 0.6  # still a ramp (uint8 rounding of the source only)
    zooms = 1 / np.array(slopes)
    assert zooms.min() >= scale * 2**-jitter * 0.9 and zooms.max() <= scale * 2**jitter * 1.1
    assert zooms.max() / zooms.min() > 1.5  # the zoom really varies


def test_the_same_seed_gives_the_same_batches_and_a_saved_state_resumes_the_stream():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = CropSampler(images, 16, seed=3), CropSampler(images, 16, seed=3)
    assert torch.equal(a.sample(5), b.sample(5))
    state = a.get_state()
    after = a.sample(5)
    b.set_state(state)
    assert torch.equal(b.sample(5), after)
    assert not torch.equal(CropSampler(images, 16, seed=4).sample(5), CropSampler(images, 16, seed=3).sample(5))


def test_images_too_small_for_the_crop_are_one_line_errors():
    with pytest.raises(TextDiffError, match="smaller than the 16px crops"):
        CropSampler(np.zeros((2, 12, 40, 3), np.uint8), 16, seed=0)
    with pytest.raises(TextDiffError, match=r"image 1 \(40x40 at scale 0.25\)"):
        CropSampler([np.zeros((80, 80, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)], 16, seed=0,
                    scales=[0.25, 0.25], jitter=0.3)
    with pytest.raises(TextDiffError, match="uint8"):
        CropSampler(np.zeros((2, 20, 20, 3), np.float32), 16, seed=0)
