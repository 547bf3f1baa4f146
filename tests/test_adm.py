"""ADM UNet: parity with guided-diffusion (fixtures), key manifest of the released 256 model,
structure across the config family, an independent check of both attention layouts, the SDPA
attention against the einsum form it replaced, and where the teacher attends."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from textdiff.errors import TextDiffError
from textdiff.teacher import ADM_DEFAULTS, build_adm, normalize_config
from textdiff.teacher.adm import AttentionBlock, attention_token_counts, qkv_attention, timestep_embedding

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "adm_small_io.pt").is_file(),
    reason=f"guided-diffusion parity fixtures not found in {FIXTURES}",
)


def _tap_output_blocks(model):
    acts, handles = {}, []
    for i, block in enumerate(model.output_blocks):
        handles.append(block.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, out)))
    return acts, handles


# -- parity with guided-diffusion -----------------------------------------------------------------


@needs_fixtures
def test_small_model_matches_guided_diffusion_outputs():
    io = torch.load(FIXTURES / "adm_small_io.pt", weights_only=True)
    state = torch.load(FIXTURES / "adm_small_state_dict.pt", weights_only=True)
    model = build_adm(io["config"]).eval()
    model.load_state_dict(state, strict=True)
    acts, handles = _tap_output_blocks(model)
    with torch.no_grad():
        out = model(io["x_t"], io["t"])
    for h in handles:
        h.remove()
    assert out.shape == io["output"].shape == (2, 6, 64, 64)
    assert (out - io["output"]).abs().max().item() <= 1e-4
    assert sorted(acts) == sorted(io["output_blocks"]) == list(range(12))
    diffs = {"output": (out - io["output"]).abs().max().item()}
    for i, ref in io["output_blocks"].items():
        assert acts[i].shape == ref.shape, i
        diffs[f"output_blocks[{i}]"] = (acts[i] - ref).abs().max().item()
        assert diffs[f"output_blocks[{i}]"] <= 1e-4, f"output_blocks[{i}]"
    # Shown with `pytest -s` (or -rP): the margin left under the 1e-4 bound, per tensor.
    print("max |ours - guided-diffusion|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@needs_fixtures
def test_released_256_model_key_manifest_and_parameter_count():
    spec = json.loads((FIXTURES / "adm256_uncond_keys.json").read_text())
    with torch.device("meta"):
        model = build_adm(spec["config"])
        x = torch.empty(1, 3, 256, 256)
        t = torch.zeros(1, dtype=torch.long)
        acts, handles = _tap_output_blocks(model)
        with torch.no_grad():
            out = model(x, t)
    for h in handles:
        h.remove()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(spec["state_dict"])  # same keys, same order
    assert shapes == spec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"] == 552814086
    assert {str(i): list(a.shape) for i, a in acts.items()} == spec["output_block_shapes_for_1x3x256x256"]
    assert tuple(out.shape) == (1, 6, 256, 256)
    assert normalize_config(spec["config"]) == spec["config"]


# -- structure across the family ------------------------------------------------------------------

BASE = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16")

FAMILY = {
    "three-levels": dict(channel_mult="1,1,2", attention_resolutions="16,8"),
    "one-level": dict(channel_mult="2", attention_resolutions="32"),
    "heads-by-count": dict(num_heads=4, num_head_channels=-1),
    "heads-by-width": dict(num_head_channels=16),
    "upsample-heads": dict(num_heads=2, num_heads_upsample=4),
    "new-attention-order": dict(num_heads=2, use_new_attention_order=True),
    "conv-updown": dict(resblock_updown=False),
    "resblock-updown": dict(resblock_updown=True),
    "scale-shift": dict(use_scale_shift_norm=True),
    "learn-sigma": dict(learn_sigma=True),
    "res-blocks-2": dict(num_res_blocks=2),
    "res-blocks-3": dict(num_res_blocks=3, channel_mult=[1, 1, 2], resblock_updown=True),
    "list-config": dict(channel_mult=(1, 2), attention_resolutions=[16, 8]),
    "no-attention": dict(attention_resolutions=""),
    "dropout-checkpoint-fp16": dict(dropout=0.1, use_checkpoint=True, use_fp16=True),
}


def _expected_pyramid(cfg):
    """Independent of the implementation: (C, H) of every decoder block and the encoder count."""
    mults = [float(m) for m in cfg["channel_mult"].split(",")]
    shapes = []
    for level in reversed(range(len(mults))):
        for i in range(cfg["num_res_blocks"] + 1):
            up = level > 0 and i == cfg["num_res_blocks"]
            shapes.append((int(mults[level] * cfg["num_channels"]), cfg["image_size"] // 2 ** (level - up)))
    n_in = 1 + len(mults) * cfg["num_res_blocks"] + len(mults) - 1
    return shapes, n_in


@pytest.mark.parametrize("overrides", FAMILY.values(), ids=FAMILY.keys())
def test_family_structure_and_forward_shapes(overrides):
    torch.manual_seed(0)
    model = build_adm({**BASE, **overrides}).eval()
    cfg = model.config
    expected, n_in = _expected_pyramid(cfg)
    assert len(model.input_blocks) == n_in
    assert len(model.output_blocks) == len(expected)

    x = torch.randn(2, 3, 32, 32)
    acts, handles = _tap_output_blocks(model)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    for h in handles:
        h.remove()
    assert out.shape == (2, 6 if cfg["learn_sigma"] else 3, 32, 32)
    assert torch.isfinite(out).all()
    assert [(a.shape[1], a.shape[2]) for a in (acts[i] for i in range(len(expected)))] == expected

    sd = model.state_dict()
    assert all(p.dtype == torch.float32 for p in sd.values())
    assert {k.split(".")[0] for k in sd} == {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}
    assert sd["out.2.weight"].shape[0] == out.shape[1]
    # Zero-initialized output head and residual convs: a fresh model predicts exactly zero.
    assert out.abs().max() == 0
    if cfg["resblock_updown"]:
        assert any(".h_upd" in n for n, _ in model.named_modules())
        assert not any(k.endswith(".op.weight") for k in sd)
    elif len(expected) > cfg["num_res_blocks"] + 1:
        assert any(k.endswith(".op.weight") for k in sd) and any(k.endswith(".conv.weight") for k in sd)
    emb_width = {v.shape[0] for k, v in sd.items() if k.endswith("emb_layers.1.weight") and k.startswith("middle")}
    ch = int(float(cfg["channel_mult"].split(",")[-1]) * cfg["num_channels"])
    assert emb_width == {2 * ch if cfg["use_scale_shift_norm"] else ch}


def test_nonzero_weights_flow_end_to_end_and_scalar_timestep():
    torch.manual_seed(0)
    model = build_adm({**BASE, "use_scale_shift_norm": True, "resblock_updown": True}).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x, torch.tensor([7, 7]))
        b = model(x, 7)
        c = model(x, torch.tensor([8, 8]))
    assert a.abs().max() > 0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the timestep reaches the output


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_adm({**BASE, "use_scale_shift_norm": True})
    for p in plain.parameters():
        p.data.normal_(0, 0.05)
    ckpt = build_adm({**BASE, "use_scale_shift_norm": True, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 500])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 3])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)])
    torch.testing.assert_close(emb[1], expected)
    assert emb[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert timestep_embedding(t, 7).shape == (2, 7)


# -- attention, checked against a from-the-formula reference --------------------------------------


def _reference_attention(block: AttentionBlock, x: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) v per head, with an explicit layout of the fused qkv channels."""
    b, c, h, w = x.shape
    d = c // heads
    seq = x.reshape(b, c, h * w)
    normed = torch.nn.functional.group_norm(seq, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], normed) + block.qkv.bias[None, :, None]
    if new_order:  # [q(all heads) | k(all heads) | v(all heads)], each [heads, d]
        q, k, v = (part.reshape(b, heads, d, h * w) for part in qkv.split(c, dim=1))
    else:  # per head: [q | k | v] of width d each
        per_head = qkv.reshape(b, heads, 3 * d, h * w)
        q, k, v = per_head[:, :, :d], per_head[:, :, d : 2 * d], per_head[:, :, 2 * d :]
    attn = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    mixed = torch.einsum("bhts,bhds->bhdt", attn, v).reshape(b, c, h * w)
    proj = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], mixed) + block.proj_out.bias[None, :, None]
    return (seq + proj).reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [True, False], ids=["new-order", "legacy"])
