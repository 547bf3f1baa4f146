"""Training the Cellpose baseline (`baseline.kind: cellpose`) and choosing its thresholds on val.

What is shared with every other model: the labelled subset (`train.num_labeled`, `train.seed`,
through `labeled_subset`), the validation split, the per-nucleus ground truth and the rule that
knobs are chosen on val by mean instance AJI, never on test. What is Cellpose's own: its training
loop, schedule and augmentation (`baselines.cellpose.fit`), and its resolution: it trains and
predicts on the source images (`data.sources`), as its authors and the MoNuSeg challenge ran it.
Why not the cached working-size images: the issue's peer (AJI 63.1) is Cellpose at the source
resolution, which is how its authors run it. At 256² (for 1000² sources) a nucleus is about 6 px
across; cellpose would enlarge those images ~5x to its 30-px nuclei, so its network would see as
many pixels as at the source size (no saving) but interpolated ones, and its labels would have to
be brought back to 1000² by an upsampling of ours: a perfect 256² label map scores AJI 0.64 / PQ
0.57 brought back by nearest neighbour (cellpose's own mask resize), 0.92 / 0.90 with a bilinear
foreground and each pixel given its nearest label (mean of four test images' true maps).

The diameter cellpose rescales by at inference is the median equivalent diameter of the labelled
training nuclei (its size model, which needs pretrained weights, is never used). Cellpose has no
validation selection of its own: the network after the last epoch is kept, as its loop does.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.baselines.cellpose import (
    CellposeConfig,
    CellposeRule,
    Losses,
    build_cellpose,
    fit,
    flows,
    import_cellpose,
    nuclei,
)
from textdiff.cache.spec import CacheSpec
from textdiff.cache.store import CachedSplit, FeatureCache
from textdiff.data.sources import source_images
from textdiff.errors import TextDiffError
from textdiff.evaluation.instances import scored_truths
from textdiff.evaluation.metrics import instance_scores
from textdiff.params import BaselineParams, TrainParams
from textdiff.runtime.device import usable_cpus
from textdiff.train.training import labeled_subset, seed_everything

# The searched thresholds, cellpose's defaults first (they win ties): the cell-probability logit a
# pixel needs to be followed, and the flow error above which a mask is dropped.
CELLPROB_THRESHOLDS = (0.0, -0.5, 0.5, -1.0, 1.0)
FLOW_THRESHOLDS = (0.4, 0.2, 0.6, 0.8)


def check_cellpose(spec: CacheSpec, params: TrainParams) -> None:
    """What the Cellpose baseline needs, checked before any work: per-nucleus ground truth, the
    source images' size, and the package itself."""
    if not spec.instances:
        raise TextDiffError("baseline.kind=cellpose trains on per-nucleus labels, which this cache does not hold: "
                            "point data.instances at a folder of instance maps and run prepare and extract")
    if not spec.full_size:
        raise TextDiffError("baseline.kind=cellpose works at the source resolution, which this cache does not record "
                            "(images of several sizes); run prepare and extract with square images of one size")
    if spec.tiled and params.num_labeled:
        raise TextDiffError("baseline.kind=cellpose counts train.num_labeled in whole images, the other models in "
                            "windows under data.mode=tiles: use data.mode: resize for label-efficiency runs")
    import_cellpose()


def source_ids(split: CachedSplit) -> list[str]:
    """The ids of the split's source images (in tiles mode the cached items are their windows)."""
    return split.tile_layout()[0] if split.spec.tiled else split.ids


def training_diameter(labels: list[np.ndarray]) -> float:
    """Median equivalent diameter (px, sqrt(4 area / pi)) of every nucleus in `labels`, pooled."""
    areas = np.concatenate([np.bincount(np.asarray(lab).ravel())[1:] for lab in labels])
    areas = areas[areas > 0]
    if not areas.size:
        raise TextDiffError("baseline.kind=cellpose: the labelled training images hold no nucleus")
    return float(np.median(np.sqrt(4.0 * areas / np.pi)))


@dataclass(frozen=True)
class ThresholdChoice:
    rule: CellposeRule
    aji: float  # mean validation AJI of the chosen thresholds
    pq: float  # and their mean validation PQ
    tried: list[tuple[float, float, float, float]]  # (cellprob, flow, mean val AJI, mean val PQ), in search order

    def tried_json(self) -> list[dict]:
        return [{"cellprob_threshold": c, "flow_threshold": f, "aji_instance": round(a, 6), "pq_instance": round(q, 6)}
                for c, f, a, q in self.tried]


