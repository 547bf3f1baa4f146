"""`textdiff evaluate`: test-split metrics, overlays and probability maps (DVC stage two, second half)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from textdiff.cache import FeatureCache
from textdiff.errors import TextDiffError
from textdiff.metrics import dice_pixel, image_metrics, summarize
from textdiff.overlays import overlay, save_png
from textdiff.params import load_params
from textdiff.tiles import blend_tiles
from textdiff.train import SplitData, load_classifier, predict_split

from textdiff.atomic import atomic_dir, atomic_file, write_json
from stages.common import CACHE_PATH, CLASSIFIER_DIR, METRICS_DIR, resolve_device

OVERLAY_DIR = METRICS_DIR / "overlays"
PREDICTIONS = METRICS_DIR / "predictions.h5"


def load_trained(model_dir: Path, device: torch.device):
    weights, meta_path = model_dir / "model.pt", model_dir / "model.json"
    for f in (weights, meta_path):
        if not f.is_file():
            raise TextDiffError(f"{f}: trained classifier not found (run `textdiff train`)")
    try:
        meta = json.loads(meta_path.read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = load_classifier(state, meta["classifier"], device)
    except (json.JSONDecodeError, KeyError) as err:
        raise TextDiffError(f"{meta_path}: not a classifier description ({type(err).__name__})") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise TextDiffError(f"{weights}: cannot load the classifier weights ({str(err).splitlines()[0]})") from None
    return model, meta


def stitch_windows(split, window_probs: list[np.ndarray], overlays: int):
    """Tiles mode: blend the window probabilities of each source image (Gaussian weights, as
    predict does) and pair them with the full-size masks; rebuild the first images for overlays."""
    image_ids, index, origins = split.tile_layout()
    probs, gts, images = [], [], []
    for k, image_id in enumerate(image_ids):
        windows = np.flatnonzero(index == k)
        size = split.full_mask(k).shape
        prob = blend_tiles([torch.from_numpy(window_probs[w]) for w in windows],
                           [tuple(map(int, origins[w])) for w in windows], *size)
        probs.append(prob.numpy().astype(np.float32))
        gts.append(split.full_mask(k))
        if k < overlays:
            image = np.zeros((*size, 3), np.uint8)
            for w in windows:
                y, x = map(int, origins[w])
                tile = split.image(int(w))
                image[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            images.append(image)
    return image_ids, probs, gts, images


def run(params_path: Path, cache_path: Path = CACHE_PATH, model_dir: Path = CLASSIFIER_DIR) -> dict:
    params = load_params(params_path)
    device = resolve_device(params.evaluate.device)
    cache = FeatureCache(cache_path)
    model, meta = load_trained(model_dir, device)
    if meta.get("cache_fingerprint") != cache.fingerprint:
        raise TextDiffError(f"{model_dir}/model.json: the classifier was trained on another cache; re-run `textdiff train`")
    test = cache.split("test")
    data = SplitData(test)
    preds, gts, probs = predict_split(model, data, device, keep_probs=True)
    if test.tiled:  # score whole images at native resolution, not windows
        ids, probs, gts, images = stitch_windows(test, probs, params.evaluate.overlays)
        preds = [(p > 0.5).astype(np.uint8) for p in probs]
    else:
        ids, images = test.ids, [test.image(k) for k in range(min(params.evaluate.overlays, len(test)))]

    per_image = []
    for image_id, p, g in zip(ids, preds, gts):
        per_image.append({"id": image_id, **image_metrics(p, g)})
    summary = summarize(per_image)
    metrics = {
        "dice": summary["dice"], "iou": summary["iou"], "dice_pixel": dice_pixel(preds, gts),
        "aji": summary["aji"], "pq": summary["pq"], "dq": summary["dq"], "sq": summary["sq"],
        "num_images": len(per_image),
    }
    attrs = {"fusion": meta["classifier"]["fusion"], "best_epoch": meta["best_epoch"],
             "params": json.dumps(meta["train"]), "cache_fingerprint": json.dumps(cache.fingerprint)}
    with atomic_file(PREDICTIONS) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(attrs)
            for image_id, prob in zip(ids, probs):
                ds = h5.create_dataset(image_id, data=prob.astype(np.float32), compression="gzip")
                ds.attrs["description"] = "foreground probability (softmax class 1), test view 0"
    with atomic_dir(OVERLAY_DIR) as tmp:
        for k, image in enumerate(images):
            save_png(tmp / f"{ids[k]}.png", overlay(image, preds[k], gts[k]))
    write_json(METRICS_DIR / "test_per_image.json", {"images": per_image})
    write_json(METRICS_DIR / "test.json", metrics)
    print(f"test ({len(per_image)} images): dice {metrics['dice']:.4f}  iou {metrics['iou']:.4f}  "
          f"dice_pixel {metrics['dice_pixel']:.4f}  aji {metrics['aji']:.4f}  pq {metrics['pq']:.4f}")
    return metrics
