"""The nucleus rule of a trained model (or the classic baseline), chosen on the validation split
after training and written into model.json, so evaluate, `textdiff predict` and slides separate
nuclei the same way and the test split never tunes a knob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.baselines.unet import predict_pixels
from textdiff.cache.samples import SampleStore
from textdiff.cache.store import FeatureCache
from textdiff.data.sources import source_images
from textdiff.errors import TextDiffError
from textdiff.evaluation.instances import choose_val_rule, scored_truths, source_ids
from textdiff.model.depth import median_nucleus_area
from textdiff.model.inference import predict_split
from textdiff.model.nuclei import RuleChoice


def validation_maps(kind: str, model: torch.nn.Module | None, cache: FeatureCache,
                    device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """(foreground probabilities, predicted distances or None) of every val item: the classifier's
    and the U-Net's averaged over the split's test-time views, as evaluate scores the test split;
    the classic baseline's of the image itself."""
    val = cache.split("val")
    if kind == "classic":
        bgr = cache.spec.protocol == "release"
        return [hematoxylin_otsu(val.image(i), bgr=bgr).astype(np.float32) for i in range(len(val))], [None] * len(val)
    if kind == "unet":
        distances: list = []
        probs = predict_pixels(model, val, device, views=val.scored_views, distances=distances)[2]
        return probs, distances
    distances: list = []
    _, _, probs = predict_split(model, SampleStore(val), device, keep_probs=True, distances=distances,
                                views=val.scored_views)
    return probs, distances


def choose_nuclei_rule(kind: str, model: torch.nn.Module | None, cache: FeatureCache, device: torch.device,
                       mpp: float, prepared_dir: Path | None = None) -> RuleChoice | None:
    """The rule of best mean validation AJI at the source resolution; None when the cache holds
    no true per-nucleus labels for val (the default rule then applies). With `prepared_dir` the
    search also tries refining the foreground by the val source images (as the files hold them,
    which is what `textdiff predict` is given)."""
    if not cache.spec.instances:
        return None
    probs, distances = validation_maps(kind, model, cache, device)
    val = cache.split("val")
    images = None
    if prepared_dir is not None and val.spec.full_size:
        try:
            images = source_images(prepared_dir, "val", source_ids(val), normalise=False)
        except TextDiffError as err:  # the model is trained: keep it, with the rule the maps alone choose
            print(f"nuclei: the refinement by the image is not tried ({err})")
    return choose_val_rule(val, probs, distances, mpp, images)


def training_nucleus_area(cache: FeatureCache, mpp: float) -> float:
    """Median area (µm²) of the training split's nuclei: what `textdiff predict` compares an input's
    nuclei with to tell a wrong magnification (`model.depth`). True per-nucleus maps where the cache
    has them, else the connected components of the masks (merged touching nuclei: an overestimate);
    0.0 without full-size maps (the check is then off)."""
    from skimage.measure import label

    train = cache.split("train")
    if not train.spec.full_size or mpp <= 0:
        return 0.0
    maps = [t for t in scored_truths(train) if t is not None]
    if not maps:
        n = len(train.tile_layout()[0]) if train.spec.tiled else len(train)
        maps = [label(train.full_mask(k) > 0, connectivity=1) for k in range(n)]
    return median_nucleus_area(maps, mpp)
