"""cache/features.zarr: the teacher's features and the reports' embeddings, computed once.

Layout (zarr v3), one group per split holding N images:
    block_<b>      [N, views, steps, C, H, W]  native resolution, `extract.dtype`, one image per chunk
    masks          [N, views, H, W] uint8      the mask seen in each view
    images         [N, H, W, 3] uint8          the identity view, for overlays and the RGB control
    text_tokens    [N, L, D] float32           last_hidden_state, padded/truncated to L
    text_mask      [N, L] uint8
    text_pooled    [N, D] float32
    complete       [N] uint8                   1 once every array above holds image i
    attrs          ids, texts
and root attrs: `fingerprint` (everything the features depend on) and `provenance` (versions).

Why this shape: training reads one image (all its views, steps and blocks) at a time, so one chunk
per image makes a read one decompression, and makes "image i is done" one flag written last. A
killed run leaves at most one image without its flag; the next run redoes exactly the unflagged
ones. A cache whose fingerprint differs from the params is never extended: it is rebuilt from
scratch (or refused), so features of two teachers can never be mixed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from textdiff.errors import TextDiffError

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "/"}}


@dataclass
class TileLayout:
    """Tiles mode: which source image each cached window comes from, and where it sits."""

    image_ids: list[str]
    image_texts: list[str]
    image_index: list[int]  # per window
    origins: list[tuple[int, int]]  # per window, (y, x)
    full_size: int  # the source images' (square) side


@dataclass
class SplitSpec:
    """What one split's group must hold; derived from the prepared data and the params."""

    ids: list[str]
    texts: list[str]
    image_size: int
    views: int
    steps: int
    block_shapes: dict[int, tuple[int, int, int]]
    text_length: int
    text_dim: int
    dtype: str
    tiles: TileLayout | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def array_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], Any]]:
        """name -> (shape, chunks, numpy dtype)."""
        n, v, s, size = self.n, self.views, self.steps, self.image_size
        out = {}
        for b, (c, h, w) in self.block_shapes.items():
            out[f"block_{b}"] = ((n, v, s, c, h, w), (1, v, s, c, h, w), STORAGE_DTYPES[self.dtype])
        out["masks"] = ((n, v, size, size), (1, v, size, size), np.uint8)
        out["images"] = ((n, size, size, 3), (1, size, size, 3), np.uint8)
        out["text_tokens"] = ((n, self.text_length, self.text_dim), (max(n, 1), self.text_length, self.text_dim), np.float32)
        out["text_mask"] = ((n, self.text_length), (max(n, 1), self.text_length), np.uint8)
        out["text_pooled"] = ((n, self.text_dim), (max(n, 1), self.text_dim), np.float32)
        out["complete"] = ((n,), (1,), np.uint8)
        if self.tiles is not None:
            m, full = len(self.tiles.image_ids), self.tiles.full_size
            out["tile_image"] = ((n,), (max(n, 1),), np.int32)
            out["tile_origin"] = ((n, 2), (max(n, 1), 2), np.int32)
            out["full_masks"] = ((m, full, full), (1, full, full), np.uint8)
        return out


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the stored numpy array (bfloat16 kept as its raw 16 bits)."""
    if dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return x.detach().to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _open_group(path: Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a broken store
        raise TextDiffError(f"{path}: not a readable zarr v3 feature cache ({type(err).__name__})") from None


def open_for_writing(path: Path, fingerprint: dict, specs: dict[str, SplitSpec], provenance: dict,
                     rebuild: bool = True) -> zarr.Group:
    """Resume a cache built with the same fingerprint, or start a fresh one.

    A cache built with other params is deleted and rebuilt when `rebuild`, else refused; either way
    the message says which params differ.
    """
    path = Path(path)
    if path.exists():
        reason = _resume_problem(path, fingerprint, specs)
        if reason is None:
            return _open_group(path, "r+")
        if not rebuild:
            raise TextDiffError(f"{path}: {reason}; delete it or run extract with rebuild allowed")
        print(f"{path}: {reason}; rebuilding it from scratch")
        shutil.rmtree(path)
    return _create(path, fingerprint, specs, provenance)


def _resume_problem(path: Path, fingerprint: dict, specs: dict[str, SplitSpec]) -> str | None:
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception:  # noqa: BLE001
        return "exists but is not a readable feature cache"
    if attrs.get("format") != FORMAT_VERSION:
        return f"has cache format {attrs.get('format')!r}, expected {FORMAT_VERSION}"
    old = attrs.get("fingerprint", {})
    diff = fingerprint_diff(old, fingerprint)
    if diff:
        return "was built with other params (" + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "") + ")"
    for split, spec in specs.items():
        if split not in root:
            return f"has no '{split}' group"
        if list(root[split].attrs.get("ids", [])) != spec.ids:
            return f"'{split}' holds other images than data/prepared"
        for name, (shape, _, _) in spec.array_shapes().items():
            if name not in root[split] or tuple(root[split][name].shape) != shape:
                return f"'{split}/{name}' is missing or has another shape"
    return None


def _create(path: Path, fingerprint: dict, specs: dict[str, SplitSpec], provenance: dict) -> zarr.Group:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for split, spec in specs.items():
        group = root.create_group(split)
        for name, (shape, chunks, dtype) in spec.array_shapes().items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               chunk_key_encoding=_CHUNK_KEYS)
        group.attrs.update({"ids": spec.ids, "texts": spec.texts, "text_complete": False})
        if spec.tiles is not None:
            group.attrs.update({"image_ids": spec.tiles.image_ids, "image_texts": spec.tiles.image_texts})
    # Written last: a cache without its fingerprint is treated as foreign and rebuilt.
    root.attrs.update({"format": FORMAT_VERSION, "fingerprint": fingerprint, "provenance": provenance})
    return root


def chunk_exists(path: Path, split: str, name: str, index: int, ndim: int) -> bool:
    """Whether the chunk holding image `index` of an array is on disk (one image per chunk)."""
    return (Path(path) / split / name / "c" / str(index) / Path(*(["0"] * (ndim - 1)))).is_file()


def verify(path: Path, fingerprint: dict | None = None, specs: dict[str, SplitSpec] | None = None) -> list[str]:
    """Every problem that would make the cache untrustworthy, one line each (empty = sound)."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: does not exist (run `textdiff extract`)"]
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as err:  # noqa: BLE001
        return [f"{path}: not a readable zarr v3 cache ({type(err).__name__})"]
    problems = []
    if attrs.get("format") != FORMAT_VERSION:
        problems.append(f"{path}: cache format {attrs.get('format')!r}, expected {FORMAT_VERSION}")
    if fingerprint is not None:
        for line in fingerprint_diff(attrs.get("fingerprint", {}), fingerprint):
            problems.append(f"{path}: built with other params: {line}")
    splits = specs.keys() if specs is not None else [k for k in root.group_keys()]
    for split in splits:
        if split not in root:
            problems.append(f"{path}/{split}: split group missing")
            continue
        group = root[split]
        n = len(group.attrs.get("ids", []))
        expected = specs[split].array_shapes() if specs is not None else None
        if expected is not None and list(group.attrs.get("ids", [])) != specs[split].ids:
            problems.append(f"{path}/{split}: holds other image ids than data/prepared")
        names = list(expected) if expected is not None else list(group.array_keys())
        for name in names:
            if name not in group:
                problems.append(f"{path}/{split}/{name}: array missing")
                continue
            if expected is not None and tuple(group[name].shape) != expected[name][0]:
                problems.append(f"{path}/{split}/{name}: shape {tuple(group[name].shape)}, expected {expected[name][0]}")
        if not group.attrs.get("text_complete", False):
            problems.append(f"{path}/{split}: text embeddings were never completed")
        if "complete" not in group:
            continue
        flags = group["complete"][:]
        ids = group.attrs.get("ids", [])
        missing = [ids[i] if i < len(ids) else str(i) for i in np.flatnonzero(flags == 0)]
        if missing:
            problems.append(f"{path}/{split}: {len(missing)} of {n} images incomplete (first: {missing[0]})")
        per_image = [k for k in group.array_keys() if k.startswith("block_") or k in ("masks", "images")]
        for i in np.flatnonzero(flags == 1):
            for name in per_image:
                if not chunk_exists(path, split, name, int(i), group[name].ndim):
                    problems.append(f"{path}/{split}/{name}: chunk of image {ids[i]} is missing on disk")
    return problems


