"""Content hashes: how the pipeline knows two inputs are the same without trusting file names.

Checkpoints are hashed to tie a trained classifier to its teacher; image stacks are hashed to tie a
cache (or a pretrained teacher) to exactly the pixels it saw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from textdiff.errors import TextDiffError


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed (checkpoints are hundreds of MB)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
    except OSError as err:
        raise TextDiffError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def sha256_images(images: np.ndarray) -> str:
    """One hash of an image stack, its shape included (what a teacher was trained on)."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def sha256_split(ids: list[str], texts: list[str], images: np.ndarray, masks: np.ndarray,
                 *more: np.ndarray) -> str:
    """sha256 of exactly what the teacher and the text encoder see for one split (and of any
    further arrays scored against, such as the release ground truth)."""
    h = hashlib.sha256()
    for value in (*ids, "\0", *texts):
        h.update(value.encode() + b"\0")
    for array in (images, masks, *more):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()