@pytest.mark.parametrize("heads,head_channels", [(4, -1), (1, 32)], ids=["by-count", "by-width"])
def test_attention_block_matches_reference(new_order, heads, head_channels):
    torch.manual_seed(1)
    c = 64
    block = AttentionBlock(c, num_heads=heads, num_head_channels=head_channels, use_new_attention_order=new_order)
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, c, 5, 6)
    n_heads = heads if head_channels == -1 else c // head_channels
    with torch.no_grad():
        ours = block(x)
        ref = _reference_attention(block, x, n_heads, new_order)
        other = _reference_attention(block, x, n_heads, not new_order)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - other).abs().max().item() > 1e-2  # the two layouts really differ


# -- SDPA attention vs the einsum form it replaced ----------------------------------------------


def _einsum_qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """The pre-SDPA qkv_attention, kept as the reference: explicit T x T logits, q and k each
    scaled by C^-1/4, softmax in float32, output [B, H*C, T]."""
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(b * num_heads, ch, length) for part in qkv.chunk(3, dim=1))
    quarter = ch**-0.25
    logits = torch.einsum("bct,bcs->bts", q * quarter, k * quarter)
    weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(b, -1, length)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new-order"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("length", [256, 1024])
def test_qkv_attention_matches_the_einsum_reference(legacy, heads, length):
    torch.manual_seed(length + heads)
    ch = 32
    qkv = torch.randn(2, 3 * heads * ch, length) * 2  # logits of std ~4: a peaked softmax
    with torch.no_grad():
        ours = qkv_attention(qkv, heads, legacy)
        ref = _einsum_qkv_attention(qkv, heads, legacy)
    assert ours.shape == ref.shape == (2, heads * ch, length)
    assert ours.dtype == torch.float32
    # float32 rounding of a different summation order grows with |v| (outputs reach ~7
    # here; measured ~2e-6 of that), so the 1e-5 bound is relative to the output scale.
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_qkv_attention_reference_comparison_can_fail():
    """The comparison above is sensitive to what could plausibly go wrong: head order, scale."""
    torch.manual_seed(0)
    heads, ch, length = 4, 32, 256
    qkv = torch.randn(1, 3 * heads * ch, length) * 2
    with torch.no_grad():
        for legacy in (True, False):
            swapped = _einsum_qkv_attention(qkv, heads, not legacy)
            assert (qkv_attention(qkv, heads, legacy) - swapped).abs().max().item() > 1e-2
        unscaled = _einsum_qkv_attention(qkv * ch**0.25, heads, True)  # i.e. no 1/sqrt(C) on the logits
        assert (qkv_attention(qkv, heads, True) - unscaled).abs().max().item() > 1e-2


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new-order"])
def test_qkv_attention_runs_on_a_fused_kernel(legacy):
    """Restricted to the flash kernel, SDPA raises instead of falling back to its T x T "math"
    path. Channel-major (transposed) views would be refused here, and would silently lose
    the memory and speed this function exists for."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    qkv = torch.randn(1, 3 * 2 * 32, 64)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = qkv_attention(qkv, 2, legacy)
        strided = [t.transpose(-1, -2) for t in qkv.reshape(1, 2, 96, 64).split(32, dim=2)]
        with pytest.raises(RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch explains the refusal; expected here
            torch.nn.functional.scaled_dot_product_attention(*strided)
    assert (out - _einsum_qkv_attention(qkv, 2, legacy)).abs().max().item() <= 1e-5


def test_qkv_attention_half_precision_and_gradients():
    torch.manual_seed(0)
    heads, ch, length = 2, 32, 128
    qkv = torch.randn(2, 3 * heads * ch, length, dtype=torch.float64).float()
    with torch.no_grad():
        ref = _einsum_qkv_attention(qkv, heads, True)
        low = qkv_attention(qkv.bfloat16(), heads, True)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 5e-2  # bfloat16 inputs: ~3 significant digits

    # The teacher is also trained (pretrain): gradients must match the einsum form's too.
    grads = []
    for fn in (qkv_attention, _einsum_qkv_attention):
        x = qkv.clone().requires_grad_(True)
        (fn(x, heads, False) * torch.linspace(-1, 1, length)).sum().backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5


# -- where the teacher attends --------------------------------------------------------------------

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "models" / "teacher" / "monuseg-adm32.json"
OPENAI_256 = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                  attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                  use_scale_shift_norm=True, resblock_updown=True)


def test_attention_token_counts_of_the_shipped_teacher():
    config = json.loads(SHIPPED_TEACHER.read_text())["config"]
    assert config["image_size"] == 64 and config["attention_resolutions"] == "16,8"
    # "16,8" at 64 = ds 4 and 8; the middle block sits at the deepest of 6 levels, ds 32.
    assert attention_token_counts(config, 256) == [(64, 4096), (32, 1024), (8, 64)]
    assert attention_token_counts(config, 64) == [(16, 256), (8, 64), (2, 4)]
    assert attention_token_counts(config) == attention_token_counts(config, 64)  # training size


def test_attention_token_counts_of_openai_256_and_edge_cases():
    assert attention_token_counts(OPENAI_256, 256) == [(32, 1024), (16, 256), (8, 64)]  # middle at 8 too
    assert attention_token_counts(OPENAI_256, 512) == [(64, 4096), (32, 1024), (16, 256)]
    assert attention_token_counts({**BASE, "attention_resolutions": ""}) == [(16, 256)]  # middle only
    # A resolution coarser than the deepest level matches no block (as upstream).
    assert attention_token_counts({**BASE, "attention_resolutions": "32,4"}) == [(32, 1024), (16, 256)]
    for bad in (48, 0, 33):
        with pytest.raises(TextDiffError, match="image_size"):
            attention_token_counts(OPENAI_256, bad)


def test_attention_token_counts_agree_with_the_built_model():
    """Independent of the helper's arithmetic: hook every AttentionBlock and read its input size."""
    config = json.loads(SHIPPED_TEACHER.read_text())["config"]
    with torch.device("meta"):
        model = build_adm(config)
        seen = set()
        for module in model.modules():
            if isinstance(module, AttentionBlock):
                module.register_forward_hook(lambda _m, inp, _o: seen.add(inp[0].shape[-1]))
        with torch.no_grad():
            model(torch.empty(1, 3, 128, 128), torch.zeros(1, dtype=torch.long))
    assert sorted(seen, reverse=True) == [side for side, _ in attention_token_counts(config, 128)]