@dataclass
class CachedSplit:
    """Read access to one split, one image at a time, in the layout training wants."""

    group: zarr.Group
    dtype: str
    blocks: list[int]
    _text: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return list(self.group.attrs["ids"])

    @property
    def texts(self) -> list[str]:
        return list(self.group.attrs["texts"])

    def __len__(self) -> int:
        return len(self.group.attrs["ids"])

    @property
    def views(self) -> int:
        return int(self.group["masks"].shape[1])

    def features(self, index: int, view: int | None = None) -> list[torch.Tensor]:
        """Per block: [views, steps, C, H, W] (or [steps, C, H, W] for one view), stored dtype."""
        out = []
        for b in self.blocks:
            arr = self.group[f"block_{b}"]
            a = arr[index] if view is None else arr[index, view]
            out.append(from_storage(a, self.dtype))
        return out

    def mask(self, index: int, view: int | None = None) -> torch.Tensor:
        m = self.group["masks"][index] if view is None else self.group["masks"][index, view]
        return torch.from_numpy(np.ascontiguousarray(m))

    def image(self, index: int) -> np.ndarray:
        return np.asarray(self.group["images"][index])

    @property
    def tiled(self) -> bool:
        return "tile_image" in self.group

    def tile_layout(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(source image ids, per-window image index, per-window (y, x) origin)."""
        return (list(self.group.attrs["image_ids"]), np.asarray(self.group["tile_image"][:]),
                np.asarray(self.group["tile_origin"][:]))

    def full_mask(self, image_index: int) -> np.ndarray:
        return np.asarray(self.group["full_masks"][image_index])

    def text(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._text:
            self._text.update(
                tokens=torch.from_numpy(np.asarray(self.group["text_tokens"][:])),
                mask=torch.from_numpy(np.asarray(self.group["text_mask"][:])),
                pooled=torch.from_numpy(np.asarray(self.group["text_pooled"][:])),
            )
        return self._text["tokens"][index], self._text["mask"][index], self._text["pooled"][index]


class FeatureCache:
    """Read-only view of a finished cache; refuses one with unfinished images."""

    def __init__(self, path: Path, fingerprint: dict | None = None):
        self.path = Path(path)
        problems = verify(self.path, fingerprint)
        if problems:
            more = f" (+{len(problems) - 1} more; run `textdiff cache verify`)" if len(problems) > 1 else ""
            raise TextDiffError(problems[0] + more)
        self.root = _open_group(self.path, "r")
        self.fingerprint = dict(self.root.attrs["fingerprint"])
        self.blocks = [int(b) for b in self.fingerprint["blocks"]]
        self.dtype = str(self.fingerprint["dtype"])

    def split(self, name: str) -> CachedSplit:
        if name not in self.root:
            raise TextDiffError(f"{self.path}: no '{name}' split in the cache")
        return CachedSplit(self.root[name], self.dtype, self.blocks)

    def block_channels(self) -> list[int]:
        group = next(iter(self.root.group_keys()))
        return [int(self.root[group][f"block_{b}"].shape[3]) for b in self.blocks]

    @property
    def num_steps(self) -> int:
        group = next(iter(self.root.group_keys()))
        return int(self.root[group][f"block_{self.blocks[0]}"].shape[2])

    @property
    def text_dim(self) -> int:
        return int(self.fingerprint["text_hidden_size"])
