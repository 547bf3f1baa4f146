"""The dataset reader (LViT layout) and the prepared-split format in data/prepared/.

Source layout, one folder per split under `data.root`:

    Train_Folder/img/<id>.png | <id>.tif     RGB images (MoNuSeg: 1000x1000; test images are .tif)
    Train_Folder/labelcol/<id>.png           the mask, 0/255 (0/1 is accepted too)
    Train_Folder/Train_text.xlsx             columns `Image` (the mask file name) and `Description`

`read_split` checks every file of a split eagerly and fails with one `TextDiffError` line that names
the offending file, so a broken dataset stops `prepare` and never reaches a later stage. Workbook
rules: the first sheet is read; the header is the first row (among the first 20) holding both
`Image` and `Description` (case and surrounding spaces ignored; extra columns are ignored); a row
is matched to an image by the stem of its `Image` cell (`X.png`, `X.tif` and `X` all name image
`X`); report text has its whitespace collapsed to single spaces; rows for images that are not in
the split's img/ folder are ignored (the published workbooks are the source of truth for text, the
img/ folder for which images exist); duplicate rows for one image are fine when their text agrees
and an error when it differs.

Prepared format (`write_prepared` / `load_prepared`), written atomically:

    data/prepared/<split>.npz    images [N,S,S,3] uint8, masks [N,S,S] uint8 {0,1}, ids, texts,
                                 image_paths (relative to the source root), all sorted by id
    data/prepared/manifest.json  image size, absolute source root, per split the count, ids and a
                                 sha256 of every source image and mask, the package version

The .npz files are written with fixed zip timestamps, so preparing the same data twice gives
byte-identical outputs (DVC then sees nothing new downstream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from textdiff.atomic import atomic_dir
from textdiff.errors import TextDiffError
from textdiff.hashing import sha256_file

if TYPE_CHECKING:
    from textdiff.params import DataParams

SPLITS = ("train", "val", "test")
FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
WORKBOOKS = {"train": "Train_text.xlsx", "val": "Val_text.xlsx", "test": "Test_text.xlsx"}
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MASK_SUFFIX = ".png"
IMAGE_COLUMN = "Image"
TEXT_COLUMN = "Description"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: release_masks (the released code's ground truth) in every split

# PIL modes that convert to RGB without inventing or losing colour information (alpha is dropped).
_RGB_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"}
_HEADER_SEARCH_ROWS = 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


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


@dataclass
class PreparedSplit:
    """One split of data/prepared, in memory."""

    split: str
    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) uint8 {0, 1}
    ids: list[str]
    texts: list[str]
    image_size: int
    image_paths: list[str] = field(default_factory=list)  # relative to the manifest's source_root
    release_masks: np.ndarray | None = None  # (N, s, s) the released code's ground truth, s = data.image_size
    native_masks: np.ndarray | None = None  # (N, F, F) the source masks, when resized from one square size

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------
# reading the source dataset


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _split_dir(root: str | Path, split: str) -> Path:
    """The split's folder, checking the root and the folder exist."""
    _check_split(split)
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise TextDiffError(f"{root}: dataset root {what} (the params' data.root)")
    folder = root / FOLDERS[split]
    if not folder.is_dir():
        raise TextDiffError(f"{folder}: {split} split folder not found under {root}")
    return folder


