"""The TextDiff pixel classifier: frozen-teacher features + clinical text -> per-pixel logits.

The whole trainable model lives in this one file so it can be read top to bottom.

Data flow for one image (B = batch):

    features[k]  [B, steps, C_k, H_k, W_k]   one tapped UNet decoder block per k (fp16 in the cache)
      -> concat timesteps on channels          [B, steps*C_k, H_k, W_k]   (what the release does:
                                                `torch.cat(activations[k:12:4], dim=1)`)
      -> 1x1 conv to d_model                   [B, d, H_k, W_k]
      -> fusion with the text                  [B, d, H_k, W_k]   (see FUSIONS below)
      -> bilinear upsample to out_size, concatenate all scales on channels
      -> decoder conv3x3(128)-BN-ReLU-conv3x3(32)-BN-ReLU-conv3x3(num_classes)

Fusion variants (`fusion=`):

- ``cross_attention`` (TextDiff): every pixel of a scale is a query token, the text tokens are the
  keys/values. One transformer block is *shared* by all scales, as in the release (`self.cross1`
  is applied to every scale). There is no self-attention between pixels, so every pixel is
  processed independently given the text: that is what makes the 256x256 scale (65,536 tokens)
  affordable, and what makes chunking over tokens exact.
- ``hierarchical``: the same block, but an independent copy per scale.
- ``concat`` (ablation zeta-2): the pooled sentence embedding is projected to d_model, broadcast
  over the pixels, concatenated on channels and mixed back to d_model by a 1x1 conv. Text tokens
  are not used.
- ``none`` (ablation zeta-1): image only; the text arguments are ignored and no text module is
  built (so every parameter gets a gradient in every variant).

Normalisation in the decoder: BatchNorm with `track_running_stats=False`, i.e. batch statistics at
training *and* at inference, taken per image (`ImageBatchNorm2d`). TextDiff trains with batch size
1, so each BN normalises over one image's pixels; with running averages instead, inference on
MoNuSeg's mix of organs and stains used statistics of other images and collapsed (measured on the
same cache and weights after 8 epochs: val Dice 0.20 with running stats vs 0.71 with per-image
statistics). Inference is
therefore always one image per forward pass, which makes a prediction independent of its batch.

Contrastive heads (extension 2): a global image embedding (per-scale mean over pixels of the fused
maps, *concatenated* over scales so the head can weight scales differently) and a text embedding
(from the pooled sentence embedding), each projected to `contrastive_dim`. They are built for every
fusion except ``none``, which by definition must not see the text.

Where this differs from the released code (chunmeifeng/TextDiff, src/pixel_classifier.py and
src/transformer.py), on purpose: the release's block, built with `only_cross_attention=True`, runs
*two* cross-attention sublayers (attn1 and attn2 both attend to the text), ends each attention with
Linear + LayerNorm, uses 8 heads x 64 = 512 inner width for d=768, and its "GEGLU" feed-forward is
really GELU -> Linear(d, d) (the GEGLU and the 4x width are commented out). It never masks padding
tokens, projects only two of the four blocks (768-channel blocks bypass the 1x1 conv) and reshapes
with batch size 1. Here: one cross-attention with a key-padding mask, head width d_model/heads, a
real GEGLU (4x), a 1x1 conv for every block, any batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from textdiff.errors import TextDiffError

FUSIONS = ("cross_attention", "hierarchical", "concat", "none")
_ATTENTION_FUSIONS = ("cross_attention", "hierarchical")
VARIANTS = ("project", "release")
DECODER_NORMS = ("image", "running")
DISTANCE_DECODERS = ("separate", "shared")  # train.distance_decoder
AUTOCASTS = ("float32", "bfloat16")  # the classifier's compute dtype, as recorded in model.json
TRAIN_AUTOCASTS = ("auto", *AUTOCASTS)  # train.autocast: auto = bfloat16 where the hardware computes it
RELEASE_HEAD_DIM = 64  # the release: 8 heads x 64 = 512 inner width, whatever d_model is


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to text tokens (keys/values).

    q/k/v projections have no bias (the release builds its attention with `attention_bias=False`);
    the output projection has one. Padding tokens are excluded with a boolean key mask.
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_k = nn.Linear(d_model, d_model, bias=False)
        self.to_v = nn.Linear(d_model, d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, d] queries, context [B, L, d] text tokens, mask [B, L] bool (True = real; None = all)."""
        B, N, D = x.shape
        L = context.shape[1]
        h = self.heads
        q = self.to_q(x).view(B, N, h, D // h).transpose(1, 2)
        k = self.to_k(context).view(B, L, h, D // h).transpose(1, 2)
        v = self.to_v(context).view(B, L, h, D // h).transpose(1, 2)
        # A row whose text is all padding would softmax over nothing (NaN): it attends to
        # everything (finite) and its output is zeroed: no text means no text contribution.
        out = self.to_out(_masked_attention(q, k, v, mask).transpose(1, 2).reshape(B, N, D))
        return out if mask is None else out * mask.any(dim=1)[:, None, None].to(out.dtype)


class FusionBlock(nn.Module):
    """Pre-LN transformer block: cross-attention to the text, then a GEGLU feed-forward.

    x = x + CrossAttn(LN(x), text);  x = x + W2(a * gelu(g)) with [a, g] = W1(LN(x)), W1: d -> 2*4d.
    """

    def __init__(self, d_model: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CrossAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, 2 * ff_mult * d_model)
        self.ff_out = nn.Linear(ff_mult * d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, d], context [B, L, d], mask [B, L] bool or None -> [B, N, d]."""
        x = x + self.attn(self.norm1(x), context, mask)
        a, gate = self.ff_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.ff_out(a * F.gelu(gate))


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None = None) -> torch.Tensor:
    """SDPA over text tokens; `mask` [B, L] bool (True = real token) or None (attend to all).
    Under autocast it runs in float32: PyTorch's CPU flash kernel is 4x slower backwards in
    bfloat16 at this shape (65,536 queries, 10 keys, 8-wide heads), and it is a small part of a step."""
    if q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(q.device.type, enabled=False):
            return _masked_attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_text = mask.any(dim=1)
    safe_mask = mask | ~has_text[:, None]  # an all-padding row would softmax over nothing
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :], scale=scale)
    return out * has_text[:, None, None, None].to(out.dtype)


class ReleaseCrossAttention(nn.Module):
    """The released code's attention (diffusers' CrossAttention as modified there): bias-free
    q/k/v to heads x 64, keys/values straight from the text width, and an output projection
    that is Linear *followed by LayerNorm* (the release appends it to `to_out`)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, head_dim: int = RELEASE_HEAD_DIM):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, d_model)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape
        L, h, c = context.shape[1], self.heads, self.head_dim
        q = self.to_q(x).view(B, N, h, c).transpose(1, 2)
        k = self.to_k(context).view(B, L, h, c).transpose(1, 2)
        v = self.to_v(context).view(B, L, h, c).transpose(1, 2)
        out = _masked_attention(q, k, v, mask, scale=c**-0.5).transpose(1, 2).reshape(B, N, h * c)
        return self.out_norm(self.to_out(out))


