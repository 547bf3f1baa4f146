"""Stage two's training loop: the pixel classifier on cached features only.

The teacher never runs here. Every epoch reads the cached (image, view) features, so an epoch costs
the classifier alone; the release recomputes the UNet forward for every image every epoch.
Augmentation uses the cached dihedral views when extract stored them (real teacher features of the
flipped/rotated image) and otherwise flips/rotates features and mask jointly.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from textdiff.cache import CachedSplit, FeatureCache
from textdiff.classifier import PixelClassifier
from textdiff.errors import TextDiffError
from textdiff.losses import total_loss
from textdiff.metrics import iou_dice_textdiff
from textdiff.params import TrainParams
from textdiff.views import NUM_VIEWS, apply_view

PRELOAD_BYTES = 6 * 2**30  # keep a split in RAM below this: zarr decompression would dominate an epoch


@dataclass
class Sample:
    features: list[torch.Tensor]  # per block [views, steps, C, H, W]
    mask: torch.Tensor  # [views, H, W] uint8
    tokens: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor


class SplitData:
    """One split's samples, in RAM when small enough, else read from zarr on demand."""

    def __init__(self, split: CachedSplit, indices: list[int] | None = None):
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)
        per_image = sum(int(np.prod(split.group[f"block_{b}"].shape[1:])) * 2 for b in split.blocks)
        self.cached: dict[int, Sample] | None = {} if per_image * len(self.indices) < PRELOAD_BYTES else None

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int) -> Sample:
        i = self.indices[position]
        if self.cached is not None and i in self.cached:
            return self.cached[i]
        tokens, text_mask, pooled = self.split.text(i)
        sample = Sample(self.split.features(i), self.split.mask(i), tokens, text_mask, pooled)
        if self.cached is not None:
            self.cached[i] = sample
        return sample


def labeled_subset(n_total: int, num_labeled: int, seed: int) -> list[int]:
    """The first `num_labeled` images of a seeded permutation (0 = all): nested subsets, so a
    label-efficiency curve adds images rather than swapping them."""
    if num_labeled == 0 or num_labeled >= n_total:
        if num_labeled > n_total:
            raise TextDiffError(f"train.num_labeled is {num_labeled} but the train split has {n_total} images")
        return list(range(n_total))
    perm = np.random.default_rng(seed).permutation(n_total)
    return sorted(int(i) for i in perm[:num_labeled])


def batch_of(samples: list[Sample], views: list[int], jitter: list[int], device: torch.device):
    """Stack samples (one chosen cached view each, then an optional tensor-level dihedral op)."""
    feats = []
    for k in range(len(samples[0].features)):
        per = [apply_view(s.features[k][v], j) for s, v, j in zip(samples, views, jitter)]
        feats.append(torch.stack(per).to(device, non_blocking=True))
    mask = torch.stack([apply_view(s.mask[v], j) for s, v, j in zip(samples, views, jitter)])
    tokens = torch.stack([s.tokens for s in samples]).to(device)
    text_mask = torch.stack([s.text_mask for s in samples]).to(device)
    pooled = torch.stack([s.pooled for s in samples]).to(device)
    return feats, mask.long().to(device), tokens, text_mask, pooled


def build_classifier(cache: FeatureCache, params: TrainParams, image_size: int) -> tuple[PixelClassifier, dict]:
    kwargs = dict(
        block_channels=cache.block_channels(),
        num_steps=cache.num_steps,
        text_dim=cache.text_dim,
        d_model=params.d_model or cache.text_dim,
        heads=params.heads,
        fusion=params.fusion,
        out_size=image_size,
    )
    return PixelClassifier(**kwargs), kwargs


@torch.no_grad()
def predict_split(model: PixelClassifier, data: SplitData, device: torch.device,
                  keep_probs: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Argmax masks (and foreground probabilities) of view 0 of every image."""
    model.eval()
    preds, gts, probs = [], [], []
    for p in range(len(data)):
        s = data.get(p)
        feats, mask, tokens, text_mask, pooled = batch_of([s], [0], [0], device)
        logits = model(feats, tokens, text_mask, pooled)["logits"].float()
        preds.append(logits.argmax(1)[0].cpu().numpy().astype(np.uint8))
        gts.append(mask[0].cpu().numpy().astype(np.uint8))
        if keep_probs:
            probs.append(torch.softmax(logits, 1)[0, 1].cpu().numpy())
    return preds, gts, probs


def evaluate_dice(model: PixelClassifier, data: SplitData, device: torch.device) -> tuple[float, float]:
    preds, gts, _ = predict_split(model, data, device)
    scores = [iou_dice_textdiff(p, g) for p, g in zip(preds, gts)]
    return float(np.mean([d for d, _ in scores])), float(np.mean([i for _, i in scores]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_classifier(
    cache: FeatureCache,
    params: TrainParams,
    device: torch.device,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train for `params.epochs`; returns the best-validation-Dice weights and the history."""
    seed_everything(params.seed)
    train_split, val_split = cache.split("train"), cache.split("val")
    image_size = int(train_split.group["masks"].shape[-1])
    indices = labeled_subset(len(train_split), params.num_labeled, params.seed)
    train_data, val_data = SplitData(train_split, indices), SplitData(val_split)
    model, kwargs = build_classifier(cache, params, image_size)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(params.milestones), gamma=params.gamma)
    rng = np.random.default_rng(params.seed)
    views = train_split.views

    best = {"dice": -1.0, "iou": 0.0, "epoch": 0, "state": None}
    history = []
    for epoch in range(1, params.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = rng.permutation(len(train_data))
        losses = []
        bar = tqdm(range(0, len(order), params.batch_size), desc=f"epoch {epoch}/{params.epochs}",
                   unit="batch", leave=False, disable=not progress, dynamic_ncols=True)
        for start in bar:
            chunk = [train_data.get(int(p)) for p in order[start : start + params.batch_size]]
            if params.augment:
                vs = [int(rng.integers(views)) for _ in chunk]
                js = [0 if views > 1 else int(rng.integers(NUM_VIEWS)) for _ in chunk]
            else:
                vs, js = [0] * len(chunk), [0] * len(chunk)
            feats, mask, tokens, text_mask, pooled = batch_of(chunk, vs, js, device)
            out = model(feats, tokens, text_mask, pooled)
            loss, parts = total_loss(out, mask, params.dice_weight, params.contrastive_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(parts["total"])
            bar.set_postfix(loss=f"{parts['total']:.4f}")
        scheduler.step()
        val_dice, val_iou = evaluate_dice(model, val_data, device)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": val_dice,
                  "val_iou": val_iou, "seconds": time.perf_counter() - started,
                  "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        if val_dice > best["dice"]:
            best.update(dice=val_dice, iou=val_iou, epoch=epoch,
                        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        if progress:
            print(f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  val dice {val_dice:.4f}  "
                  f"iou {val_iou:.4f}  {record['seconds']:.1f}s" + ("  *" if best["epoch"] == epoch else ""))
        if on_epoch is not None:
            on_epoch(epoch, record)
    return {"state": best["state"], "kwargs": kwargs, "best_epoch": best["epoch"], "best_val_dice": best["dice"],
            "best_val_iou": best["iou"], "history": history, "num_train": len(indices),
            "train_ids": [train_split.ids[i] for i in indices]}


def load_classifier(state: dict, kwargs: dict, device: torch.device) -> PixelClassifier:
    model = PixelClassifier(**copy.deepcopy(kwargs))
    model.load_state_dict(state)
    return model.to(device).eval()
