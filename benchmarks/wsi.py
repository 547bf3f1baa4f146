"""Whole-slide throughput and memory: a synthetic slide of any size, segmented by `textdiff predict`.

    python benchmarks/wsi.py --size 100000 --tissue 4 --out /tmp/wsi     # 100k x 100k: 30 GB as one RGB array

Builds a pyramidal tiled TIFF (tifffile; JPEG-free zlib tiles, 0.25 µm/px resolution tags, levels
down to < 2048 px) that is glass except for a `--tissue` x `--tissue` mosaic of MoNuSeg test images
in its middle, streaming the tiles (the slide never exists in memory), then runs `textdiff predict`
on it with models/classifier in a child process and reports the child's wall time, the megapixels/s
it prints (working resolution, tissue tiles) and its peak resident memory (`ru_maxrss`).
`--figure docs/wsi_example.png` also draws the slide's overlay beside a level-0 close-up with the
GeoJSON polygons outlined (the picture in docs/predict.md).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.data.dataset import list_images
from textdiff.data.images import read_image  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import resolve_data_root  # noqa: E402

GLASS = 242
TILE = 512


def build_slide(path: Path, size: int, tissue: int, mpp: float = 0.25) -> tuple[int, int]:
    """Write the slide; returns the (y, x) of the tissue mosaic's corner at level 0."""
    import tifffile

    root = resolve_data_root(load_params("params.yaml").data.root)
    images = [read_image(p)[0] for p in list_images(root, "test")]
    mosaic = np.concatenate([np.concatenate([images[(r * tissue + c) % len(images)] for c in range(tissue)], axis=1)
                             for r in range(tissue)], axis=0)
    corner = ((size - mosaic.shape[0]) // 2 // TILE * TILE, (size - mosaic.shape[1]) // 2 // TILE * TILE)

    def tiles(level: int):
        step = 2**level
        n = -(-size // step)
        small = mosaic[::step, ::step]
        cy, cx = corner[0] // step, corner[1] // step
        for y in range(0, n, TILE):
            for x in range(0, n, TILE):
                tile = np.full((TILE, TILE, 3), GLASS, np.uint8)
                y0, x0 = max(y, cy), max(x, cx)
                y1, x1 = min(y + TILE, cy + small.shape[0]), min(x + TILE, cx + small.shape[1])
                if y0 < y1 and x0 < x1:
                    tile[y0 - y : y1 - y, x0 - x : x1 - x] = small[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
                yield tile

    levels = 1
    while -(-size // 2 ** (levels - 1)) > 2048:
        levels += 1
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            n = -(-size // 2**level)
            res = 1e4 / mpp / 2**level
            tif.write(tiles(level), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1)
    return corner


def draw_figure(slide_path: Path, pred: Path, corner: tuple[int, int], out: Path, crop: int = 768) -> None:
    """The overlay PNG (whole slide, tissue box marked) | a level-0 close-up with the GeoJSON's
    nucleus polygons outlined, as QuPath would show them."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import openslide
    from matplotlib.patches import Polygon, Rectangle

    stem = slide_path.stem
    overlay = plt.imread(pred / f"{stem}_overlay.png")
    slide = openslide.OpenSlide(str(slide_path))
    width = slide.dimensions[0]
    y0, x0 = corner[0] + 1000 - crop // 2, corner[1] + 1000 - crop // 2  # across the seam of four images
    region = np.asarray(slide.read_region((x0, y0), 0, (crop, crop)).convert("RGB"))
    features = json.loads((pred / f"{stem}.geojson").read_text())["features"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6.2))
    a.imshow(overlay)
    scale = overlay.shape[1] / width
    a.add_patch(Rectangle((x0 * scale, y0 * scale), crop * scale, crop * scale, fill=False, color="red", lw=1.5))
    a.set_title(f"{stem}: {width:,} x {slide.dimensions[1]:,} px at level 0 (overlay PNG; glass skipped)", fontsize=9)
    b.imshow(region, extent=(x0, x0 + crop, y0 + crop, y0))
    shown = 0
    for feature in features:
        ring = np.asarray(feature["geometry"]["coordinates"][0], float)
        if (ring[:, 0].max() < x0 or ring[:, 0].min() > x0 + crop
                or ring[:, 1].max() < y0 or ring[:, 1].min() > y0 + crop):
            continue
        b.add_patch(Polygon(ring, closed=True, fill=False, color="lime", lw=0.9))
        shown += 1
    b.set_xlim(x0, x0 + crop)
    b.set_ylim(y0 + crop, y0)
    b.set_title(f"level-0 close-up (red box): {shown} of the {len(features):,} GeoJSON detections", fontsize=9)
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="slide side in level-0 pixels")
    ap.add_argument("--tissue", type=int, default=3, help="side of the tissue mosaic, in 1000-px MoNuSeg images")
    ap.add_argument("--out", type=Path, default=Path("/tmp/textdiff-wsi"))
    ap.add_argument("--model", default="models/classifier")
    ap.add_argument("--figure", type=Path, default=None, help="also draw overlay + close-up to this PNG")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"synthetic-{args.size}.tif"
    started = time.perf_counter()
    corner = build_slide(slide, args.size, args.tissue)
    print(f"built {slide} ({args.size}x{args.size}, {slide.stat().st_size / 2**20:.0f} MiB on disk, "
          f"{3 * args.size**2 / 2**30:.1f} GiB as one RGB array) in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.cli", "predict", str(slide), "--out", str(args.out / "pred"),
                           "--model", args.model, "--text", "The nuclei are evenly distributed."],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "nuclei" in line or "error" in line]
    print("\n".join(lines[-3:]))
    print(f"predict: {seconds:.0f} s wall, peak RSS {peak:.2f} GiB (exit {done.returncode})")
    if args.figure is not None and done.returncode == 0:
        draw_figure(slide, args.out / "pred", corner, args.figure)


if __name__ == "__main__":
    main()
