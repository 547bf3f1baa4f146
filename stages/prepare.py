"""Stage `prepare`: validate the dataset and write the working-size splits to data/prepared/.

Every image, mask and report of `data.root` is checked (one error line naming the file on any
problem) before anything is written; the output is swapped in atomically, so a failed run leaves
no half-written data/prepared/ that extract would trust.
"""

from __future__ import annotations

import time
from pathlib import Path

from textdiff.data.prepare import dataset_layout, prepare_dataset
from textdiff.data.stain import method_problem
from textdiff.locks import hold, lock_path
from textdiff.params import load_params
from textdiff.paths import PREPARED_DIR, resolve_data_root


def run(params_path: Path, out_dir: Path = PREPARED_DIR) -> None:
    with hold(lock_path(out_dir), f"the prepared data {out_dir}"):
        _run(params_path, out_dir)


def _run(params_path: Path, out_dir: Path) -> None:
    params = load_params(params_path)
    params.refuse(method_problem(params.data.stain))
    started = time.perf_counter()
    root = resolve_data_root(params.data.root)
    folder = dataset_layout(params.data.layout, root) == "folder"
    instances = resolve_data_root(params.data.instances) if params.data.instances and not folder else None
    if folder:
        print(f"{root}: folder layout (images/, masks/); per-nucleus labels come from the masks, "
              "data.instances is not read")
    if instances is not None and not instances.is_dir():
        print(f"note: no instance ground truth at {instances} (data.instances): instance targets and metrics are off")
        instances = None
    splits = prepare_dataset(params.data, root, out_dir, instances)
    for split, samples in splits.items():
        h, w = samples[0].image.shape[:2]
        nuclei = ""
        if samples[0].instances is not None:
            approximate = sum(s.approximate for s in samples)
            nuclei = f", {sum(int(s.instances.max()) for s in samples)} nuclei"
            nuclei += f" ({approximate} approximate maps)" if approximate else ""
        print(f"{split:>5}: {len(samples):3d} images, {w}x{h}{nuclei}")
    size_mib = sum(p.stat().st_size for p in Path(out_dir).iterdir() if p.is_file()) / 2**20
    print(f"wrote {out_dir} ({size_mib:.1f} MiB) in {time.perf_counter() - started:.1f} s")
