"""Test-time augmentation through the teacher: maps averaged over 1, 2, 4 or 8 dihedral views.

    python benchmarks/tta.py                      # val and test, models/classifier
    python benchmarks/tta.py --splits val --images 2

The teacher is not equivariant (its features of a turned image are not its features turned), so
`Segmenter.views` runs it on every view itself, as `textdiff predict` does with that setting, and
averages the turned-back maps. Each image's 8 views are computed once (`Segmenter.view_maps`) and
the first 1, 2, 4 and 8 averaged, which is what `maps` does with `views` = that number. Scored at
the source size with the model's own nucleus rule: Dice (binary mask), nuclei AJI and PQ against
the per-nucleus truth (approximate maps are not scored). Val says whether to adopt it; test is
reported beside. Prints the table, seconds per view and the device; writes <out>/tta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.data.dataset import read_split  # noqa: E402
from textdiff.evaluation.metrics import instance_scores, iou_dice_textdiff  # noqa: E402
from textdiff.model.nuclei import separate  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CLASSIFIER_DIR, resolve_data_root  # noqa: E402
from textdiff.predict.images import build_segmenter  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402

VIEWS = (1, 2, 4, 8)
METRICS = ("dice", "aji_instance", "pq_instance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="*", default=["val", "test"])
    ap.add_argument("--images", type=int, default=0, help="first N images per split (0 = all)")
    ap.add_argument("--model", type=Path, default=CLASSIFIER_DIR)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("docs/tta"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    params = load_params("params.yaml")
    root, instances = resolve_data_root(params.data.root), Path(params.data.instances)
    segmenter, card = build_segmenter(args.model, device, None, None)
    mpp = params.data.mpp
    rows, seconds = [], []
    for split in args.splits:
        samples = read_split(root, split, instances=instances)
        samples = samples[: args.images] if args.images else samples
        for sample in tqdm(samples, desc=f"tta {split}", unit="img"):
            started = time.perf_counter()
            maps = list(segmenter.view_maps(sample.image, sample.text, mpp, range(max(VIEWS))))
            seconds.append((time.perf_counter() - started) / len(maps))
            for n in VIEWS:
                prob = np.mean([p for p, _ in maps[:n]], axis=0, dtype=np.float32)
                distance = np.mean([d for _, d in maps[:n]], axis=0, dtype=np.float32) if maps[0][1] is not None \
                    else None
                row = {"split": split, "image": sample.id, "views": n,
                       "dice": iou_dice_textdiff((prob > 0.5).astype(np.uint8), sample.mask)[0]}
                if sample.instances is not None and not sample.approximate:
                    row.update({k: v for k, v in instance_scores(separate(prob, distance, segmenter.rule, mpp),
                                                                 sample.instances).items() if k in METRICS})
                rows.append(row)
    summary = []
    for split in args.splits:
        for n in VIEWS:
            mine = [r for r in rows if r["split"] == split and r["views"] == n]
            summary.append({"split": split, "views": n, "images": len(mine),
                            **{k: float(np.mean([r[k] for r in mine if k in r])) for k in METRICS}})
    lines = ["| split | views | Dice % (native) | AJI % | PQ % |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {s['split']} ({s['images']}) | {s['views']} | {100 * s['dice']:.2f} | "
              f"{100 * s['aji_instance']:.2f} | {100 * s['pq_instance']:.2f} |" for s in summary]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tta.json").write_text(json.dumps(
        {"summary": summary, "per_image": rows, "seconds_per_view": float(np.median(seconds)),
         "device": device_name(device), "classifier_autocast": card.classifier.autocast,
         "torch": torch.__version__}, indent=1) + "\n")
    print("\n".join(lines))
    print(f"{np.median(seconds):.2f} s per view per image (median; teacher + classifier + resize) on "
          f"{device_name(device)}, classifier {card.classifier.autocast}; wrote {args.out}/tta.json")


if __name__ == "__main__":
    main()
