"""The `release` switches reproduce the released TextDiff code, checked against references written
here from its description (not from its code): docs/reproducing-the-paper.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.dataset import read_split
from textdiff.data.resize import release_image, release_mask, resize_sample
from textdiff.model.classifier import ClassifierConfig, PixelClassifier
from textdiff.model.losses import soft_dice_loss

runner = CliRunner()
CHANNELS, STEPS, TEXT_DIM, D, HEADS = [8, 8, 8, 4], 3, 10, 12, 2  # widths 24, 24, 24, 12 (= D: raw)


def _release_model(**kw) -> PixelClassifier:
    torch.manual_seed(0)
    kw = {"padding_mask": False, "decoder_norm": "running", **kw}
    config = ClassifierConfig(CHANNELS, STEPS, TEXT_DIM, d_model=D, heads=HEADS, out_size=16, variant="release", **kw)
    return PixelClassifier(config).double().eval()


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _attention(x, ctx, attn):
    """softmax(q k^T / sqrt(64)) v per head, over every text token (no mask), then
    Linear and LayerNorm: the release's to_out."""
    q, k, v = x @ attn.to_q.weight.T, ctx @ attn.to_k.weight.T, ctx @ attn.to_v.weight.T
    heads = []
    for h in range(attn.heads):
        cols = slice(h * 64, (h + 1) * 64)
        w = torch.softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / 8.0, dim=-1)
        heads.append(w @ v[..., cols])
    out = torch.cat(heads, dim=-1) @ attn.to_out.weight.T + attn.to_out.bias
    return _layer_norm(out, attn.out_norm)