def image_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files directly in `folder`, sorted by name; hidden files and other suffixes are
    skipped. The one folder scan of the dataset reader, pretraining's extra images and predict."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


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


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextDiffError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not data:
        raise TextDiffError(f"{path}: {what} file is empty (0 bytes)")
    return data


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _decode(path: Path, data: bytes, what: str) -> Image.Image:
    """Fully decode an image file with pillow (so truncation shows up now, not later)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            deep = _sixteen_bit_colour(im)
            im.load()  # the first frame of a multi-page TIFF
            decoded = im.copy()
    except Exception as err:  # pillow raises many types for bad files: OSError, ValueError, SyntaxError...
        pil_error = err
    else:
        if deep and what == "image":
            raise TextDiffError(f"{path}: 16-bit-per-channel colour image (expected 8-bit RGB; pillow would keep "
                                "only the high byte, so convert it to 8 bits yourself)")
        return decoded
    if path.suffix.lower() in (".tif", ".tiff"):
        # Some TIFF encodings pillow cannot decode; tifffile can.
        try:
            import tifffile

            array = tifffile.imread(io.BytesIO(data), key=0)
            return _array_to_pil(path, array, what)
        except TextDiffError:
            raise
        except Exception:
            pass
    if isinstance(pil_error, UnidentifiedImageError):
        raise TextDiffError(f"{path}: cannot read {what} (not a PNG/TIFF or other image file pillow knows)") from None
    raise TextDiffError(f"{path}: cannot read {what} ({_describe(pil_error)})") from None


def _sixteen_bit_colour(im: Image.Image) -> bool:
    """Pillow opens 16-bit RGB PNG/TIFF files as mode RGB and silently drops the low byte (a 12-bit
    scan comes out nearly black); only the undecoded tiles' raw mode ("RGB;16L") tells."""
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode and rawmode.startswith(("RGB", "BGR")):
            return True
    return False


