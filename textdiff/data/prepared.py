"""The prepared-split format in data/prepared/, written atomically:

    data/prepared/<split>.npz    images [N,S,S,3] uint8, masks [N,S,S] uint8 {0,1}, ids, texts,
                                 image_paths (relative to the source root), all sorted by id;
                                 with data.instances also instances [N,F,F] uint16 (per-nucleus
                                 labels at the source size) and approximate [N] bool
    data/prepared/manifest.json  image size, absolute source root, per split the count, ids and a
                                 sha256 of every source image and mask, the package version

The .npz files are written with fixed zip timestamps, so preparing the same data twice gives
byte-identical outputs (DVC then sees nothing new downstream).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from textdiff.atomic import atomic_dir
from textdiff.data.dataset import Sample, check_split
from textdiff.data.images import describe
from textdiff.data.resize import release_mask
from textdiff.errors import TextDiffError
from textdiff.hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: release_masks (the released code's ground truth) in every split
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


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
    instances: np.ndarray | None = None  # (N, F, F) uint16 per-nucleus labels at the source size (data.instances)
    approximate: np.ndarray | None = None  # (N,) bool: that image's instance map is approximate (never scored)

    def __len__(self) -> int:
        return len(self.ids)


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
            raise ValueError(f"{s.id}: mask is {s.mask.shape} {s.mask.dtype}, expected ({size}, {size}) uint8 in "
                             f"{{0,1}}")
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
    if samples and all(s.instances is not None for s in samples):
        shapes = {s.instances.shape for s in samples}
        if len(shapes) == 1 and next(iter(shapes))[0] == next(iter(shapes))[1]:
            arrays["instances"] = np.stack([s.instances for s in samples]).astype(np.uint16)
            arrays["approximate"] = np.array([s.approximate for s in samples], dtype=bool)
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
        check_split(split)
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
        raise TextDiffError(f"{path}: unreadable manifest ({describe(err)}); run `textdiff prepare` again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise TextDiffError(f"{path}: unknown prepared-data format; run `textdiff prepare` again")
    return manifest


def load_prepared(out_dir: str | Path, split: str) -> PreparedSplit:
    """One split of the prepared data, checked against the manifest."""
    check_split(split)
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
            instances = npz["instances"] if "instances" in npz.files else None
            approximate = npz["approximate"] if "approximate" in npz.files else None
    except Exception as err:
        raise TextDiffError(f"{path}: unreadable prepared split ({describe(err)}); run `textdiff prepare` "
                            "again") from None
    size = int(manifest["image_size"])
    n = len(ids)
    if (
        ids != list(manifest["splits"][split]["ids"])
        or images.shape != (n, size, size, 3)
        or masks.shape != (n, size, size)
        or len(release_masks) != n
        or len(texts) != n
        or (native is not None and len(native) != n)
        or (instances is not None and (len(instances) != n or approximate is None or len(approximate) != n))
    ):
        raise TextDiffError(f"{path}: does not match {out_dir / MANIFEST}; run `textdiff prepare` again")
    return PreparedSplit(split, images, masks, ids, texts, size, paths, release_masks, native, instances,
                         approximate)
