"""Cellpose 3 trained from scratch: the peer a user can `pip install` (issue 34).

Cellpose (Stringer et al., Nature Methods 2021) predicts per pixel a cell probability and the flow
towards its nucleus' centre; following the flows groups pixels into nuclei. Only the package's own
pieces run here: its network (`CellposeModel`'s CPnet), its training loop (`train.train_seg`: its
random crops, rotations and rescaling to a common nucleus size, its loss and learning-rate
schedule) and its mask dynamics. The numbers are Cellpose's, not a reimplementation's.

This module is the one place that imports the package, and only when a cellpose baseline runs, so
every other kind works without it. The package is version 3 (`cellpose<4`): its CNN trains on a
CPU; version 4 is a different, SAM-based model.

Nothing is downloaded: the network starts from random weights (`pretrained_model=None`), the size
model is never used (the diameter comes from the training nuclei), and `offline()` turns any
attempt of the package to fetch a file into one line instead of a hang on a machine without network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from textdiff.cache.spec import CacheSpec
from textdiff.errors import TextDiffError
from textdiff.model.card import card_problem, load_weights, read_model_dir, save_model_dir

INSTALL = 'pip install --no-deps "cellpose>=3.1,<4" (its dependencies come with pip install -e ".[dev]")'
NCHAN = 3  # RGB in: hematoxylin's blue-purple is what tells a nucleus from cytoplasm
MIN_SIZE = 15  # px: cellpose's own default; smaller masks are dropped
MAX_SIZE_FRACTION = 0.4  # cellpose's own default: a mask over 40 % of the image is dropped


def import_cellpose() -> ModuleType:
    """The cellpose package (3.x), or one line saying how to install it."""
    try:
        version = metadata.version("cellpose")
    except metadata.PackageNotFoundError:
        raise TextDiffError(f"baseline.kind=cellpose needs the cellpose package (version 3): {INSTALL}") from None
    if version.split(".")[0] != "3":
        raise TextDiffError(f"baseline.kind=cellpose needs cellpose 3 (a CNN that trains on a CPU); version {version} "
                            f"is installed: {INSTALL}")
    import cellpose.dynamics
    import cellpose.models
    import cellpose.train  # noqa: F401 - the submodules below are reached as attributes

    return cellpose


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """While it lasts, cellpose cannot download: a request for its pretrained or size models (which
    this baseline never makes on purpose) fails in one line instead of hanging without network."""
    from cellpose import utils

    def refuse(url: str, dst: str, progress: bool = True) -> None:
        raise TextDiffError(f"cellpose tried to download {url}: this baseline trains from scratch and never fetches "
                            "weights (nothing was downloaded; please report it)")

    saved = utils.download_url_to_file
    utils.download_url_to_file = refuse
    try:
        yield
    finally:
        utils.download_url_to_file = saved


@contextlib.contextmanager
def echoed(logger_name: str) -> Iterator[None]:
    """cellpose's INFO log lines (its loop's losses every 10 epochs) on stdout while it lasts: a
    35-minute training otherwise runs in silence."""
    logger = logging.getLogger(logger_name)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("cellpose: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@dataclass(frozen=True)
class CellposeConfig:
    """The network: cellpose's default CPnet on RGB, with nuclei rescaled to `diam_mean` px."""

    diam_mean: float
    nchan: int = NCHAN

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CellposeRule:
    """How its flows become nuclei; stored in model.json. `diameter` (source px) sets the rescale
    at inference (the training nuclei's median); the thresholds are chosen on val."""

    diameter: float
    cellprob_threshold: float = 0.0  # cellpose's defaults
    flow_threshold: float = 0.4

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> CellposeRule:
        if not isinstance(raw, dict):
            raise TypeError("cellpose_rule")
        rule = cls(**{f.name: float(raw[f.name]) for f in dataclasses.fields(cls)})
        if not rule.diameter > 0:
            raise ValueError(f"cellpose_rule.diameter {rule.diameter}")
        return rule


def build_cellpose(config: CellposeConfig, device: torch.device, state: dict | None = None):
    """A `CellposeModel` with random weights (or `state`, a trained CPnet's)."""
    cp = import_cellpose()
    with offline():
        model = cp.models.CellposeModel(pretrained_model=None, model_type=None, diam_mean=config.diam_mean,
                                        nchan=config.nchan, device=device)
    if state is not None:
        model.net.load_state_dict(state)
        model.diam_labels = float(model.net.diam_labels.item())
    return model


def channels_first(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 as cellpose's loop takes it: [3, H, W] float32 (normalised by cellpose)."""
    if image.ndim != 3 or image.shape[-1] != NCHAN:
        raise ValueError(f"expected an [H, W, 3] image, got {image.shape}")
    return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)


@dataclass
class Losses:
    """cellpose's loop's losses: the training loss of every epoch; the val loss (one random crop per
    val image) where its loop measures it, epochs 0, 5, 10, 20, ..."""

    train: list[float]
    val: dict[int, float]


