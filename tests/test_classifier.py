"""PixelClassifier: shapes, gradients, text sensitivity, padding, parameter sharing, init."""

import json

import pytest
import torch

from textdiff.errors import TextDiffError
from textdiff.model.classifier import FUSIONS, ClassifierConfig, PixelClassifier
from textdiff.model.losses import total_loss

CHANNELS = [8, 8, 4, 4]
SIZES = [8, 16, 32, 64]
STEPS, TEXT_DIM, D_MODEL, HEADS, OUT = 3, 12, 16, 2, 64
B, L = 2, 5


def make_model(fusion: str, **kw) -> PixelClassifier:
    torch.manual_seed(0)
    return PixelClassifier(ClassifierConfig(
        CHANNELS, STEPS, TEXT_DIM, d_model=D_MODEL, heads=HEADS, fusion=fusion, out_size=OUT, contrastive_dim=8, **kw
    ))


def make_inputs(seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, STEPS, c, s, s, generator=g).to(dtype) for c, s in zip(CHANNELS, SIZES)]
    tokens = torch.randn(B, L, TEXT_DIM, generator=g).to(dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0  # sample 0 has two padding tokens
    pooled = torch.randn(B, TEXT_DIM, generator=g).to(dtype)
    return feats, tokens, mask, pooled


@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes(fusion):
    model = make_model(fusion)
    out = model(*make_inputs())
    assert out["logits"].shape == (B, 2, OUT, OUT)
    if fusion == "none":
        assert set(out) == {"logits"}
    else:
        assert out["image_embedding"].shape == (B, 8)
        assert out["text_embedding"].shape == (B, 8)


def test_fp16_features_are_cast_and_rectangular_out_size():
    model = PixelClassifier(ClassifierConfig(CHANNELS, STEPS, TEXT_DIM, d_model=D_MODEL, heads=HEADS,
                                             out_size=(40, 48)))
    feats, tokens, mask, pooled = make_inputs()
    out = model([f.half() for f in feats], tokens, mask.bool(), pooled)
    assert out["logits"].shape == (B, 2, 40, 48)
    assert out["logits"].dtype == torch.float32


def test_dict_block_channels_read_in_block_order():
    model = PixelClassifier(ClassifierConfig({16: 4, 6: 8, 12: 4, 8: 8}, STEPS, TEXT_DIM, d_model=D_MODEL, heads=HEADS,
                                             out_size=OUT))
    assert model.block_channels == CHANNELS
    assert model(*make_inputs())["logits"].shape == (B, 2, OUT, OUT)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_parameter(fusion):
    model = make_model(fusion).train()
    out = model(*make_inputs())
    target = (torch.rand(B, OUT, OUT, generator=torch.Generator().manual_seed(3)) > 0.5).long()
    weight = 0.0 if fusion == "none" else 0.1
    loss, parts = total_loss(out, target, dice_weight=1.5, contrastive_weight=weight)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if fusion == "none":
        assert not any("text" in n or "blocks" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("fusion", ["cross_attention", "hierarchical", "concat", "none"])
def test_text_changes_output_unless_none(fusion):
    model = make_model(fusion).double().eval()
    feats, tokens, mask, pooled = make_inputs(dtype=torch.float64)
    with torch.no_grad():
        a = model(feats, tokens, mask, pooled)["logits"]
        b = model(feats, tokens.flip(0) * 3, mask, pooled.flip(0) * 3)["logits"]
    diff = (a - b).abs().max().item()
    if fusion == "none":
        assert diff == 0.0
        with torch.no_grad():  # text is ignored entirely, even absent
            assert torch.equal(model(feats, None, None, None)["logits"], a)
    else:
        assert diff > 1e-6 * a.abs().max().item()


def test_masked_token_does_not_change_output():
    model = make_model("cross_attention").double().eval()
    feats, tokens, mask, pooled = make_inputs(dtype=torch.float64)
    with torch.no_grad():
        ref = model(feats, tokens, mask, pooled)["logits"]
        padded = tokens.clone()
        padded[0, 4] = 100.0  # a pad token of sample 0
        same = model(feats, padded, mask, pooled)["logits"]
        real = tokens.clone()
        real[0, 1] = 100.0  # a real token of sample 0
        changed = model(feats, real, mask, pooled)["logits"]
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-12)
    assert (changed[0] - ref[0]).abs().max() > 1e-6 * ref.abs().max()
    # (no cross-sample check: the decoder's BN uses batch statistics, see the classifier docstring)


def test_all_padding_row_is_finite_and_text_free():
    model = make_model("cross_attention").double().eval()
    feats, tokens, mask, pooled = make_inputs(dtype=torch.float64)
    mask[0] = 0
    one = [f[:1] for f in feats]  # inference is one image per pass (batch-statistics BN)
    with torch.no_grad():
        a = model(one, tokens[:1], mask[:1], pooled[:1])["logits"]
        b = model(one, tokens[:1] * 5, mask[:1], pooled[:1])["logits"]
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_hierarchical_has_one_block_per_scale():
    shared = make_model("cross_attention")
    per_scale = make_model("hierarchical")
    n_shared = sum(p.numel() for p in shared.parameters())
    n_per_scale = sum(p.numel() for p in per_scale.parameters())
    block = sum(p.numel() for p in shared.blocks[0].parameters())
    assert len(shared.blocks) == 1 and len(per_scale.blocks) == len(CHANNELS)
    assert n_per_scale == n_shared + (len(CHANNELS) - 1) * block
    assert per_scale.blocks[0].attn.to_q.weight.data_ptr() != per_scale.blocks[1].attn.to_q.weight.data_ptr()


def test_config_round_trips_through_model_json():
    config = ClassifierConfig({16: 4, 6: 8}, STEPS, TEXT_DIM, heads=3, fusion="concat", out_size=(40, 48))
    assert config.block_channels == (8, 4) and config.d_model == TEXT_DIM and config.out_size == (40, 48)
    assert ClassifierConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    legacy = {"block_channels": [8, 4], "num_steps": STEPS, "text_dim": TEXT_DIM, "d_model": 12, "heads": 3,
              "fusion": "concat", "out_size": 64}  # a model.json written before ClassifierConfig
    assert ClassifierConfig.from_json(legacy).out_size == (64, 64)
    with pytest.raises(TextDiffError, match="fusoin"):
        ClassifierConfig.from_json({**legacy, "fusoin": "none"})


def test_init_statistics():
    torch.manual_seed(0)
    model = PixelClassifier(ClassifierConfig([64, 64], 3, 64, heads=4, out_size=16))
    conv = model.decoder[0].weight
    assert abs(conv.std().item() - 0.02) < 0.001 and abs(conv.mean().item()) < 0.001
    q = model.blocks[0].attn.to_q.weight
    assert abs(q.std().item() - 0.02) < 0.002
    bn = model.decoder[1].weight
    assert abs(bn.mean().item() - 1.0) < 0.01 and 0.01 < bn.std().item() < 0.03
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1)