def _array_to_pil(path: Path, array: np.ndarray, what: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise TextDiffError(f"{path}: unsupported {what} data type {array.dtype} (expected 8-bit)")
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
    raise TextDiffError(f"{path}: unsupported {what} shape {array.shape}")


def read_image(path: str | Path) -> tuple[np.ndarray, str]:
    """One image file as (H, W, 3) uint8 RGB, and the sha256 of its bytes. Grayscale and palette
    images are converted to RGB, an alpha channel is dropped; 16-bit or float images are refused."""
    path = Path(path)
    data = _read_bytes(path, "image")
    im = _decode(path, data, "image")
    if im.mode not in _RGB_MODES:
        raise TextDiffError(
            f"{path}: unsupported image mode {im.mode} (expected 8-bit RGB, RGBA, grayscale or palette)"
        )
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")  # the alpha channel is dropped below, not composited
    array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if array.size == 0:
        raise TextDiffError(f"{path}: image has no pixels ({im.size[0]}x{im.size[1]})")
    return np.ascontiguousarray(array), hashlib.sha256(data).hexdigest()


def read_mask(path: str | Path) -> tuple[np.ndarray, str]:
    """One mask file as (H, W) uint8 in {0, 1}, and the sha256 of its bytes. Values must be a subset
    of {0, 255} or of {0, 1}; a colour mask is accepted only when its channels agree."""
    path = Path(path)
    data = _read_bytes(path, "mask")
    im = _decode(path, data, "mask")
    if im.mode in ("P", "PA"):
        im = im.convert("RGB")  # palette indices mean nothing; the colours do
    elif im.mode == "LA":
        im = im.getchannel("L")
    if im.mode == "1":
        array = np.asarray(im, dtype=np.uint8)
    else:
        array = np.asarray(im)
    if array.ndim == 3:
        channels = array[..., : min(3, array.shape[2])]
        if not all(np.array_equal(channels[..., 0], channels[..., c]) for c in range(1, channels.shape[2])):
            raise TextDiffError(f"{path}: mask has colour (its channels differ); expected a binary grayscale mask")
        array = channels[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise TextDiffError(f"{path}: unsupported mask shape {array.shape}")
    if array.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        values = np.unique(array)
    found = {int(v) for v in values}
    if found <= {0, 1}:
        mask = array.astype(np.uint8)
    elif found <= {0, 255}:
        mask = (array == 255).astype(np.uint8)
    else:
        shown = ", ".join(str(v) for v in sorted(found)[:8]) + (", ..." if len(found) > 8 else "")
        raise TextDiffError(
            f"{path}: mask is not binary: found values {shown} ({len(found)} distinct); "
            "expected 0/255 or 0/1"
        )
    return np.ascontiguousarray(mask), hashlib.sha256(data).hexdigest()


def _report_key(value: object) -> str:
    """The image id an `Image` cell names: 'X.png', 'X.tif', 'img/X.png' and 'X' all name 'X'."""
    name = str(value).strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in IMAGE_SUFFIXES + (".jpg", ".jpeg", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


def read_reports(path: str | Path) -> dict[str, str]:
    """A report workbook as {image id: report}. Empty reports are kept as "" (the caller decides,
    since only rows for existing images matter); conflicting duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise TextDiffError(f"{path}: report workbook not found")
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:
        raise TextDiffError(f"{path}: cannot read the workbook ({_describe(err)})") from None
    try:
        if not wb.worksheets:
            raise TextDiffError(f"{path}: workbook has no sheets")
        ws = wb.worksheets[0]
        rows = ws.iter_rows(values_only=True)
        header: list[str] | None = None
        first_header: list[str] | None = None
        header_row = 0
        for header_row, row in enumerate(rows, start=1):
            cells = [_cell_text(v) for v in row]
            if not any(cells):
                continue
            if first_header is None:
                first_header = [c for c in cells if c]
            lowered = [c.lower() for c in cells]
            if IMAGE_COLUMN.lower() in lowered and TEXT_COLUMN.lower() in lowered:
                header = lowered
                break
            if header_row >= _HEADER_SEARCH_ROWS:
                break
        if header is None:
            has = ", ".join(repr(c) for c in first_header) if first_header else "none (the sheet is empty)"
            raise TextDiffError(
                f"{path}: sheet '{ws.title}' has no header row with the columns "
                f"'{IMAGE_COLUMN}' and '{TEXT_COLUMN}'; its columns: {has}"
            )
        image_col = header.index(IMAGE_COLUMN.lower())
        text_col = header.index(TEXT_COLUMN.lower())
        reports: dict[str, str] = {}
        where: dict[str, int] = {}
        for row_number, row in enumerate(rows, start=header_row + 1):
            image = row[image_col] if image_col < len(row) else None
            if image is None or not str(image).strip():
                continue  # a blank row
            key = _report_key(image)
            text = _cell_text(row[text_col] if text_col < len(row) else None)
            if key in reports and reports[key] and text and reports[key] != text:
                raise TextDiffError(
                    f"{path}: image '{key}' has two different reports "
                    f"(rows {where[key]} and {row_number}): {reports[key]!r} vs {text!r}"
                )
            if key not in reports or not reports[key]:
                reports[key] = text
                where[key] = row_number
        return reports
    finally:
        wb.close()


def report_for_image(reports: dict[str, str], workbook: Path, image_path: Path) -> str:
    """One image's report from a workbook `read_reports` read. A missing row and an empty report
    are one-line errors, the same for training and `textdiff predict`: the classifier never saw an
    image without its sentence."""
    image_id = image_path.stem
    if image_id not in reports:
        raise TextDiffError(f"{workbook}: no report row for image '{image_id}' ({image_path.name})")
    if not reports[image_id]:  # read_reports collapses whitespace: a blank cell is ""
        raise TextDiffError(f"{workbook}: the report for image '{image_id}' is empty")
    return reports[image_id]


def read_split(root: str | Path, split: str, *, progress: bool = False) -> list[Sample]:
    """Every image of one split with its mask and report, validated eagerly, sorted by id.

    Any problem (missing/corrupt file, size mismatch, non-binary mask, missing or empty report, bad
    workbook) raises one `TextDiffError` line naming the file or image.
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
        plan.append((sample_id, image_path, mask_path))

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
        samples.append(
            Sample(sample_id, image, mask, reports[sample_id], image_path, mask_path, image_sha, mask_sha)
        )
    return samples


def read_splits(
    root: str | Path, splits: Iterable[str] = SPLITS, *, progress: bool = False
) -> dict[str, list[Sample]]:
    """`read_split` for several splits, checking that no image id is in two splits (a leak)."""
    out: dict[str, list[Sample]] = {}
    seen: dict[str, str] = {}
    for split in splits:
        out[split] = read_split(root, split, progress=progress)
        for sample in out[split]:
            if sample.id in seen:
                raise TextDiffError(
                    f"{sample.image_path}: image '{sample.id}' is in both the {seen[sample.id]} "
                    f"and the {split} split"
                )
            seen[sample.id] = split
    return out


PROTOCOLS = ("project", "release")


def release_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The released code's ground truth: the 0/255 mask resized bilinearly (OpenCV's default
    INTER_LINEAR), then every non-zero pixel taken as nucleus, which dilates the nuclei by up to a
    pixel. The paper's Dice was scored against these masks."""
    import cv2

    resized = cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8) * 255, (size, size))
    return (resized > 0).astype(np.uint8)


