"""The dataset reader for the LViT layout, one folder per split under `data.root`:

    Train_Folder/img/<id>.png | <id>.tif     RGB images (MoNuSeg: 1000x1000; test images are .tif)
    Train_Folder/labelcol/<id>.png           the mask, 0/255 (0/1 is accepted too)
    Train_Folder/Train_text.xlsx             columns `Image` (the mask file name) and `Description`

`read_split` checks every file of a split eagerly and fails with one `TextDiffError` line that names
the offending file, so a broken dataset stops `prepare` and never reaches a later stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from textdiff.data.images import IMAGE_SUFFIXES, image_files, read_image, read_mask
from textdiff.data.instances import approximate_ids, checked_instance_map, instance_path
from textdiff.data.reports import read_reports, report_for_image
from textdiff.errors import TextDiffError

SPLITS = ("train", "val", "test")
FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
WORKBOOKS = {"train": "Train_text.xlsx", "val": "Val_text.xlsx", "test": "Test_text.xlsx"}
MASK_SUFFIX = ".png"


@dataclass
class Sample:
    """One labelled image, as read from the source dataset (or resized from one)."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 in {0, 1}
    text: str
    image_path: Path
    mask_path: Path
    image_sha256: str = ""  # of the source file's bytes ("" = not computed)
    mask_sha256: str = ""
    release_mask: np.ndarray | None = None  # the released code's ground truth at the working size
    native_mask: np.ndarray | None = None  # the source mask, kept when the sample is resized (native scoring)
    instances: np.ndarray | None = None  # (H0, W0) uint16 per-nucleus labels at the source size (data.instances)
    approximate: bool = False  # its instance map is an approximation: a training target, never scored



def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _split_dir(root: str | Path, split: str) -> Path:
    """The split's folder, checking the root and the folder exist."""
    check_split(split)
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise TextDiffError(f"{root}: dataset root {what} (the params' data.root)")
    folder = root / FOLDERS[split]
    if not folder.is_dir():
        raise TextDiffError(f"{folder}: {split} split folder not found under {root}")
    return folder



def list_images(root: str | Path, split: str) -> list[Path]:
    """The image files of one split, sorted by id; checks the folders exist and the split is not
    empty. Files with other suffixes (and hidden files) in img/ are ignored."""
    img_dir = _split_dir(root, split) / "img"
    if not img_dir.is_dir():
        raise TextDiffError(f"{img_dir}: img folder not found")
    by_id: dict[str, Path] = {}
    for path in image_files(img_dir):
        if path.stem in by_id:
            raise TextDiffError(f"{img_dir}: two images with id '{path.stem}': {by_id[path.stem].name} and {path.name}")
        by_id[path.stem] = path
    if not by_id:
        raise TextDiffError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in the {split} split")
    return [by_id[k] for k in sorted(by_id)]



def read_split(root: str | Path, split: str, *, progress: bool = False,
               instances: Path | None = None) -> list[Sample]:
    """Every image of one split with its mask and report, validated eagerly, sorted by id; with
    `instances` (a MoNuSeg-instances folder) also each image's per-nucleus label map.

    Any problem (missing/corrupt file, size mismatch, non-binary mask, missing or empty report, bad
    workbook, a missing or disagreeing instance map) raises one `TextDiffError` line naming the file.
    """
    image_paths = list_images(root, split)
    folder = image_paths[0].parent.parent
    workbook = folder / WORKBOOKS[split]
    reports = read_reports(workbook)
    mask_dir = folder / "labelcol"
    # Cheap checks first, so a missing file is reported before seconds of decoding.
    plan = []
    for image_path in image_paths:
        sample_id = image_path.stem
        mask_path = mask_dir / f"{sample_id}{MASK_SUFFIX}"
        if not mask_path.is_file():
            raise TextDiffError(f"{image_path}: no mask (expected {mask_path})")
        report_for_image(reports, workbook, image_path)
        if instances is not None and not instance_path(instances, split, sample_id).is_file():
            raise TextDiffError(f"{instance_path(instances, split, sample_id)}: no instance map for image "
                                f"{sample_id} (every image under data.instances needs one)")
        plan.append((sample_id, image_path, mask_path))
    approx = approximate_ids(instances) if instances is not None else set()

    items: Iterable = plan
    if progress:
        from tqdm import tqdm

        items = tqdm(plan, desc=f"read {split}", unit="img", leave=False)
    samples = []
    for sample_id, image_path, mask_path in items:
        image, image_sha = read_image(image_path)
        mask, mask_sha = read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise TextDiffError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path.name} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        labels = (checked_instance_map(instance_path(instances, split, sample_id), mask)
                  if instances is not None else None)
        samples.append(
            Sample(sample_id, image, mask, reports[sample_id], image_path, mask_path, image_sha, mask_sha,
                   instances=labels, approximate=sample_id in approx)
        )
    return samples


def read_splits(
    root: str | Path, splits: Iterable[str] = SPLITS, *, progress: bool = False, instances: Path | None = None
) -> dict[str, list[Sample]]:
    """`read_split` for several splits, checking that no image id is in two splits (a leak)."""
    out: dict[str, list[Sample]] = {}
    seen: dict[str, str] = {}
    for split in splits:
        out[split] = read_split(root, split, progress=progress, instances=instances)
        for sample in out[split]:
            if sample.id in seen:
                raise TextDiffError(
                    f"{sample.image_path}: image '{sample.id}' is in both the {seen[sample.id]} "
                    f"and the {split} split"
                )
            seen[sample.id] = split
    return out
