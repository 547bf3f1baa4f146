"""The prepare stage's work: read and validate the source dataset, normalise its stains, bring it
to the working size and write data/prepared."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from textdiff.data.dataset import SPLITS, Sample, read_splits
from textdiff.data.folder import is_folder_layout, read_folder
from textdiff.data.prepared import write_prepared
from textdiff.data.resize import release_mask, resize_sample
from textdiff.errors import TextDiffError

if TYPE_CHECKING:
    from textdiff.params import DataParams

def dataset_layout(layout: str, root: Path) -> str:
    """`data.layout` as read: `auto` is `folder` where data.root holds images/ and masks/, else `lvit`."""
    if layout == "auto":
        return "folder" if is_folder_layout(root) else "lvit"
    return layout


def native_size(splits: dict[str, list[Sample]], tile: int) -> int:
    """The one square size every image shares (tiles mode keeps native resolution)."""
    shapes: dict[tuple[int, ...], Path] = {}
    for samples in splits.values():
        for s in samples:
            shapes.setdefault(s.image.shape[:2], s.image_path)
    if len(shapes) != 1:
        (a, pa), (b, pb) = list(shapes.items())[:2]
        raise TextDiffError(f"{pb}: data.mode=tiles needs one image size, but it is {b[1]}x{b[0]} and {pa} is "
                            f"{a[1]}x{a[0]}")
    (h, w), path = next(iter(shapes.items()))
    if h != w:
        raise TextDiffError(f"{path}: data.mode=tiles needs square images, got {w}x{h}")
    if tile > h:
        raise TextDiffError(f"data.tile ({tile}) is larger than the images ({h}x{w})")
    return h


def normalise_stains(splits: dict[str, list[Sample]], method: str) -> dict:
    """`data.stain`: fit the reference on the training images (never val or test), then bring every
    split's source images to it, in place, before any resizing (as `textdiff predict` does with its
    inputs). Returns the reference ({} for none), which the manifest, cache spec and model.json keep."""
    from tqdm import tqdm

    from textdiff.data.stain import fit_reference, normalize

    if method == "none":
        return {}
    try:
        reference = fit_reference(method, [s.image for s in splits["train"]])
    except (ValueError, np.linalg.LinAlgError) as err:
        folder = splits["train"][0].image_path.parent if splits["train"] else "train"
        raise TextDiffError(f"{folder}: data.stain={method} cannot fit a stain reference on these images "
                            f"({err})") from None
    total = sum(len(samples) for samples in splits.values())
    with tqdm(total=total, desc=f"{method} stain normalisation", unit="image", leave=False) as bar:
        for samples in splits.values():
            for k, sample in enumerate(samples):
                samples[k] = dataclasses.replace(sample, image=normalize(sample.image, reference))
                bar.update(1)
    return reference


def prepare_dataset(params: DataParams, root: Path, out_dir: Path,
                    instances: Path | None = None) -> dict[str, list[Sample]]:
    """Read and validate every split under `root`, bring it to the working size, write `out_dir`.

    `resize` (the paper's protocol) resizes every image to `data.image_size` (`data.protocol`:
    ours, or the released code's BGR/bilinear images and dilated masks); `tiles` keeps the native
    resolution (extract cuts windows), which needs one square size. `data.layout` says how `root`
    is laid out (MoNuSeg's LViT folders, or a lab's images/ + masks/: textdiff/data/folder.py; there
    the masks themselves carry any instance labels and `instances` is not read). Every split also keeps the
    release ground truth at `data.image_size`, so any run is scored both ways. With `instances` (the
    resolved `data.instances` folder) every image also carries its per-nucleus labels at the source
    size. Returns what was written.
    """
    from textdiff.params import section_dict

    if dataset_layout(params.layout, root) == "folder":
        splits = read_folder(root, split_seed=params.split_seed, val_fraction=params.val_fraction,
                             test_fraction=params.test_fraction, progress=True)
    else:
        splits = read_splits(root, SPLITS, progress=True, instances=instances)
    reference = normalise_stains(splits, params.stain)
    if params.mode == "tiles":  # native resolution; the release ground truth at data.image_size
        size = native_size(splits, params.tile)
        splits = {split: [dataclasses.replace(s, release_mask=release_mask(s.mask, params.image_size)) for s in samples]
                  for split, samples in splits.items()}
    else:
        size = params.image_size
        splits = {split: [resize_sample(s, size, params.protocol) for s in samples]
                  for split, samples in splits.items()}
    meta = {"image_size": size, "source_root": str(Path(root).resolve()), "data_params": section_dict(params),
            "stain": reference}
    if instances is not None:
        approximate = sorted(s.id for samples in splits.values() for s in samples if s.approximate)
        meta["instances"] = {"root": str(Path(instances).resolve()), "approximate": approximate}
    write_prepared(out_dir, splits, meta)
    return splits
