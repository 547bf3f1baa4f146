"""Throughput of `textdiff predict`: megapixels per second for the trained pipeline.

    python benchmarks/predict.py --images 6                  # resize protocol (one window per image)
    python benchmarks/predict.py --images 2 --scale 0.512    # sliding windows at 2x the training scale
    python benchmarks/predict.py --images 3 --scale 0.512 --batch-size 1 4 9   # predict --batch-size

Segments the first N MoNuSeg test images (1000x1000) with models/classifier and prints the median
seconds per image and megapixels/s (model loading excluded; the first image is a warm-up). With
several --batch-size values every image is segmented at each, interleaved, so machine load hits
them alike; the largest difference between their probability maps is printed beside the times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.data.dataset import list_images
from textdiff.data.images import read_image  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CLASSIFIER_DIR, resolve_data_root  # noqa: E402
from textdiff.predict.images import build_segmenter  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, nargs="*", default=[1], help="windows per teacher/classifier call")
    ap.add_argument("--views", type=int, default=None, help="test-time views per image (default: the model's, as "
                    "textdiff predict; the time grows with them)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    segmenter, card = build_segmenter(CLASSIFIER_DIR, device, None, args.scale, views=args.views)
    root = resolve_data_root(load_params("params.yaml").data.root)
    paths = list_images(root, "test")[: args.images + 1]
    images = [read_image(p)[0] for p in paths]
    segmenter.probabilities(images[0], "warm-up")
    times: dict[int, list[float]] = {b: [] for b in args.batch_size}
    worst = 0.0
    for image in images[1:]:
        maps = []
        for b in args.batch_size:
            segmenter.batch_size = b
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            maps.append(segmenter.probabilities(image, "The nuclei are sparsely distributed."))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[b].append(time.perf_counter() - start)
        worst = max([worst, *(float(abs(m - maps[0]).max()) for m in maps[1:])])
    mp = images[1].shape[0] * images[1].shape[1] / 1e6
    print(f"{len(images) - 1} images of {images[1].shape[1]}x{images[1].shape[0]}, mode {segmenter.mode}, "
          f"scale {args.scale}, {segmenter.views} view(s) per image, fusion {card.classifier.fusion}, "
          f"{device_name(device)}, classifier {card.classifier.autocast}")
    base = statistics.median(times[args.batch_size[0]])
    for b, ts in times.items():
        med = statistics.median(ts)
        print(f"batch {b}: median {med:.2f} s/image (min {min(ts):.2f}, max {max(ts):.2f}) = {mp / med:.3f} "
              f"megapixels/s, {base / med:.2f}x batch {args.batch_size[0]}")
    if len(args.batch_size) > 1:
        print(f"largest probability difference between batch sizes: {worst:.2e}")

if __name__ == "__main__":
    main()