def _reference(model: PixelClassifier, feats, tokens):
    """The released classifier as docs/reproducing-the-paper.md writes it out, on the model's own weights."""
    block = model.blocks[0]
    maps = []
    for idx, f in enumerate(feats):
        x = f.reshape(1, -1, *f.shape[-2:])
        if x.shape[1] != D:  # 1x1 conv `down{min(idx+1, 2)}`
            conv = model.down[f"down{min(idx + 1, 2)}"]
            x = torch.einsum("bchw,oc->bohw", x, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]
        hgt, wid = x.shape[-2:]
        t = x.flatten(2).transpose(1, 2)
        t = _attention(_layer_norm(t, block.norm1), tokens, block.attn1) + t
        t = _attention(_layer_norm(t, block.norm2), tokens, block.attn2) + t
        t = F.gelu(_layer_norm(t, block.norm3)) @ block.ff_out.weight.T + block.ff_out.bias + t
        x = t.transpose(1, 2).reshape(1, D, hgt, wid)
        maps.append(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    return model.decoder(torch.cat(maps, dim=1))


def test_release_classifier_matches_the_written_formulas():
    model = _release_model()
    assert set(model.down) == {"down1", "down2"} and model.down_keys == ["down1", "down2", "down2", None]
    assert not hasattr(model, "image_head")  # no contrastive heads in the release
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, STEPS, c, s, s, generator=g, dtype=torch.float64) for c, s in zip(CHANNELS, (2, 4, 8, 16))]
    tokens = torch.randn(1, 5, TEXT_DIM, generator=g, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        got = model(feats, tokens, padding, tokens[:, 0])["logits"]  # padding_mask=False: the mask is ignored
        torch.testing.assert_close(got, _reference(model, feats, tokens), rtol=1e-9, atol=1e-9)
        masked = _release_model(padding_mask=True)
        masked.load_state_dict(model.state_dict())
        assert not torch.allclose(masked(feats, tokens, padding, tokens[:, 0])["logits"], got)  # the check can fail


def test_release_decoder_uses_running_statistics_at_inference():
    model = _release_model()
    assert all(bn.track_running_stats for bn in model.decoder if isinstance(bn, torch.nn.BatchNorm2d))
    image_norm = PixelClassifier(ClassifierConfig(CHANNELS, STEPS, TEXT_DIM, d_model=D, heads=HEADS, out_size=16))
    assert not any(bn.track_running_stats for bn in image_norm.decoder if isinstance(bn, torch.nn.BatchNorm2d))


def test_release_dice_is_on_raw_logits():
    logits = torch.tensor([[[[2.0, -1.0]], [[-2.0, 3.0]]]])  # [1, 2, 1, 2]
    target = torch.tensor([[[0, 1]]])
    s, t = logits[0], torch.stack([target[0] == 0, target[0] == 1]).double()
    expected = np.mean([1 - (2 * (s[i] * t[i]).sum() + 1e-5) / ((s[i] ** 2).sum() + (t[i] ** 2).sum() + 1e-5)
                        for i in range(2)])
    assert soft_dice_loss(logits, target, on="logits").item() == pytest.approx(float(expected), rel=1e-6)
    assert soft_dice_loss(logits, target).item() != pytest.approx(float(expected), rel=1e-3)


def test_release_images_and_masks_match_opencv_on_the_real_data(monuseg_root):
    import cv2

    sample = read_split(monuseg_root, "test")[0]
    raw = cv2.imread(str(sample.image_path))  # the release: default flags, BGR, never converted
    np.testing.assert_array_equal(release_image(sample.image, 256), cv2.resize(raw, (256, 256)))
    gt = cv2.resize(cv2.imread(str(sample.mask_path), 0), (256, 256))
    np.testing.assert_array_equal(release_mask(sample.mask, 256), (gt > 0).astype(np.uint8))
    ours = resize_sample(sample, 256)
    assert release_mask(sample.mask, 256).sum() > ours.mask.sum()  # bilinear + "> 0" dilates
    rel = resize_sample(sample, 256, "release")
    np.testing.assert_array_equal(rel.mask, rel.release_mask)
    np.testing.assert_array_equal(ours.release_mask, rel.release_mask)


def test_release_switches_train_and_every_run_is_scored_both_ways(tiny_project):
    tiny_project.write_params(data={"protocol": "release", "image_size": 32})
    assert runner.invoke(app, ["prepare"]).exit_code == 0
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(data={"protocol": "release", "image_size": 32},
                              train={"epochs": 1, "d_model": 16, "heads": 2, "classifier": "release",
                                     "padding_mask": False, "decoder_norm": "running"})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    card = json.loads(Path("models/classifier/model.json").read_text())
    assert card["classifier"]["variant"] == "release" and card["cache_spec"]["protocol"] == "release"
    assert runner.invoke(app, ["evaluate"]).exit_code == 0
    metrics = json.loads(Path("metrics/test.json").read_text())
    per_image = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    # The release protocol trains on the release ground truth, so the two scorings coincide.
    assert metrics["dice_release"] == pytest.approx(metrics["dice"])
    assert metrics["dice_release"] == pytest.approx(np.mean([r["dice_release"] for r in per_image]))
    # predict brings a new image to the teacher exactly as prepare did (BGR, bilinear).
    from textdiff.data.images import read_image
    from textdiff.data.prepared import load_prepared
    from textdiff.encoders.image import images_to_model_range
    from textdiff.predict.images import build_segmenter

    segmenter, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    seen = []
    extractor = segmenter.extractor
    segmenter.extractor = lambda x: seen.append(x.clone()) or extractor(x)
    image, _ = read_image(tiny_project.data_root / "Test_Folder" / "img" / "img_test_0.tif")
    segmenter.probabilities(image, "Many nuclei.")
    prepared = load_prepared("data/prepared", "test")
    torch.testing.assert_close(seen[0][0], images_to_model_range(prepared.images[:1])[0], rtol=0, atol=0)


def test_release_protocol_with_tiles_is_refused(tiny_project):
    tiny_project.write_params(data={"protocol": "release", "mode": "tiles"})
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 1 and "data.protocol=release" in result.output and "Traceback" not in result.output


def test_extract_refuses_data_prepared_under_another_protocol(tiny_project):
    """The spec must not claim `release` for images prepared the project's way."""
    tiny_project.write_params(data={"protocol": "release"})  # data/prepared was made with `project`
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 1 and "data.protocol=project" in result.output and "textdiff prepare" in result.output
    assert "Traceback" not in result.output and not Path("cache/features.zarr").exists()


# -- train.augment: release (the released code's augmentation, from cached views) ----------------


def test_release_augmentation_draws_the_released_mix_of_views():
    from textdiff.data.views import ViewLayout
    from textdiff.train.training import choose_view

    rng = np.random.default_rng(0)
    draws = [choose_view("release", ViewLayout(8, 4), rng) for _ in range(20000)]
    views = np.array([v for v, _ in draws])
    assert all(j == 0 for _, j in draws)  # real teacher features of each view, never flipped features
    assert set(views) <= {0, 4, 5, 6, 7, 8, 9, 10, 11}  # a quarter turn + flip is always a reflection
    share = lambda sel: float(np.mean(sel))  # noqa: E731
    assert share(views == 0) == pytest.approx(0.25, abs=0.015)
    assert share((views >= 4) & (views < 8)) == pytest.approx(0.5, abs=0.015)
    assert share(views >= 8) == pytest.approx(0.25, abs=0.015)
    for v in range(4, 12):
        assert share(views == v) == pytest.approx(0.125 if v < 8 else 0.0625, abs=0.01)
    dihedral = [choose_view("dihedral", ViewLayout(8, 4), rng)[0] for _ in range(4000)]
    assert set(dihedral) == set(range(8))  # the rotated copies are the release's alone
    assert choose_view("none", ViewLayout(8, 4), rng) == (0, 0)


def test_the_release_rotation_keeps_image_and_mask_aligned_with_black_corners():
    from textdiff.extract.extraction import rotate_like_release

    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    mask = (image[..., 0] > 128).astype(np.uint8)
    for angle in (-20, -7, 13, 19):
        rotated, rotated_mask = rotate_like_release(image, angle), rotate_like_release(mask, angle)
        assert rotated.shape == image.shape and rotated_mask.shape == mask.shape
        inside = rotated.any(-1)  # the source has no black pixel: black = outside the rotated square
        assert not inside[0, 0] and not inside[-1, -1]  # black corners
        assert np.array_equal(rotated_mask[inside], (rotated[..., 0] > 128)[inside])  # same nearest pixels
        assert not rotated_mask[~inside].any()


def test_extracting_rotated_copies_and_training_with_the_release_augmentation(tiny_project):
    from textdiff.cache.store import FeatureCache
    from textdiff.extract.extraction import rotate_like_release

    tiny_project.write_params(extract={"views": 1, "batch_size": 2, "rotations": 2}, train={"augment": "release"})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    train = runner.invoke(app, ["train"])  # no reflections in the cache: refused in one line
    assert train.exit_code == 1 and "train.augment=release needs the 8 dihedral views" in train.output
    assert "Traceback" not in train.output

    split = FeatureCache("cache/features.zarr").split("train")
    angles = np.asarray(split.group["rotation_angles"][:])
    assert angles.shape == (len(split), 2) and angles.min() >= -20 and angles.max() <= 19
    assert split.group["block_0"].shape[1] == 3  # the image, then two rotated copies
    for i in range(len(split)):
        for k in range(2):
            expected = rotate_like_release(split.mask(i, 0).numpy(), float(angles[i, k]))
            assert np.array_equal(split.mask(i, 1 + k).numpy(), expected)

    tiny_project.write_params(extract={"views": 8, "batch_size": 2, "rotations": 1},
                              train={"augment": "release", "epochs": 1})
    assert runner.invoke(app, ["extract"]).exit_code == 0
    again = np.asarray(FeatureCache("cache/features.zarr").split("train").group["rotation_angles"][:])
    assert np.array_equal(again[:, 0], angles[:, 0])  # seeded per image: the same first angle
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
