"""Scoring a trained classifier on the cached test split.

Every model is scored twice: `dice`/`iou` (and the instance metrics) against the prepared masks,
and `dice_release`/`iou_release` against the released code's dilated 256-px ground truth, the one
the paper's table was scored on (`data.release_mask`), so any run can be set beside the paper.
Resize models are scored on the prepared masks. Tiles models are scored on whole images at native
resolution: the window probabilities of each source image are blended with the same Gaussian
weights `textdiff predict` uses (`tiles.blend_tiles`) and compared with the full-size masks.

Every model is also scored at native resolution (`*_native`, plus the boundary F1 `bf1_native` at
2 px of the source image), when the cache holds the source masks: a resize model's probabilities
are upsampled exactly as `textdiff predict` does (`inference.resize_probability`) and thresholded
at 0.5. At 256 px a nucleus is a few pixels and a mask drawn too wide costs little; at native
resolution, and on its boundary, it shows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.baselines.cellpose import CellposeRule, predict_nuclei
from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.baselines.unet import predict_pixels
from textdiff.cache.samples import SampleStore
from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import CachedSplit, FeatureCache
from textdiff.data.sources import source_images
from textdiff.data.tiles import blend_tiles, paste_tiles
from textdiff.errors import TextDiffError
from textdiff.evaluation.instances import native_maps, scored_truths, source_ids
from textdiff.evaluation.metrics import (
    INSTANCE_KEYS,
    boundary_f1,
    dice_pixel,
    image_metrics,
    instance_scores,
    iou_dice_textdiff,
    summarize,
)
from textdiff.model.card import ModelCard
from textdiff.model.classifier import PixelClassifier
from textdiff.model.inference import predict_split, resize_probability
from textdiff.model.nuclei import NucleusRule, separate
from textdiff.model.refine import refine_probability
from textdiff.runtime.device import usable_cpus

SUMMARY_METRICS = ("dice", "aji")  # the summary plot's columns, per test image


@dataclass
class Evaluation:
    """Per test image: id, probabilities, prediction, ground truth, scores; and the summary."""

    ids: list[str]
    probs: list[np.ndarray]
    preds: list[np.ndarray]
    gts: list[np.ndarray]
    images: list[np.ndarray]  # the first `panels` images, for the error panels (RGB)
    per_image: list[dict]
    metrics: dict[str, float]
    nuclei: list[np.ndarray] | None = None  # per image the separated nuclei at the source size (int32 labels)
    truths: list[np.ndarray | None] | None = None  # per image its per-nucleus truth (None: none, or approximate)
    probs_are: str = "foreground probability (softmax class 1), test view 0"  # what `probs` hold


def stitch_windows(split: CachedSplit, window_probs: list[np.ndarray], panels: int):
    """Tiles mode: (image ids, blended full-size probabilities, full-size masks, the first
    `panels` images rebuilt from their windows)."""
    image_ids, index, origins = split.tile_layout()
    probs, gts, images = [], [], []
    for k in range(len(image_ids)):
        windows = np.flatnonzero(index == k)
        where = [tuple(map(int, origins[w])) for w in windows]
        height, width = split.full_mask(k).shape
        prob = blend_tiles([torch.from_numpy(window_probs[w]) for w in windows], where, height, width)
        probs.append(prob.numpy().astype(np.float32))
        gts.append(split.full_mask(k))
        if k < panels:
            images.append(paste_tiles([split.image(int(w)) for w in windows], where, height, width))
    return image_ids, probs, gts, images


def release_prediction(pred: np.ndarray, prob: np.ndarray, side: int) -> np.ndarray:
    """The prediction at the release ground truth's size: as is when it already has it, else the
    probabilities resized bilinearly and thresholded (tiles models, other working sizes)."""
    if pred.shape == (side, side):
        return pred
    return (resize_probability(prob, (side, side)) > 0.5).astype(np.uint8)


NATIVE_KEYS = ("dice", "iou", "aji", "pq")
BOUNDARY_TOLERANCE = 2.0  # pixels of the source image


def native_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Region, instance and boundary scores at the source resolution, keyed `<metric>_native`."""
    scores = image_metrics(pred, gt)
    out = {f"{k}_native": scores[k] for k in NATIVE_KEYS}
    out["bf1_native"] = boundary_f1(pred, gt, BOUNDARY_TOLERANCE)
    return out


