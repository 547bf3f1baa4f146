"""Stain normalisation and stain views through the stages: prepare -> extract -> train -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.data.stain import StainShift, apply_shift

runner = CliRunner()


def _manifest() -> dict:
    return json.loads(Path("data/prepared/manifest.json").read_text())


def test_macenko_normalises_every_split_with_a_reference_fitted_on_train(tiny_project):
    from textdiff.data.dataset import read_split
    from textdiff.data.prepared import load_prepared
    from textdiff.data.resize import resize_sample
    from textdiff.data.stain import fit_reference, normalize

    raw = load_prepared("data/prepared", "test").images.copy()
    tiny_project.write_params(data={"stain": "macenko"})
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 0, result.output
    reference = _manifest()["stain"]
    assert reference["method"] == "macenko"
    train = read_split(tiny_project.data_root, "train")
    assert reference == json.loads(json.dumps(fit_reference("macenko", [s.image for s in train])))
    test = read_split(tiny_project.data_root, "test")
    expected = np.stack([resize_sample(s, 32).image for s in
                         [type(s)(**{**s.__dict__, "image": normalize(s.image, reference)}) for s in test]])
    normalised = load_prepared("data/prepared", "test").images
    assert np.array_equal(normalised, expected)  # normalised at the source size, then resized
    assert not np.array_equal(normalised, raw)

    # extract carries the reference into the cache spec, train into model.json, predict applies it
    assert runner.invoke(app, ["extract"]).exit_code == 0
    assert FeatureCache("cache/features.zarr").spec.stain == reference
    tiny_project.write_params(data={"stain": "macenko"}, train={"epochs": 1, "d_model": 16, "heads": 2})
    assert runner.invoke(app, ["train"]).exit_code == 0
    from textdiff.predict.images import build_segmenter

    segmenter, card = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    assert card.spec.stain == reference and segmenter.stain == reference


def test_stain_mismatch_between_prepare_and_params_is_one_line(tiny_project):
    tiny_project.write_params(data={"stain": "reinhard"})  # data/prepared was made with raw colours
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 1 and "data.stain=none" in result.output and "textdiff prepare" in result.output
    assert "Traceback" not in result.output and not Path("cache/features.zarr").exists()


def test_stain_views_are_the_teachers_features_of_seeded_stain_shifts(tiny_project):
    from textdiff.encoders.image import build_featurizer, images_to_model_range

    tiny_project.write_params(extract={"views": 1, "batch_size": 2, "stain_views": 2, "stain_sigma": 0.3})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    cache = FeatureCache("cache/features.zarr")
    assert cache.spec.stain_views == 2 and cache.spec.total_views == 3
    split = cache.split("train")
    shifts = np.asarray(split.group["stain_shifts"][:])
    assert shifts.shape == (len(split), 2, 2, 3) and np.abs(shifts).max() <= 0.3 and np.abs(shifts).min() > 0
    featurizer = build_featurizer(cache.spec, tiny_project.teacher, torch.device("cpu"))
    for i in range(len(split)):
        image = split.image(i)
        for k in range(2):
            assert np.array_equal(split.mask(i, 1 + k).numpy(), split.mask(i, 0).numpy())
            shifted = apply_shift(image, StainShift.from_array(shifts[i, k]))
            feats = featurizer(images_to_model_range(shifted[None]))
            cached = split.features(i, 1 + k)
            for b, f in zip(cache.spec.blocks, cached):
                torch.testing.assert_close(f.float(), feats[b][0].to(f.dtype).float(), atol=1e-3, rtol=1e-3)
        assert not torch.equal(split.features(i, 0)[0], split.features(i, 1)[0])

    # a re-run with another sigma rebuilds; the same sigma draws the same shifts
    tiny_project.write_params(extract={"views": 1, "batch_size": 2, "stain_views": 2, "stain_sigma": 0.3},
                              train={"epochs": 1, "d_model": 16, "heads": 2})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    again = np.asarray(FeatureCache("cache/features.zarr").split("train").group["stain_shifts"][:])
    assert np.array_equal(again, shifts)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output


def test_training_draws_the_original_or_a_stain_copy_uniformly():
    from textdiff.cache.spec import CacheSpec
    from textdiff.train.training import choose_stain_copy

    def spec(views, rotations, stain_views):
        return CacheSpec(teacher_kind="rgb", steps=(0,), blocks=(0,), image_size=8, views=views, dtype="float16",
                         text_encoder="x", text_hidden_size=4, text_max_length=2, data={}, rotations=rotations,
                         stain_views=stain_views)

    rng = np.random.default_rng(0)
    one = spec(1, 0, 3).view_layout
    draws = [choose_stain_copy((0, 5), one, rng) for _ in range(8000)]
    views = np.array([v for v, _ in draws])
    for v in range(4):
        assert np.mean(views == v) == pytest.approx(0.25, abs=0.02)
    assert all(j == 5 for _, j in draws)  # the flip chosen for the features stays
    eight = spec(8, 2, 1).view_layout
    assert {choose_stain_copy((3, 0), eight, np.random.default_rng(s)) for s in range(40)} == {(3, 0), (10, 3)}
    assert {choose_stain_copy((9, 0), eight, np.random.default_rng(s)) for s in range(40)} == {(9, 0), (10, 0)}


def test_pretrain_stain_jitter_changes_colours_not_crops():
    from textdiff.pretrain.crops import CropSampler

    rng = np.random.default_rng(0)
    images = rng.integers(30, 230, (3, 40, 40, 3), dtype=np.uint8)
    plain = CropSampler(images, 16, seed=1).sample(4)
    jittered = CropSampler(images, 16, seed=1, stain_jitter=0.2).sample(4)
    assert plain.shape == jittered.shape and not torch.allclose(plain, jittered)
    # the same crops (positions and views) were taken: the colours are a smooth function of them
    for a, b in zip(plain, jittered):
        assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.8
    again = CropSampler(images, 16, seed=1, stain_jitter=0.2).sample(4)
    assert torch.equal(jittered, again)
