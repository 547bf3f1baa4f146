"""Stage `prepare`: validate the dataset and write the resized splits to data/prepared/.

Reads every split of `data.root` (a relative root resolves against the working directory, the
repo root under DVC), checks every image, mask and report (one error line naming the file on any
problem), resizes to `data.image_size` (images bicubic, masks nearest) and swaps the result into
data/prepared/ atomically, so a failed run leaves no half-written output. `data.mode=tiles` needs
nothing different here: tiling is done by a later stage, from the same source images.
"""

from __future__ import annotations

import time
from pathlib import Path

from textdiff.data import PREPARED_DIR, SPLITS, read_splits, resize_sample, write_prepared
from textdiff.params import load_params, section_dict


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def run(params_path: Path, out_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    root = Path(params.data.root)
    size = params.data.image_size
    start = time.perf_counter()
    splits = read_splits(root, SPLITS, progress=True)
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
