"""Test-time views (`extract.eval_views`): the teacher sees dihedral views of every val and test
image, and evaluate, the validation rule search and `textdiff predict` average the classifier's
maps over them, the same maps in all three."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from textdiff.cache.samples import SampleStore, batch_of
from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import FeatureCache
from textdiff.data.prepared import load_prepared
from textdiff.data.views import apply_view, mean_of_views, undo_view
from textdiff.encoders.image import images_to_model_range
from textdiff.model.card import load_trained, nuclei_rule, read_model_dir
from textdiff.model.inference import predict_split, resize_probability
from textdiff.model.refine import refine_probability
from textdiff.teacher import Diffusion, FeatureExtractor, load_teacher

runner = CliRunner()
CACHE = Path("cache/features.zarr")


def _views_project(tiny_project, eval_views: int = 8):
    tiny_project.write_params(extract={"views": 1, "eval_views": eval_views, "batch_size": 2},
                              train={**tiny_project.base["train"], "epochs": 1, "autocast": "float32"})
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    return FeatureCache(CACHE)


def test_val_and_test_hold_the_teachers_views_and_train_one(tiny_project):
    cache = _views_project(tiny_project)
    assert cache.spec.eval_views == 8 and cache.spec.to_json()["eval_views"] == 8
    assert cache.split("train").views == 1 and cache.split("train").scored_views == 1
    teacher = load_teacher(tiny_project.teacher)
    extractor = FeatureExtractor(teacher, Diffusion(), steps=[10, 100], blocks=[0, 3], noise_seed=0)
    for split in ("val", "test"):
        cached = cache.split(split)
        assert cached.views == 8 and cached.scored_views == 8
        prepared = load_prepared("data/prepared", split)
        x = images_to_model_range(prepared.images)
        for view in (0, 3, 5):  # the teacher's own features of the turned image, not its features turned
            expected = extractor(apply_view(x, view).contiguous())
            for i in range(len(prepared)):
                for b, got in zip([0, 3], cached.features(i, view)):
                    torch.testing.assert_close(got.float(), expected[b][i], atol=2e-3, rtol=2e-3)
                np.testing.assert_array_equal(cached.mask(i, view).numpy(),
                                              apply_view(torch.from_numpy(prepared.masks[i]), view).numpy())
    assert tuple(cache.split("train").group["block_0"].shape[:2]) == (3, 1)
    assert tuple(cache.split("test").group["distance"].shape[:2]) == (2, 8)

    # training's per-epoch validation holds view 0 of each val image only, and it is view 0
    full, first = SampleStore(cache.split("val")), SampleStore(cache.split("val"), views=1)
    sample = first.get(0)
    assert all(f.shape[0] == 1 for f in sample.features) and sample.mask.shape[0] == 1
    assert sample.distance is not None and sample.distance.shape[0] == 1
    for a, b in zip(first.get_view(0, 0).features, full.get_view(0, 0).features):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="beyond the 1"):
        first.get_view(0, 1)
    on_disk = SampleStore(cache.split("val"))
    on_disk.cached = None  # as a split too large for RAM: the mask alone is read from zarr
    for v in (0, 5):
        assert torch.equal(on_disk.mask(0, v), full.get_view(0, v).mask[0])
        assert torch.equal(full.mask(0, v), full.get_view(0, v).mask[0])
    with pytest.raises(IndexError, match="beyond the 1"):
        first.mask(0, 1)


def test_the_mean_of_views_is_the_plain_mean_for_arrays_and_tensors():
    rng = np.random.default_rng(0)
    probs, dists = rng.random((3, 4, 5)), rng.random((3, 4, 5))
    prob, dist = mean_of_views(zip(probs, dists))
    np.testing.assert_allclose(prob, probs.mean(0))
    np.testing.assert_allclose(dist, dists.mean(0))
    prob, dist = mean_of_views((torch.from_numpy(p), None) for p in probs)
    assert dist is None and torch.allclose(prob, torch.from_numpy(probs.mean(0)))
    with pytest.raises(ValueError, match="no views"):
        mean_of_views([])


def test_a_cache_without_test_time_views_keeps_its_fingerprint():
    """eval_views 1 is not written, so every cache made before the field existed stays valid."""
    spec = CacheSpec(teacher_kind="rgb", steps=(0,), blocks=(0,), image_size=32, views=1, dtype="float16",
                     text_encoder="e", text_hidden_size=4, text_max_length=8, data={})
    assert "eval_views" not in spec.to_json()
    assert CacheSpec.from_json(spec.to_json()).eval_views == 1
    assert spec.split_view_layout("test").dihedral == 1
    views = CacheSpec(**{**spec.__dict__, "eval_views": 4})
    assert views != spec and views.split_view_layout("val").dihedral == 4
    assert views.split_view_layout("train").dihedral == 1
    with pytest.raises(ValueError, match="eval_views"):
        CacheSpec(**{**spec.__dict__, "eval_views": 3})


def test_evaluate_predict_and_the_rule_search_see_the_same_averaged_maps(tiny_project, tmp_path):
    cache = _views_project(tiny_project)
    trained = runner.invoke(app, ["train"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(app, ["evaluate"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "averaged over 8 views" in evaluated.output
    metrics = json.loads(Path("metrics/test.json").read_text())
    assert metrics["views"] == 8
    with h5py.File("metrics/predictions.h5") as h5:
        assert h5.attrs["views"] == 8
        evaluated_maps = {k: h5[k][:] for k in h5}

    # The averaged maps by hand: each view's probabilities turned back, then the mean.
    model, card = load_trained(Path("models/classifier"), torch.device("cpu"))
    assert card.spec.eval_views == 8
    test = cache.split("test")
    _, _, one = predict_split(model, SampleStore(test), torch.device("cpu"), keep_probs=True)
    _, _, eight = predict_split(model, SampleStore(test), torch.device("cpu"), keep_probs=True, views=8)
    for i, image_id in enumerate(test.ids):
        np.testing.assert_allclose(evaluated_maps[image_id], eight[i], atol=1e-6)
        assert not np.allclose(eight[i], one[i], atol=1e-4)  # the views are other maps than view 0's
    store = SampleStore(test)
    by_hand = []
    for v in range(8):
        feats, _, tokens, text_mask, pooled = batch_of([store.get_view(0, v)], [0], [0], torch.device("cpu"))
        with torch.no_grad():
            logits = model.eval()(feats, tokens, text_mask, pooled)["logits"].float()
        by_hand.append(undo_view(torch.softmax(logits, 1)[0, 1], v).numpy())
    np.testing.assert_allclose(eight[0], np.mean(by_hand, axis=0), atol=1e-6)

    # predict, by default, averages the views the model was evaluated with.
    out = tmp_path / "pred"
    image = tiny_project.data_root / "Test_Folder" / "img" / f"{test.ids[0]}.tif"
    predicted = runner.invoke(app, ["predict", str(image), "--out", str(out), "--text", test.texts[0],
                                    "--resize-whole"])
    assert predicted.exit_code == 0, predicted.output
    assert "8 dihedral views" in predicted.output
    with h5py.File(out / "predictions.h5") as h5:
        assert h5.attrs["views"] == 8
        live = h5[test.ids[0]][:]
    rgb = np.asarray(Image.open(image).convert("RGB"))
    rule = nuclei_rule(read_model_dir(Path("models/classifier")))  # refine_um as val chose it: refined alike
    upsampled = refine_probability(resize_probability(evaluated_maps[test.ids[0]], live.shape), rgb, rule.refine_um,
                                   card.source_mpp)
    np.testing.assert_allclose(live, upsampled, atol=2e-3)
