"""cache/features.zarr: the teacher's features and the reports' embeddings, computed once.

Layout (zarr v3), one group per split holding N images:
    block_<b>      [N, views, steps, C, H, W]  native resolution, `extract.dtype`, one image per chunk
    masks          [N, views, H, W] uint8      the mask seen in each view
    rotation_angles [N, rotations] int16       degrees of the rotated views (after the dihedral ones)
    stain_shifts   [N, K, 2, 3] float32        the HED (scale, bias) of the K stain views (after those)
    images         [N, H, W, 3] uint8          the identity view, for the panels and the RGB control
    release_masks  [M, s, s] uint8             the released code's dilated ground truth per source
                                               image (M = N in resize mode), for the second scoring
    text_tokens    [N, L, D] float32           last_hidden_state, padded/truncated to L
    text_mask      [N, L] uint8
    text_pooled    [N, D] float32
    complete       [N] uint8                   1 once every array above holds image i
    attrs          ids, texts, text_complete
  tiles mode (items are windows of full-size images) adds:
    tile_image     [N] int32                   which source image a window comes from
    tile_origin    [N, 2] int32                the window's (y, x) in it
    full_masks     [M, S, S] uint8             the source images' full-size masks, for native scoring
    attrs          image_ids, image_texts
  with per-nucleus ground truth (data.instances; resize mode keeps full_masks too):
    distance       [N, views, H, W] float16    the instance target (`instances.nucleus_distance`) per view
    full_instances [M, S, S] uint16            the source images' label maps, for instance scoring
    approximate    [M] uint8                   1 where that map is an approximation (never scored)
and root attrs: `fingerprint` (the `CacheSpec`: everything the features depend on), `format` (this
layout's version) and `provenance` (library versions).

Why this shape: training reads one image (all its views, steps and blocks) at a time, so one chunk
per image makes a read one decompression, and makes "image i is done" one flag written last. A
killed run leaves at most one image without its flag; the next run redoes exactly the unflagged
ones. A cache whose spec differs from the params is never extended: it is rebuilt from
scratch (or refused), so features of two teachers can never be mixed.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr

from textdiff.cache.spec import FORMAT_VERSION, SCORED_SPLITS, CacheSpec, SplitLayout, TileLayout, array_shapes
from textdiff.data.views import ViewLayout
from textdiff.errors import TextDiffError

_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "/"}}
PER_IMAGE_ARRAYS = ("masks", "images", "distance")  # beside the feature blocks: written with each image


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the stored numpy array (bfloat16 kept as its raw 16 bits)."""
    if dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return x.detach().to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def keeping_empty_chunks() -> contextlib.AbstractContextManager:
    """While it lasts, arrays opened are set to store every chunk, one equal to the fill value too.
    zarr skips those by default, and then an image with no nuclei (an all-zero mask chunk) is
    indistinguishable from a lost chunk; with every chunk on disk, `verify` can treat a missing
    chunk file as damage. Extraction writes the cache inside it."""
    return zarr.config.set({"array.write_empty_chunks": True})


def _open_group(path: Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as err:  # noqa: BLE001 - zarr raises several types for a broken store
        raise TextDiffError(f"{path}: not a readable zarr v3 feature cache ({type(err).__name__})") from None


def _stored_spec(attrs: dict, path: Path) -> CacheSpec | None:
    """The spec a cache was built with (None when it has none: a foreign or unfinished store)."""
    if "fingerprint" not in attrs:
        return None
    return CacheSpec.from_json(attrs["fingerprint"], source=str(path))


def open_for_writing(path: Path, spec: CacheSpec, layouts: dict[str, SplitLayout], provenance: dict,
                     rebuild: bool = True) -> zarr.Group:
    """Resume a cache built with the same spec, or start a fresh one.

    A cache built with other params is deleted and rebuilt when `rebuild`, else refused; either way
    the message says which params differ.
    """
    path = Path(path)
    if path.exists():
        reason = _resume_problem(path, spec, layouts)
        if reason is None:
            return _open_group(path, "r+")
        if not rebuild:
            raise TextDiffError(f"{path}: {reason}; delete it or run extract with rebuild allowed")
        print(f"{path}: {reason}; rebuilding it from scratch")
        shutil.rmtree(path)
    return _create(path, spec, layouts, provenance)


def _resume_problem(path: Path, spec: CacheSpec, layouts: dict[str, SplitLayout]) -> str | None:
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(root.attrs)
        stored = _stored_spec(attrs, path)
    except Exception:  # noqa: BLE001 - zarr or a broken spec: either way not resumable
        return "exists but is not a readable feature cache"
    if attrs.get("format") != FORMAT_VERSION:
        return f"has cache format {attrs.get('format')!r}, expected {FORMAT_VERSION}"
    diff = spec.diff(stored)
    if diff:
        return "was built with other params (" + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "") + ")"
    for split, layout in layouts.items():
        if split not in root:
            return f"has no '{split}' group"
        if list(root[split].attrs.get("ids", [])) != layout.ids:
            return f"'{split}' holds other images than data/prepared"
        for name, (shape, _, _) in array_shapes(spec, layout, split).items():
            if name not in root[split] or tuple(root[split][name].shape) != shape:
                return f"'{split}/{name}' is missing or has another shape"
    return None


