"""Shared fixtures: where the real data lives, and small synthetic datasets to break on purpose."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# The LViT layout (kept here rather than imported, so the fixtures describe the format independently).
FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
WORKBOOKS = {"train": "Train_text.xlsx", "val": "Val_text.xlsx", "test": "Test_text.xlsx"}
REPORTS = (
    "The nuclei are evenly distributed.",
    "The nuclei density in the upper right is high.",
    "The nuclei are sparsely distributed.",
    "The nuclei density in the lower left is high.",
)


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """The read-only `../shared` folder next to the repository root (may not exist)."""
    return REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def monuseg_root(shared_root: Path) -> Path:
    """The real MoNuSeg data in the LViT layout; skips the test when it is not available."""
    root = shared_root / "data" / "MoNuSeg"
    if not (root / "Train_Folder").is_dir():
        pytest.skip(f"real MoNuSeg data not found at {root}")
    return root


def write_workbook(path: Path, rows: Iterable[Iterable], header: Iterable | None = ("Image", "Description")) -> Path:
    """Write an .xlsx with one sheet: `header` (None = no header row) then `rows`."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    if header is not None:
        ws.append(list(header))
    for row in rows:
        ws.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    return path


@pytest.fixture
def xlsx_writer() -> Callable[..., Path]:
    """`write_workbook(path, rows, header=("Image", "Description"))` for tests that rewrite reports."""
    return write_workbook


def _synthetic_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pinkish H&E-like RGB image and a 0/255 mask of a few discs (both classes present)."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(3):
        cy, cx = rng.integers(4, size - 4, 2)
        r = rng.integers(3, max(4, size // 6))
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    mask[0, 0] = False  # never all foreground
    mask[size // 2, size // 2] = True  # never all background
    image = np.empty((size, size, 3), np.uint8)
    noise = rng.integers(0, 30, (size, size, 3))
    image[:] = np.where(mask[..., None], [90, 40, 140], [230, 170, 200]) + noise - 15
    return image, mask.astype(np.uint8) * 255


@pytest.fixture
def tiny_monuseg(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a small synthetic dataset in the LViT layout; returns its root.

    `tiny_monuseg(name="MoNuSeg", counts={"train": 3, "val": 2, "test": 2}, size=40, seed=0)`
    writes `<tmp_path>/<name>/{Train,Val,Test}_Folder/` with img/ (.png; .tif for test, like the
    real data), labelcol/ (0/255 .png) and `<Split>_text.xlsx` (`Image` = mask file name,
    `Description`). Ids are `img_<split>_<k>`. Tests then break single files on purpose.
    """

    def make(name: str = "MoNuSeg", counts: dict[str, int] | None = None, size: int = 40, seed: int = 0) -> Path:
        counts = {"train": 3, "val": 2, "test": 2} if counts is None else counts
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for split, n in counts.items():
            folder = root / FOLDERS[split]
            (folder / "img").mkdir(parents=True, exist_ok=True)
            (folder / "labelcol").mkdir(parents=True, exist_ok=True)
            rows = []
            for k in range(n):
                stem = f"img_{split}_{k}"
                image, mask = _synthetic_pair(rng, size)
                suffix = ".tif" if split == "test" else ".png"
                Image.fromarray(image, "RGB").save(folder / "img" / f"{stem}{suffix}")
                Image.fromarray(mask, "L").save(folder / "labelcol" / f"{stem}.png")
                rows.append((f"{stem}.png", REPORTS[k % len(REPORTS)]))
            write_workbook(folder / WORKBOOKS[split], rows)
        return root

    return make
