"""Stage two's training loop: the pixel classifier on cached features only.

The teacher never runs here. Every epoch reads the cached (image, view) features, so an epoch costs
the classifier alone; the release recomputes the UNet forward for every image every epoch.
Augmentation uses the cached dihedral views when extract stored them (real teacher features of the
flipped/rotated image) and otherwise flips/rotates features and mask jointly.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from textdiff.cache import CacheSpec, FeatureCache
from textdiff.classifier import ClassifierConfig, PixelClassifier
from textdiff.errors import TextDiffError
from textdiff.inference import SampleStore, batch_of, predict_split
from textdiff.losses import total_loss
from textdiff.metrics import iou_dice_textdiff
from textdiff.params import TrainParams
from textdiff.views import NUM_VIEWS


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_dice: float
    val_iou: float
    seconds: float
    lr: float


@dataclass
class TrainingResult:
    """The best-validation-Dice classifier and what it was trained on."""

    state: dict[str, torch.Tensor]
    config: ClassifierConfig
    best_epoch: int
    best_val_dice: float
    best_val_iou: float
    train_ids: list[str]

    @property
    def num_train(self) -> int:
        return len(self.train_ids)


def labeled_subset(n_total: int, num_labeled: int, seed: int) -> list[int]:
    """The first `num_labeled` images of a seeded permutation (0 = all): nested subsets, so a
    label-efficiency curve adds images rather than swapping them."""
    if num_labeled == 0 or num_labeled >= n_total:
        if num_labeled > n_total:
            raise TextDiffError(f"train.num_labeled is {num_labeled} but the train split has {n_total} images")
        return list(range(n_total))
    perm = np.random.default_rng(seed).permutation(n_total)
    return sorted(int(i) for i in perm[:num_labeled])


def classifier_config(cache: FeatureCache, params: TrainParams) -> ClassifierConfig:
    """The architecture the cache and the train params call for."""
    spec = cache.spec
    return ClassifierConfig(
        block_channels=tuple(cache.block_channels()), num_steps=len(spec.steps), text_dim=spec.text_hidden_size,
        d_model=params.d_model or spec.text_hidden_size, heads=params.heads, fusion=params.fusion,
        out_size=(spec.image_size, spec.image_size), variant=params.classifier, padding_mask=params.padding_mask,
        decoder_norm=params.decoder_norm,
    )


def evaluate_dice(model: PixelClassifier, data: SampleStore, device: torch.device) -> tuple[float, float]:
    """Mean per-image (Dice, IoU) with TextDiff's formula: what picks the best epoch."""
    preds, gts, _ = predict_split(model, data, device)
    scores = [iou_dice_textdiff(p, g) for p, g in zip(preds, gts)]
    return float(np.mean([d for d, _ in scores])), float(np.mean([i for _, i in scores]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_view(augment: str, views: int, rotations: int, rng: np.random.Generator) -> tuple[int, int]:
    """(cached view, dihedral op on the features) for one training image this epoch.

    dihedral: one of the cached dihedral views, or with only one view cached a flip/turn of its
    features (cheaper, but not the teacher's own features of the turned image). release: the
    released code's mix, `random() > 0.5` -> a quarter turn then a flip (which is always one of
    the 4 reflections, views 4-7, each equally likely), else `random() > 0.5` -> a rotation by a
    random angle (one of the cached rotated copies), else the image as it is.
    """
    if augment == "none":
        return 0, 0
    if augment == "dihedral":
        return (int(rng.integers(views)), 0) if views > 1 else (0, int(rng.integers(NUM_VIEWS)))
    if rng.random() > 0.5:
        return 4 + int(rng.integers(4)), 0
    if rng.random() > 0.5:
        return views + int(rng.integers(rotations)), 0
    return 0, 0


def choose_stain_copy(choice: tuple[int, int], spec: CacheSpec, rng: np.random.Generator) -> tuple[int, int]:
    """The image's own colours or one of its `extract.stain_views` stain copies, uniformly.

    The copies are cached in the image's own orientation only, so a geometric choice carries over
    as an op on the copy's features: a cached dihedral view v becomes op v, a flip already chosen
    stays, and a rotated view falls back to the copy as it is.
    """
    k = int(rng.integers(spec.stain_views + 1))
    if k == 0:
        return choice
    view, jitter = choice
    op = view if 0 < view < min(spec.views, NUM_VIEWS) else jitter
    return spec.views + spec.rotations + k - 1, op


def check_augment(augment: str, spec: CacheSpec) -> None:
    """train.augment=release draws cached reflections and rotations: refuse a cache without them."""
    if augment == "release" and (spec.views != NUM_VIEWS or spec.rotations < 1):
        raise TextDiffError(
            f"train.augment=release needs the 8 dihedral views and rotated copies in the cache (it has "
            f"extract.views={spec.views}, extract.rotations={spec.rotations}); set extract.views: 8 and "
            "extract.rotations: 4 (or more) and run extract")


def _train_epoch(model: PixelClassifier, data: SampleStore, optimizer: torch.optim.Optimizer, params: TrainParams,
                 spec: CacheSpec, rng: np.random.Generator, device: torch.device, bar_desc: str,
                 progress: bool) -> float:
    """One pass over the labelled images in a seeded order; returns the mean loss."""
    model.train()
    order = rng.permutation(len(data))
    losses = []
    bar = tqdm(range(0, len(order), params.batch_size), desc=bar_desc, unit="batch", leave=False,
               disable=not progress, dynamic_ncols=True)
    for start in bar:
        positions = [int(p) for p in order[start : start + params.batch_size]]
        choices = [choose_view(params.augment, spec.views, spec.rotations, rng) for _ in positions]
        if spec.stain_views and params.augment != "none":
            choices = [choose_stain_copy(c, spec, rng) for c in choices]
        chunk = [data.get_view(p, v) for p, (v, _) in zip(positions, choices)]
        feats, mask, tokens, text_mask, pooled = batch_of(chunk, [0] * len(chunk), [j for _, j in choices], device)
        out = model(feats, tokens, text_mask, pooled)
        loss, parts = total_loss(out, mask, params.dice_weight, params.contrastive_weight,
                                 dice_on="logits" if params.classifier == "release" else "probabilities")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(parts["total"])
        bar.set_postfix(loss=f"{parts['total']:.4f}")
    return float(np.mean(losses))


def train_classifier(
    cache: FeatureCache,
    params: TrainParams,
    device: torch.device,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train for `params.epochs`; keep the weights of the best validation Dice."""
    seed_everything(params.seed)
    check_augment(params.augment, cache.spec)
    train_split, val_split = cache.split("train"), cache.split("val")
    indices = labeled_subset(len(train_split), params.num_labeled, params.seed)
    train_data, val_data = SampleStore(train_split, indices), SampleStore(val_split)
    config = classifier_config(cache, params)
    model = PixelClassifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(params.milestones), gamma=params.gamma)
    rng = np.random.default_rng(params.seed)

    best = TrainingResult(state={}, config=config, best_epoch=0, best_val_dice=-1.0, best_val_iou=0.0,
                          train_ids=[train_split.ids[i] for i in indices])
    for epoch in range(1, params.epochs + 1):
        started = time.perf_counter()
        loss = _train_epoch(model, train_data, optimizer, params, train_split.spec, rng, device,
                            f"epoch {epoch}/{params.epochs}", progress)
        scheduler.step()
        val_dice, val_iou = evaluate_dice(model, val_data, device)
        record = EpochRecord(epoch, loss, val_dice, val_iou, time.perf_counter() - started,
                             optimizer.param_groups[0]["lr"])
        if val_dice > best.best_val_dice:
            best.best_epoch, best.best_val_dice, best.best_val_iou = epoch, val_dice, val_iou
            best.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if progress:
            print(f"epoch {epoch:3d}  loss {loss:.4f}  val dice {val_dice:.4f}  iou {val_iou:.4f}  "
                  f"{record.seconds:.1f}s" + ("  *" if best.best_epoch == epoch else ""))
        if on_epoch is not None:
            on_epoch(record)
    return best