def release_image(image: np.ndarray, size: int) -> np.ndarray:
    """The released code's teacher input: `cv2.imread` order (BGR, never converted) resized with
    OpenCV's default bilinear interpolation, no antialiasing."""
    return to_working_size(image, (size, size), "release")


def to_working_size(image: np.ndarray, size: tuple[int, int], protocol: str = "project") -> np.ndarray:
    """An RGB uint8 image as the teacher sees it at `size` (height, width): `project` resizes it
    bicubic (PIL); `release` turns it into `cv2.imread`'s BGR order and resizes it bilinear
    (OpenCV's default), as the released code does. prepare and `textdiff predict` both use this,
    so a model meets new images exactly as it met its training images."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    height, width = size
    if protocol == "release":
        import cv2

        bgr = np.ascontiguousarray(image[..., ::-1])
        return bgr if bgr.shape[:2] == (height, width) else cv2.resize(bgr, (width, height))
    if image.shape[:2] == (height, width):
        return np.array(image, dtype=np.uint8, copy=True)
    # np.array, not asarray: PIL's buffer is read-only, and torch.from_numpy warns on it.
    return np.array(Image.fromarray(image, "RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def resize_sample(sample: Sample, size: int, protocol: str = "project") -> Sample:
    """A copy of `sample` at size x size, with its release ground truth.

    `project`: the image bicubic RGB (PIL), the mask nearest (stays {0,1}). `release`: image and
    mask exactly as the released TextDiff code prepares them (`release_image`, `release_mask`).
    Non-square images are squashed, as the published 256x256 protocol does."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    image = to_working_size(sample.image, (size, size), protocol)
    dilated = release_mask(sample.mask, size)
    if protocol == "release":
        mask = dilated
    else:
        mask = np.asarray(Image.fromarray(sample.mask, "L").resize((size, size), Image.Resampling.NEAREST))
    return Sample(
        id=sample.id,
        image=np.asarray(image, dtype=np.uint8).copy(),
        mask=np.asarray(mask, dtype=np.uint8).copy(),
        release_mask=dilated,
        native_mask=sample.mask,
        text=sample.text,
        image_path=sample.image_path,
        mask_path=sample.mask_path,
        image_sha256=sample.image_sha256,
        mask_sha256=sample.mask_sha256,
    )


# ----------------------------------------------------------------------------------------------
# the prepared format


