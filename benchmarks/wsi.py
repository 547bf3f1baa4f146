"""Whole-slide throughput and memory: a synthetic slide of any size, segmented by `textdiff predict`.

    python benchmarks/wsi.py --size 100000 --tissue 4 --out /tmp/wsi     # 100k x 100k: 30 GB as one RGB array

Builds a pyramidal tiled TIFF (tifffile; JPEG-free zlib tiles, 0.25 µm/px resolution tags, levels
down to < 2048 px) that is glass except for a `--tissue` x `--tissue` mosaic of MoNuSeg test images
in its middle, streaming the tiles (the slide never exists in memory), then runs `textdiff predict`
on it with models/classifier in a child process and reports the child's wall time, the megapixels/s
it prints (working resolution, tissue tiles) and its peak resident memory (`ru_maxrss`).
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

from textdiff.data import list_images, read_image  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="slide side in level-0 pixels")
    ap.add_argument("--tissue", type=int, default=3, help="side of the tissue mosaic, in 1000-px MoNuSeg images")
    ap.add_argument("--out", type=Path, default=Path("/tmp/textdiff-wsi"))
    ap.add_argument("--model", default="models/classifier")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"synthetic-{args.size}.tif"
    started = time.perf_counter()
    build_slide(slide, args.size, args.tissue)
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


if __name__ == "__main__":
    main()
