"""Stage `prepare`: validate the dataset and write the resized splits to data/prepared/.

Reads every split of `data.root` (a relative root resolves against the repo root, also inside
the temporary copies that queued DVC experiments run in), checks every image, mask and report (one error line naming the file on any
problem), resizes to `data.image_size` (images bicubic, masks nearest) and swaps the result into
data/prepared/ atomically, so a failed run leaves no half-written output. With `data.mode: tiles`
the images are kept at native resolution (extract cuts them into windows); all images must then
share one square size, as MoNuSeg's 1000x1000 tiles do.
"""

from __future__ import annotations

import time
from pathlib import Path

from textdiff.data import PREPARED_DIR, SPLITS, read_splits, resize_sample, write_prepared
from textdiff.errors import TextDiffError
from textdiff.params import load_params, section_dict

from stages.common import resolve_data_root


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def native_size(splits: dict, tile: int) -> int:
    """The one square size every image shares (tiles mode keeps native resolution)."""
    shapes = {}
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


def run(params_path: Path, out_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    root = resolve_data_root(params.data.root)
    size = params.data.image_size
    start = time.perf_counter()
    splits = read_splits(root, SPLITS, progress=True)
    if params.data.mode == "tiles":
        size = native_size(splits, params.data.tile)
        resized = splits
    else:
        resized = {split: [resize_sample(s, size) for s in samples] for split, samples in splits.items()}
    meta = {
        "image_size": size,
        "source_root": str(root.resolve()),
        "data_params": section_dict(params.data),
    }
    write_prepared(out_dir, resized, meta)
    for split, samples in resized.items():
        h, w = samples[0].image.shape[:2]
        print(f"{split:>5}: {len(samples):3d} images, {w}x{h}")
    elapsed = time.perf_counter() - start
    print(f"wrote {out_dir} ({_size_mib(Path(out_dir)):.1f} MiB) in {elapsed:.1f} s")
