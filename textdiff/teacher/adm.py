"""The ADM UNet of Dhariwal & Nichol ("guided-diffusion"), in one file.

Why a re-implementation rather than a dependency: TextDiff only needs the unconditional
image UNet, frozen, as a feature extractor (plus a small amount of pretraining), and the
upstream package drags in MPI, blobfile and fp16 master-weight machinery. What *must* be
preserved is compatibility with the released checkpoints, so this file keeps:

* the configuration vocabulary of guided-diffusion's ``create_model`` (same keyword names,
  same defaults, same meaning of ``channel_mult=""`` and ``attention_resolutions``);
* the module tree and therefore every state-dict key and shape
  (``time_embed`` / ``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``);
* the exact forward arithmetic (timestep embedding, skip order, both QKV head layouts,
  FiLM "scale-shift" norm, up/down-sampling inside residual blocks), so that a released
  256x256 checkpoint produces the same activations as it does upstream.

What is dropped: class conditioning (rejected with a clear error), 1-D and 3-D variants, and
the encoder / super-resolution models. The fp16 torso is kept as upstream has it, but applied on
request (`UNetModel.convert_to_fp16`; the feature extractor does it for ``use_fp16: true`` on a
GPU), so that building a model never changes its parameters' dtype behind the caller's back.

Reading guide, top to bottom: config validation, small layers, ResBlock, AttentionBlock,
UNetModel (construction then forward), ``build_adm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _grad_checkpoint

from textdiff.errors import TextDiffError

# ----------------------------------------------------------------------------------------------
# Configuration: the keyword set of guided-diffusion's create_model, validated up front.
# ----------------------------------------------------------------------------------------------

REQUIRED_KEYS: tuple[str, ...] = ("image_size", "num_channels", "num_res_blocks")

#: create_model's defaults for every optional keyword (the required three have none).
ADM_DEFAULTS: dict[str, Any] = {
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "16",
    "num_heads": 1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "dropout": 0,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}

#: What channel_mult="" means, per image size (create_model's table).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

_KEY_ORDER = ("image_size", "num_channels", "num_res_blocks", *ADM_DEFAULTS)
_BOOL_KEYS = (
    "learn_sigma",
    "class_cond",
    "use_checkpoint",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
)
GROUPS = 32  # GroupNorm32: every normalized channel count must be a multiple of this.


def _int(key: str, value: Any, minimum: int, allow_minus_one: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TextDiffError(f"{key}: expected an integer, got {value!r}")
    if allow_minus_one and value == -1:
        return value
    if value < minimum:
        extra = " (or -1)" if allow_minus_one else ""
        raise TextDiffError(f"{key}: must be >= {minimum}{extra}, got {value}")
    return value


def _number_list(key: str, value: Any) -> list[float]:
    """Parse "1,1,2" or [1, 1, 2] into numbers; strings are what create_model's CLI passes."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise TextDiffError(f"{key}: expected comma-separated numbers, got {value!r}") from None
    elif isinstance(value, Sequence):
        numbers = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise TextDiffError(f"{key}: expected numbers, got {item!r} in {list(value)!r}")
            numbers.append(float(item))
    else:
        raise TextDiffError(f"{key}: expected a comma-separated string or a list, got {value!r}")
    if not numbers:
        raise TextDiffError(f"{key}: must not be empty")
    return numbers


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def resolved_channel_mult(config: Mapping[str, Any]) -> tuple[float, ...]:
    """The per-level channel multipliers a (normalized) config stands for."""
    cm = config["channel_mult"]
    if cm == "" or cm is None:
        size = config["image_size"]
        if size not in DEFAULT_CHANNEL_MULT:
            known = ", ".join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))
            raise TextDiffError(
                f"channel_mult: '' has no default for image_size {size} (defaults exist for "
                f"{known}); give one explicitly, e.g. '1,1,2,2'"
            )
        return DEFAULT_CHANNEL_MULT[size]
    mults = _number_list("channel_mult", cm)
    return tuple(int(m) if m.is_integer() else m for m in mults)


