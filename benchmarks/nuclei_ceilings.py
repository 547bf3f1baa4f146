"""Where the trained model's nuclei lose AJI: the seeds, the foreground, or the working resolution.

    python benchmarks/nuclei_ceilings.py              # models/classifier on cache/features.zarr

Three rows per split (val, test), at the source resolution against the per-nucleus truth
(approximate maps skipped):

- shipped: the model's own nucleus rule (model.json), as evaluate scores it;
- true seeds: one marker per true nucleus (its pixel furthest from its border) flooded over the
  model's own landscape (the distance head, or the mask's distance transform) inside the model's
  own foreground. What a perfect seed finder would reach with this foreground: if it is barely
  above `shipped`, better seeds cannot help and the foreground (the mask) must improve;
- true mask at the working size: the true nuclei brought to the classifier's output size and back
  (area down, bilinear up, as evaluate upsamples a prediction), each pixel given to its nearest true
  nucleus. The ceiling that the working resolution itself imposes on a perfect model.

Prints mean AJI, PQ and native Dice (evaluate's `dice_native`) per row, the device and the time taken.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nuclei_rules import open_model, split_maps  # noqa: E402
from textdiff.evaluation.metrics import instance_scores, iou_dice_textdiff  # noqa: E402
from textdiff.model.card import nuclei_rule, read_model_dir  # noqa: E402
from textdiff.model.nuclei import separate  # noqa: E402


def true_seeds(truth: np.ndarray) -> np.ndarray:
    """A marker image: each true nucleus' innermost pixel carries its label."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(truth > 0)
    markers = np.zeros(truth.shape, np.int32)
    for label, where in enumerate(ndimage.find_objects(truth), start=1):
        if where is None:
            continue
        depth = np.where(truth[where] == label, inside[where], -1.0)
        r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        markers[where[0].start + r, where[1].start + c] = label
    return markers


def flood_true_seeds(prob: np.ndarray, distance: np.ndarray | None, truth: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    from skimage.segmentation import watershed

    fg = prob > 0.5
    height = np.where(fg, distance, 0.0) if distance is not None else ndimage.distance_transform_edt(fg)
    labels = watershed(-height, true_seeds(truth), mask=fg)
    orphans, _ = ndimage.label(fg & (labels == 0))
    return np.where(orphans > 0, orphans + labels.max(), labels)


def truth_through(truth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The true nuclei as a perfect model at `size` would leave them at the source size."""
    from scipy import ndimage

    fg = torch.from_numpy((truth > 0).astype(np.float32))[None, None]
    small = F.interpolate(fg, size=size, mode="area")
    back = F.interpolate(small, size=truth.shape, mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
    nearest = ndimage.distance_transform_edt(truth == 0, return_distances=False, return_indices=True)
    return np.where(back, truth[nearest[0], nearest[1]], 0)


def main() -> None:
    started = time.perf_counter()
    args, model, card, cache = open_model(__doc__)
    device = torch.device("cpu")
    rule = nuclei_rule(read_model_dir(args.model))
    mpp, size = card.source_mpp, tuple(card.classifier.out_size)
    rows = {
        "shipped rule": lambda p, d, t: separate(p, d, rule, mpp),
        "true seeds, the model's foreground and landscape": flood_true_seeds,
        f"true mask through the working size {size[0]}x{size[1]}": lambda p, d, t: truth_through(t, size),
    }
    print(f"model {args.model}, rule {rule.to_json()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| split | row | AJI | PQ | Dice |")
    print("|---|---|---:|---:|---:|")
    for split in ("val", "test"):
        probs, dists, truths = split_maps(model, cache, split, device)
        for name, make in rows.items():
            labels = [make(p, dists[k] if dists else None, truths[k]) for k, p in enumerate(probs)]
            scores = [instance_scores(lab, t) for lab, t in zip(labels, truths)]
            aji, pq = (100 * np.mean([s[key] for s in scores]) for key in ("aji_instance", "pq_instance"))
            d = 100 * np.mean([iou_dice_textdiff(lab > 0, t > 0)[0] for lab, t in zip(labels, truths)])
            print(f"| {split} ({len(probs)}) | {name} | {aji:.2f} | {pq:.2f} | {d:.2f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
