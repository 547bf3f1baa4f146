"""The U-Net baseline: MONAI's `UNet` on the labelled images' pixels (trained by `training.train_unet`).

What a reader of a label-efficiency claim asks first is "better than a plain U-Net given the same
labels?". So this baseline shares everything with the pixel classifier except its input: the same
labelled subset (`train.num_labeled`, `train.seed`), the same schedule (`train.epochs` or
`train.steps`), augmentation (`train.augment` draws the same cached views, rebuilt here from the
pixels exactly as extract made them for the teacher: dihedral, rotated and stain copies), the same
loss (CE + `train.dice_weight` x soft Dice) and the same selection (best validation Dice). It reads
the images and masks that the cache already holds, so the teacher never runs for it. The network
is `monai.networks.nets.UNet` (the medical-imaging community's reference implementation), not ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import CachedSplit
from textdiff.data.stain import StainShift, apply_shift
from textdiff.data.views import apply_view, rotate_like_release
from textdiff.encoders.image import images_to_model_range
from textdiff.errors import TextDiffError
from textdiff.model.card import card_problem, load_weights, read_model_dir, save_model_dir


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...]
    res_units: int

    def to_json(self) -> dict:
        return {"channels": list(self.channels), "res_units": self.res_units}


def build_unet(config: UNetConfig) -> torch.nn.Module:
    """A 2-D MONAI UNet, RGB in, two classes out, halving the resolution between its levels."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=tuple(config.channels),
                strides=(2,) * (len(config.channels) - 1), num_res_units=config.res_units)


def view_pixels(split: CachedSplit, index: int, view: int) -> np.ndarray:
    """The pixels of cached view `view` of item `index`, made exactly as extract made them for
    the teacher: a dihedral view, a rotated copy (its stored angle), or a stain copy (its stored shift)."""
    image = split.image(index)
    kind, k = split.view_layout.kind(view)
    if kind == "dihedral":
        return apply_view(torch.from_numpy(image).permute(2, 0, 1), k).permute(1, 2, 0).numpy()
    if kind == "rotation":
        return rotate_like_release(image, float(split.group["rotation_angles"][index, k]))
    return apply_shift(image, StainShift.from_array(np.asarray(split.group["stain_shifts"][index, k])))


def pixel_batch(split: CachedSplit, items: list[tuple[int, int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for index, view, op in items:
        x = images_to_model_range(view_pixels(split, index, view)[None])[0]
        images.append(apply_view(x, op))
        masks.append(apply_view(split.mask(index, view), op))
    return torch.stack(images).to(device), torch.stack(masks).long().to(device)


@torch.no_grad()
def predict_pixels(model: torch.nn.Module, split: CachedSplit, device: torch.device,
                   indices: list[int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(argmax masks, ground truths, foreground probabilities) of view 0 of every item."""
    model.eval()
    preds, gts, probs = [], [], []
    for i in range(len(split)) if indices is None else indices:
        x, mask = pixel_batch(split, [(i, 0, 0)], device)
        logits = model(x).float()
        preds.append(logits.argmax(1)[0].cpu().numpy().astype(np.uint8))
        gts.append(mask[0].cpu().numpy().astype(np.uint8))
        probs.append(torch.softmax(logits, 1)[0, 1].cpu().numpy())
    return preds, gts, probs


# ---------------------------------------------------------------- on disk, beside model.json of TextDiff


BASELINE_KINDS = ("classic", "unet")


def save_baseline(out_dir: Path, kind: str, spec: CacheSpec, train: dict, state: dict | None = None,
                  config: UNetConfig | None = None, result=None, nuclei: dict | None = None,
                  val_aji_instance: float = 0.0) -> None:
    """models/classifier/ for a baseline: model.json says which (`kind`), model.pt holds U-Net weights,
    `nuclei` the rule that separates its nuclei (chosen on val)."""
    card = {"kind": kind, "cache_spec": spec.to_json(), "train": train, "nuclei": nuclei or {},
            "val_aji_instance": val_aji_instance,
            "unet": config.to_json() if config is not None else None,
            **({k: getattr(result, k) 
                for k in ("best_epoch", "best_step", "best_val_dice", "best_val_iou", "train_ids")}
               if result is not None else {})}
    save_model_dir(out_dir, card, state)


def load_baseline(model_dir: Path, device: torch.device) -> tuple[str, torch.nn.Module | None, CacheSpec]:
    """(kind, the U-Net or None for classic, the cache spec it was made on)."""
    files = read_model_dir(model_dir)
    if files.kind not in BASELINE_KINDS:
        raise TextDiffError(f"{files.card_path}: holds a TextDiff classifier, not a baseline")
    try:
        spec = CacheSpec.from_json(files.raw.get("cache_spec"), source=str(files.card_path))
        config = (UNetConfig(tuple(files.raw["unet"]["channels"]), int(files.raw["unet"]["res_units"]))
                  if files.kind == "unet" else None)
    except (KeyError, TypeError, ValueError, TextDiffError) as err:
        raise card_problem(files, err) from None
    if config is None:
        return "classic", None, spec
    model = build_unet(config)
    try:
        model.load_state_dict(load_weights(files, "U-Net baseline's"))
    except (RuntimeError, KeyError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise TextDiffError(f"{files.weights_path}: not the U-Net baseline's weights ({reason})") from None
    return "unet", model.to(device).eval(), spec


__all__ = ["BASELINE_KINDS", "UNetConfig", "build_unet", "load_baseline", "predict_pixels",
           "pixel_batch", "save_baseline", "view_pixels"]