def fit(model, images: list[np.ndarray], labels: list[np.ndarray], val_images: list[np.ndarray],
        val_labels: list[np.ndarray], epochs: int, lr: float, weight_decay: float, batch_size: int,
        crops_per_epoch: int = 0) -> Losses:
    """cellpose's own loop (`train.train_seg`) on `images` ([H, W, 3] uint8) and their per-nucleus
    `labels`, as its command line trains from scratch: SGD with momentum 0.9, per-channel percentile
    normalisation, every image rescaled so its nuclei have `diam_mean` px, 224-px crops. Every
    labelled image is kept (`min_train_masks=0`), however few nuclei it has. `crops_per_epoch` > 0
    draws that many crops per epoch (cellpose's `nimg_per_epoch`), 0 one per image."""
    cp = import_cellpose()
    with tempfile.TemporaryDirectory(prefix="textdiff-cellpose-") as tmp, offline(), echoed("cellpose.train"):
        _, train_losses, val_losses = cp.train.train_seg(
            model.net, train_data=[channels_first(im) for im in images],
            train_labels=[np.asarray(lab, np.int32) for lab in labels],
            test_data=[channels_first(im) for im in val_images] or None,
            test_labels=[np.asarray(lab, np.int32) for lab in val_labels] or None,
            channels=None, channel_axis=None, rgb=True, normalize=True, learning_rate=lr, weight_decay=weight_decay,
            SGD=True, n_epochs=epochs, batch_size=batch_size, min_train_masks=0, save_path=tmp, save_every=epochs,
            nimg_per_epoch=crops_per_epoch or None, model_name="cellpose")
    model.diam_labels = float(model.net.diam_labels.item())
    measured = [e for e in range(epochs) if e == 5 or e % 10 == 0] if val_images else []
    return Losses([float(x) for x in train_losses], {e: float(val_losses[e]) for e in measured})


@dataclass
class Flows:
    """What the network says about one image, at its own size: flows [2, H, W], cell probability
    logits [H, W], and the dynamics' step count for its rescale (as `CellposeModel.eval`)."""

    dp: np.ndarray
    cellprob: np.ndarray
    niter: float


@torch.no_grad()
def flows(model, image: np.ndarray, diameter: float) -> Flows:
    """The network once on one [H, W, 3] uint8 image, rescaled so that `diameter` px become the
    model's `diam_mean`; the flows come back at the image's size."""
    with offline():
        _, (_, dp, cellprob), _ = model.eval(channels_first(image), channel_axis=0, diameter=diameter,
                                             normalize=True, compute_masks=False)
    return Flows(np.asarray(dp, np.float32), np.asarray(cellprob, np.float32),
                 200.0 * diameter / float(model.diam_mean))


def nuclei(f: Flows, rule: CellposeRule, device: torch.device) -> np.ndarray:
    """Labelled nuclei (0 = background) from the flows by cellpose's own dynamics and clean-up."""
    cp = import_cellpose()
    labels = cp.dynamics.resize_and_compute_masks(
        f.dp, f.cellprob, niter=f.niter, cellprob_threshold=rule.cellprob_threshold,
        flow_threshold=rule.flow_threshold, interp=True, min_size=MIN_SIZE, max_size_fraction=MAX_SIZE_FRACTION,
        device=device)
    return np.asarray(labels)


def predict_nuclei(model, images: list[np.ndarray], rule: CellposeRule, device: torch.device,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Labelled nuclei of every image (the network, then the dynamics, one image at a time)."""
    out = []
    for k, image in enumerate(images):
        out.append(nuclei(flows(model, image, rule.diameter), rule, device))
        if progress is not None:
            progress(k)
    return out


# ---------------------------------------------------------------- on disk, beside the other baselines'


def save_cellpose(out_dir: Path, spec: CacheSpec, config: CellposeConfig, state: dict, rule: CellposeRule,
                  fields: dict) -> None:
    """models/classifier/ for Cellpose: model.pt the CPnet's weights, model.json its config, its rule
    (`cellpose_rule`) and `fields` (train params, val scores, tried thresholds, training ids)."""
    card = {"kind": "cellpose", "cache_spec": spec.to_json(), "cellpose": config.to_json(),
            "cellpose_version": metadata.version("cellpose"), "cellpose_rule": rule.to_json(), **fields}
    save_model_dir(out_dir, card, state)


def load_cellpose(model_dir: Path, device: torch.device):
    """(the trained CellposeModel, its rule, the cache spec it was made on); one line if foreign."""
    files = read_model_dir(model_dir)
    if files.kind != "cellpose":
        raise TextDiffError(f"{files.card_path}: holds a {files.kind} model, not the cellpose baseline")
    try:
        spec = CacheSpec.from_json(files.raw.get("cache_spec"), source=str(files.card_path))
        config = CellposeConfig(float(files.raw["cellpose"]["diam_mean"]), int(files.raw["cellpose"]["nchan"]))
        rule = CellposeRule.from_json(files.raw.get("cellpose_rule"))
    except (KeyError, TypeError, ValueError, TextDiffError) as err:
        raise card_problem(files, err) from None
    state = load_weights(files, "Cellpose baseline's")
    try:
        model = build_cellpose(config, device, state)
    except (RuntimeError, KeyError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise TextDiffError(f"{files.weights_path}: not the Cellpose baseline's weights ({reason})") from None
    return model, rule, spec


__all__ = ["CellposeConfig", "CellposeRule", "Flows", "INSTALL", "Losses", "build_cellpose", "fit", "flows",
           "import_cellpose", "load_cellpose", "nuclei", "offline", "predict_nuclei", "save_cellpose"]