def _create(path: Path, spec: CacheSpec, layouts: dict[str, SplitLayout], provenance: dict) -> zarr.Group:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for split, layout in layouts.items():
        group = root.create_group(split)
        for name, (shape, chunks, dtype) in array_shapes(spec, layout, split).items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               chunk_key_encoding=_CHUNK_KEYS)
        group.attrs.update({"ids": layout.ids, "texts": layout.texts, "text_complete": False})
        if layout.tiles is not None:
            group.attrs.update({"image_ids": layout.tiles.image_ids, "image_texts": layout.tiles.image_texts})
    # Written last: a cache without its spec is treated as foreign and rebuilt.
    root.attrs.update({"format": FORMAT_VERSION, "fingerprint": spec.to_json(), "provenance": provenance})
    return root


def verify(path: Path, spec: CacheSpec | None = None, layouts: dict[str, SplitLayout] | None = None) -> list[str]:
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
    try:
        stored = _stored_spec(attrs, path)
    except TextDiffError as err:
        return problems + [str(err)]
    if stored is None:
        problems.append(f"{path}: has no cache spec (an unfinished or foreign store)")
    if spec is not None:
        problems.extend(f"{path}: built with other params: {line}" for line in spec.diff(stored))
    reference = spec if spec is not None else stored  # the arrays a cache with this spec must hold
    splits = layouts.keys() if layouts is not None else [k for k in root.group_keys()]
    for split in splits:
        if split not in root:
            problems.append(f"{path}/{split}: split group missing")
            continue
        layout = layouts[split] if layouts is not None else None
        problems.extend(_split_problems(path, root[split], split, reference, layout))
    return problems


def _layout_from_attrs(group: zarr.Group) -> SplitLayout:
    """The layout a split's own attrs record: enough for the shapes its arrays must have (where
    each tile window sits is in the arrays themselves, not needed here)."""
    ids, texts = list(group.attrs.get("ids", [])), list(group.attrs.get("texts", []))
    if "image_ids" not in group.attrs:
        return SplitLayout(ids, texts)
    image_ids = list(group.attrs["image_ids"])
    tiles = TileLayout(image_ids, list(group.attrs.get("image_texts", [])), [0] * len(ids), [(0, 0)] * len(ids), 0)
    return SplitLayout(ids, texts, tiles)


def _split_problems(path: Path, group: zarr.Group, split: str, spec: CacheSpec | None,
                    layout: SplitLayout | None) -> list[str]:
    problems = []
    ids = list(group.attrs.get("ids", []))
    expected = array_shapes(spec, layout or _layout_from_attrs(group), split) if spec is not None else None
    if layout is not None and ids != layout.ids:
        problems.append(f"{path}/{split}: holds other image ids than data/prepared")
    for name in list(expected) if expected is not None else list(group.array_keys()):
        if name not in group:
            problems.append(f"{path}/{split}/{name}: array missing")
        elif expected is not None and tuple(group[name].shape) != expected[name][0]:
            problems.append(f"{path}/{split}/{name}: shape {tuple(group[name].shape)}, expected {expected[name][0]}")
    text_complete = bool(group.attrs.get("text_complete", False))
    if not text_complete:
        problems.append(f"{path}/{split}: text embeddings were never completed")
    if "complete" not in group:
        return problems
    flags = group["complete"][:]
    missing = [ids[i] if i < len(ids) else str(i) for i in np.flatnonzero(flags == 0)]
    if missing:
        problems.append(f"{path}/{split}: {len(missing)} of {len(ids)} images incomplete (first: {missing[0]})")
    # Every chunk is written, even an all-zero one (`keeping_empty_chunks`), so a missing chunk file is damage:
    # zarr would read it as zeros without a word (a lost text or ground-truth chunk scores silently).
    done = [int(i) for i in np.flatnonzero(flags == 1)]
    for name in sorted(group.array_keys()):
        if name == "complete":  # a 0 flag is the fill value: no chunk, by design
            continue
        array = group[name]
        per_image = name.startswith("block_") or name in PER_IMAGE_ARRAYS
        if not per_image and not text_complete:
            continue  # written with the text; already reported above
        for coords in _chunk_grid(array, done if per_image else None):
            if not (path / split / name / array.metadata.encode_chunk_key(coords)).is_file():
                which = f"image {ids[coords[0]]}" if per_image and coords[0] < len(ids) else f"chunk {coords}"
                problems.append(f"{path}/{split}/{name}: {which} is missing on disk")
                break  # one line per array
    return problems