def evaluate_test(model: PixelClassifier, card: ModelCard, cache: FeatureCache, device: torch.device,
                  panels: int, rule: NucleusRule | None = None, prepared_dir: Path | None = None) -> Evaluation:
    """Metrics of the classifier on the test split of the cache it was trained on, its maps averaged
    over the test-time views the cache holds (`extract.eval_views`; `views` in the metrics)."""
    if card.spec != cache.spec:
        raise TextDiffError("the classifier was trained on another cache; re-run `textdiff train`")
    test = cache.split("test")
    distances: list = []
    preds, gts, probs = predict_split(model, SampleStore(test), device, keep_probs=True, distances=distances,
                                      views=test.scored_views)
    return with_views(score_test(cache, preds, gts, probs, panels, rule, distances, card.source_mpp,
                                 prepared_dir=prepared_dir), test.scored_views)


def with_views(result: Evaluation, views: int) -> Evaluation:
    """A model's evaluation recording the test-time views its maps were averaged over."""
    result.metrics["views"] = views
    if views > 1:
        result.probs_are = f"foreground probability (softmax class 1), mean of {views} dihedral views"
    return result


def evaluate_baseline(kind: str, model: torch.nn.Module | None, spec: CacheSpec, cache: FeatureCache,
                      device: torch.device, panels: int, rule: NucleusRule | None = None,
                      mpp: float = 0.0, prepared_dir: Path | None = None) -> Evaluation:
    """The same scoring for a baseline: the U-Net's probabilities (and distances), averaged over the
    test-time views as the classifier's are, or the classic mask (as 0/1 probabilities, so tiles are
    blended and thresholded like any model's)."""
    if spec != cache.spec:
        raise TextDiffError(f"the {kind} baseline was made on another cache; re-run `textdiff train`")
    test = cache.split("test")
    if kind == "unet":
        distances: list = []
        preds, gts, probs = predict_pixels(model, test, device, views=test.scored_views, distances=distances)
        return with_views(score_test(cache, preds, gts, probs, panels, rule, distances, mpp,
                                     prepared_dir=prepared_dir), test.scored_views)
    bgr = cache.spec.protocol == "release"
    preds = [hematoxylin_otsu(test.image(i), bgr=bgr) for i in range(len(test))]
    gts = [test.mask(i, 0).numpy().astype(np.uint8) for i in range(len(test))]
    probs = [p.astype(np.float32) for p in preds]
    return score_test(cache, preds, gts, probs, panels, rule, None, mpp, prepared_dir=prepared_dir)


COVERED = "fraction of the pixel covered by the model's own nuclei (labels > 0, area-resampled), test view 0"


def working_coverage(split: CachedSplit, nuclei: list[np.ndarray]) -> list[np.ndarray]:
    """Per cached item, the fraction of each working pixel that native `nuclei` (one label map per
    source image) cover: the image shrunk by area (resize mode) or the window cut out (tiles)."""
    import cv2

    covered = [(labels > 0).astype(np.float32) for labels in nuclei]
    if not split.spec.tiled:
        side = split.spec.image_size
        return [cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in covered]
    _, index, origins = split.tile_layout()
    side = split.spec.image_size
    return [covered[int(k)][y:y + side, x:x + side] for k, (y, x) in zip(index, origins)]


def evaluate_cellpose(model, rule: CellposeRule, spec: CacheSpec, cache: FeatureCache, prepared_dir: Path,
                      device: torch.device, panels: int) -> Evaluation:
    """The Cellpose baseline's own nuclei on the test source images, scored as they are (no
    watershed of ours); its binary prediction is their foreground, at the source size, and at the
    working size the fraction of each pixel they cover, thresholded at 0.5."""
    if spec != cache.spec:
        raise TextDiffError("the cellpose baseline was made on another cache; re-run `textdiff train`")
    test = cache.split("test")
    images = source_images(prepared_dir, "test", source_ids(test))
    nuclei = predict_nuclei(model, images, rule, device,
                            progress=lambda k: print(f"cellpose: test image {k + 1}/{len(images)}", flush=True))
    probs = working_coverage(test, nuclei)
    preds = [(p > 0.5).astype(np.uint8) for p in probs]
    gts = [test.mask(i, 0).numpy().astype(np.uint8) for i in range(len(test))]
    result = score_test(cache, preds, gts, probs, panels, instances=nuclei)
    result.probs_are = COVERED
    return result