def resolved_attention_ds(config: Mapping[str, Any]) -> tuple[int, ...]:
    """Downsampling factors (1, 2, 4, ...) at which attention runs: image_size // resolution."""
    ar = config["attention_resolutions"]
    if ar == "" or ar is None:
        return ()
    return tuple(config["image_size"] // int(r) for r in _number_list("attention_resolutions", ar))


def attention_token_counts(config: Mapping[str, Any], image_size: int | None = None) -> list[tuple[int, int]]:
    """Where the UNet of `config` attends on ``image_size`` x ``image_size`` inputs.

    Returns ``(side, tokens)`` pairs, tokens = side**2, one per distinct resolution, largest
    first; ``image_size=None`` means the config's own (training) image_size.

    Why: attention cost grows with tokens squared, and it is easy to misjudge. The
    ``attention_resolutions`` of create_model are resolutions *at the config's image_size*;
    the network stores them as downsampling factors ds = config image_size // resolution, so
    on a different input size the same blocks run at side = image_size // ds. The shipped
    teacher (trained at 64, "16,8") therefore attends over 64x64 = 4096 tokens on the
    pipeline's 256x256 images, not 16x16. The middle block always attends, at the deepest
    level, and is included; a resolution coarser than the deepest level matches no block
    (as upstream) and is left out.
    """
    cfg = normalize_config(config)
    size = cfg["image_size"] if image_size is None else image_size
    levels = len(resolved_channel_mult(cfg))
    deepest = 2 ** (levels - 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % deepest:
        raise TextDiffError(
            f"image_size: {size!r} is not a positive multiple of 2^{levels - 1}, which this "
            f"teacher's {levels} levels need"
        )
    level_ds = {2**level for level in range(levels)}
    ds_values = {ds for ds in resolved_attention_ds(cfg) if ds in level_ds} | {deepest}
    return [(size // ds, (size // ds) ** 2) for ds in sorted(ds_values)]


def config_problem(key: str, config: Mapping[str, Any]) -> str | None:
    """An ADM config from params (`teacher.config`, `pretrain.config`) checked as the model reads
    it, as one line naming the key (None: fine or empty, i.e. the checkpoint's own)."""
    if not config:
        return None
    try:
        normalize_config(config)
    except TextDiffError as err:
        return f"{key}: {err}"
    return None


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill create_model's defaults and check that the config describes a buildable UNet.

    Returns a new dict with all sixteen keys in create_model's order. ``channel_mult`` and
    ``attention_resolutions`` are kept as comma strings (``""`` stays ``""``) so the result is
    JSON-friendly and still valid create_model input; lists are converted to that form.
    Every problem raises `TextDiffError` with one line naming the key.
    """
    if not isinstance(config, Mapping):
        raise TextDiffError(f"teacher config: expected a mapping of create_model keywords, got {config!r}")
    unknown = [k for k in config if k not in _KEY_ORDER]
    if unknown:
        raise TextDiffError(
            f"{unknown[0]}: unknown key (create_model keywords are: {', '.join(_KEY_ORDER)})"
        )
    for key in REQUIRED_KEYS:
        if key not in config:
            raise TextDiffError(f"{key}: required key is missing")
    cfg: dict[str, Any] = {key: config.get(key, ADM_DEFAULTS.get(key)) for key in _KEY_ORDER}

    cfg["image_size"] = _int("image_size", cfg["image_size"], 1)
    cfg["num_channels"] = _int("num_channels", cfg["num_channels"], 1)
    cfg["num_res_blocks"] = _int("num_res_blocks", cfg["num_res_blocks"], 1)
    cfg["num_heads"] = _int("num_heads", cfg["num_heads"], 1)
    cfg["num_head_channels"] = _int("num_head_channels", cfg["num_head_channels"], 1, True)
    cfg["num_heads_upsample"] = _int("num_heads_upsample", cfg["num_heads_upsample"], 1, True)
    for key in _BOOL_KEYS:
        if not isinstance(cfg[key], bool):
            raise TextDiffError(f"{key}: expected true or false, got {cfg[key]!r}")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise TextDiffError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if cfg["class_cond"]:
        raise TextDiffError("class_cond: class_cond is not supported (the teacher is unconditional)")

    # channel_mult -> canonical string; "" stays "" (it means the image-size default).
    if cfg["channel_mult"] is None:
        cfg["channel_mult"] = ""
    if cfg["channel_mult"] != "":
        mults = _number_list("channel_mult", cfg["channel_mult"])
        if any(m <= 0 for m in mults):
            raise TextDiffError(f"channel_mult: multipliers must be > 0, got {cfg['channel_mult']!r}")
        cfg["channel_mult"] = ",".join(_fmt(m) for m in mults)
    mults = resolved_channel_mult(cfg)
    levels = len(mults)
    size, nc = cfg["image_size"], cfg["num_channels"]
    if size % 2 ** (levels - 1):
        raise TextDiffError(
            f"image_size: {size} is not divisible by 2^{levels - 1}, which {levels} levels of "
            f"channel_mult need"
        )
    level_channels = [int(m * nc) for m in mults]
    for m, ch in zip(mults, level_channels):
        if ch <= 0 or ch % GROUPS:
            raise TextDiffError(
                f"num_channels: {nc} x channel_mult {_fmt(m)} = {ch} channels, which is not a "
                f"positive multiple of {GROUPS} (GroupNorm uses {GROUPS} groups)"
            )

    # attention_resolutions -> canonical string. Like upstream, a resolution coarser than the
    # deepest level is accepted and simply never matches; one that is not image_size / 2^k is
    # almost certainly a typo and is rejected.
    if cfg["attention_resolutions"] is None:
        cfg["attention_resolutions"] = ""
    if cfg["attention_resolutions"] != "":
        resolutions = _number_list("attention_resolutions", cfg["attention_resolutions"])
        for r in resolutions:
            ds = size // int(r) if r.is_integer() and r > 0 else 0
            if not r.is_integer() or r <= 0 or size % int(r) or ds & (ds - 1):
                raise TextDiffError(
                    f"attention_resolutions: {_fmt(r)} is not image_size {size} divided by a power of 2"
                )
        cfg["attention_resolutions"] = ",".join(_fmt(r) for r in resolutions)

    # Attention heads must split the channels evenly wherever attention runs.
    ds_set = set(resolved_attention_ds(cfg))
    heads_up = cfg["num_heads"] if cfg["num_heads_upsample"] == -1 else cfg["num_heads_upsample"]
    attn: list[tuple[int, int, str]] = [(level_channels[-1], cfg["num_heads"], "num_heads")]
    for level, ch in enumerate(level_channels):
        if 2**level in ds_set:
            attn.append((ch, cfg["num_heads"], "num_heads"))
            attn.append((ch, heads_up, "num_heads_upsample"))
    for ch, heads, key in attn:
        hc = cfg["num_head_channels"]
        if hc != -1 and ch % hc:
            raise TextDiffError(
                f"num_head_channels: {hc} does not divide the {ch} channels of an attention block"
            )
        if hc == -1 and ch % heads:
            raise TextDiffError(f"{key}: {heads} heads do not divide the {ch} channels of an attention block")
    return cfg


# ----------------------------------------------------------------------------------------------
# Small layers.
# ----------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and cast back.

    Statistics over large feature maps lose precision in half precision; upstream does the same.
    """

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity (ADM init)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim]: cos for the first half of the frequencies, then sin.

    The frequency ladder is exp(-ln(max_period) * i / half), i = 0..half-1; an odd dim gets a
    zero column at the end. The order (cos first) matters for loading released weights.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """Marker: a module whose forward takes (x, emb)."""


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the children that want it.

    Being an nn.Sequential keeps upstream's key layout (``input_blocks.1.0.in_layers...``).
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without a conv; both live under ``op``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


# ----------------------------------------------------------------------------------------------
# Residual block.
# ----------------------------------------------------------------------------------------------


class ResBlock(TimestepBlock):
    """Pre-activation residual block conditioned on the timestep embedding.

    in_layers = [GroupNorm, SiLU, conv3x3]; emb_layers = [SiLU, Linear];
    out_layers = [GroupNorm, SiLU, Dropout, zero-init conv3x3].
    The embedding is either added after in_layers, or (use_scale_shift_norm) split into
    (scale, shift) and applied FiLM-style as norm(h) * (1 + scale) + shift.
    With up/down the resampling sits between the activation and the first conv on the
    residual branch, and is applied (parameter-free) to the skip branch too.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        out = self.out_channels

        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out, out, 3, padding=1)),
        )
        if out == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


# ----------------------------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------------------------


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """Multi-head self-attention on a fused [B, 3*H*C, T] projection -> [B, H*C, T].

    The two layouts differ only in how the 3*H*C channels are carved up, which matters for
    loading weights: legacy = heads outermost, each head holding its own (q, k, v) slab
    (guided-diffusion's QKVAttentionLegacy); new = (q, k, v) outermost, each split into heads
    (QKVAttention). Either way the result is softmax(q^T k / sqrt(C)) v per head.

    Why `F.scaled_dot_product_attention` rather than two einsums: the einsum form
    materialises the [B*H, T, T] logits and weights (for half inputs also a float32 copy of
    the logits for the softmax). TextDiff runs the 64x64-trained teacher on 256x256 images,
    where it attends over 64x64 = 4096 tokens: 64 MiB per head and block in float32. The flash /
    memory-efficient kernels (GPU, and PyTorch's CPU flash kernel) never build that matrix, and on
    CPU the fused kernel is also several times faster (benchmarks/attention.py measures it).

    Why the one transpose-copy of ``qkv`` to [B, T, 3*H*C]: every fused kernel requires the
    head dimension to have stride 1. Plain transposed views of the channel-major projection
    have stride T there, and SDPA then silently falls back to its "math" backend, which is
    the einsum arithmetic again (same T x T matrix, same speed). The copy is O(T*C).

    Dtypes: the old code scaled q and k by C^-1/4 each and ran the softmax in float32 before
    casting back. The overall scale is unchanged (passed explicitly as 1/sqrt(C), which is
    also SDPA's default); the fused kernels accumulate the softmax in float32 for float16 /
    bfloat16 inputs, so autocast results stay comparable, and float32 results agree with the
    einsum form to float rounding (tests/test_adm.py). The output has the input's dtype.
    No parameters are involved, so state dicts are unaffected.
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    seq = qkv.transpose(1, 2).contiguous()  # [B, T, 3*H*C]: channels innermost, stride 1
    if legacy:  # channel = (head, q/k/v, c)
        q, k, v = seq.reshape(b, length, num_heads, 3, ch).unbind(dim=3)
    else:  # channel = (q/k/v, head, c)
        q, k, v = seq.reshape(b, length, 3, num_heads, ch).unbind(dim=2)
    # [B, T, H, C] -> [B, H, T, C] (views; the C stride stays 1), the layout SDPA expects.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1 / math.sqrt(ch)
    )
    return out.transpose(-1, -2).reshape(b, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Residual spatial self-attention: x + proj_out(attn(qkv(norm(x)))), over all H*W positions.

    ``qkv`` and ``proj_out`` are 1x1 Conv1d (upstream's layout; proj_out is zero-initialized).
    Heads come from num_head_channels when it is not -1, else from num_heads.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.legacy = not use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


# ----------------------------------------------------------------------------------------------
# The UNet.
# ----------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """ADM UNet: eps (and optionally variance) prediction from (x_t, t).

    Encoder: a stem conv, then per level ``num_res_blocks`` ResBlocks (+ attention where the
    level's downsampling factor is in attention_ds) and, except at the last level, a
    downsampling block. Middle: ResBlock, attention, ResBlock. Decoder: per level (deepest
    first) ``num_res_blocks + 1`` blocks, each taking the previous output concatenated with the
    matching encoder activation (popped last-in first-out), the last block of every level but
    the top one upsampling 2x. Head: GroupNorm, SiLU, zero-init conv to 3 (or 6 with
    learn_sigma) channels.

    TextDiff taps ``output_blocks[i]`` activations as image features.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = normalize_config(config)
        self.config: dict[str, Any] = cfg
        self.image_size: int = cfg["image_size"]
        self.in_channels = 3
        self.out_channels = 6 if cfg["learn_sigma"] else 3
        self.model_channels: int = cfg["num_channels"]
        self.num_res_blocks: int = cfg["num_res_blocks"]
        self.channel_mult = resolved_channel_mult(cfg)
        self.attention_ds = resolved_attention_ds(cfg)

        mc, nrb, dropout = self.model_channels, self.num_res_blocks, float(cfg["dropout"])
        heads, head_ch = cfg["num_heads"], cfg["num_head_channels"]
        heads_up = heads if cfg["num_heads_upsample"] == -1 else cfg["num_heads_upsample"]
        emb_dim = 4 * mc

        def res(ch_in: int, ch_out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                use_scale_shift_norm=cfg["use_scale_shift_norm"],
                use_checkpoint=cfg["use_checkpoint"],
                up=up,
                down=down,
            )

        def attention(ch: int, n_heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=n_heads,
                num_head_channels=head_ch,
                use_new_attention_order=cfg["use_new_attention_order"],
                use_checkpoint=cfg["use_checkpoint"],
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = input_ch = int(self.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in self.attention_ds:
                    layers.append(attention(ch, heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg["resblock_updown"] else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attention(ch, heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(nrb + 1):
                layers = [res(ch + skip_channels.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in self.attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == nrb:
                    layers.append(res(ch, ch, up=True) if cfg["resblock_updown"] else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, self.out_channels, 3, padding=1)),
        )

    torso_dtype: torch.dtype = torch.float32

    def convert_to_fp16(self) -> UNetModel:
        """guided-diffusion's fp16 torso (what the TextDiff release runs with `use_fp16=True`):
        the conv weights of the input, middle and output blocks in float16; the timestep MLP,
        the embedding projections, the norms (computed in float32) and the output head stay float32."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.weight.data = module.weight.data.half()
                    if module.bias is not None:
                        module.bias.data = module.bias.data.half()
        self.torso_dtype = torch.float16
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """x: [N, 3, H, W] (H, W divisible by 2^(levels-1)); timesteps: [N] (or a scalar)."""
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        h, emb, skips = self._encode(x, timesteps)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))

    def _encode(self, x: torch.Tensor, timesteps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The encoder and middle block: (h, the timestep embedding, the skips for the decoder)."""
        emb = self.time_embed(timestep_embedding(timesteps.to(x.device), self.model_channels))
        skips = []
        h = x.type(self.torso_dtype) if self.torso_dtype != torch.float32 else x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), emb, skips

    def decoder_features(self, x: torch.Tensor, timesteps: torch.Tensor, blocks: tuple[int, ...]) -> list[torch.Tensor]:
        """The outputs of `output_blocks[b]` for each b in `blocks` (in that order), computed by
        exactly the operations of `forward` and stopping after the deepest one: the high-resolution
        blocks after it and the head never run. A plain function of tensors (no hooks, no
        exceptions), so `torch.compile` can trace it whole."""
        deepest = max(blocks)
        h, emb, skips = self._encode(x, timesteps)
        taps: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.output_blocks[: deepest + 1]):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if index in blocks:
                taps[index] = h
        return [taps[b] for b in blocks]


def build_adm(config: Mapping[str, Any]) -> UNetModel:
    """Build the UNet that guided-diffusion's ``create_model(**config)`` would build.

    Same state-dict keys and shapes, same forward. Parameters are float32 even with
    use_fp16=True (use autocast for reduced precision). ``model.config`` holds the
    normalized config. Build under ``with torch.device("meta"):`` to inspect shapes for free.
    """
    return UNetModel(config)
