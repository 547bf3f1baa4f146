"""What turns an image into the classifier's input: the frozen teacher (or the RGB control).

extract, `textdiff predict` and the benchmarks all build it here, from a `CacheSpec`, so the
features a model is applied to at inference are made exactly as the ones it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.cache.spec import CacheSpec
from textdiff.errors import TextDiffError
from textdiff.params import Params
from textdiff.paths import TEACHER_FILE
from textdiff.teacher import (
    Diffusion,
    FeatureExtractor,
    existing_checkpoint,
    load_teacher,
    normalize_config,
    teacher_config,
)
from textdiff.teacher.adm import attention_token_counts
from textdiff.teacher.checkpoint import unreadable_reason
from textdiff.teacher.diffusion import to_model_range

Featurizer = Callable[[torch.Tensor], dict[int, torch.Tensor]]  # [B,3,H,W] in [-1,1] -> {block: [B,S,C,h,w]}


class PixelFeatures:
    """The raw-RGB control in the teacher's place: images [B, 3, H, W] -> {0: [B, 1, 3, H, W]}."""

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {0: images.detach().float().cpu()[:, None]}


@dataclass(frozen=True)
class TeacherChoice:
    """The checkpoint extract will use, with its architecture (normalised create_model keys)."""

    path: Path
    config: dict


def choose_teacher(params: Params) -> TeacherChoice:
    """`teacher.checkpoint`, or else the pretrain stage's EMA; its architecture from
    `teacher.config` when given, else from the checkpoint (sidecar JSON or safetensors header,
    which must agree). An OpenAI `.pt` carries neither, so it needs `teacher.config`."""
    if params.teacher.checkpoint:
        path, origin = Path(params.teacher.checkpoint), "teacher.checkpoint"
    else:
        path = existing_checkpoint(Path(params.pretrain.out) / TEACHER_FILE)
        origin = "the pretrain stage's teacher (teacher.checkpoint is empty)"
    if not path.is_file():  # an index is a file too; its shards are checked when loading
        hint = "" if params.teacher.checkpoint else " (run `dvc repro pretrain` or set teacher.checkpoint)"
        raise TextDiffError(f"{path}: teacher checkpoint not found, from {origin}{hint}")
    try:
        config, source = teacher_config(path, params.teacher.config or None)
    except TextDiffError as err:
        if "no teacher config given" not in str(err):
            raise
        broken = unreadable_reason(path)
        if broken is not None:
            raise TextDiffError(f"{path}: {broken}, from {origin}") from None
        raise TextDiffError(
            f"{path}: no architecture for this checkpoint: set teacher.config (guided-diffusion create_model keys)"
        ) from None
    try:
        return TeacherChoice(path=path, config=normalize_config(config))
    except TextDiffError as err:
        raise TextDiffError(f"{source}: {err}") from None


def build_featurizer(spec: CacheSpec, teacher_path: Path | None, device: torch.device,
                     out_dtype: torch.dtype = torch.float32, compile: bool = False) -> Featurizer:
    """The featurizer a cache spec describes (the teacher is loaded strictly and frozen).
    extract asks for its storage dtype (the cast then runs on the device) and may compile."""
    if spec.teacher_kind == "rgb":
        return PixelFeatures()
    if teacher_path is None:
        raise TextDiffError("an adm cache spec needs its teacher checkpoint")
    model = load_teacher(teacher_path, spec.teacher_config).to(device)
    if (spec.teacher_config or {}).get("use_fp16"):
        if device.type == "cuda":  # the release's fp16 torso; features come back as float32
            model.convert_to_fp16()
        else:
            print(f"teacher.config use_fp16: the fp16 torso runs on a GPU only; {device} runs it in float32")
    return FeatureExtractor(model, Diffusion(spec.schedule, spec.diffusion_steps), steps=list(spec.steps),
                            blocks=list(spec.blocks), noise_seed=spec.noise_seed, device=device,
                            autocast_dtype=spec.autocast, out_dtype=out_dtype, compile=compile,
                            window=spec.window, window_stride=spec.window_stride)


OFF_DISTRIBUTION_TOKENS = 4  # more than this many times the training tokens through one attention layer


def attention_report(spec: CacheSpec) -> tuple[str, str | None]:
    """Where the teacher attends on the working size, and a warning when an attention layer sees
    more than 4x the tokens it was trained on (a teacher run off its training distribution)."""
    if spec.teacher_kind == "rgb":
        return "teacher: none (the RGB control)", None
    config = spec.teacher_config or {}
    seen = min(spec.window, spec.image_size) if spec.window else spec.image_size
    at = attention_token_counts(config, seen)
    trained = attention_token_counts(config)
    sides = ", ".join(f"{side}x{side} ({tokens} tokens)" for side, tokens in at)
    where = (f"{seen} px windows every {spec.window_stride} px of {spec.image_size} px inputs" if spec.window
             else f"{spec.image_size} px inputs")
    line = (f"teacher attends at {sides} on {where}; trained at {config['image_size']} px: "
            + ", ".join(f"{side}x{side}" for side, _ in trained))
    ratio = at[0][1] / trained[0][1]
    warning = None
    if ratio > OFF_DISTRIBUTION_TOKENS:
        warning = (f"warning: the teacher's largest attention sees {at[0][1]} tokens, {ratio:.0f}x the {trained[0][1]} "
                   f"it was trained with: its features come from off its training distribution")
    return line, warning


def images_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the range the DDPM was trained on."""
    return to_model_range(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