def score_test(cache: FeatureCache, preds: list[np.ndarray], gts: list[np.ndarray], probs: list[np.ndarray],
               panels: int, rule: NucleusRule | None = None, distances: list[np.ndarray | None] | None = None,
               mpp: float = 0.0, instances: list[np.ndarray] | None = None,
               prepared_dir: Path | None = None) -> Evaluation:
    """Every metric of the test items' predictions (windows are stitched first); at the source
    resolution also the nuclei the rule separates, scored against the per-nucleus truth. A rule
    that refines the foreground by the image (`refine_um`) reads the source images `prepared_dir`'s
    manifest names, as `textdiff predict` refines by the image it was given.
    `instances`: per source image the nuclei a model predicted itself at the source resolution
    (Cellpose), scored as they are instead of separated by the rule; their foreground is then the
    native binary prediction."""
    test = cache.split("test")
    rule = rule or NucleusRule()
    full = test.spec.full_size
    refine = instances is None and full and rule.refine_um > 0 and mpp > 0
    if refine and prepared_dir is None:
        raise TextDiffError("the nucleus rule refines the foreground by the source images; scoring needs "
                            "the prepared data that names them")
    sources = source_images(prepared_dir, "test", source_ids(test), normalise=False) if refine else None

    def refined(maps: list[np.ndarray]) -> list[np.ndarray]:
        return [refine_probability(m, im, rule.refine_um, mpp) for m, im in zip(maps, sources)] if refine else maps

    window_probs = probs  # per cached item (windows in tiles mode)
    if cache.spec.tiled:  # score whole images at native resolution, not windows (refined: what predict gives)
        ids, probs, gts, images = stitch_windows(test, probs, panels)
        probs = refined(probs)
        preds = [(p > 0.5).astype(np.uint8) for p in probs]
    else:
        ids, images = test.ids, [test.image(k) for k in range(min(panels, len(test)))]
    # At the source resolution (tiles: the stitched maps are that already).
    native_probs = probs if cache.spec.tiled else refined(native_maps(test, window_probs)) if full else None
    has_head = bool(distances) and all(d is not None for d in distances)
    native_dist = native_maps(test, distances) if full and has_head else None
    truths = scored_truths(test) if full else [None] * len(ids)
    if instances is not None:
        native_probs = [(labels > 0).astype(np.float32) for labels in instances]
    separating = instances is not None or (native_probs is not None and mpp > 0)

    def score_one(k: int) -> tuple[dict, np.ndarray | None]:
        p, g = preds[k], gts[k]
        dice_r, iou_r = iou_dice_textdiff(release_prediction(p, probs[k], test.spec.release_side), test.release_mask(k))
        row = {"id": ids[k], **image_metrics(p, g), "dice_release": dice_r, "iou_release": iou_r}
        if cache.spec.tiled:  # already whole images at native resolution
            row.update(native_scores(p, g))
        elif full:
            native = (native_probs[k] > 0.5).astype(np.uint8)
            row.update(native_scores(native, test.full_mask(k)))
        labels = None
        if separating:
            labels = (instances[k] if instances is not None
                      else separate(native_probs[k], native_dist[k] if native_dist is not None else None, rule, mpp))
            row["nuclei"] = int(labels.max())
            if truths[k] is not None:
                row.update(instance_scores(labels, truths[k]))
                row["nuclei_true"] = int(len(np.unique(truths[k])) - (truths[k].min() == 0))
        return row, labels

    # Images on a thread pool, in order: the watershed and the scores release the GIL for most of
    # their time, and every image is scored on its own, so the numbers are the sequential loop's.
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        scored_images = list(pool.map(score_one, range(len(ids))))
    per_image = [row for row, _ in scored_images]
    nuclei = [labels for _, labels in scored_images if labels is not None]
    summary = summarize([{k: v for k, v in row.items() if k not in (*INSTANCE_KEYS, "nuclei", "nuclei_true")}
                         for row in per_image])
    scored = [row for row in per_image if "aji_instance" in row]
    metrics = {
        "dice": summary["dice"], "iou": summary["iou"], "dice_pixel": dice_pixel(preds, gts),
        "aji": summary["aji"], "aji_plus": summary["aji_plus"],
        "pq": summary["pq"], "dq": summary["dq"], "sq": summary["sq"],
        "dice_release": summary["dice_release"], "iou_release": summary["iou_release"],
        **{k: summary[k] for k in (*(f"{m}_native" for m in NATIVE_KEYS), "bf1_native") if k in summary},
        **({k: float(np.mean([row[k] for row in scored])) for k in INSTANCE_KEYS} if scored else {}),
        **({"nuclei": int(sum(row["nuclei"] for row in per_image if "nuclei" in row))} if nuclei else {}),
        **({"nuclei_true": int(sum(row["nuclei_true"] for row in scored)), "num_instance_images": len(scored)}
           if scored else {}),
        "num_images": len(per_image),
    }
    if cache.spec.protocol == "release":  # the release feeds BGR; people look at RGB
        images = [np.ascontiguousarray(image[..., ::-1]) for image in images]
    return Evaluation(list(ids), probs, preds, gts, images, per_image, metrics, nuclei or None,
                      truths if nuclei else None)


def summary_rows(per_image: list[dict]) -> list[dict]:
    """The per-image scores in long form (id, metric, value): the data of the summary plot."""
    return [{"id": row["id"], "metric": metric, "value": round(float(row[metric]), 6)}
            for metric in SUMMARY_METRICS for row in per_image]

