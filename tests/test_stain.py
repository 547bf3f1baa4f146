"""Stain shifts and normalisation (textdiff/stain.py): exact where the maths is exact, directional
where it is a model of the world, and never a NaN on glass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textdiff.data import stain


def he_image(seed: int = 0, size: int = 96, hematoxylin: float = 1.0, eosin: float = 1.0) -> np.ndarray:
    """A synthetic H&E tile made in stain space: dark-blue discs (nuclei) on pink stroma, glass strip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size), bool)
    for _ in range(8):
        cy, cx = rng.integers(6, size - 6, 2)
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(3, 8) ** 2
    hed = np.zeros((size, size, 3))  # every pixel its own mix, as real tissue (not two flat colours)
    hed[..., 0] = np.where(nuclei, rng.uniform(1.2, 2.4, (size, size)),
                           rng.uniform(0.0, 0.5, (size, size))) * hematoxylin
    hed[..., 1] = np.where(nuclei, rng.uniform(0.0, 0.4, (size, size)), rng.uniform(0.2, 0.9, (size, size))) * eosin
    hed[: size // 8, :, :] = 0.0  # a strip of glass
    return stain.from_hed(np.clip(hed, 0, None))


def test_hed_round_trip_is_exact_up_to_rounding():
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    back = stain.from_hed(stain.to_hed(image))
    assert np.abs(back.astype(int) - image).max() <= 1
    assert np.mean(back != image) < 0.01


def test_identity_shift_is_a_copy_and_a_pale_shift_removes_hematoxylin():
    image = he_image()
    same = stain.apply_shift(image, stain.IDENTITY)
    assert np.array_equal(same, image) and same is not image
    pale = stain.apply_shift(image, stain.StainShift((-0.5, 0.0, 0.0), (0.0, 0.0, 0.0)))
    h0, h1 = stain.to_hed(image)[..., 0], stain.to_hed(pale)[..., 0]
    nuclei = h0 > 0.5
    assert h1[nuclei].mean() == pytest.approx(0.5 * h0[nuclei].mean(), rel=0.05)
    assert pale.mean() > image.mean()  # paler: more light comes through


def test_draws_are_seeded_and_bounded():
    a = stain.draw_shift(np.random.default_rng(3), 0.2)
    b = stain.draw_shift(np.random.default_rng(3), 0.2)
    assert a == b
    values = np.concatenate([a.scale, a.bias])
    assert np.all(np.abs(values) <= 0.2) and np.any(values != 0)
    assert stain.StainShift.from_array(a.as_array()) == stain.StainShift(
        tuple(np.float32(a.scale).astype(float)), tuple(np.float32(a.bias).astype(float)))
    with pytest.raises(ValueError):
        stain.draw_shift(np.random.default_rng(0), -0.1)


def test_torch_jitter_matches_the_numpy_shift_with_the_same_draws():
    images = np.stack([he_image(seed=s, size=48) for s in range(3)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    out = stain.jitter_batch(pixels, 0.2, torch.Generator().manual_seed(7))
    draws = (torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1) * 0.2
    for k in range(3):
        expected = stain.apply_shift(images[k], stain.StainShift.from_array(draws[k].numpy()))
        got = out[k].permute(1, 2, 0).numpy()
        assert np.abs(got - expected.astype(np.float32)).max() <= 1.0
    assert not torch.allclose(out[0], pixels[0])  # it did jitter
    still = stain.jitter_batch(pixels, 0.0, torch.Generator().manual_seed(7))
    assert (still - pixels).abs().max() < 0.01


def _real_images(root, split: str, n: int) -> list[np.ndarray]:
    from textdiff.data.dataset import list_images
    from textdiff.data.images import read_image

    return [read_image(path)[0] for path in list_images(root, split)[:n]]


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_makes_real_tiles_stain_invariant(method, monuseg_root):
    """What normalisation is for: a paler, pinker or bluer copy of a slide comes out (nearly) as the
    original does, while the shift itself moved it far."""
    reference = stain.fit_reference(method, _real_images(monuseg_root, "train", 4))
    assert stain.check_reference(reference) == method
    json.dumps(reference)  # travels in manifest.json, the cache spec and model.json
    original = _real_images(monuseg_root, "test", 1)[0][:400, :400]
    base = stain.normalize(original, reference)
    assert base.shape == original.shape and base.dtype == np.uint8
    for shift in (stain.StainShift((-0.4, -0.4, 0.0), (0.0, 0.0, 0.0)),  # pale
                  stain.StainShift((-0.2, 0.3, 0.0), (0.0, 0.05, 0.0)),  # pinker
                  stain.StainShift((0.3, -0.2, 0.0), (0.05, 0.0, 0.0))):  # bluer
        shifted = stain.apply_shift(original, shift)
        moved = np.abs(shifted.astype(float) - original).mean()
        left = np.abs(stain.normalize(shifted, reference).astype(float) - base).mean()
        assert left < 0.5 * moved, (shift, moved, left)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_glass_and_blank_tiles_pass_unchanged(method):
    reference = stain.fit_reference(method, [he_image(seed=s) for s in range(2)])
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    specks = glass.copy()
    specks[:3, :3] = (80, 40, 130)  # a few stained pixels: too few to estimate a stain matrix from
    for tile in (glass, specks, np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8) + 250):
        out = stain.normalize(tile, reference)
        assert np.array_equal(out, tile)
    assert not stain.has_tissue(glass) and stain.has_tissue(he_image())


def test_none_and_bad_references():
    assert stain.fit_reference("none", []) == {}
    image = he_image()
    assert np.array_equal(stain.normalize(image, {}), image)
    with pytest.raises(ValueError):
        stain.fit_reference("vahadane", [image])
    with pytest.raises(ValueError):
        stain.check_reference({"method": "macenko"})
