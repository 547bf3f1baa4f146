"""The cache's contract: `CacheSpec` (everything the cached features depend on) and the zarr
layout of one split (`SplitLayout`, `array_shapes`). The layout is documented in store.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from textdiff.data.tiles import TileLayout
from textdiff.data.views import ViewLayout
from textdiff.errors import TextDiffError

FORMAT_VERSION = 1  # the zarr layout below
SPEC_VERSION = 2  # the CacheSpec fields; version 1 (an untyped dict) is read and upgraded
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
MODES = ("resize", "tiles")
SCORED_SPLITS = ("val", "test")  # the splits scored by view averaging (`eval_views`)


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached features depend on: two caches with equal specs are interchangeable.

    Written into the cache (root attrs `fingerprint`) and into every trained model's model.json,
    and read back by train, evaluate and `textdiff predict`: the one place that says which teacher,
    timesteps, blocks, text encoder, working size and protocol (`mode`) made the features.
    """

    teacher_kind: str  # "adm" (a diffusion UNet) or "rgb" (the raw-pixel control)
    steps: tuple[int, ...]  # noise levels ([0] for rgb)
    blocks: tuple[int, ...]  # tapped output blocks ([0] for rgb)
    image_size: int  # side of what the teacher sees: the image (resize) or the window (tiles)
    views: int  # dihedral views (1 or 8), views[0] the image itself
    dtype: str  # storage dtype of the features
    text_encoder: str
    text_hidden_size: int
    text_max_length: int
    data: dict[str, str]  # split -> sha256 of its ids, texts, images and masks
    teacher_sha256: str = ""  # adm only, like the four below
    teacher_config: dict | None = None
    noise_seed: int = 0
    schedule: str = "linear"
    diffusion_steps: int = 1000
    mode: str = "resize"
    tile: int = 0  # tiles mode only, like the two below
    stride: int = 0
    full_size: int = 0  # the source images' (square) side; 0 = unknown (no native scoring)
    protocol: str = "project"  # how data/prepared made images and masks (project | release)
    release_size: int = 0  # side of the release ground truth (0 = image_size)
    rotations: int = 0  # further views after the dihedral ones: seeded +-20 degree rotations
    stain: dict = field(default_factory=dict)  # data.stain's reference ({} = raw colours), see stain.py
    stain_views: int = 0  # further views after the rotated ones: seeded HED stain jitter
    stain_sigma: float = 0.0  # their jitter (0 when stain_views is 0)
    # The teacher's compute dtype under torch.autocast (adm only). Written into the fingerprint only
    # when not float32, so every cache made before the field existed keeps its bytes and equality.
    autocast: str = "float32"
    # Per-nucleus ground truth rides along (data.instances): a `distance` target per view and the
    # source images' label maps. Written into the fingerprint only when true, like autocast.
    instances: bool = False
    # The teacher run on windows of `window` px every `window_stride` px (adm only; 0 = whole
    # images). Written into the fingerprint only when set, like autocast.
    window: int = 0
    window_stride: int = 0
    # Dihedral views of every val and test item (test-time augmentation; at least `views`): the maps
    # scored there are averaged over the first `eval_views`. Written into the fingerprint only when
    # more than 1, like autocast.
    eval_views: int = 1
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.teacher_kind not in ("adm", "rgb"):
            raise ValueError(f"teacher_kind must be adm or rgb, got {self.teacher_kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.autocast not in STORAGE_DTYPES:
            raise ValueError(f"autocast must be one of {tuple(STORAGE_DTYPES)}, got {self.autocast!r}")
        if self.eval_views not in (1, 2, 4, 8):
            raise ValueError(f"eval_views must be 1, 2, 4 or 8 (the first dihedral views), got {self.eval_views!r}")
        object.__setattr__(self, "steps", tuple(int(t) for t in self.steps))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @property
    def tiled(self) -> bool:
        return self.mode == "tiles"

    @property
    def view_layout(self) -> ViewLayout:
        """Which cached view is which in the training split: the dihedral views, the rotated
        copies, then the stain copies."""
        return ViewLayout(self.views, self.rotations, self.stain_views)

    def split_view_layout(self, split: str) -> ViewLayout:
        """The view layout of one split: val and test hold `eval_views` dihedral views when that is
        more than `views` (the test-time views), every other split the training layout."""
        dihedral = max(self.views, self.eval_views) if split in SCORED_SPLITS else self.views
        return ViewLayout(dihedral, self.rotations, self.stain_views)

    @property
    def total_views(self) -> int:
        return self.view_layout.total

    @property
    def release_side(self) -> int:
        return self.release_size or self.image_size

    def block_shapes(self) -> dict[int, tuple[int, int, int]]:
        """(C, H, W) of every cached feature block, from the spec alone."""
        if self.teacher_kind == "rgb":
            return {0: (3, self.image_size, self.image_size)}
        from textdiff.teacher.features import block_shapes

        return block_shapes(self.teacher_config or {}, self.blocks, image_size=self.image_size)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["steps"], out["blocks"] = list(self.steps), list(self.blocks)
        if out["autocast"] == "float32":
            del out["autocast"]
        if not out["instances"]:
            del out["instances"]
        if not out["window"]:
            del out["window"], out["window_stride"]
        if out["eval_views"] <= 1:
            del out["eval_views"]
        return out

    @classmethod
    def from_json(cls, raw: Any, source: str = "cache spec") -> "CacheSpec":
        """Parse a stored spec; a version-1 dict (before this class) is upgraded, since the
        features it describes are the same."""
        if not isinstance(raw, dict):
            raise TextDiffError(f"{source}: the cache spec is not a mapping")
        values = dict(raw)
        version = values.pop("version", 1)
        if version not in (1, SPEC_VERSION):
            raise TextDiffError(f"{source}: cache spec version {version!r} is not known to this textdiff")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TextDiffError(f"{source}: unknown cache spec key '{unknown[0]}'")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise TextDiffError(f"{source}: invalid cache spec ({err})") from None

    def diff(self, other: "CacheSpec | None") -> list[str]:
        """`key: old -> new` for every field that differs (all of them against None)."""
        mine, theirs = self.to_json(), other.to_json() if other is not None else {}
        return [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]



@dataclass
class SplitLayout:
    """The items one split's group holds (images, or windows in tiles mode), in order."""

    ids: list[str]
    texts: list[str]
    tiles: TileLayout | None = None

    @property
    def n(self) -> int:
        return len(self.ids)


def array_shapes(spec: CacheSpec, layout: SplitLayout,
                 split: str = "train") -> dict[str, tuple[tuple[int, ...], tuple[int, ...], Any]]:
    """name -> (shape, chunks, numpy dtype) of every array of split `split`'s group."""
    n, v, s, size = layout.n, spec.split_view_layout(split).total, len(spec.steps), spec.image_size
    length, dim = spec.text_max_length, spec.text_hidden_size
    out = {}
    for b, (c, h, w) in spec.block_shapes().items():
        out[f"block_{b}"] = ((n, v, s, c, h, w), (1, v, s, c, h, w), STORAGE_DTYPES[spec.dtype])
    out["masks"] = ((n, v, size, size), (1, v, size, size), np.uint8)
    out["images"] = ((n, size, size, 3), (1, size, size, 3), np.uint8)
    out["text_tokens"] = ((n, length, dim), (max(n, 1), length, dim), np.float32)
    out["text_mask"] = ((n, length), (max(n, 1), length), np.uint8)
    out["text_pooled"] = ((n, dim), (max(n, 1), dim), np.float32)
    out["complete"] = ((n,), (1,), np.uint8)
    if spec.rotations:
        out["rotation_angles"] = ((n, spec.rotations), (max(n, 1), spec.rotations), np.int16)
    if spec.stain_views:  # per image and copy: the (scale, bias) of H, E, DAB
        out["stain_shifts"] = ((n, spec.stain_views, 2, 3), (max(n, 1), spec.stain_views, 2, 3), np.float32)
    m, r = (len(layout.tiles.image_ids) if layout.tiles is not None else n), spec.release_side
    out["release_masks"] = ((m, r, r), (1, r, r), np.uint8)  # per source image
    if layout.tiles is not None:
        out["tile_image"] = ((n,), (max(n, 1),), np.int32)
        out["tile_origin"] = ((n, 2), (max(n, 1), 2), np.int32)
    if spec.full_size:  # the source masks, for scoring at native resolution (tiles, and resize when known)
        full = spec.full_size
        out["full_masks"] = ((m, full, full), (1, full, full), np.uint8)
    if spec.instances:  # the instance target per view, the source label maps and which are approximate
        out["distance"] = ((n, v, size, size), (1, v, size, size), np.float16)
        out["full_instances"] = ((m, spec.full_size, spec.full_size), (1, spec.full_size, spec.full_size), np.uint16)
        out["approximate"] = ((m,), (max(m, 1),), np.uint8)
    return out
