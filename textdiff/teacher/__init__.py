"""The frozen diffusion teacher: guided-diffusion's ADM UNet, its noise schedule, checkpoint
I/O and the decoder-feature taps TextDiff trains on."""

from textdiff.hashing import sha256_file
from textdiff.teacher.adm import ADM_DEFAULTS, build_adm, normalize_config
from textdiff.teacher.checkpoint import (
                                        checkpoint_sha256,
                                        existing_checkpoint,
                                        load_checkpoint,
                                        load_teacher,
                                        save_checkpoint,
                                        teacher_config,
)
from textdiff.teacher.diffusion import Diffusion
from textdiff.teacher.features import FeatureExtractor, block_shapes

__all__ = [
    "ADM_DEFAULTS",
    "Diffusion",
    "FeatureExtractor",
    "block_shapes",
    "build_adm",
    "checkpoint_sha256",
    "existing_checkpoint",
    "load_checkpoint",
    "load_teacher",
    "normalize_config",
    "save_checkpoint",
    "sha256_file",
    "teacher_config",
]
