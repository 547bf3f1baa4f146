"""params.yaml: one section per stage, validated before any work.

The dataclasses below are the one home of every default: params.yaml spells out exactly these
values (a test holds the two equal), and the parameter table of docs/parameters.md is checked against them.

DVC hands every stage the same file (and `dvc exp run -S key=value` edits it), so a typo such as
`train.fusoin` or a negative epoch count must stop the stage with one line naming the key, not run
for an hour on defaults. Each stage loads only the sections it declares in dvc.yaml, so changing
`train.*` can never invalidate `extract`.

This module is data only: it imports no model or pipeline code, so it sits in every stage's DVC
deps without making the teacher's stages depend on the classifier. A choice whose list belongs to
another module (the classifier's fusions, the stain methods, an ADM config) is checked by the stage
that uses it, with that module's rule, before any work, in the same one-line form (`Params.refuse`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from textdiff.errors import TextDiffError

DTYPES = ("float16", "bfloat16", "float32")
MPP_RANGE = (0.05, 20.0)  # µm/px a microscope image can plausibly have (100x oil .. a 1x thumbnail)
DEVICES = ("auto", "cpu", "cuda")

# The in-domain teacher `textdiff pretrain` trains (and the shipped one was trained with): a
# compact ADM sized for a CPU, on 64x64 crops.
AUGMENTATIONS = ("none", "dihedral", "release")
TARGETS = ("auto", "binary", "distance")  # train.target: what the classifier learns beside the mask

COMPACT_ADM = {
    "image_size": 64,
    "num_channels": 32,
    "num_res_blocks": 2,
    "channel_mult": "1,1,2,2,4,4",
    "attention_resolutions": "16,8",
    "num_head_channels": 32,
    "learn_sigma": True,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "dropout": 0.0,
}


def _positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:  # NaN passes every comparison: test it first
        raise ValueError(f"{name} must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass(frozen=True)
class DataParams:
    """Where the LViT-layout dataset lives and how it is sized for the teacher."""

    root: str = "../shared/data/MoNuSeg"
    # Per-nucleus ground truth of the same images, `{Train,Val,Test}/<id>.png` uint16 (see
    # textdiff/data/instances.py); "" or a folder that does not exist: binary targets and metrics only.
    instances: str = "../shared/data/MoNuSeg-instances"
    image_size: int = 256
    mode: str = "resize"
    tile: int = 256
    stride: int = 192
    protocol: str = "project"  # or release: the released code's BGR/bilinear images and dilated masks
    # Stain normalisation of every image (all splits, and `textdiff predict`'s inputs) to a reference
    # fitted on the training images: none | macenko | reinhard (textdiff/stain.py).
    stain: str = "macenko"
    # Micrometres per pixel of the source images (MoNuSeg, 40x: 0.25). Recorded with the model, so
    # `textdiff predict` brings every new image to the resolution the model works at.
    mpp: float = 0.25
    # How data.root is laid out: lvit (MoNuSeg's {Train,Val,Test}_Folder with report workbooks),
    # folder (a lab's images/ + masks/, optional reports.csv and split.csv: docs/your-own-data.md),
    # or auto: folder where data.root holds images/ and masks/, else lvit.
    layout: str = "auto"
    # The folder layout without a split.csv: a seeded permutation gives val and test these fractions.
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def check(self) -> None:
        _positive("data.image_size", self.image_size)
        _one_of("data.layout", self.layout, ("auto", "lvit", "folder"))
        _non_negative("data.val_fraction", self.val_fraction)
        _non_negative("data.test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction is {self.val_fraction + self.test_fraction:g}: "
                             "nothing would be left to train on")
        if not MPP_RANGE[0] <= self.mpp <= MPP_RANGE[1]:
            raise ValueError(f"data.mpp is micrometres per pixel, between {MPP_RANGE[0]} and {MPP_RANGE[1]}; "
                             f"got {self.mpp}")
        if self.image_size % 8:
            raise ValueError(f"data.image_size must be a multiple of 8, got {self.image_size}")
        _one_of("data.mode", self.mode, ("resize", "tiles"))
        _positive("data.tile", self.tile)
        _positive("data.stride", self.stride)
        if self.stride > self.tile:
            raise ValueError(f"data.stride ({self.stride}) must be <= data.tile ({self.tile})")
        _one_of("data.protocol", self.protocol, ("project", "release"))
        if self.protocol == "release" and self.mode == "tiles":
            raise ValueError("data.protocol=release is the released code's 256-px resize protocol; "
                             "it does not apply to data.mode=tiles")


@dataclass(frozen=True)
class TeacherParams:
    """The frozen diffusion UNet whose decoder activations are the image features."""

    kind: str = "adm"
    checkpoint: str = "models/teacher/monuseg-adm32.safetensors"  # shipped; "" = the pretrain stage's
    config: dict = field(default_factory=dict)  # {} = the checkpoint's own (sidecar or header)
    steps: tuple[int, ...] = (50, 150, 250)
    blocks: tuple[int, ...] = (6, 8, 12, 16)
    schedule: str = "linear"
    diffusion_steps: int = 1000
    noise_seed: int = 0

    def check(self) -> None:
        _one_of("teacher.kind", self.kind, ("adm", "rgb"))
        if not self.steps:
            raise ValueError("teacher.steps must not be empty")
        if not self.blocks:
            raise ValueError("teacher.blocks must not be empty")
        if list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"teacher.blocks must be increasing and unique, got {list(self.blocks)}")
        _one_of("teacher.schedule", self.schedule, ("linear", "cosine"))
        _positive("teacher.diffusion_steps", self.diffusion_steps)
        for t in self.steps:
            if not 0 <= t < self.diffusion_steps:
                raise ValueError(f"teacher.steps: {t} is outside [0, {self.diffusion_steps})")


@dataclass(frozen=True)
class TextParams:
    """The frozen BERT-family report encoder ("" = the bundled all-MiniLM-L6-v2)."""

    encoder: str = ""
    max_length: int = 10

    def check(self) -> None:
        _positive("text.max_length", self.max_length)


@dataclass(frozen=True)
class PretrainParams:
    """Training the in-domain teacher on unlabeled train+val images (skipped when
    `teacher.checkpoint` names a file)."""

    config: dict = field(default_factory=lambda: dict(COMPACT_ADM))
    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    warmup: int = 100
    checkpoint_every: int = 200
    samples: int = 4
    sample_steps: int = 50
    seed: int = 0
    device: str = "auto"
    out: str = "models/pretrain"
    # The exported EMA's storage type. bfloat16 halves the file (what ships under models/teacher/);
    # loading casts back to float32 either way.
    export_dtype: str = "float32"
    # Exports larger than this many MiB are written as Hugging Face shards + an index.
    shard_mb: float = 15.0
    # Random zoom of each crop, +-octaves around the working scale, resampled from the source-resolution
    # images in data.root (0 = crops of data/prepared as they are).
    scale_jitter: float = 0.0
    # A folder of the user's own unlabeled images at the source magnification ("" = none); never test images.
    extra_images: str = ""
    # Stop after this many minutes of training, checkpoint and export (0 = no limit); a later run resumes.
    max_minutes: float = 0.0
    compile: bool = False  # torch.compile the UNet for training (worth it on a GPU for long runs)
    log_every: int = 25  # steps between reading the loss back from the device (and logging it)
    # HED stain jitter of every crop (Tellez et al.'s sigma: 0.05 light, 0.2 strong; 0 = none).
    stain_jitter: float = 0.0

    def check(self) -> None:
        _non_negative("pretrain.steps", self.steps)
        _non_negative("pretrain.stain_jitter", self.stain_jitter)
        if self.stain_jitter > 1:
            raise ValueError(f"pretrain.stain_jitter is a fraction of the stain amount; {self.stain_jitter} is more "
                             "than 1")
        _positive("pretrain.shard_mb", self.shard_mb)
        _non_negative("pretrain.scale_jitter", self.scale_jitter)
        if self.scale_jitter > 2:
            raise ValueError(f"pretrain.scale_jitter is in octaves (1 = zoom 0.5x..2x); {self.scale_jitter} is more "
                             "than 2")
        _non_negative("pretrain.max_minutes", self.max_minutes)
        _positive("pretrain.log_every", self.log_every)
        _positive("pretrain.batch_size", self.batch_size)
        _positive("pretrain.lr", self.lr)
        _non_negative("pretrain.weight_decay", self.weight_decay)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}")
        _non_negative("pretrain.grad_clip", self.grad_clip)
        _non_negative("pretrain.warmup", self.warmup)
        _positive("pretrain.checkpoint_every", self.checkpoint_every)
        _non_negative("pretrain.samples", self.samples)
        _positive("pretrain.sample_steps", self.sample_steps)
        _one_of("pretrain.device", self.device, DEVICES)
        _one_of("pretrain.export_dtype", self.export_dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class ExtractParams:
    """Running the teacher once per image, view and timestep into cache/features.zarr."""

    views: int = 1
    # Test-time augmentation: the teacher also sees the first `eval_views` dihedral views of every
    # val and test image (its features of a turned image are not its features turned), and evaluate,
    # the validation rule search and `textdiff predict` average the classifier's maps over them.
    # Measured on the default model (docs/nuclei.md): val AJI +0.9, test AJI +1.9, Dice +1.1 at 8.
    eval_views: int = 8
    # Extra views rotated by a seeded integer angle in [-20, 19] degrees (nearest, black corners), as
    # the released code augments; train.augment=release draws from them.
    rotations: int = 0
    dtype: str = "float16"
    batch_size: int = 4
    device: str = "auto"
    # Processes: > 1 runs the stage under `torchrun --standalone` on this machine (gloo on CPUs, one
    # GPU per process); for several machines launch torchrun yourself (docs/scale-out.md).
    nproc: int = 1
    # Stain-augmented copies per image (after the dihedral and rotated views): the image with its
    # H, E and DAB amounts scaled and shifted by a seeded draw of +-stain_sigma (Tellez et al. 2019).
    stain_views: int = 0
    stain_sigma: float = 0.2
    # torch.compile the teacher's truncated decoder: pays off on a GPU over many images (minutes of
    # compilation first); the features are the same up to float reassociation.
    compile: bool = False
    # The teacher's compute dtype (torch.autocast): bfloat16 is a GPU's fast path (tensor cores); the
    # features then differ from float32 ones by bf16 rounding, so the cache spec records it.
    autocast: str = "float32"
    # The teacher on windows of this many pixels (0 = the whole image at once), every window_stride
    # pixels (0 = half a window), features blended back: a teacher trained on small crops then sees
    # its training size in every attention layer and GroupNorm. Recorded in the cache spec.
    window: int = 0
    window_stride: int = 0

    def check(self) -> None:
        _one_of("extract.views", self.views, (1, 8))
        _one_of("extract.eval_views", self.eval_views, (1, 2, 4, 8))
        _non_negative("extract.window", self.window)
        _non_negative("extract.window_stride", self.window_stride)
        if self.window_stride > self.window:
            raise ValueError(f"extract.window_stride ({self.window_stride}) is more than extract.window "
                             f"({self.window}): windows would leave gaps")
        _one_of("extract.autocast", self.autocast, DTYPES)
        _non_negative("extract.stain_views", self.stain_views)
        _positive("extract.stain_sigma", self.stain_sigma)
        if self.stain_sigma > 1:
            raise ValueError(f"extract.stain_sigma is a fraction of the stain amount; {self.stain_sigma} is more than "
                             "1")
        _positive("extract.nproc", self.nproc)
        _non_negative("extract.rotations", self.rotations)
        _one_of("extract.dtype", self.dtype, DTYPES)
        _positive("extract.batch_size", self.batch_size)
        _one_of("extract.device", self.device, DEVICES)


@dataclass(frozen=True)
class TrainParams:
    """The pixel classifier: the only trained part of TextDiff."""

    fusion: str = "cross_attention"
    contrastive_weight: float = 0.0
    epochs: int = 20
    # A fixed number of optimisation steps instead of epochs (0 = epochs x the labelled images), so
    # that runs with 1 or 24 labels get the same budget; validated every `val_every` steps.
    steps: int = 0
    val_every: int = 24
    num_labeled: int = 0
    seed: int = 40
    lr: float = 1e-4
    milestones: tuple[int, ...] = ()  # validation rounds (epochs) after which lr *= gamma; none = constant
    gamma: float = 0.1
    dice_weight: float = 1.5
    batch_size: int = 1
    d_model: int = 32  # 0 = the text encoder's width (the release: 768)
    heads: int = 4
    # none | dihedral (the cached dihedral views, or flips of the features with one view) | release
    # (the released code's mix: 50 % a reflection, 25 % a +-20 degree rotation, 25 % none; needs
    # extract.views 8 and extract.rotations >= 1)
    augment: str = "dihedral"
    device: str = "auto"
    classifier: str = "project"  # or release: the released pixel classifier and loss, exactly
    padding_mask: bool = True  # pixels ignore the report's padding tokens (the release attends to them)
    decoder_norm: str = "image"  # image: BatchNorm on each image's own statistics; running: the release's
    # binary: the mask alone (nuclei separated by a watershed of the mask's distance transform);
    # distance: also each nucleus' normalised distance to its border, whose peaks seed the watershed
    # (needs data.instances); auto: distance where the cache holds instances, else binary.
    target: str = "auto"
    distance_weight: float = 1.0  # the distance head's mean squared error, beside CE + Dice
    # separate: the distance head has a decoder of its own on the fused features; shared: it reads
    # the mask decoder's last hidden layer (one conv; the choice before this switch existed).
    distance_decoder: str = "separate"
    # The classifier's compute dtype in training (model.json records the one used): bfloat16 =
    # torch.autocast, ~2x faster steps on a CPU with AVX512-BF16/AMX and on a GPU, 13x slower where
    # it is emulated (AVX2); auto = bfloat16 where the hardware computes it, else float32.
    autocast: str = "auto"
    # Processes: > 1 runs the stage under `torchrun --standalone` (DistributedDataParallel; gloo on
    # CPUs, one GPU per process); train.batch_size must split evenly over them.
    nproc: int = 1

    def check(self) -> None:
        _one_of("train.augment", self.augment, AUGMENTATIONS)
        _one_of("train.target", self.target, TARGETS)
        _non_negative("train.distance_weight", self.distance_weight)
        _non_negative("train.contrastive_weight", self.contrastive_weight)
        _positive("train.epochs", self.epochs)
        _non_negative("train.steps", self.steps)
        _positive("train.val_every", self.val_every)
        _non_negative("train.num_labeled", self.num_labeled)
        _positive("train.lr", self.lr)
        rounds, unit = ((-(-self.steps // min(self.val_every, self.steps)), "validation round") if self.steps
                        else (self.epochs, "epoch"))
        for m in self.milestones:
            _positive("train.milestones", m)
            if m >= rounds:
                raise ValueError(f"train.milestones: {m} is not before the last {unit} ({rounds}); "
                                 "the learning rate would never drop")
        _positive("train.gamma", self.gamma)
        _non_negative("train.dice_weight", self.dice_weight)
        _positive("train.batch_size", self.batch_size)
        _non_negative("train.d_model", self.d_model)
        _positive("train.heads", self.heads)
        _one_of("train.device", self.device, DEVICES)
        _positive("train.nproc", self.nproc)
        if self.batch_size % self.nproc:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.nproc ({self.nproc}): "
                             "each process takes an equal part of every batch")


@dataclass(frozen=True)
class BaselineParams:
    """What the train and evaluate stages score instead of TextDiff (read from the same cache, so
    the teacher never re-runs): `classic` = hematoxylin + Otsu, no learning; `unet` = MONAI's UNet
    from scratch on the same labelled images, schedule, augmentation and selection (train.*);
    `cellpose` = Cellpose 3 from scratch on the same labelled images at their source resolution,
    by its own training loop and schedule (the `cellpose_*` keys: its command line's defaults for
    training from scratch, but the number of epochs)."""

    kind: str = "none"  # none (TextDiff) | classic | unet | cellpose
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # the U-Net's widths, one level each
    res_units: int = 2
    lr: float = 1e-3  # Adam, for the U-Net (from scratch, it needs more than the classifier's 1e-4)
    # Cellpose's own loop: epochs of one random 224-px crop per labelled image. 102, as the issue's
    # peer ran (35 min on this 2-core CPU): above 100 cellpose's schedule halves the rate ten times
    # over the last 50 epochs, at 100 or fewer it never anneals (its command line's default is 500).
    cellpose_epochs: int = 102
    # Crops per epoch; 0 = one per labelled image (cellpose's own). The label grid sets the full
    # set's 24 so that every N trains on as many crops as N = 24 does, as train.steps does for the
    # other models: with N = 1, 102 epochs of one crop each would be 102 crops against 2,448.
    cellpose_crops_per_epoch: int = 0
    cellpose_lr: float = 0.2  # SGD with momentum 0.9: cellpose's command-line default from scratch
    cellpose_weight_decay: float = 1e-5
    cellpose_batch_size: int = 8
    # The nucleus diameter (px) cellpose rescales every image to, in training and at inference.
    cellpose_diam_mean: float = 30.0

    def check(self) -> None:
        _one_of("baseline.kind", self.kind, ("none", "classic", "unet", "cellpose"))
        _positive("baseline.cellpose_epochs", self.cellpose_epochs)
        _non_negative("baseline.cellpose_crops_per_epoch", self.cellpose_crops_per_epoch)
        _positive("baseline.cellpose_lr", self.cellpose_lr)
        _non_negative("baseline.cellpose_weight_decay", self.cellpose_weight_decay)
        _positive("baseline.cellpose_batch_size", self.cellpose_batch_size)
        _positive("baseline.cellpose_diam_mean", self.cellpose_diam_mean)
        if len(self.channels) < 2:
            raise ValueError(f"baseline.channels needs at least 2 levels, got {list(self.channels)}")
        for c in self.channels:
            _positive("baseline.channels", c)
        _non_negative("baseline.res_units", self.res_units)
        _positive("baseline.lr", self.lr)


@dataclass(frozen=True)
class EvaluateParams:
    """Test-split metrics, error panels, the per-image summary plot and probability maps."""

    panels: int = 14  # error panels written (the first N test images); the plots page shows them all
    device: str = "auto"

    def check(self) -> None:
        _non_negative("evaluate.panels", self.panels)
        _one_of("evaluate.device", self.device, DEVICES)


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "teacher": TeacherParams,
    "text": TextParams,
    "pretrain": PretrainParams,
    "extract": ExtractParams,
    "train": TrainParams,
    "baseline": BaselineParams,
    "evaluate": EvaluateParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    text: TextParams = field(default_factory=TextParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    train: TrainParams = field(default_factory=TrainParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    path: Path | None = None

    @property
    def source(self) -> str:
        """The file these params came from, as every params error names it."""
        return str(self.path) if self.path is not None else "params.yaml"

    def refuse(self, problem: str | None) -> None:
        """Raise `problem` (a rule of the module that owns the key, e.g. the classifier's fusions)
        as the one-line error every params problem is; nothing when there is none."""
        if problem:
            raise TextDiffError(f"{self.source}: {problem}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one YAML value against the dataclass field's type; YAML ints are fine for floats."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: no param means either
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if annotation is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list of integers, got {value!r}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{key} must be a list of integers, got {value!r}")
        return tuple(value)
    raise TypeError(f"unsupported annotation {annotation} for {key}")  # a bug, not user input


def _build_section(name: str, cls: type, raw: Any, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TextDiffError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TextDiffError(
            f"{source}: unknown key '{name}.{unknown[0]}' (known {name} keys: {', '.join(sorted(known))})"
        )
    try:
        values = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
        section = cls(**values)
        section.check()
    except ValueError as err:
        raise TextDiffError(f"{source}: {err}") from None
    return section


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from YAML) into typed, frozen sections."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TextDiffError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise TextDiffError(
            f"{source}: unknown section '{unknown[0]}' (known sections: {', '.join(SECTIONS)})"
        )
    sections = {name: _build_section(name, cls, raw.get(name), source) for name, cls in SECTIONS.items()}
    return Params(**sections)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise TextDiffError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise TextDiffError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        # An empty file is more often a failed write than a wish for every default; `{}` says the latter.
        raise TextDiffError(f"{path}: params file is empty (write {{}} to run with every default)")
    params = parse_params(raw, source=str(path))
    return dataclasses.replace(params, path=path)


def section_dict(section: Any) -> dict:
    """A JSON-friendly copy of one section, for metadata and cache attrs."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


__all__ = [
    "DTYPES",
    "MPP_RANGE",
    "Params",
    "load_params",
    "parse_params",
    "section_dict",
]
