"""The dataset reader for a lab's own annotated tiles (`data.layout: folder`), one folder for all:

    <root>/images/<id>.png | .tif | .tiff | .jpg   RGB tiles, all of one size and magnification (data.mpp)
    <root>/masks/<id>.png | .tif                   per image: a binary mask (0/255 or 0/1) or an
                                                    instance label map (0 = background, 1..N nuclei)
    <root>/reports.csv                             optional: columns `image`, `report` (one sentence each)
    <root>/split.csv                               optional: columns `image`, `split` (train, val or test)

Why this shape: it is what annotation tools export (QuPath, CVAT and napari write a label image per
tile), and it asks for nothing a model without text does not need. Instance maps give the distance
target and per-nucleus metrics; binary masks train the mask alone. Without `split.csv` the images
are split by a seeded permutation (`data.split_seed`, `data.val_fraction`, `data.test_fraction`),
so the same folder always gives the same split. Without `reports.csv` every report is empty and
only `train.fusion: none` can train (the train stage says so in one line).

Every file is checked before anything is written, with one `TextDiffError` line naming the file.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from textdiff.data.dataset import SPLITS, Sample
from textdiff.data.images import describe, image_files, read_file_bytes, read_image
from textdiff.data.instances import decode_instance_map
from textdiff.data.reports import cell_text, report_key
from textdiff.errors import TextDiffError

IMAGES, MASKS, REPORTS, SPLIT_FILE = "images", "masks", "reports.csv", "split.csv"
FOLDER_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")


def is_folder_layout(root: Path) -> bool:
    """A root holding `images/` and `masks/` (the LViT layout holds `Train_Folder/` instead)."""
    return (Path(root) / IMAGES).is_dir() and (Path(root) / MASKS).is_dir()


def _read_csv(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    """A two-column CSV as {image id: value}; the header names the columns (case ignored), the image
    column may hold `X`, `X.png` or `images/X.png`; one line on any problem."""
    try:
        text = read_file_bytes(path, "table").decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextDiffError(f"{path}: not UTF-8 text ({describe(err)})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise TextDiffError(f"{path}: no header row")
    header = [c.strip().lower() for c in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise TextDiffError(f"{path}: no column '{missing[0]}' in the header (it has: {', '.join(header) or 'none'}); "
                            f"expected columns {', '.join(columns)}")
    key_col, value_col = header.index(columns[0]), header.index(columns[1])
    out: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        key = report_key(row[key_col]) if key_col < len(row) else ""  # the workbooks' rule for an image cell
        value = cell_text(row[value_col] if value_col < len(row) else None)
        if not key:
            raise TextDiffError(f"{path}: row {number} names no image")
        if key in out and out[key] != value:
            raise TextDiffError(f"{path}: image '{key}' has two rows that disagree ({out[key]!r} vs {value!r})")
        out[key] = value
    return out


def _by_id(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise TextDiffError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in image_files(folder, suffixes):
        if path.stem in found:
            raise TextDiffError(f"{folder}: two {what} files for id '{path.stem}': "
                                f"{found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def read_report_table(path: Path) -> dict[str, str]:
    """A reports.csv (columns `image`, `report`) as {image id: report}: also what
    `textdiff predict --reports` reads when given a .csv instead of a workbook."""
    return _read_csv(Path(path), ("image", "report"))


def seeded_split(ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """{id: split} from a seeded permutation of the sorted ids: at least one training image, and
    val / test rounded to the nearest image (a fraction above 0 gets at least one image)."""
    n = len(ids)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise TextDiffError(f"{n} images cannot be split into {n_val} val and {n_test} test with any left to train on: "
                            "add images, lower data.val_fraction / data.test_fraction, or give a split.csv")
    order = np.random.default_rng(seed).permutation(n)
    names = sorted(ids)
    split = {}
    for rank, i in enumerate(order):
        split[names[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """A mask file as (binary mask, instance labels or None, sha256 of its bytes): values within
    {0, 1} or {0, 255} are a binary mask, anything else an instance label map (read as
    `data.instances` maps are)."""
    data = read_file_bytes(path, "mask")
    labels = decode_instance_map(path, data)
    values = set(np.unique(labels).tolist())
    binary = values <= {0, 1} or values <= {0, 255}
    return (labels > 0).astype(np.uint8), None if binary else labels, hashlib.sha256(data).hexdigest()


def read_folder(root: Path, *, split_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                progress: bool = False) -> dict[str, list[Sample]]:
    """Every image of a folder-layout dataset with its mask (and labels, report), by split."""
    root = Path(root)
    images = _by_id(root / IMAGES, FOLDER_IMAGE_SUFFIXES, "image")
    if not images:
        raise TextDiffError(f"{root / IMAGES}: no images ({', '.join(FOLDER_IMAGE_SUFFIXES)})")
    masks = _by_id(root / MASKS, MASK_SUFFIXES, "mask")
    for image_id, path in images.items():
        if image_id not in masks:
            raise TextDiffError(f"{path}: no mask (expected {root / MASKS / (image_id + '.png')})")
    reports_path = root / REPORTS
    reports = read_report_table(reports_path) if reports_path.is_file() else None
    if reports is not None:
        for image_id, path in images.items():
            if not reports.get(image_id):
                what = "no row" if image_id not in reports else "an empty report"
                raise TextDiffError(f"{reports_path}: {what} for image '{image_id}' ({path.name}); "
                                    "every image needs its sentence, or remove the file to train without text")
    split_path = root / SPLIT_FILE
    if split_path.is_file():
        assignment = _read_csv(split_path, ("image", "split"))
        for image_id, path in images.items():
            if image_id not in assignment:
                raise TextDiffError(f"{split_path}: no row for image '{image_id}' ({path.name})")
            if assignment[image_id].lower() not in SPLITS:
                raise TextDiffError(f"{split_path}: image '{image_id}' has split {assignment[image_id]!r}; "
                                    f"expected one of {', '.join(SPLITS)}")
        assignment = {k: v.lower() for k, v in assignment.items() if k in images}
    else:
        assignment = seeded_split(list(images), split_seed, val_fraction, test_fraction)
    for split in SPLITS:
        if split not in assignment.values():
            raise TextDiffError(f"{split_path if split_path.is_file() else root}: no {split} images (train learns "
                                "from train, picks its epoch and nucleus rule on val, evaluate scores test)")

    items: Iterable = sorted(images.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(list(items), desc=f"read {root.name}", unit="img", leave=False)
    out: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    kinds: dict[bool, Path] = {}
    sizes: dict[tuple[int, int], Path] = {}
    for image_id, image_path in items:
        mask_path = masks[image_id]
        image, image_sha = read_image(image_path)
        mask, labels, mask_sha = _read_labels(mask_path)
        if image.shape[:2] != mask.shape:
            raise TextDiffError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
                                f"is {image.shape[1]}x{image.shape[0]} (width x height)")
        kinds.setdefault(labels is not None, mask_path)
        if len(kinds) > 1:
            raise TextDiffError(f"{kinds[False]}: a binary mask, but {kinds[True]} is an instance label map: give "
                                "every image instance labels (1..N per nucleus) or every image a binary mask")
        sizes.setdefault(image.shape[:2], image_path)
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise TextDiffError(f"{pb}: is {b[1]}x{b[0]} but {pa.name} is {a[1]}x{a[0]}: every tile must have one "
                                "size (one magnification per working pixel); crop or pad them to one")
        out[assignment[image_id]].append(
            Sample(image_id, image, mask, reports[image_id] if reports is not None else "", image_path, mask_path,
                   image_sha, mask_sha, instances=labels))
    return out