def _chunk_grid(array: zarr.Array, first_axis: list[int] | None) -> Iterator[tuple[int, ...]]:
    """The chunk coordinates of `array` (only those of items `first_axis` along axis 0 if given)."""
    counts = [-(-size // chunk) for size, chunk in zip(array.shape, array.chunks)]
    if any(c == 0 for c in counts):
        return
    lead = first_axis if first_axis is not None else range(counts[0])
    yield from ((i, *rest) for i in lead for rest in itertools.product(*(range(c) for c in counts[1:])))


@dataclass
class CachedSplit:
    """Read access to one split, one image at a time, in the layout training wants."""

    group: zarr.Group
    spec: CacheSpec
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
    def view_layout(self) -> ViewLayout:
        """Which of this split's cached views is which (val and test may hold test-time views)."""
        return self.spec.split_view_layout(self.group.basename)

    @property
    def views(self) -> int:
        """The dihedral views cached per item of this split."""
        return self.view_layout.dihedral

    @property
    def scored_views(self) -> int:
        """How many dihedral views the maps scored on this split average (1 = the image itself)."""
        return min(self.spec.eval_views, self.views) if self.group.basename in SCORED_SPLITS else 1

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def _read(self, name: str, key: Any) -> np.ndarray:
        """`group[name][key]`, with a damaged chunk (truncated, garbled: the codec fails) reported in
        one line naming the array and item instead of a codec traceback half-way through training."""
        try:
            return np.asarray(self.group[name][key])
        except (IndexError, KeyError, TypeError):
            raise  # a wrong index or name is a bug here, not damage on disk
        except Exception as err:  # noqa: BLE001 - zarr and its codecs raise many types for a bad chunk
            where = f"{getattr(self.group.store_path.store, 'root', '')}/{self.group.path}/{name}"
            item = key[0] if isinstance(key, tuple) else key
            item = "of the split" if isinstance(item, slice) else item
            reason = (str(err).splitlines() or [""])[0][:120]
            raise TextDiffError(f"{where}: cannot read item {item} ({type(err).__name__}: {reason}); the cache is "
                                "damaged: delete it and run `textdiff extract`") from None

    def features(self, index: int, view: int | slice | None = None) -> list[torch.Tensor]:
        """Per block: [views, steps, C, H, W] (or [steps, C, H, W] for one view index; a slice of
        views keeps the axis), stored dtype."""
        key = index if view is None else (index, view)
        return [from_storage(self._read(f"block_{b}", key), self.spec.dtype) for b in self.spec.blocks]

    def feature_bytes(self) -> int:
        """Bytes of one image's features (all views, steps and blocks) as stored."""
        return sum(int(np.prod(self.group[f"block_{b}"].shape[1:])) * 2 for b in self.spec.blocks)

    def mask(self, index: int, view: int | slice | None = None) -> torch.Tensor:
        m = self._read("masks", index if view is None else (index, view))
        return torch.from_numpy(np.ascontiguousarray(m))

    def image(self, index: int) -> np.ndarray:
        return self._read("images", index)

    def tile_layout(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Tiles mode: (source image ids, per-window image index, per-window (y, x) origin)."""
        return (list(self.group.attrs["image_ids"]), np.asarray(self.group["tile_image"][:]),
                np.asarray(self.group["tile_origin"][:]))

    def full_mask(self, image_index: int) -> np.ndarray:
        return self._read("full_masks", image_index)

    @property
    def has_instances(self) -> bool:
        return self.spec.instances

    def distance(self, index: int, view: int | slice | None = None) -> torch.Tensor:
        """The instance target of item `index` ([views, H, W], or [H, W] for one view), float16."""
        return torch.from_numpy(np.ascontiguousarray(self._read("distance", index if view is None else (index, view))))

    def full_instances(self, image_index: int) -> np.ndarray:
        """The per-nucleus labels of source image `image_index` at its own size (uint16)."""
        return self._read("full_instances", image_index)

    def approximate(self) -> np.ndarray:
        """[M] bool: which source images' label maps are approximations (never scored as truth)."""
        return self._read("approximate", slice(None)).astype(bool)

    def release_mask(self, image_index: int) -> np.ndarray:
        """The released code's (dilated) ground truth of source image `image_index`."""
        return self._read("release_masks", image_index)

    def text(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._text:
            self._text.update(
                tokens=torch.from_numpy(self._read("text_tokens", slice(None))),
                mask=torch.from_numpy(self._read("text_mask", slice(None))),
                pooled=torch.from_numpy(self._read("text_pooled", slice(None))),
            )
        return self._text["tokens"][index], self._text["mask"][index], self._text["pooled"][index]


class FeatureCache:
    """Read-only view of a finished cache; refuses one with unfinished images."""

    def __init__(self, path: Path, spec: CacheSpec | None = None):
        self.path = Path(path)
        problems = verify(self.path, spec)
        if problems:
            more = f" (+{len(problems) - 1} more; run `textdiff cache verify`)" if len(problems) > 1 else ""
            raise TextDiffError(problems[0] + more)
        self.root = _open_group(self.path, "r")
        self.spec = CacheSpec.from_json(self.root.attrs["fingerprint"], source=str(self.path))
        self.provenance = dict(self.root.attrs.get("provenance", {}))

    def split(self, name: str) -> CachedSplit:
        if name not in self.root:
            raise TextDiffError(f"{self.path}: no '{name}' split in the cache")
        return CachedSplit(self.root[name], self.spec)

    def block_channels(self) -> list[int]:
        return [c for c, _, _ in self.spec.block_shapes().values()]
