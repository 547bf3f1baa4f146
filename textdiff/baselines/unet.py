"""The U-Net baseline: MONAI's `UNet` on the labelled images' pixels (trained by `training.train_unet`).

What a reader of a label-efficiency claim asks first is "better than a plain U-Net given the same
labels?". So this baseline shares everything with the pixel classifier except its input: the same
labelled subset (`train.num_labeled`, `train.seed`), the same schedule (`train.epochs` or
`train.steps`), augmentation (`train.augment` draws the same cached views, rebuilt here from the
pixels exactly as extract made them for the teacher: dihedral, rotated and stain copies), the same
loss (CE + `train.dice_weight` x soft Dice) and the same selection (best validation Dice). It reads
the images and masks that the cache already holds, so the teacher never runs for it. The network
is `monai.networks.nets.UNet` (the medical-imaging community's reference implementation), not ours.

It also learns the same instance target (`train.target`, resolved as for the classifier): a third
output channel regresses each nucleus' distance map beside the two class logits, so its nuclei are
seeded by the same watershed of its own distance peaks, and it is scored over the same test-time
views (`extract.eval_views`, the dihedral views of its pixels) as the classifier's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import CachedSplit
from textdiff.data.stain import StainShift, apply_shift
from textdiff.data.views import apply_view, mean_of_views, rotate_like_release, undo_view
from textdiff.encoders.image import images_to_model_range
from textdiff.errors import TextDiffError
from textdiff.model.card import card_problem, load_weights, read_model_dir, save_model_dir


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...]
    res_units: int
    distance_head: bool = False  # a third output channel: the instance target (train.target: distance)

    def to_json(self) -> dict:
        return {"channels": list(self.channels), "res_units": self.res_units, "distance_head": self.distance_head}


def build_unet(config: UNetConfig) -> torch.nn.Module:
    """A 2-D MONAI UNet, RGB in, two class logits (+ the distance logit) out, halving the resolution
    between its levels. MONAI's module itself, unwrapped, so its state dict is MONAI's."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=3 if config.distance_head else 2,
                channels=tuple(config.channels), strides=(2,) * (len(config.channels) - 1),
                num_res_units=config.res_units)


def unet_outputs(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The U-Net's output channels as the classifier's output dict: "logits" [B, 2, H, W], and with
    the head "distance_logits" [B, 1, H, W], so the loss, the maps and the watershed are shared."""
    out = {"logits": y[:, :2]}
    if y.shape[1] > 2:
        out["distance_logits"] = y[:, 2:3]
    return out


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


def pixel_batch(split: CachedSplit, items: list[tuple[int, int, int]], device: torch.device,
                with_distance: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images in the model's range, masks, and with `with_distance` the instance targets) of
    (item, cached view, dihedral op) triples."""
    images, masks, distances = [], [], []
    for index, view, op in items:
        x = images_to_model_range(view_pixels(split, index, view)[None])[0]
        images.append(apply_view(x, op))
        masks.append(apply_view(split.mask(index, view), op))
        if with_distance:
            distances.append(apply_view(split.distance(index, view), op))
    distance = torch.stack(distances).float().to(device) if with_distance else None
    return torch.stack(images).to(device), torch.stack(masks).long().to(device), distance


@torch.no_grad()
def predict_pixels(model: torch.nn.Module, split: CachedSplit, device: torch.device,
                   indices: list[int] | None = None, views: int = 1, distances: list | None = None,
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(masks, ground truths, foreground probabilities) of every item; a list passed as `distances`
    receives each item's predicted distance map (None without the head).

    One view: the argmax of the image itself, as validation selects the epoch. `views` > 1: the
    maps of the image's first `views` dihedral views, turned back and averaged, the mask
    `probability > 0.5`: the test-time augmentation the classifier gets (`predict_split`)."""
    model.eval()
    preds, gts, probs = [], [], []
    for i in range(len(split)) if indices is None else indices:
        x = images_to_model_range(split.image(i)[None]).to(device)
        view_maps, argmax = [], None
        for view in range(views):
            out = unet_outputs(model(apply_view(x, view)).float())
            if views == 1:
                argmax = out["logits"].argmax(1)[0]
            head = out.get("distance_logits")
            view_maps.append((undo_view(torch.softmax(out["logits"], 1)[0, 1], view),
                              None if head is None else undo_view(torch.sigmoid(head)[0, 0], view)))
        prob, distance = mean_of_views(view_maps)
        preds.append((argmax if argmax is not None else prob > 0.5).cpu().numpy().astype(np.uint8))
        gts.append(split.mask(i, 0).numpy().astype(np.uint8))
        probs.append(prob.cpu().numpy())
        if distances is not None:
            distances.append(None if distance is None else distance.cpu().numpy())
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
        config = (UNetConfig(tuple(files.raw["unet"]["channels"]), int(files.raw["unet"]["res_units"]),
                             bool(files.raw["unet"].get("distance_head", False)))
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
           "pixel_batch", "save_baseline", "unet_outputs", "view_pixels"]