def _relative(path: Path, root: Path | None) -> str:
    path = Path(path)
    if root is not None:
        try:
            return path.resolve().relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path.resolve())


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so equal data gives equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _split_arrays(samples: list[Sample], size: int, root: Path | None) -> dict[str, np.ndarray]:
    # A sample without its release ground truth gets it at its own size.
    samples = [s if s.release_mask is not None else dataclasses.replace(s, release_mask=release_mask(s.mask, size))
               for s in samples]
    release = {s.release_mask.shape for s in samples}
    if len(release) > 1:
        raise ValueError(f"release masks of several sizes {sorted(release)}")
    release_shape = release.pop() if release else (size, size)
    for s in samples:
        if s.image.shape != (size, size, 3) or s.image.dtype != np.uint8:
            raise ValueError(f"{s.id}: image is {s.image.shape} {s.image.dtype}, expected ({size}, {size}, 3) uint8")
        if s.mask.shape != (size, size) or s.mask.dtype != np.uint8 or s.mask.max(initial=0) > 1:
            raise ValueError(f"{s.id}: mask is {s.mask.shape} {s.mask.dtype}, expected ({size}, {size}) uint8 in {{0,1}}")
    ids = [s.id for s in samples]
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise ValueError("samples must be sorted by id with unique ids")
    arrays = {
        "images": np.stack([s.image for s in samples]) if samples else np.zeros((0, size, size, 3), np.uint8),
        "masks": np.stack([s.mask for s in samples]) if samples else np.zeros((0, size, size), np.uint8),
        "release_masks": (np.stack([s.release_mask for s in samples]) if samples
                          else np.zeros((0, *release_shape), np.uint8)),
        "ids": np.array(ids, dtype=str),
        "texts": np.array([s.text for s in samples], dtype=str),
        "image_paths": np.array([_relative(s.image_path, root) for s in samples], dtype=str),
    }
    native = {s.native_mask.shape for s in samples if s.native_mask is not None}
    if samples and all(s.native_mask is not None for s in samples) and len(native) == 1:
        (h, w), = native
        if h == w:  # one square source size: what native-resolution scoring needs
            arrays["native_masks"] = np.stack([s.native_mask for s in samples]).astype(np.uint8)
    return arrays


def _manifest_split(samples: list[Sample], root: Path | None) -> dict:
    """The manifest's record of one split: ids, source files and their hashes."""
    return {
        "count": len(samples),
        "ids": [s.id for s in samples],
        "files": {
            s.id: {
                "image": _relative(s.image_path, root),
                "image_sha256": s.image_sha256 or sha256_file(s.image_path),
                "mask": _relative(s.mask_path, root),
                "mask_sha256": s.mask_sha256 or sha256_file(s.mask_path),
            }
            for s in samples
        },
    }


