"""The source images behind a prepared split, at their own resolution.

data/prepared and the cache hold every image at the working size (256² by default). A model that
works at the source resolution (the Cellpose baseline, as its authors and the MoNuSeg challenge
ran it) reads the files the manifest names, under the manifest's source root. Each file must still
hash to what prepare recorded: a dataset edited since prepare is refused in one line, never mixed
silently with a cache made from the old one. Its stains are normalised to the prepared reference
exactly as prepare normalised them before resizing, so these pixels are the working-size ones
before they were shrunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from textdiff.data.images import read_image
from textdiff.data.prepared import MANIFEST, read_manifest
from textdiff.data.stain import normalize
from textdiff.errors import TextDiffError


def source_path(manifest: dict, split: str, image_id: str, prepared_dir: Path) -> tuple[Path, str]:
    """(where image `image_id` of `split` was read by prepare, the sha256 it had then)."""
    files = manifest.get("splits", {}).get(split, {}).get("files", {})
    if image_id not in files:
        raise TextDiffError(f"{Path(prepared_dir) / MANIFEST}: no image {image_id!r} in split '{split}' (the cache "
                            "was made from other prepared data); run `textdiff prepare` and `textdiff extract`")
    entry = files[image_id]
    path = Path(entry["image"])
    if not path.is_absolute() and manifest.get("source_root"):
        path = Path(manifest["source_root"]) / path
    return path, entry["image_sha256"]


def source_images(prepared_dir: Path, split: str, ids: Sequence[str], normalise: bool = True) -> list[np.ndarray]:
    """The source images `ids` of `split` as RGB uint8 [H, W, 3], stain-normalised as prepare did
    (`normalise=False`: as the files hold them, as `textdiff predict` reads a user's image)."""
    manifest = read_manifest(prepared_dir)
    reference = manifest.get("stain") or {}
    images = []
    for image_id in ids:
        path, expected = source_path(manifest, split, image_id, prepared_dir)
        if not path.is_file():
            raise TextDiffError(f"{path}: source image of {image_id} not found (prepare read it there); this "
                                "baseline reads the source resolution: restore data.root or run `textdiff prepare`")
        image, sha256 = read_image(path)
        if sha256 != expected:
            raise TextDiffError(f"{path}: changed since `textdiff prepare` read it (sha256 differs); run "
                                "`dvc repro -f prepare`")
        images.append(normalize(image, reference) if reference and normalise else image)
    return images


__all__ = ["source_images", "source_path"]
