"""The nucleus rule of a trained model (or the classic baseline), chosen on the validation split
after training and written into model.json, so evaluate, `textdiff predict` and slides separate
nuclei the same way and the test split never tunes a knob."""

from __future__ import annotations

import numpy as np
import torch

from textdiff.baselines.classic import hematoxylin_otsu
from textdiff.baselines.unet import predict_pixels
from textdiff.cache.samples import SampleStore
from textdiff.cache.store import FeatureCache
from textdiff.evaluation.instances import choose_val_rule
from textdiff.model.inference import predict_split
from textdiff.model.nuclei import RuleChoice


def validation_maps(kind: str, model: torch.nn.Module | None, cache: FeatureCache,
                    device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """(foreground probabilities, predicted distances or None) of view 0 of every val item."""
    val = cache.split("val")
    if kind == "classic":
        bgr = cache.spec.protocol == "release"
        return [hematoxylin_otsu(val.image(i), bgr=bgr).astype(np.float32) for i in range(len(val))], [None] * len(val)
    if kind == "unet":
        return predict_pixels(model, val, device)[2], [None] * len(val)
    distances: list = []
    _, _, probs = predict_split(model, SampleStore(val), device, keep_probs=True, distances=distances)
    return probs, distances


def choose_nuclei_rule(kind: str, model: torch.nn.Module | None, cache: FeatureCache, device: torch.device,
                       mpp: float) -> RuleChoice | None:
    """The rule of best mean validation AJI at the source resolution; None when the cache holds
    no true per-nucleus labels for val (the default rule then applies)."""
    if not cache.spec.instances:
        return None
    probs, distances = validation_maps(kind, model, cache, device)
    return choose_val_rule(cache.split("val"), probs, distances, mpp)