def test_bad_params_raise():
    with pytest.raises(TextDiffError, match="cross_attention, hierarchical, concat, none"):
        PixelClassifier(ClassifierConfig(CHANNELS, STEPS, TEXT_DIM, fusion="film"))
    with pytest.raises(TextDiffError, match="divisible"):
        PixelClassifier(ClassifierConfig(CHANNELS, STEPS, TEXT_DIM, d_model=18, heads=4))
    model = make_model("cross_attention")
    feats, tokens, mask, pooled = make_inputs()
    with pytest.raises(TextDiffError, match="feature blocks"):
        model(feats[:3], tokens, mask, pooled)
    with pytest.raises(TextDiffError, match="feature block 1"):
        model([feats[0], feats[2], feats[2], feats[3]], tokens, mask, pooled)


def test_inference_normalises_each_image_by_its_own_statistics():
    """BN without running stats: eval output equals train-mode output, and does not depend on
    which images were seen in training (no running averages to drift)."""
    torch.manual_seed(0)
    feats = [torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 4, 16, 16)]
    model = PixelClassifier(ClassifierConfig([4, 4], 2, 12, d_model=8, heads=2, fusion="none", out_size=16))
    assert not any(isinstance(b, torch.Tensor) and "running" in n for n, b in model.named_buffers())
    model.eval()
    with torch.no_grad():
        a = model(feats)["logits"]
        model.train()
        b = model(feats)["logits"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("distance_decoder", ["separate", "shared"])
def test_the_distance_head_reads_the_mask_decoder_only_when_shared(distance_decoder):
    model = make_model("cross_attention", distance_head=True, distance_decoder=distance_decoder)
    feats, tokens, mask, pooled = make_inputs()
    out = model(feats, tokens, mask, pooled)
    assert out["distance_logits"].shape[:2] == (B, 1) and out["logits"].shape[:2] == (B, 2)
    out["distance_logits"].sum().backward()
    mask_decoder_grad = model.decoder[0].weight.grad
    touched = mask_decoder_grad is not None and mask_decoder_grad.abs().sum() > 0
    assert touched == (distance_decoder == "shared")
    assert model.proj[0].weight.grad.abs().sum() > 0  # both learn from the fused features


def test_an_unknown_distance_decoder_is_refused_in_one_line():
    with pytest.raises(TextDiffError, match="unknown distance_decoder 'own'"):
        make_model("cross_attention", distance_head=True, distance_decoder="own")


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_bfloat16_autocast_computes_what_float32_does_and_returns_float32(fusion):
    exact = make_model(fusion, distance_head=True, distance_decoder="separate")
    fast = make_model(fusion, distance_head=True, distance_decoder="separate", autocast="bfloat16")
    fast.load_state_dict(exact.state_dict())
    inputs = make_inputs()
    a, b = exact(*inputs), fast(*inputs)
    assert set(a) == set(b)
    for key in a:
        assert b[key].dtype == torch.float32, key
        scale = a[key].abs().max().item()
        err = (a[key] - b[key]).abs().max().item()
        assert err < 0.05 * scale, (key, err, scale)  # bfloat16 keeps 8 bits of mantissa, not less
        assert err > 0, key  # the switch does change the arithmetic
    b["logits"].sum().backward()  # and it trains: gradients reach the first projection
    assert fast.proj[0].weight.grad.abs().sum() > 0


def test_autocast_is_recorded_and_old_model_json_reads_as_float32():
    config = make_model("cross_attention", autocast="bfloat16").config
    assert ClassifierConfig.from_json(json.loads(json.dumps(config.to_json()))).autocast == "bfloat16"
    old = {k: v for k, v in config.to_json().items() if k != "autocast"}
    assert ClassifierConfig.from_json(old).autocast == "float32"
    with pytest.raises(TextDiffError, match="unknown autocast 'float16'"):
        make_model("cross_attention", autocast="float16")
