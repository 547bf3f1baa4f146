"""The machine a stage runs on: which device, and which library versions made an artefact."""

from __future__ import annotations

import platform

import torch

from textdiff.errors import TextDiffError


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one; asking for `cuda` without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TextDiffError("device 'cuda' was asked for but no CUDA GPU is available (use auto or cpu)")
    return torch.device(name)


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
