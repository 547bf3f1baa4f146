"""Whole-slide images: tissue detection, tiles at the model's resolution, resumable, QuPath-ready.

A slide (.svs, .ndpi, .mrxs, pyramidal tiled .tif ...) is read through OpenSlide (`openslide-python`
with the `openslide-bin` wheel: the reference reader of every vendor format, pip-installable with no
system packages; tiffslide reads fewer formats). The plan, all at the model's working resolution
(`magnification`: the slide's mpp over the model's):

1. Tissue: a thumbnail (at most `THUMBNAIL` px), a pixel is tissue when its optical density reaches
   0.15 in some channel (glass is near 0), closed and opened by a few pixels; a tile whose core
   holds no tissue is skipped (and recorded as done, with probability 0).
2. Tiles: cores of `core` working px on a grid, each read with a `margin` of context on every side
   from the pyramid level just finer than needed (level-aware, never the whole slide), resized to
   the working resolution, segmented by `Segmenter` (its windows and Gaussian blend), and the core's
   probabilities written into one chunk of a zarr array (chunks = cores, so a tile is one write).
3. Nuclei: the region's mask is labelled, and a nucleus belongs to the tile whose core holds its
   centroid (so one cut by a core border is counted once, drawn whole from the margin). Its polygon,
   area (level-0 px and µm²) and centroid are saved per tile; a `done` flag is written last, so a
   killed run resumes at the first tile without it.
4. Outputs, streamed: `<id>.geojson` (a FeatureCollection of polygons in level-0 pixels,
   `objectType: detection`, which QuPath imports), `<id>_nuclei.csv`, `<id>_overlay.png` (the
   thumbnail with the predicted foreground), and `<id>.zarr` with the probability map as a pyramid
   (`probability/0` at working resolution, each next level 2x smaller, built chunk by chunk).

Memory is bounded by one tile (core + margins, RGB and probabilities) plus the thumbnail, whatever
the slide's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from textdiff.atomic import atomic_file
from textdiff.data.resize import to_working_size
from textdiff.data.stain import tissue_pixels
from textdiff.errors import TextDiffError
from textdiff.model.nuclei import NucleusRule, separate
from textdiff.predict.collective import gathered
from textdiff.runtime.distributed import Ranks

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
THUMBNAIL = 2048  # longest side of the tissue-detection thumbnail
CORE, MARGIN = 1024, 64  # working pixels
FORMAT = 2  # 2: one chunk per tile's done flag, so processes flag their own tiles


def is_slide(path: Path) -> bool:
    """A file OpenSlide recognises as a (pyramidal, tiled) slide; plain TIFF/PNG images are not."""
    if Path(path).suffix.lower() not in SLIDE_SUFFIXES:
        return False
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) is not None
    except Exception:  # noqa: BLE001 - no OpenSlide, or an unreadable file: the image reader will say why
        return False


def open_slide(path: Path):
    try:
        import openslide
    except ImportError:
        raise TextDiffError(f"{path}: reading slides needs OpenSlide (pip install openslide-python "
                            "openslide-bin)") from None
    try:
        return openslide.OpenSlide(str(path))
    except Exception as err:  # noqa: BLE001 - OpenSlideError / UnsupportedFormat / OSError
        raise TextDiffError(f"{path}: not a readable slide ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'unsupported or corrupt'})") from None


def slide_mpp(slide) -> float | None:
    """µm per level-0 pixel from the slide's properties (OpenSlide's normalised `openslide.mpp-x`)."""
    from textdiff.data.magnification import plausible

    try:
        mpp = float(slide.properties.get("openslide.mpp-x", "nan"))
    except ValueError:
        return None
    return mpp if math.isfinite(mpp) and plausible(mpp) else None


@dataclass(frozen=True)
class SlidePlan:
    """Where every tile is, at working resolution and in level-0 pixels."""

    width0: int
    height0: int
    factor: float  # working px per level-0 px
    core: int
    margin: int

    @property
    def width(self) -> int:
        return max(1, math.ceil(self.width0 * self.factor))

    @property
    def height(self) -> int:
        return max(1, math.ceil(self.height0 * self.factor))

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.core), math.ceil(self.width / self.core)

    def core_box(self, ty: int, tx: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a tile's core at working resolution."""
        y0, x0 = ty * self.core, tx * self.core
        return y0, x0, min(y0 + self.core, self.height), min(x0 + self.core, self.width)

    def region_box(self, ty: int, tx: int) -> tuple[int, int, int, int]:
        y0, x0, y1, x1 = self.core_box(ty, tx)
        return (max(0, y0 - self.margin), max(0, x0 - self.margin),
                min(self.height, y1 + self.margin), min(self.width, x1 + self.margin))


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: some channel's optical density >= 0.15, cleaned up."""
    from scipy import ndimage

    tissue = tissue_pixels(thumbnail)
    tissue = ndimage.binary_closing(tissue, iterations=2)
    return ndimage.binary_opening(tissue, iterations=1)