# -- config validation ----------------------------------------------------------------------------


def test_normalize_config_fills_create_model_defaults():
    cfg = normalize_config({"image_size": 64, "num_channels": 64, "num_res_blocks": 2})
    assert list(cfg) == ["image_size", "num_channels", "num_res_blocks", *ADM_DEFAULTS]
    assert {k: cfg[k] for k in ADM_DEFAULTS} == ADM_DEFAULTS
    assert ADM_DEFAULTS["attention_resolutions"] == "16" and ADM_DEFAULTS["num_heads"] == 1
    assert normalize_config({**cfg, "channel_mult": [1, 2.0, 3], "attention_resolutions": [16, 8]})[
        "channel_mult"
    ] == "1,2,3"
    model = build_adm({"image_size": 64, "num_channels": 32, "num_res_blocks": 1})
    assert model.channel_mult == (1, 2, 3, 4)
    assert model.config == normalize_config(model.config)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"image_size": None}, "image_size"),
        ({"class_cond": True}, "class_cond is not supported"),
        ({"num_channels": 48}, "not a positive multiple of 32"),
        ({"num_heads": 3}, "num_heads: 3 heads do not divide"),
        ({"num_heads_upsample": 3}, "num_heads_upsample"),
        ({"num_head_channels": 24}, "num_head_channels: 24 does not divide"),
        ({"channel_mult": "1,x"}, "channel_mult"),
        ({"channel_mult": "", "image_size": 96}, "no default for image_size 96"),
        ({"attention_resolutions": "12"}, "attention_resolutions: 12"),
        ({"image_size": 34, "channel_mult": "1,1,2"}, "not divisible by 2^2"),
        ({"learn_sigma": "yes"}, "learn_sigma: expected true or false"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks: must be >= 1"),
    ],
)
def test_invalid_configs_raise_one_line_errors(overrides, fragment):
    cfg = {**BASE, **overrides}
    if overrides.get("image_size", 0) is None:
        del cfg["image_size"]
    with pytest.raises(TextDiffError) as info:
        build_adm(cfg)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