class ReleaseBlock(nn.Module):
    """The released fusion block: pre-LN, *two* cross-attention sublayers on the text, then a
    "feed-forward" that is only GELU -> Linear(d, d) (the release's GEGLU and 4x width are
    commented out), each with a residual."""

    def __init__(self, d_model: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn1 = ReleaseCrossAttention(d_model, context_dim, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.attn2 = ReleaseCrossAttention(d_model, context_dim, heads)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff_out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context, mask) + x
        x = self.attn2(self.norm2(x), context, mask) + x
        return self.ff_out(F.gelu(self.norm3(x))) + x


class ImageBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over each image's own pixels (batch statistics of a batch of one, image by image).

    With batch size 1 (TextDiff's) this is `nn.BatchNorm2d(track_running_stats=False)` exactly; with
    larger batches it keeps the statistics per image, as decoder_norm "image" promises, so that a
    prediction never depends on the other images of its batch and a batch split over processes
    (DistributedDataParallel) normalises exactly as one process does. Same parameters and state
    dict as BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(ImageBatchNorm2d, self).forward(x[i : i + 1]) for i in range(x.shape[0])])


def _init_weights(m: nn.Module) -> None:
    """The release's `init_weights('normal', 0.02)` (pix2pix style), plus LayerNorm at identity."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Raise a one-line TextDiffError unless t matches expected (None = any size)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise TextDiffError(f"{name} has shape {tuple(t.shape)}, expected ({want})")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TextDiffError(f"{name} must be a positive integer, got {value!r}")
    return value


def train_params_problem(fusion: str, variant: str, decoder_norm: str, contrastive_weight: float,
                         distance_decoder: str = "separate", autocast: str = "float32") -> str | None:
    """The classifier's rule for its train.* keys, as one line naming them (None: fine). The train
    stage asks it before any work; params.py holds no list of fusions, so that editing this module
    re-runs only train and evaluate."""
    for key, value, choices in (("train.fusion", fusion, FUSIONS), ("train.classifier", variant, VARIANTS),
                                ("train.decoder_norm", decoder_norm, DECODER_NORMS),
                                ("train.distance_decoder", distance_decoder, DISTANCE_DECODERS),
                                ("train.autocast", autocast, TRAIN_AUTOCASTS)):
        if value not in choices:
            return f"{key} must be one of {', '.join(choices)}; got {value!r}"
    if variant == "release" and fusion not in _ATTENTION_FUSIONS:
        return f"train.classifier=release fuses the text by attention; train.fusion={fusion} is not"
    if variant == "release" and contrastive_weight > 0:
        return "train.contrastive_weight > 0 needs the contrastive heads; the release classifier has none"
    if fusion == "none" and contrastive_weight > 0:
        return "train.contrastive_weight > 0 needs text, but train.fusion is none (image only)"
    return None


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that fixes the classifier's architecture (stored in model.json as is).

    block_channels: channels of each tapped block, in block order; a dict {block index: channels}
        is read in ascending block index.
    num_steps: diffusion timesteps stacked per block.
    text_dim: width of the text token / pooled embeddings.
    d_model: fusion width; None = text_dim, as in the release where both are 768.
    heads: attention heads; d_model must be divisible by it.
    fusion: one of FUSIONS.
    out_size: logits resolution, (H, W) (an int means square).
    num_classes, contrastive_dim: output classes; width of the contrastive embeddings.
    decoder_channels: widths of the two hidden decoder convs (release: 128, 32).
    variant: "project" (this file's design) or "release" (the released classifier: `ReleaseBlock`,
        1x1 convs only for blocks whose width is not d_model, shared as the release shares them,
        raw text into keys/values, no contrastive heads).
    padding_mask: whether pixels ignore the text's padding tokens (the release attends to them).
    decoder_norm: "image" (BatchNorm with each image's own statistics, also at inference) or
        "running" (BatchNorm's running averages at inference, as the release).
    distance_head: a second output on the decoder's last hidden features, each nucleus' normalised
        distance to its border (`train.target: distance`), whose peaks seed the watershed that
        separates touching nuclei (`model.nuclei`). The mask logits are computed exactly as without it.
    distance_decoder: where the distance head reads from. "separate": its own two conv-norm-ReLU
        layers on the fused, upsampled features, so the mask's decoder is not asked to serve both
        outputs (on the MoNuSeg val split: Dice 75.5 vs 74.9, val AJI 40.9 vs 40.0); "shared": the
        mask decoder's last hidden layer (models trained before the choice existed).
    autocast: the compute dtype of every forward pass, in training and at inference alike (so
        evaluate and `textdiff predict` run the model as it was trained). "bfloat16" runs the
        convolutions, projections and attention under torch.autocast; outputs come back float32.
        Under bfloat16 the decoders read channels-last maps (oneDNN's fast layout on a CPU).
    """

    block_channels: tuple[int, ...]
    num_steps: int
    text_dim: int
    d_model: int | None = None
    heads: int = 8
    fusion: str = "cross_attention"
    out_size: tuple[int, int] = (256, 256)
    num_classes: int = 2
    contrastive_dim: int = 128
    decoder_channels: tuple[int, int] = (128, 32)
    variant: str = "project"
    padding_mask: bool = True
    decoder_norm: str = "image"
    distance_head: bool = False
    distance_decoder: str = "shared"
    autocast: str = "float32"

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise TextDiffError(f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}")
        if self.variant not in VARIANTS:
            raise TextDiffError(f"unknown classifier variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        if self.variant == "release" and self.fusion not in _ATTENTION_FUSIONS:
            raise TextDiffError(f"the release classifier fuses text by attention; fusion {self.fusion!r} is not one")
        if self.decoder_norm not in DECODER_NORMS:
            raise TextDiffError(f"unknown decoder_norm {self.decoder_norm!r}; valid: {', '.join(DECODER_NORMS)}")
        if self.distance_decoder not in DISTANCE_DECODERS:
            raise TextDiffError(f"unknown distance_decoder {self.distance_decoder!r}; "
                                f"valid: {', '.join(DISTANCE_DECODERS)}")
        if self.autocast not in AUTOCASTS:
            raise TextDiffError(f"unknown autocast {self.autocast!r}; valid: {', '.join(AUTOCASTS)}")
        channels = self.block_channels
        if isinstance(channels, Mapping):
            channels = [channels[k] for k in sorted(channels)]
        if not channels:
            raise TextDiffError("block_channels must name at least one block")
        for c in channels:
            _positive_int("block_channels entry", c)
        for name in ("num_steps", "text_dim", "heads", "num_classes", "contrastive_dim"):
            _positive_int(name, getattr(self, name))
        d_model = self.text_dim if self.d_model is None else _positive_int("d_model", self.d_model)
        if self.fusion in _ATTENTION_FUSIONS and d_model % self.heads != 0:
            raise TextDiffError(f"d_model {d_model} is not divisible by heads {self.heads}")
        out_size = (self.out_size, self.out_size) if isinstance(self.out_size, int) else tuple(self.out_size)
        if len(out_size) != 2:
            raise TextDiffError(f"out_size must be an int or (H, W), got {self.out_size!r}")
        decoder = tuple(self.decoder_channels)
        if len(decoder) != 2:
            raise TextDiffError(f"decoder_channels must have 2 entries, got {self.decoder_channels!r}")
        for name, values in (("out_size", out_size), ("decoder_channels entry", decoder)):
            for v in values:
                _positive_int(name, v)
        for name, value in (("block_channels", tuple(channels)), ("d_model", d_model),
                            ("out_size", out_size), ("decoder_channels", decoder)):
            object.__setattr__(self, name, value)

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_json(cls, raw: Mapping) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TextDiffError(f"unknown classifier config key '{unknown[0]}'")
        return cls(**raw)


class PixelClassifier(nn.Module):
    """Text-guided pixel classifier on multi-scale, multi-timestep diffusion features."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        channels, num_steps, text_dim = list(config.block_channels), config.num_steps, config.text_dim
        d_model, fusion = config.d_model, config.fusion
        # Read by forward(): the shapes it checks its inputs against.
        self.block_channels, self.num_steps, self.text_dim = channels, num_steps, text_dim
        self.fusion, self.out_size = fusion, config.out_size
        n = len(channels)

        self.variant, self.padding_mask = config.variant, config.padding_mask
        if config.variant == "release":
            self._build_release(channels, num_steps, d_model, text_dim, fusion, config.heads)
        else:
            self._build_project(channels, num_steps, d_model, text_dim, fusion, config.heads)

        c1, c2 = config.decoder_channels
        running = config.decoder_norm == "running"
        norm = nn.BatchNorm2d if running else ImageBatchNorm2d

        def conv_decoder(out_channels: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(n * d_model, c1, 3, 1, 1),
                norm(c1, track_running_stats=running),
                nn.ReLU(inplace=True),
                nn.Conv2d(c1, c2, 3, 1, 1),
                norm(c2, track_running_stats=running),
                nn.ReLU(inplace=True),
                nn.Conv2d(c2, out_channels, 3, 1, 1),
            )

        self.decoder = conv_decoder(config.num_classes)
        # The instance target's head: on the mask decoder's last hidden layer ("shared") or a
        # decoder of its own on the same fused features ("separate").
        self.distance_head = None
        self.shared_distance = config.distance_decoder == "shared"
        if config.distance_head:
            self.distance_head = nn.Conv2d(c2, 1, 3, 1, 1) if self.shared_distance else conv_decoder(1)

        self.has_contrastive = fusion != "none" and config.variant == "project"
        if self.has_contrastive:
            self.image_head = nn.Linear(n * d_model, config.contrastive_dim)
            self.text_head = nn.Linear(text_dim, config.contrastive_dim)

        self.apply(_init_weights)

    def _build_project(self, channels: list[int], num_steps: int, d_model: int, text_dim: int, fusion: str,
                       heads: int) -> None:
        # Per-block 1x1 conv: (timesteps x channels) -> d_model, for every block.
        self.proj = nn.ModuleList(nn.Conv2d(c * num_steps, d_model, 1) for c in channels)
        if fusion in _ATTENTION_FUSIONS:
            self.text_proj = nn.Linear(text_dim, d_model) if text_dim != d_model else nn.Identity()
            n_blocks = 1 if fusion == "cross_attention" else len(channels)
            self.blocks = nn.ModuleList(FusionBlock(d_model, heads) for _ in range(n_blocks))
        elif fusion == "concat":
            self.pooled_proj = nn.Linear(text_dim, d_model)
            self.concat_conv = nn.Conv2d(2 * d_model, d_model, 1)  # shared by all scales

    def _build_release(self, channels: list[int], num_steps: int, d_model: int, text_dim: int, fusion: str,
                       heads: int) -> None:
        """The release projects a block only when its width (channels x steps) is not d_model,
        with conv `down{min(idx + 1, 2)}`: so the third and fourth blocks share the second's conv.
        Where that sharing cannot hold (another width), the block gets its own conv."""
        self.down = nn.ModuleDict()
        self.down_keys: list[str | None] = []
        for idx, c in enumerate(channels):
            width = c * num_steps
            if width == d_model:
                self.down_keys.append(None)
                continue
            key = f"down{min(idx + 1, 2)}"
            if key in self.down and self.down[key].in_channels != width:
                key = f"down{idx + 1}"
            if key not in self.down:
                self.down[key] = nn.Conv2d(width, d_model, 1)
            self.down_keys.append(key)
        n_blocks = 1 if fusion == "cross_attention" else len(channels)
        self.blocks = nn.ModuleList(ReleaseBlock(d_model, text_dim, heads) for _ in range(n_blocks))

    def _project(self, k: int, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "release":
            key = self.down_keys[k]
            return x if key is None else self.down[key](x)
        return self.proj[k](x)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        features: Sequence[torch.Tensor],
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """features: per block [B, steps, C_k, H_k, W_k]; text_tokens [B, L, text_dim];
        text_mask [B, L] (1/True = real token); text_pooled [B, text_dim].

        Returns {"logits": [B, num_classes, *out_size]} plus, unless fusion is "none",
        {"image_embedding": [B, contrastive_dim], "text_embedding": [B, contrastive_dim]}, and with
        the distance head {"distance_logits": [B, 1, *out_size]} (sigmoid: the instance target).
        Every output is float32 whatever `config.autocast` computes in.
        """
        device_type = features[0].device.type if len(features) else "cpu"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.config.autocast == "bfloat16"):
            out = self._forward(features, text_tokens, text_mask, text_pooled)
        return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in out.items()}

    def _forward(self, features: Sequence[torch.Tensor], text_tokens: torch.Tensor | None,
                 text_mask: torch.Tensor | None, text_pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        dtype = self.decoder[0].weight.dtype
        if len(features) != len(self.block_channels):
            raise TextDiffError(
                f"got {len(features)} feature blocks, the classifier was built for {len(self.block_channels)}"
            )
        B = features[0].shape[0]
        context = mask = pooled = None
        if self.fusion != "none":
            if text_pooled is None or (self.fusion in _ATTENTION_FUSIONS and text_tokens is None):
                raise TextDiffError(f"fusion {self.fusion!r} needs text inputs, got None")
            text_pooled = text_pooled.to(dtype)
            _check_shape("text_pooled", text_pooled, (B, self.text_dim))
        if self.fusion in _ATTENTION_FUSIONS:
            _check_shape("text_tokens", text_tokens, (B, None, self.text_dim))
            context = text_tokens.to(dtype) if self.variant == "release" else self.text_proj(text_tokens.to(dtype))
            if not self.padding_mask:
                mask = None
            elif text_mask is None:
                mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
            else:
                _check_shape("text_mask", text_mask, tuple(text_tokens.shape[:2]))
                mask = text_mask.bool()
        elif self.fusion == "concat":
            pooled = self.pooled_proj(text_pooled)

        fused = []
        for k, feat in enumerate(features):
            _check_shape(f"feature block {k}", feat, (B, self.num_steps, self.block_channels[k], None, None))
            _, S, C, H, W = feat.shape
            x = self._project(k, feat.reshape(B, S * C, H, W).to(dtype))
            fused.append(self._fuse(k, x, context, mask, pooled))

        up = [F.interpolate(m, size=self.out_size, mode="bilinear", align_corners=False) for m in fused]
        # channels-last under bfloat16: oneDNN's 3x3 convolutions at full resolution (most of a
        # step) run 2.8x faster on a CPU than on the default layout.
        x = torch.cat(up, dim=1)
        if self.config.autocast != "float32":  # float32 keeps the exact kernels of models trained before
            x = x.contiguous(memory_format=torch.channels_last)
        if self.distance_head is None:
            out = {"logits": self.decoder(x)}
        elif self.shared_distance:
            hidden = self.decoder[:-1](x)
            out = {"logits": self.decoder[-1](hidden), "distance_logits": self.distance_head(hidden)}
        else:
            out = {"logits": self.decoder(x), "distance_logits": self.distance_head(x)}
        if self.has_contrastive:
            image_global = torch.cat([m.mean(dim=(2, 3)) for m in fused], dim=1)
            out["image_embedding"] = self.image_head(image_global)
            out["text_embedding"] = self.text_head(text_pooled)
        return out

    def _fuse(
        self,
        k: int,
        x: torch.Tensor,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mix the text into one scale's map x [B, d, H, W] according to self.fusion."""
        if self.fusion == "none":
            return x
        B, D, H, W = x.shape
        if self.fusion == "concat":
            text_map = pooled[:, :, None, None].expand(B, D, H, W)
            return self.concat_conv(torch.cat([x, text_map], dim=1))

        block = self.blocks[0 if self.fusion == "cross_attention" else k]
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, d], a view
        y = block(tokens, context, mask)
        return y.transpose(1, 2).reshape(B, D, H, W)
