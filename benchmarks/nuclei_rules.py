"""How the trained model's maps become nuclei: every candidate separation rule on val and test.

    python benchmarks/nuclei_rules.py                 # models/classifier on cache/features.zarr

Scores, at the source resolution against the per-nucleus truth (approximate maps skipped), the
product's rules (`model.nuclei`: h-maxima of the distance head's map, h-maxima of the mask's
distance transform) beside two candidates kept here for comparison only: a fixed threshold of the
head's map (what the head's seeds were first), and `skimage.feature.peak_local_max` of the mask's
distance transform with a minimum peak distance in micrometres (a common "plain watershed").
Prints mean AJI and PQ on val (what chooses) and test (what is reported), nuclei found, the device
and the time taken. docs/nuclei.md quotes its output.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.cache.samples import SampleStore  # noqa: E402
from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.evaluation.instances import native_maps, scored_truths  # noqa: E402
from textdiff.evaluation.metrics import instance_scores  # noqa: E402
from textdiff.model.card import load_trained  # noqa: E402
from textdiff.model.inference import predict_split  # noqa: E402
from textdiff.model.nuclei import NucleusRule, separate  # noqa: E402
from textdiff.paths import CACHE_PATH, CLASSIFIER_DIR  # noqa: E402


def threshold_seeds(prob: np.ndarray, distance: np.ndarray, level: float) -> np.ndarray:
    from scipy import ndimage
    from skimage.segmentation import watershed

    fg = prob > 0.5
    height = np.where(fg, distance, 0.0)
    markers, _ = ndimage.label(height > level)
    labels = watershed(-height, markers, mask=fg)
    orphans, _ = ndimage.label(fg & (labels == 0))
    return np.where(orphans > 0, orphans + labels.max(), labels)


def peak_seeds(prob: np.ndarray, min_um: float, mpp: float) -> np.ndarray:
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    fg = prob > 0.5
    edt = ndimage.distance_transform_edt(fg)
    components, _ = ndimage.label(fg)
    peaks = peak_local_max(edt, min_distance=max(1, round(min_um / mpp)), labels=components, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-edt, markers, mask=fg)
    orphans, _ = ndimage.label(fg & (labels == 0))
    return np.where(orphans > 0, orphans + labels.max(), labels)


def split_maps(model, cache: FeatureCache, split: str, device: torch.device):
    """(native probabilities, native distances or None, truths) of the images with true maps."""
    data = cache.split(split)
    distances: list = []
    _, _, probs = predict_split(model, SampleStore(data), device, keep_probs=True, distances=distances)
    truths = scored_truths(data)
    keep = [k for k, t in enumerate(truths) if t is not None]
    native_p = native_maps(data, probs)
    native_d = native_maps(data, distances) if all(d is not None for d in distances) else None
    return ([native_p[k] for k in keep], [native_d[k] for k in keep] if native_d else None,
            [truths[k] for k in keep])


def open_model(description: str | None):
    """(args, model, card, cache) of a nuclei benchmark's `--model` / `--cache` command line, on the CPU."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=CLASSIFIER_DIR)
    ap.add_argument("--cache", type=Path, default=CACHE_PATH)
    args = ap.parse_args()
    model, card = load_trained(args.model, torch.device("cpu"))
    return args, model, card, FeatureCache(args.cache)


def main() -> None:
    started = time.perf_counter()
    args, model, card, cache = open_model(__doc__)
    device = torch.device("cpu")
    mpp = card.source_mpp
    maps = {split: split_maps(model, cache, split, device) for split in ("val", "test")}
    has_head = maps["val"][1] is not None
    rules = {f"mask EDT, h-maxima {h} µm (product)": lambda p, d, h=h: separate(p, None, NucleusRule("edt", h), mpp)
             for h in (0.25, 0.5, 1.0)}
    rules.update({f"mask EDT, peak_local_max >= {m} µm (candidate)": lambda p, d, m=m: peak_seeds(p, m, mpp)
                  for m in (1.5, 2.0, 3.0)})
    if has_head:
        rules.update({f"head, threshold {t} (candidate)": lambda p, d, t=t: threshold_seeds(p, d, t)
                      for t in (0.3, 0.4, 0.5)})
        rules.update({f"head, h-maxima {h} (product)": lambda p, d, h=h: separate(p, d, NucleusRule("distance", h), mpp)
                      for h in (0.03, 0.05, 0.08)})
    print(f"model {args.model} (target {'distance' if has_head else 'binary'}), {len(maps['val'][0])} val and "
          f"{len(maps['test'][0])} test images with true maps, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| rule | val AJI | val PQ | test AJI | test PQ | test nuclei |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rule in rules.items():
        row = []
        for split in ("val", "test"):
            probs, dists, truths = maps[split]
            labels = [rule(p, dists[k] if dists else None) for k, p in enumerate(probs)]
            scores = [instance_scores(lab, t) for lab, t in zip(labels, truths)]
            row += [100 * np.mean([s[key] for s in scores]) for key in ("aji_instance", "pq_instance")]
            found = sum(len(np.unique(lab)) - 1 for lab in labels)
        print(f"| {name} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} | {found} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