def choose_thresholds(model, images: list[np.ndarray], truths: list[np.ndarray], diameter: float,
                      device: torch.device) -> ThresholdChoice:
    """The thresholds of best mean AJI on the validation images, by coordinate search from
    cellpose's defaults: the cell-probability threshold at its default flow threshold, then the
    flow threshold at the best of those (ties: the default). The network runs once per image; only
    the dynamics run per pair (the whole grid would cost 2.5 times as many: minutes on a CPU)."""
    maps = [flows(model, image, diameter) for image in images]
    tried: list[tuple[float, float, float, float]] = []

    def mean_aji(pool: ThreadPoolExecutor, cellprob: float, flow: float) -> float:
        rule = CellposeRule(diameter, cellprob, flow)
        scores = list(pool.map(lambda k: instance_scores(nuclei(maps[k], rule, device), truths[k]), range(len(maps))))
        tried.append((cellprob, flow, float(np.mean([s["aji_instance"] for s in scores])),
                      float(np.mean([s["pq_instance"] for s in scores]))))
        return tried[-1][2]

    # The images of one pair on a thread pool: the dynamics release the GIL for most of their time,
    # and each image is scored on its own, so the choice is the sequential search's.
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        by_cellprob = {c: mean_aji(pool, c, FLOW_THRESHOLDS[0]) for c in CELLPROB_THRESHOLDS}
        cellprob = max(by_cellprob, key=by_cellprob.__getitem__)
        by_flow = {f: by_cellprob[cellprob] if f == FLOW_THRESHOLDS[0] else mean_aji(pool, cellprob, f)
                   for f in FLOW_THRESHOLDS}
        flow = max(by_flow, key=by_flow.__getitem__)
    aji, pq = next((a, q) for c, f, a, q in tried if (c, f) == (cellprob, flow))
    return ThresholdChoice(CellposeRule(diameter, cellprob, flow), aji, pq, tried)


@dataclass
class CellposeResult:
    """The trained network, its rule and what it was trained on."""

    state: dict[str, torch.Tensor]
    config: CellposeConfig
    rule: CellposeRule
    choice: ThresholdChoice | None  # None: val has no true per-nucleus maps (cellpose's defaults kept)
    losses: Losses
    train_ids: list[str]
    train_seconds: float
    choice_seconds: float

    @property
    def num_train(self) -> int:
        return len(self.train_ids)


def labelled_data(split: CachedSplit, prepared_dir: Path, name: str, indices: list[int] | None = None
                  ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, source images, their per-nucleus labels) of the split's source images `indices` (all)."""
    ids = source_ids(split)
    indices = list(range(len(ids))) if indices is None else indices
    chosen = [ids[i] for i in indices]
    images = source_images(prepared_dir, name, chosen)
    labels = [split.full_instances(i) for i in indices]
    for image_id, image, lab in zip(chosen, images, labels):
        if image.shape[:2] != lab.shape:
            raise TextDiffError(f"{name} image {image_id}: the source image is {image.shape[1]}x{image.shape[0]} but "
                                f"its instance map is {lab.shape[1]}x{lab.shape[0]}; run `textdiff prepare` again")
    return chosen, images, labels


def train_cellpose(cache: FeatureCache, prepared_dir: Path, params: TrainParams, baseline: BaselineParams,
                   device: torch.device) -> CellposeResult:
    """Cellpose from scratch on the labelled training images at the source resolution, then its
    thresholds chosen on val."""
    check_cellpose(cache.spec, params)
    train, val = cache.split("train"), cache.split("val")
    indices = labeled_subset(len(source_ids(train)), params.num_labeled, params.seed)
    train_ids, images, labels = labelled_data(train, prepared_dir, "train", indices)
    _, val_images, val_labels = labelled_data(val, prepared_dir, "val")
    diameter = training_diameter(labels)
    print(f"cellpose: {len(images)} training images, {sum(int(lab.max()) for lab in labels)} nuclei, median diameter "
          f"{diameter:.1f} px; {baseline.cellpose_epochs} epochs from scratch")
    seed_everything(params.seed)  # the network's initial weights; cellpose seeds its crops by epoch
    config = CellposeConfig(baseline.cellpose_diam_mean)
    model = build_cellpose(config, device)
    started = time.perf_counter()
    losses = fit(model, images, labels, val_images, val_labels, baseline.cellpose_epochs, baseline.cellpose_lr,
                 baseline.cellpose_weight_decay, baseline.cellpose_batch_size, baseline.cellpose_crops_per_epoch)
    train_seconds = time.perf_counter() - started
    # Taken now: on a CPU, cellpose's inference turns the network's layers into MKL-DNN ones in place.
    state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
    started = time.perf_counter()
    truths = scored_truths(val)
    keep = [k for k, t in enumerate(truths) if t is not None]
    choice = (choose_thresholds(model, [val_images[k] for k in keep], [truths[k] for k in keep], diameter, device)
              if keep else None)
    return CellposeResult(state, config, choice.rule if choice else CellposeRule(diameter), choice, losses, train_ids,
                          train_seconds, time.perf_counter() - started)


__all__ = ["CELLPROB_THRESHOLDS", "FLOW_THRESHOLDS", "CellposeResult", "ThresholdChoice", "check_cellpose",
           "choose_thresholds", "source_ids", "train_cellpose", "training_diameter"]
