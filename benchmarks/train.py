"""Per-epoch cost of stage two: reading cached features vs recomputing the teacher every epoch.

    python benchmarks/train.py --images 6 --epochs 2

The release recomputes the UNet features of every image in every epoch; this pipeline reads them
from cache/features.zarr. Both loops below run the same classifier step on the same images, side by
side in one process; the only difference is where the features come from. Needs a finished
`dvc repro` up to extract (cache/features.zarr and the teacher it was built with).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.encoders.image import build_featurizer, choose_teacher, images_to_model_range  # noqa: E402
from textdiff.model.classifier import PixelClassifier  # noqa: E402
from textdiff.model.losses import total_loss  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CACHE_PATH  # noqa: E402
from textdiff.train.training import classifier_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6, help="images per epoch (the train split's first N)")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    params = load_params("params.yaml")
    cache = FeatureCache(CACHE_PATH)
    if cache.spec.teacher_kind != "adm":
        sys.exit("benchmarks/train.py needs a cache built by an ADM teacher")
    split = cache.split("train")
    n = min(args.images, len(split))
    extractor = build_featurizer(cache.spec, choose_teacher(params).path, torch.device("cpu"))
    torch.manual_seed(0)
    model = PixelClassifier(classifier_config(cache, params.train, torch.device("cpu")))
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)

    def step(feats, i):
        tokens, mask, pooled = split.text(i)
        target = split.mask(i, 0)[None].long()
        out = model(feats, tokens[None], mask[None], pooled[None])
        loss, _ = total_loss(out, target, params.train.dice_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def epoch_cached():
        for i in range(n):
            step([f[0][None] for f in split.features(i)], i)  # view 0: [1, steps, C, H, W]

    def epoch_recomputed():
        for i in range(n):
            x = images_to_model_range(split.image(i)[None])
            feats = extractor(x)
            step([feats[b].half() for b in cache.spec.blocks], i)

    model.train()
    cached, recomputed = [], []
    for _ in range(args.epochs):  # interleaved, so machine load hits both alike
        t0 = time.perf_counter()
        epoch_cached()
        cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        epoch_recomputed()
        recomputed.append(time.perf_counter() - t0)
    mc, mr = statistics.median(cached), statistics.median(recomputed)
    print(f"{n} images/epoch, {args.epochs} epochs each, fusion {params.train.fusion}, d_model {model.config.d_model}, "
          f"threads {torch.get_num_threads()}, device cpu")
    print(f"epoch from cache:       median {mc:.2f} s  ({mc / n:.3f} s/image)  all: {np.round(cached, 2).tolist()}")
    print(f"epoch recomputing UNet: median {mr:.2f} s  ({mr / n:.3f} s/image)  all: {np.round(recomputed, 2).tolist()}")
    print(f"ratio recompute / cache: {mr / mc:.2f}x")


if __name__ == "__main__":
    main()
