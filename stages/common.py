"""What several stages share: fixed paths, the device choice, the teacher in use, provenance."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from textdiff.errors import TextDiffError
from textdiff.teacher.checkpoint import read_sidecar_config
from textdiff.params import Params

PREPARED_DIR = Path("data/prepared")
CACHE_PATH = Path("cache/features.zarr")
CLASSIFIER_DIR = Path("models/classifier")
METRICS_DIR = Path("metrics")
TEACHER_FILE = "teacher.safetensors"


def resolve_data_root(root: str, cwd: Path | None = None) -> Path:
    """`data.root` as a path: absolute as given; relative to the repo root otherwise.

    A queued `dvc exp run` executes in a temporary copy under `<repo>/.dvc/tmp/exps/...`, where
    the default `../shared/data/MoNuSeg` would point inside `.dvc/`; there the path is taken
    relative to the repository that queued the experiment instead.
    """
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    cwd = (cwd or Path.cwd()).resolve()
    candidates = [cwd / path]
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            candidates.append(Path(*parts[:i]) / path)
            break
    return next((c for c in candidates if c.exists()), candidates[0])


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one; asking for `cuda` without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TextDiffError("device 'cuda' was asked for but no CUDA GPU is available (use auto or cpu)")
    return torch.device(name)


@dataclass(frozen=True)
class TeacherSpec:
    path: Path
    config: dict


def resolve_teacher(params: Params) -> TeacherSpec:
    """The checkpoint extract will use: `teacher.checkpoint`, or else the pretrain stage's EMA.

    The architecture comes from `teacher.config` when given, else from the checkpoint's sidecar
    JSON; an OpenAI `.pt` has no sidecar, so it needs `teacher.config`.
    """
    if params.teacher.checkpoint:
        path = Path(params.teacher.checkpoint)
        origin = "teacher.checkpoint"
    else:
        path = Path(params.pretrain.out) / TEACHER_FILE
        origin = "the pretrain stage's teacher (teacher.checkpoint is empty)"
    if not path.is_file():
        hint = "" if params.teacher.checkpoint else " (run `dvc repro pretrain` or set teacher.checkpoint)"
        raise TextDiffError(f"{path}: teacher checkpoint not found, from {origin}{hint}")
    config = dict(params.teacher.config) or read_sidecar_config(path)
    if not config:
        raise TextDiffError(
            f"{path}: no architecture for this checkpoint: set teacher.config (guided-diffusion create_model keys)"
        )
    return TeacherSpec(path=path, config=config)


def provenance() -> dict:
    """Versions recorded beside every artefact, so a number can be traced to what made it."""
    import numpy
    import transformers
    import zarr

    import textdiff

    return {
        "textdiff": textdiff.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
