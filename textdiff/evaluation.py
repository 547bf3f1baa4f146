"""Scoring a trained classifier on the cached test split.

Resize models are scored on the prepared masks. Tiles models are scored on whole images at native
resolution: the window probabilities of each source image are blended with the same Gaussian
weights `textdiff predict` uses (`tiles.blend_tiles`) and compared with the full-size masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from textdiff.cache import CachedSplit, FeatureCache
from textdiff.classifier import PixelClassifier
from textdiff.errors import TextDiffError
from textdiff.inference import ModelCard, SampleStore, predict_split
from textdiff.metrics import dice_pixel, image_metrics, summarize
from textdiff.tiles import blend_tiles, paste_tiles


@dataclass
class Evaluation:
    """Per test image: id, probabilities, prediction, ground truth, scores; and the summary."""

    ids: list[str]
    probs: list[np.ndarray]
    preds: list[np.ndarray]
    gts: list[np.ndarray]
    images: list[np.ndarray]  # the first `overlays` images, for overlays
    per_image: list[dict]
    metrics: dict[str, float]


def stitch_windows(split: CachedSplit, window_probs: list[np.ndarray], overlays: int):
    """Tiles mode: (image ids, blended full-size probabilities, full-size masks, the first
    `overlays` images rebuilt from their windows)."""
    image_ids, index, origins = split.tile_layout()
    probs, gts, images = [], [], []
    for k in range(len(image_ids)):
        windows = np.flatnonzero(index == k)
        where = [tuple(map(int, origins[w])) for w in windows]
        height, width = split.full_mask(k).shape
        prob = blend_tiles([torch.from_numpy(window_probs[w]) for w in windows], where, height, width)
        probs.append(prob.numpy().astype(np.float32))
        gts.append(split.full_mask(k))
        if k < overlays:
            images.append(paste_tiles([split.image(int(w)) for w in windows], where, height, width))
    return image_ids, probs, gts, images


def evaluate_test(model: PixelClassifier, card: ModelCard, cache: FeatureCache, device: torch.device,
                  overlays: int) -> Evaluation:
    """Metrics of the classifier on the test split of the cache it was trained on."""
    if card.spec != cache.spec:
        raise TextDiffError("the classifier was trained on another cache; re-run `textdiff train`")
    test = cache.split("test")
    preds, gts, probs = predict_split(model, SampleStore(test), device, keep_probs=True)
    if cache.spec.tiled:  # score whole images at native resolution, not windows
        ids, probs, gts, images = stitch_windows(test, probs, overlays)
        preds = [(p > 0.5).astype(np.uint8) for p in probs]
    else:
        ids, images = test.ids, [test.image(k) for k in range(min(overlays, len(test)))]
    per_image = [{"id": image_id, **image_metrics(p, g)} for image_id, p, g in zip(ids, preds, gts)]
    summary = summarize(per_image)
    metrics = {
        "dice": summary["dice"], "iou": summary["iou"], "dice_pixel": dice_pixel(preds, gts),
        "aji": summary["aji"], "pq": summary["pq"], "dq": summary["dq"], "sq": summary["sq"],
        "num_images": len(per_image),
    }
    return Evaluation(list(ids), probs, preds, gts, images, per_image, metrics)