def write_prepared(out_dir: str | Path, splits: dict[str, list[Sample]], meta: dict) -> Path:
    """Write `<split>.npz` and manifest.json into `out_dir`, atomically.

    Everything goes to a sibling temp folder first (`atomic_dir`), which replaces `out_dir` only
    once complete; on any failure an existing `out_dir` is left as it was. `meta`
    is merged into the manifest; its `source_root` (made absolute) roots the stored image paths,
    and its `image_size`, if given, must match the samples. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if not splits:
        raise ValueError("write_prepared: no splits given")
    for split in splits:
        _check_split(split)
    sizes = {s.image.shape[0] for samples in splits.values() for s in samples}
    size = int(meta["image_size"]) if meta.get("image_size") else (sizes.pop() if len(sizes) == 1 else None)
    if size is None:
        raise ValueError(f"write_prepared: samples have several sizes {sorted(sizes)}; resize them first")
    root = Path(meta["source_root"]).resolve() if meta.get("source_root") else None

    with atomic_dir(out_dir) as tmp:
        manifest_splits = {}
        for split, samples in splits.items():
            _save_npz(tmp / f"{split}.npz", _split_arrays(samples, size, root))
            manifest_splits[split] = _manifest_split(samples, root)
        from textdiff import __version__

        manifest = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            **{k: v for k, v in meta.items() if k not in ("image_size", "source_root", "splits")},
            "image_size": size,
            "source_root": str(root) if root is not None else None,
            "splits": manifest_splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_manifest(out_dir: str | Path) -> dict:
    """data/prepared/manifest.json, with one-line errors when it is missing or unreadable."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise TextDiffError(f"{out_dir}: prepared data not found; run `textdiff prepare` first")
    path = out_dir / MANIFEST
    if not path.is_file():
        raise TextDiffError(f"{path}: manifest not found (incomplete prepared data); run `textdiff prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TextDiffError(f"{path}: unreadable manifest ({_describe(err)}); run `textdiff prepare` again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise TextDiffError(f"{path}: unknown prepared-data format; run `textdiff prepare` again")
    return manifest


def load_prepared(out_dir: str | Path, split: str) -> PreparedSplit:
    """One split of the prepared data, checked against the manifest."""
    _check_split(split)
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if split not in manifest.get("splits", {}):
        raise TextDiffError(f"{out_dir / MANIFEST}: no '{split}' split; run `textdiff prepare` again")
    path = out_dir / f"{split}.npz"
    if not path.is_file():
        raise TextDiffError(f"{path}: not found; run `textdiff prepare` first")
    if not zipfile.is_zipfile(path):
        raise TextDiffError(f"{path}: not a valid .npz file (corrupt or truncated); run `textdiff prepare` again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, masks, release_masks = npz["images"], npz["masks"], npz["release_masks"]
            ids, texts = [str(x) for x in npz["ids"]], [str(x) for x in npz["texts"]]
            paths = [str(x) for x in npz["image_paths"]] if "image_paths" in npz.files else []
            native = npz["native_masks"] if "native_masks" in npz.files else None
    except Exception as err:
        raise TextDiffError(f"{path}: unreadable prepared split ({_describe(err)}); run `textdiff prepare` again") from None
    size = int(manifest["image_size"])
    n = len(ids)
    if (
        ids != list(manifest["splits"][split]["ids"])
        or images.shape != (n, size, size, 3)
        or masks.shape != (n, size, size)
        or len(release_masks) != n
        or len(texts) != n
        or (native is not None and len(native) != n)
    ):
        raise TextDiffError(f"{path}: does not match {out_dir / MANIFEST}; run `textdiff prepare` again")
    return PreparedSplit(split, images, masks, ids, texts, size, paths, release_masks, native)



# ----------------------------------------------------------------------------------------------
# the prepare stage's work


def native_size(splits: dict[str, list[Sample]], tile: int) -> int:
    """The one square size every image shares (tiles mode keeps native resolution)."""
    shapes: dict[tuple[int, ...], Path] = {}
    for samples in splits.values():
        for s in samples:
            shapes.setdefault(s.image.shape[:2], s.image_path)
    if len(shapes) != 1:
        (a, pa), (b, pb) = list(shapes.items())[:2]
        raise TextDiffError(f"{pb}: data.mode=tiles needs one image size, but it is {b[1]}x{b[0]} and {pa} is {a[1]}x{a[0]}")
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

    from textdiff.stain import fit_reference, normalize

    if method == "none":
        return {}
    try:
        reference = fit_reference(method, [s.image for s in splits["train"]])
    except (ValueError, np.linalg.LinAlgError) as err:
        folder = splits["train"][0].image_path.parent if splits["train"] else "train"
        raise TextDiffError(f"{folder}: data.stain={method} cannot fit a stain reference on these images ({err})") from None
    total = sum(len(samples) for samples in splits.values())
    with tqdm(total=total, desc=f"{method} stain normalisation", unit="image", leave=False) as bar:
        for split, samples in splits.items():
            for k, sample in enumerate(samples):
                samples[k] = dataclasses.replace(sample, image=normalize(sample.image, reference))
                bar.update(1)
    return reference


def prepare_dataset(params: "DataParams", root: Path, out_dir: Path) -> dict[str, list[Sample]]:
    """Read and validate every split under `root`, bring it to the working size, write `out_dir`.

    `resize` (the paper's protocol) resizes every image to `data.image_size` (`data.protocol`:
    ours, or the released code's BGR/bilinear images and dilated masks); `tiles` keeps the native
    resolution (extract cuts windows), which needs one square size. Every split also keeps the
    release ground truth at `data.image_size`, so any run is scored both ways. Returns what was written.
    """
    from textdiff.params import section_dict

    splits = read_splits(root, SPLITS, progress=True)
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
    write_prepared(out_dir, splits, meta)
    return splits

__all__ = [
    "FOLDERS",
    "SPLITS",
    "PreparedSplit",
    "Sample",
    "list_images",
    "load_prepared",
    "native_size",
    "prepare_dataset",
    "read_image",
    "read_manifest",
    "read_mask",
    "read_reports",
    "read_split",
    "read_splits",
    "resize_sample",
    "write_prepared",
]
