"""Stage two's training loop: the pixel classifier on cached features only.

The teacher never runs here. Every epoch reads the cached (image, view) features, so an epoch costs
the classifier alone; the release recomputes the UNet forward for every image every epoch.
Augmentation uses the cached dihedral views when extract stored them (real teacher features of the
flipped/rotated image) and otherwise flips/rotates features and mask jointly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from textdiff.baselines.unet import UNetConfig, build_unet, pixel_batch, predict_pixels, unet_outputs
from textdiff.cache.samples import SampleStore, batch_of, distance_batch
from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import FeatureCache
from textdiff.data.views import NUM_VIEWS, ViewLayout
from textdiff.errors import TextDiffError
from textdiff.evaluation.metrics import iou_dice_textdiff
from textdiff.model.classifier import ClassifierConfig, PixelClassifier
from textdiff.model.inference import predict_split
from textdiff.model.losses import total_loss
from textdiff.params import BaselineParams, TrainParams
from textdiff.runtime.device import resolve_autocast
from textdiff.runtime.distributed import Ranks, Share, data_parallel, local_share, summed_over_ranks
from textdiff.train.resume import Checkpoint, random_states, records_to_json, set_random_states


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_dice: float
    val_iou: float
    seconds: float
    lr: float
    step: int = 0  # optimisation steps done when it was recorded


@dataclass
class TrainingResult:
    """The best-validation-Dice classifier and what it was trained on."""

    state: dict[str, torch.Tensor]
    config: ClassifierConfig
    best_epoch: int
    best_val_dice: float
    best_val_iou: float
    train_ids: list[str]
    best_step: int = 0
    resumed_step: int = 0  # > 0: this run continued a checkpoint saved after that many steps

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


def classifier_config(cache: FeatureCache, params: TrainParams, device: torch.device) -> ClassifierConfig:
    """The architecture the cache and the train params call for, computing in the dtype
    `train.autocast` resolves to on `device` (what model.json records)."""
    spec = cache.spec
    return ClassifierConfig(
        block_channels=tuple(cache.block_channels()), num_steps=len(spec.steps), text_dim=spec.text_hidden_size,
        d_model=params.d_model or spec.text_hidden_size, heads=params.heads, fusion=params.fusion,
        out_size=(spec.image_size, spec.image_size), variant=params.classifier, padding_mask=params.padding_mask,
        decoder_norm=params.decoder_norm, distance_head=resolved_target(params.target, spec) == "distance",
        distance_decoder=params.distance_decoder, autocast=resolve_autocast(params.autocast, device),
    )


def resolved_target(target: str, spec: CacheSpec) -> str:
    """train.target as trained: `auto` is `distance` where the cache holds per-nucleus ground
    truth and `binary` where it does not (prepare said so once), so a dataset of masks alone still
    trains with the default params."""
    if target == "auto":
        return "distance" if spec.instances else "binary"
    return target


def check_target(target: str, spec: CacheSpec) -> None:
    """train.target=distance learns from per-nucleus ground truth: refuse a cache without it."""
    if target == "distance" and not spec.instances:
        raise TextDiffError("train.target=distance needs per-nucleus ground truth, which this cache does not hold: "
                            "point data.instances at a folder of instance maps and run prepare and extract, or "
                            "set train.target: binary")


def check_text(fusion: str, texts: list[str]) -> None:
    """A fusion that reads the report needs one per image: a dataset without reports (the folder
    layout without reports.csv) trains image-only, and says so before any work."""
    if fusion != "none" and texts and not any(texts):
        raise TextDiffError(f"train.fusion={fusion} reads each image's report, but the dataset has none (no "
                            "reports.csv in data.root): set train.fusion: none, or add the reports")


def evaluate_dice(model: PixelClassifier, data: SampleStore, device: torch.device) -> tuple[float, float]:
    """The classifier's validation (Dice, IoU)."""
    preds, gts, _ = predict_split(model, data, device)
    return mean_scores(preds, gts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_view(augment: str, layout: ViewLayout, rng: np.random.Generator) -> tuple[int, int]:
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
        dihedral = layout.dihedral
        return (int(rng.integers(dihedral)), 0) if dihedral > 1 else (0, int(rng.integers(NUM_VIEWS)))
    if rng.random() > 0.5:
        return 4 + int(rng.integers(4)), 0
    if rng.random() > 0.5:
        return layout.rotation(int(rng.integers(layout.rotations))), 0
    return 0, 0


def choose_stain_copy(choice: tuple[int, int], layout: ViewLayout, rng: np.random.Generator) -> tuple[int, int]:
    """The image's own colours or one of its `extract.stain_views` stain copies, uniformly.

    The copies are cached in the image's own orientation only, so a geometric choice carries over
    as an op on the copy's features: a cached dihedral view v becomes op v, a flip already chosen
    stays, and a rotated view falls back to the copy as it is.
    """
    k = int(rng.integers(layout.stain + 1))
    if k == 0:
        return choice
    view, jitter = choice
    op = view if view > 0 and layout.kind(view)[0] == "dihedral" else jitter
    return layout.stain_copy(k - 1), op


def check_augment(augment: str, spec: CacheSpec) -> None:
    """train.augment=release draws cached reflections and rotations: refuse a cache without them."""
    if augment == "release" and (spec.views != NUM_VIEWS or spec.rotations < 1):
        raise TextDiffError(
            f"train.augment=release needs the 8 dihedral views and rotated copies in the cache (it has "
            f"extract.views={spec.views}, extract.rotations={spec.rotations}); set extract.views: 8 and "
            "extract.rotations: 4 (or more) and run extract")


@dataclass(frozen=True)
class Schedule:
    """How long training runs and when it validates: `epochs` passes over the labelled items
    (validating after each), or with `train.steps` a fixed number of optimisation steps whatever
    the number of labels (validating every `train.val_every` steps), so that a 1-image and a
    24-image run get the same optimisation budget."""

    total_steps: int
    val_every: int
    unit: str  # "epoch" or "round": what one validation interval is called

    @property
    def rounds(self) -> int:
        return -(-self.total_steps // self.val_every)


def schedule_for(params: TrainParams, n_items: int) -> Schedule:
    per_pass = -(-n_items // params.batch_size)
    if params.steps:
        return Schedule(params.steps, min(params.val_every, params.steps), "round")
    return Schedule(params.epochs * per_pass, per_pass, "epoch")


Batch = list[tuple[int, int, int]]  # (position in the labelled set, cached view, dihedral op on it)


def draw_batches(n_items: int, params: TrainParams, spec: CacheSpec, rng: np.random.Generator) -> Iterator[Batch]:
    """Endless seeded batches: a fresh permutation of the labelled items per pass, and each item's
    view (`choose_view`, then `choose_stain_copy`) drawn as its batch is taken."""
    while True:
        order = rng.permutation(n_items)
        for start in range(0, n_items, params.batch_size):
            positions = [int(p) for p in order[start : start + params.batch_size]]
            layout = spec.view_layout
            choices = [choose_view(params.augment, layout, rng) for _ in positions]
            if layout.stain and params.augment != "none":
                choices = [choose_stain_copy(c, layout, rng) for c in choices]
            yield [(p, v, j) for p, (v, j) in zip(positions, choices)]


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, schedule: Schedule,
        batches: Iterator[Batch], step: Callable[[Batch], float], validate: Callable[[], tuple[float, float]],
        result: TrainingResult, on_epoch: Callable[[EpochRecord], None] | None = None,
        progress: bool = True, checkpoint: Checkpoint | None = None) -> TrainingResult:
    """The loop every trained model shares (the pixel classifier and the U-Net baseline): `step`
    takes one batch and returns its loss; after every `schedule.val_every` steps (and the last) the
    lr schedule advances and `validate` gives (Dice, IoU); the best validation Dice's weights win.

    With a `checkpoint`, every round's end is saved, and a saved state of this very run is
    continued: the rounds already done are replayed into `on_epoch` (the curves are whole again),
    the batch stream is advanced to the step reached, and training goes on bit for bit."""
    done, first, records = 0, 1, []
    blob = checkpoint.load() if checkpoint is not None else None
    if blob is not None:
        done, first, records = _restore(blob, model, optimizer, scheduler, result, batches)
        result.resumed_step = done
        if progress:
            print(f"train: resuming after {schedule.unit} {first - 1}/{schedule.rounds} (step {done}) from "
                  f"{checkpoint.path}")
        if on_epoch is not None:  # the curves whole again
            for record in records:
                on_epoch(record)
    for rnd in range(first, schedule.rounds + 1):
        started = time.perf_counter()
        model.train()
        n = min(schedule.val_every, schedule.total_steps - done)
        bar = tqdm(range(n), desc=f"{schedule.unit} {rnd}/{schedule.rounds}", unit="batch", leave=False,
                   disable=not progress, dynamic_ncols=True)
        losses = []
        for _ in bar:
            losses.append(step(next(batches)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done += n
        scheduler.step()
        val_dice, val_iou = validate()
        record = EpochRecord(rnd, float(np.mean(losses)), val_dice, val_iou, time.perf_counter() - started,
                             optimizer.param_groups[0]["lr"], done)
        if val_dice > result.best_val_dice:
            result.best_epoch, result.best_step = rnd, done
            result.best_val_dice, result.best_val_iou = val_dice, val_iou
            result.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if progress:
            print(f"{schedule.unit} {rnd:3d}  step {done:5d}  loss {record.train_loss:.4f}  val dice {val_dice:.4f}  "
                  f"iou {val_iou:.4f}  {record.seconds:.1f}s" + ("  *" if result.best_epoch == rnd else ""))
        records.append(record)
        if checkpoint is not None:
            checkpoint.save({
                "round": rnd, "step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "random": random_states(), "records": records_to_json(records),
                "best": {"epoch": result.best_epoch, "step": result.best_step, "val_dice": result.best_val_dice,
                         "val_iou": result.best_val_iou, "state": result.state},
            })
        if on_epoch is not None:
            on_epoch(record)
    return result


def _restore(blob: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             result: TrainingResult, batches: Iterator[Batch]) -> tuple[int, int, list[EpochRecord]]:
    """Load a checkpoint's state into this run; returns (steps done, the next round, the records
    of the rounds done)."""
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    best = blob["best"]
    result.best_epoch, result.best_step = int(best["epoch"]), int(best["step"])
    result.best_val_dice, result.best_val_iou = float(best["val_dice"]), float(best["val_iou"])
    result.state = dict(best["state"])
    for _ in range(int(blob["step"])):  # the same draws as the steps already taken
        next(batches)
    set_random_states(blob["random"])
    return int(blob["step"]), int(blob["round"]) + 1, [EpochRecord(**raw) for raw in blob["records"]]


def distributed_loss(share: Share, ranks: Ranks) -> dict:
    """total_loss's keywords for this rank's part of a batch (none for a single process)."""
    if ranks.world == 1:
        return {}
    return {"mean_weight": share.mean_weight,
            "reduce_sums": lambda sums: summed_over_ranks(sums * share.sums_weight)}


def check_distributed(params: TrainParams, ranks: Ranks, running_norm: bool = False) -> None:
    """What DistributedDataParallel needs to train exactly what one process trains."""
    if ranks.world == 1:
        return
    if params.batch_size % ranks.world:
        raise TextDiffError(f"train.batch_size ({params.batch_size}) must be a multiple of the {ranks.world} "
                            "processes: each takes an equal part of every batch")
    if running_norm:
        raise TextDiffError("train.decoder_norm=running takes batch statistics over the whole batch during training; "
                            "under torchrun use decoder_norm: image (per-image statistics)")


# (outputs with "logits", mask, instance target or None)
Forward = Callable[[torch.nn.Module, Batch], tuple[dict, torch.Tensor, torch.Tensor | None]]


def train_model(spec: CacheSpec, params: TrainParams, device: torch.device, build: Callable[[], torch.nn.Module],
                lr: float, forward: Forward, validate: Callable[[torch.nn.Module], tuple[float, float]],
                result: TrainingResult, n_items: int, contrastive_weight: float = 0.0,
                dice_on: str = "probabilities", running_norm: bool = False,
                on_epoch: Callable[[EpochRecord], None] | None = None, progress: bool = True,
                ranks: Ranks = Ranks(), checkpoint: Checkpoint | None = None) -> TrainingResult:
    """The set-up and the optimisation step every trained model shares (the pixel classifier and
    the U-Net baseline differ only in `build`, `lr`, `forward` and `validate`): seeded init, Adam
    with the milestone schedule, this rank's part of every batch, CE + Dice (+ contrastive), and
    `fit`'s validation and selection. `forward(model, items)` turns this rank's (position, view, op)
    items into (outputs with "logits", mask, instance target or None); with `train.target: distance`
    the distance head's error joins the loss.

    Under torchrun every rank draws the same global batches and takes its own part of each; DDP
    averages the gradients and the batch Dice's sums are all-reduced, so N processes train what one
    process with the same `train.batch_size` trains, up to the order of floating-point sums."""
    seed_everything(params.seed)
    check_augment(params.augment, spec)
    check_distributed(params, ranks, running_norm)
    model = build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(params.milestones), gamma=params.gamma)
    rng = np.random.default_rng(params.seed)
    schedule = schedule_for(params, n_items)
    parallel = data_parallel(model, ranks, device)

    def step(batch: Batch) -> float:
        share = local_share(batch, ranks)
        out, mask, distance = forward(parallel, share.items)
        weight = params.distance_weight if "distance_logits" in out else 0.0
        loss, parts = total_loss(out, mask, params.dice_weight, contrastive_weight, dice_on=dice_on,
                                 distance=distance, distance_weight=weight, **distributed_loss(share, ranks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return parts["total"]

    return fit(model, optimizer, scheduler, schedule, draw_batches(n_items, params, spec, rng), step,
               lambda: validate(model), result, on_epoch, progress and ranks.main, checkpoint)


def mean_scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    """Mean per-image (Dice, IoU) with TextDiff's formula: what picks the best epoch."""
    scores = [iou_dice_textdiff(p, g) for p, g in zip(preds, gts)]
    return float(np.mean([d for d, _ in scores])), float(np.mean([i for _, i in scores]))


def train_classifier(cache: FeatureCache, params: TrainParams, device: torch.device,
                     on_epoch: Callable[[EpochRecord], None] | None = None, progress: bool = True,
                     ranks: Ranks = Ranks(), checkpoint: Checkpoint | None = None) -> TrainingResult:
    """The pixel classifier on the cached features, for the schedule (`train.epochs`, or
    `train.steps`); the best validation Dice's weights are kept."""
    check_target(params.target, cache.spec)
    train_split, val_split = cache.split("train"), cache.split("val")
    check_text(params.fusion, train_split.texts)
    indices = labeled_subset(len(train_split), params.num_labeled, params.seed)
    train_data, val_data = SampleStore(train_split, indices), SampleStore(val_split, views=1)  # selection reads view 0
    config = classifier_config(cache, params, device)

    def forward(model: torch.nn.Module, items: Batch) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        chunk = [train_data.get_view(p, v) for p, v, _ in items]
        views, ops = [0] * len(chunk), [j for _, _, j in items]
        feats, mask, tokens, text_mask, pooled = batch_of(chunk, views, ops, device)
        distance = distance_batch(chunk, views, ops, device) if config.distance_head else None
        return model(feats, tokens, text_mask, pooled), mask, distance

    result = TrainingResult(state={}, config=config, best_epoch=0, best_val_dice=-1.0, best_val_iou=0.0,
                            train_ids=[train_split.ids[i] for i in indices])
    return train_model(cache.spec, params, device, lambda: PixelClassifier(config), params.lr, forward,
                       lambda model: evaluate_dice(model, val_data, device), result, len(indices),
                       params.contrastive_weight, "logits" if params.classifier == "release" else "probabilities",
                       params.decoder_norm == "running", on_epoch, progress, ranks, checkpoint)


def train_unet(cache: FeatureCache, params: TrainParams, baseline: BaselineParams, device: torch.device,
               on_epoch: Callable[[EpochRecord], None] | None = None, progress: bool = True,
               ranks: Ranks = Ranks(), checkpoint: Checkpoint | None = None) -> TrainingResult:
    """The U-Net on the same labelled images, views, schedule, selection and instance target
    (`train.target`) as the classifier."""
    check_target(params.target, cache.spec)
    train_split, val_split = cache.split("train"), cache.split("val")
    indices = labeled_subset(len(train_split), params.num_labeled, params.seed)
    config = UNetConfig(tuple(baseline.channels), baseline.res_units,
                        distance_head=resolved_target(params.target, cache.spec) == "distance")

    def forward(model: torch.nn.Module, items: Batch) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        x, mask, distance = pixel_batch(train_split, [(indices[p], v, j) for p, v, j in items], device,
                                        with_distance=config.distance_head)
        return unet_outputs(model(x)), mask, distance

    def validate(model: torch.nn.Module) -> tuple[float, float]:
        preds, gts, _ = predict_pixels(model, val_split, device)
        return mean_scores(preds, gts)

    result = TrainingResult(state={}, config=config, best_epoch=0, best_val_dice=-1.0, best_val_iou=0.0,  # type: ignore[arg-type]
                            train_ids=[train_split.ids[i] for i in indices])
    return train_model(cache.spec, params, device, lambda: build_unet(config), baseline.lr, forward, validate,
                       result, len(indices), on_epoch=on_epoch, progress=progress, ranks=ranks,
                       checkpoint=checkpoint)
