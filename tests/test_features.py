"""Feature taps: equal to a plain full forward, shared noise, early stop, clean hooks, shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_adm

from textdiff.errors import TextDiffError
from textdiff.teacher import Diffusion, FeatureExtractor, block_shapes, build_adm

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8",
            use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, num_head_channels=32)


def _model(**overrides):
    return random_adm({**TINY, **overrides}, 0.05)


def _reference(model, diffusion, images, steps, blocks, seed):
    """Straightforward version: full forward per step with hooks, noise from the seeded generator."""
    noise = torch.randn(3, *images.shape[-2:], generator=torch.Generator().manual_seed(seed))
    feats = {b: [] for b in blocks}
    for step in steps:
        acts = {}
        handles = [
            model.output_blocks[b].register_forward_hook(lambda _m, _i, out, b=b, acts=acts: acts.__setitem__(b, out))
            for b in blocks
        ]
        t = torch.full((images.shape[0],), step)
        with torch.no_grad():
            model(diffusion.q_sample(images, t, noise.expand_as(images)), t)
        for h in handles:
            h.remove()
        for b in blocks:
            feats[b].append(acts[b])
    return {b: torch.stack(v, dim=1) for b, v in feats.items()}


def test_features_equal_full_forward_and_stop_early():
    model, diffusion = _model(), Diffusion()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    steps, blocks = (50, 250), (1, 3, 4)
    ref = _reference(model, diffusion, images, steps, blocks, seed=0)

    calls = {"late": 0, "head": 0}
    model.output_blocks[5].register_forward_hook(lambda *_: calls.__setitem__("late", calls["late"] + 1))
    model.out.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    extractor = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, noise_seed=0)
    feats = extractor(images)
    assert calls == {"late": 0, "head": 0}  # nothing after the deepest tap (block 4) ran

    shapes = block_shapes(model.config, blocks)
    assert sorted(feats) == list(blocks)
    for b in blocks:
        assert feats[b].shape == (2, len(steps), *shapes[b])
        assert feats[b].dtype == torch.float32 and feats[b].device.type == "cpu"
        assert torch.equal(feats[b], ref[b]), b
    for b in blocks:
        assert len(model.output_blocks[b]._forward_hooks) == 0


def test_noise_is_shared_across_images_and_seeded():
    model, diffusion = _model(), Diffusion()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    extractor = FeatureExtractor(model, diffusion, steps=(100,), blocks=(2,), noise_seed=5)
    batch = extractor(image.repeat(3, 1, 1, 1))[2]
    single = extractor(image)[2]
    assert torch.equal(batch[0], batch[2]) and torch.allclose(batch[1], single[0], atol=1e-5)
    other_seed = FeatureExtractor(model, diffusion, steps=(100,), blocks=(2,), noise_seed=6)(image)[2]
    assert not torch.allclose(single, other_seed)
    expected = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(extractor.noise(32, 32), expected)


def test_hooks_are_removed_when_the_forward_fails():
    model, diffusion = _model(), Diffusion()
    blocks = (0, 2, 4)
    extractor = FeatureExtractor(model, diffusion, steps=(10,), blocks=blocks)

    def boom(*_args):
        raise RuntimeError("boom")

    handle = model.output_blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        extractor(torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert all(len(model.output_blocks[b]._forward_hooks) == 0 for b in blocks)
    assert extractor(torch.zeros(1, 3, 32, 32))[4].shape[0] == 1  # still usable


def test_validation_errors():
    model, diffusion = _model(), Diffusion("linear", 100)
    n = len(model.output_blocks)
    with pytest.raises(TextDiffError, match=f"blocks: {n} is not an output block"):
        FeatureExtractor(model, diffusion, steps=(1,), blocks=(0, n))
    with pytest.raises(TextDiffError, match="blocks: -1"):
        FeatureExtractor(model, diffusion, steps=(1,), blocks=(-1,))
    with pytest.raises(TextDiffError, match=r"steps: 100 is not a timestep in \[0, 100\)"):
        FeatureExtractor(model, diffusion, steps=(100,), blocks=(1,))
    with pytest.raises(TextDiffError, match="duplicate"):
        FeatureExtractor(model, diffusion, steps=(1,), blocks=(1, 1))
    with pytest.raises(TextDiffError, match="autocast_dtype"):
        FeatureExtractor(model, diffusion, steps=(1,), blocks=(1,), autocast_dtype=torch.int8)
    extractor = FeatureExtractor(model, diffusion, steps=(1,), blocks=(1,))
    with pytest.raises(TextDiffError, match=r"\[B, 3, H, W\]"):
        extractor(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TextDiffError, match="multiples of 4"):
        extractor(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TextDiffError, match=r"\[-1, 1\]"):
        extractor(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(TextDiffError, match="dtype"):
        extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_non_square_and_other_sizes_and_channels_last():
    model, diffusion = _model(), Diffusion()
    images = torch.rand(1, 3, 16, 24) * 2 - 1
    plain = FeatureExtractor(model, diffusion, steps=(30,), blocks=(0, 5))(images)
    assert plain[0].shape == (1, 1, 64, 4, 6) and plain[5].shape == (1, 1, 32, 16, 24)
    cl = FeatureExtractor(model, diffusion, steps=(30,), blocks=(0, 5), channels_last=True)(images)
    for b in plain:
        torch.testing.assert_close(cl[b], plain[b], atol=1e-4, rtol=1e-4)
    bf16 = FeatureExtractor(model, diffusion, steps=(30,), blocks=(0,), autocast_dtype="bfloat16")(images)
    assert bf16[0].dtype == torch.float32 and torch.allclose(bf16[0], plain[0], atol=0.2)


SHAPE_CONFIGS = {
    "tiny": TINY,
    "conv-updown-2-res": dict(TINY, num_res_blocks=2, resblock_updown=False, channel_mult="1,2"),
    "64-default-mult": dict(
        image_size=64, num_channels=32, num_res_blocks=1, channel_mult="", attention_resolutions="8"
    ),
    "half-mult": dict(
        image_size=32, num_channels=64, num_res_blocks=1, channel_mult=[0.5, 1, 2], attention_resolutions=""
    ),
}


@pytest.mark.parametrize("config", SHAPE_CONFIGS.values(), ids=SHAPE_CONFIGS.keys())
def test_block_shapes_match_real_forward(config):
    with torch.device("meta"):
        model = build_adm(config)
        size = model.config["image_size"]
        acts = {}
        for i, block in enumerate(model.output_blocks):
            block.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, tuple(out.shape[1:])))
        model(torch.empty(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    assert block_shapes(config, range(len(acts))) == acts


def test_block_shapes_of_the_256_model_and_default_blocks():
    spec_path = FIXTURES / "adm256_uncond_keys.json"
    if not spec_path.is_file():
        pytest.skip(f"fixture {spec_path} not found")
    spec = json.loads(spec_path.read_text())
    shapes = block_shapes(spec["config"], range(18))
    assert {str(i): [1, *s] for i, s in shapes.items()} == spec["output_block_shapes_for_1x3x256x256"]
    assert block_shapes(spec["config"], (6, 8, 12, 16)) == {
        6: (512, 32, 32), 8: (512, 64, 64), 12: (256, 128, 128), 16: (256, 256, 256)
    }
    with pytest.raises(TextDiffError, match="18"):
        block_shapes(spec["config"], (18,))


def test_fp16_torso_features_agree_with_float32():
    """The release's `use_fp16` torso: conv weights of input/middle/output blocks in float16, the
    rest float32. Its features match the float32 model's to half precision (runs on CPU too; on a
    GPU `build_featurizer` applies it for `use_fp16: true`)."""
    model = _model()
    half = _model().convert_to_fp16()
    assert half.input_blocks[0][0].weight.dtype == torch.float16
    assert half.time_embed[0].weight.dtype == torch.float32 and half.out[2].weight.dtype == torch.float32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    full = FeatureExtractor(model, Diffusion(), steps=(50, 250), blocks=(1, 3))(x)
    reduced = FeatureExtractor(half, Diffusion(), steps=(50, 250), blocks=(1, 3))(x)
    for b in (1, 3):
        assert reduced[b].dtype == torch.float32
        scale = full[b].abs().max()
        err = (reduced[b] - full[b]).abs().max() / scale
        assert 0 < err < 1e-2, (b, float(err))  # changed (it is fp16), but only at half precision


def test_fused_steps_storage_dtype_and_compile_agree_with_the_reference():
    """The GPU path's options on a CPU: one forward of B x steps images, the cast to the cache's
    dtype on the device, and torch.compile give the reference features (fusing and compiling up to
    float reassociation; the cast exactly)."""
    model, diffusion = _model(), Diffusion()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    steps, blocks = (50, 150, 250), (1, 4)
    ref = _reference(model, diffusion, images, steps, blocks, seed=0)
    fused = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, fuse_steps=True)(images)
    half = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, out_dtype=torch.float16)(images)
    compiled = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, compile=True)(images)
    for b in blocks:
        torch.testing.assert_close(fused[b], ref[b], rtol=1e-5, atol=1e-5)
        assert half[b].dtype == torch.float16 and torch.equal(half[b], ref[b].half())
        torch.testing.assert_close(compiled[b], ref[b], rtol=1e-4, atol=1e-4)
    assert not FeatureExtractor(model, diffusion, steps=steps, blocks=blocks).fuse_steps  # CPU default: per step
    with pytest.raises(TextDiffError, match="out_dtype"):
        FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, out_dtype=torch.int8)


def test_decoder_features_are_the_forward_s_own_activations():
    """`decoder_features` re-walks the UNet without hooks; it must stay the same computation as
    `forward` (a test against the hooked full forward, bit for bit)."""
    model = _model()
    x, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([10, 900])
    acts = {}
    handles = [model.output_blocks[b].register_forward_hook(lambda _m, _i, out, b=b: acts.__setitem__(b, out))
               for b in range(len(model.output_blocks))]
    with torch.no_grad():
        model(x, t)
        taps = model.decoder_features(x, t, (5, 0, 2))
    for h in handles:
        h.remove()
    assert [torch.equal(a, acts[b]) for a, b in zip(taps, (5, 0, 2))] == [True, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: pinned buffers and a copy stream")
def test_gpu_submit_copies_asynchronously_and_reuses_pinned_buffers():
    model, diffusion = _model(), Diffusion()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = FeatureExtractor(model, diffusion, steps=(50,), blocks=(1,), fuse_steps=False)(images)
    extractor = FeatureExtractor(model, diffusion, steps=(50,), blocks=(1,), device="cuda")
    first = extractor.submit(images)
    host = first.wait()[1]
    assert host.is_pinned()
    torch.testing.assert_close(host, ref[1].cuda().cpu(), rtol=1e-3, atol=1e-3)
    first.release()
    assert extractor.submit(images).wait()[1].data_ptr() == host.data_ptr()  # the released buffer, reused


def test_window_starts_cover_the_image_flush_with_its_far_edge():
    from textdiff.data.tiles import window_starts

    assert window_starts(128, 64, 32) == [0, 32, 64]
    assert window_starts(100, 64, 48) == [0, 36]  # the last window flush with the edge
    assert window_starts(64, 64, 32) == [0] and window_starts(40, 64, 32) == [0]


def test_windowed_features_are_each_windows_own_where_one_window_covers():
    """A 64 px image in 32 px windows every 16 px: the top-left 16 x 16 corner is seen by the first
    window alone, so the blend there is exactly that window's own forward (on the same noise); the
    centre is a blend, and a window as large as the image changes nothing."""
    model, diffusion = _model(), Diffusion()
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    steps, blocks = (50, 250), (1, 4)
    whole = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks)
    windowed = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, window=32, window_stride=16)
    same = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks, window=64)
    full, blended, unchanged = whole(images), windowed(images), same(images)
    corner = FeatureExtractor(model, diffusion, steps=steps, blocks=blocks)
    big_noise = whole.noise(64, 64)
    corner.noise = lambda h, w: big_noise[:, :h, :w]
    own = corner(images[:, :, :32, :32])
    for b in blocks:
        assert blended[b].shape == full[b].shape
        torch.testing.assert_close(unchanged[b], full[b], rtol=0, atol=0)
        k = blended[b].shape[-1] // 4  # 16 input pixels at this block's scale
        torch.testing.assert_close(blended[b][..., :k, :k], own[b][..., :k, :k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(blended[4], full[4], atol=1e-3)  # the windows do see something else


def test_a_window_the_unet_cannot_take_is_refused_in_one_line():
    with pytest.raises(TextDiffError, match="extract.window 30"):
        FeatureExtractor(_model(), Diffusion(), steps=(50,), blocks=(1,), window=30)