def _reading(path: Path, what: str, read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()`, with a slide that opens but fails on a damaged tile reported in one line. The tiles
    done so far stay flagged in the store: a re-run with the same file resumes, one with a repaired
    file restarts (its size and mtime are part of the store's identity)."""
    try:
        return read()
    except TextDiffError:
        raise
    except Exception as err:  # noqa: BLE001 - OpenSlideError, OSError, decoder errors of a damaged tile
        reason = (str(err).splitlines() or [""])[0][:160]
        raise TextDiffError(f"{path}: cannot read {what} ({type(err).__name__}: {reason})") from None


def read_region(slide, plan: SlidePlan, box: tuple[int, int, int, int]) -> np.ndarray:
    """The RGB pixels of a working-resolution box, read from the pyramid level just finer than
    needed (transparent pixels, outside the scanned area, are white glass)."""
    y0, x0, y1, x1 = box
    want = 1.0 / plan.factor  # level-0 px per working px
    level = slide.get_best_level_for_downsample(want)
    down = slide.level_downsamples[level]
    lx, ly = int(math.floor(x0 / plan.factor)), int(math.floor(y0 / plan.factor))
    w = max(1, math.ceil((x1 - x0) / plan.factor / down))
    h = max(1, math.ceil((y1 - y0) / plan.factor / down))
    rgba = np.asarray(slide.read_region((lx, ly), level, (w, h)))
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return to_working_size(rgb, (y1 - y0, x1 - x0))


def nuclei_of(prob: np.ndarray, region: tuple[int, int, int, int], core: tuple[int, int, int, int],
              factor: float, working_mpp: float, size0: tuple[int, int] = (2**31, 2**31),
              distance: np.ndarray | None = None, rule: NucleusRule | None = None) -> list[dict]:
    """Separated nuclei (`model.nuclei.separate` on the whole region, margin included, so a nucleus
    on the core's border is separated with all of it) whose centroid lies in the core: each is
    counted by exactly one tile. Polygon (traced between pixel centres and edges, kept inside the
    slide's `size0` = (width, height)) and centroid in level-0 pixels, areas."""
    from skimage.measure import find_contours, regionprops

    ry0, rx0 = region[0], region[1]
    cy0, cx0, cy1, cx1 = core
    out = []
    labels = separate(prob, distance, rule or NucleusRule(), working_mpp)
    for r in regionprops(labels):
        cy, cx = r.centroid
        gy, gx = cy + ry0, cx + rx0
        if not (cy0 <= gy < cy1 and cx0 <= gx < cx1):
            continue
        minr, minc, maxr, maxc = r.bbox
        patch = np.pad(r.image.astype(np.float32), 1)
        contours = find_contours(patch, 0.5)
        ring = max(contours, key=len)
        ys = np.clip((ring[:, 0] - 1 + minr + ry0) / factor, 0, size0[1])
        xs = np.clip((ring[:, 1] - 1 + minc + rx0) / factor, 0, size0[0])
        polygon = [[round(float(x), 1), round(float(y), 1)] for y, x in zip(ys, xs)]
        if polygon[0] != polygon[-1]:
            polygon.append(polygon[0])
        out.append({"centroid_y": round(gy / factor, 1), "centroid_x": round(gx / factor, 1),
                    "area_px": round(float(r.area) / factor**2, 1),
                    "area_um2": round(float(r.area) * working_mpp**2, 2),
                    "eccentricity": round(float(r.eccentricity), 4), "polygon": polygon})
    return out


def _open_store(path: Path, plan: SlidePlan, identity: dict) -> zarr.Group:
    """Resume a store made for the same slide, model and plan, or start a fresh one."""
    if path.exists():
        try:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
            if root.attrs.get("identity") == identity and root.attrs.get("format") == FORMAT:
                return root
        except Exception:  # noqa: BLE001 - not resumable: start again
            pass
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    ny, nx = plan.grid
    root.create_array("probability/0", shape=(plan.height, plan.width), chunks=(plan.core, plan.core), dtype=np.uint8,
                      fill_value=0)
    root.create_array("done", shape=(ny, nx), chunks=(1, 1), dtype=np.uint8, fill_value=0)
    (path / "nuclei").mkdir(parents=True, exist_ok=True)
    root.attrs.update({"identity": identity, "format": FORMAT})
    return root


def _tile_file(store: Path, ty: int, tx: int) -> Path:
    return store / "nuclei" / f"{ty}_{tx}.json"


def build_pyramid(root: zarr.Group, core: int) -> int:
    """probability/1, /2, ... each half the previous (2x2 means), chunk by chunk; returns the levels."""
    level = 0
    while True:
        src = root[f"probability/{level}"]
        h, w = src.shape
        if max(h, w) <= core:
            return level + 1
        dst = root.create_array(f"probability/{level + 1}", shape=(math.ceil(h / 2), math.ceil(w / 2)),
                                chunks=(core, core), dtype=np.uint8, fill_value=0, overwrite=True)
        for y in range(0, dst.shape[0], core):
            for x in range(0, dst.shape[1], core):
                block = np.asarray(src[2 * y : 2 * (y + core), 2 * x : 2 * (x + core)], np.float32)
                block = np.pad(block, ((0, block.shape[0] % 2), (0, block.shape[1] % 2)), mode="edge")
                small = block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2).mean(axis=(1, 3))
                dst[y : y + small.shape[0], x : x + small.shape[1]] = np.rint(small).astype(np.uint8)
        level += 1


def _features(store: Path, grid: tuple[int, int]) -> Iterator[dict]:
    for ty in range(grid[0]):
        for tx in range(grid[1]):
            path = _tile_file(store, ty, tx)
            if path.is_file():
                yield from json.loads(path.read_text())


@dataclass
class SlideResult:
    nuclei: int
    tiles: int
    tissue_tiles: int
    megapixels: float  # at working resolution, of the tiles segmented in this run (rank 0: by every process)
    seconds: float
    outputs: list[Path]
    mpp_assumed: bool = False  # neither --mpp nor the slide said: the training images' µm/px was used
    skipped: bool = False  # a finished run's outputs for this very slide, model and plan: nothing redone


def segment_slide(path: Path, segment: Callable[[np.ndarray], np.ndarray | tuple], out: Path, working_mpp: float,
                  mpp: float | None, source_mpp: float, identity: dict, core: int | None = None,
                  margin: int | None = None, progress: bool = True,
                  on_tile: Callable[[int], None] | None = None, rule: NucleusRule | None = None,
                  overwrite: bool = False, ranks: Ranks = Ranks()) -> SlideResult:
    """Segment one slide into `out` (see the module docstring). `segment(rgb at working resolution)
    -> probabilities, or (probabilities, distance or None)` is the model; `rule` separates its
    nuclei; `mpp` overrides the slide's own (else the training source's). A slide whose outputs a
    finished run wrote for the same identity is skipped (`complete` is set last, after the GeoJSON,
    CSV and picture); `overwrite` starts its store afresh.

    Under torchrun every process calls this for the same slide and takes every `world`-th tile still
    to do (each tile is its own chunk of the probability map, its own done flag and nucleus file, so
    nobody writes another's); rank 0 creates the store first and writes the pyramid and the outputs
    after all are done. A tile that fails on any process fails the slide on every process, in step."""
    import time

    from tqdm import tqdm

    core, margin = core or CORE, MARGIN if margin is None else margin
    slide = open_slide(path)
    try:
        own_mpp = slide_mpp(slide)
        mpp0 = mpp or own_mpp or source_mpp
        if working_mpp <= 0:
            raise TextDiffError(f"{path}: the model records no working resolution (trained before data.mpp existed); "
                                "retrain it to segment slides")
        width0, height0 = slide.dimensions
        plan = SlidePlan(width0, height0, mpp0 / working_mpp, core, margin)
        stem = Path(path).stem
        store = out / f"{stem}.zarr"
        ident = {**identity, "slide": str(Path(path).resolve()), "size": [width0, height0], "mpp": mpp0,
                 "nuclei": (rule or NucleusRule()).to_json(),
                 "working_mpp": working_mpp, "core": core, "margin": margin,
                 "mtime": os.path.getmtime(path), "bytes": os.path.getsize(path)}
        if ranks.main:
            if overwrite and store.exists():
                shutil.rmtree(store)
            root = _open_store(store, plan, ident)
        ranks.barrier()
        if not ranks.main:
            root = zarr.open_group(str(store), mode="r+", zarr_format=3)
        finished = [*output_files(out, stem), store]
        if root.attrs.get("complete") and all(p.exists() for p in finished):
            count = sum(1 for _ in _features(store, plan.grid))
            return SlideResult(count, plan.grid[0] * plan.grid[1], int(root.attrs.get("tissue_tiles", 0)), 0.0, 0.0,
                               finished, mpp_assumed=not (mpp or own_mpp), skipped=True)
        thumb = _reading(path, "its thumbnail",
                         lambda: np.asarray(slide.get_thumbnail((THUMBNAIL, THUMBNAIL)).convert("RGB")))
        tissue = tissue_mask(thumb)
        ty_scale, tx_scale = tissue.shape[0] / plan.height, tissue.shape[1] / plan.width
        ny, nx = plan.grid
        done = np.asarray(root["done"][:])
        todo, tissue_tiles = [], 0
        for ty in range(ny):
            for tx in range(nx):
                y0, x0, y1, x1 = plan.core_box(ty, tx)
                window = tissue[int(y0 * ty_scale) : max(int(y0 * ty_scale) + 1, math.ceil(y1 * ty_scale)),
                                int(x0 * tx_scale) : max(int(x0 * tx_scale) + 1, math.ceil(x1 * tx_scale))]
                has = bool(window.any())
                tissue_tiles += has
                if not done[ty, tx]:
                    todo.append((ty, tx, has))
        started, pixels = time.perf_counter(), 0.0
        mine = ranks.share(todo)
        bar = tqdm(total=len(mine), desc=f"{stem}", unit="tile", disable=not progress or not ranks.main,
                   dynamic_ncols=True)
        problem = None
        try:
            with bar:
                pixels = _segment_tiles(mine, bar, slide, path, plan, root, store, segment, working_mpp,
                                        (width0, height0), rule, on_tile)
        except TextDiffError as err:
            if ranks.world == 1:
                raise
            problem = str(err)
        if ranks.world > 1:  # every process learns of any tile's failure here, and all are done
            shares = gathered((problem, pixels), ranks)
            problems = [p for p, _ in shares if p]
            if problems:
                raise TextDiffError(problems[0])
            pixels = sum(px for _, px in shares) if ranks.main else 0.0  # rank 0 speaks for the whole slide
        seconds = time.perf_counter() - started
        if not ranks.main:
            return SlideResult(0, ny * nx, tissue_tiles, pixels, seconds, [], mpp_assumed=not (mpp or own_mpp))
        build_pyramid(root, core)
        outputs = write_outputs(store, stem, out, plan, thumb, working_mpp)
        root.attrs.update({"complete": True, "tissue_tiles": tissue_tiles})  # last: the outputs are whole
        count = sum(1 for _ in _features(store, plan.grid))
        return SlideResult(count, ny * nx, tissue_tiles, pixels, seconds, outputs, mpp_assumed=not (mpp or own_mpp))
    finally:
        slide.close()


PREFETCH_TILES = 1  # regions read ahead of the one being segmented (>= 1): memory stays 1 + this regions


def _segment_tiles(tiles: list[tuple[int, int, bool]], bar, slide, path: Path, plan: SlidePlan, root: zarr.Group,
                   store: Path, segment: Callable, working_mpp: float, size0: tuple[int, int],
                   rule: NucleusRule | None, on_tile: Callable[[int], None] | None) -> float:
    """Segment `tiles` ((ty, tx, has tissue) each) into the store; megapixels done. One reader
    thread reads the next tissue tile's region while this one is segmented (a slide's decode is
    I/O and a library's C code, off the GIL), so the model waits for no read but the first."""
    pixels = 0.0
    order = iter([k for k, (_, _, has) in enumerate(tiles) if has])

    def read(k: int) -> np.ndarray:
        ty, tx, _ = tiles[k]
        return _reading(path, f"the region of tile ({ty}, {tx})",
                        lambda: read_region(slide, plan, plan.region_box(ty, tx)))

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader")
    ahead: dict[int, Future] = {}

    def read_next() -> None:
        k = next(order, None)
        if k is not None:
            ahead[k] = reader.submit(read, k)

    try:
        for _ in range(PREFETCH_TILES):
            read_next()
        for k, (ty, tx, has) in enumerate(tiles):
            if has:
                region = plan.region_box(ty, tx)
                core_box = plan.core_box(ty, tx)
                pixels_in = ahead.pop(k).result()
                read_next()
                maps = segment(pixels_in)
                prob, distance = maps if isinstance(maps, tuple) else (maps, None)
                cy0, cx0, cy1, cx1 = core_box
                core_prob = prob[cy0 - region[0] : cy1 - region[0], cx0 - region[1] : cx1 - region[1]]
                root["probability/0"][cy0:cy1, cx0:cx1] = np.rint(np.clip(core_prob, 0, 1) * 255).astype(np.uint8)
                rows = nuclei_of(prob, region, core_box, plan.factor, working_mpp, size0, distance, rule)
                with atomic_file(_tile_file(store, ty, tx)) as tmp:
                    tmp.write_text(json.dumps(rows))
                pixels += (region[2] - region[0]) * (region[3] - region[1]) / 1e6
            root["done"][ty, tx] = 1  # last: the tile now counts
            bar.update(1)
            if on_tile is not None:
                on_tile(k)
    finally:  # after a failure, a read not yet started is dropped, not waited for
        reader.shutdown(wait=True, cancel_futures=True)
    return pixels


def output_files(out: Path, stem: str) -> tuple[Path, Path, Path]:
    """A slide's GeoJSON, nucleus table and overlay picture in `out`."""
    return out / f"{stem}.geojson", out / f"{stem}_nuclei.csv", out / f"{stem}_overlay.png"


def write_outputs(store: Path, stem: str, out: Path, plan: SlidePlan, thumb: np.ndarray,
                  working_mpp: float) -> list[Path]:
    """GeoJSON, CSV (streamed tile by tile) and the overlay PNG."""
    import csv

    geojson, table, picture = output_files(out, stem)
    with atomic_file(geojson) as gtmp, atomic_file(table) as ctmp:
        with open(gtmp, "w") as g, open(ctmp, "w", newline="") as c:
            writer = csv.DictWriter(c, fieldnames=["image", "label", "area", "area_um2", "centroid_y", "centroid_x",
                                                   "eccentricity"])
            writer.writeheader()
            g.write('{"type": "FeatureCollection", "features": [\n')
            for k, row in enumerate(_features(store, plan.grid), start=1):
                feature = {"type": "Feature", "id": str(k),
                           "geometry": {"type": "Polygon", "coordinates": [row["polygon"]]},
                           "properties": {"objectType": "detection", "classification": {"name": "Nucleus"},
                                          "measurements": {"area_um2": row["area_um2"]}}}
                g.write(("" if k == 1 else ",\n") + json.dumps(feature))
                writer.writerow({"image": stem, "label": k, "area": row["area_px"], "area_um2": row["area_um2"],
                                 "centroid_y": row["centroid_y"], "centroid_x": row["centroid_x"],
                                 "eccentricity": row["eccentricity"]})
            g.write("\n]}\n")
    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    levels = sorted(int(k) for k in root["probability"].array_keys())
    best = min(levels, key=lambda lv: abs(root[f"probability/{lv}"].shape[1] - thumb.shape[1]))
    prob = np.asarray(root[f"probability/{best}"][:], np.float32) / 255.0
    prob = np.asarray(Image.fromarray(prob).resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.BILINEAR))
    overlay = thumb.astype(np.float32).copy()
    fg = prob > 0.5
    overlay[fg] = 0.45 * overlay[fg] + 0.55 * np.array([0, 200, 0], np.float32)
    with atomic_file(picture) as tmp:
        Image.fromarray(overlay.round().astype(np.uint8)).save(tmp, format="PNG")
    return [geojson, table, picture, store]


__all__ = ["SlidePlan", "SlideResult", "build_pyramid", "is_slide", "nuclei_of", "open_slide", "output_files",
           "read_region", "segment_slide", "slide_mpp", "tissue_mask", "write_outputs"]
